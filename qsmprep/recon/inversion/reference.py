"""Susceptibility referencing: remove the arbitrary offset of a chi map.

Single-orientation QSM cannot measure the mean of chi (the dipole kernel is 0 at k = 0), so a
map is only defined up to a constant and must be referenced before values are reported or
compared, to the mean over the brain or over a region such as the ventricular CSF (as MEDI+0
does: Liu Z et al. Magn Reson Med 2018;79:2795-2803). Both functions subtract a constant
inside the mask and leave 0 outside it.
"""

from __future__ import annotations

import numpy as np

from qsmprep.recon._backend import to_numpy
from qsmprep.recon._checks import check_finite, check_mask, check_volume

__all__ = ["reference_mean", "reference_roi"]


def _inputs(chi, mask):
    check_volume(chi, "chi")
    m = to_numpy(check_mask(mask, "mask", shape=chi.shape)).astype(bool)
    c = np.asarray(to_numpy(chi), dtype=np.float64)
    check_finite(c, "chi", where=m)
    return c, m


def _shifted(c, m, offset: float, info) -> np.ndarray:
    if info is not None:
        info["offset"] = float(offset)
    return np.where(m, c - offset, 0.0).astype(np.float32)


def reference_mean(chi, mask, *, info: dict | None = None) -> np.ndarray:
    """Reference chi to its mean over the mask (QSMxT's default, ``qsm_reference: mean``).

    ``chi_ref = M (chi - mean_M(chi))``: the result has mean 0 over the mask.

    Parameters
    ----------
    chi : (X, Y, Z) array
        Susceptibility map (ppm); must be finite inside the mask.
    mask : (X, Y, Z) array
        Region (nonzero voxels) whose mean becomes 0, usually the brain mask.
    info : dict, optional
        Filled with ``offset``, the subtracted value (ppm).

    Returns
    -------
    (X, Y, Z) float32 NumPy array, ppm, 0 outside the mask.

    Reference
    ---------
    Stewart AW, Robinson SD, O'Brien K, et al. QSMxT: Robust masking and artifact reduction
    for quantitative susceptibility mapping. Magn Reson Med 2022;87:1289-1300.
    """
    c, m = _inputs(chi, mask)
    return _shifted(c, m, float(c[m].mean()), info)


def reference_roi(
    chi, mask, roi, *, statistic: str = "mean", info: dict | None = None
) -> np.ndarray:
    """Reference chi to a region of interest, e.g. the lateral-ventricle CSF.

    ``chi_ref = M (chi - s)`` with ``s`` the mean (or median) of chi over ``roi & mask``, so
    the ROI reads 0 ppm on average. The median resists outliers in the ROI (choroid plexus or
    calcifications in a ventricle mask; eroding a ventricle mask by one voxel helps too).

    Parameters
    ----------
    chi : (X, Y, Z) array
        Susceptibility map (ppm); must be finite inside the mask.
    mask : (X, Y, Z) array
        Region where the referenced map is defined (nonzero voxels), usually the brain mask.
    roi : (X, Y, Z) array
        Reference region (nonzero voxels); only its part inside ``mask`` is used, which must
        not be empty.
    statistic : {"mean", "median"}
        Statistic of the ROI subtracted from chi.
    info : dict, optional
        Filled with ``offset`` (ppm) and ``n_voxels`` (ROI voxels used).

    Returns
    -------
    (X, Y, Z) float32 NumPy array, ppm, 0 outside the mask.

    Reference
    ---------
    Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y. MEDI+0: Morphology enabled dipole inversion
    with automatic uniform cerebrospinal fluid zero reference for quantitative susceptibility
    mapping. Magn Reson Med 2018;79:2795-2803.
    """
    c, m = _inputs(chi, mask)
    r = to_numpy(check_mask(roi, "roi", shape=chi.shape)).astype(bool) & m
    if not r.any():
        raise ValueError(
            "roi does not overlap the mask: no voxel to reference to; give an ROI inside the"
            " brain mask (e.g. an eroded ventricle mask)"
        )
    stat = str(statistic).lower()
    if stat == "mean":
        offset = float(c[r].mean())
    elif stat == "median":
        offset = float(np.median(c[r]))
    else:
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    if info is not None:
        info["n_voxels"] = int(r.sum())
    return _shifted(c, m, offset, info)
