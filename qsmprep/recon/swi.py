"""Susceptibility-weighted imaging: SWI, its minimum intensity projection, and SMWI.

SWI (Haacke et al., 2004; Reichenbach et al., 1997) weights a magnitude image with a mask made
from the high-passed phase, so that veins (deoxyhaemoglobin, paramagnetic) and iron-rich
nuclei appear dark. qsmprep follows the multi-echo recipe of CLEAR-SWI (Eckstein et al.,
2021) where it can reuse the QSM field chain:

* **Magnitude**: the echoes are combined by root-sum-of-squares, ``sqrt(sum_n M_n^2)``
  (CLEAR-SWI's default ``:SNR`` combination; :func:`combine_swi_magnitude`). The alternative
  ``"te"`` weights each echo by its echo time, ``sum_n TE_n M_n / sum_n TE_n``, which favours
  the later, more T2*-weighted echoes. CLEAR-SWI's receive-sensitivity correction and
  softplus scaling are not applied.
* **Phase**: not the wrapped phase of one echo (no homodyne filter), but the total field
  (Hz) that the field chain fitted to the unwrapped, offset-free phase of all echoes, as
  CLEAR-SWI combines its ROMEO-unwrapped echoes into one frequency map. The field is
  high-passed by subtracting a Gaussian smoothing (sigma in mm, the same in every direction,
  voxel size honoured) normalised by the mask (:func:`high_pass_field`), and expressed as the
  phase at one echo time, ``phi = 2 pi f_hp TE`` (by default the longest echo).
* **Phase mask**: the sign convention is qsmprep's: phase = +2 pi f TE and paramagnetic
  susceptibility gives a positive field inside sources parallel to B0, so the mask attenuates
  **positive** phase (Haacke's "negative" mask with the sign flipped):
  ``g(phi) = 1`` for ``phi <= 0``, ``1 - phi / pi`` for ``0 < phi < pi``, ``0`` for
  ``phi >= pi`` (:func:`phase_mask`). ``SWI = magnitude * g^power`` with ``power = 4``.
  Outside the mask of the field (the brain), ``g = 1``: the SWI shows the whole head, with
  the phase weighting inside the brain only.
* **minIP**: a sliding minimum over a slab of ``slab_mm`` (default 16 mm) along the array
  axis closest to the world z (superior-inferior) axis, as CLEAR-SWI's ``createMIP`` (only
  full slabs: ``N - n + 1`` output slices for ``n`` slab slices). The output affine puts each
  voxel at the centre of its slab (:func:`min_intensity_projection`).

SMWI (Gho et al., 2014; Nam et al., 2017) replaces the phase mask by a mask of the
susceptibility map: ``para = 1 - chi / t`` for ``0 < chi < t`` (1 below 0, 0 above t) darkens
paramagnetic tissue (veins, iron), ``dia = 1 + chi / t`` for ``-t < chi < 0`` darkens
diamagnetic tissue; each to the power ``power`` times the magnitude (:func:`smwi`).

Units: field in Hz, chi in ppm, echo times in s, lengths in mm. Everything is NumPy/SciPy on
the CPU (separable Gaussian and running-minimum filters, a few seconds at 1 mm).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep import methods as registry
from qsmprep.recon._checks import (
    check_echo_times,
    check_finite,
    check_mask,
    check_same_shape,
    check_volume,
    check_voxel_size,
)
from qsmprep.recon.mask import combine_magnitude

__all__ = [
    "SMWI_DEFAULTS",
    "SWI_DEFAULTS",
    "smwi_method_of",
    "COMBINATIONS",
    "combine_swi_magnitude",
    "high_pass_field",
    "min_intensity_projection",
    "phase_mask",
    "slab_axis",
    "smwi",
    "smwi_mask",
    "swi",
]

SWI_DEFAULTS = {"sigma_mm": 4.0, "power": 4.0, "slab_mm": 16.0, "combine": "rss"}
"""Defaults of the ``swi`` parameter section (see :func:`swi`)."""

SMWI_DEFAULTS = {"threshold": 1.0, "power": 4.0}
"""Defaults of the ``smwi`` parameter section."""


def smwi_method_of(methods: Sequence[str]) -> str | None:
    """The Chimap an SMWI is made from: the first classical method in ``methods`` (``tkd``,
    ``tsvd``, ``l2``, ``tv``, ``medi``), else the first method; None without methods."""
    methods = list(methods)
    for m in methods:
        if m in registry.names("inversion", kind="classical"):
            return m
    return methods[0] if methods else None


COMBINATIONS = ("rss", "te")
"""Echo combinations of the SWI magnitude: root-sum-of-squares, echo-time weighted mean."""


def combine_swi_magnitude(magnitude, echo_times=None, method: str = "rss") -> np.ndarray:
    """One magnitude image from the echoes.

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array
        Echoes on the last axis; a 3D input is returned as float32.
    echo_times : sequence of float, optional
        s; needed by ``"te"``.
    method : {"rss", "te"}
        ``"rss"``: ``sqrt(sum_n M_n^2)`` (CLEAR-SWI's default, the SNR-optimal combination of
        equal-noise echoes); ``"te"``: ``sum_n TE_n M_n / sum_n TE_n``.

    Returns
    -------
    (X, Y, Z) float32 array.
    """
    if method not in COMBINATIONS:
        raise ValueError(f"magnitude combination must be one of {COMBINATIONS}, got {method!r}")
    m = np.asarray(magnitude)
    if m.ndim == 3:
        check_finite(m, "magnitude")
        return m.astype(np.float32)
    if method == "rss":
        return combine_magnitude(m).astype(np.float32)
    check_volume(m, "magnitude", ndim=4)
    te = check_echo_times(echo_times, m.shape[-1])
    w = (te / te.sum()).astype(np.float32)
    return np.tensordot(m.astype(np.float32), w, axes=([-1], [0])).astype(np.float32)


def high_pass_field(field_hz, mask, voxel_size, sigma_mm: float = 4.0) -> np.ndarray:
    """The field less its Gaussian-smoothed version inside ``mask`` (0 outside).

    The smoothing is normalised by the mask, ``G * (f m) / G * m``, so that the zeros outside
    the mask do not pull the low-pass down at its edge.

    Parameters
    ----------
    field_hz : (X, Y, Z) array
        Total field (Hz), e.g. the multi-echo fit of the unwrapped phase.
    mask : (X, Y, Z) array
        Where the field is valid.
    voxel_size : 3 floats
        mm.
    sigma_mm : float
        Standard deviation of the Gaussian (mm, isotropic); ``sigma_mm / voxel_size`` voxels
        per axis.

    Returns
    -------
    (X, Y, Z) float32 array, Hz.
    """
    f = np.asarray(field_hz, dtype=np.float32)
    check_volume(f, "field")
    m = check_mask(np.asarray(mask), "mask", f.shape)
    check_finite(f, "field", where=m)
    vs = check_voxel_size(voxel_size)
    if not sigma_mm > 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm!r}")
    sigma = [float(sigma_mm) / v for v in vs]
    w = m.astype(np.float32)
    num = ndi.gaussian_filter(np.where(m, f, 0.0).astype(np.float32), sigma, mode="constant")
    den = ndi.gaussian_filter(w, sigma, mode="constant")
    low = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-6)
    return np.where(m, f - low, 0.0).astype(np.float32)


def phase_mask(phase) -> np.ndarray:
    """Haacke's phase mask for paramagnetic = positive phase: 1 at phi <= 0, 0 at phi >= pi.

    ``g(phi) = clip(1 - phi / pi, 0, 1)`` for ``phi > 0`` and ``1`` otherwise; raise it to a
    power (typically 4) before multiplying the magnitude.

    Parameters
    ----------
    phase : array
        High-passed phase (rad), qsmprep's sign (``+2 pi f TE``).

    Returns
    -------
    float32 array in [0, 1].
    """
    p = np.asarray(phase, dtype=np.float32)
    return np.clip(1.0 - np.maximum(p, 0.0) / np.float32(np.pi), 0.0, 1.0).astype(np.float32)


def swi(
    magnitude,
    field_hz,
    mask,
    voxel_size,
    echo_times: Sequence[float],
    *,
    sigma_mm: float = 4.0,
    power: float = 4.0,
    te: float | None = None,
    combine: str = "rss",
) -> tuple[np.ndarray, np.ndarray]:
    """Susceptibility-weighted image from the echoes' magnitude and the total field.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) or (X, Y, Z) array
        Magnitude of the echoes (last axis), arbitrary units; the whole field of view.
    field_hz : (X, Y, Z) array
        Total field (Hz) fitted to the unwrapped, offset-free phase (qsmprep's sign:
        paramagnetic sources parallel to B0 give a positive field).
    mask : (X, Y, Z) array
        Where the field is valid (the brain, less unreliable voxels); the phase mask is 1
        elsewhere.
    voxel_size : 3 floats
        mm.
    echo_times : sequence of float
        s.
    sigma_mm : float
        Gaussian high-pass (:func:`high_pass_field`), mm.
    power : float
        Exponent of the phase mask (Haacke et al., 2004: 4).
    te : float, optional
        Echo time (s) at which the high-passed field becomes the phase ``2 pi f TE``; default
        the longest echo time.
    combine : {"rss", "te"}
        Magnitude combination (:func:`combine_swi_magnitude`).

    Returns
    -------
    swi, magnitude : (X, Y, Z) float32 arrays
        ``magnitude * phase_mask(2 pi f_hp TE) ** power`` and the combined magnitude.
    """
    te_all = check_echo_times(echo_times)
    mag = combine_swi_magnitude(magnitude, te_all, combine)
    check_same_shape("magnitude", mag, field=np.asarray(field_hz))
    if not power > 0:
        raise ValueError(f"power must be positive, got {power!r}")
    t = float(te_all.max()) if te is None else float(te)
    if not t > 0:
        raise ValueError(f"te must be positive (s), got {te!r}")
    hp = high_pass_field(field_hz, mask, voxel_size, sigma_mm)
    g = phase_mask((2.0 * np.pi * t) * hp) ** np.float32(power)
    return (mag * g).astype(np.float32), mag


def slab_axis(affine) -> int:
    """The array axis whose direction is closest to the world z (superior-inferior) axis."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    cos = np.abs(a[2]) / np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    return int(np.argmax(cos))


