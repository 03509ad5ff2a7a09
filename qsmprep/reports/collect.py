"""Find and read the derivatives of one subject: the report's only view of a run.

The report depends on the files on disk alone (the derivative naming of qsmprep), never on
how they were produced::

    sub-<label>[/ses-<label>]/anat/<prefix>_desc-brain_mask.nii.gz      (+ .json sidecars)
    .../<prefix>_desc-local_mask.nii.gz
    .../<prefix>_desc-{total,local,noise}_fieldmap.nii.gz                (Hz)
    .../<prefix>_desc-<method>_Chimap.nii.gz                             (ppm)
    .../sub-<label>[_ses-<label>]_desc-cosmos_Chimap.nii.gz              (COSMOS, ppm)
    .../<prefix>_{R2starmap,T2starmap,S0map}.nii.gz                      (1/s, s, a.u.)
    .../<prefix>_desc-{swi,minip,smwipara,smwidia}_T2starw.nii.gz        (SWI, minIP, SMWI)
    .../<prefix>_metrics.tsv

where ``<prefix>`` is ``sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]``.
Every reader here tolerates missing or malformed files by returning ``None`` (or raising a
clear exception that the report catches and logs).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "AcquisitionFiles",
    "SubjectFiles",
    "find_subject_files",
    "load_volume",
    "parse_name",
    "read_sidecar",
    "read_tsv",
    "sidecar_key",
    "sidecar_value",
    "subject_label",
]

#: Entities that identify an acquisition, in BIDS order.
ENTITIES = ("sub", "ses", "acq", "rec", "run")
_NIFTI = (".nii.gz", ".nii")
_FIELDS = ("total", "local", "noise")
_MASKS = ("brain", "local")
_RELAXATION = ("R2starmap", "T2starmap", "S0map")
_SWI = ("swi", "minip", "smwipara", "smwidia")


def subject_label(subject: str) -> str:
    """``"01"`` for ``"01"`` or ``"sub-01"``; raises ValueError for a non-alphanumeric label."""
    label = str(subject)
    label = label[4:] if label.startswith("sub-") else label
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise ValueError(f"subject label must be alphanumeric (e.g. '01'), got {subject!r}")
    return label


def _stem(name: str) -> str:
    for ext in (*_NIFTI, ".tsv", ".json", ".png", ".svg"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def parse_name(name: str) -> tuple[dict[str, str], str]:
    """BIDS entities and suffix of a file name.

    ``parse_name("sub-01_run-2_desc-tkd_Chimap.nii.gz")`` gives
    ``({"sub": "01", "run": "2", "desc": "tkd"}, "Chimap")``.
    """
    parts = _stem(Path(name).name).split("_")
    entities: dict[str, str] = {}
    suffix = ""
    for i, part in enumerate(parts):
        key, sep, value = part.partition("-")
        if sep and value:
            entities[key] = value
        elif i == len(parts) - 1:
            suffix = part
    return entities, suffix


def _prefix(entities: dict[str, str]) -> str:
    return "_".join(f"{k}-{entities[k]}" for k in ENTITIES if k in entities)


@dataclass
class AcquisitionFiles:
    """The derivative files of one acquisition (one ``<prefix>``)."""

    prefix: str
    entities: dict[str, str]
    masks: dict[str, Path] = field(default_factory=dict)  # "brain", "local"
    fields: dict[str, Path] = field(default_factory=dict)  # "total", "local", "noise"
    chimaps: dict[str, Path] = field(default_factory=dict)  # method -> Chimap
    relaxation: dict[str, Path] = field(default_factory=dict)  # "R2starmap", "T2starmap", ...
    swi: dict[str, Path] = field(default_factory=dict)  # "swi", "minip", "smwipara", ...
    metrics_tsv: Path | None = None

    @property
    def session(self) -> str | None:
        return self.entities.get("ses")

    def any_image(self) -> Path | None:
        """One NIfTI of this acquisition (to read the grid from), mask first."""
        for group in (self.masks, self.fields, self.chimaps):
            for path in group.values():
                return path
        return None

    def sidecars(self) -> list[Path]:
        """Existing JSON sidecars of the acquisition's images (masks, fields, then Chimaps)."""
        out = []
        for group in (self.masks, self.fields, self.chimaps):
            for path in group.values():
                side = sidecar_path(path)
                if side.is_file():
                    out.append(side)
        return out


