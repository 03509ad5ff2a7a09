"""Training loops of the dipole-inversion networks: pre-training, adaptation, transfer learning.

One entry point, :func:`train`, driven by a :class:`TrainConfig`. Methods (``method``):

``"supervised"``
    pre-training on synthetic data (:class:`~qsmprep.dl.synth.SyntheticQSMData`):
    ``L_S = mean_M |chi_pred - chi_true|`` (``loss="l1"``, or L2), optionally plus
    ``grad_weight`` times the gradient-difference loss.
``"dsbn"`` (QSMInvNet+)
    each step a labelled synthetic batch through the ``"source"`` batch norms (``L_S``) and an
    unlabelled target batch (:class:`~qsmprep.dl.target.TargetScans`) through the ``"target"``
    ones with the data-consistency loss ``L_T = ||W (e^{i s D*chi} - e^{i s f})||^2 / ||W||^2``
    (:func:`qsmprep.dl.losses.data_consistency_loss`); ``L = L_S + lambda(t) L_T`` with
    ``lambda`` ramped up to ``lambda_max`` (sigmoid ``exp(-5 (1 - t/T)^2)`` or linear over
    ``ramp_steps``). The saved model infers with the target domain.
``"dc-finetune"`` (QSMInvNet)
    a pretrained model (``init``) fine-tuned on target scans with ``L_T``.
``"unsupervised"`` (uQSM-style)
    ``L_T`` alone from scratch, plus ``tv_weight`` times the masked mean absolute gradient
    of chi.
``"transfer"``
    supervised on target patches with a reference chi (e.g. COSMOS), from a pretrained model:
    the filter-manifold network frozen, the decoder at ``transfer_lr_decoder`` (1e-3) and
    everything else at ``transfer_lr_other`` (1e-5)
    (:meth:`~qsmprep.dl.nets.unet.UNet3d.param_groups_for_transfer`).

Optimiser AdamW with cosine annealing and warm restarts, stepped every iteration.

References: Liu J, Koch KM. Non-locally encoder-decoder convolutional network for whole brain
QSM inversion. arXiv:1904.05493, 2019 (QSMInvNet). Liu J, Koch KM. Exploring domain adaption
for deep neural network trained QSM. Proc ISMRM 2021:3980; arXiv:2206.13225 (QSMInvNet+).
Chang WG, You T, Seo S, Kwak S, Han B. Domain-specific batch normalization for unsupervised
domain adaptation. CVPR 2019:7354-7362. Kang D, Dhar D, Chan AB. Incorporating side
information by adaptive convolution. NeurIPS 2017. Loshchilov I, Hutter F. Decoupled weight
decay regularization. ICLR 2019 (AdamW); SGDR: stochastic gradient descent with warm
restarts. ICLR 2017.

Outputs in ``out``: ``last.pt`` (every ``ckpt_every`` steps: weights, optimiser, scheduler, RNG
and data-generator state, so ``resume=True`` continues to the same final weights),
``train_log.csv`` (step, losses, lambda, learning rate, validation metrics, patches/s),
TensorBoard events in ``tb/`` when ``torch.utils.tensorboard`` imports, and the final
``<name>.pt`` (config, data description, step count, held-out metrics; its sha256 is returned
by :func:`save_checkpoint`) with the model card ``<name>.md`` beside it.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qsmprep.dl.checkpoint import load_checkpoint, save_checkpoint, write_model_card
from qsmprep.dl.inference import resolve_device
from qsmprep.dl.losses import data_consistency_loss, gradient_loss, supervised_loss
from qsmprep.dl.nets import ARCHS, build_model, default_config
from qsmprep.dl.synth import SyntheticQSMData

__all__ = [
    "METHODS",
    "TrainConfig",
    "benchmark",
    "lambda_schedule",
    "make_inputs",
    "train",
]

log = logging.getLogger(__name__)

METHODS = ("supervised", "dsbn", "dc-finetune", "unsupervised", "transfer")
"""Training methods of :func:`train`."""

_NEEDS_TARGET = ("dsbn", "dc-finetune", "unsupervised", "transfer")
_NEEDS_INIT = ("dc-finetune", "transfer")
_CSV_FIELDS = [
    "step",
    "loss",
    "loss_source",
    "loss_target",
    "lambda",
    "lr",
    "val_loss",
    "val_nrmse",
    "val_target_dc",
    "val_target_nrmse",
    "patches_per_s",
    "elapsed_s",
]
ADAPTIVE_SYNTH = {
    "voxel_size": ((0.5, 2.5), (0.5, 2.5), (0.5, 3.5)),
    "b0_dir": "random",
    "max_tilt_deg": 45.0,
}
"""Synthetic-data defaults for the adaptive model: random voxel sizes and B0 directions."""


@dataclass
class TrainConfig:
    """Everything :func:`train` needs (saved in every checkpoint).

    Attributes
    ----------
    method : str
        One of :data:`METHODS`.
    arch : str or None
        ``"unet"``, ``"dsbn"`` or ``"adaptive"``; None takes the ``init`` checkpoint's (else
        ``"dsbn"`` for method dsbn, ``"unet"`` otherwise).
    model : dict
        Overrides of :func:`qsmprep.dl.nets.default_config` (``base_channels``, ``depth``...)
        for a model built from scratch.
    init : str or None
        Checkpoint to start from (required by dc-finetune and transfer).
    steps, batch_size, target_batch_size : int
        Optimiser steps; synthetic (or target, for target-only methods) patches per step;
        target patches per step of dsbn (default ``batch_size``).
    patch_size : 3 ints
        Patch shape (voxels), multiples of the model's ``2**(depth-1)``.
    lr, weight_decay : float
        AdamW learning rate and decoupled weight decay.
    restart_steps, restart_mult, lr_min_ratio : int, int, float
        Cosine annealing with warm restarts: first period (0: ``steps``, one cosine), period
        multiplier, floor as a fraction of ``lr``.
    loss, grad_weight : str, float
        Supervised loss (``"l1"``/``"l2"``) and the weight of the gradient-difference term.
    lambda_max, ramp, ramp_steps : float, str, int
        dsbn: weight of ``L_T``, ramp ``"sigmoid"``/``"linear"``/``"none"`` and its length
        (0: half of ``steps``).
    tv_weight : float
        unsupervised: weight of the total-variation term.
    transfer_lr_decoder, transfer_lr_other : float
        transfer: learning rates of the decoder and of the rest (the FMN is frozen).
    fmn_lr_scale : float
        Other methods: the filter-manifold network of an adaptive model learns at ``lr`` times
        this (default 1). Each generated kernel weight is a bias plus a sum over the 64 hidden
        units of the FMN's last layer, and Adam moves every one of those parameters by about
        ``lr`` a step, so at the full rate the first-layer kernel moves some 30 times as far
        per step as an ordinary convolution's; 0.03 brings it back to about ``lr``. That made
        fixed-geometry training faster but random-geometry pre-training worse (see
        ``docs/deep-learning.md``), hence the default.
    clip_grad : float
        Gradient-norm clipping (0: off).
    synth : dict
        Keyword arguments of :class:`~qsmprep.dl.synth.SyntheticQSMData` (the adaptive model
        gets :data:`ADAPTIVE_SYNTH` unless given).
    target, reference : str or None
        Target scans (qsmprep output directory or BIDS dataset) and reference chi (transfer;
        default ``"cosmos"``), see :class:`~qsmprep.dl.target.TargetScans`.
    target_options : dict
        More keyword arguments of :class:`~qsmprep.dl.target.TargetScans` (``b0``, ``te``,
        ``participant_label``, ``bg_method``, ``min_mask_fraction``).
    seed : int
        Seed of the model initialisation and of all data.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    amp : bool
        bfloat16 autocast of the network on CUDA (losses stay float32).
    out, name : str
        Output directory and the final checkpoint's stem (default ``<method>-<arch>``).
    log_every, val_every, ckpt_every, val_batches : int
        Intervals (steps) of the CSV log, validation and resumable checkpoints (0: only at the
        end), and the number of held-out batches.
    quiet : bool
        No progress bar.
    resume : bool
        Continue from ``out/last.pt`` (its saved configuration wins over this one, except
        ``quiet``, ``device`` and ``stop_at``).
    stop_at : int
        Stop after this step with only the resumable ``last.pt`` written (0: run to the end),
        for time-limited jobs: resume later with ``resume=True``.
    half : bool
        Store the final checkpoint's weights as float16.
    command : str or None
        The command line, for the model card.
    """

    method: str = "supervised"
    arch: str | None = None
    model: dict = field(default_factory=dict)
    init: str | None = None
    steps: int = 1000
    batch_size: int = 2
    target_batch_size: int | None = None
    patch_size: tuple = (64, 64, 64)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    restart_steps: int = 0
    restart_mult: int = 1
    lr_min_ratio: float = 0.01
    loss: str = "l1"
    grad_weight: float = 0.0
    lambda_max: float = 1.0
    ramp: str = "sigmoid"
    ramp_steps: int = 0
    tv_weight: float = 0.0
    transfer_lr_decoder: float = 1e-3
    transfer_lr_other: float = 1e-5
    fmn_lr_scale: float = 1.0
    clip_grad: float = 1.0
    synth: dict = field(default_factory=dict)
    target: str | None = None
    reference: str | None = None
    target_options: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    out: str = "qsmprep-train"
    name: str | None = None
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100
    val_batches: int = 4
    quiet: bool = False
    resume: bool = False
    stop_at: int = 0
    half: bool = False
    command: str | None = None

    def to_dict(self) -> dict:
        """JSON-able copy."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ValueError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError with the fix for inconsistent settings."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.arch is not None and self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.method == "dsbn" and self.arch not in (None, "dsbn"):
            raise ValueError(
                f"method 'dsbn' needs the 'dsbn' architecture (domain-specific batch norm), "
                f"got arch {self.arch!r}; use --arch dsbn"
            )
        if self.method in _NEEDS_INIT and not self.init:
            raise ValueError(
                f"method {self.method!r} starts from a pretrained model: give its checkpoint "
                "with --init (train one with `qsmprep-train pretrain`)"
            )
        if self.method in _NEEDS_TARGET and not self.target:
            raise ValueError(
                f"method {self.method!r} needs target scans: give --target (a qsmprep output "
                "directory or a BIDS dataset)"
            )
        for key in ("steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if self.target_batch_size is not None and int(self.target_batch_size) < 1:
            raise ValueError(f"target_batch_size must be >= 1, got {self.target_batch_size!r}")
        ps = np.atleast_1d(np.asarray(self.patch_size, int))
        if ps.size not in (1, 3) or ps.min() < 1:
            raise ValueError(f"patch_size must be 1 or 3 positive ints, got {self.patch_size!r}")
        if not self.fmn_lr_scale > 0:
            raise ValueError(f"fmn_lr_scale must be positive, got {self.fmn_lr_scale!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {self.loss!r}")
        if self.ramp not in ("sigmoid", "linear", "none"):
            raise ValueError(f"ramp must be 'sigmoid', 'linear' or 'none', got {self.ramp!r}")
        for key in ("log_every", "val_every", "ckpt_every", "val_batches", "stop_at"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        ps = tuple(int(n) for n in np.atleast_1d(np.asarray(self.patch_size, int)))
        return ps * 3 if len(ps) == 1 else ps


# ------------------------------------------------------------------------------- helpers


def lambda_schedule(step: int, lambda_max: float, ramp_steps: int, kind: str = "sigmoid"):
    """Weight of the target loss at ``step``: ramped from 0 to ``lambda_max``.

    ``sigmoid``: ``lambda_max exp(-5 (1 - t)^2)``, ``t = min(step / ramp_steps, 1)`` (Laine S,
    Aila T. Temporal ensembling for semi-supervised learning. ICLR 2017); ``linear``:
    ``lambda_max t``; ``none``: ``lambda_max``.
    """
    if kind == "none" or ramp_steps <= 0:
        return float(lambda_max)
    t = min(max(step, 0) / ramp_steps, 1.0)
    if kind == "linear":
        return float(lambda_max * t)
    return float(lambda_max * math.exp(-5.0 * (1.0 - t) ** 2))


def make_inputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input ``[field * field_scale * mask, mask]`` and side information ``(B, 6)``."""
    mask = batch["mask"]
    x = torch.cat([batch["field"] * float(model.config["field_scale"]) * mask, mask], dim=1)
    side = torch.cat([batch["voxel_size"], batch["b0_dir"]], dim=1).float()
    return x, side


def _predict(model, batch, domain, amp: bool) -> torch.Tensor:
    """chi (ppm) predicted for a batch, float32."""
    x, side = make_inputs(model, batch)
    if amp:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            out = model(x, side=side, domain=domain)
    else:
        out = model(x, side=side, domain=domain)
    return out.float() / float(model.config["chi_scale"])


def _nrmse(pred, truth, mask) -> float:
    """Mean over the batch of the de-meaned NRMSE (%) in the mask (as qsmprep.metrics.nrmse)."""
    vals = []
    for p, t, m in zip(pred, truth, mask, strict=True):
        sel = m > 0
        if not bool(sel.any()):
            continue
        pv, tv = p[sel].double(), t[sel].double()
        pv, tv = pv - pv.mean(), tv - tv.mean()
        den = tv.norm()
        if den > 0:
            vals.append(float(100.0 * (pv - tv).norm() / den))
    return float(np.mean(vals)) if vals else float("nan")


def _tv(chi, mask) -> torch.Tensor:
    return gradient_loss(chi, torch.zeros_like(chi), mask)


def _dc(chi, batch) -> torch.Tensor:
    return data_consistency_loss(
        chi,
        batch["field"],
        batch["weight"],
        batch["voxel_size"],
        batch["b0_dir"],
        phase_scale=batch["phase_scale"],
    )


def _sup(cfg: TrainConfig, chi, batch) -> torch.Tensor:
    loss = supervised_loss(chi, batch["chi"], batch["mask"], kind=cfg.loss)
    if cfg.grad_weight > 0:
        loss = loss + cfg.grad_weight * gradient_loss(chi, batch["chi"], batch["mask"])
    return loss


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _synth_kwargs(cfg: TrainConfig, arch: str) -> dict:
    kw = dict(cfg.synth)
    if arch == "adaptive":
        for k, v in ADAPTIVE_SYNTH.items():
            kw.setdefault(k, v)
    return kw


class _Csv:
    """CSV log that, on resume, drops the rows after the resumed step."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        rows = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start_step]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
            w.writerow({k: _fmt(row.get(k)) for k in _CSV_FIELDS})


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))


