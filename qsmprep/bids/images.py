"""Phase and magnitude images: phase units, and the images as the chain reads them.

Phase units are read from the phase sidecar's ``"Units"`` (``"rad"``, or ``"deg"``) or detected
from the values (:func:`detect_phase_units`): radians are used as they are, degrees converted,
scanner integers (Siemens -4096..4095 or 0..4095) rescaled to [-pi, pi) (:func:`load_phase`).
:func:`load_magnitude` gives the magnitude with non-finite and negative values set to 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import nibabel as nib
import numpy as np

from qsmprep.bids.acquisition import BIDSInputError

__all__ = ["detect_phase_units", "load_magnitude", "load_phase", "read_3d", "units_from_sidecar"]

LOGGER = logging.getLogger("qsmprep.bids")


_UNIT_NAMES = {
    "rad": ("rad", "rads", "radian", "radians"),
    "deg": ("deg", "degs", "degree", "degrees", "\u00b0"),
    "arbitrary": ("arbitrary", "a.u.", "au", "arb", "arbitrary units", "n/a"),
}
_FIELD_UNITS = ("hz", "ppm", "ppb", "rad/s", "t", "ut", "nt")


def units_from_sidecar(meta: Mapping | None, *, path=None) -> str | None:
    """Phase ``"Units"`` of a sidecar: ``"rad"``, ``"deg"``, ``"arbitrary"`` or None (absent).

    BIDS gives phase images ``"rad"`` or ``"arbitrary"``; degrees are read too. Units of a
    field (Hz, ppm, ...) or anything else raise :class:`BIDSInputError` with the fix.
    """
    u = (meta or {}).get("Units")
    if u is None:
        return None
    key = str(u).strip().lower()
    for name, spellings in _UNIT_NAMES.items():
        if key in spellings:
            return name
    where = f"{path}: " if path is not None else ""
    if key in _FIELD_UNITS:
        raise BIDSInputError(
            f'{where}phase sidecar says "Units": {u!r}, the units of a field map, not of a phase '
            'image. qsmprep reads wrapped phase per echo: give the phase images ("Units": '
            '"rad" or "arbitrary"), not a field map',
            path=path,
        )
    raise BIDSInputError(
        f'{where}phase sidecar has "Units": {u!r}, which qsmprep does not know. BIDS phase '
        'images use "rad" or "arbitrary" (scanner integers); degrees ("deg") are read too. '
        "Fix the sidecar's Units",
        path=path,
    )


_PI_TOL = 1e-3  # relative slack on pi for stored radians (float32 / int16 scaling rounding)
_INTEGER_MIN_RANGE = 100.0


def detect_phase_units(img, sidecar: Mapping | None = None, *, path=None) -> str:
    """Units of a phase image: ``"rad"``, ``"deg"`` or ``"integer"`` (scanner integers).

    1. A sidecar ``"Units"`` of radians or degrees is used when the (scaled) values ``v``
       agree with it; a disagreement raises.
    2. Otherwise (no ``Units``, or ``"arbitrary"``) from the values: radians when they lie
       within one 2 pi interval starting at -pi or 0 (``-pi <= v <= pi`` or
       ``0 <= v <= 2 pi``, with a relative slack of 1e-3); degrees when they lie within
       [-180, 180] or [0, 360] and span more than 180; ``"integer"`` when every value is an
       integer and ``max - min >= 100`` (e.g. Siemens -4096..4095 or 0..4095).

    Parameters
    ----------
    img : nibabel image or path
        Phase image (its data scaling is applied).
    sidecar : dict, optional
        Its JSON sidecar metadata.
    path : path, optional
        Name used in the error message (default ``img``'s file name).

    Returns
    -------
    ``"rad"``, ``"deg"`` or ``"integer"``.

    Raises
    ------
    BIDSInputError
        When the values fit none of these (e.g. radians times a factor), or contradict the
        sidecar's ``Units``, or the ``Units`` are those of a field map.
    """
    if isinstance(img, (str, os.PathLike)):
        path = img if path is None else path
        img = nib.load(str(img))
    if path is None:
        path = img.get_filename()
    declared = units_from_sidecar(sidecar, path=path)
    v = np.asanyarray(img.dataobj)
    v = v[np.isfinite(v)] if np.issubdtype(v.dtype, np.floating) else v.ravel()
    if v.size == 0:
        raise BIDSInputError(f"{path}: phase image has no finite values; replace it", path=path)
    lo, hi = float(v.min()), float(v.max())
    span = f"[{lo:.4g}, {hi:.4g}]"
    pi = np.pi * (1 + _PI_TOL)
    is_rad = (lo >= -pi and hi <= pi) or (lo >= -_PI_TOL and hi <= 2 * pi)
    d180 = 180.0 * (1 + _PI_TOL)
    is_deg = (
        not is_rad
        and hi - lo > 180
        and ((lo >= -d180 and hi <= d180) or (lo >= -_PI_TOL and hi <= 2 * d180))
    )
    if declared == "rad":
        if not is_rad:
            raise BIDSInputError(
                f'{path}: the sidecar says "Units": "rad" but the values span {span}, beyond '
                "one 2 pi cycle"
                + ('; they look like degrees: set "Units": "deg"' if is_deg else "")
                + "; fix the sidecar's Units (or rescale the image to radians)",
                path=path,
            )
        return "rad"
    if declared == "deg":
        if not is_deg:
            raise BIDSInputError(
                f'{path}: the sidecar says "Units": "deg" but the values span {span}, not a '
                "phase in degrees (within [-180, 180] or [0, 360] and spanning more than 180); "
                "fix the sidecar's Units",
                path=path,
            )
        return "deg"
    if is_rad:
        return "rad"
    if is_deg:
        return "deg"
    integral = np.issubdtype(v.dtype, np.integer) or bool(np.all(v == np.round(v)))
    if integral and hi - lo >= _INTEGER_MIN_RANGE:
        return "integer"
    raise BIDSInputError(
        f"{path}: cannot tell the units of this phase image: values span {span}, neither "
        "radians (within [-pi, pi] or [0, 2 pi]), degrees (within [-180, 180] or [0, 360]) nor "
        "scanner integers (integer values spanning >= 100). Rescale it to radians and set "
        '"Units": "rad" in its sidecar',
        path=path,
    )


# Declared integer phase ranges: Siemens stores phase as 12-bit values with an offset of 4096
# (-4096..4095) or without (0..4095); both span 8192 or 4096 levels for one 2 pi cycle.
_INTEGER_RANGES = ((0.0, 4095.0), (-4096.0, 4095.0))


def read_3d(path, what: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The data array (as stored, scaling applied) and the image of a 3D volume; a 4D image
    of one volume is read as 3D, more volumes raise :class:`BIDSInputError` (``what``,
    e.g. ``"phase"``, names the image in the message)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim > 3 and int(np.prod(data.shape[3:])) == 1:
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise BIDSInputError(
            f"{path}: {what} image has shape {data.shape}; qsmprep needs one coil-combined 3D "
            "image per echo (split echoes into echo-<n> files, combine coil channels)",
            path=path,
        )
    return data, img


def load_phase(path, units: str, phase_sign: int = 1) -> np.ndarray:
    """Phase image in radians, float32, 3D.

    ``units="rad"``: the values as stored (scaling applied); data stored in [0, 2 pi) (some
    value above pi by more than 0.1 %) have the values above pi moved down by 2 pi, so the
    result lies in [-pi, pi].

    ``units="deg"``: degrees times pi / 180, then as radians.

    ``units="integer"``: a linear map of the stored integers onto [-pi, pi)::

        phi = (v - lo) / (hi - lo + 1) * 2 pi - pi

    over the declared Siemens range ``[lo, hi] = [0, 4095]`` when all values lie in it, else
    ``[-4096, 4095]`` when they lie in that (then ``phi = v pi / 4096``), else the data's own
    minimum and maximum (``hi - lo + 1`` levels for one cycle, so ``lo`` and ``hi + 1`` would
    be the same angle).

    Non-finite values become 0. ``phase_sign=-1`` negates the result (scanners whose phase
    decreases with frequency; qsmprep's convention is phase = +2 pi f TE).
    """
    if units not in ("rad", "deg", "integer"):
        raise ValueError(f"units must be 'rad', 'deg' or 'integer', got {units!r}")
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign!r}")
    data, _ = read_3d(path, "phase")
    v = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.all():
        LOGGER.warning(
            "%s: %d non-finite (NaN or inf) phase values set to 0", path, v.size - finite.sum()
        )
        v = np.where(finite, v, 0.0)
    if units == "deg":
        v = np.deg2rad(v)
    if units in ("rad", "deg"):
        if v.max() > np.pi * (1 + _PI_TOL):  # [0, 2 pi) convention
            v = np.where(v > np.pi, v - 2 * np.pi, v)
    else:
        dmin, dmax = float(v[finite].min()), float(v[finite].max())
        lo, hi = dmin, dmax
        for rlo, rhi in _INTEGER_RANGES:
            if dmin >= rlo and dmax <= rhi:
                lo, hi = rlo, rhi
                break
        v = (v - lo) / (hi - lo + 1.0) * (2 * np.pi) - np.pi
        v[~finite] = 0.0
    return (phase_sign * v).astype(np.float32)


def load_magnitude(path) -> np.ndarray:
    """Magnitude image as float32, 3D (scaling applied; non-finite and negative values become
    0: discovery refuses a "magnitude" with more than a few negative voxels)."""
    data, _ = read_3d(path, "magnitude")
    v = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.maximum(v, 0.0)
