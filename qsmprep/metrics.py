"""Quality metrics for susceptibility maps: QSM-challenge, QSM-CI and DL-paper definitions.

Every function compares a reconstruction ``recon`` with a ``reference`` (the simulation truth,
or a COSMOS map) inside an evaluation ``mask``. The definitions follow the published scoring
code exactly where it was available, and say so where a choice had to be made.

Conventions shared by all functions
-----------------------------------
- ``recon`` and ``reference`` are 3D chi maps in ppm on the same voxel grid; ``mask`` is a 3D
  array whose nonzero voxels form the evaluation region. NumPy arrays or torch tensors are
  accepted; all arithmetic is done in float64 and results are Python floats.
- Both maps are set to **0 outside the mask** before anything is computed, as the QSM-CI
  scorer does. Neighbourhood filters (HFEN, SSIM, XSIM) therefore see the same hard edge in
  both maps, and whatever lies outside the mask (background, NaN, another method's garbage)
  never enters a score.
- A NaN or infinite value of ``recon`` or ``reference`` **inside** the mask raises
  ``ValueError`` (QSM-CI silently scores such a voxel as 0; here the caller decides, e.g. by
  zeroing the voxel or by removing it from the mask). Shapes must match and the mask must not
  be empty. A reference that is constant in the mask leaves the normalised metrics undefined
  and raises ``ValueError`` too.
- A zero inside the mask is a value like any other: a method that eroded the brain is scored
  over the full mask with its missing rim counted as 0 (``coverage`` in :func:`evaluate`
  reports the fraction of mask voxels with a nonzero value).
- Filter widths are in voxels (the challenges scored 1 mm isotropic data).

References
----------
- Langkammer C, Schweser F, Shmueli K, et al. Quantitative susceptibility mapping: Report from
  the 2016 reconstruction challenge. Magn Reson Med 2018;79:1661-1673. (NRMSE, HFEN; scoring
  files compute_rmse.m, compute_hfen.m by C. Milovic, 2017-03-30.)
- Milovic C, Tejos C, Acosta-Cabronero J, et al. The 2016 QSM Challenge: Lessons learned and
  considerations for a future challenge design. Magn Reson Med 2020;84:1624-1637. (XSIM;
  scoring file compute_xsim_allmaps.m, C. Milovic, 2019-05-26.)
- QSM Challenge 2.0 Organization Committee (Bilgic B, Langkammer C, Marques JP, Meineke J,
  Milovic C, Schweser F). QSM reconstruction challenge 2.0: Design and report of results.
  Magn Reson Med 2021;86:1241-1255; and Marques JP, Meineke J, Milovic C, et al. QSM
  reconstruction challenge 2.0: A realistic in silico head phantom for MRI data simulation
  and evaluation of susceptibility mapping procedures. Magn Reson Med 2021;86:526-542.
  (De-meaned and detrended NRMSE, XSIM, deep-grey-matter linearity.)
- QSM-CI scorer ``qsm_ci.qsm_eval`` (pip ``qsm-ci`` 0.6.2), a port of QSM.rs
  ``tests/common/mod.rs`` (github.com/astewartau/QSM.rs). (``variant="qsm_ci"``.)
- Wang Z, Bovik AC, Sheikh HR, Simoncelli EP. Image quality assessment: from error visibility
  to structural similarity. IEEE Trans Image Process 2004;13:600-612. (SSIM.)
- Ravishankar S, Bresler Y. MR image reconstruction from highly undersampled k-space data by
  dictionary learning. IEEE Trans Med Imaging 2011;30:1028-1041. (HFEN.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from qsmprep.recon._backend import to_numpy
from qsmprep.recon._checks import check_finite, check_mask, check_same_shape, check_volume

__all__ = [
    "DGM_LABELS",
    "LinearFit",
    "correlation",
    "evaluate",
    "hfen",
    "nrmse",
    "psnr",
    "regression",
    "roi_means",
    "roi_slope",
    "ssim",
    "xsim",
]

#: Deep-grey-matter labels of the QSM challenge 2.0 segmentation (1 caudate, 2 globus
#: pallidus, 3 putamen, 4 red nucleus, 5 dentate nucleus, 6 substantia nigra / STN): the ROIs
#: of QSM-CI's ``dgm_linearity``.
DGM_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

_VARIANTS = ("challenge", "qsm_ci")


class LinearFit(NamedTuple):
    """Least-squares line ``y = slope * x + intercept``."""

    slope: float
    intercept: float


# --------------------------------------------------------------------------------------------
# validation helpers


def _prepare(recon, reference, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the inputs; return float64 maps zeroed outside the mask and the boolean mask."""
    check_volume(recon, "recon")
    check_volume(reference, "reference")
    check_same_shape("reference", reference, recon=recon, mask=mask)
    m = to_numpy(check_mask(mask, "mask", shape=reference.shape))
    r = np.asarray(to_numpy(recon), dtype=np.float64)
    t = np.asarray(to_numpy(reference), dtype=np.float64)
    check_finite(r, "recon", where=m)
    check_finite(t, "reference", where=m)
    return np.where(m, r, 0.0), np.where(m, t, 0.0), m


