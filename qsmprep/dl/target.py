"""Target-domain scans for network adaptation: local fields of real (or realistic) data.

:class:`TargetScans` serves random patches of local fields from either

* a **qsmprep output directory** (the BIDS derivative dataset of ``qsmprep ... participant``):
  every ``<prefix>_desc-local_fieldmap.nii.gz`` (Hz) with its
  ``<prefix>_desc-local_mask.nii.gz``, the optional ``<prefix>_desc-noise_fieldmap.nii.gz``
  (Hz, field standard deviation) and the sidecar's ``B0`` (T) and ``EchoTime`` (s); or
* a **BIDS raw dataset**: each multi-echo GRE acquisition found by
  :func:`qsmprep.bids.collect_acquisitions` is run through the field chain
  (:func:`qsmprep.recon.chain.compute_local_field`: mask, unwrapping, echo fit, background
  removal) first.

Fields are converted to ppm (``f_Hz / (GAMMA_BAR B0) 1e6``); the voxel size comes from the
header and the B0 direction in voxel axes from the affine
(:func:`qsmprep.recon.kernels.b0_dir_from_affine`). A reference susceptibility map (COSMOS,
``desc-cosmos_Chimap``, by default the one qsmprep writes for multi-orientation data; any
other ``desc``, a file or a glob pattern) turns the scans into labelled data for transfer
learning. Batches have the keys of :meth:`qsmprep.dl.synth.SyntheticQSMData.batch`, plus
``chi`` when a reference exists (referenced to mean 0 over the patch mask, as the synthetic
chi).
"""

from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qsmprep.dl.inference import resolve_device
from qsmprep.dl.synth import phase_scale
from qsmprep.nifti import load
from qsmprep.recon.kernels import b0_dir_from_affine, hz_to_ppm

__all__ = ["TargetScan", "TargetScans", "detect_source", "find_target_scans"]

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


# ----------------------------------------------------------------------------- patches


