"""Discovery: the GRE acquisitions of a BIDS raw dataset, found with pybids.

qsmprep reads anatomical gradient-echo magnitude + phase from a BIDS raw dataset::

    sub-<label>[/ses-<label>]/anat/
        sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]
            _echo-<n>_part-mag_MEGRE.nii[.gz]     (+ .json)   multi-echo GRE
            _echo-<n>_part-phase_MEGRE.nii[.gz]   (+ .json)
            [_echo-<n>]_part-{mag,phase}_T2starw.nii[.gz]     single-echo (or multi-echo) GRE

Files are grouped into one :class:`~qsmprep.bids.acquisition.Acquisition` per subject,
session, ``acq``, ``run`` and ``rec`` (and suffix). Every echo needs a magnitude and a phase
image of one 3D grid, and a sidecar with ``EchoTime`` (s); the field strength comes from
``MagneticFieldStrength`` (T) unless an override is given. Images without a ``part`` entity (or
with ``part-real`` / ``part-imag``) are not used. Sidecar inheritance follows BIDS (pybids).
Each group is validated by :func:`qsmprep.bids.checks.build_acquisition`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qsmprep.bids.acquisition import LABEL, SUFFIXES, Acquisition, BIDSInputError
from qsmprep.bids.checks import build_acquisition, relative_path

__all__ = ["collect_acquisitions", "make_layout"]

_NIFTI_EXT = (".nii", ".nii.gz")
LOGGER = logging.getLogger("qsmprep.bids")


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
        if not LABEL.fullmatch(lab):
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
            acq = build_acquisition(root, key, groups[key], b0)
            if acq.id in seen:
                other = seen[acq.id]
                raise BIDSInputError(
                    f"{acq.id}: both {other.suffix} and {acq.suffix} images share the entities "
                    f"of {acq.id} ({relative_path(acq.phase[0], root)}); derivative names "
                    "would clash. Give them different acq- labels, or narrow the selection "
                    "with --bids-filter-file",
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