def _check_variant(variant: str) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")


def _reference_varies(t: np.ndarray, m: np.ndarray, what: str) -> None:
    v = t[m]
    if v.max() == v.min():
        raise ValueError(
            f"reference is constant ({v[0]:g} ppm) inside the mask: {what} is undefined;"
            " check that the reference map and the mask are the right ones"
        )


def _fit(x: np.ndarray, y: np.ndarray) -> LinearFit:
    """Least-squares ``y = slope * x + intercept`` (centred sums; x must vary)."""
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    slope = float(np.dot(dx, y - ym) / np.dot(dx, dx))
    return LinearFit(slope, float(ym - slope * xm))


# --------------------------------------------------------------------------------------------
# NRMSE


def _nrmse(r, t, m, demean: bool, detrend: bool) -> float:
    rv, tv = r[m], t[m]
    if demean or detrend:
        _reference_varies(t, m, "the de-meaned or detrended NRMSE")
    if demean:
        rv = rv - rv.mean()
        tv = tv - tv.mean()
    norm_t = float(np.linalg.norm(tv))
    if norm_t == 0.0:
        raise ValueError(
            "reference is zero inside the mask: NRMSE is undefined;"
            " check the reference map and the mask"
        )
    if detrend:
        slope, intercept = _fit(tv, rv)
        if abs(slope) >= 1e-30:  # a flat recon cannot be detrended: score it as it is
            rv = (rv - intercept) / slope
    return 100.0 * float(np.linalg.norm(rv - tv)) / norm_t


def nrmse(recon, reference, mask, *, demean: bool = True, detrend: bool = False) -> float:
    """Normalised root-mean-square error (%) inside the mask.

    With ``r`` and ``t`` the in-mask voxels of ``recon`` and ``reference``::

        NRMSE = 100 * ||r - t||_2 / ||t||_2

    - ``demean=True`` (default; QSM challenge 2.0 and QSM-CI): ``r`` and ``t`` are each
      de-meaned over the mask first, so a global offset of the recon is not penalised.
      ``demean=False`` gives the 2016 challenge "RMSE" (compute_rmse.m with a mask: maps
      multiplied by the mask, not de-meaned).
    - ``detrend=True`` (challenge 2.0 / QSM-CI "detrended NRMSE"): fit ``r = a * t + b`` by
      least squares (over the de-meaned values when ``demean``), replace ``r`` by
      ``(r - b) / a`` and score that, so a global scaling is not penalised either. If the fit
      gives ``|a| < 1e-30`` (a flat recon) the recon is scored unchanged, as QSM-CI does.

    With ``demean=True`` this is exactly ``qsm_ci.qsm_eval.nrmse_challenge`` (its first
    value, or its second with ``detrend=True``).

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm). Values outside the mask are ignored.
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).
    demean, detrend : bool
        See above.

    Returns
    -------
    float
        NRMSE in percent (0 for a perfect recon).

    References
    ----------
    Langkammer C, et al. Magn Reson Med 2018;79:1661-1673 (2016 challenge, compute_rmse.m).
    QSM Challenge 2.0 Organization Committee. Magn Reson Med 2021;86:1241-1255.
    """
    r, t, m = _prepare(recon, reference, mask)
    return _nrmse(r, t, m, demean, detrend)


# --------------------------------------------------------------------------------------------
# HFEN