class TargetScans:
    """Random patches of target-domain local fields (unlabelled, or labelled by a reference).

    Parameters
    ----------
    source : path or list of :class:`TargetScan`
        A qsmprep output directory or a BIDS dataset (see :func:`detect_source`), or scans.
    patch_shape : 3 ints
        Patch size in voxels (volumes smaller than it are zero-padded).
    reference : str or path, optional
        Reference chi for transfer learning: a ``desc`` label (``"cosmos"``: the
        ``*_desc-cosmos_Chimap.nii.gz`` of a qsmprep output, or COSMOS computed from the
        orientations of a BIDS dataset), a NIfTI file (for all scans of its shape) or a glob
        pattern (matched to scans by ``sub``/``ses``). Scans without one are left out.
    b0 : float, optional
        Field strength override (T).
    te : float, optional
        Echo time (s) of the phase scale; default the scan's longest echo.
    min_mask_fraction : float
        A patch is redrawn (up to 10 times) while less of it than this lies in the mask.
    seed : int
        Seed of the patch positions (batch ``k`` depends only on ``(seed, k)``).
    device : str or torch.device
        Where batches are returned (``"cpu"``, ``"cuda"``, ``"auto"``).
    participant_label, bg_method
        BIDS datasets: subjects to use, background removal of the field chain.
    """

    def __init__(
        self,
        source,
        patch_shape=(64, 64, 64),
        *,
        reference=None,
        b0: float | None = None,
        te: float | None = None,
        min_mask_fraction: float = 0.3,
        seed: int = 0,
        device="cpu",
        participant_label=None,
        bg_method: str = "resharp",
    ):
        ps = tuple(int(n) for n in np.atleast_1d(patch_shape))
        if len(ps) == 1:
            ps = ps * 3
        if len(ps) != 3 or min(ps) < 1:
            raise ValueError(f"patch_shape must be 3 positive ints, got {patch_shape!r}")
        self.patch_shape = ps
        self.seed = int(seed)
        self.counter = 0
        self.min_mask_fraction = float(min_mask_fraction)
        self.device = resolve_device(device)
        self.reference = None if reference is None else str(reference)
        if isinstance(source, (list, tuple)):
            if not source or not all(isinstance(s, TargetScan) for s in source):
                raise ValueError("source must be a directory or a non-empty list of TargetScan")
            self.scans = list(source)
            self.kind, self.root, self.skipped = "scans", None, []
        else:
            dev = "cpu" if self.device.type == "cpu" else str(self.device)
            self.scans, self.kind, self.root, self.skipped = find_target_scans(
                source,
                reference=reference,
                b0=b0,
                te=te,
                participant_label=participant_label,
                bg_method=bg_method,
                device=dev,
            )
        self.labelled = all(s.chi is not None for s in self.scans)
        if reference is not None and not self.labelled:
            raise ValueError("every scan needs a reference chi when a reference is given")
        self._padded = [self._pad(s) for s in self.scans]
        self._centres = [np.flatnonzero(p["mask"].reshape(-1)) for p in self._padded]

    def __len__(self) -> int:
        return len(self.scans)

    def _pad(self, s: TargetScan) -> dict:
        pad = [(0, max(0, p - n)) for p, n in zip(self.patch_shape, s.shape, strict=True)]
        out = {
            "field": np.pad(s.field_ppm, pad),
            "mask": np.pad(s.mask, pad),
            "noise": None if s.noise is None else np.pad(s.noise, pad, constant_values=np.inf),
            "chi": None if s.chi is None else np.pad(s.chi, pad),
        }
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "counter": int(self.counter)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"target data state has seed {state['seed']}, this one {self.seed}")
        self.counter = int(state["counter"])

    def describe(self) -> dict:
        """JSON-able description (for checkpoints and model cards)."""
        return {
            "source": self.kind,
            "path": None if self.root is None else str(self.root),
            "scans": [s.name for s in self.scans],
            "reference": self.reference,
            "references": sorted({s.reference for s in self.scans if s.reference}),
            "voxel_sizes": sorted({tuple(round(v, 3) for v in s.voxel_size) for s in self.scans}),
            "b0": sorted({s.b0 for s in self.scans}),
            "patch_shape": list(self.patch_shape),
            "seed": self.seed,
        }

    def batch(self, batch_size: int, index: int | None = None) -> dict:
        """The next batch of random patches (or batch number ``index``, without advancing).

        Returns the keys of :meth:`qsmprep.dl.synth.SyntheticQSMData.batch` (``field`` ppm,
        ``mask``, ``weight`` from the noise map (the mask when there is none), ``voxel_size``,
        ``b0_dir``, ``phase_scale``, ``b0``, ``te``) plus ``chi`` when the scans have a
        reference.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if index is None:
            index = self.counter
            self.counter += 1
        seed = int(np.random.SeedSequence([self.seed, 7, int(index)]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        items = [self._patch(rng) for _ in range(int(batch_size))]
        out = {}
        for k in items[0]:
            out[k] = torch.as_tensor(np.stack([it[k] for it in items])).to(self.device)
        return out

    def _patch(self, rng) -> dict:
        i = int(rng.integers(len(self.scans)))
        s, p, centres = self.scans[i], self._padded[i], self._centres[i]
        shape = p["mask"].shape
        best = None
        for _ in range(10):
            c = np.unravel_index(int(centres[rng.integers(len(centres))]), shape)
            start = [
                int(np.clip(ci - ps // 2, 0, n - ps))
                for ci, ps, n in zip(c, self.patch_shape, shape, strict=True)
            ]
            sl = tuple(slice(a, a + n) for a, n in zip(start, self.patch_shape, strict=True))
            frac = float(p["mask"][sl].mean())
            if best is None or frac > best[0]:
                best = (frac, sl)
            if frac >= self.min_mask_fraction:
                break
        sl = best[1]
        mask = p["mask"][sl].astype(np.float32)
        m = mask > 0
        if p["noise"] is not None:
            sigma = p["noise"][sl]
            floor = 1e-3 * np.median(sigma[m]) if m.any() else 1.0
            w = np.where(m, 1.0 / np.maximum(sigma, floor), 0.0)
            weight = (w / w[m].mean()) if m.any() and w[m].mean() > 0 else mask
        else:
            weight = mask
        out = {
            "field": (p["field"][sl] * mask)[None].astype(np.float32),
            "mask": mask[None],
            "weight": np.asarray(weight, np.float32)[None],
            "voxel_size": np.asarray(s.voxel_size, np.float32),
            "b0_dir": np.asarray(s.b0_dir, np.float32),
            "phase_scale": np.float32(phase_scale(s.b0, s.te)),
            "b0": np.float32(s.b0),
            "te": np.float32(s.te),
        }
        if p["chi"] is not None:
            chi = p["chi"][sl]
            ref = chi[m].mean() if m.any() else 0.0
            out["chi"] = (np.where(m, chi - ref, 0.0))[None].astype(np.float32)
        return out