# ------------------------------------------------------------------------------- setup


def _build(cfg: TrainConfig, device: torch.device):
    """Model (fresh or from ``init``) and the resolved architecture."""
    if cfg.init:
        expect = None if cfg.method == "dsbn" else cfg.arch  # a unet init becomes a dsbn
        model, meta = load_checkpoint(cfg.init, device=device, arch=expect)
        arch = model.config["arch"]
        if cfg.method == "dsbn" and arch != "dsbn":
            if arch != "unet" or model.config["norm"] != "batch":
                raise ValueError(
                    f"init checkpoint {cfg.init} holds a {arch!r} model with "
                    f"{model.config['norm']!r} norm; method 'dsbn' starts from a 'dsbn' model "
                    "or a batch-norm 'unet' (pretrain with --arch unet or --arch dsbn)"
                )
            model = _dsbn_from_unet(model)
            arch = "dsbn"
        return model, arch, meta
    arch = cfg.arch or ("dsbn" if cfg.method == "dsbn" else "unet")
    torch.manual_seed(cfg.seed)
    model = build_model(default_config(arch, **cfg.model)).to(device)
    return model, arch, None


def _dsbn_from_unet(model):
    """The DSBN network with ``model``'s weights, each domain starting from its batch norms."""
    from qsmprep.dl.nets.dsbn import dsbn_state_from_batchnorm

    c = {k: v for k, v in model.config.items() if k != "arch"}
    c.update(norm="dsbn", default_domain="source")
    dsbn = build_model(default_config("dsbn", **c)).to(next(model.parameters()).device)
    dsbn.load_state_dict(dsbn_state_from_batchnorm(model.state_dict(), dsbn.state_dict()))
    dsbn.train(model.training)
    return dsbn


