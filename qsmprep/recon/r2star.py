"""R2* and T2* maps from the multi-echo magnitude: ARLO, nonlinear and log-linear fits.

Signal model (per voxel): ``S_n = S0 exp(-R2* TE_n)`` (+ noise), TE in s, R2* in 1/s, S0 in
the units of the magnitude. Three estimators, all vectorised over voxels:

- :func:`r2star_arlo`: Auto-Regression on Linear Operations (ARLO; Pei et al. 2015) for three
  or more equally spaced echoes. The integral of the signal over two echo spacings equals
  ``(S_j - S_{j+2}) / R2*``; Simpson's rule gives it from the three echoes, so one linear
  regression gives R2* in closed form. Simpson's rule is not exact for an exponential: on
  noise-free data R2* comes out low by about ``(R2* dTE)^4 / 180`` (relative), e.g. 6e-7 at
  R2* = 20 1/s, dTE = 5 ms and 3e-4 at R2* = 100 1/s, dTE = 5 ms.
- :func:`r2star_nlls`: least squares of ``S_n - S0 exp(-R2* TE_n)`` by Levenberg-Marquardt
  on all voxels at once (2x2 normal equations per voxel), started from the weighted
  log-linear fit; any echo spacing.
- :func:`r2star_loglinear`: weighted linear fit of ``ln S_n`` (weights ``S_n^2``, the inverse
  variance of ``ln S`` at high SNR); exact on noise-free data, the closed form for two echoes.

:func:`fit_r2star` picks one (``method="auto"``: ARLO for three or more equally spaced echoes,
NLLS for unequal spacing, log-linear for two echoes), computes S0 and T2*, clips to a
physical range and counts what was clipped. One echo has no R2*.

Physical range: R2* in [0, 1000] 1/s (:data:`R2STAR_RANGE`; T2* >= 1 ms, beyond the
shortest T2* a GRE brain scan resolves); T2* = 1 / R2* with R2* below 1 1/s (T2* above 1 s,
where the decay is within the noise, e.g. CSF) set to 1 s (:data:`T2STAR_MAX`).

References
----------
Pei M, Nguyen TD, Thimmappa ND, et al. Algorithm for fast monoexponential fitting based on
Auto-Regression on Linear Operations (ARLO) of data. Magn Reson Med 2015;73:843-850.
"""

from __future__ import annotations

import numpy as np

from qsmprep import methods as _registry
from qsmprep.recon._checks import check_echo_times, check_finite, check_mask, check_volume

__all__ = [
    "METHODS",
    "R2STAR_RANGE",
    "T2STAR_MAX",
    "echoes_equally_spaced",
    "fit_r2star",
    "fit_s0",
    "r2star_arlo",
    "r2star_loglinear",
    "r2star_nlls",
    "resolve_method",
]

METHODS = ("auto", *_registry.names("r2star"))
"""Choices of :func:`fit_r2star`'s ``method``: ``"auto"`` (:func:`resolve_method`) and the
registry's R2* estimators (:mod:`qsmprep.methods`) at import; those registered later are
accepted too."""

R2STAR_RANGE = (0.0, 1000.0)
"""Physical range of R2* (1/s) the maps are clipped to."""

T2STAR_MAX = 1.0
"""Largest T2* (s) written: where R2* < 1 / T2STAR_MAX, T2* is set to this."""

_SPACING_RTOL = 1e-3


def echoes_equally_spaced(echo_times, rtol: float = _SPACING_RTOL) -> bool:
    """Whether the echo spacings agree within ``rtol`` of the mean spacing (two or more echoes).

    Parameters
    ----------
    echo_times : sequence of float
        s, strictly increasing.
    rtol : float
        Relative tolerance on each spacing.

    Returns
    -------
    bool
    """
    te = check_echo_times(echo_times)
    if te.size < 2:
        return False
    d = np.diff(te)
    return bool(np.all(np.abs(d - d.mean()) <= rtol * d.mean()))


