"""MEDI: morphology-enabled dipole inversion (L1, nonlinear data term, optional MEDI+0).

A port of the Gauss-Newton solver of the MEDI toolbox (``MEDI_L1.m``, version 2017-11, with
``gradient_mask.m``, ``dataterm_mask.m``, ``fgrad.m``, ``bdiv.m``, ``cgsolve.m``) to our ppm
conventions (Liu T et al. 2011, Liu J et al. 2012, Liu T et al. 2013, Liu Z et al. 2018; see
References).

Objective (field ``f`` and ``chi`` in ppm; ``c`` rad per ppm, see below)::

    min_chi  ||w_G grad chi||_1
             + lam / c^2 ||w (exp(i c D chi) - exp(i c f))||_2^2
             + lambda_csf / 2 ||M_csf (chi - mean_csf chi)||_2^2          (MEDI+0 only)

* ``grad``: forward differences with the replicate (Neumann) boundary, divided by the voxel
  size (MEDI's ``fgrad``); the L1 norm is anisotropic (sum over the three components).
* ``w_G``: binary edge mask of the magnitude, per gradient component (:func:`gradient_mask`):
  1 where the magnitude is smooth (TV applied), 0 on its edges.
* ``w``: data weight ``mask / noise_std`` normalised to an in-mask mean of 1 (MEDI's
  ``dataterm_mask``), or the mask itself when no noise map is given.
* ``c = 2 pi * delta_te * GAMMA_BAR * b0 * 1e-6`` converts ppm to radians of phase accrued over
  ``delta_te``: MEDI's field (``RDF``) is in radians per echo spacing and the nonlinear data
  term needs radians. For small residuals the data term is ``lam ||w (D chi - f)||^2`` in
  ppm^2, so ``lam`` is the weight of a ppm data term.
* ``D``: unit dipole kernel (``D(0) = 0``); ``M_csf``: CSF mask (MEDI+0).

lam and MEDI's lambda. The toolbox minimises ``||w_G grad x||_1 + lam_rad ||w (exp(i D x) -
exp(i f_rad))||^2`` over ``x = c chi`` (radians). Substituting ``x = c chi`` multiplies the
L1 term by ``c`` and leaves the nonlinear data term as it is; dividing the objective by ``c``
gives exactly the objective above with::

    lam = c * lam_rad,        lambda_csf = c * lambda_csf_rad

(the CSF term is quadratic in ``x``, so it scales by ``c^2 / c``). The minimisers agree
exactly, not only for the linearised problem, and so do the Gauss-Newton iterates when the
IRLS smoothing ``e`` is scaled too: MEDI's ``e = 1e-6`` (rad^2/mm^2) on ``|w_G grad x|^2`` is
``1e-6 / c^2`` on ``|w_G grad chi|^2``. The defaults ``lam=None`` and ``lambda_csf=None`` are
the toolbox's ``lambda = 1000`` and ``lambda_CSF = 100``: for ``delta_te = 5 ms`` at 3 T,
``c = 4.013`` rad/ppm and ``lam = 4013``. The computation itself runs in radians, as in the
toolbox, and returns ``chi = x / c``.

Solver (MEDI's ``gaussnewton``): from ``chi = 0``, each outer iteration linearises the data
term at the current ``chi`` (weight ``W = w exp(i D x)``, ``|W|^2 = w^2``), and the L1 term by
lagged diffusivity (IRLS, ``V = 1 / sqrt(|w_G grad x|^2 + e)``), and solves the Gauss-Newton
system by conjugate gradients (:func:`qsmprep.recon.operators.cg`)::

    A dx = -b,  A = grad^T w_G V w_G grad + 2 lam_rad D^T w^2 D  (+ lambda_csf_rad P)
                b = grad^T w_G V w_G grad x + 2 lam_rad D^T (w^2 sin(D x - f_rad))
                    (+ lambda_csf_rad P x)

with ``P = M_csf (I - mean_csf)`` (a projection, so MEDI's ``P^T P = P``). It stops when
``||dx|| / ||x|| <= tol`` or after ``max_iter`` outer iterations; CG stops at a relative
residual of ``cg_tol`` or after ``cg_max_iter`` iterations.

Grid. The data are cropped to the mask's bounding box and zero-padded by ``pad`` voxels, then
up to a fast FFT length (:class:`qsmprep.recon.grid.Grid`); ``chi`` lives on that whole
grid and is returned in the mask. Outside the mask it is free (no data, TV only), as on the
toolbox's full matrix, and there it acts as a background source that absorbs part of the local
field: the larger the free region, the more of the true susceptibility is lost to it. On our
head phantoms (2 mm with three seeds, 3 mm, 1 mm; noise-free and with 0.003 ppm noise) the
default ``pad = 0`` (the box rounded up to a fast length) gave the lowest NRMSE in every case
(by 0.3-5 % NRMSE, with 0.02-0.25 higher XSIM, against 4-20 voxels of padding), and it is
the fastest.

Cost. float32, real FFTs, the kernel computed once. One CG iteration costs 4 real FFTs of the
grid (``D^T w^2 D p``: forward, inverse, then forward, inverse again; the weight ``w^2`` lies
between the two ``D`` and is not diagonal in k-space, so two pairs is the least), i.e. 4
FFT-equivalents; each outer iteration adds 4 (``D x`` and ``D^T`` of the data gradient; 2 in
the first, where ``x = 0``) and the run ends with 2 for the final data cost.

References
----------
- Liu T, Liu J, de Rochefort L, Spincemaille P, Khalidov I, Ledoux JR, Wang Y. Morphology
  enabled dipole inversion (MEDI) from a single-angle acquisition: comparison with COSMOS in
  human brain imaging. Magn Reson Med 2011;66:777-783.
- Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion for quantitative
  susceptibility mapping using structural consistency between the magnitude image and the
  susceptibility map. NeuroImage 2012;59:2560-2568.
- Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear formulation of the
  magnetic field to source relationship for robust quantitative susceptibility mapping. Magn
  Reson Med 2013;69:467-476.
- Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y. MEDI+0: Morphology enabled dipole inversion
  with automatic uniform cerebrospinal fluid zero reference for quantitative susceptibility
  mapping. Magn Reson Med 2018;79:2795-2803.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qsmprep.recon._backend import irfftn, namespace, rfftn, to_numpy
from qsmprep.recon._checks import (
    check_b0_dir,
    check_finite,
    check_mask,
    check_same_shape,
    check_volume,
    check_voxel_size,
)
from qsmprep.recon.grid import Grid
from qsmprep.recon.kernels import GAMMA_BAR, dipole_kernel
from qsmprep.recon.operators import cg, grad

__all__ = [
    "DEFAULT_DELTA_TE",
    "IRLS_EPSILON_RAD",
    "LAMBDA_CSF_RAD",
    "LAMBDA_RAD",
    "NOISE_LAMBDA",
    "delta_te_of",
    "gradient_mask",
    "medi",
    "rad_per_ppm",
]

LAMBDA_RAD = 1000.0
"""MEDI toolbox default ``lambda`` (data-term weight for fields in radians per echo spacing)."""

LAMBDA_CSF_RAD = 100.0
"""MEDI toolbox default ``lambda_CSF`` (MEDI+0), radian convention."""

IRLS_EPSILON_RAD = 1e-6
"""MEDI's IRLS smoothing ``e`` on ``|w_G grad x|^2`` (rad^2/mm^2)."""

