"""Total-variation dipole inversion by ADMM (linear FANSI-style TV, weighted options).

Objective (local field ``f`` in ppm, chi in ppm, ``D`` the unit dipole kernel)::

    chi = argmin_x  1/2 ||W (D x - f)||_2^2  +  lam h ||G grad x||_1

with ``grad`` forward differences per mm on a periodic grid and the L1 norm anisotropic (sum of
the absolute values of the three components). ``W`` is the data weight (the mask, or a user
weight times the mask), ``G`` an optional per-voxel TV weight (weighted TV, e.g. 0 on the edges
of the magnitude image) and ``h`` the geometric-mean voxel size in mm (see :func:`tv` on why
``lam`` is scaled by it).

Solver (Bilgic B et al. Magn Reson Med 2014;72:1444-1459; Milovic C et al. Magn Reson Med
2018;80:814-821; QSM.jl ``tv``):
ADMM with the split ``z = grad x`` (penalty ``rho``, scaled dual ``u``) and, when the data term
is weighted, a second split ``y = D x`` (penalty ``mu``, dual ``u_y``)::

    x   = F^-1{ (rho conj(E) F(z - u) + mu D F(y - u_y)) / (mu |D|^2 + rho sum_i |E_i|^2) }
    z   = shrink(grad x + u, lam h G / rho),       u   = u + grad x - z
    y   = (W^2 f + mu (D x + u_y)) / (W^2 + mu),   u_y = u_y + D x - y

``sum_i |E_i(k)|^2`` is ``-L(k)`` of :func:`qsmprep.recon.kernels.laplace_kernel`, the exact
k-space symbol of the periodic forward-difference gradient used in real space, so the x-update
is an exact solve. Without a data weight the ``y`` split is dropped and ``D F f`` enters the
x-update directly (one FFT pair per iteration instead of two). Both splits are over-relaxed
(Boyd et al. 2011, section 3.4.3; ``relax``): on our 2 mm phantom, 1.8 needed 10 % fewer
iterations than none and stopped 2 to 3 times closer to the minimiser.

ADMM starts from the TKD map of the field (``init``), which lets it stop at a relative
change of 2e-3 instead of 1e-3 with the same maps: 25-35 % fewer iterations (:func:`tv`).

Grid: the data are cropped to the mask's bounding box and zero-padded by ``pad`` (default
20 mm per axis, then to a fast FFT length), as in :mod:`qsmprep.recon.background`; chi is
estimated on the whole padded grid (outside the mask it is only regularised), and returned on
the input grid, 0 outside the mask. Work is in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qsmprep.recon._backend import asarray, axpy, irfftn, is_torch, namespace, rfftn, to_numpy
from qsmprep.recon._checks import (
    check_b0_dir,
    check_finite,
    check_mask,
    check_same_shape,
    check_volume,
    check_voxel_size,
)
from qsmprep.recon.grid import Grid
from qsmprep.recon.inversion.direct import _truncated_inverse
from qsmprep.recon.kernels import dipole_kernel, laplace_kernel

__all__ = ["DEFAULT_LAMBDA", "DEFAULT_PAD_MM", "tv"]

DEFAULT_LAMBDA = 2e-4
"""Default TV weight for a field in ppm (per voxel of mean size ``h``; see :func:`tv`)."""

DEFAULT_PAD_MM = 20.0
"""Default zero-padding of the mask's bounding box (mm per axis)."""

TKD_THRESHOLD = 0.19
"""Threshold of the TKD map that ADMM starts from (``init="tkd"``; TKD's default)."""

RHO_FACTOR = 450.0
"""Default ``rho`` over the effective TV weight ``lam * h`` (measured, see :func:`tv`)."""


def _weight_map(w, name: str, field, m: np.ndarray) -> np.ndarray:
    """A finite, non-negative per-voxel weight that is not all zero in the mask (float64)."""
    check_volume(w, name)
    check_same_shape("local_field", field, **{name: w})
    a = to_numpy(w).astype(np.float64)
    check_finite(a, name, where=m)
    if np.any(a[m] < 0) or not np.any(a[m] > 0):
        raise ValueError(
            f"{name} must be non-negative inside the mask and not all zero there; "
            "give e.g. an inverse noise std or a 0/1 edge mask"
        )
    return a