def resolve_method(method: str, echo_times) -> str:
    """The estimator ``method="auto"`` stands for, and a check that the others apply.

    ``"auto"``: ``"arlo"`` for three or more equally spaced echoes, ``"nlls"`` for three or
    more unequally spaced ones, ``"loglinear"`` for two. ARLO needs three equally spaced
    echoes; every method needs two echoes.

    Raises
    ------
    ValueError
        One echo, an unknown method, or ARLO on unsuitable echoes.
    """
    te = check_echo_times(echo_times)
    choices = ("auto", *_registry.names("r2star"))
    if method not in choices:
        raise ValueError(f"R2* method must be one of {choices}, got {method!r}")
    if te.size < 2:
        raise ValueError("one echo has no R2*: a mono-exponential fit needs two or more echoes")
    if method == "auto":
        if te.size == 2:
            return "loglinear"
        return "arlo" if echoes_equally_spaced(te) else "nlls"
    if method == "arlo" and (te.size < 3 or not echoes_equally_spaced(te)):
        raise ValueError(
            f"ARLO needs three or more equally spaced echoes, got TE {te.tolist()} s; use"
            " method 'nlls' or 'auto'"
        )
    return method


def _prepare(magnitude, echo_times, mask, min_echoes=2):
    check_volume(magnitude, "magnitude", ndim=4)
    te = check_echo_times(echo_times, magnitude.shape[-1])
    if te.size < min_echoes:
        raise ValueError(
            f"this R2* fit needs {min_echoes} or more echoes, got {te.size}"
            + ("; one echo has no R2*" if te.size == 1 else "")
        )
    if mask is None:
        sel = np.ones(magnitude.shape[:3], bool)
    else:
        sel = check_mask(mask, shape=magnitude.shape[:3])
    check_finite(magnitude, "magnitude", where=sel)
    y = np.asarray(magnitude)[sel].astype(np.float64)  # (N, E): only the voxels to fit
    return y, te, sel


def _to_volume(values, sel, dtype=np.float64):
    out = np.zeros(sel.shape, dtype)
    out[sel] = values
    return out


def _arlo(y, te):
    """ARLO R2* (1/s) of (N, E) signals at equally spaced ``te``; NaN where undefined."""
    beta = (te[1] - te[0]) / 3.0
    s = beta * (y[:, :-2] + 4.0 * y[:, 1:-1] + y[:, 2:])  # Simpson integral over 2 dTE
    d = y[:, :-2] - y[:, 2:]  # = integral * R2*
    ss = np.einsum("ij,ij->i", s, s)
    sd = np.einsum("ij,ij->i", s, d)
    dd = np.einsum("ij,ij->i", d, d)
    # Pei et al. 2015: T2* = (sum s^2 + beta sum s d) / (sum s d + beta sum d^2)
    num, den = sd + beta * dd, ss + beta * sd
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _s0(y, te, r2):
    """Least-squares S0 of (N, E) signals given R2*: ``sum S e / sum e^2``, e = exp(-R2* TE)."""
    r = np.where(np.isfinite(r2), r2, 0.0)
    e = np.exp(-r[:, None] * te[None, :])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s0 = np.einsum("ij,ij->i", y, e) / np.einsum("ij,ij->i", e, e)
    return np.where(np.isfinite(s0), s0, 0.0)


def _loglinear(y, te, weighted=True):
    """Weighted fit of ``ln S = ln S0 - R2* TE``; (R2*, S0), NaN where no echo has signal."""
    pos = y > 0
    logy = np.log(np.where(pos, y, 1.0))
    w = np.where(pos, y * y, 0.0) if weighted else pos.astype(np.float64)
    # weighted sums by matrix products (BLAS); TE is centred first against cancellation
    tc = te - te.mean()
    sw, swt, swtt = w.sum(1), w @ tc, w @ (tc * tc)
    wl = w * logy
    swl, swtl = wl.sum(1), wl @ tc
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = sw * swtt - swt * swt
        slope = (sw * swtl - swt * swl) / den
        r2 = np.where((den > 0) & np.isfinite(slope), -slope, np.nan)
        ln_s0 = (swl - slope * swt) / sw + r2 * te.mean()
        s0 = np.exp(np.clip(ln_s0, -700.0, 700.0))
    return r2, np.where(np.isfinite(r2), s0, 0.0)


