"""Validation of one acquisition's files: what :func:`build_acquisition` checks.

Discovery (:mod:`qsmprep.bids.discovery`) groups the pybids files of one acquisition; here they
become an :class:`~qsmprep.bids.acquisition.Acquisition`, in this order:

1. magnitude and phase paired per echo: one of each, and an ``echo-`` entity on every image or
   on none;
2. echo times (s) from the sidecars, plausible, equal for magnitude and phase, strictly
   increasing in echo order;
3. the field strength (T): ``MagneticFieldStrength``, the same in every sidecar, or the
   override;
4. the grids, from the headers only: one coil-combined 3D grid for every image, with a voxel
   size and an orientation (qform or sform) in the NIfTI header;
5. the phase units (:func:`qsmprep.bids.images.detect_phase_units` on the first phase echo),
   the same ``Units`` in every phase sidecar;
6. the magnitude values: not zero everywhere, negative in at most 1 % of the nonzero voxels.

What is recovered on the way (an ``EchoTime`` from the magnitude's sidecar, degrees, non-finite
or negative values) is listed in :attr:`Acquisition.notes`; any other problem raises
:class:`~qsmprep.bids.acquisition.BIDSInputError` naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.bids.acquisition import Acquisition, BIDSInputError, entity_prefix
from qsmprep.bids.images import detect_phase_units, read_3d, units_from_sidecar
from qsmprep.recon.kernels import b0_dir_from_affine

__all__ = ["build_acquisition", "relative_path"]

# affine entries of one acquisition's echoes may differ by this much (mm)
_AFFINE_ATOL = 1e-3


def relative_path(path, root) -> str:
    """``path`` relative to ``root`` as a POSIX string (``path`` itself when outside it)."""
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


def build_acquisition(root: Path, key: tuple, files: list, b0_override) -> Acquisition:
    """The validated :class:`Acquisition` of one group of pybids files.

    ``key`` is ``(subject, session, acq, run, rec, suffix)`` (labels without prefixes, None
    where absent), ``files`` the group's ``part-mag`` / ``part-phase`` pybids files,
    ``b0_override`` a field strength in T or None. Raises :class:`BIDSInputError` naming the
    file (relative to ``root``) and the fix; see the module doc for what is checked.
    """
    subject, session, acq, run, rec, suffix = key
    acq_id = entity_prefix(subject, session, acq, rec, run)

    def fail(msg, path=None):
        where = f"{relative_path(path, root)}: " if path is not None else f"{acq_id} ({suffix}): "
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
                f"{relative_path(slot[part].path, root)} and {relative_path(f.path, root)}. "
                "Keep one, or select one with --bids-filter-file",
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
            units_from_sidecar(m, path=relative_path(p, root))
            for p, m in zip(phases, meta_p, strict=True)
        ]
        phase_units = detect_phase_units(nib.load(str(phases[0])), meta_p[0], path=phases[0])
    except BIDSInputError as exc:
        # the file named as in every other message: relative to the dataset
        msg = str(exc).replace(str(phases[0]), relative_path(phases[0], root), 1)
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
    v = np.asarray(read_3d(path, "magnitude")[0], dtype=np.float32)
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
        notes.append(
            f"{relative_path(path, root)}: {n_bad} non-finite (NaN or inf) values set to 0"
        )
    if n_neg:
        notes.append(f"{relative_path(path, root)}: {n_neg} negative values set to 0")
    return notes
