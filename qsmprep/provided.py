"""Inputs the user brings: precomputed brain masks (``--mask-dir``) and total fields
(``--field-dir``).

Both folders are searched as BIDS derivative datasets -- a previous qsmprep output folder, the
``derivatives/<pipeline>`` root of another tool, or any folder laid out as
``sub-<label>[/ses-<label>]/anat/`` -- by the entities of each acquisition (a plain name match
on the file names, without pybids: a derivative folder need not be a valid dataset)::

    sub-01[/ses-x]/anat/sub-01[_ses-x][_acq-..][_rec-..][_run-..]_desc-brain_mask.nii[.gz]
    sub-01[/ses-x]/anat/sub-01[_ses-x][_acq-..][_rec-..][_run-..]_desc-total_fieldmap.nii[.gz]
                                                                    (+ .json with "Units": "Hz")

the names qsmprep itself writes.

Masks
    ``_desc-brain_mask`` is preferred; ``_mask`` without a ``desc-`` label is accepted too
    (other ``desc-`` labels, e.g. qsmprep's ``desc-local`` and ``desc-reliable`` masks, and
    files with other entities such as ``space-`` or ``label-`` are not brain masks of the
    acquisition's grid and are ignored). A mask with fewer entities than the acquisition
    applies to it (as BIDS inheritance: ``sub-01_desc-brain_mask`` serves
    ``sub-01_run-2`` when there is no ``sub-01_run-2_desc-brain_mask``); the most specific
    one wins, and two equally specific candidates are an error. The mask must be on the
    acquisition's grid (shape; affine within 1e-3 mm), hold only 0 and 1 (any integer, float
    or boolean type; a probabilistic mask is refused: threshold it yourself, so the choice
    is yours and on record) and be non-empty.

Total fields
    ``_desc-total_fieldmap`` with exactly the acquisition's entities (a field is never shared
    between runs), in Hz: its sidecar's ``"Units"`` must be ``"Hz"`` (any case); ``rad/s``,
    ``ppm``, ``rad``, ``T`` are refused with the conversion. A scanner's B0 map
    (``fmap/*_fieldmap``) is not searched: it is rarely on the GRE grid; resample it onto the
    acquisition's grid and name it ``_desc-total_fieldmap`` to use it. Values must be finite
    inside the brain mask (outside they are set to 0).

A missing mask or field refuses that acquisition (a :class:`~qsmprep.bids.BIDSInputError`
naming the file looked for), rather than silently computing it: the user asked for theirs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.bids import BIDSInputError

__all__ = [
    "AFFINE_ATOL",
    "Grid",
    "attach_provided",
    "check_field_units",
    "find_provided",
    "load_provided_field",
    "load_provided_mask",
]

AFFINE_ATOL = 1e-3
"""Largest difference (mm) of an affine entry between a provided image and the acquisition."""

_KEYS = ("sub", "ses", "acq", "rec", "run")
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")
_HZ = ("hz",)
_CONVERSIONS = {
    "rad/s": "divide by 2 pi",
    "radians/s": "divide by 2 pi",
    "rad": "divide by 2 pi TE (TE in s) if it is a phase at one echo time",
    "radian": "divide by 2 pi TE (TE in s) if it is a phase at one echo time",
    "radians": "divide by 2 pi TE (TE in s) if it is a phase at one echo time",
    "ppm": "multiply by 42.577478 B0 (B0 in T; 127.73 Hz/ppm at 3 T)",
    "ppb": "multiply by 0.042577478 B0 (B0 in T)",
    "t": "multiply by 42.577478e6 (gamma / 2 pi in Hz/T)",
    "tesla": "multiply by 42.577478e6 (gamma / 2 pi in Hz/T)",
    "khz": "multiply by 1000",
}


@dataclass
class Grid:
    """The voxel grid a provided image must match, and the names its messages use."""

    shape: tuple
    affine: np.ndarray
    label: str
    acq_id: str | None = None
    source: str = "the acquisition"

    @classmethod
    def of(cls, acq) -> Grid:
        """The grid of an :class:`~qsmprep.bids.Acquisition` (or a Grid, returned as is)."""
        if isinstance(acq, Grid):
            return acq
        phase = getattr(acq, "phase", None)
        return cls(
            tuple(int(n) for n in acq.shape),
            np.asarray(acq.affine, float),
            acq.prefix,
            acq.id,
            Path(phase[0]).name if phase else "the acquisition",
        )

    @classmethod
    def of_image(cls, path) -> Grid:
        """The 3D grid of a NIfTI image (its first three axes)."""
        img = nib.load(str(path))
        name = Path(path).name
        return cls(tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, float), name,
                   None, name)  # fmt: skip


def _parse(name: str) -> tuple[dict[str, str], str] | None:
    """Entities and suffix of a NIfTI file name; None when it is not BIDS-like."""
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return None
    parts = stem.split("_")
    ents: dict[str, str] = {}
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if m is None or m.group(1) in ents:
            return None
        ents[m.group(1)] = m.group(2)
    return ents, parts[-1]


def _acq_entities(acq) -> dict[str, str]:
    vals = (acq.subject, acq.session, acq.acq, acq.rec, acq.run)
    return {k: str(v) for k, v in zip(_KEYS, vals, strict=True) if v is not None}


def _check_dir(root, option: str) -> Path:
    p = Path(root).expanduser().absolute()
    if not p.is_dir():
        raise BIDSInputError(
            f"{option} {p} is not a folder; give the root of a derivative dataset (the folder"
            " holding sub-<label>/), e.g. an earlier qsmprep output folder",
            path=p,
        )
    if not any(c.is_dir() and c.name.startswith("sub-") for c in p.iterdir()):
        raise BIDSInputError(
            f"{option} {p} holds no sub-<label> folder; give the root of a derivative dataset"
            " (the folder holding sub-<label>/anat/), e.g. an earlier qsmprep output folder or"
            " <bids>/derivatives/<pipeline>",
            path=p,
        )
    return p


def find_provided(root, acq, kind: str, *, option: str = "") -> Path:
    """The provided brain mask (``kind="mask"``) or total field (``kind="field"``) of ``acq``.

    See the module doc for the names searched. Raises :class:`~qsmprep.bids.BIDSInputError`
    (naming the file looked for) when none or two equally good candidates are found.
    """
    if kind not in ("mask", "field"):
        raise ValueError(f"kind must be 'mask' or 'field', got {kind!r}")
    root = Path(root)
    want = _acq_entities(acq)
    folder = root / f"sub-{acq.subject}"
    if acq.session is not None:
        folder = folder / f"ses-{acq.session}"
    folder = folder / "anat"
    if kind == "mask":
        expected = f"{acq.prefix}_desc-brain_mask.nii.gz"
    else:
        expected = f"{acq.prefix}_desc-total_fieldmap.nii.gz"
    candidates: list[tuple[int, Path]] = []
    for f in sorted(folder.glob("*.nii*")) if folder.is_dir() else []:
        parsed = _parse(f.name)
        if parsed is None:
            continue
        ents, suffix = parsed
        desc = ents.pop("desc", None)
        if set(ents) - set(_KEYS):
            continue  # space-, label-, echo-, ...: not an image of the acquisition's grid
        if "sub" not in ents or any(want.get(k) != v for k, v in ents.items()):
            continue
        if kind == "mask":
            if suffix != "mask" or desc not in ("brain", None):
                continue
            # more entities first, then desc-brain before no desc
            score = 2 * len(ents) + (1 if desc == "brain" else 0)
        else:
            if suffix != "fieldmap" or desc != "total" or ents != want:
                continue
            score = 0
        candidates.append((score, f))
    where = option or "the provided folder"
    what = "brain mask" if kind == "mask" else "total field map (Hz)"
    if not candidates:
        extra = (
            " (or a mask of fewer entities, e.g. sub-<label>_desc-brain_mask.nii.gz)"
            if kind == "mask"
            else ' with a JSON sidecar giving "Units": "Hz"'
        )
        rel = folder.relative_to(root) if folder.is_relative_to(root) else folder
        raise BIDSInputError(
            f"{acq.prefix}: no {what} for this acquisition in {where} {root}: expected "
            f"{rel.as_posix()}/{expected}{extra}. Add it, or leave this acquisition out with "
            "--participant-label / --bids-filter-file (qsmprep does not compute what you asked "
            "to provide)",
            path=folder / expected,
            acquisition=acq.id,
        )
    candidates.sort(key=lambda c: -c[0])
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        a, b = candidates[0][1].name, candidates[1][1].name
        raise BIDSInputError(
            f"{acq.prefix}: two files in {where} {root} apply equally to this acquisition as its"
            f" {what}:"
            f" {a} and {b}; remove one, or name one {expected}",
            path=candidates[0][1],
            acquisition=acq.id,
        )
    return candidates[0][1]


def _read_on_grid(path: Path, acq: Grid, what: str):
    """The provided image, refused (naming the file and the fix) unreadable or off the grid."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for broken files
        raise BIDSInputError(
            f"{path}: cannot read the provided {what} ({exc}); replace the file",
            path=path,
            acquisition=acq.acq_id,
        ) from exc
    _check_grid(img, acq, path, what)
    return img