NOISE_LAMBDA = 4.0
"""``lam="noise"``: ``lam = NOISE_LAMBDA / sigma`` (``sigma`` the median noise std of the field
in ppm over the data voxels), at most the toolbox's ``1000 c``. Measured on five noisy cases
(see :func:`medi`, ``lam``); ``1 / sigma^2``, the law of a maximum a posteriori estimate with
a fixed prior, over-regularised the noisiest of them."""

DEFAULT_DELTA_TE = 5e-3
"""Default echo spacing (s) when none is given: a typical multi-echo GRE spacing at 3 T."""


def delta_te_of(echo_times) -> float:
    """MEDI's ``delta_te`` for a field fitted over ``echo_times`` (s): the echo spacing, or the
    echo time of a single echo (the field's phase accrual time)."""
    te = [float(t) for t in echo_times]
    if not te:
        raise ValueError("echo_times is empty: give the echo times (s) of the field fit")
    return te[1] - te[0] if len(te) > 1 else te[0]


def rad_per_ppm(delta_te: float, b0: float) -> float:
    """Phase (rad) accrued over ``delta_te`` (s) by a field of 1 ppm at ``b0`` (T).

    ``c = 2 pi * delta_te * GAMMA_BAR * b0 * 1e-6``; e.g. 4.01 rad/ppm for 5 ms at 3 T.
    """
    te = float(delta_te)
    if not (math.isfinite(te) and te > 0):
        raise ValueError(f"delta_te must be a positive echo spacing in seconds, got {delta_te!r}")
    if te > 1.0:
        raise ValueError(f"delta_te looks like milliseconds ({delta_te!r}); give it in seconds")
    b = float(b0)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"b0 must be the positive field strength in tesla, got {b0!r}")
    return 2.0 * math.pi * te * GAMMA_BAR * b * 1e-6


