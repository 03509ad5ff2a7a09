"""Multi-echo combination: unwrapped phases of several echoes to one total field map in Hz.

Signal model (monopolar readout, after unwrapping):
``phi_n = phi_0 + 2 pi f TE_n``, with ``f`` the field offset in Hz and ``phi_0`` the
echo-independent phase offset. The phase noise of echo n has variance ``sigma^2 / M_n^2``
(``sigma`` the complex noise std, ``M_n`` the magnitude), which sets the optimal weights.
"""

from __future__ import annotations

import numpy as np

from qsmprep.recon._checks import (
    check_echo_times,
    check_finite,
    check_mask,
    check_volume,
)

__all__ = [
    "estimate_noise_std",
    "field_std",
    "fit_field_complex",
    "fit_field_linear",
    "fit_residual",
]


def _check_echoes(phase, magnitude, echo_times, mask):
    check_volume(phase, "phase", ndim=4)
    n = phase.shape[-1]
    te = check_echo_times(echo_times, n)
    if magnitude is not None:
        check_volume(magnitude, "magnitude", ndim=4)
        if magnitude.shape != phase.shape:
            raise ValueError(
                f"magnitude has shape {magnitude.shape} but phase has shape {phase.shape};"
                " give one magnitude image per phase image"
            )
    if mask is not None:
        mask = check_mask(mask, shape=phase.shape[:3])
    check_finite(phase, "phase", where=mask)
    if magnitude is not None:
        check_finite(magnitude, "magnitude", where=mask)
    return te, mask


def estimate_noise_std(magnitude, mask) -> float:
    """Complex noise std ``sigma`` from the magnitude of background (air) voxels.

    Outside the object the magnitude is Rayleigh distributed, whose median is
    ``sigma sqrt(2 ln 2)``; the median over voxels outside the (3-voxel dilated) mask of the
    first echo, divided by ``sqrt(2 ln 2)``, is robust to residual signal (ghosts, fat, neck)
    that a mean of ``M^2`` (the MEDI toolbox's ``calfieldnoise``) would count as noise.

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array
        Magnitude; the first echo is used.
    mask : (X, Y, Z) bool array
        Object (head or brain) mask; its complement is searched for noise.

    Returns
    -------
    sigma : float, in the units of ``magnitude``; NaN when no background voxel is found.
    """
    m = np.asarray(magnitude, dtype=np.float64)
    m = m[..., 0] if m.ndim == 4 else m
    check_volume(m, "magnitude")
    mask = check_mask(mask, shape=m.shape)
    from scipy.ndimage import binary_dilation

    outside = ~binary_dilation(mask, iterations=3)
    bg = m[outside]
    if bg.size < 100:
        return float("nan")
    return float(np.median(bg) / np.sqrt(2.0 * np.log(2.0)))


def fit_field_linear(
    phase,
    magnitude,
    echo_times,
    *,
    mask=None,
    offset: bool | None = None,
    noise_std: float | None = None,
):
    """Weighted least-squares fit of the field (Hz) to unwrapped multi-echo phase.

    Minimises ``sum_n w_n (phi_n - phi_0 - 2 pi f TE_n)^2`` per voxel with ``w_n = M_n^2``
    (inverse phase-noise variance). With ``offset=False``, ``phi_0 = 0`` (use it after
    phase-offset removal when the offset is known to be gone).

    One echo (``E = 1``) has no offset to fit: the field is the closed form
    ``f = phi / (2 pi TE)`` and its std ``sigma / (2 pi M TE)``, the one-echo case of the
    weighted fit (``sigma / M`` is the phase noise std), so the noise map still weights PDF,
    MEDI and weighted TV.

    Parameters
    ----------
    phase : (X, Y, Z, E) array
        Spatially and temporally unwrapped phase (rad); echoes on the last axis.
    magnitude : (X, Y, Z, E) array or None
        Magnitude per echo; None gives equal weights.
    echo_times : E floats
        Echo times in seconds, strictly increasing.
    mask : (X, Y, Z) bool array, optional
        Voxels to fit; the outputs are 0 outside.
    offset : bool, optional
        Fit the echo-independent phase offset ``phi_0`` too. Default (None): with two or more
        echoes, as ``True``; with one echo, as ``False`` (an offset and a field cannot both be
        fitted to one phase; ``True`` with one echo is an error).
    noise_std : float, optional
        Complex noise std ``sigma`` (units of ``magnitude``), e.g. from
        :func:`estimate_noise_std`; scales the returned field std to Hz. Without it, the std
        is returned for ``sigma = 1``.

    Returns
    -------
    field_hz : (X, Y, Z) float32
        Field offset in Hz.
    field_std_hz : (X, Y, Z) float32
        Std of the fitted field, ``sigma / (2 pi sqrt(sum_n M_n^2 (TE_n - TE_w)^2))`` with
        ``TE_w`` the weighted mean echo time (``TE_w = 0`` without offset): the noise map that
        weights PDF, MEDI and weighted TV. Infinite where the magnitude is zero.
    phase_offset : (X, Y, Z) float32
        Fitted ``phi_0`` (rad); zeros when ``offset=False``.

    References
    ----------
    Kressler B, et al. Nonlinear regularization for per voxel estimation of magnetic
    susceptibility distributions from MRI field maps. IEEE TMI 2010;29:273-281 (weighted fit).
    """
    te, mask = _check_echoes(phase, magnitude, echo_times, mask)
    if offset is None:
        offset = te.size >= 2
    elif offset and te.size < 2:
        raise ValueError(
            "one echo cannot give both a field and a phase offset; pass offset=False (or leave"
            " it unset) for one echo"
        )
    shape = phase.shape[:3]
    sel = np.ones(shape, bool) if mask is None else mask
    phi = np.asarray(phase)[sel].astype(np.float64)  # (N, E): only the voxels to fit
    if magnitude is None:
        w = np.ones_like(phi)
    else:
        w = np.asarray(magnitude)[sel].astype(np.float64) ** 2
    sw = w.sum(-1)
    st = w @ te
    stt = w @ te**2
    sp = (w * phi).sum(-1)
    stp = (w * phi) @ te
    with np.errstate(invalid="ignore", divide="ignore"):
        if offset:
            den = sw * stt - st**2
            omega = (sw * stp - st * sp) / den
            phi0 = (sp - omega * st) / sw
            var = sw / den  # variance of omega for sigma = 1
        else:
            omega = stp / stt
            phi0 = np.zeros_like(omega)
            var = 1.0 / stt
        std = np.sqrt(var) * (1.0 if noise_std is None else float(noise_std)) / (2 * np.pi)
    field = np.zeros(shape, np.float32)
    off = np.zeros(shape, np.float32)
    sd = np.full(shape, np.inf, np.float32)
    f = omega / (2 * np.pi)
    field[sel] = np.where(np.isfinite(f), f, 0.0)
    off[sel] = np.where(np.isfinite(phi0), phi0, 0.0)
    sd[sel] = np.where(np.isfinite(std) & (std > 0), std, np.inf)
    return field, sd, off


