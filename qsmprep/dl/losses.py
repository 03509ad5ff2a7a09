"""Training losses for deep-learning dipole inversion (torch, differentiable).

Tensors are ``(B, 1, X, Y, Z)``; masks and weights are float tensors of the same shape. All
losses are masked means, so they do not depend on how much background a patch holds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qsmprep.recon.kernels import padded_shape

__all__ = [
    "data_consistency_loss",
    "dc_weight",
    "dipole_kernel_torch",
    "gradient_loss",
    "phase_per_ppm",
    "supervised_loss",
]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _check_pair(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}"
        )
    if mask.ndim != pred.ndim or any(
        m not in (1, p) for m, p in zip(mask.shape, pred.shape, strict=True)
    ):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(pred.shape)}"
        )


def supervised_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """Masked mean absolute (``"l1"``) or squared (``"l2"``) error.

    ``L1 = sum(m |p - t|) / sum(m)``, ``L2 = sum(m (p - t)^2) / sum(m)`` over the whole batch,
    with ``m`` the mask (a soft mask weights voxels). Units: those of ``pred`` (or squared).
    """
    _check_pair(pred, target, mask)
    diff = pred - target
    if kind == "l1":
        return _masked_mean(diff.abs(), mask)
    if kind == "l2":
        return _masked_mean(diff.square(), mask)
    raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient-difference loss: masked mean of ``|grad_i p - grad_i t|`` over the 3 axes.

    Forward differences per voxel (``x[n+1] - x[n]``, no voxel-size scaling); a difference
    counts when both of its voxels are in the mask. Penalises blurred edges that a voxel-wise
    L1/L2 loss tolerates.

    Reference: Yoon J, Gong E, Chatnuntawech I, et al. Quantitative susceptibility mapping
    using deep neural network: QSMnet. NeuroImage 2018;179:199-206 (gradient-difference term).
    """
    _check_pair(pred, target, mask)
    mask = mask.to(pred.dtype).expand_as(pred)
    diff = pred - target
    num = diff.new_zeros(())
    den = diff.new_zeros(())
    for axis in (-3, -2, -1):
        n = diff.shape[axis]
        if n < 2:
            continue
        d = diff.narrow(axis, 1, n - 1) - diff.narrow(axis, 0, n - 1)
        m = mask.narrow(axis, 1, n - 1) * mask.narrow(axis, 0, n - 1)
        num = num + (d.abs() * m).sum()
        den = den + m.sum()
    return num / den.clamp_min(1.0)


def _per_sample(v, batch: int | None, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(v, dtype=np.float64) if not torch.is_tensor(v) else v)
    t = t.to(device=device, dtype=torch.float64)
    if t.ndim == 0 and name == "voxel_size":
        t = t.expand(3)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"{name} must have shape (3,) or (B, 3), got {tuple(t.shape)}")
    if batch is not None and t.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values")
    return t