# --------------------------------------------------------------------------------------------
# edge mask


def _edge_threshold(g: np.ndarray, n_mask: int, start: float, percentage: float) -> float:
    """MEDI's threshold search: scale ``start`` by 1.05 or 0.95 until the count crosses.

    ``g`` holds the magnitudes of all gradient components; the count is ``sum(g > t)`` and the
    target ratio ``count / n_mask = percentage``. Counting uses one sort, so each step is a
    binary search. A threshold that would fall below the smallest positive value stops there
    (the toolbox would loop forever: no smaller threshold adds a voxel).
    """
    vals = np.sort(g[g > 0], kind="stable")
    n = vals.size

    def count(t):
        return n - int(np.searchsorted(vals, t, side="right"))

    t = float(start)
    if count(t) / n_mask > percentage:
        while count(t) / n_mask > percentage:
            t *= 1.05
    else:
        floor = float(vals[0]) if n else 0.0
        while count(t) / n_mask < percentage and t >= floor and t > 0:
            t *= 0.95
    return t


def gradient_mask(magnitude, mask, voxel_size, percentage: float = 0.9) -> np.ndarray:
    """MEDI's binary gradient weight: 1 where the magnitude is smooth, 0 on its edges.

    ``g = |grad(magnitude * mask)|`` per component (forward differences, replicate boundary,
    divided by the voxel size: MEDI's ``fgrad``). A threshold ``t`` starts at 1 % of the
    largest magnitude and is multiplied by 1.05 (or 0.95) until the number of gradient
    components above it, **counted over all three components**, is at most (at least)
    ``percentage`` times the number of mask voxels; ``w_G = g <= t``. Because of the
    three-component count, ``percentage = 0.9`` marks about 30 % of the components as edges
    (``gradient_mask.m`` of the MEDI toolbox, reproduced exactly).

    Parameters
    ----------
    magnitude : (X, Y, Z) array
        Anatomical magnitude image (any unit; e.g. the root sum of squares over echoes).
        Finite, with a positive value somewhere in the mask.
    mask : (X, Y, Z) array
        Brain mask (nonzero inside).
    voxel_size : float or 3 floats
        mm.
    percentage : float
        Target ratio of edge components to mask voxels, in (0, 1] (default 0.9).

    Returns
    -------
    (3, X, Y, Z) bool array: component ``i`` weights the forward difference along axis ``i``
    (the layout of :func:`qsmprep.recon.operators.grad`).

    Reference: Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion for
    quantitative susceptibility mapping using structural consistency between the magnitude
    image and the susceptibility map. NeuroImage 2012;59:2560-2568.
    """
    check_volume(magnitude, "magnitude")
    m = to_numpy(check_mask(mask, "mask", shape=magnitude.shape)).astype(bool)
    vs = check_voxel_size(voxel_size)
    p = float(percentage)
    if not (math.isfinite(p) and 0.0 < p <= 1.0):
        raise ValueError(f"percentage must be in (0, 1] (edge fraction), got {percentage!r}")
    mag = to_numpy(magnitude).astype(np.float32)
    check_finite(mag, "magnitude")
    if not float(mag[m].max()) > 0:
        raise ValueError(
            "magnitude has no positive value inside the mask; pass the magnitude image"
        )
    g = np.abs(grad(mag * m, vs, boundary="neumann"))
    t = _edge_threshold(g, int(m.sum()), 0.01 * float(mag.max()), p)
    return g <= t


