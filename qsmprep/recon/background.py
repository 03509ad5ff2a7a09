"""Background field removal: SHARP, V-SHARP, RESHARP, PDF and LBV.

Every method takes a total field map and a brain mask and returns ``(local_field, mask_out)``:
the field of the sources inside the mask, zero outside ``mask_out`` (the mask the local field is
valid in: eroded by the kernel radius for the spherical-mean-value methods). The field may be in
Hz, ppm or radians; all five methods are linear and homogeneous in the field, so the output is
in the unit of the input and no parameter depends on that unit.

LBV (:func:`lbv`) solves a sparse Poisson problem on the mask with SciPy on the CPU whatever
the ``device``. The other methods are FFT-only and written once for NumPy (``device="cpu"``)
and torch (``device="torch"`` or ``"cuda"``) through :mod:`qsmprep.recon._backend`. To keep
the FFTs small, the data are cropped to the bounding box of the mask and zero-padded by the
reach of the kernel before any transform (:class:`qsmprep.recon.grid.Grid`); the
spherical-mean-value convolutions are then linear, not circular, inside the box. Work is in
float32, except the PDF iterations (float64, see :func:`pdf`). Outputs are float32 NumPy arrays
on the input grid.

Notation: ``f`` total field, ``M`` mask, ``s_r`` the
normalised binary ball of radius ``r`` mm, ``S_r = F{s_r}``, ``C = (delta - s_r) *`` the SMV
high-pass with symbol ``H = 1 - S_r``, ``M_r`` the mask eroded by the ball
(``M_r = {x : ball(x, r) inside M}``), ``D`` the unit dipole kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg as sparse_cg

from qsmprep import methods as _registry
from qsmprep.recon._backend import irfftn, namespace, rfftn, to_numpy
from qsmprep.recon._checks import (
    check_b0_dir,
    check_field,
    check_finite,
    check_mask,
    check_same_shape,
    check_volume,
    check_voxel_size,
)
from qsmprep.recon.grid import Grid
from qsmprep.recon.kernels import dipole_kernel, smv_kernel, sphere_mask
from qsmprep.recon.operators import cg

__all__ = [
    "DEFAULT_METHOD",
    "KEEPS_MASK",
    "METHODS",
    "erode_mask_smv",
    "lbv",
    "pdf",
    "remove_background",
    "remove_background_checked",
    "resharp",
    "sharp",
    "vsharp",
    "vsharp_radii",
]

METHODS = _registry.names("background")
"""Names accepted by :func:`remove_background`: the registry's background methods
(:mod:`qsmprep.methods`; those registered later are accepted too)."""

DEFAULT_METHOD = _registry.defaults("background")[0]
"""The App's background removal (the registry's default, LBV): of the methods here, the one with
the lowest end-to-end error over the true brain on the development data (``qsmprep-bench
chain``; ``docs/field-chain.md``) once the unreliable rim is trimmed
(:func:`qsmprep.recon.mask.field_reliability`)."""

MAX_DISAGREEMENT = 75.0
"""Largest NRMSE (%) of a whole-mask method's local field against RESHARP's, inside RESHARP's
mask, that :func:`remove_background_checked` accepts. Measured: 26-37 % on the six
acquisitions of the development data (qsmdev, qsmdev-multi, qsmdev-aniso), where LBV is the
most accurate method, and 158-188 % on our own phantoms at 1 to 3 mm (tissue of -0.5 ppm borders
their brain, so LBV's zero boundary value fails); 75 is about their geometric mean."""

KEEPS_MASK = tuple(m.name for m in _registry.records("background") if m.keeps_mask)
"""Methods whose local field covers their whole input mask (no kernel erosion; ``keeps_mask``
in their records): they take the field at the mask's edge at face value, so the App gives them
the brain mask less its unreliable rim (:func:`qsmprep.recon.mask.field_reliability`)."""


# --------------------------------------------------------------------------------------------
# grid handling


def _reach(radius: float, voxel_size) -> tuple[int, int, int]:
    """Voxels per axis covered by a ball of ``radius`` mm, plus one (the crop margin)."""
    return tuple(int(math.floor(radius / d + 1e-9)) + 1 for d in voxel_size)


def _ball_size(radius: float, voxel_size) -> int:
    """Number of voxels in the binary ball of :func:`qsmprep.recon.kernels.sphere_mask`."""
    shape = tuple(2 * r + 1 for r in _reach(radius, voxel_size))
    return int(sphere_mask(shape, voxel_size, radius).sum())


def _check_radius(radius, voxel_size, name="radius") -> float:
    r = float(radius)
    if not math.isfinite(r) or r < max(voxel_size):
        raise ValueError(
            f"{name} must be at least the largest voxel size ({max(voxel_size):g} mm) so the"
            f" spherical kernel has neighbours on every axis, got {radius!r}"
        )
    return r


def _eroded(fm, smv, grid: Grid, radius: float, vs, xp):
    """``M_r = SMV(M, r) > 1 - 1/(2 n_ball)`` from ``fm = rfftn(M)``: ball inside the mask.

    The threshold sits half a ball voxel below 1: a voxel is kept exactly when the whole ball
    around it lies inside the mask (as ``> 1 - 1/nPoints`` in H. Sun's RESHARP code; Sun H,
    Wilman AH. Magn Reson Med 2014;71:1151-1157), with
    room for the float32 round-off of the FFT (about 1e-6 of ``n_ball`` voxels).
    """
    thr = 1.0 - 0.5 / _ball_size(radius, vs)
    mr = irfftn(smv * fm, s=grid.grid) > thr
    return xp.astype(mr, xp.float32)


def _nonempty(mr, xp, radius) -> None:
    """Reject an eroded mask with no voxel left (a mask thinner than the kernel)."""
    if not bool(xp.any(mr > 0.5)):
        raise ValueError(
            f"mask has no voxel whose {radius:g} mm ball lies inside it; use a smaller radius"
            " or a larger mask"
        )


def _check_threshold(threshold) -> float:
    t = float(threshold)
    if not (0.0 <= t < 1.0):
        raise ValueError(f"threshold must be in [0, 1) (a level of |1 - S|), got {threshold!r}")
    return t


def _fill_info(info, **values) -> None:
    if info is not None:
        info.update(values)


# --------------------------------------------------------------------------------------------
# erosion


def erode_mask_smv(mask, voxel_size, radius: float, *, device: str | None = "cpu") -> np.ndarray:
    """Erode a mask by a ball of ``radius`` mm with one FFT convolution.

    ``M_r = (s_r * M) > 1 - eps``: the voxels whose whole ball lies inside the mask (the erosion
    of SHARP: Schweser F et al. NeuroImage 2011;54:2789-2807), with ``eps`` half a ball voxel
    (see :func:`_eroded`).

    Parameters
    ----------
    mask : (X, Y, Z) array, nonzero inside.
    voxel_size : float or 3 floats, mm.
    radius : float, mm (at least the largest voxel size).

    Returns
    -------
    (X, Y, Z) bool array, possibly all False for a thin mask.

    Reference: Li L, Leigh JS. J Magn Reson 2001;148:442-448 (spherical mean value).
    """
    check_volume(mask, "mask")
    m = to_numpy(check_mask(mask, "mask")).astype(bool)
    vs = check_voxel_size(voxel_size)
    r = _check_radius(radius, vs)
    grid = Grid.around(m, _reach(r, vs), device)
    mm = grid.embed(m)
    xp = namespace(mm)
    smv = smv_kernel(grid.grid, vs, r, device=device)
    mr = _eroded(rfftn(mm), smv, grid, r, vs, xp)
    return grid.extract(mr) > 0.5


# --------------------------------------------------------------------------------------------
# SHARP family


def _inverse_highpass(h, threshold: float, xp):
    """Truncated inverse of the SMV high-pass symbol: ``1/H`` where ``|H| > thr``, else 0."""
    keep = xp.abs(h) > threshold
    safe = xp.where(keep, h, xp.ones_like(h))
    return xp.where(keep, 1.0 / safe, xp.zeros_like(h))


def sharp(
    field,
    mask,
    voxel_size,
    *,
    radius: float = 6.0,
    threshold: float = 0.05,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """SHARP: sophisticated harmonic artifact reduction for phase data.

    A background field is harmonic in the mask, so the SMV high-pass removes it in the eroded
    mask: ``C f = C f_L`` on ``M_r``. SHARP keeps that and deconvolves with a truncated inverse::

        g   = M_r F^-1{ H F{f} },          H = 1 - S_r
        f_L = M_r F^-1{ F{g} / H }          (0 where |H| <= threshold)

    The truncation removes the lowest spatial frequencies (and the mean) of the local field.

    Parameters
    ----------
    field : (X, Y, Z) array
        Total field (Hz, ppm or rad; output in the same unit). Only values in ``mask`` are
        used; they must be finite.
    mask : (X, Y, Z) array
        Brain mask (nonzero inside).
    voxel_size : float or 3 floats
        mm.
    radius : float
        SMV kernel radius in mm (default 6 mm, as in MEDI/SEPIA; at least one voxel).
    threshold : float
        Truncation level of ``|1 - S_r|`` for the deconvolution (unitless, default 0.05).
    device : str
        ``"cpu"`` (NumPy), ``"torch"`` or ``"cuda"``.
    info : dict, optional
        Filled with ``grid`` (FFT grid shape) and ``radius``.

    Returns
    -------
    local_field : (X, Y, Z) float32 NumPy array, zero outside ``mask_out``.
    mask_out : (X, Y, Z) bool array, the mask eroded by the ball of ``radius``.

    Cost: 7 FFTs of the cropped grid (kernel, erosion pair, high-pass pair, deconvolution pair).

    Reference
    ---------
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of intrinsic magnetic
    tissue properties using MRI signal phase: an approach to in vivo brain iron metabolism?
    NeuroImage 2011;54:2789-2807.
    """
    f, m, vs = check_field(field, mask, voxel_size)
    r = _check_radius(radius, vs)
    threshold = _check_threshold(threshold)
    grid = Grid.around(m, _reach(r, vs), device)
    x = grid.embed(f)
    xp = namespace(x)
    s = smv_kernel(grid.grid, vs, r, device=device)
    h = 1.0 - s
    mr = _eroded(rfftn(grid.embed(m)), s, grid, r, vs, xp)
    _nonempty(mr, xp, r)
    g = mr * irfftn(h * rfftn(x), s=grid.grid)
    local = mr * irfftn(_inverse_highpass(h, threshold, xp) * rfftn(g), s=grid.grid)
    _fill_info(info, grid=grid.grid, radius=r)
    return grid.extract(local), grid.extract(mr) > 0.5


def vsharp_radii(voxel_size, r_max: float = 12.0) -> tuple[float, ...]:
    """Default V-SHARP radii (mm): ``r_max`` down to ``2 * max(voxel_size)``.

    The step is the largest voxel size, so each radius peels about one more voxel layer off the
    mask: 12, 11, ..., 2 mm at 1 mm; 12, 10, ..., 4 mm at 2 mm; 12, 9, 6 mm at 3 mm. The largest
    radius (12 mm, the STI Suite setting) sets the deconvolution kernel; QSM.jl uses
    18, 16, ..., 2 mm at 1 mm.
    """
    vs = check_voxel_size(voxel_size)
    step = max(vs)
    r_min = 2.0 * step
    if r_max < r_min:
        return (float(r_min),)
    k = int(math.floor((r_max - r_min) / step + 1e-9))
    return tuple(float(r_max - i * step) for i in range(k + 1))


def vsharp(
    field,
    mask,
    voxel_size,
    *,
    radii: Sequence[float] | None = None,
    threshold: float = 0.05,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """V-SHARP: SHARP with a variable kernel radius that shrinks towards the mask edge.

    For radii ``r_1 > ... > r_K``, each voxel takes the high-passed field ``F^-1{(1 - S_r) F f}``
    of the largest radius whose ball still fits in the mask (the shell ``M_{r_k} - M_{r_{k-1}}``),
    giving ``g`` on ``M_{r_K}``; then one truncated deconvolution with the largest kernel::

        f_L = M_{r_K} F^-1{ F{g} / (1 - S_{r_1}) }      (0 where |1 - S_{r_1}| <= threshold)

    Parameters
    ----------
    field, mask, voxel_size, device : as :func:`sharp`.
    radii : floats, mm, optional
        Kernel radii (sorted descending here). Default :func:`vsharp_radii`: 12 mm down to
        twice the largest voxel size in steps of one voxel.
    threshold : float
        Truncation level of ``|1 - S_{r_1}|`` (unitless, default 0.05).
    info : dict, optional
        Filled with ``grid`` and ``radii``.

    Returns
    -------
    local_field : (X, Y, Z) float32 array, zero outside ``mask_out``.
    mask_out : (X, Y, Z) bool, the mask eroded by the smallest ball.

    Cost: 3 FFTs per radius (kernel, erosion, high-pass) plus 4.

    References
    ----------
    Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed sensing.
    Magn Reson Med 2012;67:137-147.
    Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects spatial
    variation in tissue composition. NeuroImage 2011;55:1645-1656.
    """
    f, m, vs = check_field(field, mask, voxel_size)
    rs = vsharp_radii(vs) if radii is None else tuple(float(r) for r in radii)
    if not rs:
        raise ValueError("radii is empty: give at least one kernel radius (mm)")
    rs = tuple(sorted((_check_radius(r, vs, "radii") for r in rs), reverse=True))
    threshold = _check_threshold(threshold)
    grid = Grid.around(m, _reach(rs[0], vs), device)
    x = grid.embed(f)
    xp = namespace(x)
    fx = rfftn(x)
    fm = rfftn(grid.embed(m))
    g = xp.zeros_like(x)
    done = xp.zeros_like(x)
    inv = None
    for r in rs:
        s = smv_kernel(grid.grid, vs, r, device=device)
        mr = _eroded(fm, s, grid, r, vs, xp)
        shell = mr * (1.0 - done)
        g = g + shell * irfftn((1.0 - s) * fx, s=grid.grid)
        done = done + shell
        if inv is None:  # the largest kernel deconvolves
            inv = _inverse_highpass(1.0 - s, threshold, xp)
    _nonempty(done, xp, rs[-1])
    local = done * irfftn(inv * rfftn(g), s=grid.grid)
    _fill_info(info, grid=grid.grid, radii=rs)
    return grid.extract(local), grid.extract(done) > 0.5


# --------------------------------------------------------------------------------------------
# iterative methods


def resharp(
    field,
    mask,
    voxel_size,
    *,
    radius: float = 6.0,
    alpha: float = 1e-4,
    tol: float = 3e-3,
    max_iter: int = 300,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """RESHARP: SHARP with Tikhonov regularisation, solved by conjugate gradients.

    Objective (``C = (delta - s_r) *``, ``M_r`` the eroded mask)::

        f_L = argmin_x ||M_r C x - M_r C f||^2 + alpha ||x||^2
            => (C^H M_r C + alpha I) x = C^H M_r C f,       output M_r x

    The identity ``(B^H B + alpha)^-1 B^H = B^H (B B^H + alpha)^-1`` (``B = M_r C``) gives the
    same ``x`` as ``x = C^H M_r z`` with ``(M_r C C^H M_r + alpha I) z = M_r C f``, whose operator
    is a single convolution by ``|1 - S_r|^2`` between masks: CG on ``z`` costs one FFT pair per
    iteration instead of two. ``tol`` applies to the relative residual of that system.

    Units: the problem is homogeneous of degree 1 in the field (scaling ``f`` scales ``x``), and
    ``alpha`` is compared with the eigenvalues of ``C^H M_r C`` (unitless, in ``[0, ~1.2]``), so
    the same ``alpha`` serves Hz, ppm or rad data (Sun and Wilman's values, 1e-3 to 1e-4, were
    quoted for ppm fields but do not depend on that unit). Smaller ``alpha`` follows the data
    more closely and needs more iterations. On our head phantoms the error against the true
    local field fell as ``alpha`` went from 1e-2 to 1e-4 (by 8 % of its value at 2 mm) and
    hardly at all below, and stopped improving at a relative residual of about 3e-3 (60 to 130
    iterations at 1 to 3 mm voxels).

    Parameters
    ----------
    field, mask, voxel_size, device : as :func:`sharp`.
    radius : float
        SMV kernel radius in mm (default 6 mm).
    alpha : float
        Tikhonov weight (unitless, default 1e-4).
    tol : float
        CG stop: relative residual (default 3e-3).
    max_iter : int
        CG iteration limit (default 300).
    info : dict, optional
        Filled with ``iterations``, ``converged`` (bool), ``residual`` (relative), ``grid``.

    Returns
    -------
    local_field : (X, Y, Z) float32 array, zero outside ``mask_out``.
    mask_out : (X, Y, Z) bool, the mask eroded by the ball of ``radius``.

    Cost: 7 + 2 * iterations FFTs of the cropped grid.

    Reference
    ---------
    Sun H, Wilman AH. Background field removal using spherical mean value filtering and
    Tikhonov regularization. Magn Reson Med 2014;71:1151-1157.
    """
    f, m, vs = check_field(field, mask, voxel_size)
    r = _check_radius(radius, vs)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be positive (unitless Tikhonov weight), got {alpha!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive (relative residual), got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
    grid = Grid.around(m, _reach(r, vs), device)
    x = grid.embed(f)
    xp = namespace(x)
    s = smv_kernel(grid.grid, vs, r, device=device)
    h = 1.0 - s
    h2 = h * h
    mr = _eroded(rfftn(grid.embed(m)), s, grid, r, vs, xp)
    _nonempty(mr, xp, r)
    b = mr * irfftn(h * rfftn(x), s=grid.grid)

    def apply_a(z):
        return mr * irfftn(h2 * rfftn(z), s=grid.grid) + alpha * z

    z, cg_info = cg(apply_a, b, tol=tol, max_iter=int(max_iter))
    local = mr * irfftn(h * rfftn(mr * z), s=grid.grid)
    _fill_info(
        info,
        iterations=cg_info["iterations"],
        converged=cg_info["converged"],
        residual=cg_info["residual"],
        grid=grid.grid,
        radius=r,
    )
    return grid.extract(local), grid.extract(mr) > 0.5


def pdf(
    field,
    mask,
    voxel_size,
    *,
    b0_dir=(0.0, 0.0, 1.0),
    weight=None,
    tol: float = 3e-3,
    max_iter: int = 50,
    pad: int | Sequence[int] | None = None,
    erode: int = 0,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """PDF: projection onto dipole fields of sources outside the mask.

    The background is modelled as the field of a susceptibility ``chi_b`` outside the mask and
    fitted to the total field inside it (``Mbar = 1 - M``, ``W`` a noise weight)::

        chi_b = argmin ||W M (f - D * Mbar chi_b)||^2
        f_L   = M (f - D * Mbar chi_b)

    solved by CGLS from ``chi_b = 0`` (conjugate gradients on the normal equations
    ``Mbar D W^2 M D Mbar chi_b = Mbar D W^2 M f`` in the numerically stable least-squares
    form; the local field is the running residual, so it needs no extra FFT). The normal
    operator is singular and badly conditioned, so the number of iterations acts as the
    regularisation (MEDI stops after 30): the default stops at a relative normal-equation
    residual of 3e-3, about 20 to 35 iterations on head data, where the error against a known
    local field was lowest in our phantoms. The iterations run in float64: in float32 the
    rounding errors of such a solve grow by orders of magnitude within 20 iterations, which made
    results depend on the FFT library at the percent level.

    ``chi_b`` lives on the mask's bounding box zero-padded by ``pad`` voxels (the FFT grid); the
    dipole kernel is built on that grid for ``b0_dir``. The solution is homogeneous in the field,
    so the unit does not matter. The field mean is not fitted (``D(0) = 0``): compare local
    fields after de-meaning.

    Parameters
    ----------
    field, mask, voxel_size, device : as :func:`sharp`.
    b0_dir : 3 floats
        B0 direction in voxel coordinates (from the affine, see
        :func:`qsmprep.recon.kernels.b0_dir_from_affine`).
    weight : (X, Y, Z) array, optional
        Non-negative data weight ``W`` (e.g. inverse noise std or magnitude); default uniform.
        Only its shape matters, not its scale.
    tol : float
        Stop when ``||A^T r|| <= tol ||A^T f||`` (relative normal-equation residual, default
        3e-3).
    max_iter : int
        CGLS iteration limit (default 50).
    pad : int or 3 ints, optional
        Zero-padding of the mask's bounding box (voxels per axis): room for background sources
        and against wrap-around. Default 15 mm rounded up to voxels (the error on our phantoms
        did not change from 10 to 40 mm; MEDI pads 40 voxels).
    erode : int
        Voxel layers peeled off the mask before fitting (``scipy.ndimage.binary_erosion``, 6
        connected; default 0). Edge voxels of measured phase are often unreliable; the masking
        step is expected to have dealt with them.
    info : dict, optional
        Filled with ``iterations``, ``converged``, ``residual``, ``grid``.

    Returns
    -------
    local_field : (X, Y, Z) float32 array, zero outside ``mask_out``.
    mask_out : (X, Y, Z) bool, the (optionally eroded) mask.

    Cost: 2 + 4 * iterations FFTs (float64) of the padded grid.

    Reference
    ---------
    Liu T, Khalidov I, de Rochefort L, Spincemaille P, Liu J, Tsiouris AJ, Wang Y. A novel
    background field removal method for MRI using projection onto dipole fields (PDF). NMR
    Biomed 2011;24:1129-1136.
    """
    f, m, vs = check_field(field, mask, voxel_size)
    b0 = check_b0_dir(b0_dir)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive (relative residual), got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
    if int(erode) < 0:
        raise ValueError(f"erode must be a non-negative number of voxels, got {erode!r}")
    if int(erode) > 0:
        m = ndimage.binary_erosion(m, iterations=int(erode))
        if not m.any():
            raise ValueError(f"mask vanishes after {erode} erosions; use a smaller erode")
        f = np.where(m, f, 0.0).astype(np.float32)
    if weight is None:
        w = m.astype(np.float64)
    else:
        check_volume(weight, "weight")
        check_same_shape("field", field, weight=weight)
        w = to_numpy(weight).astype(np.float64)
        check_finite(w, "weight", where=m)
        if np.any(w[m] < 0) or not np.any(w[m] > 0):
            raise ValueError("weight must be non-negative and not all zero inside the mask")
        w = np.where(m, w, 0.0)
        w /= math.sqrt(float(np.mean(w[m] ** 2)))
    if pad is None:
        pad = tuple(int(math.ceil(15.0 / d)) for d in vs)
    f64 = np.float64
    grid = Grid.around(m, pad, device)
    w_dev = grid.embed(w, f64)
    xp = namespace(w_dev)
    mm = grid.embed(m, f64)
    outside = 1.0 - mm
    d = dipole_kernel(grid.grid, vs, b0, device=device, dtype=f64)

    def dot(u, v):
        return float(xp.sum(u * v))

    # CGLS on min ||W M (f - D Mbar chi)||: r_u = M (f - D Mbar chi) is the local field.
    r_u = grid.embed(f, f64)
    s = outside * irfftn(d * rfftn(w_dev * w_dev * r_u), s=grid.grid)
    p = s
    gamma = dot(s, s)
    gamma0 = gamma
    it = 0
    while it < int(max_iter) and gamma > (tol * tol) * gamma0 and gamma > 0.0:
        q_u = mm * irfftn(d * rfftn(p), s=grid.grid)
        q = w_dev * q_u
        qq = dot(q, q)
        if not qq > 0.0:
            break
        a = gamma / qq
        r_u = r_u - a * q_u
        s = outside * irfftn(d * rfftn(w_dev * w_dev * r_u), s=grid.grid)
        gamma_new = dot(s, s)
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
        it += 1
    res = math.sqrt(gamma / gamma0) if gamma0 > 0 else 0.0
    _fill_info(info, iterations=it, converged=bool(res <= tol), residual=res, grid=grid.grid)
    return grid.extract(r_u), m.copy()


def _peeled(m: np.ndarray, vs, peel: float) -> np.ndarray:
    """Mask voxels farther than ``peel`` mm from the nearest voxel outside (0: the mask)."""
    if peel <= 0:
        return m.copy()
    dist = ndimage.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    return m & (dist > peel)


def lbv(
    field,
    mask,
    voxel_size,
    *,
    tol: float = 1e-6,
    max_iter: int = 3000,
    peel: float = 0.0,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """LBV: Laplacian boundary value background removal.

    The background field is harmonic in the mask, so the local field has the Laplacian of the
    total field there. LBV takes the local field to be zero on the mask boundary (the voxels of
    the mask with a 6-neighbour outside it) and solves the Poisson problem with that Dirichlet
    condition on the remaining (interior) voxels::

        L f_L = L f   in the interior,      f_L = 0   on the boundary

    with ``L`` the 7-point Laplacian with spacing ``dx, dy, dz`` (mm, so anisotropic voxels are
    honoured). The linear system (symmetric positive definite, one unknown per interior voxel)
    is solved by SciPy's conjugate gradients in float64 on the CPU. No voxel is lost to a
    kernel: the output covers the whole mask, less ``peel`` mm if asked.

    The zero boundary condition is the method's approximation: the true local field is not
    zero at the brain edge, and the error it leaves is the harmonic function with the true
    local field's boundary values, largest next to the boundary. Errors of the total field on
    the boundary (unwrapping faults, voxels outside the brain in the mask) enter the same way;
    ``peel`` removes layers where they dominate.

    Parameters
    ----------
    field, mask, voxel_size : as :func:`sharp`.
    tol : float
        CG stop: relative residual of the Poisson system (default 1e-6; the local field
        changed by less than 1e-4 of its norm between 1e-6 and 1e-8 on our phantoms).
    max_iter : int
        CG iteration limit (default 3000).
    peel : float
        Distance from the mask edge (mm) within which the result is discarded after the solve
        (default 0: the whole mask; Zhou et al. offer the same as a number of layers).
    device : str
        Accepted for a uniform signature; the solve always runs on the CPU.
    info : dict, optional
        Filled with ``iterations``, ``converged``, ``residual`` (relative), ``unknowns``.

    Returns
    -------
    local_field : (X, Y, Z) float32 array, zero on the boundary and outside ``mask_out``.
    mask_out : (X, Y, Z) bool, the mask less ``peel`` mm.

    Reference
    ---------
    Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the Laplacian
    boundary value problem. NMR Biomed 2014;27:312-319.
    """
    del device  # sparse solve on the CPU whatever the device
    f, m, vs = check_field(field, mask, voxel_size)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive (relative residual), got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
    peel = float(peel)
    if not (math.isfinite(peel) and peel >= 0):
        raise ValueError(f"peel must be a non-negative distance in mm, got {peel!r}")
    # interior: mask voxels whose six neighbours are in the mask (outside the array = outside)
    inner = ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)
    n = int(inner.sum())
    if n == 0:
        raise ValueError("mask has no interior voxel (every voxel touches its edge)")
    index = np.full(m.shape, -1, dtype=np.int64)
    index[inner] = np.arange(n)
    coords = np.nonzero(inner)
    f64 = f.astype(np.float64)
    rows, cols, vals = [], [], []
    diag = np.zeros(n)
    rhs = np.zeros(n)
    for axis, d in enumerate(vs):
        w = 1.0 / (d * d)
        for step in (1, -1):
            nb = list(coords)
            nb[axis] = nb[axis] + step  # interior voxels are never on the array border
            nb = tuple(nb)
            j = index[nb]
            diag += w
            rhs += w * (f64[coords] - f64[nb])  # (-L f) at the interior voxels
            known = j >= 0  # neighbour is an unknown; else boundary, where f_L = 0
            rows.append(np.flatnonzero(known))
            cols.append(j[known])
            vals.append(np.full(int(known.sum()), -w))
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    iterations = 0

    def count(_):
        nonlocal iterations
        iterations += 1

    x, flag = sparse_cg(a, rhs, rtol=tol, atol=0.0, maxiter=int(max_iter), callback=count)
    bnorm = float(np.linalg.norm(rhs))
    res = float(np.linalg.norm(rhs - a @ x)) / bnorm if bnorm > 0 else 0.0
    local = np.zeros(m.shape, dtype=np.float32)
    local[inner] = x
    out = _peeled(m, vs, peel)
    if not out.any():
        raise ValueError(f"mask vanishes when {peel:g} mm are peeled off; use a smaller peel")
    local[~out] = 0.0
    _fill_info(info, iterations=iterations, converged=flag == 0, residual=res, unknowns=n)
    return local, out


# --------------------------------------------------------------------------------------------
# dispatcher


def remove_background(field, mask, voxel_size, *, method: str = "resharp", **kwargs):
    """Background field removal by name: one of :data:`METHODS`.

    ``kwargs`` go to the method (:func:`sharp`, :func:`vsharp`, :func:`resharp`, :func:`pdf`,
    :func:`lbv`).
    Returns ``(local_field, mask_out)`` in the unit of ``field``.
    """
    key = str(method).lower().replace("-", "").replace("_", "")
    if key not in _registry.names("background"):
        raise ValueError(
            f"unknown background removal method {method!r}; choose from "
            f"{_registry.names('background')}"
        )
    return _registry.resolve(key)(field, mask, voxel_size, **kwargs)


def remove_background_checked(
    field,
    mask,
    voxel_size,
    *,
    method: str = DEFAULT_METHOD,
    brain_mask=None,
    fallback: str = "resharp",
    max_disagreement: float = MAX_DISAGREEMENT,
    device: str | None = "cpu",
    **kwargs,
):
    """Background removal with a cross-check of the methods that keep the whole mask.

    A method of :data:`KEEPS_MASK` (LBV, PDF) extrapolates nothing but trusts the field at the
    mask's edge; where the background is not harmonic there on the voxel grid (tissue of very
    different susceptibility right outside the mask) its error spreads through the brain. The
    eroding methods do not depend on the edge. So the result of ``method`` is compared with
    ``fallback`` (RESHARP on ``brain_mask``, defaults) inside the latter's mask: when their
    NRMSE (de-meaned, against the fallback) exceeds ``max_disagreement`` % the fallback's
    result is returned instead. Other methods run unchecked.

    Parameters
    ----------
    field, mask, voxel_size, device : as :func:`remove_background`.
    method : str
        Background method (default :data:`DEFAULT_METHOD`).
    brain_mask : (X, Y, Z) array, optional
        Mask of the fallback method (default ``mask``).
    fallback : str
        The method to compare with and fall back to (default ``"resharp"``, its defaults).
    max_disagreement : float
        Threshold (%) of the disagreement (default :data:`MAX_DISAGREEMENT`).
    **kwargs
        Parameters of ``method``.

    Returns
    -------
    local_field, mask_out : as :func:`remove_background`, of the method used.
    check : dict
        ``method`` (the one used), and for a checked method ``against``, ``disagreement``
        (%), ``slope`` (of the method's field on the fallback's), ``max_disagreement`` and
        ``fell_back`` (bool).
    """
    local, out = remove_background(field, mask, voxel_size, method=method, device=device, **kwargs)
    key = str(method).lower().replace("-", "").replace("_", "")
    if not _registry.get(key).keeps_mask or max_disagreement is None:
        return local, out, {"method": key}
    ref_mask = mask if brain_mask is None else brain_mask
    fb = str(fallback).lower().replace("-", "").replace("_", "")
    takes_b0_dir = fb in _registry.names("background") and "b0_dir" in _registry.get(fb).inputs
    kw = {"b0_dir": kwargs["b0_dir"]} if takes_b0_dir and "b0_dir" in kwargs else {}
    ref, ref_out = remove_background(
        field, ref_mask, voxel_size, method=fallback, device=device, **kw
    )
    both = ref_out & out
    a = local[both].astype(np.float64)
    b = ref[both].astype(np.float64)
    a -= a.mean() if a.size else 0.0
    b -= b.mean() if b.size else 0.0
    bb = float(b @ b)
    dis = 100.0 * float(np.linalg.norm(a - b)) / math.sqrt(bb) if bb > 0 else float("inf")
    slope = float(a @ b) / bb if bb > 0 else float("nan")
    fell_back = not dis <= float(max_disagreement)
    check = {
        "method": fallback if fell_back else key,
        "against": fallback,
        "disagreement": round(dis, 2),
        "slope": round(slope, 4),
        "max_disagreement": float(max_disagreement),
        "fell_back": fell_back,
    }
    if fell_back:
        return ref, ref_out, check
    return local, out, check
