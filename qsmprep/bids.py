"""BIDS input and output: pybids discovery, input validation, phase units, derivative names.

Inputs
------
qsmprep reads anatomical gradient-echo magnitude + phase from a BIDS raw dataset::

    sub-<label>[/ses-<label>]/anat/
        sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]
            _echo-<n>_part-mag_MEGRE.nii[.gz]     (+ .json)   multi-echo GRE
            _echo-<n>_part-phase_MEGRE.nii[.gz]   (+ .json)
            [_echo-<n>]_part-{mag,phase}_T2starw.nii[.gz]     single-echo (or multi-echo) GRE

Files are grouped into one :class:`Acquisition` per subject, session, ``acq``, ``run`` and
``rec`` (and suffix). Every echo needs a magnitude and a phase image of one 3D grid, and a
sidecar with ``EchoTime`` (s); the field strength comes from ``MagneticFieldStrength`` (T)
unless an override is given. Images without a ``part`` entity (or with ``part-real`` /
``part-imag``) are not used. Sidecar inheritance follows BIDS (pybids).

Phase units are read from the phase sidecar's ``"Units"`` (``"rad"``) or detected from the
values (:func:`detect_phase_units`): radians are used as they are, scanner integers
(Siemens -4096..4095 or 0..4095) are rescaled to [-pi, pi) (:func:`load_phase`).

Head orientations (COSMOS)
--------------------------
The B0 direction of an acquisition is ``R^T [0, 0, 1]`` with ``R`` the rotation part of its
affine (world z is B0; :func:`qsmprep.recon.kernels.b0_dir_from_affine`). Several
orientations of one head are combined (:func:`group_orientations`) when they share one voxel
grid in the head frame -- the same array index addresses the same tissue in every
orientation -- and each image's affine carries its own scanner-frame rotation: ``A_n = T_n A``
with ``A`` the common grid's affine and ``T_n`` the rigid head-to-scanner transform of
orientation ``n``. This is how the development data (``qsmdev-multi``) are stored, and how
registered data should be written: after resampling orientation ``n`` onto the reference grid,
store it with the affine ``R_n A_ref`` where ``R_n`` is the registration rotation, not with
``A_ref`` (which would hide its B0 direction). qsmprep cannot tell from headers alone whether
the voxel arrays are aligned; it checks equal shapes and voxel sizes and that the affines differ
by a rigid transform.

Bad input ends in :class:`BIDSInputError` (a ``ValueError``) whose message names the file and
the fix.

Outputs
-------
:func:`derivative_path` implements qsmprep's derivative naming table (all under
``output_dir/sub-<label>[/ses-<label>]/anat/``)::

    <prefix>_desc-brain_mask.nii.gz        <prefix>_desc-local_mask.nii.gz
    <prefix>_desc-total_fieldmap.nii.gz    <prefix>_desc-local_fieldmap.nii.gz
    <prefix>_desc-noise_fieldmap.nii.gz    <prefix>_desc-<method>_Chimap.nii.gz
    <prefix>_metrics.tsv / .json           sub-<label>[_ses-<label>]_desc-cosmos_Chimap.nii.gz
    <prefix>_R2starmap.nii.gz (1/s)        <prefix>_T2starmap.nii.gz (s)
    <prefix>_S0map.nii.gz
    <prefix>_desc-swi_T2starw.nii.gz       <prefix>_desc-minip_T2starw.nii.gz
    <prefix>_desc-smwipara_T2starw.nii.gz  <prefix>_desc-smwidia_T2starw.nii.gz

with ``<prefix> = sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]``
(:attr:`Acquisition.prefix`); :func:`write_dataset_description` writes the derivative
dataset's ``dataset_description.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.__about__ import __version__
from qsmprep.recon.kernels import b0_dir_from_affine

__all__ = [
    "SUFFIXES",
    "Acquisition",
    "BIDSInputError",
    "collect_acquisitions",
    "derivative_path",
    "detect_phase_units",
    "group_orientations",
    "load_magnitude",
    "load_phase",
    "make_layout",
    "write_dataset_description",
]

SUFFIXES = ("MEGRE", "T2starw")
"""BIDS suffixes qsmprep reads (``anat`` datatype, ``part-mag`` / ``part-phase``)."""

BIDS_VERSION = "1.9.0"

_LABEL = re.compile(r"[A-Za-z0-9]+")
_NIFTI_EXT = (".nii", ".nii.gz")
# Grid comparison tolerances: voxel sizes (relative), orthogonality of the rotation between
# two affines, affine entries of one acquisition's echoes (mm).
_ZOOM_RTOL = 1e-3
_ROT_ATOL = 1e-3
_AFFINE_ATOL = 1e-3
LOGGER = logging.getLogger(__name__)
COSMOS_MIN_ANGLE_DEG = 5.0
"""Smallest angle between two B0 directions for them to count as different orientations."""


class BIDSInputError(ValueError):
    """Invalid BIDS input; the message names the file (or label) and the fix.

    Attributes
    ----------
    path : Path or None
        The offending file, when there is one.
    acquisition : str or None
        :attr:`Acquisition.id` of the acquisition the error belongs to, when known.
    """

    def __init__(self, message: str, *, path=None, acquisition: str | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.acquisition = acquisition


@dataclass(eq=False)
class Acquisition:
    """One gradient-echo acquisition: magnitude + phase per echo, with what the chain needs.

    Attributes
    ----------
    subject, session, acq, run, rec : str or None
        BIDS labels (without the ``sub-`` / ``ses-`` / ... prefixes); ``session``, ``acq``,
        ``run``, ``rec`` are None when absent. ``run`` keeps its zero padding.
    suffix : str
        ``"MEGRE"`` or ``"T2starw"``.
    magnitude, phase : list of Path
        One image per echo, sorted by echo time (absolute paths).
    echo_times : list of float
        s, strictly increasing.
    b0 : float
        Field strength, T (sidecar ``MagneticFieldStrength`` or the override).
    phase_units : str
        ``"rad"``, ``"deg"`` or ``"integer"`` (:func:`detect_phase_units`; pass to
        :func:`load_phase`).
    shape : tuple of int
        3D grid.
    voxel_size : tuple of float
        mm.
    affine : ndarray
        4x4 voxel-to-world affine of the first phase echo.
    b0_dir : tuple of float
        Unit B0 direction in voxel coordinates, from the affine.
    root : Path or None
        BIDS dataset root (for :attr:`sources`).
    metadata : dict
        Sidecar metadata of the first phase echo (inheritance applied).
    b0_source : str
        ``"MagneticFieldStrength"`` or ``"override"``.
    phase_units_source : str
        ``"sidecar"`` (``Units``) or ``"detected"`` (value range).
    notes : list of str
        What discovery recovered or converted on the way (an ``EchoTime`` taken from the
        magnitude's sidecar, phase in degrees, non-finite or negative values set to 0); logged
        at discovery and written to every output sidecar as ``InputNotes``.
    provided_mask, provided_field : Path or None
        A brain mask and a total field (Hz) the user provides (``--mask-dir``,
        ``--field-dir``; found and checked by :func:`qsmprep.provided.attach_provided`):
        the chain uses them instead of computing them.
    """

    subject: str
    session: str | None
    acq: str | None
    run: str | None
    rec: str | None
    suffix: str
    magnitude: list[Path]
    phase: list[Path]
    echo_times: list[float]
    b0: float
    phase_units: str
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    b0_dir: tuple[float, float, float]
    root: Path | None = None
    metadata: dict = field(default_factory=dict, repr=False)
    b0_source: str = "MagneticFieldStrength"
    phase_units_source: str = "sidecar"
    notes: list[str] = field(default_factory=list)
    provided_mask: Path | None = None
    provided_field: Path | None = None

    @property
    def prefix(self) -> str:
        """``sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]``."""
        return _prefix(self.subject, self.session, self.acq, self.rec, self.run)

    @property
    def id(self) -> str:
        """Unique key of the acquisition (same as :attr:`prefix`)."""
        return self.prefix

    @property
    def n_echoes(self) -> int:
        """Number of echoes."""
        return len(self.echo_times)

    @property
    def sources(self) -> list[str]:
        """Input files as BIDS-relative POSIX paths (absolute when :attr:`root` is unknown)."""
        out = []
        for p in [*self.magnitude, *self.phase]:
            try:
                out.append(p.relative_to(self.root).as_posix() if self.root else str(p))
            except ValueError:
                out.append(str(p))
        return out

    def entities(self) -> dict:
        """BIDS entities (pybids names) of the acquisition, None where absent."""
        return {
            "subject": self.subject,
            "session": self.session,
            "acquisition": self.acq,
            "reconstruction": self.rec,
            "run": self.run,
        }

    def to_dict(self) -> dict:
        """JSON-able form (paths as strings, affine as nested lists); see :meth:`from_dict`."""
        return {
            "subject": self.subject,
            "session": self.session,
            "acq": self.acq,
            "run": self.run,
            "rec": self.rec,
            "suffix": self.suffix,
            "magnitude": [str(p) for p in self.magnitude],
            "phase": [str(p) for p in self.phase],
            "echo_times": [float(t) for t in self.echo_times],
            "b0": float(self.b0),
            "phase_units": self.phase_units,
            "shape": [int(n) for n in self.shape],
            "voxel_size": [float(v) for v in self.voxel_size],
            "affine": np.asarray(self.affine, float).tolist(),
            "b0_dir": [float(v) for v in self.b0_dir],
            "root": str(self.root) if self.root is not None else None,
            "metadata": self.metadata,
            "b0_source": self.b0_source,
            "phase_units_source": self.phase_units_source,
            "notes": list(self.notes),
            "provided_mask": str(self.provided_mask) if self.provided_mask else None,
            "provided_field": str(self.provided_field) if self.provided_field else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Acquisition:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["magnitude"] = [Path(p) for p in d["magnitude"]]
        d["phase"] = [Path(p) for p in d["phase"]]
        d["echo_times"] = [float(t) for t in d["echo_times"]]
        d["shape"] = tuple(int(n) for n in d["shape"])
        d["voxel_size"] = tuple(float(v) for v in d["voxel_size"])
        d["affine"] = np.asarray(d["affine"], dtype=float)
        d["b0_dir"] = tuple(float(v) for v in d["b0_dir"])
        d["root"] = Path(d["root"]) if d.get("root") is not None else None
        for key in ("provided_mask", "provided_field"):
            d[key] = Path(d[key]) if d.get(key) is not None else None
        return cls(**d)


def _prefix(subject, session=None, acq=None, rec=None, run=None) -> str:
    parts = [f"sub-{subject}"]
    for key, val in (("ses", session), ("acq", acq), ("rec", rec), ("run", run)):
        if val is not None:
            parts.append(f"{key}-{val}")
    return "_".join(parts)


# --------------------------------------------------------------------------------------------
# discovery


def _check_bids_dir(bids_dir) -> Path:
    root = Path(bids_dir).expanduser().resolve()
    if not root.is_dir():
        raise BIDSInputError(
            f"BIDS dataset folder {root} does not exist (or is not a folder); give the root of "
            "a BIDS dataset (the folder holding dataset_description.json and sub-<label>/)",
            path=root,
        )
    if not (root / "dataset_description.json").is_file():
        raise BIDSInputError(
            f"{root} is not a BIDS dataset: {root / 'dataset_description.json'} is missing. "
            "Give the dataset root, or add a dataset_description.json with at least "
            '{"Name": "...", "BIDSVersion": "1.9.0"} (see the BIDS specification)',
            path=root / "dataset_description.json",
        )
    return root


def _labels(labels, key: str) -> list[str] | None:
    """Labels without their ``sub-`` / ``ses-`` prefix; None when no selection is given."""
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = labels.split()
    out = []
    for lab in labels:
        lab = str(lab).strip()
        if lab.startswith(f"{key}-"):
            lab = lab[len(key) + 1 :]
        if not _LABEL.fullmatch(lab):
            raise BIDSInputError(
                f"invalid {key} label {lab!r}: BIDS labels are alphanumeric (e.g. '01'), "
                f"given with or without the '{key}-' prefix"
            )
        if lab not in out:
            out.append(lab)
    return out or None


def make_layout(bids_dir, participant_label=None):
    """A fast pybids layout of ``bids_dir`` for qsmprep's queries.

    In-memory index (no database file), no validation, no derivatives; only ``anat`` folders
    are indexed (and only the selected participants' when ``participant_label`` is given), and
    metadata are indexed for the suffixes qsmprep reads (:data:`SUFFIXES`).
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    root = _check_bids_dir(bids_dir)
    ignore = [
        re.compile(r"^/(code|sourcedata|stimuli|models|derivatives)(/|$)"),
        re.compile(r"/\."),
        # every folder of a subject/session other than anat
        re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?(?!anat/|ses-)[^/]+/"),
    ]
    subjects = _labels(participant_label, "sub")
    if subjects:
        alt = "|".join(re.escape(s) for s in subjects)
        ignore.append(re.compile(rf"^/sub-(?!({alt})(/|_|$))"))
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, suffix=list(SUFFIXES))
    return BIDSLayout(str(root), validate=False, derivatives=False, indexer=indexer)