# --------------------------------------------------------------------------------------------
# operators on the grid


def _axis_slices(axis: int):
    hi = [slice(None)] * 3
    lo = [slice(None)] * 3
    hi[axis] = slice(1, None)
    lo[axis] = slice(None, -1)
    return tuple(hi), tuple(lo)


_SLICES = tuple(_axis_slices(a) for a in range(3))


def _irls_weights(x, wg, vs, eps: float, xp):
    """Per-axis ``w_G V / dx^2`` on the ``N - 1`` forward differences, and ``||w_G grad x||_1``.

    ``V = 1 / sqrt(|w_G grad_i x|^2 + eps)`` component by component (MEDI's anisotropic L1).
    The last difference along each axis is 0 under the replicate boundary and is left out.
    """
    weights = []
    cost = 0.0
    for axis, d in enumerate(vs):
        hi, lo = _SLICES[axis]
        gx = (x[hi] - x[lo]) * (1.0 / d)
        gx *= wg[axis]
        cost += float(xp.sum(xp.abs(gx)))
        v = gx * gx
        v += eps
        v = 1.0 / xp.sqrt(v)
        v *= wg[axis] * (1.0 / (d * d))  # w_G V w_G = w_G V for a binary w_G
        weights.append(v)
    return weights, cost


def _weighted_laplacian(p, weights, xp, work=None):
    """``grad^T (W grad p)``: MEDI's ``div(w_G V w_G grad p)`` (its ``bdiv`` is ``grad^T``).

    With ``q_n = w_n (p_{n+1} - p_n)``, the adjoint of the forward difference gives
    ``out_n = q_{n-1} - q_n``; ``weights`` already hold ``1 / dx^2``. ``work``: a
    :class:`_SlabWork` for NumPy arrays, which computes the same sum slab by slab along the
    first axis (see there); without it, whole-volume operations (any backend).
    """
    if work is not None:
        return work.apply(p, weights)
    out = xp.zeros_like(p)
    for axis in range(3):
        hi, lo = _SLICES[axis]
        q = p[hi] - p[lo]
        q *= weights[axis]
        out[lo] -= q
        out[hi] += q
    return out


