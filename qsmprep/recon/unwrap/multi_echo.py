"""Multi-echo unwrapping: phase-offset removal (MCPC-3D-S) and the registered methods.

:func:`unwrap_multi_echo` removes the phase offset (:func:`remove_phase_offset`), then runs the
unwrapping method of the registry (:mod:`qsmprep.methods`, stage ``unwrap``):
:func:`unwrap_echoes_quality` (ROMEO) or :func:`unwrap_echoes_laplacian`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qsmprep import methods as _registry
from qsmprep.recon._backend import to_numpy
from qsmprep.recon._checks import (
    check_echo_times,
    check_finite,
    check_volume,
    check_voxel_size,
)
from qsmprep.recon.mask import largest_component, robust_threshold
from qsmprep.recon.unwrap.laplacian import unwrap_laplacian
from qsmprep.recon.unwrap.phase import TWO_PI, as_mask, wrap_phase
from qsmprep.recon.unwrap.quality import unwrap_quality_guided

__all__ = [
    "remove_phase_offset",
    "unwrap_echoes_laplacian",
    "unwrap_echoes_quality",
    "unwrap_multi_echo",
]


def _check_multi_echo(phase, magnitude, echo_times, mask=None):
    check_volume(phase, "phase", ndim=4)
    check_volume(magnitude, "magnitude", ndim=4)
    if tuple(magnitude.shape) != tuple(phase.shape):
        raise ValueError(
            f"magnitude has shape {tuple(magnitude.shape)} but phase has shape"
            f" {tuple(phase.shape)}; give one magnitude per phase echo on the same grid"
        )
    te = check_echo_times(echo_times, phase.shape[-1])
    m = None if mask is None else as_mask(mask, tuple(phase.shape[:3]))
    check_finite(phase, "phase", where=m)
    check_finite(magnitude, "magnitude", where=m)
    p = np.asarray(to_numpy(phase), dtype=np.float32)
    mag = np.asarray(to_numpy(magnitude), dtype=np.float32)
    return p, mag, te, m


def _smooth_phase(phi, weight, sigma_vox):
    """Phase-aware Gaussian smoothing: angle of the Gaussian-filtered ``weight exp(i phi)``.

    Computed on the bounding box of ``weight > 0`` grown by the kernel support (exact: the
    kernel is truncated at 3 sigma); 0 outside it.
    """
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (3,))
    nz = np.nonzero(weight)
    out = np.zeros(phi.shape, dtype=np.float32)
    if nz[0].size == 0:
        return out
    box = tuple(
        slice(max(int(c.min()) - r, 0), int(c.max()) + r + 1)
        for c, r in zip(nz, np.ceil(3.0 * sig).astype(int) + 1, strict=True)
    )
    w = weight[box].astype(np.float32)
    ph = phi[box]
    re = ndi.gaussian_filter(w * np.cos(ph), sig, mode="constant", truncate=3.0)
    im = ndi.gaussian_filter(w * np.sin(ph), sig, mode="constant", truncate=3.0)
    out[box] = np.arctan2(im, re)
    return out


def remove_phase_offset(
    phase,
    magnitude,
    echo_times,
    *,
    mask=None,
    voxel_size=None,
    sigma_mm: float | tuple[float, float, float] = 6.0,
    n_refine: int = 1,
    echoes: tuple[int, int] = (0, 1),
):
    """Remove the echo-independent phase offset phi0 of coil-combined multi-echo data.

    MCPC-3D-S with one "coil" (the coil-combined image), for monopolar echoes
    ``phi_n = phi0 + 2 pi df TE_n``:

    1. Hermitian product of echoes e1, e2: ``H = S_e2 conj(S_e1)``,
       ``dphi = angle(H) = 2 pi df (TE_e2 - TE_e1)`` (wrapped);
    2. unwrap ``dphi`` (:func:`unwrap_quality_guided`, ROMEO weights with magnitude
       ``sqrt|H|``) inside ``mask``;
    3. phase evolution up to TE_e1: ``TE_e1 / (TE_e2 - TE_e1) dphi``;
    4. ``phi0 = wrap(phi_e1 - TE_e1 / (TE_e2 - TE_e1) dphi)``, smoothed with a phase-aware
       Gaussian (``sigma_mm``): the angle of the filtered ``|S_e1| mask exp(i phi0)``. The
       one-sided window at the mask edge biases a sloped phi0; ``n_refine`` residual passes
       (smooth ``wrap(phi0_raw - phi0_smooth)`` and add it back) reduce that bias (on the
       test phantom, from 0.11 to 0.05 rad at the brain edge for sigma 6 mm);
    5. ``phi_n <- wrap(phi_n - phi0)`` for every echo.

    Parameters
    ----------
    phase : (X, Y, Z, E) array
        Wrapped phase (rad) of E >= 2 echoes.
    magnitude : (X, Y, Z, E) array
        Magnitude of the same echoes.
    echo_times : E floats
        Echo times (s), strictly increasing.
    mask : (X, Y, Z) bool array, optional
        Where ``dphi`` is unwrapped and ``phi0`` estimated; default a robust threshold
        (:func:`~qsmprep.recon.mask.robust_threshold`) of ``sqrt|H|``, holes filled, largest
        component. The
        head (brain and scalp) is a good choice: a larger support gives a better-conditioned
        smoothing.
    voxel_size : float or 3 floats, optional
        mm; default 1 mm isotropic (then ``sigma_mm`` is in voxels).
    sigma_mm : float or 3 floats
        Gaussian width (mm) for phi0 (MCPC-3D-S uses [10, 10, 5] voxels at ~1 mm per coil;
        the combined image's phi0 is estimated with less noise amplification, so a smaller
        width with less edge bias is the default).
    n_refine : int
        Residual smoothing passes against the edge bias (0 = plain MCPC-3D-S smoothing).
    echoes : 2 ints
        The two (0-based) echoes of the Hermitian product.

    Returns
    -------
    corrected : (X, Y, Z, E) float32 array, ``wrap(phi_n - phi0)``.
    phi0 : (X, Y, Z) float32 array, the smoothed offset (rad, wrapped).

    Reference: Eckstein K, Dymerska B, Bachrata B, Bogner W, Poljanc K, Trattnig S, Robinson
    SD. Computationally efficient combination of multi-channel phase data from multi-echo
    acquisitions (ASPIRE). Magn Reson Med 2018;79:2996-3006.
    """
    p, mag, te, m = _check_multi_echo(phase, magnitude, echo_times, mask)
    if p.shape[-1] < 2:
        raise ValueError("remove_phase_offset needs at least 2 echoes (phase[..., E], E >= 2)")
    e1, e2 = (int(e) for e in echoes)
    if not (0 <= e1 < e2 < p.shape[-1]):
        raise ValueError(f"echoes must be two increasing echo indices, got {echoes!r}")
    vs = np.asarray(check_voxel_size(1.0 if voxel_size is None else voxel_size))
    sig = np.broadcast_to(np.asarray(sigma_mm, dtype=float), (3,))
    if int(n_refine) < 0:
        raise ValueError(f"n_refine must be >= 0, got {n_refine!r}")
    if np.any(sig <= 0):
        raise ValueError(f"sigma_mm must be positive (mm), got {sigma_mm!r}")

    h = mag[..., e2] * mag[..., e1] * np.exp(1j * (p[..., e2] - p[..., e1]).astype(np.float64))
    weight = np.sqrt(np.abs(h))
    if m is None:
        m = largest_component(ndi.binary_fill_holes(weight > robust_threshold(weight)))
        if not m.any():
            raise ValueError("no signal found for the phase-offset estimate; give a mask")
    dphi = unwrap_quality_guided(
        np.angle(h), mask=m, magnitude=weight, voxel_size=tuple(vs), method="romeo"
    )
    evolution = te[e1] / (te[e2] - te[e1]) * dphi
    raw = wrap_phase(p[..., e1] - evolution)
    weight = mag[..., e1] * m
    phi0 = _smooth_phase(raw, weight, sig / vs)
    for _ in range(n_refine):
        phi0 = wrap_phase(phi0 + _smooth_phase(wrap_phase(raw - phi0), weight, sig / vs))
    phi0 = phi0.astype(np.float32)
    corrected = wrap_phase(p - phi0[..., None])
    return corrected, phi0


def unwrap_multi_echo(
    phase,
    magnitude,
    echo_times,
    *,
    mask,
    method: str = "quality",
    remove_offset: bool | None = None,
    voxel_size=None,
    sigma_mm: float | tuple[float, float, float] = 6.0,
    offset_mask=None,
    device: str | None = "cpu",
    **params,
) -> np.ndarray:
    """Unwrap multi-echo GRE phase (echoes last) inside a brain mask.

    1. (``remove_offset``) phase offset removal with :func:`remove_phase_offset`, so that
       ``phi_n = 2 pi df TE_n`` (needed for the TE scaling below). With one echo the offset
       cannot be told apart from the field and is left in: the echo's phase is
       ``phi0 + 2 pi df TE``, and ``phi0 / (2 pi TE)`` stays in the field (its smooth,
       harmonic part goes with the background field; the rest is an error of single-echo
       QSM that no method removes without a second echo);
    2. the unwrapping method ``method``, a record of stage ``unwrap`` in
       :mod:`qsmprep.methods` whose function is called as
       ``f(phase, magnitude, echo_times, mask=mask, voxel_size=voxel_size, device=device,
       **params)`` on the wrapped, offset-free phase: ``"quality"``
       (:func:`unwrap_echoes_quality`, ROMEO multi-echo: region growing in echo 1, temporal
       unwrapping of the later echoes; congruent with its wrapped input) or ``"laplacian"``
       (:func:`unwrap_echoes_laplacian`: every echo by the Laplacian method; not congruent,
       each echo differs from the truth by a smooth harmonic function).

    Parameters
    ----------
    phase, magnitude : (X, Y, Z, E) arrays
        Wrapped phase (rad) and magnitude.
    echo_times : E floats
        Echo times (s), strictly increasing.
    mask : (X, Y, Z) bool array
        Brain mask; the output is 0 outside it.
    method : str
        A registered unwrapping method: ``"quality"`` or ``"laplacian"`` (or one registered
        later).
    remove_offset : bool, optional
        Estimate and remove phi0 first (needs E >= 2). Set False for offset-free data.
        Default (None): remove it when there are two or more echoes, skip it for one echo;
        True with one echo is an error.
    voxel_size : float or 3 floats, optional
        mm; required for ``method="laplacian"``, used for ``sigma_mm`` (default 1 mm).
    sigma_mm : float or 3 floats
        Smoothing of the phase offset (see :func:`remove_phase_offset`).
    offset_mask : (X, Y, Z) bool array, optional
        Support of the offset estimate (default: robust threshold of the echo-1/2 signal).
    device : str
        Backend of the method (the Laplacian method's FFTs).
    **params
        Keyword arguments of the method's function.

    Returns
    -------
    (X, Y, Z, E) float32 array: unwrapped phase (rad) of every echo with the offset removed;
    ``phase / (2 pi TE_n)`` is the total field in Hz.

    References
    ----------
    Dymerska B, et al. ROMEO. Magn Reson Med 2021;85:2294-2308. Eckstein K, et al. ASPIRE /
    MCPC-3D-S. Magn Reson Med 2018;79:2996-3006. Schofield MA, Zhu Y. Opt Lett
    2003;28:1194-1196.
    """
    if mask is None:
        raise ValueError("mask is required: give the brain mask (X, Y, Z)")
    p, mag, te, m = _check_multi_echo(phase, magnitude, echo_times, mask)
    n_echo = p.shape[-1]
    _registry.get(method, "unwrap")
    unwrap_echoes = _registry.resolve(method)
    vs = check_voxel_size(1.0 if voxel_size is None else voxel_size)
    if remove_offset is None:
        remove_offset = n_echo >= 2
    if remove_offset:
        if n_echo < 2:
            raise ValueError(
                "phase-offset removal needs >= 2 echoes; pass remove_offset=False (or leave"
                " it unset) for one echo"
            )
        p, _ = remove_phase_offset(p, mag, te, mask=offset_mask, voxel_size=vs, sigma_mm=sigma_mm)
    else:
        p = wrap_phase(p)
    out = np.asarray(
        unwrap_echoes(p, mag, te, mask=m, voxel_size=voxel_size, device=device, **params),
        dtype=np.float32,
    )
    out[~m] = 0.0
    return out


def unwrap_echoes_quality(phase, magnitude, echo_times, *, mask, voxel_size=None, device="cpu"):
    """ROMEO multi-echo unwrapping of wrapped, offset-free phase (the method ``quality``).

    Echo 1 is unwrapped spatially by :func:`unwrap_quality_guided` (ROMEO weights: magnitude
    and, with >= 2 echoes, the phase-gradient coherence of echo 2); every later echo is then
    unwrapped temporally against the previous one,
    ``phi_n <- phi_n - 2 pi round((phi_n - phi_{n-1} TE_n / TE_{n-1}) / 2 pi)``. Exact where the
    prediction error is below pi (``|2 pi df (TE_n - TE_{n-1})|`` plus noise and offset
    residuals), so each echo is congruent with its wrapped input. Called by
    :func:`unwrap_multi_echo`, which removes the offset first.

    Parameters
    ----------
    phase, magnitude : (X, Y, Z, E) arrays
        Wrapped phase (rad), offset removed, and magnitude.
    echo_times : E floats
        s.
    mask : (X, Y, Z) bool array
    voxel_size : float or 3 floats, optional
        mm (default 1 mm).
    device : str
        Unused: the region growing runs on the CPU.

    Returns
    -------
    (X, Y, Z, E) float32 array, 0 outside the mask.
    """
    p, mag = np.asarray(to_numpy(phase)), np.asarray(to_numpy(magnitude))
    te = check_echo_times(echo_times, p.shape[-1])
    m = as_mask(mask, tuple(p.shape[:3]))
    vs = check_voxel_size(1.0 if voxel_size is None else voxel_size)
    n_echo = p.shape[-1]
    out = np.zeros(p.shape, dtype=np.float32)
    kw = {}
    if n_echo >= 2:
        kw = {"phase2": p[..., 1], "echo_times": (te[0], te[1])}
    u1 = unwrap_quality_guided(
        p[..., 0], mask=m, magnitude=mag[..., 0], method="romeo", voxel_size=vs, **kw
    )
    pm = p[m].astype(np.float64)
    um = np.empty_like(pm)
    um[:, 0] = u1[m]
    for n in range(1, n_echo):
        pred = um[:, n - 1] * (te[n] / te[n - 1])
        um[:, n] = pm[:, n] - TWO_PI * np.round((pm[:, n] - pred) / TWO_PI)
    out[m] = um
    return out


def unwrap_echoes_laplacian(
    phase, magnitude, echo_times, *, mask, voxel_size=None, device: str | None = "cpu"
):
    """Laplacian unwrapping of every echo of wrapped phase (the method ``laplacian``).

    :func:`unwrap_laplacian` on each echo, then the 2 pi k of each echo's constant set
    against the previous echo (median of the temporal rule of
    :func:`unwrap_echoes_quality`). Not congruent: each echo differs from the truth by a
    smooth harmonic function. Called by :func:`unwrap_multi_echo`, which removes the offset
    first.

    Parameters
    ----------
    phase, magnitude : (X, Y, Z, E) arrays
        Wrapped phase (rad), offset removed, and magnitude (unused).
    echo_times : E floats
        s.
    mask : (X, Y, Z) bool array
    voxel_size : float or 3 floats
        mm (required).
    device : str
        Backend of the FFTs.

    Returns
    -------
    (X, Y, Z, E) float32 array, 0 outside the mask.
    """
    if voxel_size is None:
        raise ValueError("voxel_size (mm) is required for method='laplacian'")
    p = np.asarray(to_numpy(phase))
    te = check_echo_times(echo_times, p.shape[-1])
    m = as_mask(mask, tuple(p.shape[:3]))
    vs = check_voxel_size(voxel_size)
    out = np.zeros(p.shape, dtype=np.float32)
    for n in range(p.shape[-1]):
        out[..., n] = unwrap_laplacian(p[..., n], vs, mask=m, device=device)
        if n:
            pred = out[..., n - 1] * (te[n] / te[n - 1])
            k = np.round(np.median((out[..., n] - pred)[m]) / TWO_PI)
            out[..., n] -= TWO_PI * k
    out[~m] = 0.0
    return out