def _split_filters(bids_filters) -> dict[str, dict]:
    """Per-suffix pybids filters from a flat or a per-suffix dict (see collect_acquisitions)."""
    from bids.layout import Query

    if bids_filters is None:
        return {s: {} for s in SUFFIXES}
    if not isinstance(bids_filters, Mapping):
        raise BIDSInputError(
            f"bids_filters must be a dict of pybids entity filters, got "
            f'{type(bids_filters).__name__}; e.g. {{"megre": {{"acquisition": "ori1"}}}}'
        )
    keys = {str(k).lower() for k in bids_filters}
    lower = {s.lower(): s for s in SUFFIXES}
    if bids_filters and keys <= set(lower):
        per = {lower[str(k).lower()]: v for k, v in bids_filters.items()}
        for k, v in per.items():
            if not isinstance(v, Mapping):
                raise BIDSInputError(
                    f"bids_filters[{k.lower()!r}] must be a dict of entity filters, got {v!r}"
                )
        per = {s: dict(per.get(s, {})) for s in SUFFIXES}
    else:
        per = {s: dict(bids_filters) for s in SUFFIXES}

    def conv(v):
        if v is None:
            return Query.NONE
        if v == "*":
            return Query.ANY
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    for s, flt in per.items():
        for k in ("part", "extension", "datatype"):
            if k in flt:
                raise BIDSInputError(
                    f"bids_filters may not set {k!r} (qsmprep reads {s} part-mag/part-phase "
                    "NIfTI images in anat/); remove it from the filter file"
                )
        per[s] = {k: conv(v) for k, v in flt.items()}
    return per