def min_intensity_projection(
    volume, affine, slab_mm: float = 16.0, axis: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sliding-window minimum intensity projection over slabs of ``slab_mm``.

    Output slice ``j`` along ``axis`` is the minimum of input slices ``j .. j + n - 1``, with
    ``n = max(1, round(slab_mm / dz))`` slices of thickness ``dz``; only full slabs are kept,
    so the output has ``N - n + 1`` slices (one when ``n >= N``, then ``n = N``). The returned
    affine is the input's moved by ``(n - 1) / 2`` slices along ``axis``: each output voxel sits
    at the centre of its slab, and its shape and affine describe the returned data.

    Parameters
    ----------
    volume : (X, Y, Z) array
    affine : (4, 4) array
        NIfTI affine of ``volume``.
    slab_mm : float
        Slab thickness (mm).
    axis : int, optional
        Projection axis; default :func:`slab_axis` (closest to world z).

    Returns
    -------
    minip : float32 array
    affine : (4, 4) float array
    info : dict
        ``axis``, ``slices`` (n) and ``slab_mm`` (``n * dz``, the thickness used).
    """
    v = np.asarray(volume, dtype=np.float32)
    check_volume(v, "volume")
    aff = np.asarray(affine, dtype=float)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {aff.shape}")
    if not slab_mm > 0:
        raise ValueError(f"slab_mm must be positive, got {slab_mm!r}")
    ax = slab_axis(aff) if axis is None else int(axis)
    if ax not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    dz = float(np.linalg.norm(aff[:3, ax]))
    size = v.shape[ax]
    n = int(min(max(1, round(float(slab_mm) / dz)), size))
    # centred running minimum (O(N)), then the full slabs: out[j] = min(v[j : j + n])
    run = ndi.minimum_filter1d(v, n, axis=ax, mode="nearest")
    start = n // 2
    index = [slice(None)] * 3
    index[ax] = slice(start, start + size - n + 1)
    out = np.ascontiguousarray(run[tuple(index)])
    new = aff.copy()
    new[:3, 3] = aff[:3, 3] + aff[:3, ax] * ((n - 1) / 2.0)
    return out, new, {"axis": ax, "slices": n, "slab_mm": n * dz}


def smwi_mask(chi, threshold: float = 1.0, sign: int = 1) -> np.ndarray:
    """Susceptibility weighting mask (Gho et al., 2014), before the power.

    ``sign=+1`` (paramagnetic): ``1`` for ``chi <= 0``, ``1 - chi / t`` for ``0 < chi < t``,
    ``0`` for ``chi >= t``; ``sign=-1`` (diamagnetic): the same of ``-chi``.

    Parameters
    ----------
    chi : array
        ppm.
    threshold : float
        ``t`` (ppm), where the mask reaches 0.
    sign : {1, -1}
        Paramagnetic or diamagnetic weighting.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive (ppm), got {threshold!r}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    c = sign * np.asarray(chi, dtype=np.float32)
    return np.clip(1.0 - np.maximum(c, 0.0) / np.float32(threshold), 0.0, 1.0).astype(np.float32)


def smwi(
    magnitude, chi, *, threshold: float = 1.0, power: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """Susceptibility-map-weighted images (Gho et al., 2014; Nam et al., 2017).

    Parameters
    ----------
    magnitude : (X, Y, Z) array
        Combined magnitude (:func:`combine_swi_magnitude`).
    chi : (X, Y, Z) array
        Susceptibility (ppm), 0 where it is not defined (there the masks are 1).
    threshold : float
        ppm where the masks reach 0 (:func:`smwi_mask`).
    power : float
        Exponent of the masks.

    Returns
    -------
    para, dia : (X, Y, Z) float32 arrays
        ``magnitude * smwi_mask(chi, t, +1) ** power`` and the same with ``-1``.
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    check_volume(mag, "magnitude")
    c = np.nan_to_num(np.asarray(chi, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    check_same_shape("magnitude", mag, chi=c)
    if not power > 0:
        raise ValueError(f"power must be positive, got {power!r}")
    p = np.float32(power)
    para = mag * smwi_mask(c, threshold, 1) ** p
    dia = mag * smwi_mask(c, threshold, -1) ** p
    return para.astype(np.float32), dia.astype(np.float32)
