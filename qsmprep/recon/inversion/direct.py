"""Direct (closed-form, single FFT pair) dipole inversions: TKD, TSVD and L2.

All three divide the spectrum of the local field by a regularised dipole kernel::

    chi = M F^-1{ K(k) F{f_L} }

with ``K`` the truncated inverse ``1/D`` (TKD, TSVD) or the Tikhonov inverse
``conj(D) / (|D|^2 + lam |Gamma|^2)`` (L2). They cost one forward and one inverse real FFT.

Grid: the field is cropped to the bounding box of the mask and zero-padded by ``pad`` voxels
(default :data:`DEFAULT_PAD_MM` mm per axis, then up to a fast FFT length) before the
transform, as in :mod:`qsmprep.recon.background`. On our 2 and 3 mm head phantoms the TKD
error changed by less than 0.2 % NRMSE between pads of 10 mm and the whole matrix, and rose by
0.3 to 1 % without padding, where the inverse kernel wraps the field of one side of the brain
onto the other. The gradient- and Laplacian-regularised L2 gained 1 to 3 % NRMSE from much
larger pads (100 mm, two to three times the FFT size), which :func:`l2` leaves to the caller.

k = 0: ``D(0) = 0``, so the field mean carries no information about the susceptibility
(the convention of the MEDI toolbox and QSM.jl; ``docs/field-chain.md``, Conventions); every
inverse here sets ``K(0) = 0``, which makes the
mean of chi over the padded grid 0 and its mean over the mask arbitrary. Reference the result
(:mod:`qsmprep.recon.inversion.reference`) before reporting values.

Units: the methods are linear in the field, so chi comes out in the unit of the field (ppm in,
ppm out). The L2 weight ``lam`` multiplies ``|Gamma(k)|^2`` in mm units (see :func:`l2`).
Work is in float32; outputs are float32 NumPy arrays on the input grid, 0 outside the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qsmprep.recon._backend import irfftn, namespace, rfftn
from qsmprep.recon._checks import check_b0_dir, check_field
from qsmprep.recon.grid import Grid, pad_voxels, spectrum_mean
from qsmprep.recon.kernels import dipole_kernel, laplace_kernel

__all__ = ["DEFAULT_LAMBDA", "DEFAULT_PAD_MM", "l2", "tkd", "tsvd"]

DEFAULT_PAD_MM = 20.0
"""Default zero-padding of the mask's bounding box (mm per axis) for k-space inversions."""

DEFAULT_LAMBDA = {"gradient": 4e-2, "identity": 1.5e-2, "laplacian": 1e-1}
"""Default L2 weights per regulariser (units: mm^2, 1, mm^4; see :func:`l2`)."""


def _fill_info(info, **values) -> None:
    if info is not None:
        info.update(values)


# --------------------------------------------------------------------------------------------
# truncated k-space division


def _check_threshold(threshold) -> float:
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 < t < 2.0 / 3.0):
        raise ValueError(
            f"threshold must be in (0, 2/3) (a level of |D|, whose maximum is 2/3), got"
            f" {threshold!r}; TKD commonly uses 0.15 to 0.2"
        )
    return t


def _truncated_inverse(d, threshold: float, zero_cone: bool, xp):
    """``1/D`` where ``|D| > threshold``; else ``sign(D)/threshold`` (TKD) or 0 (TSVD).

    ``sign(0)`` is taken as +1; ``K(0) = 0`` at k = 0.
    """
    keep = xp.abs(d) > threshold
    safe = xp.where(keep, d, xp.ones_like(d))
    if zero_cone:
        cone = xp.zeros_like(d)
    else:
        cone = xp.where(d < 0, -xp.ones_like(d), xp.ones_like(d)) / threshold
    inv = xp.where(keep, 1.0 / safe, cone)
    inv[0, 0, 0] = 0.0
    return inv


def _truncated(
    local_field, mask, voxel_size, b0_dir, threshold, correct, pad, device, info, zero_cone
):
    f, m, vs = check_field(local_field, mask, voxel_size, "local_field", "ppm")
    b = check_b0_dir(b0_dir)
    thr = _check_threshold(threshold)
    grid = Grid.around(m, pad_voxels(pad, vs, DEFAULT_PAD_MM), device)
    x = grid.embed(f)
    xp = namespace(x)
    d = dipole_kernel(grid.grid, vs, b, device=device)
    inv = _truncated_inverse(d, thr, zero_cone, xp)
    psf0 = spectrum_mean(d * inv, grid.grid)
    if correct:
        inv = inv / psf0
    chi = irfftn(inv * rfftn(x), s=grid.grid)
    _fill_info(info, grid=grid.grid, threshold=thr, psf0=psf0, corrected=bool(correct))
    return grid.extract(chi) * m