def _check_grid(img, grid: Grid, path, what: str) -> None:
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 3 and int(np.prod(shape[3:])) == 1:
        shape = shape[:3]
    affine = np.asarray(img.affine, float)
    ref = grid.affine
    if shape != grid.shape or not np.allclose(affine, ref, atol=AFFINE_ATOL):
        how = (
            f"shape {shape}, the acquisition's {grid.shape}"
            if shape != grid.shape
            else "an affine differing by up to "
            f"{float(np.max(np.abs(affine - ref))):.3g} mm (allowed {AFFINE_ATOL:g})"
        )
        raise BIDSInputError(
            f"{path}: the provided {what} is not on the grid of {grid.label} ({how}). "
            f"Resample it onto the grid of {grid.source} (same shape and affine; nearest "
            "neighbour for a mask), e.g. with antsApplyTransforms or "
            "nilearn.image.resample_to_img",
            path=path,
            acquisition=grid.acq_id,
        )


def load_provided_mask(path, acq) -> np.ndarray:
    """The provided brain mask as a boolean array, after the checks of the module doc.

    ``acq`` is an :class:`~qsmprep.bids.Acquisition` or a :class:`Grid`.
    """
    path = Path(path)
    acq = Grid.of(acq)
    img = _read_on_grid(path, acq, "brain mask")
    data = np.asarray(img.dataobj).reshape(tuple(acq.shape))
    if data.dtype != bool:
        finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else True
        values = np.unique(data[finite]) if finite is not True else np.unique(data)
        if not np.all(np.isin(values, (0, 1))):
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if values.size > 6 else "")
            frac = (data > 0) & (data < 1)
            hint = (
                " It looks probabilistic: threshold it (e.g. fslmaths mask -thr 0.5 -bin), so"
                " the threshold is your choice and on record"
                if np.any(frac)
                else " Binarize it (e.g. fslmaths mask -bin: nonzero -> 1)"
            )
            raise BIDSInputError(
                f"{path}: the provided brain mask is not binary: values {shown} (expected only"
                f" 0 and 1).{hint}",
                path=path,
                acquisition=acq.acq_id,
            )
        if finite is not True and not np.all(finite):
            raise BIDSInputError(
                f"{path}: the provided brain mask has NaN or infinite values; store 0 and 1 only",
                path=path,
                acquisition=acq.acq_id,
            )
    mask = data.astype(bool)
    if not mask.any():
        raise BIDSInputError(
            f"{path}: the provided brain mask is empty (all 0); give the mask of the brain of "
            f"{acq.label}",
            path=path,
            acquisition=acq.acq_id,
        )
    return mask