@dataclass
class SubjectFiles:
    """Derivatives of one subject: acquisitions (in name order) and COSMOS maps per session."""

    label: str
    root: Path
    acquisitions: list[AcquisitionFiles]
    cosmos: dict[str | None, Path]  # session (None without sessions) -> COSMOS Chimap


def sidecar_path(path: Path) -> Path:
    """The ``.json`` sidecar next to an image or table."""
    path = Path(path)
    return path.with_name(_stem(path.name) + ".json")


def find_subject_files(output_dir, subject: str) -> SubjectFiles:
    """Scan ``output_dir/sub-<label>`` for the derivatives of every acquisition."""
    label = subject_label(subject)
    root = Path(output_dir) / f"sub-{label}"
    acqs: dict[str, AcquisitionFiles] = {}
    cosmos: dict[str | None, Path] = {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and "figures" not in p.parts)
    for path in files:
        name = path.name
        entities, suffix = parse_name(name)
        if entities.get("sub") != label or "space" in entities:
            continue  # another subject, or a template-space map (qsmprep.reports.space)
        desc = entities.get("desc")
        is_nifti = name.endswith(_NIFTI)
        if is_nifti and suffix == "Chimap" and desc == "cosmos":
            cosmos[entities.get("ses")] = path
            continue
        prefix = _prefix(entities)
        kind = None
        if is_nifti and suffix == "mask" and desc in _MASKS:
            kind = ("masks", desc)
        elif is_nifti and suffix == "fieldmap" and desc in _FIELDS:
            kind = ("fields", desc)
        elif is_nifti and suffix == "Chimap" and desc:
            kind = ("chimaps", desc)
        elif is_nifti and suffix in _RELAXATION and not desc:
            kind = ("relaxation", suffix)
        elif is_nifti and suffix == "T2starw" and desc in _SWI:
            kind = ("swi", desc)
        elif name.endswith(".tsv") and suffix == "metrics":
            kind = ("metrics_tsv", None)
        if kind is None:
            continue
        acq = acqs.get(prefix)
        if acq is None:
            ents = {k: v for k, v in entities.items() if k in ENTITIES}
            acq = acqs[prefix] = AcquisitionFiles(prefix=prefix, entities=ents)
        if kind[0] == "metrics_tsv":
            acq.metrics_tsv = path
        else:
            getattr(acq, kind[0])[kind[1]] = path
    return SubjectFiles(label, root, [acqs[k] for k in sorted(acqs)], cosmos)


def read_sidecar(path) -> dict:
    """The JSON sidecar of ``path`` (an image or the sidecar itself); ``{}`` when absent/bad."""
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sidecar_key(d: Mapping, name: str):
    """``d[name]`` with a case-insensitive key (``None`` when absent); top level only."""
    for k, v in d.items():
        if k.lower() == name.lower():
            return v
    return None


def sidecar_value(sidecars, *names):
    """First value of any key in ``names`` (case-insensitive), searching nested dicts too.

    ``sidecars`` is a dict or a list of dicts, searched in order; top-level keys of every
    dict come before nested ones (e.g. ``"parameters"``).
    """
    wanted = {n.lower() for n in names}
    dicts = [sidecars] if isinstance(sidecars, dict) else list(sidecars)
    queue = list(dicts)
    while queue:
        nested = []
        for d in queue:
            for key, value in d.items():
                if key.lower() in wanted and value not in (None, "", []):
                    return value
                if isinstance(value, dict):
                    nested.append(value)
        queue = nested
    return None


def load_volume(path) -> tuple[np.ndarray, tuple[float, float, float], nib.Nifti1Image]:
    """A NIfTI as float32 in the closest RAS+ orientation (for display), first volume if 4D.

    Returns ``(data, voxel_size_mm, canonical_image)``. Non-finite values become 0.
    """
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {data.shape}")
    data = np.nan_to_num(data.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    vs = tuple(float(v) for v in img.header.get_zooms()[:3])
    return data, vs, img


def read_tsv(path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows (dicts of strings) of a tab-separated table with a header line."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = list(reader.fieldnames or [])
        rows = [{k: (v if v is not None else "n/a") for k, v in row.items()} for row in reader]
    return columns, rows


def to_float(value) -> float | None:
    """``float(value)`` for a finite number, ``None`` for ``"n/a"``, blanks and junk."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None