def _positive(value, name: str, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive ({what}), got {value!r}")
    return v


def _sl(axis: int, start: int, stop: int):
    return tuple(slice(start, stop) if k == axis else slice(None) for k in range(3))


def _sub(a, b, out):
    """``out = a - b`` in place (NumPy or torch)."""
    if is_torch(out):
        import torch

        return torch.sub(a, b, out=out)
    return np.subtract(a, b, out=out)


def _fdiff(x, axis: int, out):
    """``out[n] = x[n + e_axis] - x[n]`` (periodic), in place (NumPy or torch)."""
    n = x.shape[axis]
    _sub(x[_sl(axis, 1, n)], x[_sl(axis, 0, n - 1)], out[_sl(axis, 0, n - 1)])
    _sub(x[_sl(axis, 0, 1)], x[_sl(axis, n - 1, n)], out[_sl(axis, n - 1, n)])
    return out


def _bdiff(v, axis: int, out):
    """``out[n] = v[n - e_axis] - v[n]`` (periodic): the adjoint of :func:`_fdiff`."""
    n = v.shape[axis]
    _sub(v[_sl(axis, 0, n - 1)], v[_sl(axis, 1, n)], out[_sl(axis, 1, n)])
    _sub(v[_sl(axis, n - 1, n)], v[_sl(axis, 0, 1)], out[_sl(axis, 0, 1)])
    return out


def _clip(s, lo, hi, out):
    """``out = clip(s, lo, hi)`` (bounds floats or arrays broadcasting against ``s``)."""
    if is_torch(s):
        import torch

        if not is_torch(lo):
            lo, hi = float(lo), float(hi)
        return torch.clamp(s, lo, hi, out=out)
    return np.clip(s, lo, hi, out=out)


def _sqnorm(x) -> float:
    """Sum of squares (float64 accumulation on torch, BLAS dot on NumPy)."""
    if is_torch(x):
        v = x.reshape(-1)
        return float((v.double() * v.double()).sum())
    v = x.reshape(-1)
    return float(np.dot(v, v))


def tv(
    local_field,
    mask,
    voxel_size,
    *,
    b0_dir=(0.0, 0.0, 1.0),
    lam: float = DEFAULT_LAMBDA,
    rho: float | None = None,
    weight=None,
    mu: float = 0.1,
    tv_weight=None,
    data_mask: bool = True,
    relax: float = 1.8,
    tol: float = 2e-3,
    max_iter: int = 250,
    init: str = "tkd",
    pad: int | Sequence[int] | None = None,
    device: str | None = "cpu",
    info: dict | None = None,
) -> np.ndarray:
    """Total-variation dipole inversion (L1 norm of the gradient) solved by ADMM.

    Minimises ``1/2 ||W (D chi - f)||^2 + lam h ||G grad chi||_1`` (module docstring: operators,
    splits and updates). Stops when ``||chi_n - chi_{n-1}|| < tol ||chi_n||`` on the padded
    grid, or after ``max_iter`` iterations.

    Units and scaling of ``lam``: ``f`` in ppm (the default ``lam`` is for ppm data; Hz data
    need ``lam`` times the ppm-to-Hz factor), ``grad`` per mm. The TV term is multiplied by
    ``h = (dx dy dz)^(1/3)`` in mm, which makes ``lam`` the weight of the difference between
    neighbouring voxels for isotropic voxels (as in FANSI) while the per-mm gradient keeps TV
    isotropic in space for anisotropic voxels. With that scaling the best ``lam`` on our head
    phantom with the same noise per voxel (0.003 ppm) was nearly the same at 1 and 2 mm: the NRMSE
    was minimal near ``lam = 2.2e-4`` at 1 mm and ``1.75e-4`` at 2 mm (without the scaling the
    optimum moved by a factor 1.6). The default 2e-4 was within 0.1 NRMSE points of the best
    at both resolutions (17.3 % at 1 mm, 23.6 % at 2 mm); noise-free data favour smaller
    values (19.0 % at 2 mm, 14.1 % with 1e-4). QSM.jl uses 1e-3 per mm and FANSI/SEPIA 4e-4
    per voxel.

    Parameters
    ----------
    local_field : (X, Y, Z) array
        Local (tissue) field in ppm, finite inside ``mask``; values outside are ignored.
    mask : (X, Y, Z) array
        Region of interest (brain mask, nonzero inside).
    voxel_size : float or 3 floats
        mm.
    b0_dir : 3 floats
        B0 direction in voxel coordinates (:func:`qsmprep.recon.kernels.b0_dir_from_affine`).
    lam : float
        TV weight (default :data:`DEFAULT_LAMBDA`; see above).
    rho : float, optional
        ADMM penalty of the gradient split; default ``450 lam h``. On our 2 mm phantom
        ``300 lam h`` stopped after 124-138 iterations within 0.4 % of the minimiser; 100 did
        not reach ``tol`` in 250 iterations, 1000 stopped early 2 % away from it. On the 1 mm
        head (160 x 186 x 149, noisy) 150, 300, 450 and 600 took 237, 149, 122 and 103
        iterations at 17.08, 17.10, 17.15 and 17.25 % NRMSE: 450 saves a fifth of the
        iterations for 0.05 points (the tests' bound on the distance to the minimiser holds).
    weight : (X, Y, Z) array, optional
        Data weight ``W`` (e.g. the inverse noise std of the field, or the magnitude), used
        inside the mask only and scaled to RMS 1 there, so ``lam`` keeps its meaning. Default:
        ``W`` = the mask (see ``data_mask``).
    mu : float
        ADMM penalty of the data split (used when the data term is weighted). Default 0.1:
        of 0.03, 0.1, 0.3 and 1 the best trade-off of iterations and accuracy for the default
        ``rho``; 1 (QSM.jl, FANSI) needed 220-230 iterations.
    tv_weight : (X, Y, Z) array, optional
        Per-voxel TV weight ``G`` >= 0 (weighted TV): e.g. a 0/1 mask that is 0 on the edges
        of the magnitude image (MEDI's gradient mask) so those edges are not smoothed. Not
        normalised: 1 is the plain TV. Used inside the mask; 1 outside it. Unregularised edge
        voxels keep their noise: with 0 on the 30 % largest magnitude gradients the 2 mm
        phantom's NRMSE fell from 19.0 to 17.8 % without noise but rose from 23.6 to 29 % with
        noise.
    data_mask : bool
        With ``weight`` None: True (default) counts the data term over the mask only
        (``W = M``), the only region where the local field is known; False uses the
        unweighted data term over the whole padded grid (QSM.jl's ``tv`` without ``W``),
        which takes the field outside the mask for 0. That variant needs one FFT pair per
        iteration instead of two and about 4x fewer iterations, but on our 2 mm phantom its
        NRMSE was 38 % (44 % noisy) against 19 % (24 %) with the mask.
    relax : float
        ADMM over-relaxation in (0, 2) (1 = none; default 1.8).
    tol : float
        Stopping tolerance on the relative change of chi (default 2e-3; QSM.jl's is 1e-3,
        which the start from TKD makes unnecessary: ``init``).
    max_iter : int
        Iteration limit (default 250; from zero with ``tol`` 1e-3 ADMM stopped after 115-155
        iterations on our 1, 2 and 3 mm phantoms).
    init : {"tkd", "zero"}
        Starting point of ADMM: ``"tkd"`` (default) the TKD map of the field (threshold 0.19,
        :func:`~qsmprep.recon.inversion.direct.tkd`; one FFT pair) with ``z = grad chi`` and
        ``y`` from it, or ``"zero"``. Measured with ``tol`` 2e-3 against zero and 1e-3 (the
        former defaults): on the 1 mm head of ``qsmprep-bench inversion`` 91 against 122
        iterations, NRMSE 17.10 against 17.15 %; on the development data (``../shared/data``,
        the App's tfibg local fields and weights) 65-83 against 100-120 iterations, NRMSE
        -0.40 to +0.03 points (docs: "Dipole inversion", speed).
    pad : int or 3 ints, optional
        Zero-padding of the mask's bounding box in voxels per axis (default 20 mm: 20 to 80 mm
        agreed within 0.1 NRMSE points on the 2 mm phantom; no padding cost 0.5).
    device : str
        ``"cpu"`` (NumPy + scipy.fft), ``"torch"`` (torch on the CPU) or ``"cuda"``.
    info : dict, optional
        Filled with ``iterations``, ``converged`` (the tolerance was reached),
        ``rel_change`` (the last relative change), ``rho``, ``grid`` (FFT grid shape),
        ``init`` and ``ffts_per_iteration`` (2 or 4 real FFTs of the grid).

    Returns
    -------
    chi : (X, Y, Z) float32 NumPy array, ppm, 0 outside ``mask``. Its mean is arbitrary
    (``D(0) = 0``): reference it (:mod:`qsmprep.recon.inversion.reference`).

    Cost: 4 real FFTs of the padded grid per iteration with the (default) weighted data term,
    2 without. On a 160 x 186 x 149, 1 mm head (FFT grid 160 x 192 x 160) the default
    ``rho`` took 122 iterations and 17.7-18.9 s on one thread (docs: "Dipole inversion",
    speed); the updates between the FFTs are done in place.

    References
    ----------
    Bilgic B, Fan AP, Polimeni JR, Cauley SF, Bianciardi M, Adalsteinsson E, Wald LL,
    Setsompop K. Fast quantitative susceptibility mapping with L1-regularization and automatic
    parameter selection. Magn Reson Med 2014;72:1444-1459.
    Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear susceptibility
    inversion with variational regularization. Magn Reson Med 2018;80:814-821.
    Boyd S, Parikh N, Chu E, Peleato B, Eckstein J. Distributed optimization and statistical
    learning via the alternating direction method of multipliers. Found Trends Mach Learn
    2011;3:1-122.
    """
    check_volume(local_field, "local_field")
    m = to_numpy(check_mask(mask, "mask", shape=local_field.shape)).astype(bool)
    vs = check_voxel_size(voxel_size)
    b0 = check_b0_dir(b0_dir)
    f = to_numpy(local_field)
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"local_field must be a real array (ppm), got dtype {f.dtype}")
    check_finite(f, "local_field", where=m)
    f = np.where(m, f, 0.0).astype(np.float32)
    lam = _positive(lam, "lam", "TV weight for a field in ppm")
    h = math.prod(vs) ** (1.0 / 3.0)
    lam_mm = lam * h
    rho = RHO_FACTOR * lam_mm if rho is None else _positive(rho, "rho", "ADMM penalty")
    mu = _positive(mu, "mu", "ADMM penalty of the data split")
    relax = float(relax)
    if not (0.0 < relax < 2.0):
        raise ValueError(f"relax must be in (0, 2) (1 = no over-relaxation), got {relax!r}")
    tol = _positive(tol, "tol", "relative change of chi")
    if init not in ("tkd", "zero"):
        raise ValueError(f'init must be "tkd" or "zero" (ADMM\'s starting point), got {init!r}')
    max_iter = int(max_iter)
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
    if weight is not None:
        w = np.where(m, _weight_map(weight, "weight", local_field, m), 0.0)
        w /= math.sqrt(float(np.mean(w[m] ** 2)))
    elif data_mask:
        w = m.astype(np.float64)
    else:
        w = None
    if tv_weight is not None:
        g = np.where(m, _weight_map(tv_weight, "tv_weight", local_field, m), 1.0)
    if pad is None:
        pad = tuple(int(math.ceil(DEFAULT_PAD_MM / d)) for d in vs)

    grid = Grid.around(m, pad, device)
    shape = grid.grid
    x = grid.embed(f)
    xp = namespace(x)
    d = dipole_kernel(shape, vs, b0, device=device)
    neg_lap = -laplace_kernel(shape, vs, device=device)

    # constant parts of the x-update: iA = 1 / (mu |D|^2 + rho |E|^2), 0 at k = 0 (D(0) = 0)
    a = (1.0 if w is None else mu) * d * d + rho * neg_lap
    ia = xp.where(a > 0, 1.0 / xp.where(a > 0, a, xp.ones_like(a)), xp.zeros_like(a))
    ria = rho * ia
    if w is None:
        fhat = ia * d * rfftn(x)
    else:
        mia_d = mu * ia * d
        w2 = grid.embed(w)
        w2 = w2 * w2
        iaw = mu / (w2 + mu)
        fw = w2 * x / (w2 + mu)
        y = x + 0
        uy = xp.zeros_like(x)
    thr = lam_mm / rho
    if tv_weight is not None:
        gg = np.ones(shape, dtype=np.float32)
        n = grid.n
        gg[: n[0], : n[1], : n[2]] = g[grid.box]
        thr = asarray(gg * thr, device=device)

    inv_d = [1.0 / v for v in vs]
    neg_thr = -thr
    x = xp.zeros_like(x)
    u = xp.zeros((3, *shape), dtype=x.dtype)  # scaled dual of z = grad x
    v = xp.zeros_like(u)  # z - u
    s = xp.zeros_like(u)
    r = xp.zeros_like(x)
    tmp = xp.zeros_like(x)
    if init == "tkd":  # chi_0 = TKD in the mask; z_0 = grad chi_0 (u_0 = 0), y_0 from D chi_0
        x = irfftn(_truncated_inverse(d, TKD_THRESHOLD, False, xp) * rfftn(grid.embed(f)), s=shape)
        x *= grid.embed(m.astype(np.float32))
        for i in range(3):
            _fdiff(x, i, v[i])
            v[i] *= inv_d[i]
        if w is not None:
            y = irfftn(rfftn(x) * d, s=shape)
            y *= iaw
            y += fw
    it, rel, converged = 0, float("inf"), False
    # in-place updates throughout: each elementwise pass over the grid costs about a tenth of
    # an FFT, and the iteration has no FFT-free work beyond these passes
    while it < max_iter:
        it += 1
        # x-update; r = E^H (z - u)
        for i in range(3):
            if i == 0:
                _bdiff(v[0], 0, r)
                if inv_d[0] != 1.0:
                    r *= inv_d[0]
            else:
                axpy(inv_d[i], _bdiff(v[i], i, tmp), r)
        X = rfftn(r)
        X *= ria
        if w is None:
            X += fhat
        else:
            Y = rfftn(_sub(y, uy, tmp))
            Y *= mia_d
            X += Y
            del Y
        x_new = irfftn(X, s=shape)
        nx = _sqnorm(x_new)
        x -= x_new
        rel = math.sqrt(_sqnorm(x) / nx) if nx > 0 else 0.0
        x = x_new
        if rel < tol:
            converged = True
            break
        # z- and u-updates, over-relaxed: s = relax E x + (1 - relax) z_old + u, z_old = v + u;
        # u = clip(s, -thr, thr), z = s - u = shrink(s, thr), and v = z - u for the x-update
        for i in range(3):
            _fdiff(x, i, s[i])
            s[i] *= relax * inv_d[i]
        if relax != 1.0:
            axpy(1.0 - relax, v, s)
        axpy(2.0 - relax, u, s)
        _clip(s, neg_thr, thr, u)
        axpy(-2.0, u, s)
        v, s = s, v
        # y- and u_y-updates of the weighted data term (over-relaxed D x)
        if w is not None:
            X *= d
            t = irfftn(X, s=shape)
            del X
            t *= relax
            if relax != 1.0:
                axpy(1.0 - relax, y, t)
            t += uy
            y = iaw * t
            y += fw
            t -= y
            uy = t

    if info is not None:
        info.update(
            iterations=it,
            converged=converged,
            rel_change=rel,
            rho=rho,
            grid=shape,
            init=init,
            ffts_per_iteration=2 if w is None else 4,
        )
    out = grid.extract(x)
    out[~m] = 0.0
    return out