def _nlls(y, te, r2, s0, max_iter, tol):
    """Levenberg-Marquardt on ``sum_n (S_n - S0 exp(-R2* TE_n))^2`` for all voxels at once.

    Each iteration solves the 2x2 damped normal equations of every active voxel in closed
    form; a voxel leaves the active set when its R2* step is below ``tol`` (relative to
    ``|R2*| + 1 1/s``). Returns (R2*, S0, iterations used, voxels not converged).
    """
    r2 = np.where(np.isfinite(r2), r2, 0.0)
    s0 = np.where(np.isfinite(s0), s0, 0.0)
    lam = np.full(r2.shape, 1e-3)
    powers = np.stack([np.ones_like(te), te, te * te], axis=1)  # (E, 3): sums by BLAS
    active = np.flatnonzero(np.any(y != 0, axis=1))
    full = active.size == y.shape[0]  # first pass on views, not copies
    ya = y if full else y[active]
    e = np.exp(-r2[active, None] * te[None, :])
    res = ya - s0[active, None] * e
    c = np.einsum("ij,ij->i", res, res)
    it = 0
    while it < max_iter and active.size:
        it += 1
        a, r, la = s0[active], r2[active], lam[active]
        h = (e * e) @ powers  # sum e^2, sum t e^2, sum t^2 e^2
        g = (e * res) @ powers[:, :2]  # sum e res, sum t e res
        h11, h12, h22 = h[:, 0], -a * h[:, 1], a * a * h[:, 2]
        g1, g2 = g[:, 0], -a * g[:, 1]
        d11, d22 = h11 * (1.0 + la), h22 * (1.0 + la)
        with np.errstate(divide="ignore", invalid="ignore"):
            det = d11 * d22 - h12 * h12
            da = (d22 * g1 - h12 * g2) / det
            dr = (d11 * g2 - h12 * g1) / det
        ok = np.isfinite(da) & np.isfinite(dr)
        a_new, r_new = a + np.where(ok, da, 0.0), r + np.where(ok, dr, 0.0)
        e_new = np.exp(-r_new[:, None] * te[None, :])
        res_new = ya - a_new[:, None] * e_new
        c_new = np.einsum("ij,ij->i", res_new, res_new)
        better = ok & (c_new <= c)
        s0[active] = np.where(better, a_new, a)
        r2[active] = np.where(better, r_new, r)
        lam[active] = np.where(better, la * 0.1, la * 10.0)
        done = (better & (np.abs(dr) <= tol * (np.abs(r_new) + 1.0))) | ~ok | (la > 1e12)
        keep = ~done & ~better  # rejected steps keep their e, res and cost
        e = np.where(keep[:, None], e, e_new)[~done]
        res = np.where(keep[:, None], res, res_new)[~done]
        c = np.where(keep, c, c_new)[~done]
        active, ya = active[~done], ya[~done]
    return r2, s0, it, int(active.size)


def r2star_arlo(magnitude, echo_times, *, mask=None):
    """R2* by ARLO (Pei et al. 2015) from three or more equally spaced echoes.

    With ``dTE`` the echo spacing, ``s_j = dTE/3 (S_j + 4 S_{j+1} + S_{j+2})`` (Simpson's rule
    for the integral of the signal from ``TE_j`` to ``TE_{j+2}``) and ``d_j = S_j - S_{j+2}``
    (which equals that integral times R2* for a mono-exponential),
    ``T2* = (sum s^2 + dTE/3 sum s d) / (sum s d + dTE/3 sum d^2)`` over ``j``, and
    ``R2* = 1 / T2*``. Simpson's rule biases R2* low by about ``(R2* dTE)^4 / 180``
    (relative) on noise-free data.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        Magnitude of each echo, echoes on the last axis (any units).
    echo_times : E floats
        s, strictly increasing and equally spaced (``E >= 3``).
    mask : (X, Y, Z) bool array, optional
        Voxels to fit; the output is 0 outside.

    Returns
    -------
    r2star : (X, Y, Z) float64
        1/s, unclipped; NaN where undefined (no decay signal: all sums zero).
    """
    y, te, sel = _prepare(magnitude, echo_times, mask, min_echoes=3)
    resolve_method("arlo", te)
    return _to_volume(_arlo(y, te), sel)