def _log_challenge(x: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """Correlate ``x`` with the zero-mean LoG kernel of compute_hfen.m, zero padding.

    The kernel is ``H = h * (x^2/s^4 + y^2/s^4 + z^2/s^4 - 3/s^2) - c`` with ``h`` the
    normalised Gaussian on the ``size^3`` grid and ``c`` the constant that makes ``sum(H) = 0``.
    Each term is separable, so the ``size^3`` correlation runs as 1D passes.
    """
    half = (size - 1) // 2
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(u**2) / (2.0 * sigma**2))
    g /= g.sum()  # the 3D h = g x g x g is then normalised too
    g2 = g * u**2 / sigma**4
    box = np.ones_like(u)
    c = (3.0 * g2.sum() - 3.0 / sigma**2) / size**3  # sum(H_raw) / size^3

    def sep(kernels):
        y = x
        for axis, k in enumerate(kernels):
            y = ndimage.correlate1d(y, k, axis=axis, mode="constant", cval=0.0)
        return y

    out = sep((g2, g, g)) + sep((g, g2, g)) + sep((g, g, g2))
    out -= (3.0 / sigma**2) * sep((g, g, g))
    out -= c * sep((box, box, box))
    return out


def _hfen(r, t, m, sigma: float, variant: str, size: int) -> float:
    if variant == "challenge":
        lr = _log_challenge(r, sigma, size)
        lt = _log_challenge(t, sigma, size)
        diff, ref = lr - lt, lt  # whole volume, as compute_hfen.m on masked maps
    else:
        lr = ndimage.gaussian_laplace(r, sigma=sigma, truncate=5.0)
        lt = ndimage.gaussian_laplace(t, sigma=sigma, truncate=5.0)
        diff, ref = lr[m] - lt[m], lt[m]
    norm_t = float(np.linalg.norm(ref))
    if norm_t == 0.0:
        raise ValueError("the LoG of the reference is zero: HFEN is undefined")
    return 100.0 * float(np.linalg.norm(diff)) / norm_t


def hfen(
    recon,
    reference,
    mask,
    *,
    sigma: float = 1.5,
    variant: str = "challenge",
    size: int = 15,
) -> float:
    """High-frequency error norm (%): NRMSE of Laplacian-of-Gaussian filtered maps.

    ``HFEN = 100 * ||LoG(recon) - LoG(reference)||_2 / ||LoG(reference)||_2``, both maps
    zeroed outside the mask first and not de-meaned. Two definitions of LoG and of the norm
    region:

    ``variant="challenge"`` (default; 2016 challenge, compute_hfen.m)
        Kernel on a ``size^3 = 15^3`` grid with ``sigma = 1.5`` voxels:
        ``h = exp(-r^2 / (2 sigma^2))`` normalised to sum 1,
        ``H = h * (x^2 + y^2 + z^2) / sigma^4 - 3 h / sigma^2``, then made zero-mean
        (``H -= sum(H) / size^3``). Applied by correlation with zero padding (MATLAB
        ``imfilter(..., 'same')``). Norms over the **whole volume** (the challenge passed
        masked maps and took the norms over all voxels; the LoG spreads 7 voxels past the mask
        edge, so the result does not depend on the field of view as long as the mask stays 7
        voxels from the array border).
    ``variant="qsm_ci"`` (QSM-CI ``hfen``)
        ``scipy.ndimage.gaussian_laplace(sigma=1.5, truncate=5)``: the continuous LoG sampled on
        a 17^3 grid, not zero-mean corrected, with 'reflect' boundary. Norms over the **mask**
        voxels only. Equals ``qsm_ci.qsm_eval.hfen`` applied to the zeroed maps.

    On realistic maps the two differed by up to ~2 % of their value, almost all of it from the
    norm region (the two kernels give HFENs within 1e-5 relative of each other on the same
    region); compare numbers only within one variant.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm).
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).
    sigma : float
        Gaussian width in voxels (1.5 in both challenges).
    variant : {"challenge", "qsm_ci"}
        Kernel, boundary and norm region, see above.
    size : int
        Kernel width in voxels for ``variant="challenge"`` (odd; 15 in compute_hfen.m).

    Returns
    -------
    float
        HFEN in percent (0 for a perfect recon).

    References
    ----------
    Ravishankar S, Bresler Y. IEEE Trans Med Imaging 2011;30:1028-1041.
    Langkammer C, et al. Magn Reson Med 2018;79:1661-1673 (compute_hfen.m).
    QSM-CI ``qsm_ci.qsm_eval.hfen`` (qsm-ci 0.6.2).
    """
    _check_variant(variant)
    if not (sigma > 0):
        raise ValueError(f"sigma must be positive (voxels), got {sigma!r}")
    if size < 3 or size % 2 != 1:
        raise ValueError(f"size must be an odd kernel width >= 3 (voxels), got {size!r}")
    r, t, m = _prepare(recon, reference, mask)
    return _hfen(r, t, m, float(sigma), variant, int(size))