class _SlabWork:
    """:func:`_weighted_laplacian` of NumPy arrays, a few planes of the first axis at a time.

    The whole-volume form makes 12 passes over volumes that do not fit in the cache (4 per
    axis: difference, weight, two updates); slabs of about ``SLAB_BYTES`` per array keep each
    slab's passes in the cache. Measured on MEDI's 135 x 162 x 135 grid of the 1 mm head
    (float32, one thread, AMD EPYC with 1 MB of L2 per core): 18-25 ms per call for the
    whole-volume form against 11-13 ms in slabs of 5 planes (0.5 MB), taking turns in one
    process. The operator is the same; its terms are added in another order (the last axis
    first), so the sums agree to float32 rounding. The first axis' differences at a slab's
    edge are computed twice, once per slab.
    """

    SLAB_BYTES = 1 << 19

    def __init__(self, shape, dtype):
        plane = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        self.slab = max(1, min(int(shape[0]), self.SLAB_BYTES // max(plane, 1)))
        n = self.slab
        self.tmp = (
            np.empty((n + 1, shape[1], shape[2]), dtype),
            np.empty((n, shape[1] - 1, shape[2]), dtype),
            np.empty((n, shape[1], shape[2] - 1), dtype),
        )

    def apply(self, p, weights):
        n0 = p.shape[0]
        out = np.empty_like(p)
        w0, w1, w2 = weights
        for a in range(0, n0, self.slab):
            b = min(a + self.slab, n0)
            o, ps, m = out[a:b], p[a:b], b - a
            t = self.tmp[2][:m]  # last axis: initialises the slab of out
            np.subtract(ps[:, :, 1:], ps[:, :, :-1], out=t)
            t *= w2[a:b]
            np.negative(t, out=o[:, :, :-1])
            o[:, :, -1] = 0
            o[:, :, 1:] += t
            t = self.tmp[1][:m]
            np.subtract(ps[:, 1:], ps[:, :-1], out=t)
            t *= w1[a:b]
            o[:, :-1] -= t
            o[:, 1:] += t
            # first axis: q_n for n in [lo, hi) reaches out[n] (-q_n) and out[n + 1] (+q_n)
            lo, hi = max(a - 1, 0), min(b, n0 - 1)
            t = self.tmp[0][: hi - lo]
            np.subtract(p[lo + 1 : hi + 1], p[lo:hi], out=t)
            t *= w0[lo:hi]
            o[: hi - a] -= t[a - lo :]
            n1, n2 = max(a - 1, lo), min(b - 1, hi)  # the q_n whose n + 1 lies in [a, b)
            o[n1 + 1 - a : n2 + 1 - a] += t[n1 - lo : n2 - lo]
        return out


# --------------------------------------------------------------------------------------------
# input handling


def _check_positive(value, name: str, integer: bool = False):
    kind = "a positive integer" if integer else "positive and finite"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind}, got {value!r}") from None
    if not (math.isfinite(v) and v > 0) or (integer and v != int(v)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(v) if integer else v


def _check_inputs(who, name, field, mask, voxel_size, b0_dir, *, magnitude, noise_std, data_mask):
    """Validate the inputs of the Gauss-Newton solvers (MEDI, TFI); returns ``(field as NumPy,
    mask as bool, voxel size, B0 direction)``. ``who`` names the method in the errors, ``name``
    the field argument."""
    check_volume(field, name)
    m = to_numpy(check_mask(mask, "mask", shape=field.shape)) != 0
    vs = check_voxel_size(voxel_size)
    b = check_b0_dir(b0_dir)
    f = to_numpy(field)
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"{name} must be a real array in ppm, got dtype {f.dtype}")
    check_finite(f, name, where=m)
    if magnitude is None:
        raise ValueError(f"magnitude is required: {who}'s edge mask comes from the magnitude")
    check_volume(magnitude, "magnitude")
    check_same_shape(name, f, magnitude=magnitude, noise_std=noise_std, data_mask=data_mask)
    return f, m, vs, b


def _check_iterations(max_iter, tol, cg_max_iter, cg_tol) -> tuple[int, float, int, float]:
    """The Gauss-Newton and CG limits and tolerances, checked positive."""
    return (
        _check_positive(max_iter, "max_iter", integer=True),
        _check_positive(tol, "tol"),
        _check_positive(cg_max_iter, "cg_max_iter", integer=True),
        _check_positive(cg_tol, "cg_tol"),
    )


def _parse_lam(lam, noise_std, c: float) -> float | None:
    """``lam`` for ppm fields: the toolbox's ``1000 c`` for None, the number given, or None for
    ``"noise"`` (chosen by :func:`_noise_lambda` once the data weight is known)."""
    if isinstance(lam, str):
        if lam != "noise":
            raise ValueError(f'lam must be a positive number or "noise", got {lam!r}')
        if noise_std is None:
            raise ValueError('lam="noise" needs noise_std (the field\'s noise std in ppm)')
        return None
    return LAMBDA_RAD * c if lam is None else _check_positive(lam, "lam")


def _noise_lambda(noise_std, w_data: np.ndarray, c: float) -> tuple[float, float]:
    """``lam="noise"``: ``NOISE_LAMBDA / sigma`` at most ``1000 c``, and ``sigma`` (the median
    noise std in ppm over the data voxels)."""
    sigma = float(np.median(to_numpy(noise_std)[w_data > 0]))
    return min(NOISE_LAMBDA / sigma, LAMBDA_RAD * c), sigma


def _pad_voxels(pad) -> tuple[int, int, int]:
    msg = f"pad must be 1 or 3 non-negative whole numbers of voxels, got {pad!r}"
    try:
        p = np.broadcast_to(np.asarray(pad, dtype=float), (3,))
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p != np.round(p)):
        raise ValueError(msg)
    return tuple(int(v) for v in p)


