"""Finding the target scans: a qsmprep output directory or a BIDS dataset, and their references.

:func:`find_target_scans` loads every usable local field of a target directory as a
:class:`TargetScan` (see :mod:`qsmprep.dl.target` for the sources and the units) and attaches
a reference susceptibility map to each when one is asked for.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmprep.nifti import load
from qsmprep.recon.kernels import b0_dir_from_affine, hz_to_ppm

__all__ = ["TargetScan", "detect_source", "find_target_scans", "split_by_subject"]

log = logging.getLogger(__name__)

LOCAL_FIELD = "_desc-local_fieldmap.nii.gz"
LOCAL_MASK = "_desc-local_mask.nii.gz"
NOISE_FIELD = "_desc-noise_fieldmap.nii.gz"
DEFAULT_TE = 0.02
"""Echo time (s) for the phase scale when a scan names none."""


@dataclass
class TargetScan:
    """One target scan on its own grid.

    Attributes
    ----------
    name : str
        BIDS prefix (``sub-01_acq-ori1``).
    field_ppm : (X, Y, Z) float32
        Local field, ppm (0 outside the mask).
    mask : (X, Y, Z) bool
        Where the local field is valid.
    noise : (X, Y, Z) float32 or None
        Field standard deviation (any unit; only its relative size is used), or None.
    voxel_size : 3 floats
        mm.
    b0_dir : 3 floats
        Unit B0 direction in voxel axes.
    b0 : float
        Field strength, T.
    te : float
        Echo time (s) of the phase scale.
    chi : (X, Y, Z) float32 or None
        Reference susceptibility (ppm) on the same grid, or None.
    source : str
        Where the field came from (file or acquisition).
    reference : str or None
        File of the reference map.
    """

    name: str
    field_ppm: np.ndarray
    mask: np.ndarray
    noise: np.ndarray | None
    voxel_size: tuple[float, float, float]
    b0_dir: tuple[float, float, float]
    b0: float
    te: float
    chi: np.ndarray | None = None
    source: str = ""
    reference: str | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4), repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.field_ppm.shape)

    @property
    def subject(self) -> str:
        """The subject label (``01`` of ``sub-01_acq-ori1``); a name without a ``sub`` entity
        is its own subject."""
        return _entities(self.name).get("sub", self.name)


# ----------------------------------------------------------------------------- hold-out


def _natural(label: str) -> list:
    """Sort key of subject labels: digits by value (``2`` before ``10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


def split_by_subject(
    scans, *, holdout: int = 1, subjects=None
) -> tuple[list[TargetScan], list[TargetScan], str]:
    """Split target scans by subject into ``(training, held_out, note)``.

    All scans of a subject go to one side. ``subjects`` (labels, with or without ``sub-``)
    names the held-out subjects; otherwise the last ``holdout`` subjects by label (sorted with
    numbers by value) are held out, so the split depends only on the subject labels. With one
    subject, or ``holdout`` 0, nothing is held out and ``note`` says that validation uses the
    training scans; else ``note`` is ``"held-out subjects"``.

    Raises
    ------
    ValueError
        Named subjects that are not among the scans', or a split that leaves no subject to
        train on.
    """
    scans = list(scans)
    labels = sorted({s.subject for s in scans}, key=_natural)
    if subjects:
        held = {str(x).removeprefix("sub-") for x in subjects}
        unknown = sorted(held - set(labels), key=_natural)
        if unknown:
            raise ValueError(
                f"held-out target subjects {unknown} are not among the target's subjects "
                f"{labels}; name subjects of --target (labels without 'sub-')"
            )
    elif int(holdout) < 0:
        raise ValueError(f"target_holdout must be >= 0, got {holdout!r}")
    elif int(holdout) == 0:
        return scans, [], "training scans (target_holdout 0)"
    elif len(labels) == 1:
        log.warning(
            "target: one subject (sub-%s), so nothing is held out: the target validation "
            "metrics come from the training scans; give more subjects or --target-val-dir",
            labels[0],
        )
        return scans, [], "training scans (one subject)"
    else:
        held = set(labels[-int(holdout) :])
    if held >= set(labels):
        raise ValueError(
            f"holding out {sorted(held, key=_natural)} leaves no target subject to train on "
            f"(subjects {labels}); hold out fewer (--target-holdout) or give a separate "
            "validation dataset (--target-val-dir)"
        )
    train = [s for s in scans if s.subject not in held]
    val = [s for s in scans if s.subject in held]
    return train, val, "held-out subjects"


# ----------------------------------------------------------------------------- discovery


def _description(path: Path) -> dict | None:
    f = path / "dataset_description.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return {}


def detect_source(path) -> tuple[str, Path]:
    """``("derivatives" | "bids", root)`` for a target directory.

    A ``dataset_description.json`` with ``DatasetType: derivative`` marks a qsmprep output
    directory, any other one a BIDS raw dataset. Without one, ``derivatives/qsmprep`` below
    the directory (the layout of ``qsmprep demo``) or local field maps anywhere below it mark
    derivatives.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"target {root} does not exist or is not a directory; give a qsmprep output "
            "directory (e.g. OUT/derivatives/qsmprep) or a BIDS dataset"
        )
    desc = _description(root)
    if desc is not None:
        return ("derivatives" if desc.get("DatasetType") == "derivative" else "bids"), root
    sub = root / "derivatives" / "qsmprep"
    if sub.is_dir():
        return "derivatives", sub
    if next(iter(root.rglob("*" + LOCAL_FIELD)), None) is not None:
        return "derivatives", root
    raise ValueError(
        f"{root} is neither a qsmprep output directory (no *{LOCAL_FIELD} below it) nor a BIDS "
        "dataset (no dataset_description.json); give OUT/derivatives/qsmprep of a qsmprep run "
        "or the root of a BIDS dataset"
    )


def _entities(name: str) -> dict[str, str]:
    return dict(re.findall(r"(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9]+)", name))


def _sidecar(nii: Path) -> dict:
    js = Path(str(nii)[: -len(".nii.gz")] + ".json")
    if js.is_file():
        try:
            return json.loads(js.read_text())
        except ValueError as exc:
            raise ValueError(f"{js} is not valid JSON ({exc}); fix or remove it") from exc
    return {}


def _reference_candidates(reference, root: Path) -> tuple[str, object]:
    """How to look up the reference: ("file", Path) | ("glob", [paths]) | ("desc", label)."""
    if reference is None:
        return "none", None
    ref = str(reference)
    p = Path(ref).expanduser()
    if p.is_file():
        return "file", p
    if any(c in ref for c in "*?[") or "/" in ref or ref.endswith(".nii.gz"):
        pattern = ref if Path(ref).is_absolute() else str(root / "**" / ref)
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True))
        return "glob", files
    if not re.fullmatch(r"[a-zA-Z0-9]+", ref):
        raise ValueError(
            f"reference {ref!r} is neither a file, a glob pattern nor a desc label (letters "
            "and digits, e.g. 'cosmos')"
        )
    return "desc", ref


def _match_reference(kind, what, nii_dir: Path, name: str, shape, root: Path) -> Path | None:
    ent = _entities(name)
    if kind == "file":
        return what
    if kind == "desc":
        cands = [nii_dir / f"{name}_desc-{what}_Chimap.nii.gz"]
        subses = "_".join(f"{k}-{ent[k]}" for k in ("sub", "ses") if k in ent)
        if subses:
            cands.append(nii_dir / f"{subses}_desc-{what}_Chimap.nii.gz")
            cands += sorted(root.rglob(f"{subses}_desc-{what}_Chimap.nii.gz"))
        for c in cands:
            if c.is_file():
                return c
        return None
    if kind == "glob":
        for f in what:
            fe = _entities(f.name)
            if all(fe.get(k) == ent.get(k) for k in ("sub", "ses") if k in ent or k in fe):
                return f
        return None
    return None


def _attach_reference(scan: TargetScan, path: Path | None) -> str | None:
    """Load a reference chi onto ``scan`` (restricting its mask); the reason if unusable."""
    if path is None:
        return "no reference map found"
    chi, _ = load(path, ndim=3)
    if chi.shape != scan.shape:
        return f"reference {path} has shape {chi.shape}, the scan {scan.shape}"
    valid = np.isfinite(chi) & (chi != 0)
    mask = scan.mask & valid
    if mask.sum() < 0.5 * scan.mask.sum():
        return f"reference {path} covers less than half of the scan's mask"
    scan.chi = np.where(mask, chi, 0.0).astype(np.float32)
    scan.mask = mask
    scan.field_ppm = np.where(mask, scan.field_ppm, 0.0).astype(np.float32)
    scan.reference = str(path)
    return None


def _te_of(meta: dict, te) -> float:
    if te is not None:
        return float(te)
    t = meta.get("EchoTime")
    if t is None:
        return DEFAULT_TE
    return float(np.max(np.atleast_1d(np.asarray(t, float))))


def _from_derivatives(root: Path, *, reference, b0, te, skipped: list) -> list[TargetScan]:
    fields = sorted(
        p for p in root.rglob("*" + LOCAL_FIELD) if "work" not in p.relative_to(root).parts
    )
    if not fields:
        raise ValueError(
            f"no local field maps (*{LOCAL_FIELD}) under {root}; run "
            f"`qsmprep BIDS_DIR {root} participant` first, or give the BIDS dataset itself"
        )
    kind, what = _reference_candidates(reference, root)
    scans = []
    for f in fields:
        name = f.name[: -len(LOCAL_FIELD)]
        mask_file = f.parent / (name + LOCAL_MASK)
        if not mask_file.is_file():
            skipped.append(f"{f}: no {mask_file.name} beside it")
            continue
        meta = _sidecar(f)
        field_b0 = b0 if b0 is not None else meta.get("B0", meta.get("MagneticFieldStrength"))
        if field_b0 is None:
            skipped.append(f"{f}: its sidecar has no B0 (T); pass b0= (--b0) to set it")
            continue
        data, img = load(f, ndim=3)
        mask = load(mask_file, ndim=3)[0] > 0
        if data.shape != mask.shape:
            skipped.append(f"{f}: mask shape {mask.shape} differs from field {data.shape}")
            continue
        if not mask.any():
            skipped.append(f"{f}: empty mask")
            continue
        units = str(meta.get("Units", "Hz"))
        finite = np.isfinite(data)
        mask &= finite
        if units.lower() == "hz":
            ppm = hz_to_ppm(np.where(finite, data, 0.0), float(field_b0))
        elif units.lower() == "ppm":
            ppm = np.where(finite, data, 0.0)
        else:
            skipped.append(f"{f}: Units {units!r} (Hz or ppm expected)")
            continue
        noise = None
        nf = f.parent / (name + NOISE_FIELD)
        if nf.is_file():
            n = load(nf, ndim=3)[0]
            if n.shape == data.shape:
                noise = np.where(np.isfinite(n) & (n > 0), n, np.inf).astype(np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        scan = TargetScan(
            name=name,
            field_ppm=np.where(mask, ppm, 0.0).astype(np.float32),
            mask=mask,
            noise=noise,
            voxel_size=zooms,
            b0_dir=b0_dir_from_affine(img.affine),
            b0=float(field_b0),
            te=_te_of(meta, te),
            source=str(f),
            affine=np.asarray(img.affine, float),
        )
        if kind != "none":
            ref = _match_reference(kind, what, f.parent, name, scan.shape, root)
            why = _attach_reference(scan, ref)
            if why:
                skipped.append(f"{f}: {why}")
                continue
        scans.append(scan)
    return scans


def _from_bids(
    root: Path,
    *,
    reference,
    b0,
    te,
    skipped: list,
    participant_label=None,
    bg_method: str = "resharp",
    phase_sign: int = 1,
    device: str = "cpu",
) -> list[TargetScan]:
    from qsmprep.bids import collect_acquisitions, load_magnitude, load_phase
    from qsmprep.recon.chain import compute_local_field

    errors: list = []
    try:
        acqs = collect_acquisitions(
            root, participant_label=participant_label, b0=b0, errors=errors
        )
    except ValueError as exc:
        raise ValueError(
            f"no usable GRE acquisitions in the BIDS dataset {root}: {exc}; give a BIDS dataset "
            "with multi-echo magnitude and phase (part-mag/part-phase MEGRE), or a qsmprep "
            "output directory"
        ) from exc
    skipped += [str(e) for e in errors]
    kind, what = _reference_candidates(None if reference == "cosmos" else reference, root)
    scans = []
    acq_of: dict[int, object] = {}  # scan -> acquisition, for COSMOS grouping
    for a in acqs:
        mag = np.stack([load_magnitude(p) for p in a.magnitude], axis=-1)
        pha = np.stack([load_phase(p, a.phase_units, phase_sign) for p in a.phase], axis=-1)
        maps = compute_local_field(
            mag, pha, a.echo_times, a.voxel_size, b0_dir=a.b0_dir, bg_method=bg_method,
            device=device,
        )  # fmt: skip
        mask = maps.local_mask & np.isfinite(maps.local_hz)
        if not mask.any():
            skipped.append(f"{a.prefix}: empty local mask after background removal")
            continue
        noise = np.where(
            np.isfinite(maps.field_std_hz) & (maps.field_std_hz > 0), maps.field_std_hz, np.inf
        ).astype(np.float32)
        scan = TargetScan(
            name=a.prefix,
            field_ppm=np.where(mask, hz_to_ppm(maps.local_hz, a.b0), 0.0).astype(np.float32),
            mask=mask,
            noise=noise,
            voxel_size=tuple(float(v) for v in a.voxel_size),
            b0_dir=tuple(float(v) for v in a.b0_dir),
            b0=float(a.b0),
            te=float(te) if te is not None else float(max(a.echo_times)),
            source=str(a.phase[0]),
            affine=np.asarray(a.affine, float),
        )
        acq_of[id(scan)] = a
        if kind != "none":
            nii_dir = Path(a.phase[0]).parent
            why = _attach_reference(
                scan, _match_reference(kind, what, nii_dir, a.prefix, scan.shape, root)
            )
            if why:
                skipped.append(f"{a.prefix}: {why}")
                continue
        scans.append(scan)
    if reference == "cosmos":
        scans = _bids_cosmos(scans, acq_of, skipped, device=device)
    return scans


def _bids_cosmos(scans: list, acq_of: dict, skipped: list, *, device: str) -> list[TargetScan]:
    """COSMOS of each multi-orientation group of BIDS scans, as their reference."""
    from qsmprep.bids import group_orientations
    from qsmprep.recon.inversion import cosmos

    by_acq = {id(acq_of[id(s)]): s for s in scans}
    groups = group_orientations([acq_of[id(s)] for s in scans])
    out = []
    for key, acqs in groups.items():
        members = [by_acq[id(a)] for a in acqs]
        chi = cosmos(
            [m.field_ppm for m in members],
            [m.mask for m in members],
            members[0].voxel_size,
            [m.b0_dir for m in members],
            device=device,
        )
        chi = np.asarray(chi, np.float32)
        common = np.logical_and.reduce([m.mask for m in members]) & (chi != 0)
        for m in members:
            m.mask = common.copy()
            m.field_ppm = np.where(common, m.field_ppm, 0.0).astype(np.float32)
            m.chi = np.where(common, chi, 0.0).astype(np.float32)
            m.reference = f"COSMOS of {', '.join(x.name for x in members)}"
            out.append(m)
        log.info("COSMOS reference for sub-%s: %d orientations", key[0], len(members))
    grouped = {id(s) for s in out}
    skipped += [
        f"{s.name}: no COSMOS reference (needs >= 2 head orientations on one grid)"
        for s in scans
        if id(s) not in grouped
    ]
    return out


def find_target_scans(
    source,
    *,
    reference=None,
    b0: float | None = None,
    te: float | None = None,
    participant_label=None,
    bg_method: str = "resharp",
    device: str = "cpu",
) -> tuple[list[TargetScan], str, Path, list[str]]:
    """Load the target scans of a qsmprep output directory or a BIDS dataset.

    Returns ``(scans, kind, root, skipped)`` with ``kind`` ``"derivatives"`` or ``"bids"`` and
    ``skipped`` the reasons why files or acquisitions were left out. Raises ValueError naming
    the directory and the fix when none is usable.
    """
    kind, root = detect_source(source)
    skipped: list[str] = []
    if kind == "derivatives":
        scans = _from_derivatives(root, reference=reference, b0=b0, te=te, skipped=skipped)
    else:
        scans = _from_bids(
            root,
            reference=reference,
            b0=b0,
            te=te,
            skipped=skipped,
            participant_label=participant_label,
            bg_method=bg_method,
            device=device,
        )
    if not scans:
        why = "; ".join(skipped[:5]) or "nothing found"
        hint = (
            f" (reference {reference!r}: for COSMOS run qsmprep on data with >= 2 head "
            "orientations, or pass a reference map file or pattern)"
            if reference is not None
            else ""
        )
        raise ValueError(f"no usable target scans in {root} ({kind}): {why}{hint}")
    for s in skipped:
        log.warning("target: skipped %s", s)
    return scans, kind, root, skipped