def tkd(
    local_field,
    mask,
    voxel_size,
    *,
    b0_dir=(0.0, 0.0, 1.0),
    threshold: float = 0.19,
    correct: bool = False,
    pad: int | Sequence[int] | None = None,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """Truncated k-space division (TKD).

    The inverse dipole kernel is truncated near the magic-angle cone where ``D`` vanishes::

        D^-1_TKD(k) = 1 / D(k)             where |D(k)| >  threshold
                    = sign(D(k)) / threshold   where |D(k)| <= threshold
        chi = M F^-1{ D^-1_TKD F{f_L} }

    ``sign(0)`` is taken as +1 (grid points exactly on the cone, e.g. ``k`` along a cube
    diagonal of an isotropic grid, get ``1/threshold``; ``D > 0`` covers the larger part of
    the cone's neighbourhood), and ``D^-1_TKD(0) = 0`` because the field mean is
    uninformative (``D(0) = 0``).

    Truncation shrinks the estimate: the point-spread function of ``D D^-1_TKD`` has the
    central value ``c = PSF(0) = mean_k(D(k) D^-1_TKD(k))`` (0.77 to 0.81 at threshold 0.19 on
    our grids; the mean over the k-space box depends a little on its shape), so chi comes out
    scaled by roughly ``c``. ``correct=True`` divides by ``c`` (Schweser et al.
    2013), which restores the scale of large structures (at the price of amplifying the
    streaking by ``1/c`` too).

    Threshold: the default 0.19 is the value quoted for Schweser's "superfast" TKD and for the
    2016 QSM challenge baseline; QSM.jl and SEPIA default to 0.15 (less truncation bias, more
    streaking and noise).

    Parameters
    ----------
    local_field : (X, Y, Z) array
        Local (tissue) field in ppm of B0 (any linear unit works; chi comes out in the same
        unit). Values outside ``mask`` are ignored; inside they must be finite.
    mask : (X, Y, Z) array
        Brain mask (nonzero inside); the field is used and chi returned only there.
    voxel_size : float or 3 floats
        mm.
    b0_dir : 3 floats
        B0 direction in voxel coordinates (see
        :func:`qsmprep.recon.kernels.b0_dir_from_affine`); normalised here.
    threshold : float
        Truncation level of ``|D|``, in (0, 2/3); default 0.19.
    correct : bool
        Divide by ``PSF(0)`` (Schweser correction). Default False (the classic TKD).
    pad : int or 3 ints, optional
        Zero-padding of the mask's bounding box, in voxels per axis; default
        :data:`DEFAULT_PAD_MM` mm.
    device : str
        ``"cpu"`` (NumPy), ``"torch"`` or ``"cuda"``.
    info : dict, optional
        Filled with ``grid`` (FFT shape), ``threshold``, ``psf0`` (``c``) and ``corrected``.

    Returns
    -------
    chi : (X, Y, Z) float32 NumPy array, ppm, 0 outside the mask; mean arbitrary (reference
        it, see :mod:`qsmprep.recon.inversion.reference`).

    Cost: 1 forward + 1 inverse real FFT of the padded bounding box.

    References
    ----------
    Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic susceptibility
    mapping of brain tissue in vivo using MRI phase data. Magn Reson Med 2009;62:1510-1522.
    Schweser F, Deistung A, Sommer K, Reichenbach JR. Toward online reconstruction of
    quantitative susceptibility maps: superfast dipole inversion. Magn Reson Med
    2013;69:1582-1594.
    """
    return _truncated(
        local_field, mask, voxel_size, b0_dir, threshold, correct, pad, device, info, False
    )


def tsvd(
    local_field,
    mask,
    voxel_size,
    *,
    b0_dir=(0.0, 0.0, 1.0),
    threshold: float = 0.19,
    correct: bool = False,
    pad: int | Sequence[int] | None = None,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """Truncated singular value decomposition (TSVD) in k-space.

    Like :func:`tkd`, but the ill-conditioned cone is zeroed instead of clipped::

        D^-1_TSVD(k) = 1 / D(k)  where |D(k)| > threshold,  0 elsewhere (and at k = 0)
        chi = M F^-1{ D^-1_TSVD F{f_L} }

    (``D`` is diagonal in k-space, so this is the truncated SVD of the dipole convolution.)
    It loses the cone's share of every structure: ``PSF(0)`` is the fraction of the spectrum
    kept (about 0.6 at threshold 0.19); ``correct=True`` divides by it, as for :func:`tkd`.
    SEPIA's ``qsmTKD`` computes this variant.

    Parameters and returns as :func:`tkd`.

    Cost: 1 forward + 1 inverse real FFT of the padded bounding box.

    References
    ----------
    Wharton S, Schaefer A, Bowtell R. Susceptibility mapping in the human brain using
    threshold-based k-space division. Magn Reson Med 2010;63:1292-1304.
    Shmueli K, et al. Magn Reson Med 2009;62:1510-1522 (see :func:`tkd`).
    """
    return _truncated(
        local_field, mask, voxel_size, b0_dir, threshold, correct, pad, device, info, True
    )


# --------------------------------------------------------------------------------------------
# closed-form L2


REGULARISERS = ("gradient", "identity", "laplacian")


def l2(
    local_field,
    mask,
    voxel_size,
    *,
    b0_dir=(0.0, 0.0, 1.0),
    lam: float | None = None,
    reg: str = "gradient",
    pad: int | Sequence[int] | None = None,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """Closed-form L2 (Tikhonov) dipole inversion.

    Objective and its exact solution for a periodic grid::

        chi = argmin_x ||D x - f_L||^2 + lam ||Gamma x||^2
            = M F^-1{ conj(D) F{f_L} / (|D|^2 + lam |Gamma(k)|^2) }

    with ``|Gamma|^2`` (``L`` the periodic 7-point Laplacian of
    :func:`qsmprep.recon.kernels.laplace_kernel`, eigenvalues in 1/mm^2):

    * ``reg="gradient"`` (default): ``Gamma`` the forward-difference gradient in 1/mm,
      ``|Gamma|^2 = -L(k)``; ``lam`` in mm^2;
    * ``reg="identity"``: ``|Gamma|^2 = 1``; ``lam`` unitless;
    * ``reg="laplacian"``: ``|Gamma|^2 = L(k)^2``; ``lam`` in mm^4.

    Because ``Gamma`` is in physical units, the same ``lam`` penalises the same
    susceptibility gradients at any voxel size (``-L`` grows as ``1/dx^2`` on a finer grid).
    The defaults (:data:`DEFAULT_LAMBDA`) minimised the NRMSE against the truth on our 2 mm
    head phantom with white noise of 0.003 ppm on the local field (about 0.4 Hz at 3 T, a
    5-echo SNR-100 acquisition): 56 % for gradient and identity, 64 % for Laplacian; at 3 mm
    they stayed within 1.5 % NRMSE of the optimum. Without noise smaller weights do better
    (optima 0.02 mm^2, 0.005 and 0.03 mm^4). All three shrink chi: the regression slope against
    the truth was 0.64 to 0.68, and the centre of a 10 mm sphere came out 8 % (gradient), 2 %
    (Laplacian) and 31 % (identity) low. For comparison QSM.jl ``tikh`` defaults to
    ``lam = 1e-2`` and SEPIA to ``lam = 0.1`` used squared (0.01), both per voxel unit.
    The estimate at ``k = 0`` is set to 0 (``D(0) = 0``), so the mean of chi is arbitrary.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_dir, pad, device : as :func:`tkd`.
    lam : float, optional
        Regularisation weight (>= 0; units above); default per ``reg`` from
        :data:`DEFAULT_LAMBDA`. ``lam = 0`` is the plain (untruncated) division.
    reg : {"gradient", "identity", "laplacian"}
        Regulariser ``Gamma``.
    info : dict, optional
        Filled with ``grid``, ``lam`` and ``reg``.

    Returns
    -------
    chi : (X, Y, Z) float32 NumPy array, ppm, 0 outside the mask; mean arbitrary.

    Cost: 1 forward + 1 inverse real FFT of the padded bounding box.

    References
    ----------
    Bilgic B, Chatnuntawech I, Fan AP, Setsompop K, Cauley SF, Wald LL, Adalsteinsson E. Fast
    image reconstruction with L2-regularization. J Magn Reson Imaging 2014;40:181-191.
    """
    f, m, vs = check_field(local_field, mask, voxel_size, "local_field", "ppm")
    b = check_b0_dir(b0_dir)
    key = str(reg).lower()
    if key not in REGULARISERS:
        raise ValueError(f"reg must be one of {REGULARISERS}, got {reg!r}")
    lam = DEFAULT_LAMBDA[key] if lam is None else float(lam)
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"lam must be a non-negative finite weight, got {lam!r}")
    grid = Grid.around(m, pad_voxels(pad, vs, DEFAULT_PAD_MM), device)
    x = grid.embed(f)
    xp = namespace(x)
    d = dipole_kernel(grid.grid, vs, b, device=device)
    if key == "identity":
        g2 = 1.0
    else:
        lap = laplace_kernel(grid.grid, vs, device=device)
        g2 = -lap if key == "gradient" else lap * lap
    denom = d * d + lam * g2
    ok = xp.abs(d) > 0.0  # D = 0 at k = 0 and exactly on the cone: no data there
    inv = xp.where(ok, d / xp.where(ok, denom, xp.ones_like(denom)), xp.zeros_like(d))
    chi = irfftn(inv * rfftn(x), s=grid.grid)
    _fill_info(info, grid=grid.grid, lam=lam, reg=key)
    return grid.extract(chi) * m
