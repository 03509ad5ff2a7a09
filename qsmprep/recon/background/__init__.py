"""Background field removal: SHARP, V-SHARP, RESHARP, PDF, LBV and TFI's background.

Every method takes a total field map and a brain mask and returns ``(local_field, mask_out)``:
the field of the sources inside the mask, zero outside ``mask_out`` (the mask the local field is
valid in: eroded by the kernel radius for the spherical-mean-value methods). The field may be in
Hz, ppm or radians for the five harmonic methods: they are linear and homogeneous in the field,
so the output is in the unit of the input and no parameter depends on that unit. ``tfibg``
(:mod:`~qsmprep.recon.background.total_field`) inverts the field for its sources: it takes Hz
and the field strength, and the magnitude, noise map and reliable voxels as TFI does.

LBV (:func:`lbv`) solves a sparse Poisson problem on the mask with SciPy on the CPU whatever
the ``device``. The other methods are FFT-only and written once for NumPy (``device="cpu"``)
and torch (``device="torch"`` or ``"cuda"``) through :mod:`qsmprep.recon._backend`. To keep
the FFTs small, the data are cropped to the bounding box of the mask and zero-padded by the
reach of the kernel before any transform (:class:`qsmprep.recon.grid.Grid`); the
spherical-mean-value convolutions are then linear, not circular, inside the box. Work is in
float32, except the PDF iterations (float64, see :func:`pdf`). Outputs are float32 NumPy arrays
on the input grid.

Modules: ``smv`` (SHARP, V-SHARP, RESHARP, the SMV erosion), ``projection`` (PDF),
``boundary_value`` (LBV) and ``total_field`` (TFI's background); this package holds the
dispatchers (:func:`remove_background`, :func:`remove_background_checked`) and re-exports the
methods.

Notation: ``f`` total field, ``M`` mask, ``s_r`` the
normalised binary ball of radius ``r`` mm, ``S_r = F{s_r}``, ``C = (delta - s_r) *`` the SMV
high-pass with symbol ``H = 1 - S_r``, ``M_r`` the mask eroded by the ball
(``M_r = {x : ball(x, r) inside M}``), ``D`` the unit dipole kernel.
"""

from __future__ import annotations

import math

import numpy as np

from qsmprep import methods as _registry
from qsmprep.recon.background.boundary_value import lbv
from qsmprep.recon.background.projection import pdf
from qsmprep.recon.background.smv import erode_mask_smv, resharp, sharp, vsharp, vsharp_radii
from qsmprep.recon.background.total_field import tfibg

__all__ = [
    "CHECK_METHOD",
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
    "tfibg",
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
"""Largest NRMSE (%) of a whole-mask method's local field against V-SHARP's (the default
``check_with`` of :func:`remove_background_checked`), inside V-SHARP's mask, that the check
accepts. Measured with LBV on the trimmed mask: 22.8-42.9 % on the six acquisitions of the
development data (qsmdev, qsmdev-multi, qsmdev-aniso), where LBV is the most accurate method,
and 133.7-163.8 % on our own phantoms at 1 to 3 mm (tissue of -0.5 ppm borders their brain, so
LBV's zero boundary value fails); 75 is about their geometric mean. Against RESHARP the same
cases gave 26.4-36.7 % and 145.5-195.8 %."""

CHECK_METHOD = "vsharp"
"""The eroding method :func:`remove_background_checked` compares a whole-mask method with. Its
disagreement with LBV separates the development data from our phantoms as well as RESHARP's
(:data:`MAX_DISAGREEMENT`) for 17 FFT-equivalents instead of RESHARP's 92.5: on qsmdev (1.5
mm, 4 echoes) V-SHARP took 1.6-2.2 s against RESHARP's 12-16 s in the same run."""

KEEPS_MASK = tuple(m.name for m in _registry.records("background") if m.keeps_mask)
"""Methods whose local field covers their whole input mask (no kernel erosion; ``keeps_mask``
in their records): they take the field at the mask's edge at face value, so the App gives them
the brain mask less its unreliable rim (:func:`qsmprep.recon.mask.field_reliability`)."""


def _key(method: str) -> str:
    """A background method's registry name (case, hyphens and underscores ignored)."""
    return str(method).lower().replace("-", "").replace("_", "")


def remove_background(field, mask, voxel_size, *, method: str = "resharp", **kwargs):
    """Background field removal by name: one of :data:`METHODS`.

    ``kwargs`` go to the method (:func:`sharp`, :func:`vsharp`, :func:`resharp`, :func:`pdf`,
    :func:`lbv`).
    Returns ``(local_field, mask_out)`` in the unit of ``field``.
    """
    key = _key(method)
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
    check_with: str = CHECK_METHOD,
    max_disagreement: float = MAX_DISAGREEMENT,
    device: str | None = "cpu",
    **kwargs,
):
    """Background removal with a cross-check of the methods that keep the whole mask.

    A method of :data:`KEEPS_MASK` (LBV, PDF) extrapolates nothing but trusts the field at the
    mask's edge; where the background is not harmonic there on the voxel grid (tissue of very
    different susceptibility right outside the mask) its error spreads through the brain. The
    eroding methods do not depend on the edge. So the result of ``method`` is compared with
    ``check_with`` (V-SHARP on ``brain_mask``, defaults) inside the latter's mask: when their
    NRMSE (de-meaned, against ``check_with``) exceeds ``max_disagreement`` % the result of
    ``fallback`` (RESHARP on ``brain_mask``, defaults; the most accurate eroding method on our
    phantoms) is returned instead, computed only then. Other methods run unchecked.

    Parameters
    ----------
    field, mask, voxel_size, device : as :func:`remove_background`.
    method : str
        Background method (default :data:`DEFAULT_METHOD`).
    brain_mask : (X, Y, Z) array, optional
        Mask of the check and of the fallback (default ``mask``).
    fallback : str
        The method to fall back to (default ``"resharp"``, its defaults).
    check_with : str
        The method to compare with (default :data:`CHECK_METHOD`, its defaults); when it is
        ``fallback``, its result serves both.
    max_disagreement : float
        Threshold (%) of the disagreement (default :data:`MAX_DISAGREEMENT`, measured for the
        default ``check_with``).
    **kwargs
        Parameters of ``method``.

    Returns
    -------
    local_field, mask_out : as :func:`remove_background`, of the method used.
    check : dict
        ``method`` (the one used), and for a checked method ``against`` (``check_with``),
        ``disagreement`` (%), ``slope`` (of the method's field on ``check_with``'s),
        ``max_disagreement`` and ``fell_back`` (bool).
    """
    local, out = remove_background(field, mask, voxel_size, method=method, device=device, **kwargs)
    key = _key(method)
    if not _registry.get(key).keeps_mask or max_disagreement is None:
        return local, out, {"method": key}
    ref_mask = mask if brain_mask is None else brain_mask
    fb, against = _key(fallback), _key(check_with)

    def run(name):
        takes_b0_dir = name in _registry.names("background") and "b0_dir" in (
            _registry.get(name).inputs
        )
        kw = {"b0_dir": kwargs["b0_dir"]} if takes_b0_dir and "b0_dir" in kwargs else {}
        return remove_background(field, ref_mask, voxel_size, method=name, device=device, **kw)

    ref, ref_out = run(against)
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
        "method": fb if fell_back else key,
        "against": against,
        "disagreement": round(dis, 2),
        "slope": round(slope, 4),
        "max_disagreement": float(max_disagreement),
        "fell_back": fell_back,
    }
    if not fell_back:
        return local, out, check
    if fb == against:
        return ref, ref_out, check
    return (*run(fb), check)