def dipole_kernel_torch(
    shape, voxel_size, b0_dir, device=None, *, dtype=torch.float32
) -> torch.Tensor:
    """Unit dipole kernel on the rfftn half spectrum, one per sample: ``(B, X, Y, Z//2+1)``.

    ``D(k) = 1/3 - (k . b)^2 / |k|^2``, ``D(0) = 0``, with ``k_i = fftfreq(N_i, dx_i)`` per
    axis and the same Nyquist convention as :func:`qsmprep.recon.kernels.dipole_kernel` (the
    cross terms ``k_i k_j`` vanish on an even axis' Nyquist plane, keeping ``D(-k) = D(k)``).
    Computed in float64, returned as ``dtype`` (real: ``D`` multiplies the half spectrum).

    Parameters
    ----------
    shape : 3 ints
        Grid (usually the padded grid).
    voxel_size : (3,) or (B, 3)
        Voxel sizes in mm, per sample.
    b0_dir : (3,) or (B, 3)
        B0 direction in voxel axes, per sample (normalised here).
    device : torch device, optional

    References
    ----------
    Salomir R, de Senneville BD, Moonen CT. A fast calculation method for magnetic field
    inhomogeneity due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson
    B 2003;19B:26-34. Marques JP, Bowtell R. Concepts Magn Reson B 2005;25B:65-78.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints, got {shape!r}")
    vs = _per_sample(voxel_size, None, "voxel_size", device)
    b = _per_sample(b0_dir, None, "b0_dir", device)
    if not bool((vs > 0).all()):
        raise ValueError(f"voxel_size must be positive (mm), got {vs.tolist()}")
    norm = b.norm(dim=1, keepdim=True)
    if not bool((norm > 1e-8).all()):
        raise ValueError("b0_dir has zero length; give the B0 direction, e.g. (0, 0, 1)")
    b = b / norm
    batch = max(vs.shape[0], b.shape[0])
    vs = vs.expand(batch, 3)
    b = b.expand(batch, 3)
    n = [
        torch.fft.fftfreq(shape[0], dtype=torch.float64, device=device),
        torch.fft.fftfreq(shape[1], dtype=torch.float64, device=device),
        torch.fft.rfftfreq(shape[2], dtype=torch.float64, device=device),
    ]
    views = [(batch, -1, 1, 1), (batch, 1, -1, 1), (batch, 1, 1, -1)]
    ks, kt = [], []
    for i in range(3):
        k = (n[i][None, :] / vs[:, i : i + 1]).reshape(views[i])
        ks.append(k)
        if shape[i] % 2 == 0:
            # Nyquist plane (|n| = 1/2 cycles per voxel): cross terms averaged to zero.
            nyq = (n[i].abs() == 0.5).reshape(views[i][1:])
            k = torch.where(nyq, torch.zeros_like(k), k)
        kt.append(k)
    bv = [b[:, i].reshape(batch, 1, 1, 1) for i in range(3)]
    k2 = ks[0] ** 2 + ks[1] ** 2 + ks[2] ** 2
    kb2 = sum(bv[i] ** 2 * ks[i] ** 2 for i in range(3))
    kb2 = kb2 + (kt[0] * bv[0] + kt[1] * bv[1] + kt[2] * bv[2]) ** 2
    kb2 = kb2 - sum(bv[i] ** 2 * kt[i] ** 2 for i in range(3))
    d = 1.0 / 3.0 - kb2 / torch.where(k2 > 0, k2, torch.ones_like(k2))
    d[:, 0, 0, 0] = 0.0
    return d.to(dtype)


def dipole_convolve(chi: torch.Tensor, voxel_size, b0_dir) -> torch.Tensor:
    """Field ``F^-1{D F{chi}}`` (ppm) of ``chi`` (ppm, ``(B, 1, X, Y, Z)``) on a 2x padded grid.

    The grid is grown by the array size per axis (then to a fast FFT length, as
    :func:`qsmprep.sim.forward_field` does), so wrap-around of the dipole field is negligible.
    """
    if chi.ndim != 5:
        raise ValueError(f"chi must be (B, 1, X, Y, Z), got shape {tuple(chi.shape)}")
    shape = tuple(int(n) for n in chi.shape[-3:])
    grid = padded_shape(shape, shape)
    d = dipole_kernel_torch(grid, voxel_size, b0_dir, chi.device, dtype=torch.float32)
    x = chi.float()
    spec = torch.fft.rfftn(x, s=grid, dim=(-3, -2, -1))
    f = torch.fft.irfftn(spec * d[:, None], s=grid, dim=(-3, -2, -1))
    return f[..., : shape[0], : shape[1], : shape[2]]


def phase_per_ppm(b0: float, te: float) -> float:
    """Phase per ppm of field (rad/ppm): ``s = 2 pi GAMMA_BAR B0 TE 1e-6`` (B0 in T, TE in s)."""
    from qsmprep.recon.kernels import GAMMA_BAR

    return 2.0 * math.pi * GAMMA_BAR * b0 * te * 1e-6


def dc_weight(mask: torch.Tensor, noise_std: torch.Tensor | None = None) -> torch.Tensor:
    """Data-consistency weight ``W``: the mask, or ``mask / noise_std`` normalised to mean 1.

    With a noise map (field noise standard deviation, any unit: the normalisation removes it),
    ``W = m / sigma`` scaled per sample so that its mean inside the mask is 1; ``sigma`` is
    floored at 1e-3 times its median in the mask so that noise-free voxels do not dominate.
    Without one, ``W = m``.
    """
    mask = mask.float()
    if noise_std is None:
        return mask
    sigma = noise_std.float().expand_as(mask)
    out = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        m = mask[i] > 0
        if not bool(m.any()):
            continue
        s = sigma[i]
        vals = s[m]
        if not bool(torch.isfinite(vals).all()):
            raise ValueError("noise_std has non-finite values inside the mask")
        floor = 1e-3 * vals.abs().median().clamp_min(1e-30)
        w = mask[i] / s.abs().clamp_min(floor)
        out[i] = w / w[m].mean()
    return out


def data_consistency_loss(
    chi_ppm: torch.Tensor,
    field_ppm: torch.Tensor,
    weight: torch.Tensor,
    voxel_size,
    b0_dir,
    *,
    phase_scale,
) -> torch.Tensor:
    """Complex-exponential data-consistency loss (no labels needed).

    ``L = sum |W (exp(i s D*chi) - exp(i s f))|^2 / sum W^2``, summed over the batch, with ``D*``
    the dipole convolution on a 2x zero-padded grid (per-sample voxel size and B0 direction)
    and ``s`` the phase per ppm (rad/ppm, ``2 pi GAMMA_BAR B0 TE 1e-6``, see
    :func:`phase_per_ppm`), so the exponent is the phase in radians and wraps are tolerated.
    Computed in the equivalent real form ``|e^{ia} - e^{ib}|^2 = 4 sin^2((a - b) / 2)``, which
    keeps float32 precision for small residuals (``2 - 2 cos`` would cancel). ``L`` is 0
    when ``D*chi = f`` in the support of ``W`` and lies in ``[0, 4]``; for small errors it is
    ``s^2 mean_W((D*chi - f)^2)``.

    Parameters
    ----------
    chi_ppm, field_ppm, weight : (B, 1, X, Y, Z) tensors
        Predicted chi (ppm), local field (ppm), weight ``W`` (see :func:`dc_weight`; zero
        outside the mask).
    voxel_size, b0_dir : (3,) or (B, 3)
        mm; B0 direction in voxel axes.
    phase_scale : float or (B,) tensor
        rad/ppm.

    References
    ----------
    Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear formulation of the
    magnetic field to source relationship for robust quantitative susceptibility mapping.
    Magn Reson Med 2013;69:467-476.
    """
    if chi_ppm.shape != field_ppm.shape:
        raise ValueError(
            f"chi_ppm has shape {tuple(chi_ppm.shape)} but field_ppm has {tuple(field_ppm.shape)}"
        )
    w = weight.to(torch.float32).expand_as(chi_ppm)
    s = torch.as_tensor(phase_scale, dtype=torch.float32, device=chi_ppm.device)
    if s.ndim == 1:
        if s.shape[0] not in (1, chi_ppm.shape[0]):
            raise ValueError(
                f"phase_scale has {s.shape[0]} values for a batch of {chi_ppm.shape[0]}"
            )
        s = s.reshape(-1, 1, 1, 1, 1)
    elif s.ndim != 0:
        raise ValueError(f"phase_scale must be a scalar or (B,), got shape {tuple(s.shape)}")
    dchi = dipole_convolve(chi_ppm, voxel_size, b0_dir)
    resid = 4.0 * torch.sin(0.5 * s * (dchi - field_ppm.float())).square()
    w2 = w.square()
    return (w2 * resid).sum() / w2.sum().clamp_min(1e-12)