def _optimizer(cfg: TrainConfig, model):
    """AdamW (param groups for transfer) and its cosine warm-restart scheduler."""
    if cfg.method == "transfer":
        groups = model.param_groups_for_transfer()
        for p in groups["fmn"]:
            p.requires_grad_(False)
        params = [
            {"params": groups["decoder"], "lr": cfg.transfer_lr_decoder, "name": "decoder"},
            {"params": groups["encoder"], "lr": cfg.transfer_lr_other, "name": "encoder"},
        ]
    else:
        fmn = set()
        if float(cfg.fmn_lr_scale) != 1.0:
            fmn = {id(p) for p in model.param_groups_for_transfer()["fmn"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in fmn]
        params = [{"params": rest, "name": "all"}]
        if fmn:
            params.append({
                "params": [p for p in model.parameters() if id(p) in fmn],
                "lr": cfg.lr * float(cfg.fmn_lr_scale), "name": "fmn",
            })  # fmt: skip
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base = min(g["lr"] for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt,
        T_0=int(cfg.restart_steps) or int(cfg.steps),
        T_mult=int(cfg.restart_mult),
        eta_min=base * float(cfg.lr_min_ratio),
    )
    return opt, sched


def _check_patch(cfg: TrainConfig, model) -> None:
    m = model.multiple
    if any(n % m or n < m for n in cfg.patch_shape):
        raise ValueError(
            f"patch size {cfg.patch_shape} is not a multiple of {m} (2**(depth-1) for depth "
            f"{model.config['depth']}); choose e.g. --patch-size {max(m, 64 // m * m)}"
        )


def _data(cfg: TrainConfig, arch: str, device: torch.device):
    """(synthetic train, synthetic val batches, target train, target val batches)."""
    from qsmprep.dl.target import TargetScans

    ps = cfg.patch_shape
    synth = val = target = tval = None
    skw = _synth_kwargs(cfg, arch)
    if cfg.method in ("supervised", "dsbn"):
        synth = SyntheticQSMData(ps, seed=cfg.seed, device=device, **skw)
    if cfg.val_batches > 0:
        held = SyntheticQSMData(ps, seed=cfg.seed + 7919, device=device, **skw)
        val = [held.batch(cfg.batch_size) for _ in range(cfg.val_batches)]
    if cfg.method in _NEEDS_TARGET:
        ref = cfg.reference
        if cfg.method == "transfer" and ref is None:
            ref = "cosmos"
        opts = dict(cfg.target_options)
        target = TargetScans(
            cfg.target, ps, reference=ref, seed=cfg.seed + 1, device=device, **opts
        )
        if cfg.val_batches > 0:
            held_t = TargetScans(
                target.scans, ps, seed=cfg.seed + 104729, device=device,
                min_mask_fraction=target.min_mask_fraction,
            )  # fmt: skip
            tb = cfg.target_batch_size or cfg.batch_size
            tval = [held_t.batch(tb) for _ in range(cfg.val_batches)]
    return synth, val, target, tval


# ------------------------------------------------------------------------------- validation


@torch.no_grad()
def _validate(cfg: TrainConfig, model, val, tval, amp: bool) -> dict:
    model.eval()
    out = {}
    if val:
        domain = "source" if model.config["arch"] == "dsbn" else None
        losses, errs = [], []
        for b in val:
            chi = _predict(model, b, domain, amp)
            losses.append(float(supervised_loss(chi, b["chi"], b["mask"], kind=cfg.loss)))
            errs.append(_nrmse(chi, b["chi"], b["mask"]))
        out["val_loss"] = float(np.mean(losses))
        out["val_nrmse"] = float(np.nanmean(errs))
    if tval:
        domain = "target" if model.config["arch"] == "dsbn" else None
        dcs, errs = [], []
        for b in tval:
            chi = _predict(model, b, domain, amp)
            dcs.append(float(_dc(chi, b)))
            if "chi" in b:
                errs.append(_nrmse(chi, b["chi"], b["mask"]))
        out["val_target_dc"] = float(np.mean(dcs))
        if errs:
            out["val_target_nrmse"] = float(np.nanmean(errs))
    model.train()
    return out


def tkd_baseline(val) -> float:
    """NRMSE (%) of TKD (threshold 0.19) on held-out synthetic batches: the bar to beat."""
    from qsmprep.recon.inversion import tkd

    errs = []
    for b in val:
        for i in range(b["field"].shape[0]):
            f = b["field"][i, 0].cpu().numpy()
            m = b["mask"][i, 0].cpu().numpy() > 0
            chi = tkd(f, m, b["voxel_size"][i].cpu().numpy(), b0_dir=b["b0_dir"][i].cpu().numpy())
            t = torch.as_tensor(np.asarray(chi, np.float32))[None, None]
            errs.append(_nrmse(t, b["chi"][i : i + 1].cpu(), b["mask"][i : i + 1].cpu()))
    return float(np.nanmean(errs))


# ------------------------------------------------------------------------------- training


def _rng_state(device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device) -> None:
    if st.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(st["torch"], dtype=torch.uint8))
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(torch.as_tensor(st["cuda"], dtype=torch.uint8), device)


