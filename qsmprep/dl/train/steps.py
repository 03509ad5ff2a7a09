"""What a training step and a validation compute: network inputs, predictions, losses, NRMSE."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from qsmprep.dl.losses import data_consistency_loss, gradient_loss, supervised_loss
from qsmprep.dl.train.config import TrainConfig


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


def _predict(model, batch, domain, bf16: bool = False, channels_last: bool = False):
    """chi (ppm) predicted for a batch, float32.

    ``bf16``: the network runs under bfloat16 autocast (on the input's device); ``channels_last``:
    its input is laid out ``channels_last_3d`` (for a model converted to that layout).
    """
    x, side = make_inputs(model, batch)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if bf16:
        ctx = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
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


def deployed_domain(cfg: TrainConfig) -> str | None:
    """The batch-norm domain the trained model infers with: ``"target"`` after ``dsbn``
    training (the model is saved with ``default_domain = "target"``), else None (the model's
    default domain, which the other methods train and are deployed with)."""
    return "target" if cfg.method == "dsbn" else None


def _synthetic_metrics(cfg: TrainConfig, model, val, domain, channels_last) -> tuple:
    losses, errs = [], []
    for b in val:
        chi = _predict(model, b, domain, False, channels_last)
        losses.append(float(supervised_loss(chi, b["chi"], b["mask"], kind=cfg.loss)))
        errs.append(_nrmse(chi, b["chi"], b["mask"]))
    return float(np.mean(losses)), float(np.nanmean(errs))


@torch.no_grad()
def _validate(cfg: TrainConfig, model, val, tval, channels_last: bool = False) -> dict:
    """Held-out losses and NRMSE, in float32 whatever the training precision (as the model is
    used).

    Every figure goes through the batch norms the model is deployed with
    (:func:`deployed_domain`): for ``dsbn`` the target ones, on synthetic data too. ``dsbn``
    also records the synthetic figures through the source batch norms, which its synthetic
    training batches use: ``val_loss_source_bn`` and ``val_nrmse_source_bn``.
    """
    model.eval()
    out = {}
    domain = deployed_domain(cfg)
    if val:
        out["val_loss"], out["val_nrmse"] = _synthetic_metrics(
            cfg, model, val, domain, channels_last
        )
        if cfg.method == "dsbn":
            out["val_loss_source_bn"], out["val_nrmse_source_bn"] = _synthetic_metrics(
                cfg, model, val, "source", channels_last
            )
    if tval:
        dcs, errs = [], []
        for b in tval:
            chi = _predict(model, b, domain, False, channels_last)
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