# --------------------------------------------------------------------------------------------
# SSIM / XSIM


def _data_range(t: np.ndarray, m: np.ndarray) -> float:
    v = t[m]
    rng = float(v.max() - v.min())
    if rng == 0.0:
        raise ValueError("reference is constant inside the mask: its data range is 0")
    return rng


def _ssim(r, t, m, data_range, sigma: float, k1: float, k2: float) -> float:
    from skimage.metrics import structural_similarity

    if data_range is None:
        data_range = _data_range(t, m)
    elif not (data_range > 0):
        raise ValueError(f"data_range must be positive (ppm), got {data_range!r}")
    _, smap = structural_similarity(
        r,
        t,
        data_range=float(data_range),
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        K1=k1,
        K2=k2,
        full=True,
    )
    return float(smap[m].mean())


def ssim(
    recon,
    reference,
    mask,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity (Wang et al. 2004), 3D, averaged over the mask.

    ``skimage.metrics.structural_similarity`` on the two maps (zeroed outside the mask, native
    ppm, no rescaling) with a Gaussian window of ``sigma = 1.5`` voxels truncated at 3.5 sigma
    (11^3 voxels), population (co)variances, 'reflect' boundary,
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with ``k1 = 0.01``, ``k2 = 0.03`` and
    ``L = data_range``. The SSIM map is averaged over the mask voxels (not over the
    border-cropped volume that skimage's scalar output uses).

    The data range defaults to ``max - min`` of the reference inside the mask. The 2016
    challenge SSIM rescaled the maps to an 8-bit-like range first; its exact rescaling is not
    reproduced here, so do not compare these numbers with the 2016 report. For QSM prefer
    :func:`xsim`.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm); at least 11 voxels along each axis.
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).
    data_range : float, optional
        ``L`` in ppm (default: range of the reference in the mask).
    sigma, k1, k2 : float
        Window width (voxels) and the SSIM constants.

    Returns
    -------
    float
        Mean SSIM over the mask (1 for a perfect recon).

    References
    ----------
    Wang Z, Bovik AC, Sheikh HR, Simoncelli EP. IEEE Trans Image Process 2004;13:600-612.
    """
    r, t, m = _prepare(recon, reference, mask)
    return _ssim(r, t, m, data_range, sigma, k1, k2)


def _xsim_challenge_map(a, b, c1: float = 1e-4, c2: float = 1e-6, half: int = 3, sigma=1.5):
    """XSIM map of compute_xsim_allmaps.m: 7^3 Gaussian window, zero padding, l * c * s."""
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(u**2) / (2.0 * sigma**2))
    g /= g.sum()  # separable: the 3D window g x g x g sums to 1, as window/sum(window(:))

    def filt(x):
        for axis in range(3):
            x = ndimage.correlate1d(x, g, axis=axis, mode="constant", cval=0.0)
        return x

    mu1, mu2 = filt(a), filt(b)
    s11 = filt(a * a) - mu1 * mu1
    s22 = filt(b * b) - mu2 * mu2
    s12 = filt(a * b) - mu1 * mu2
    sd12 = np.sqrt(np.maximum(s11, 0.0)) * np.sqrt(np.maximum(s22, 0.0))
    lmap = (2.0 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1)
    cmap = (2.0 * sd12 + c2) / (s11 + s22 + c2)
    smap = (2.0 * s12 + c2) / (2.0 * sd12 + c2)
    return lmap * cmap * smap


def _xsim_qsm_ci_map(a, b, c1: float = 1e-4, c2: float = 1e-6, k: int = 5):
    """XSIM map of QSM-CI: k^3 uniform window truncated at the border, two-term SSIM."""

    def wmean(x):  # mean over the in-bounds part of the window
        return ndimage.uniform_filter(x, size=k, mode="constant", cval=0.0)

    cnt = wmean(np.ones_like(a))
    mu1, mu2 = wmean(a) / cnt, wmean(b) / cnt
    v1 = wmean(a * a) / cnt - mu1 * mu1
    v2 = wmean(b * b) / cnt - mu2 * mu2
    cov = wmean(a * b) / cnt - mu1 * mu2
    num = (2.0 * mu1 * mu2 + c1) * (2.0 * cov + c2)
    den = (mu1 * mu1 + mu2 * mu2 + c1) * (v1 + v2 + c2)
    return num / den


def _xsim(r, t, m, variant: str) -> float:
    smap = _xsim_challenge_map(r, t) if variant == "challenge" else _xsim_qsm_ci_map(r, t)
    return float(smap[m].mean())


def xsim(recon, reference, mask, *, variant: str = "challenge") -> float:
    """XSIM: SSIM tuned for susceptibility maps (QSM challenge 2.0), averaged over the mask.

    Both maps stay in native ppm (no rescaling), zeroed outside the mask. With local
    (window-weighted) means ``mu``, variances ``s1^2, s2^2`` and covariance ``s12``, and
    ``C1 = (K1 L)^2 = 1e-4``, ``C2 = (K2 L)^2 = 1e-6`` (``K1 = 0.01``, ``K2 = 0.001``,
    ``L = 1`` ppm)::

        XSIM map = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1)
                   * (2 s12 + C2) / (s1^2 + s2^2 + C2)

    and XSIM is the mean of the map over the mask voxels.

    ``variant="challenge"`` (default; Milovic 2019, compute_xsim_allmaps.m)
        Gaussian window ``exp(-r^2 / (2 * 1.5^2))`` on a 7^3 grid (``sw = [3 3 3]``),
        normalised to sum 1, applied with zero padding (``convn(..., 'same')``). The code
        multiplies luminance, contrast and structure maps ``l * c * s`` with ``C3 = C2``; the
        ``2 s1 s2 + C2`` factors cancel, so this equals the two-term formula above (up to
        rounding; negative rounding residues of the variances are clipped to 0 before the
        square root).
    ``variant="qsm_ci"`` (QSM-CI ``xsim``)
        5^3 **uniform** window, truncated at the array border (mean over the in-bounds
        voxels), same constants and formula. Equals ``qsm_ci.qsm_eval.xsim`` on the zeroed
        maps.

    The two variants differ only by the window (and the array-border rule); on smooth
    realistic maps they differed by about 1e-3. Compare numbers only within one variant.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm).
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).
    variant : {"challenge", "qsm_ci"}
        Window, see above.

    Returns
    -------
    float
        Mean XSIM over the mask (1 for a perfect recon).

    References
    ----------
    Milovic C, Tejos C, Acosta-Cabronero J, et al. The 2016 QSM Challenge: Lessons learned and
    considerations for a future challenge design. Magn Reson Med 2020;84:1624-1637.
    QSM Challenge 2.0 Organization Committee. Magn Reson Med 2021;86:1241-1255.
    QSM-CI ``qsm_ci.qsm_eval.xsim`` (qsm-ci 0.6.2).
    """
    _check_variant(variant)
    r, t, m = _prepare(recon, reference, mask)
    return _xsim(r, t, m, variant)


# --------------------------------------------------------------------------------------------
# PSNR


def _psnr(r, t, m, variant: str) -> float:
    if variant == "mask":
        mse = float(np.mean((r[m] - t[m]) ** 2))
        peak = _data_range(t, m)
    elif variant == "all255":
        lo = min(float(r.min()), float(t.min()))
        a = np.where(r != 0, r - lo, 0.0)
        b = np.where(t != 0, t - lo, 0.0)
        hi = max(float(a.max()), float(b.max()))
        if hi <= 0.0:
            raise ValueError("recon and reference are zero everywhere: PSNR is undefined")
        a *= 255.0 / hi
        b *= 255.0 / hi
        mse = float(np.mean((a - b) ** 2))
        peak = 255.0
    else:
        raise ValueError(f"variant must be 'mask' or 'all255', got {variant!r}")
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak**2 / mse)


def psnr(recon, reference, mask, *, variant: str = "mask") -> float:
    """Peak signal-to-noise ratio (dB).

    ``variant="mask"`` (default)
        ``PSNR = 10 log10(L^2 / MSE)`` with ``MSE`` the mean of ``(recon - reference)^2`` over
        the mask voxels (maps not de-meaned) and ``L = max - min`` of the reference in the
        mask (the ``data_range`` convention of ``skimage.metrics.peak_signal_noise_ratio``).
    ``variant="all255"`` (compute_psnr.m of several DL-QSM code bases, e.g. MSFF-QSMNet)
        Maps zeroed outside the mask; ``lo`` = minimum of both maps over **all** voxels (0
        included); ``lo`` is subtracted from the **nonzero** voxels only; both maps are scaled
        by ``255 / hi`` with ``hi`` the maximum of both shifted maps; then MATLAB
        ``psnr(a, b, 255)``, i.e. the MSE averaged over **all** voxels of the array. This
        number grows with the size of the zero background (``+10 log10(N2/N1)`` when the
        array grows from N1 to N2 voxels): report it only for comparison with such papers.

    A perfect recon gives ``math.inf``.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm).
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).
    variant : {"mask", "all255"}
        See above.

    Returns
    -------
    float
        PSNR in dB.

    References
    ----------
    compute_psnr.m, e.g. github.com/venkateshvaddadi/MSFF-QSMNet; skimage
    ``peak_signal_noise_ratio`` for the in-mask variant.
    """
    r, t, m = _prepare(recon, reference, mask)
    return _psnr(r, t, m, variant)


# --------------------------------------------------------------------------------------------
# correlation and regression


def _correlation(r, t, m) -> float:
    _reference_varies(t, m, "the correlation")
    rv, tv = r[m] - r[m].mean(), t[m] - t[m].mean()
    if r[m].max() == r[m].min():
        return 0.0
    nr, nt = float(np.linalg.norm(rv)), float(np.linalg.norm(tv))
    return float(np.dot(rv, tv) / (nr * nt))


def correlation(recon, reference, mask) -> float:
    """Pearson correlation coefficient of recon and reference over the mask voxels.

    ``r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) sum((y - mean y)^2))``.
    A recon that is constant in the mask gives 0 (as QSM-CI); a constant reference raises
    ``ValueError``. Equals ``qsm_ci.qsm_eval.correlation``.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm).
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).

    Returns
    -------
    float
        Correlation coefficient in [-1, 1].

    References
    ----------
    QSM Challenge 2.0 Organization Committee. Magn Reson Med 2021;86:1241-1255.
    """
    r, t, m = _prepare(recon, reference, mask)
    return _correlation(r, t, m)


def _regression(r, t, m) -> LinearFit:
    _reference_varies(t, m, "the regression")
    return _fit(t[m], r[m])


def regression(recon, reference, mask) -> LinearFit:
    """Least-squares line of recon against reference over the mask voxels.

    Fits ``recon = slope * reference + intercept`` (ordinary least squares, reference as the
    independent variable). A slope below 1 means the recon underestimates susceptibility
    contrast; the intercept (ppm) is the offset at reference 0.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm).
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).

    Returns
    -------
    LinearFit
        ``(slope, intercept)``; slope dimensionless, intercept in ppm.

    References
    ----------
    Langkammer C, et al. Magn Reson Med 2018;79:1661-1673.
    """
    r, t, m = _prepare(recon, reference, mask)
    return _regression(r, t, m)


# --------------------------------------------------------------------------------------------
# ROI statistics


def _labels_int(labels, name: str = "labels") -> np.ndarray:
    lab = to_numpy(labels)
    check_volume(lab, name)
    if np.issubdtype(lab.dtype, np.integer):
        return lab.astype(np.int64, copy=False)
    if np.issubdtype(lab.dtype, np.bool_):
        return lab.astype(np.int64)
    if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.rint(lab)):
        raise ValueError(f"{name} must hold integer label values (a segmentation), got floats")
    return np.rint(lab).astype(np.int64)


def _label_ids(lab: np.ndarray, sel: np.ndarray, label_ids) -> list[int]:
    if label_ids is None:
        return [int(v) for v in np.unique(lab[sel]) if v != 0]
    return [int(v) for v in label_ids]


def roi_means(chi, labels, label_ids=None, *, mask=None) -> dict[int, dict[str, float]]:
    """Mean, median, standard deviation and voxel count of ``chi`` in each labelled region.

    For each label ``l`` the region is ``labels == l`` (and ``mask != 0`` when a mask is
    given). The standard deviation is the population one (``ddof=0``, as QSM-CI's
    ``region_stats``).

    Parameters
    ----------
    chi : (X, Y, Z) array
        Chi map (ppm). Must be finite inside the labelled regions used.
    labels : (X, Y, Z) integer array
        Segmentation; 0 is background. Float arrays holding whole numbers (NIfTI) are accepted.
    label_ids : iterable of int, optional
        Labels to report (default: every nonzero label present, inside the mask if given).
        A requested label with no voxel is left out of the result.
    mask : (X, Y, Z) array, optional
        Restrict every region to this mask.

    Returns
    -------
    dict
        ``{label: {"mean": ppm, "median": ppm, "std": ppm, "count": n_voxels}}`` in
        ascending label order.

    References
    ----------
    QSM-CI ``qsm_ci.qsm_eval.region_stats`` (qsm-ci 0.6.2).
    """
    check_volume(chi, "chi")
    lab = _labels_int(labels)
    check_same_shape("chi", chi, labels=lab, mask=mask)
    x = np.asarray(to_numpy(chi), dtype=np.float64)
    sel = np.ones(lab.shape, bool) if mask is None else check_mask(mask, "mask", shape=x.shape)
    sel = to_numpy(sel)
    out: dict[int, dict[str, float]] = {}
    for lid in sorted(_label_ids(lab, sel, label_ids)):
        region = sel & (lab == lid)
        n = int(region.sum())
        if n == 0:
            continue
        check_finite(x, f"chi (label {lid})", where=region)
        v = x[region]
        out[lid] = {
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "std": float(v.std()),
            "count": n,
        }
    return out


def _roi_slope(r, t, m, lab, label_ids) -> tuple[float, dict]:
    rs = roi_means(r, lab, label_ids, mask=m)
    ts = roi_means(t, lab, label_ids, mask=m)
    ids = sorted(rs)
    if len(ids) < 2:
        raise ValueError(
            f"roi_slope needs at least 2 labelled regions inside the mask, found {ids};"
            " check labels and label_ids"
        )
    x = np.array([ts[i]["mean"] for i in ids])
    y = np.array([rs[i]["mean"] for i in ids])
    if x.max() == x.min():
        raise ValueError("the reference ROI means are all equal: the ROI slope is undefined")
    return _fit(x, y).slope, {i: {"recon": rs[i], "reference": ts[i]} for i in ids}


def roi_slope(recon, reference, labels, label_ids=None, *, mask=None) -> float:
    """Slope of the ROI means of recon against those of the reference.

    For each region ``labels == l`` (inside ``mask`` if given) take the mean of recon and of
    reference, then fit ``mean_recon = slope * mean_reference + intercept`` by least squares
    over the regions. ``|1 - slope|`` over the deep-grey-matter labels :data:`DGM_LABELS` is
    QSM-CI's ``dgm_linearity`` (QSM-CI takes the regions over the whole array; they agree
    when the labels lie inside the mask).

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm); without a mask they must be finite inside the regions used.
    labels : (X, Y, Z) integer array
        Segmentation; 0 is background.
    label_ids : iterable of int, optional
        Regions to use (default: every nonzero label present). At least two must be present.
    mask : (X, Y, Z) array, optional
        Restrict every region to this mask (maps zeroed outside it first).

    Returns
    -------
    float
        The slope (1 for a recon that reproduces the ROI contrasts).

    References
    ----------
    QSM Challenge 2.0 Organization Committee. Magn Reson Med 2021;86:1241-1255.
    QSM-CI ``qsm_ci.qsm_eval.dgm_linearity`` (qsm-ci 0.6.2).
    """
    lab = _labels_int(labels)
    if mask is None:
        check_volume(recon, "recon")
        check_same_shape("reference", reference, recon=recon, labels=lab)
        r = np.asarray(to_numpy(recon), dtype=np.float64)
        t = np.asarray(to_numpy(reference), dtype=np.float64)
        m = None
    else:
        r, t, m = _prepare(recon, reference, mask)
        check_same_shape("reference", t, labels=lab)
    return _roi_slope(r, t, m, lab, label_ids)[0]


# --------------------------------------------------------------------------------------------
# everything at once


def evaluate(
    recon,
    reference,
    mask,
    labels=None,
    *,
    convention: str = "challenge",
    roi_ids=None,
) -> dict:
    """All metrics of this module for one recon, as a flat dict with stable keys.

    Keys (definitions in the functions named):

    ========================  =====================================================
    ``nrmse``                 :func:`nrmse`, de-meaned, % (challenge 2.0 / QSM-CI)
    ``nrmse_detrend``         :func:`nrmse` with ``detrend=True``, %
    ``nrmse_raw``             :func:`nrmse` with ``demean=False`` (2016 "RMSE"), %
    ``hfen``                  :func:`hfen`, %
    ``ssim``                  :func:`ssim` (data range = reference range in the mask)
    ``xsim``                  :func:`xsim`
    ``psnr``                  :func:`psnr`, in-mask variant, dB
    ``psnr_all255``           :func:`psnr`, ``variant="all255"``, dB
    ``corr``                  :func:`correlation`
    ``slope``, ``intercept``  :func:`regression` (recon against reference; ppm)
    ``coverage``              fraction of mask voxels where recon is nonzero
    ``n_voxels``              number of mask voxels
    ========================  =====================================================

    With ``labels``: ``roi_slope`` (:func:`roi_slope` over ``roi_ids``), ``roi_linearity``
    (``|1 - roi_slope|``) and ``roi``, a dict ``{label: {"recon": stats, "reference":
    stats}}`` of :func:`roi_means` statistics, all within the mask.

    Parameters
    ----------
    recon, reference : (X, Y, Z) array
        Chi maps (ppm).
    mask : (X, Y, Z) array
        Evaluation region (nonzero voxels).
    labels : (X, Y, Z) integer array, optional
        Segmentation for the ROI statistics.
    convention : {"challenge", "qsm_ci"}
        Variant of ``hfen`` and ``xsim``: the QSM challenge scoring files (default) or the
        QSM-CI scorer. With ``"qsm_ci"``, ``nrmse``, ``nrmse_detrend``, ``hfen``, ``xsim``,
        ``corr`` and ``coverage`` equal the numbers of ``qsm_ci.qsm_eval.score_arrays`` for a
        recon that is finite in the mask.
    roi_ids : iterable of int, optional
        Regions for ``roi_slope`` and ``roi`` (default: every nonzero label in the mask).
        Pass :data:`DGM_LABELS` for QSM-CI's ``dgm_linearity`` on challenge-2.0 labels.

    Returns
    -------
    dict
        Metric name -> float (``n_voxels`` int; ``roi`` a nested dict).

    References
    ----------
    See the module docstring.
    """
    _check_variant(convention)
    r, t, m = _prepare(recon, reference, mask)
    _reference_varies(t, m, "every normalised metric")
    fit = _regression(r, t, m)
    out: dict = {
        "nrmse": _nrmse(r, t, m, True, False),
        "nrmse_detrend": _nrmse(r, t, m, True, True),
        "nrmse_raw": _nrmse(r, t, m, False, False),
        "hfen": _hfen(r, t, m, 1.5, convention, 15),
        "ssim": _ssim(r, t, m, None, 1.5, 0.01, 0.03),
        "xsim": _xsim(r, t, m, convention),
        "psnr": _psnr(r, t, m, "mask"),
        "psnr_all255": _psnr(r, t, m, "all255"),
        "corr": _correlation(r, t, m),
        "slope": fit.slope,
        "intercept": fit.intercept,
        "coverage": float(np.count_nonzero(r[m]) / m.sum()),
        "n_voxels": int(m.sum()),
    }
    if labels is not None:
        lab = _labels_int(labels)
        check_same_shape("reference", t, labels=lab)
        slope, stats = _roi_slope(r, t, m, lab, roi_ids)
        out["roi_slope"] = slope
        out["roi_linearity"] = abs(1.0 - slope)
        out["roi"] = stats
    return out