def _available_subjects(root: Path, layout) -> list[str]:
    on_disk = {p.name[4:] for p in root.glob("sub-*") if p.is_dir()}
    return sorted(on_disk | set(layout.get_subjects()))


def collect_acquisitions(
    bids_dir,
    *,
    participant_label=None,
    session_label=None,
    bids_filters: Mapping | None = None,
    b0: float | None = None,
    layout=None,
    errors: list | None = None,
) -> list[Acquisition]:
    """Discover and validate the GRE acquisitions of a BIDS dataset with pybids.

    Queries ``anat`` ``MEGRE`` and ``T2starw`` images with ``part-mag`` / ``part-phase``,
    groups them by subject, session, ``acq``, ``run``, ``rec`` (and suffix), pairs magnitude
    and phase per echo, reads ``EchoTime`` (s) and ``MagneticFieldStrength`` (T) from the
    sidecars, checks the images' grids (headers only) and the phase units (sidecar ``Units``,
    else the first phase echo's values).

    Parameters
    ----------
    bids_dir : path
        Root of a BIDS raw dataset (must hold ``dataset_description.json``).
    participant_label, session_label : str or list of str, optional
        Labels with or without the ``sub-`` / ``ses-`` prefix; every given label must exist.
    bids_filters : dict, optional
        pybids entity filters (fMRIPrep's ``--bids-filter-file`` style) narrowing the query,
        either per suffix, ``{"megre": {"acquisition": "ori1"}, "t2starw": {...}}`` (keys
        ``megre`` / ``t2starw``, case-insensitive; a suffix not named is unfiltered), or flat,
        ``{"acquisition": "ori1", "run": [1, 2]}``, applied to both suffixes. Values may be
        lists; ``null`` means "entity absent" and ``"*"`` "entity present". A flat
        ``"suffix"`` (``"MEGRE"``, ``"T2starw"`` or a list) picks the suffixes read. ``part``,
        ``extension`` and ``datatype`` cannot be filtered.
    b0 : float, optional
        Field strength override, T (``--b0``); otherwise ``MagneticFieldStrength``.
    layout : bids.BIDSLayout, optional
        A prebuilt layout of ``bids_dir`` (default :func:`make_layout`).
    errors : list, optional
        When given, an invalid acquisition is skipped and its :class:`BIDSInputError`
        appended here, so one bad acquisition does not stop the others (likewise a requested
        participant without GRE images, when others have some); otherwise the first invalid
        acquisition raises. Selection errors (not a BIDS dataset, unknown labels, nothing at
        all to process) always raise.

    Returns
    -------
    list of Acquisition
        Sorted by subject, session, suffix, acq, rec, run.

    Raises
    ------
    BIDSInputError
        Naming the file (or labels) and the fix.
    """

    root = _check_bids_dir(bids_dir)
    subjects = _labels(participant_label, "sub")
    sessions = _labels(session_label, "ses")
    if b0 is not None and not (np.isfinite(float(b0)) and float(b0) > 0):
        raise BIDSInputError(f"b0 override must be a positive field strength in T, got {b0!r}")
    filters = _split_filters(bids_filters)
    if layout is None:
        layout = make_layout(root, participant_label=subjects)

    available = _available_subjects(root, layout)
    if subjects:
        missing = [s for s in subjects if s not in available]
        if missing:
            raise BIDSInputError(
                f"participant label(s) {', '.join(missing)} not found in {root}; available: "
                f"{', '.join(available) or 'none'}. Fix --participant-label"
            )
    if not available:
        raise BIDSInputError(f"no sub-<label> folders in {root}: the dataset has no participants")
    if sessions:
        known = sorted(layout.get_sessions(**({"subject": subjects} if subjects else {})))
        missing = [s for s in sessions if s not in known]
        if missing:
            raise BIDSInputError(
                f"session label(s) {', '.join(missing)} not found in {root}"
                + (f" for sub-{', sub-'.join(subjects)}" if subjects else "")
                + f"; available: {', '.join(known) or 'none (the dataset has no sessions)'}. "
                "Fix --session-label"
            )

    base = {"datatype": "anat", "part": ["mag", "phase"], "extension": list(_NIFTI_EXT)}
    if subjects:
        base["subject"] = subjects
    if sessions:
        base["session"] = sessions
    groups: dict[tuple, list] = {}
    for suffix in SUFFIXES:
        flt = dict(filters[suffix])
        wanted = flt.pop("suffix", suffix)
        if suffix not in (wanted if isinstance(wanted, list) else [wanted]):
            continue
        query = {**base, **flt, "suffix": suffix}
        try:
            files = layout.get(**query)
        except ValueError as exc:
            raise BIDSInputError(
                f"invalid bids_filters for {suffix}: {exc}. Use pybids entity names "
                "(subject, session, acquisition, run, reconstruction, echo, ...)"
            ) from exc
        for f in files:
            ent = f.get_entities()
            key = (
                str(ent["subject"]),
                _opt(ent.get("session")),
                _opt(ent.get("acquisition")),
                _opt(ent.get("run")),
                _opt(ent.get("reconstruction")),
                suffix,
            )
            groups.setdefault(key, []).append(f)

    if not groups:
        sel = f"sub-{', sub-'.join(subjects)}" if subjects else f"{len(available)} participant(s)"
        if sessions:
            sel += f", ses-{', ses-'.join(sessions)}"
        raise BIDSInputError(
            f"no {' or '.join(SUFFIXES)} images with part-mag/part-phase found in {root} for "
            f"{sel}" + (f" with filters {bids_filters}" if bids_filters else "") + ". qsmprep "
            "needs sub-<label>/anat/sub-<label>_echo-<n>_part-mag_MEGRE.nii.gz and "
            "..._part-phase_MEGRE.nii.gz (with JSON sidecars); check the labels and filters "
            f"(participants present: {', '.join(available)})"
        )

    order = {s: i for i, s in enumerate(SUFFIXES)}
    pending: list[BIDSInputError] = []
    for sub in subjects or []:
        if not any(k[0] == sub for k in groups):
            pending.append(
                BIDSInputError(
                    f"sub-{sub}: no {' or '.join(SUFFIXES)} images with part-mag/part-phase "
                    f"found in {root / ('sub-' + sub)}"
                    + (f" (sessions {', '.join(sessions)})" if sessions else "")
                    + (f" with filters {bids_filters}" if bids_filters else "")
                    + "; add anat/sub-<label>_echo-<n>_part-{mag,phase}_MEGRE.nii.gz, or drop "
                    "the label from --participant-label",
                    acquisition=f"sub-{sub}",
                )
            )
    if pending:
        if errors is None:
            raise pending[0]
        errors.extend(pending)
    keys = sorted(
        groups, key=lambda k: (k[0], k[1] or "", order[k[5]], *(v or "" for v in k[2:5]))
    )
    out: list[Acquisition] = []
    seen: dict[str, Acquisition] = {}
    for key in keys:
        try:
            acq = _build_acquisition(root, key, groups[key], b0)
            if acq.id in seen:
                other = seen[acq.id]
                raise BIDSInputError(
                    f"{acq.id}: both {other.suffix} and {acq.suffix} images share the entities "
                    f"of {acq.id} ({_rel(acq.phase[0], root)}); derivative names would clash. "
                    "Give them different acq- labels, or narrow the selection with "
                    "--bids-filter-file",
                    path=acq.phase[0],
                    acquisition=acq.id,
                )
        except BIDSInputError as exc:
            if errors is None:
                raise
            errors.append(exc)
            continue
        seen[acq.id] = acq
        out.append(acq)
        for note in acq.notes:
            LOGGER.warning("%s: %s", acq.id, note)
    return out


