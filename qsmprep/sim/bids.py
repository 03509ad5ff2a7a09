"""Write simulated multi-echo GRE data as a BIDS raw dataset with a ground-truth derivative.

Layout (BIDS 1.9.0, as the development data in ``../shared/data``)::

    root/dataset_description.json  participants.tsv  participants.json  README
    root/sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz   (+ .json; part-phase, echo-2..)
    root/derivatives/groundtruth/dataset_description.json  dseg.tsv
    root/derivatives/groundtruth/sub-01/anat/
        sub-01_Chimap.nii.gz                 chi (ppm, brain-masked; CSF = 0)
        sub-01_desc-head_Chimap.nii.gz       chi of the whole head (ppm; air +9.4)
        sub-01_R2starmap.nii.gz              R2* (1/s)
        sub-01_desc-brain_mask.nii.gz        brain mask (uint8)
        sub-01_dseg.nii.gz                   labels (dseg.tsv)
        sub-01_desc-local_fieldmap.nii.gz    local field (Hz)
        sub-01_desc-total_fieldmap.nii.gz    total field (Hz, over the head)
        sub-01_groundtruth.json              conventions, lesions, B0 direction, TEs, SNR, seeds

Images are float32 NIfTI-1 with the phantom affine as qform and sform (code 1, scanner),
spatial units mm. World z is B0: an oblique slab is a rotated affine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.__about__ import __version__
from qsmprep.recon.kernels import GAMMA_BAR, b0_dir_from_affine
from qsmprep.sim.fields import simulate_fields
from qsmprep.sim.phantom import make_head_phantom
from qsmprep.sim.signal import GRESignal, simulate_gre
from qsmprep.sim.tissues import LABEL_NAMES, HeadPhantom

__all__ = ["rotate_affine", "simulate_bids_dataset", "tilt_affine", "write_bids_dataset"]

_DEFAULT_TES = (0.004, 0.008, 0.012, 0.016, 0.020)
_GENERATOR = {
    "Name": "qsmprep.sim",
    "Version": __version__,
    "Description": "qsmprep numerical head phantom and multi-echo GRE forward model",
}


def tilt_affine(affine, tilt_deg: float) -> np.ndarray:
    """The affine of a slab tilted by ``tilt_deg`` about the world x axis (oblique acquisition).

    ``A' = R_x(-tilt) A``: the head stays the same array, the world (scanner) frame turns, so
    the B0 direction in voxel coordinates (:func:`b0_dir_from_affine`) becomes
    ``(0, -sin(tilt), cos(tilt))`` for an axial ``A`` (the convention of the development data).
    """
    t = np.deg2rad(-float(tilt_deg))
    r = np.eye(4)
    r[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r @ np.asarray(affine, dtype=float)


def rotate_affine(affine, about_x_deg: float = 0.0, about_y_deg: float = 0.0) -> np.ndarray:
    """The affine of the same array with the head rotated about world x, then world y.

    Generalises :func:`tilt_affine` (``rotate_affine(A, t) == tilt_affine(A, t)``) to two axes,
    so a set of orientations spans B0 directions off one plane (better conditioned COSMOS).
    """
    a = tilt_affine(affine, about_x_deg)
    t = np.deg2rad(-float(about_y_deg))
    ry = np.eye(4)
    ry[0, 0], ry[0, 2], ry[2, 0], ry[2, 2] = np.cos(t), np.sin(t), -np.sin(t), np.cos(t)
    return ry @ a


def _subject_label(key: str) -> str:
    label = key[4:] if key.startswith("sub-") else key
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise ValueError(f"subject label must be alphanumeric (e.g. '01'), got {key!r}")
    return label


def _save_nifti(data, affine, path: Path, dtype=np.float32) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, float))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _rounded(v, nd=6):
    return [round(float(x), nd) for x in v]


def write_bids_dataset(
    root,
    subjects: dict[str, tuple[HeadPhantom, GRESignal, dict]] | None = None,
    *,
    name: str = "qsmprep simulated MEGRE",
    repetition_time: float | None = None,
    flip_angle: float = 15.0,
    metadata: dict[str, dict] | None = None,
) -> Path:
    """Write phantoms and their GRE signals as a BIDS raw dataset plus ground truth.

    Parameters
    ----------
    root : path
        Dataset folder (created; existing files with the same names are overwritten).
    subjects : dict
        ``{label: (phantom, gre, fields)}`` with ``fields`` from :func:`simulate_fields`
        (the fields the signal was made with); default one subject simulated with
        :func:`simulate_bids_dataset`'s defaults.
    name : str
        ``Name`` of the dataset description.
    repetition_time : float, optional
        s; default the last echo time + 8 ms, at least 25 ms.
    flip_angle : float
        Degrees.
    metadata : dict, optional
        ``{label: {...}}`` extra entries for each subject's ``*_groundtruth.json`` (seeds,
        tilt, ...).

    Returns
    -------
    Path of the dataset root.
    """
    root = Path(root)
    if subjects is None:
        return simulate_bids_dataset(root)
    if not subjects:
        raise ValueError("subjects is empty: give at least one {label: (phantom, gre, fields)}")
    metadata = metadata or {}
    labels = {_subject_label(k): v for k, v in subjects.items()}
    root.mkdir(parents=True, exist_ok=True)
    gt_root = root / "derivatives" / "groundtruth"
    gt_root.mkdir(parents=True, exist_ok=True)

    _write_json(
        {
            "Name": name,
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["qsmprep developers (synthetic data)"],
            "GeneratedBy": [_GENERATOR],
        },
        root / "dataset_description.json",
    )
    (root / "README").write_text(
        f"Synthetic multi-echo GRE (MEGRE) dataset '{name}', made by qsmprep.sim "
        f"{__version__}: numerical head phantom (chi, M0, R2*), dipole forward model, "
        "phase offsets, noise.\n"
        "Ground truth lives in derivatives/groundtruth (not part of the raw data).\n"
    )
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in labels)
    )
    _write_json(
        {"participant_id": {"Description": "Simulated participant (one phantom seed)"}},
        root / "participants.json",
    )
    _write_json(
        {
            "Name": f"Ground truth for {name}",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [_GENERATOR],
        },
        gt_root / "dataset_description.json",
    )
    (gt_root / "dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LABEL_NAMES.items())
    )

    for sub, (ph, gre, fields) in labels.items():
        acqs = ph_list = None
        if isinstance(ph, list | tuple):  # several head orientations: acq-ori1, acq-ori2, ...
            acqs, ph_list = (
                [f"ori{k + 1}" for k in range(len(ph))],
                list(zip(ph, gre, fields, strict=True)),
            )
        for k, (ph_k, gre_k, fields_k) in enumerate(ph_list or [(ph, gre, fields)]):
            acq = acqs[k] if acqs else None
            _write_subject(
                root,
                gt_root,
                sub,
                ph_k,
                gre_k,
                fields_k,
                repetition_time,
                flip_angle,
                metadata,
                acq=acq,
            )
    return root


def _write_subject(root, gt_root, sub, ph, gre, fields, tr, flip, metadata, acq=None) -> None:
    if gre.magnitude.shape[:3] != ph.shape:
        raise ValueError(
            f"sub-{sub}: signal shape {gre.magnitude.shape[:3]} differs from the phantom's"
            f" {ph.shape}"
        )
    te = np.asarray(gre.echo_times, float)
    tr = float(tr) if tr is not None else max(0.025, round(float(te[-1]) + 0.008, 4))
    if tr <= te[-1]:
        raise ValueError(f"repetition_time {tr} s must exceed the last echo time {te[-1]} s")
    affine = np.asarray(ph.affine, float)
    anat = root / f"sub-{sub}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    common = {
        "EchoTrainLength": int(te.size),
        "MagneticFieldStrength": float(gre.b0),
        "ImagingFrequency": round(GAMMA_BAR * gre.b0 / 1e6, 4),
        "RepetitionTime": tr,
        "FlipAngle": float(flip),
        "MRAcquisitionType": "3D",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "PulseSequenceType": "Multi-echo spoiled gradient echo",
        "Manufacturer": "Synthetic",
        "ManufacturersModelName": "qsmprep.sim",
        "SliceThickness": float(ph.voxel_size[2]),
    }
    ent = f"sub-{sub}" + (f"_acq-{acq}" if acq else "")
    for n in range(te.size):
        for part, data, flag in (("mag", gre.magnitude, "M"), ("phase", gre.phase, "P")):
            stem = anat / f"{ent}_echo-{n + 1}_part-{part}_MEGRE"
            _save_nifti(data[..., n], affine, stem.with_suffix(".nii.gz"))
            side = {"EchoTime": float(te[n]), "EchoNumber": n + 1, **common}
            side["ImageType"] = ["ORIGINAL", "PRIMARY", flag, "ND"]
            if part == "phase":
                side["Units"] = "rad"
            _write_json(side, stem.with_suffix(".json"))

    gt = gt_root / f"sub-{sub}" / "anat"
    gt.mkdir(parents=True, exist_ok=True)
    brain = np.asarray(ph.brain_mask, bool)
    p = f"sub-{sub}"
    _save_nifti(ph.chi * brain, affine, gt / f"{p}_Chimap.nii.gz")
    _save_nifti(ph.chi, affine, gt / f"{p}_desc-head_Chimap.nii.gz")
    _save_nifti(ph.r2star * (gre.b0 / ph.b0), affine, gt / f"{p}_R2starmap.nii.gz")
    _save_nifti(brain, affine, gt / f"{p}_desc-brain_mask.nii.gz", dtype=np.uint8)
    _save_nifti(ph.labels, affine, gt / f"{p}_dseg.nii.gz", dtype=np.int16)
    _save_nifti(gre.local_field_hz, affine, gt / f"{ent}_desc-local_fieldmap.nii.gz")
    _save_nifti(gre.total_field_hz, affine, gt / f"{ent}_desc-total_fieldmap.nii.gz")
    for desc, units in (("local", "Hz"), ("total", "Hz")):
        _write_json({"Units": units}, gt / f"{ent}_desc-{desc}_fieldmap.json")
    _write_json({"Units": "ppm"}, gt / f"{p}_Chimap.json")

    b_aff = b0_dir_from_affine(affine)
    peak_snr = None
    if gre.noise_std > 0:
        m = (ph.m0 * np.exp(-ph.r2star * (gre.b0 / ph.b0) * te[0]))[brain]
        peak_snr = round(float(m.max()) / gre.noise_std, 3)
    info = {
        "Phantom": "qsmprep.sim.make_head_phantom",
        "PhantomSeed": int(ph.seed),
        "Lesions": ph.lesions,
        "MagneticFieldStrength": float(gre.b0),
        "EchoTime": _rounded(te),
        "VoxelSize": _rounded(ph.voxel_size),
        "Shape": [int(n) for n in ph.shape],
        "PeakSNR": peak_snr,
        "NoiseStd": float(gre.noise_std),
        "B0_dir_voxel": _rounded(metadata.get(sub, {}).get("B0_dir_voxel", b_aff)),
        "B0_dir_from_affine": _rounded(b_aff),
        "B0_tilt_deg": float(np.degrees(np.arccos(np.clip(abs(b_aff[2]), 0.0, 1.0)))),
        "ChiUnits": "ppm",
        "ChiReference": "water (CSF = 0 ppm); air = +9.4 ppm, bone = -2 ppm; "
        "Chimap brain-masked, desc-head_Chimap the whole head",
        "FieldUnits": "Hz",
        "HzPerPpm": round(GAMMA_BAR * gre.b0 * 1e-6, 4),
        "Gamma_MHz_per_T": GAMMA_BAR / 1e6,
        "PhaseModel": "phase(TE) = 2*pi*total_field_Hz*TE + phase_offset (+ noise), wrapped "
        "to [-pi, pi); positive chi -> positive field along B0",
        "MagnitudeModel": "M0 * exp(-R2star * TE) (+ noise); complex Gaussian noise of std "
        "NoiseStd per channel, PeakSNR = max over the brain of echo-1 magnitude / NoiseStd",
        "LocalField": "field of chi*brainmask (sources inside the mask only), demeaned in the "
        "mask, zero outside",
        "TotalField": "field of the whole head (chi - 9.4 ppm, exterior air, neck continued "
        "below the field of view), demeaned and shimmed over the brain with solid spherical "
        "harmonics (ShimOrder); stored over the head, zero in air",
        "ShimOrder": 2,
        "DipoleKernel": "local field: continuous k-space kernel D = 1/3 - (k.b)^2/|k|^2; "
        "background sources: the same for B0 along an array axis, the finite-difference kernel "
        "(qsmprep.recon.kernels.dipole_kernel_fd) for oblique B0 and multi-orientation sets; "
        "D(0) = 0, "
        "2N zero padding",
        "Storage": "float32",
    }
    if acq:
        info["Orientation"] = acq
    info.update({k: v for k, v in metadata.get(sub, {}).items() if k != "B0_dir_voxel"})
    _write_json(info, gt / f"{ent}_groundtruth.json")


def simulate_bids_dataset(
    root,
    *,
    n_subjects: int = 1,
    shape: Sequence[int] = (96, 96, 80),
    voxel_size=(2.0, 2.0, 2.0),
    echo_times=_DEFAULT_TES,
    b0: float = 3.0,
    snr: float | None = 100.0,
    seed: int = 0,
    tilt_deg: float | Sequence[float] = 0.0,
    lesions: bool = True,
    shim_order: int = 2,
    orientations: dict[int, Sequence] | None = None,
    grids: dict[int, tuple] | None = None,
) -> Path:
    """Simulate ``n_subjects`` phantoms and write them as a BIDS dataset (see the module doc).

    Subject ``i`` (labels ``01``, ``02``, ...) uses phantom seed ``seed + i`` and signal seed
    ``seed + 1000 + i``. ``tilt_deg`` (one value, or one per subject) tilts the slab about the
    world x axis (:func:`tilt_affine`); the fields are computed with the B0 direction of the
    tilted affine, so the raw data are a consistent oblique acquisition.

    ``orientations`` gives some subjects several head orientations on one voxel grid, as for
    COSMOS: ``{subject_index: [rot, rot, ...]}`` with each ``rot`` a tilt in degrees about the
    world x axis or a pair ``(about_x, about_y)``; that subject is written as ``acq-ori1``,
    ``acq-ori2``, ... (same phantom and array, rotated affine, fields along each B0), in the
    layout of the development data's multi-orientation set.

    ``grids`` gives some subjects their own matrix and voxel size: ``{subject_index: (shape,
    voxel_size)}`` (others use ``shape`` and ``voxel_size``), for a dataset of several
    resolutions.

    Returns
    -------
    Path of the dataset root.
    """
    if int(n_subjects) < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects!r}")
    tilts = np.broadcast_to(np.asarray(tilt_deg, dtype=float), (int(n_subjects),))
    subjects, meta = {}, {}
    for i in range(int(n_subjects)):
        label = f"{i + 1:02d}"
        shape_i, vs_i = (grids or {}).get(i, (shape, voxel_size))
        ph = make_head_phantom(shape_i, vs_i, seed=seed + i, lesions=lesions, b0=b0)
        rots = (orientations or {}).get(i)
        if rots:
            phs, gres, flds = [], [], []
            for k, rot in enumerate(rots):
                rx, ry = (float(rot), 0.0) if np.isscalar(rot) else (float(rot[0]), float(rot[1]))
                ph_k = dataclasses.replace(ph, affine=rotate_affine(ph.affine, rx, ry))
                # one kernel for all orientations of a COSMOS set (see simulate_fields)
                f_k = simulate_fields(ph_k, b0=b0, shim_order=shim_order, kernel="fd")
                sig = seed + 1000 + 100 * k + i
                phs.append(ph_k)
                flds.append(f_k)
                gres.append(simulate_gre(ph_k, echo_times, b0=b0, snr=snr, seed=sig, fields=f_k))
            subjects[label] = (phs, gres, flds)
        else:
            ph.affine = tilt_affine(ph.affine, tilts[i])
            fields = simulate_fields(ph, b0=b0, shim_order=shim_order)
            gre = simulate_gre(ph, echo_times, b0=b0, snr=snr, seed=seed + 1000 + i, fields=fields)
            subjects[label] = (ph, gre, fields)
        meta[label] = {
            "B0_tilt_deg": float(tilts[i]),
            "SignalSeed": seed + 1000 + i,
            "ShimOrder": int(shim_order),
        }
    return write_bids_dataset(root, subjects, metadata=meta)