def field_std(magnitude, echo_times, *, mask=None, noise_std: float | None = None):
    """Std (Hz) of the field that :func:`fit_field_linear` would fit to these echoes.

    The std of the weighted fit depends on the magnitudes and echo times only, not on the
    phase: ``sigma / (2 pi sqrt(sum_n M_n^2 (TE_n - TE_w)^2))`` for two or more echoes (with
    the offset fitted), ``sigma / (2 pi M TE)`` for one. It serves as the noise map of a total
    field that was not fitted here (provided by the user): the noise the field would have had
    had it been fitted from these echoes.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) or (X, Y, Z) array
        Magnitude per echo.
    echo_times : E floats
        s.
    mask : (X, Y, Z) bool array, optional
        Voxels; infinite std outside.
    noise_std : float, optional
        Complex noise std ``sigma``; default 1.

    Returns
    -------
    (X, Y, Z) float32, infinite where the magnitude is zero and outside ``mask``.
    """
    mag = np.asarray(magnitude)
    if mag.ndim == 3:
        mag = mag[..., None]
    _, std, _ = fit_field_linear(
        np.zeros(mag.shape, np.float32), mag, echo_times, mask=mask, noise_std=noise_std
    )
    return std


def fit_residual(phase, magnitude, echo_times, field_hz, phase_offset, *, mask=None):
    """Weighted RMS residual (rad) of the multi-echo phase about a fitted linear model.

    ``r = sqrt(sum_n w_n (phi_n - phi_0 - 2 pi f TE_n)^2 / sum_n w_n)`` with ``w_n = M_n^2``,
    the weights of :func:`fit_field_linear`. Where the phase does not evolve linearly in time
    (unwrapping faults, intravoxel dephasing next to air, bone and the brain edge, partial volume
    of tissues with other frequencies) the field there is not the field of the sources, whatever
    its noise: the residual finds those voxels, the field std map does not.

    Parameters
    ----------
    phase, magnitude : (X, Y, Z, E) arrays
        Unwrapped phase (rad) and magnitude (None: equal weights), as given to the fit.
    echo_times : E floats
        Seconds.
    field_hz, phase_offset : (X, Y, Z) arrays
        The fitted field (Hz) and offset (rad) of :func:`fit_field_linear`.
    mask : (X, Y, Z) bool, optional
        Voxels to evaluate; 0 outside.

    Returns
    -------
    (X, Y, Z) float32, rad; 0 outside the mask and everywhere with fewer than three echoes
    (a field and an offset fit two echoes exactly, a field alone fits one): with one or two
    echoes the residual carries no information.
    """
    te, mask = _check_echoes(phase, magnitude, echo_times, mask)
    shape = phase.shape[:3]
    out = np.zeros(shape, np.float32)
    if te.size < 3:
        return out
    sel = np.ones(shape, bool) if mask is None else mask
    phi = np.asarray(phase)[sel].astype(np.float64)
    w = np.ones_like(phi) if magnitude is None else np.asarray(magnitude)[sel] ** 2.0
    model = np.asarray(phase_offset)[sel][:, None] + 2 * np.pi * np.outer(
        np.asarray(field_hz)[sel], te
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sqrt((w * (phi - model) ** 2).sum(-1) / w.sum(-1))
    out[sel] = np.where(np.isfinite(r), r, 0.0)
    return out


def fit_field_complex(
    magnitude,
    phase,
    echo_times,
    *,
    mask=None,
    init=None,
    max_iter: int = 30,
    tol: float = 1e-4,
):
    """Nonlinear complex fit of field and offset, robust at low SNR (MEDI ``Fit_ppm_complex``).

    Minimises ``sum_n |S_n - M_n exp(i (phi_0 + 2 pi f TE_n))|^2`` per voxel by Gauss-Newton,
    with ``S_n = M_n exp(i phase_n)``, for arbitrary echo times. The residual is periodic in
    the phase, so the fit needs no temporal unwrapping, only an initial field within half a
    period ``1 / (2 dTE)`` of the truth. The result is used as-is (not re-wrapped).

    Parameters
    ----------
    magnitude, phase : (X, Y, Z, E) arrays
        Magnitude and (wrapped or unwrapped) phase (rad) per echo.
    echo_times : E floats
        Seconds, strictly increasing.
    mask : (X, Y, Z) bool, optional
        Voxels to fit; outputs are 0 outside.
    init : (field_hz, phase_offset) pair, optional
        Starting point, e.g. from :func:`fit_field_linear` on unwrapped phase. Default: the
        field from the phase difference of echoes 1 and 2 and the offset extrapolated to TE=0.
    max_iter, tol : int, float
        Stop when the largest update of ``2 pi f dTE`` in the mask is below ``tol`` rad.

    Returns
    -------
    field_hz, field_std_hz, phase_offset : (X, Y, Z) float32 arrays
        As :func:`fit_field_linear` (std for unit complex noise std ``sigma = 1``).
    info : dict
        ``iterations`` and ``max_update`` (rad) of the last iteration.

    References
    ----------
    Liu T, et al. Nonlinear formulation of the magnetic field to source relationship for robust
    quantitative susceptibility mapping. Magn Reson Med 2013;69:467-476.
    """
    te, mask = _check_echoes(phase, magnitude, echo_times, mask)
    if te.size < 2:
        raise ValueError(
            "a complex fit of field and offset needs at least two echoes; use"
            " fit_field_linear for one echo"
        )
    m = np.asarray(magnitude, dtype=np.float64)
    p = np.asarray(phase, dtype=np.float64)
    sel = np.ones(p.shape[:3], bool) if mask is None else mask
    mv, pv = m[sel], p[sel]
    s = mv * np.exp(1j * pv)
    if init is None:
        dphi = np.angle(s[:, 1] * np.conj(s[:, 0]))
        omega = dphi / (te[1] - te[0])
        phi0 = np.angle(s[:, 0] * np.exp(-1j * omega * te[0]))
    else:
        omega = 2 * np.pi * np.asarray(init[0], dtype=np.float64)[sel]
        phi0 = np.asarray(init[1], dtype=np.float64)[sel]
    w = mv**2
    a11 = w.sum(-1)
    a12 = (w * te).sum(-1)
    a22 = (w * te**2).sum(-1)
    det = a11 * a22 - a12**2
    ok = det > 0
    dte = float(np.min(np.diff(te))) if te.size > 1 else float(te[0])
    it, upd = 0, np.inf
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        model = mv * np.exp(1j * (phi0[:, None] + omega[:, None] * te))
        # derivative of the model w.r.t. phi0 is i*model and w.r.t. omega i*TE*model; the
        # Gauss-Newton normal matrix is then [[sum M^2, sum M^2 TE], [., sum M^2 TE^2]].
        r = np.imag(np.conj(model) * (s - model))  # = Re(conj(i model) (s - model))
        g1 = r.sum(-1)
        g2 = (r * te).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            d0 = np.where(ok, (a22 * g1 - a12 * g2) / det, 0.0)
            dw = np.where(ok, (a11 * g2 - a12 * g1) / det, 0.0)
        phi0 += d0
        omega += dw
        upd = float(np.max(np.abs(dw))) * dte if dw.size else 0.0
        if upd < tol:
            break
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(ok, np.sqrt(a11 / det), np.inf) / (2 * np.pi)
    shape = p.shape[:3]
    field = np.zeros(shape, np.float32)
    off = np.zeros(shape, np.float32)
    sd = np.full(shape, np.inf, np.float32)
    field[sel] = omega / (2 * np.pi)
    off[sel] = np.angle(np.exp(1j * phi0))
    sd[sel] = std
    return field, sd, off, {"iterations": it, "max_update": upd}