def _opt(v) -> str | None:
    return None if v is None else str(v)


def _rel(path, root) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sidecar(path) -> Path:
    p = Path(path)
    name = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(name + ".json")


def _echo_index(ent) -> int | None:
    e = ent.get("echo")
    if e is None:
        return None
    try:
        return int(e)
    except (TypeError, ValueError):
        return None


def _build_acquisition(root: Path, key: tuple, files: list, b0_override) -> Acquisition:
    subject, session, acq, run, rec, suffix = key
    acq_id = _prefix(subject, session, acq, rec, run)

    def fail(msg, path=None):
        where = f"{_rel(path, root)}: " if path is not None else f"{acq_id} ({suffix}): "
        return BIDSInputError(where + msg, path=path, acquisition=acq_id)

    # 1. pair magnitude and phase per echo
    echoes: dict[int | None, dict[str, object]] = {}
    for f in files:
        ent = f.get_entities()
        e = _echo_index(ent)
        part = ent["part"]
        slot = echoes.setdefault(e, {})
        if part in slot:
            raise fail(
                f"two {part} images for {'echo-' + str(e) if e is not None else 'one echo'}: "
                f"{_rel(slot[part].path, root)} and {_rel(f.path, root)}. Keep one, or select "
                "one with --bids-filter-file",
                path=f.path,
            )
        slot[part] = f
    if None in echoes and len(echoes) > 1:
        p = echoes[None].get("phase") or echoes[None].get("mag")
        raise fail(
            "images with and without an echo- entity in one acquisition; name every echo "
            "sub-<label>_echo-<n>_part-<mag|phase>_" + suffix,
            path=p.path,
        )
    numbers = sorted(echoes, key=lambda e: -1 if e is None else e)
    for e in numbers:
        slot = echoes[e]
        if "mag" not in slot:
            p = Path(slot["phase"].path)
            raise fail(
                "phase image without a magnitude image of the same echo; add "
                f"{p.name.replace('part-phase', 'part-mag')} (qsmprep needs the magnitude for "
                "masking and weighting)",
                path=p,
            )
        if "phase" not in slot:
            p = Path(slot["mag"].path)
            raise fail(
                "magnitude image without a phase image of the same echo; add "
                f"{p.name.replace('part-mag', 'part-phase')} (QSM needs the phase of every "
                "echo), or exclude this acquisition with --bids-filter-file",
                path=p,
            )
    mags = [Path(echoes[e]["mag"].path) for e in numbers]
    phases = [Path(echoes[e]["phase"].path) for e in numbers]
    meta_p = [echoes[e]["phase"].get_metadata() for e in numbers]
    meta_m = [echoes[e]["mag"].get_metadata() for e in numbers]

    # 2. echo times (s), strictly increasing in echo order
    notes: list[str] = []
    tes = []
    for p, m, pm, mm in zip(phases, mags, meta_p, meta_m, strict=True):
        te = pm.get("EchoTime")
        if te is None and mm.get("EchoTime") is not None:
            te = mm.get("EchoTime")
            notes.append(
                f"EchoTime missing from {_sidecar(p).name}: took {te} s from the magnitude's "
                f"sidecar {_sidecar(m).name}"
            )
        if te is None:
            raise fail(
                f'EchoTime is missing from the sidecar {_sidecar(p).name}; add "EchoTime" '
                "(in seconds, e.g. 0.005) to it (and to the magnitude's sidecar)",
                path=p,
            )
        try:
            te = float(te)
        except (TypeError, ValueError):
            raise fail(
                f"EchoTime {te!r} in {_sidecar(p).name} is not a number; write it in seconds",
                path=p,
            ) from None
        if not (np.isfinite(te) and 0 < te < 1):
            raise fail(
                f"EchoTime {te!r} in {_sidecar(p).name} is not a plausible time in seconds "
                "(0 < TE < 1 s); BIDS EchoTime is in seconds (e.g. 0.005, not 5)",
                path=p,
            )
        te_m = mm.get("EchoTime")
        if te_m is not None and abs(float(te_m) - te) > 1e-6:
            raise fail(
                f"magnitude EchoTime {te_m} s ({_sidecar(m).name}) differs from the phase "
                f"EchoTime {te} s ({_sidecar(p).name}); fix the sidecars so each echo's "
                "magnitude and phase agree",
                path=m,
            )
        tes.append(te)
    for i in range(1, len(tes)):
        if tes[i] == tes[i - 1]:
            raise fail(
                f"duplicate echo time {tes[i]} s in {_sidecar(phases[i - 1]).name} and "
                f"{_sidecar(phases[i]).name}; every echo needs its own EchoTime (fix the "
                "sidecars or the echo- labels)",
                path=phases[i],
            )
        if tes[i] < tes[i - 1]:
            raise fail(
                f"echoes out of order: echo-{numbers[i]} has EchoTime {tes[i]} s, shorter than "
                f"echo-{numbers[i - 1]} ({tes[i - 1]} s, {phases[i - 1].name}); number echoes "
                "in order of increasing EchoTime (rename the files or fix the sidecars)",
                path=phases[i],
            )

    # 3. field strength
    if b0_override is not None:
        b0, b0_source = float(b0_override), "override"
    else:
        b0 = meta_p[0].get("MagneticFieldStrength", meta_m[0].get("MagneticFieldStrength"))
        if b0 is None:
            raise fail(
                f"MagneticFieldStrength is missing from the sidecar {_sidecar(phases[0]).name}; "
                'add "MagneticFieldStrength" (tesla, e.g. 3) to the sidecars (or a top-level '
                f"{suffix}.json), or give the field strength with --b0",
                path=phases[0],
            )
        try:
            b0 = float(b0)
        except (TypeError, ValueError):
            b0 = float("nan")
        if not (np.isfinite(b0) and b0 > 0):
            raise fail(
                f"MagneticFieldStrength {meta_p[0].get('MagneticFieldStrength')!r} in "
                f"{_sidecar(phases[0]).name} is not a positive number of tesla; fix it or give "
                "--b0",
                path=phases[0],
            )
        b0_source = "MagneticFieldStrength"
        for f, meta in zip([*phases, *mags], [*meta_p, *meta_m], strict=True):
            other = meta.get("MagneticFieldStrength")
            try:
                differs = other is not None and abs(float(other) - b0) > 1e-3 * b0
            except (TypeError, ValueError):
                differs = True
            if differs:
                raise fail(
                    f"MagneticFieldStrength {other!r} in {_sidecar(f).name} differs from "
                    f"{b0:g} T in {_sidecar(phases[0]).name}; all echoes of one acquisition "
                    "come from one scanner: fix the sidecars (or give the field strength "
                    "with --b0)",
                    path=f,
                )

    # 4. grids (headers only)
    ref_shape = ref_affine = ref_zooms = None
    for p, m in zip(phases, mags, strict=True):
        sp, ap, zp = _header(p, "phase", fail)
        sm, am, _ = _header(m, "magnitude", fail)
        if sp != sm:
            raise fail(
                f"magnitude {m.name} has shape {sm} but phase {p.name} has shape {sp}; "
                "magnitude and phase of each echo must share one voxel grid (reconvert both "
                "from the same series)",
                path=p,
            )
        if not np.allclose(ap, am, atol=_AFFINE_ATOL):
            raise fail(
                f"magnitude {m.name} and phase {p.name} have different affines (grids); "
                "reconvert both from the same series so they share one voxel grid",
                path=p,
            )
        if ref_shape is None:
            ref_shape, ref_affine, ref_zooms = sp, ap, zp
        elif sp != ref_shape or not np.allclose(ap, ref_affine, atol=_AFFINE_ATOL):
            raise fail(
                f"echo image {p.name} (shape {sp}) is not on the grid of {phases[0].name} "
                f"(shape {ref_shape}); all echoes of one acquisition must share one grid",
                path=p,
            )

    # 5. phase units: sidecar (the same for every echo), checked against the first phase
    # echo's values, else detected from them
    try:
        declared = [
            _units_from_sidecar(m, path=_rel(p, root)) for p, m in zip(phases, meta_p, strict=True)
        ]
        phase_units = detect_phase_units(nib.load(str(phases[0])), meta_p[0], path=phases[0])
    except BIDSInputError as exc:
        # the file named as in every other message: relative to the dataset
        msg = str(exc).replace(str(phases[0]), _rel(phases[0], root), 1)
        raise BIDSInputError(msg, path=exc.path, acquisition=acq_id) from None
    for p, u in zip(phases[1:], declared[1:], strict=True):
        if u != declared[0]:
            raise fail(
                f"phase Units {u or '(none)'!r} in {_sidecar(p).name} differ from "
                f"{declared[0] or '(none)'!r} in {_sidecar(phases[0]).name}; give every phase "
                "echo the same Units",
                path=p,
            )
    units_source = "sidecar" if declared[0] in ("rad", "deg") else "detected"
    if phase_units == "deg":
        notes.append(
            "phase in degrees ("
            + ('sidecar "Units"' if units_source == "sidecar" else "values span +-180")
            + "): converted to radians"
        )

    # 6. values: magnitude non-negative and finite, phase finite
    for m in mags:
        notes += _check_magnitude_values(m, fail, root)

    return Acquisition(
        subject=subject,
        session=session,
        acq=acq,
        run=run,
        rec=rec,
        suffix=suffix,
        magnitude=mags,
        phase=phases,
        echo_times=tes,
        b0=b0,
        phase_units=phase_units,
        shape=ref_shape,
        voxel_size=ref_zooms,
        affine=ref_affine,
        b0_dir=b0_dir_from_affine(ref_affine),
        root=root,
        metadata=dict(meta_p[0]),
        b0_source=b0_source,
        phase_units_source=units_source,
        notes=notes,
    )