def _sidecar(path: Path) -> Path:
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return path.with_name(stem + ".json")


def check_field_units(path, acq_id: str | None = None) -> dict:
    """The sidecar of a provided total field; its ``"Units"`` must be Hz."""
    path = Path(path)
    side = _sidecar(path)
    if not side.is_file():
        raise BIDSInputError(
            f"{path}: the provided total field has no sidecar {side.name}; add one with"
            ' "Units": "Hz" (the field must be in Hz)',
            path=path,
            acquisition=acq_id,
        )
    try:
        meta = json.loads(side.read_text())
    except ValueError as exc:
        raise BIDSInputError(
            f"{side}: not valid JSON ({exc}); fix the sidecar of the provided total field",
            path=side,
            acquisition=acq_id,
        ) from exc
    units = meta.get("Units") if isinstance(meta, dict) else None
    if units is None:
        raise BIDSInputError(
            f'{side}: no "Units" in the sidecar of the provided total field; add "Units": "Hz"'
            " (the field must be in Hz)",
            path=side,
            acquisition=acq_id,
        )
    key = str(units).strip().lower()
    if key not in _HZ:
        how = _CONVERSIONS.get(key)
        raise BIDSInputError(
            f'{side}: the provided total field has "Units": {units!r}; qsmprep needs Hz.'
            + (f" Convert it: {how}; then set" if how else " Convert it to Hz and set")
            + ' "Units": "Hz"',
            path=side,
            acquisition=acq_id,
        )
    return meta