def r2star_loglinear(magnitude, echo_times, *, mask=None, weighted: bool = True):
    """R2* and S0 by a (weighted) linear fit of ``ln S_n = ln S0 - R2* TE_n``.

    Weights ``S_n^2`` (the inverse variance of ``ln S`` at high SNR) with ``weighted``, else
    equal; echoes with ``S_n <= 0`` get weight 0. Exact on noise-free data; with two echoes
    it is ``ln(S_1 / S_2) / (TE_2 - TE_1)``.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        E >= 2.
    echo_times : E floats
        s, strictly increasing.
    mask : (X, Y, Z) bool array, optional
        Voxels to fit; the outputs are 0 outside.
    weighted : bool
        Weights ``S_n^2`` (default) or equal weights.

    Returns
    -------
    r2star : (X, Y, Z) float64
        1/s, unclipped; NaN where fewer than two echoes have signal.
    s0 : (X, Y, Z) float64
        Units of ``magnitude``; 0 where R2* is NaN.
    """
    y, te, sel = _prepare(magnitude, echo_times, mask)
    r2, s0 = _loglinear(y, te, weighted)
    return _to_volume(r2, sel), _to_volume(s0, sel)


def r2star_nlls(
    magnitude,
    echo_times,
    *,
    mask=None,
    max_iter: int = 30,
    tol: float = 1e-5,
):
    """R2* and S0 by nonlinear least squares of ``S_n - S0 exp(-R2* TE_n)`` (any spacing).

    Levenberg-Marquardt with Marquardt's diagonal damping, run on every voxel at once (the
    2x2 normal equations solved in closed form), started from the weighted log-linear fit;
    a step is kept only where it lowers the voxel's residual.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        E >= 2.
    echo_times : E floats
        s, strictly increasing.
    mask : (X, Y, Z) bool array, optional
        Voxels to fit; the outputs are 0 outside.
    max_iter : int
        Iterations at most.
    tol : float
        A voxel has converged when its R2* step is below ``tol (|R2*| + 1 1/s)``.

    Returns
    -------
    r2star : (X, Y, Z) float64
        1/s, unclipped (0 where every echo is 0).
    s0 : (X, Y, Z) float64
        Units of ``magnitude``.
    info : dict
        ``iterations`` (used) and ``not_converged`` (voxels still moving at ``max_iter``).
    """
    y, te, sel = _prepare(magnitude, echo_times, mask)
    r2, s0 = _loglinear(y, te, True)
    r2, s0, it, left = _nlls(y, te, r2, s0, int(max_iter), float(tol))
    return _to_volume(r2, sel), _to_volume(s0, sel), {"iterations": it, "not_converged": left}


def fit_s0(magnitude, echo_times, r2star, *, mask=None):
    """Least-squares S0 given R2*: ``sum_n S_n e_n / sum_n e_n^2``, ``e_n = exp(-R2* TE_n)``.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
    echo_times : E floats
        s.
    r2star : (X, Y, Z) array
        1/s; NaN is taken as 0.
    mask : (X, Y, Z) bool array, optional
        Voxels to fit; the output is 0 outside.

    Returns
    -------
    s0 : (X, Y, Z) float64
        Units of ``magnitude``.
    """
    y, te, sel = _prepare(magnitude, echo_times, mask, min_echoes=1)
    r2 = np.asarray(r2star, np.float64)
    if r2.shape != sel.shape:
        raise ValueError(f"r2star has shape {r2.shape} but the magnitude {sel.shape}")
    return _to_volume(_s0(y, te, r2[sel]), sel)