def _header(path: Path, what: str, fail):
    """3D shape, affine and voxel size from a header; 4D/5D (echoes, coils) is an error."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for broken files
        raise fail(f"cannot read the {what} image ({exc}); replace the file", path=path) from exc
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise fail(f"{what} image has shape {shape}; qsmprep needs 3D volumes", path=path)
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        kind = (
            "uncombined coil channels (5D)"
            if len(shape) >= 5
            else f"{shape[3]} volumes (4D: echoes or coil channels in one file)"
        )
        raise fail(
            f"{what} image has shape {shape}: {kind}. qsmprep needs one coil-combined 3D "
            "image per echo: combine the coils on the scanner or offline, and split echoes "
            f"into sub-<label>_echo-<n>_part-{'phase' if what == 'phase' else 'mag'}_<suffix> "
            "files with their own sidecars",
            path=path,
        )
    raw = _raw_header(img, path)
    if raw is not None:
        # nibabel silently turns a zero voxel size into 1 mm; read what the file says
        pixdim = tuple(float(z) for z in raw["pixdim"][1:4])
        if not all(np.isfinite(z) and z > 0 for z in pixdim):
            raise fail(
                f"{what} image has voxel size (pixdim) {pixdim} in its NIfTI header: the "
                "voxel size is unknown. Reconvert the DICOMs (e.g. with dcm2niix) so the "
                "header carries the scanner geometry",
                path=path,
            )
        if int(raw["qform_code"]) == 0 and int(raw["sform_code"]) == 0:
            raise fail(
                f"{what} image has no orientation in its NIfTI header (qform_code and "
                "sform_code are 0), so its position and the direction of B0 in it are "
                "unknown. Reconvert the DICOMs (e.g. with dcm2niix) so the header carries "
                "the scanner geometry",
                path=path,
            )
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise fail(f"{what} image has voxel size {zooms}; fix the NIfTI header", path=path)
    return shape[:3], np.asarray(img.affine, dtype=float), zooms


def _raw_header(img, path):
    """The NIfTI header as stored (without nibabel's fixes), or None for other formats."""
    cls = type(img.header)
    if not isinstance(img.header, nib.Nifti1Header):
        return None
    with nib.openers.ImageOpener(str(path)) as fobj:
        return cls.from_fileobj(fobj, check=False)


_NEGATIVE_FRACTION = 0.01  # of nonzero voxels: above it a "magnitude" is not a magnitude


def _check_magnitude_values(path: Path, fail, root) -> list[str]:
    """Refuse a magnitude that is not one; describe what :func:`load_magnitude` will zero."""
    v = np.asarray(_read_3d(path, "magnitude")[0], dtype=np.float32)
    finite = np.isfinite(v)
    n_bad = int(v.size - np.count_nonzero(finite))
    v = np.where(finite, v, 0.0)
    nonzero = np.count_nonzero(v)
    if nonzero == 0:
        raise fail("magnitude image is zero everywhere; replace it", path=path)
    n_neg = int(np.count_nonzero(v < 0))
    if n_neg > _NEGATIVE_FRACTION * nonzero:
        raise fail(
            f"magnitude image has negative values in {n_neg} voxels ({100 * n_neg / nonzero:.0f} "
            "% of the nonzero ones): it looks like a real or imaginary part or a phase, not a "
            "magnitude. Give the magnitude image (part-mag)",
            path=path,
        )
    notes = []
    if n_bad:
        notes.append(f"{_rel(path, root)}: {n_bad} non-finite (NaN or inf) values set to 0")
    if n_neg:
        notes.append(f"{_rel(path, root)}: {n_neg} negative values set to 0")
    return notes


# --------------------------------------------------------------------------------------------
# images


_UNIT_NAMES = {
    "rad": ("rad", "rads", "radian", "radians"),
    "deg": ("deg", "degs", "degree", "degrees", "\u00b0"),
    "arbitrary": ("arbitrary", "a.u.", "au", "arb", "arbitrary units", "n/a"),
}
_FIELD_UNITS = ("hz", "ppm", "ppb", "rad/s", "t", "ut", "nt")


def _units_from_sidecar(meta: Mapping | None, *, path=None) -> str | None:
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
    declared = _units_from_sidecar(sidecar, path=path)
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


def _read_3d(path, what: str) -> tuple[np.ndarray, nib.Nifti1Image]:
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
    data, _ = _read_3d(path, "phase")
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
    data, _ = _read_3d(path, "magnitude")
    v = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.maximum(v, 0.0)


# --------------------------------------------------------------------------------------------
# orientations


def _same_grid(a: Acquisition, b: Acquisition) -> bool:
    """Same shape and voxel size, and affines related by a rigid transform (A_b = T A_a)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    if not np.allclose(a.voxel_size, b.voxel_size, rtol=_ZOOM_RTOL, atol=0):
        return False
    la, lb = np.asarray(a.affine)[:3, :3], np.asarray(b.affine)[:3, :3]
    r = lb @ np.linalg.inv(la)
    return bool(np.allclose(r @ r.T, np.eye(3), atol=_ROT_ATOL) and np.linalg.det(r) > 0)


def _angle_deg(u, v) -> float:
    """Angle between two B0 directions (sign-free: b and -b give the same dipole kernel)."""
    c = abs(float(np.dot(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(c, 0.0, 1.0))))


def group_orientations(
    acquisitions: Sequence[Acquisition], min_angle_deg: float = COSMOS_MIN_ANGLE_DEG
) -> dict[tuple[str, str | None], list[Acquisition]]:
    """COSMOS candidates: acquisitions of one subject/session on one grid at several orientations.

    Within each (subject, session), acquisitions are clustered by grid (equal shape and voxel
    size, affines related by a rigid transform; see the module doc for how orientations must
    be stored). A cluster qualifies when it holds at least two B0 directions more than
    ``min_angle_deg`` apart (angle between directions up to sign); all its acquisitions are
    returned (a repeated orientation adds data). When several clusters of one
    (subject, session) qualify, the largest one is kept (the first one on ties).

    Returns
    -------
    dict
        ``{(subject, session): [Acquisition, ...]}`` (session None when absent), acquisitions in
        input order; only qualifying subjects/sessions appear.
    """
    by_key: dict[tuple, list[list[Acquisition]]] = {}
    for acq in acquisitions:
        clusters = by_key.setdefault((acq.subject, acq.session), [])
        for c in clusters:
            if _same_grid(c[0], acq):
                c.append(acq)
                break
        else:
            clusters.append([acq])
    out = {}
    for key, clusters in by_key.items():
        good = [
            c
            for c in clusters
            if len(c) >= 2
            and any(
                _angle_deg(x.b0_dir, y.b0_dir) > min_angle_deg
                for i, x in enumerate(c)
                for y in c[i + 1 :]
            )
        ]
        if good:
            out[key] = max(good, key=len)
    return out


# --------------------------------------------------------------------------------------------
# derivatives


def _check_label(value, what: str) -> str:
    s = str(value)
    if not _LABEL.fullmatch(s):
        raise ValueError(f"{what} must be alphanumeric (a BIDS label), got {value!r}")
    return s


def derivative_path(
    output_dir,
    acq_or_entities,
    *,
    desc: str | None = None,
    suffix: str,
    extension: str = ".nii.gz",
    datatype: str = "anat",
) -> Path:
    """Path of a qsmprep derivative (the naming table in the module doc).

    ``output_dir/sub-<label>[/ses-<label>]/<datatype>/<prefix>[_desc-<desc>]_<suffix><ext>``.

    Parameters
    ----------
    output_dir : path
        Root of the derivative dataset.
    acq_or_entities : Acquisition, dict or tuple
        An :class:`Acquisition` (its :attr:`~Acquisition.prefix`); a dict with ``subject`` and
        optionally ``session``, ``acq`` (or ``acquisition``), ``rec`` (or ``reconstruction``),
        ``run`` (labels with or without their prefixes); or a ``(subject, session)`` tuple, the
        key of :func:`group_orientations` -- e.g. ``derivative_path(out, ("01", None),
        desc="cosmos", suffix="Chimap")`` is ``out/sub-01/anat/sub-01_desc-cosmos_Chimap.nii.gz``.
    desc : str, optional
        ``desc-`` label (``brain``, ``local``, ``total``, ``noise``, a method name, ...).
    suffix : str
        ``mask``, ``fieldmap``, ``Chimap``, ``R2starmap``, ``T2starmap``, ``S0map``,
        ``metrics``, ...
    extension : str
        ``.nii.gz`` (default), ``.json``, ``.tsv``, ...
    datatype : str
        Folder under the subject/session (default ``anat``).
    """
    if isinstance(acq_or_entities, Acquisition):
        a = acq_or_entities
        ent = (a.subject, a.session, a.acq, a.rec, a.run)
    elif isinstance(acq_or_entities, Mapping):
        e = acq_or_entities

        def get(*names):
            for n in names:
                if e.get(n) is not None:
                    return str(e[n])
            return None

        ent = (
            get("subject", "sub"),
            get("session", "ses"),
            get("acq", "acquisition"),
            get("rec", "reconstruction"),
            get("run"),
        )
    elif isinstance(acq_or_entities, tuple) and len(acq_or_entities) == 2:
        ent = (acq_or_entities[0], acq_or_entities[1], None, None, None)
    else:
        raise TypeError(
            "acq_or_entities must be an Acquisition, a dict of entities or a (subject, session)"
            f" tuple, got {type(acq_or_entities).__name__}"
        )
    if ent[0] is None:
        raise ValueError("derivative_path needs a subject label")
    keys = ("sub", "ses", "acq", "rec", "run")
    clean = []
    for k, v in zip(keys, ent, strict=True):
        if v is None:
            clean.append(None)
            continue
        v = str(v)
        if v.startswith(f"{k}-"):
            v = v[len(k) + 1 :]
        clean.append(_check_label(v, k))
    sub, ses = clean[0], clean[1]
    name = _prefix(*clean)
    if desc is not None:
        name += f"_desc-{_check_label(desc, 'desc')}"
    name += f"_{_check_label(suffix, 'suffix')}"
    if not extension.startswith("."):
        extension = "." + extension
    folder = Path(output_dir) / f"sub-{sub}"
    if ses is not None:
        folder = folder / f"ses-{ses}"
    return folder / datatype / (name + extension)


def write_dataset_description(output_dir, *, bids_dir=None) -> Path:
    """Write ``output_dir/dataset_description.json`` of the qsmprep derivative dataset.

    ``DatasetType`` derivative, BIDS 1.9.0, ``GeneratedBy`` qsmprep with its version, and
    ``SourceDatasets`` (a ``file://`` URL) when ``bids_dir`` is given. Written to a temporary
    name and renamed, so the file is always complete (concurrent array jobs write the same
    content); an existing file is replaced.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    desc = {
        "Name": "qsmprep: quantitative susceptibility maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "qsmprep",
                "Version": __version__,
                "Description": "Quantitative susceptibility mapping from multi-echo GRE "
                "magnitude and phase",
            }
        ],
    }
    if bids_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
    from qsmprep._atomic import write_text

    return write_text(out / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