def _data_weight(noise_std, m: np.ndarray, data_mask=None) -> np.ndarray:
    """MEDI's ``dataterm_mask``: ``mask / noise_std`` with a mean of 1 where data count.

    With ``data_mask`` the weight is zero outside it (inside ``m``): those voxels are estimated
    through the regulariser alone.
    """
    d = m
    if data_mask is not None:
        check_volume(data_mask, "data_mask")
        d = m & (to_numpy(data_mask) != 0)
        if not d.any():
            raise ValueError(
                "data_mask has no voxel inside the mask: give the voxels where the local field"
                " is known (e.g. the background removal's mask)"
            )
    if noise_std is None:
        return d.astype(np.float32)
    check_volume(noise_std, "noise_std")
    n = to_numpy(noise_std).astype(np.float64)
    check_finite(n, "noise_std", where=d)
    if np.any(n[d] <= 0):
        raise ValueError(
            "noise_std must be positive inside the mask (a noise standard deviation map in"
            " ppm); remove voxels without an estimate from the mask"
        )
    w = np.zeros(m.shape)
    w[d] = 1.0 / n[d]
    return (w / w[d].mean()).astype(np.float32)


def medi(
    local_field,
    mask,
    voxel_size,
    *,
    magnitude,
    b0_dir=(0.0, 0.0, 1.0),
    noise_std=None,
    data_mask=None,
    lam: float | str | None = None,
    delta_te: float = DEFAULT_DELTA_TE,
    b0: float = 3.0,
    percentage: float = 0.9,
    lambda_csf: float | None = None,
    csf_mask=None,
    max_iter: int = 10,
    tol: float = 0.1,
    cg_tol: float = 0.01,
    cg_max_iter: int = 100,
    pad: int | Sequence[int] = 0,
    device: str | None = "cpu",
    info: dict | None = None,
) -> np.ndarray:
    """MEDI L1 dipole inversion (Gauss-Newton, nonlinear data term; MEDI+0 with a CSF mask).

    Minimises (module docstring for the derivation and the solver)::

        ||w_G grad chi||_1 + lam / c^2 ||w (exp(i c D chi) - exp(i c f))||^2
            [+ lambda_csf / 2 ||M_csf (chi - mean_csf chi)||^2]

    with ``c = 2 pi delta_te GAMMA_BAR b0 1e-6`` rad/ppm (:func:`rad_per_ppm`), ``w_G`` from
    :func:`gradient_mask` and ``w`` the normalised inverse noise map. For small phase
    residuals the data term is ``lam ||w (D chi - f)||^2`` (ppm^2).

    Parameters
    ----------
    local_field : (X, Y, Z) array
        Local field in ppm (after background removal); finite inside the mask.
    mask : (X, Y, Z) array
        Brain mask (nonzero inside).
    voxel_size : float or 3 floats
        mm.
    magnitude : (X, Y, Z) array
        Magnitude image for the edge mask (e.g. the root sum of squares over echoes).
    b0_dir : 3 floats
        B0 direction in voxel coordinates (default the third axis).
    noise_std : (X, Y, Z) array, optional
        Noise standard deviation of the field in ppm, positive inside the mask. The data
        weight uses its relative values only; ``lam="noise"`` its level. Default: uniform
        weight in the mask.
    data_mask : (X, Y, Z) array, optional
        Where the local field is known (e.g. the background removal's mask less unreliable
        voxels): the data weight is zero elsewhere in ``mask``, where chi comes from the
        regulariser alone, so the map covers the whole ``mask``. Default: the whole mask.
    lam : float or "noise", optional
        Data-term weight for ppm fields (1/ppm^2 up to the unit-free TV term; see above).
        Default ``1000 * c``, the toolbox's ``lambda = 1000`` for radian fields. ``"noise"``
        (needs ``noise_std``): ``NOISE_LAMBDA / sigma``, ``sigma`` the median of
        ``noise_std`` over the data voxels, at most ``1000 * c``. The toolbox's value
        regularises too little at the noise of our 2 mm phantom with 0.38 Hz noise and of the
        development data (0.32-0.60 Hz): 0.15-0.5 times it lowered NRMSE there (docs: "Dipole
        inversion"), while noise-free data want the toolbox's value. The rule puts those
        cases at 0.15-0.44 times the toolbox's value and keeps it for noise below 0.13 Hz at
        3 T with a 5 ms echo spacing. HFEN rises by 1-2 points on the development data, so
        it is an option, not the default.
    delta_te : float
        Echo spacing in s (the phase accrual time of the field: for a single echo, its TE).
        Sets ``c`` and so the nonlinearity and the default ``lam`` (default 5 ms).
    b0 : float
        Field strength in T (default 3).
    percentage : float
        Edge fraction of :func:`gradient_mask` (default 0.9, MEDI's).
    lambda_csf : float, optional
        MEDI+0 CSF-uniformity weight for ppm (default ``100 * c``, the toolbox's
        ``lambda_CSF = 100``); used only with ``csf_mask``.
    csf_mask : (X, Y, Z) array, optional
        CSF (ventricle) mask for MEDI+0; intersected with ``mask``, must not be empty there.
        The result is then referenced to its mean over the CSF mask, as in the toolbox.
    max_iter : int
        Maximum Gauss-Newton iterations (default 10).
    tol : float
        Stop when ``||dx|| / ||x|| <= tol`` (default 0.1).
    cg_tol, cg_max_iter : float, int
        Inner CG relative residual (default 0.01) and iteration limit (default 100).
    pad : int or 3 ints
        Zero-padding of the mask's bounding box in voxels per axis, before rounding up to a
        fast FFT length (default 0: see the module docstring, "Grid").
    device : str
        ``"cpu"`` (NumPy), ``"torch"`` or ``"cuda"``.
    info : dict, optional
        Filled with ``iterations``, ``converged``, ``rel_change`` (last ``||dx||/||x||``) and
        its ``rel_change_history``, ``cg_iterations`` and ``cg_residuals`` per outer
        iteration, ``data_cost`` (``||w (exp(iDx) - exp(if))||`` in radians, before each
        iteration and at the end) and ``reg_cost`` (``||w_G grad chi||_1``, ppm/mm, before
        each iteration), ``lam``, ``lam_rad``, ``lam_noise_ppm`` (``sigma`` of
        ``lam="noise"``, else None), ``lambda_csf``, ``rad_per_ppm``, ``grid``.

    Returns
    -------
    chi : (X, Y, Z) float32 NumPy array, ppm, 0 outside the mask (MEDI+0: CSF mean 0).

    References
    ----------
    Liu T, Liu J, de Rochefort L, et al. Magn Reson Med 2011;66:777-783. Liu J, Liu T, de
    Rochefort L, et al. NeuroImage 2012;59:2560-2568. Liu T, Wisnieff C, Lou M, et al. Magn
    Reson Med 2013;69:467-476. Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y. Magn Reson Med
    2018;79:2795-2803 (MEDI+0). Full titles in the module docstring.
    """
    # ---- validation
    f, m, vs, b = _check_inputs(
        "MEDI", "local_field", local_field, mask, voxel_size, b0_dir,
        magnitude=magnitude, noise_std=noise_std, data_mask=data_mask,
    )  # fmt: skip
    c = rad_per_ppm(delta_te, b0)
    lam_ppm = _parse_lam(lam, noise_std, c)
    max_iter, tol, cg_max_iter, cg_tol = _check_iterations(max_iter, tol, cg_max_iter, cg_tol)
    pads = _pad_voxels(pad)
    csf = None
    lam_csf_ppm = None
    if csf_mask is not None:
        check_volume(csf_mask, "csf_mask")
        check_same_shape("local_field", f, csf_mask=csf_mask)
        csf = (to_numpy(csf_mask) != 0) & m
        if not csf.any():
            raise ValueError("csf_mask has no voxel inside the mask; check the CSF segmentation")
        if lambda_csf is None:
            lam_csf_ppm = LAMBDA_CSF_RAD * c
        else:
            lam_csf_ppm = float(lambda_csf)
            if not (math.isfinite(lam_csf_ppm) and lam_csf_ppm >= 0):
                raise ValueError(f"lambda_csf must be >= 0 and finite, got {lambda_csf!r}")
    w_data = _data_weight(noise_std, m, data_mask)
    sigma = None
    if lam_ppm is None:
        lam_ppm, sigma = _noise_lambda(noise_std, w_data, c)
    w_grad = gradient_mask(magnitude, m, vs, percentage)
    if data_mask is not None:
        # without data a voxel has nothing but the regulariser: keep its edges regularised, or
        # chi is undetermined there (measured: 198 % NRMSE in such a rim against 104 % with it)
        w_grad |= (w_data == 0)[None] & m[None]

    # ---- grid (radians inside, as in the toolbox)
    grid = Grid.around(m, pads, device)
    shape = grid.grid
    f_rad = grid.embed(np.where(m, f, 0.0).astype(np.float64) * c)
    xp = namespace(f_rad)
    w2 = grid.embed(w_data.astype(np.float64) ** 2)
    wg = []
    for axis in range(3):
        _, lo = _SLICES[axis]
        wg.append(grid.embed(w_grad[axis])[lo])
    del w_grad
    lam_rad = lam_ppm / c
    dk = dipole_kernel(shape, vs, b, device=device)
    dk2 = dk * (2.0 * lam_rad)  # 2 lam D for the second D of D^T w^2 D
    if csf is not None:
        mc = grid.embed(csf)
        n_csf = float(csf.sum())
        lam_csf_rad = lam_csf_ppm / c

        def p_csf(p):
            return mc * (p - float(xp.sum(p * mc)) / n_csf)

    def conv(x, k):
        xk = rfftn(x)
        xk *= k
        return irfftn(xk, s=shape)

    def fidelity(p):
        y = conv(p, dk)
        y *= w2
        return conv(y, dk2)

    def data_cost(dipole_x):
        s = xp.sin((dipole_x - f_rad) * 0.5)
        return 2.0 * float(xp.sum(w2 * s * s)) ** 0.5  # |e^{ia} - e^{ib}| = 2 |sin((a-b)/2)|

    # ---- Gauss-Newton
    work = _SlabWork(shape, f_rad.dtype) if isinstance(f_rad, np.ndarray) else None
    x = xp.zeros_like(f_rad)
    dipole_x = xp.zeros_like(f_rad)  # D x (no FFT for x = 0)
    hist = {"rel": [], "cg_it": [], "cg_res": [], "data": [], "reg": []}
    ratio = math.inf
    it = 0
    while it < max_iter and ratio > tol:
        if it > 0:
            dipole_x = conv(x, dk)
        weights, reg_cost = _irls_weights(x, wg, vs, IRLS_EPSILON_RAD, xp)
        hist["data"].append(data_cost(dipole_x))
        hist["reg"].append(reg_cost / c)
        r = xp.sin(dipole_x - f_rad)
        r *= w2
        rhs = _weighted_laplacian(x, weights, xp, work) + conv(r, dk2)
        del r
        if csf is not None:
            rhs = rhs + lam_csf_rad * p_csf(x)

            def apply_a(p, weights=weights):
                out = _weighted_laplacian(p, weights, xp, work) + fidelity(p)
                return out + lam_csf_rad * p_csf(p)
        else:

            def apply_a(p, weights=weights):
                out = _weighted_laplacian(p, weights, xp, work)
                out += fidelity(p)
                return out

        dx, cg_info = cg(apply_a, -rhs, tol=cg_tol, max_iter=cg_max_iter)
        del rhs
        xnorm = float(xp.sum(x * x)) ** 0.5
        ratio = float(xp.sum(dx * dx)) ** 0.5 / xnorm if xnorm > 0 else math.inf
        x = x + dx
        it += 1
        hist["rel"].append(ratio)
        hist["cg_it"].append(int(cg_info["iterations"]))
        hist["cg_res"].append(float(cg_info["residual"]))
    hist["data"].append(data_cost(conv(x, dk)))

    chi = grid.extract(x * (1.0 / c)) * m
    if csf is not None:
        chi[m] -= chi[csf].mean()
    if info is not None:
        info.update(
            iterations=it,
            converged=bool(ratio <= tol),
            rel_change=ratio,
            rel_change_history=hist["rel"],
            cg_iterations=hist["cg_it"],
            cg_residuals=hist["cg_res"],
            data_cost=hist["data"],
            reg_cost=hist["reg"],
            lam=lam_ppm,
            lam_rad=lam_rad,
            lam_noise_ppm=sigma,
            lambda_csf=lam_csf_ppm,
            rad_per_ppm=c,
            grid=tuple(shape),
        )
    return chi.astype(np.float32)