def fit_r2star(
    magnitude,
    echo_times,
    *,
    mask=None,
    method: str = "auto",
    r2_range: tuple[float, float] = R2STAR_RANGE,
    t2_max: float = T2STAR_MAX,
    max_iter: int = 30,
):
    """R2*, T2* and S0 maps of multi-echo magnitude data, clipped to a physical range.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        Magnitude of each echo, echoes on the last axis; E >= 2.
    echo_times : E floats
        s, strictly increasing.
    mask : (X, Y, Z) bool array, optional
        Voxels to fit (e.g. the brain mask); the maps are 0 outside.
    method : str
        ``"auto"`` or a registered R2* estimator (:mod:`qsmprep.methods`): ``"arlo"``,
        ``"nlls"``, ``"loglinear"`` (:func:`resolve_method`: ``"auto"`` is ARLO for three or
        more equally spaced echoes, NLLS for unequal spacing, log-linear for two echoes). Its
        function is called as ``f(magnitude, echo_times, mask=mask)`` (with ``max_iter`` when
        its record has that parameter) and returns R2* or a tuple ``(R2*, S0[, info])``.
    r2_range : (float, float)
        R2* (1/s) is clipped to this range (default :data:`R2STAR_RANGE`).
    t2_max : float
        T2* (s) = 1 / R2*, at most ``t2_max`` (where R2* < 1 / t2_max).
    max_iter : int
        Iterations of an iterative estimator (NLLS).

    Returns
    -------
    r2star : (X, Y, Z) float32
        1/s, in ``r2_range`` inside the mask, 0 outside.
    t2star : (X, Y, Z) float32
        s, in ``[1 / r2_range[1], t2_max]`` inside the mask, 0 outside.
    s0 : (X, Y, Z) float32
        Least-squares S0 for the clipped R2* (units of ``magnitude``), 0 outside.
    info : dict
        ``method`` (used), ``voxels`` (fitted), ``not_fitted`` (R2* undefined, e.g. no
        signal: set to 0), ``clipped_low``/``clipped_high`` (R2* outside ``r2_range``),
        ``t2star_capped`` (T2* set to ``t2_max``), ``r2star_range``, ``t2star_max``, and
        for NLLS ``iterations`` and ``not_converged``.
    """
    lo, hi = (float(v) for v in r2_range)
    if not (0.0 <= lo < hi and np.isfinite(hi)):
        raise ValueError(f"r2_range must be 0 <= low < high < inf (1/s), got {r2_range!r}")
    if not t2_max > 0:
        raise ValueError(f"t2_max must be positive (s), got {t2_max!r}")
    check_volume(magnitude, "magnitude", ndim=4)
    te = check_echo_times(echo_times, magnitude.shape[-1])
    used = resolve_method(method, te)
    y, te, sel = _prepare(magnitude, te, mask)
    info: dict = {"method": used}
    kw = {"max_iter": max_iter} if _registry.get(used).parameter("max_iter") else {}
    out = _registry.resolve(used)(magnitude, te, mask=mask, **kw)
    if isinstance(out, tuple):
        out, extra = out[0], out[-1]
        if isinstance(extra, dict):
            info.update(extra)
    r2 = np.asarray(out, dtype=np.float64)[sel]
    bad = ~np.isfinite(r2)
    low, high = (r2 < lo) & ~bad, (r2 > hi) & ~bad
    r2 = np.clip(np.where(bad, lo, r2), lo, hi)
    s0 = _s0(y, te, r2)
    capped = r2 < 1.0 / t2_max
    with np.errstate(divide="ignore"):
        t2 = np.where(capped, t2_max, 1.0 / np.maximum(r2, 1.0 / t2_max))
    info.update(
        voxels=int(r2.size),
        not_fitted=int(bad.sum()),
        clipped_low=int(low.sum()),
        clipped_high=int(high.sum()),
        t2star_capped=int(capped.sum()),
        r2star_range=[lo, hi],
        t2star_max=float(t2_max),
    )
    return (
        _to_volume(r2, sel, np.float32),
        _to_volume(t2, sel, np.float32),
        _to_volume(s0, sel, np.float32),
        info,
    )