def _resume_config(cfg: TrainConfig) -> tuple[TrainConfig, Path]:
    last = Path(cfg.out) / "last.pt"
    if not last.is_file():
        raise ValueError(
            f"nothing to resume in {cfg.out}: no last.pt there; start the run without --resume "
            "or give the --out directory of the interrupted run"
        )
    payload = torch.load(last, map_location="cpu", weights_only=True)
    saved = (payload.get("extra") or {}).get("train_config")
    if not saved:
        raise ValueError(f"{last} has no training configuration; it cannot be resumed")
    saved = dict(saved)
    saved.update(quiet=cfg.quiet, device=cfg.device, resume=True, out=cfg.out, stop_at=cfg.stop_at)
    if cfg.command:
        saved["command"] = saved.get("command") or cfg.command
    return TrainConfig.from_dict(saved), last


def train(config) -> Path:
    """Train a dipole-inversion network; return the path of the final checkpoint.

    Parameters
    ----------
    config : TrainConfig or dict
        See :class:`TrainConfig`.

    Returns
    -------
    Path of ``<out>/<name>.pt``; the model card ``<name>.md`` is beside it (``<out>/last.pt``
    when ``stop_at`` ended the run early).

    Raises
    ------
    ValueError
        Inconsistent settings, a checkpoint of the wrong architecture, missing or unusable
        target scans, nothing to resume.
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    last_payload = None
    if cfg.resume:
        cfg, last = _resume_config(cfg)
    cfg.validate()
    device = resolve_device(cfg.device)
    amp = bool(cfg.amp and device.type == "cuda")
    out = Path(cfg.out)

    if cfg.resume:
        model, meta = load_checkpoint(last, device=device)
        last_payload = meta
        arch = model.config["arch"]
        init_meta = None
    else:
        model, arch, init_meta = _build(cfg, device)
    _check_patch(cfg, model)
    model.train()
    opt, sched = _optimizer(cfg, model)
    synth, val, target, tval = _data(cfg, arch, device)
    if cfg.method in ("transfer",) and not target.labelled:
        raise ValueError("transfer learning needs target scans with a reference chi")

    start = 0
    if last_payload is not None:
        start = int(last_payload["step"])
        opt.load_state_dict(last_payload["optimizer"])
        sched.load_state_dict(last_payload["scheduler"])
        state = last_payload["extra"]
        if synth is not None and state.get("synth_state"):
            synth.load_state_dict(state["synth_state"])
        if target is not None and state.get("target_state"):
            target.load_state_dict(state["target_state"])
        _set_rng_state(state.get("rng") or {}, device)
        wall_before = float(state.get("wall_s", 0.0))
        tkd_nrmse = state.get("tkd_val_nrmse")
    else:
        wall_before = 0.0
        tkd_nrmse = tkd_baseline(val) if (val and cfg.method in ("supervised", "dsbn")) else None
    out.mkdir(parents=True, exist_ok=True)
    csv_log = _Csv(out / "train_log.csv", start)
    tb = _tensorboard(out)
    tb_target = cfg.target_batch_size or cfg.batch_size
    ramp = int(cfg.ramp_steps) or max(1, cfg.steps // 2)

    def data_state() -> dict:
        return {
            "train_config": cfg.to_dict(),
            "synth_state": None if synth is None else synth.state_dict(),
            "target_state": None if target is None else target.state_dict(),
            "rng": _rng_state(device),
            "wall_s": wall_before + time.perf_counter() - t_start,
            "tkd_val_nrmse": tkd_nrmse,
        }

    def describe() -> dict:
        d = {"method": cfg.method}
        if synth is not None or val:
            d["synthetic"] = SyntheticQSMData(
                cfg.patch_shape, seed=cfg.seed, **_synth_kwargs(cfg, arch)
            ).describe()
        if target is not None:
            d["target"] = target.describe()
        if cfg.init:
            d["init"] = str(cfg.init)
            if init_meta is not None:
                d["init_sha256"] = init_meta.get("sha256")
        return d

    from tqdm.auto import tqdm

    quiet = cfg.quiet or not sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start, disable=quiet, desc=f"{cfg.method}/{arch}")
    t_start = time.perf_counter()
    metrics: dict = dict((last_payload or {}).get("metrics") or {})
    if start == 0 and (val or tval):  # the untrained model, for reference
        metrics = _validate(cfg, model, val, tval, amp)
        csv_log.write({"step": 0, "elapsed_s": 0.0, **metrics})
    t_last, n_patches = time.perf_counter(), 0
    for step in range(start + 1, cfg.steps + 1):
        lam = None
        loss_s = loss_t = None
        if cfg.method == "supervised":
            b = synth.batch(cfg.batch_size)
            dom = "source" if arch == "dsbn" else None
            loss = loss_s = _sup(cfg, _predict(model, b, dom, amp), b)
            n_patches += cfg.batch_size
        elif cfg.method == "dsbn":
            bs = synth.batch(cfg.batch_size)
            bt = target.batch(tb_target)
            loss_s = _sup(cfg, _predict(model, bs, "source", amp), bs)
            loss_t = _dc(_predict(model, bt, "target", amp), bt)
            lam = lambda_schedule(step - 1, cfg.lambda_max, ramp, cfg.ramp)
            loss = loss_s + lam * loss_t
            n_patches += cfg.batch_size + tb_target
        elif cfg.method in ("dc-finetune", "unsupervised"):
            bt = target.batch(cfg.batch_size)
            chi = _predict(model, bt, None, amp)
            loss = loss_t = _dc(chi, bt)
            if cfg.method == "unsupervised" and cfg.tv_weight > 0:
                loss = loss + cfg.tv_weight * _tv(chi, bt["mask"])
            n_patches += cfg.batch_size
        else:  # transfer
            bt = target.batch(cfg.batch_size)
            loss = loss_t = _sup(cfg, _predict(model, bt, None, amp), bt)
            n_patches += cfg.batch_size
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss became {loss_value} at step {step}; lower --lr (now {cfg.lr})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.clip_grad
            )
        lr_now = max(g["lr"] for g in opt.param_groups)  # the rate of this step
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4g}")

        do_val = (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps
        do_log = (cfg.log_every and step % cfg.log_every == 0) or do_val
        if do_val and (val or tval):
            metrics = _validate(cfg, model, val, tval, amp)
        if do_log:
            now = time.perf_counter()
            row = {
                "step": step,
                "loss": loss_value,
                "loss_source": None if loss_s is None else float(loss_s.detach()),
                "loss_target": None if loss_t is None else float(loss_t.detach()),
                "lambda": lam,
                "lr": lr_now,
                "patches_per_s": n_patches / max(now - t_last, 1e-9),
                "elapsed_s": wall_before + now - t_start,
                **(metrics if do_val else {}),
            }
            csv_log.write(row)
            if tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, float):
                        tb.add_scalar(k, v, step)
            t_last, n_patches = now, 0
        stop = bool(cfg.stop_at) and step == cfg.stop_at and step < cfg.steps
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps) or stop:
            save_checkpoint(
                out / "last.pt", model, step=step, optimizer=opt, scheduler=sched,
                extra=data_state(), data=describe(), metrics=metrics,
            )  # fmt: skip
        if stop:
            bar.close()
            log.info("stopped at step %d; resume with resume=True (--resume)", step)
            return out / "last.pt"
    bar.close()
    if tb is not None:
        tb.close()

    wall = wall_before + time.perf_counter() - t_start
    if cfg.method == "dsbn":
        model.default_domain = "target"
    # the resumable state of the finished run (resume then has nothing left to do)
    save_checkpoint(
        out / "last.pt", model, step=cfg.steps, optimizer=opt, scheduler=sched,
        extra=data_state(), data=describe(), metrics=metrics,
    )  # fmt: skip
    name = cfg.name or f"{cfg.method}-{arch}"
    held = dict(metrics)
    if tkd_nrmse is not None:
        held["val_tkd_nrmse"] = tkd_nrmse
    extra = {
        "command": cfg.command or "",
        "method": cfg.method,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "patch_size": list(cfg.patch_shape),
        "lr": cfg.lr,
        "device": str(device),
        "hardware": _hardware(device),
        "wall_time_s": round(wall, 1),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "train_config": cfg.to_dict(),
    }
    final = out / f"{name}.pt"
    save_checkpoint(
        final, model, step=cfg.steps, data=describe(), metrics=held, extra=extra, half=cfg.half
    )
    _, meta = load_checkpoint(final, device="cpu")
    card = write_model_card(final.with_suffix(".md"), meta)
    with open(card, "a", encoding="utf-8") as fh:
        fh.write("\n## Reproduce\n\n")
        if cfg.command:
            fh.write(f"```\n{cfg.command}\n```\n\n")
        fh.write(
            f"Seed {cfg.seed}, {cfg.steps} steps of {cfg.batch_size} patches "
            f"{'x'.join(map(str, cfg.patch_shape))} on {_hardware(device)}, "
            f"wall time {wall:.0f} s. Log: `train_log.csv`.\n"
        )
    log.info("wrote %s (sha256 %s) and %s", final, meta["sha256"], card)
    return final


# ------------------------------------------------------------------------------- benchmark


def benchmark(
    arch: str = "unet",
    *,
    patch_size=64,
    batch_size: int = 2,
    base_channels: int = 16,
    depth: int = 5,
    steps: int = 5,
    warmup: int = 1,
    device="cpu",
    kind: str = "shapes",
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Training throughput: patches/s of supervised steps and peak memory.

    Times ``warmup`` untimed and then ``steps`` timed AdamW steps (forward, L1 loss, backward,
    update) on synthetic batches, and the synthetic data generation separately.

    Returns
    -------
    dict with ``patches_per_s`` (training only), ``patches_per_s_with_data`` (generation
    included), ``step_s``, ``data_s`` (per batch), ``peak_memory_mb`` (CUDA
    ``max_memory_allocated`` on GPU, the process's ``ru_maxrss`` on CPU), ``parameters`` and the
    settings.
    """
    dev = resolve_device(device)
    ps = tuple(int(n) for n in np.atleast_1d(patch_size))
    ps = ps * 3 if len(ps) == 1 else ps
    torch.manual_seed(seed)
    model = build_model(default_config(arch, base_channels=base_channels, depth=depth)).to(dev)
    cfg = TrainConfig(arch=arch, patch_size=ps, batch_size=batch_size, steps=steps + warmup)
    _check_patch(cfg, model)
    opt, _ = _optimizer(cfg, model)
    synth = SyntheticQSMData(ps, kind=kind, seed=seed, device=dev, **_synth_kwargs(cfg, arch))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    use_amp = bool(amp and dev.type == "cuda")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    data_t, step_t = [], []
    model.train()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        b = synth.batch(batch_size)
        sync()
        t1 = time.perf_counter()
        dom = "source" if arch == "dsbn" else None
        loss = _sup(cfg, _predict(model, b, dom, use_amp), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            data_t.append(t1 - t0)
            step_t.append(t2 - t1)
    step_s, data_s = float(np.median(step_t)), float(np.median(data_t))
    return {
        "arch": arch,
        "patch_size": list(ps),
        "batch_size": batch_size,
        "base_channels": base_channels,
        "depth": depth,
        "device": str(dev),
        "hardware": _hardware(dev),
        "amp": use_amp,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "step_s": step_s,
        "data_s": data_s,
        "patches_per_s": batch_size / step_s,
        "patches_per_s_with_data": batch_size / (step_s + data_s),
        "peak_memory_mb": _peak_memory_mb(dev),
    }
