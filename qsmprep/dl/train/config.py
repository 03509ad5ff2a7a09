"""Settings of a training run: :class:`TrainConfig`, the methods, synthetic-data defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from qsmprep.dl.nets import ARCHS

METHODS = ("supervised", "dsbn", "dc-finetune", "unsupervised", "transfer")
"""Training methods of :func:`~qsmprep.dl.train.train`."""

PRECISIONS = ("auto", "fp32", "bf16")
"""Values of ``TrainConfig.precision``."""

_NEEDS_TARGET = ("dsbn", "dc-finetune", "unsupervised", "transfer")
_NEEDS_INIT = ("dc-finetune", "transfer")
ADAPTIVE_SYNTH = {
    "voxel_size": ((0.5, 2.5), (0.5, 2.5), (0.5, 3.5)),
    "b0_dir": "random",
    "max_tilt_deg": 45.0,
}
"""Synthetic-data defaults for the adaptive model: random voxel sizes and B0 directions."""


@dataclass
class TrainConfig:
    """Everything :func:`~qsmprep.dl.train.train` needs (saved in every checkpoint).

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
    target_holdout : int
        Subjects of ``target`` held out of training to validate on: the last ones by label
        (:func:`~qsmprep.dl.target.split_by_subject`; default 1). 0 holds out nothing; with one
        subject nothing is held out either (a warning says so). Either way the target
        validation then uses training scans, and the checkpoint and model card say so
        (``target_validation``).
    target_val_subjects : list of str or None
        The held-out subjects by label, instead of the last ``target_holdout``.
    target_val_dir : str or None
        A separate validation dataset (qsmprep output or BIDS, loaded with the options of
        ``target`` but ``participant_label``): then all of ``target`` trains.
    seed : int
        Seed of the model initialisation and of all data.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    precision : {"auto", "fp32", "bf16"}
        Arithmetic of the network in training: ``"bf16"`` runs its forward pass under bfloat16
        autocast (convolutions in bfloat16, their gradients likewise; weights, losses,
        optimiser and validation stay float32), on the CPU or a GPU. ``"auto"``: bf16 on a CPU
        with native bfloat16 instructions (AVX512-BF16/AMX, as oneDNN reports), float32
        elsewhere (GPUs included). The run records what it resolved to. See
        ``docs/deep-learning.md`` (training speed) for the measurements behind the default.
    channels_last : bool or None
        Model and inputs in the ``channels_last_3d`` memory layout (faster oneDNN
        convolutions on the CPU; the saved weights are contiguous again). None: on the CPU
        only (GPUs were not measured).
    threads : int
        torch CPU threads of the run (0: the cores this process may use, less one for the
        prefetching worker when there is one and more than one core).
    prefetch : int
        Synthetic batches made ahead by a worker process (0: made inline between steps); the
        batches are the same either way (:class:`~qsmprep.dl.train.prefetch.Prefetched`).
        CPU-made data only (on a GPU the data are made inline).
    amp : bool
        Legacy switch, kept for old configurations: bfloat16 autocast on CUDA (as
        ``precision="bf16"`` there).
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
    target_holdout: int = 1
    target_val_subjects: list | None = None
    target_val_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    threads: int = 0
    prefetch: int = 2
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
        if self.target_val_dir and self.target_val_subjects:
            raise ValueError(
                "give either held-out target subjects (--target-val-subjects) or a separate "
                "validation dataset (--target-val-dir), not both"
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for key in (
            "log_every", "val_every", "ckpt_every", "val_batches", "stop_at", "threads",
            "prefetch", "target_holdout",
        ):  # fmt: skip
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        ps = tuple(int(n) for n in np.atleast_1d(np.asarray(self.patch_size, int)))
        return ps * 3 if len(ps) == 1 else ps


def _synth_kwargs(cfg: TrainConfig, arch: str) -> dict:
    kw = dict(cfg.synth)
    if arch == "adaptive":
        for k, v in ADAPTIVE_SYNTH.items():
            kw.setdefault(k, v)
    return kw


def cpu_bf16() -> bool:
    """True when oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # builds without the query
        return False


def cores() -> int:
    """CPU cores this process may run on (its affinity mask; all cores where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_speed(
    device, *, precision="auto", channels_last=None, threads=0, prefetch=0, amp=False
) -> dict:
    """The speed settings a run on ``device`` uses: ``precision`` ("fp32"/"bf16"),
    ``channels_last``, ``threads`` and ``prefetch`` (see :class:`TrainConfig`)."""
    cpu = device.type == "cpu"
    if precision == "auto":
        precision = "bf16" if (cpu and cpu_bf16()) or (amp and device.type == "cuda") else "fp32"
    elif amp and device.type == "cuda":
        precision = "bf16"
    prefetch = int(prefetch) if cpu else 0
    threads = int(threads)
    if threads <= 0:
        n = cores()
        threads = max(1, n - 1) if (prefetch > 0 and n > 1) else n
    return {
        "precision": precision,
        "channels_last": cpu if channels_last is None else bool(channels_last),
        "threads": threads,
        "prefetch": prefetch,
    }