def load_provided_field(path, acq, mask=None) -> np.ndarray:
    """The provided total field (Hz, float32), after the checks of the module doc.

    ``acq`` is an :class:`~qsmprep.bids.Acquisition` or a :class:`Grid`. With ``mask``,
    non-finite values inside it are an error, and the field is 0 outside.
    """
    path = Path(path)
    acq = Grid.of(acq)
    check_field_units(path, acq.acq_id)
    img = _read_on_grid(path, acq, "total field")
    field = np.asarray(img.dataobj, dtype=np.float32).reshape(tuple(acq.shape))
    bad = ~np.isfinite(field)
    if mask is not None:
        mask = np.asarray(mask, bool)
        n = int(np.count_nonzero(bad & mask))
        if n:
            raise BIDSInputError(
                f"{path}: the provided total field has {n} NaN or infinite values inside the"
                " brain mask; give a field that is finite over the brain (or a mask that leaves"
                " those voxels out)",
                path=path,
                acquisition=acq.acq_id,
            )
        return np.where(mask & ~bad, field, np.float32(0)).astype(np.float32)
    return np.where(bad, np.float32(0), field).astype(np.float32)


def attach_provided(
    acquisitions: Sequence,
    *,
    mask_dir=None,
    field_dir=None,
    errors: list | None = None,
) -> list:
    """Find and check each acquisition's provided mask and field; set ``provided_mask`` /
    ``provided_field`` on it.

    An acquisition whose provided input is missing or invalid is left out and its
    :class:`~qsmprep.bids.BIDSInputError` appended to ``errors`` (raised when ``errors`` is
    None). A folder that is not a derivative dataset always raises.
    """
    mroot = _check_dir(mask_dir, "--mask-dir") if mask_dir is not None else None
    froot = _check_dir(field_dir, "--field-dir") if field_dir is not None else None
    out = []
    for acq in acquisitions:
        try:
            mask = None
            if mroot is not None:
                mpath = find_provided(mroot, acq, "mask", option="--mask-dir")
                mask = load_provided_mask(mpath, acq)
                acq.provided_mask = mpath
            if froot is not None:
                fpath = find_provided(froot, acq, "field", option="--field-dir")
                load_provided_field(fpath, acq, mask)
                acq.provided_field = fpath
        except BIDSInputError as exc:
            if errors is None:
                raise
            errors.append(exc)
            continue
        out.append(acq)
    return out
