"""BIDS writer for simulated multi-echo GRE data and its ground truth."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from qsmprep import __version__
from qsmprep.recon.kernels import GAMMA_BAR, b0_dir_from_affine, hz_to_ppm
from qsmprep.sim import forward_field, simulate_bids_dataset, write_bids_dataset

TES = (0.004, 0.010, 0.016)
TILT = 15.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids") / "qsmsim"
    return simulate_bids_dataset(
        root,
        n_subjects=2,
        shape=(48, 48, 40),
        voxel_size=4.0,
        echo_times=TES,
        snr=80.0,
        seed=5,
        tilt_deg=[0.0, TILT],
    )


def test_pybids_indexes_the_dataset(dataset):
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(dataset, validate=True)
    assert sorted(layout.get_subjects()) == ["01", "02"]
    for sub in ("01", "02"):
        for part in ("mag", "phase"):
            files = layout.get(
                subject=sub, suffix="MEGRE", part=part, extension=".nii.gz", datatype="anat"
            )
            assert len(files) == len(TES)
            meta = sorted((f.get_metadata() for f in files), key=lambda m: m["EchoNumber"])
            assert [m["EchoTime"] for m in meta] == list(TES)
            assert all(m["MagneticFieldStrength"] == 3.0 for m in meta)
            assert all(m["ImagingFrequency"] == round(GAMMA_BAR * 3.0 / 1e6, 4) for m in meta)
            flag = "M" if part == "mag" else "P"
            assert all(flag in m["ImageType"] for m in meta)
            assert all((m.get("Units") == "rad") == (part == "phase") for m in meta)
            assert all(
                m["RepetitionTime"] > TES[-1] and m["MRAcquisitionType"] == "3D" for m in meta
            )
    desc = json.loads((dataset / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"] == "1.9.0"
    assert desc["GeneratedBy"][0] == {
        "Name": "qsmprep.sim",
        "Version": __version__,
        "Description": desc["GeneratedBy"][0]["Description"],
    }
    assert (dataset / "README").is_file()
    assert (dataset / "participants.tsv").read_text().split() == [
        "participant_id",
        "sub-01",
        "sub-02",
    ]


def test_ground_truth_derivative(dataset):
    gt = dataset / "derivatives" / "groundtruth"
    desc = json.loads((gt / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qsmprep.sim"
    dseg = (gt / "dseg.tsv").read_text().splitlines()
    assert dseg[0] == "index\tname" and "2\tGlobus pallidus" in dseg
    anat = gt / "sub-01" / "anat"
    for name in (
        "Chimap",
        "desc-brain_mask",
        "dseg",
        "desc-local_fieldmap",
        "desc-total_fieldmap",
        "desc-head_Chimap",
        "R2starmap",
    ):
        assert (anat / f"sub-01_{name}.nii.gz").is_file(), name
    info = json.loads((anat / "sub-01_groundtruth.json").read_text())
    assert info["EchoTime"] == list(TES) and info["MagneticFieldStrength"] == 3.0
    assert info["PhantomSeed"] == 5 and info["SignalSeed"] == 1005
    assert abs(info["PeakSNR"] - 80.0) < 1e-6
    assert {les["kind"] for les in info["Lesions"]} == {"haemorrhage", "calcification"}
    assert info["B0_dir_voxel"] == [0.0, 0.0, 1.0] and info["FieldUnits"] == "Hz"


def test_nifti_round_trip(dataset):
    """Images read back with nibabel: float32, phantom affine, values consistent."""
    anat = dataset / "sub-01" / "anat"
    gt = dataset / "derivatives" / "groundtruth" / "sub-01" / "anat"
    mags = [nib.load(anat / f"sub-01_echo-{n}_part-mag_MEGRE.nii.gz") for n in (1, 2, 3)]
    phs = [nib.load(anat / f"sub-01_echo-{n}_part-phase_MEGRE.nii.gz") for n in (1, 2, 3)]
    img = phs[0]
    assert img.get_data_dtype() == np.float32 and img.shape == (48, 48, 40)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(img.header.get_zooms(), (4.0, 4.0, 4.0))
    np.testing.assert_allclose(b0_dir_from_affine(img.affine), (0, 0, 1), atol=1e-12)
    phase = np.stack([np.asarray(p.dataobj) for p in phs], axis=-1)
    mag = np.stack([np.asarray(m.dataobj) for m in mags], axis=-1)
    assert phase.min() >= -np.pi and phase.max() < np.pi
    mask = np.asarray(nib.load(gt / "sub-01_desc-brain_mask.nii.gz").dataobj).astype(bool)
    total = np.asarray(nib.load(gt / "sub-01_desc-total_fieldmap.nii.gz").dataobj)
    # echo difference phase = 2 pi f dTE in the brain (SNR 80: phase noise ~0.02 rad);
    # measured median error 0.017 rad; bound 0.05
    d = np.angle(np.exp(1j * (phase[..., 1] - phase[..., 0])))
    exp = 2 * np.pi * total * (TES[1] - TES[0])
    ok = mask & (np.abs(exp) < 2.5) & (mag[..., 0] > 0.3)
    assert np.median(np.abs(d - exp)[ok]) < 0.05
    dseg = nib.load(gt / "sub-01_dseg.nii.gz")
    assert np.asarray(dseg.dataobj).dtype == np.int16
    np.testing.assert_array_equal(np.isin(np.asarray(dseg.dataobj), [0, 12, 13, 14, 15]), ~mask)


def test_oblique_subject_uses_the_tilted_b0(dataset):
    """sub-02: slab tilted about x; its local field is the dipole field along the tilted B0."""
    gt = dataset / "derivatives" / "groundtruth" / "sub-02" / "anat"
    raw = nib.load(dataset / "sub-02" / "anat" / "sub-02_echo-1_part-phase_MEGRE.nii.gz")
    t = np.deg2rad(TILT)
    b = np.array([0.0, -np.sin(t), np.cos(t)])
    np.testing.assert_allclose(b0_dir_from_affine(raw.affine), b, atol=1e-6)
    info = json.loads((gt / "sub-02_groundtruth.json").read_text())
    np.testing.assert_allclose(info["B0_dir_from_affine"], b, atol=1e-6)
    assert abs(info["B0_tilt_deg"] - TILT) < 1e-6
    chi = np.asarray(nib.load(gt / "sub-02_Chimap.nii.gz").dataobj, dtype=np.float64)
    mask = np.asarray(nib.load(gt / "sub-02_desc-brain_mask.nii.gz").dataobj).astype(bool)
    local = hz_to_ppm(np.asarray(nib.load(gt / "sub-02_desc-local_fieldmap.nii.gz").dataobj), 3)
    vs = raw.header.get_zooms()
    for bdir, expect_match in ((b, True), ((0.0, 0.0, 1.0), False)):
        ref = forward_field(chi * mask, vs, bdir)
        ref = (ref - ref[mask].mean()) * mask
        err = np.sqrt(np.mean((local - ref)[mask] ** 2) / np.mean(ref[mask] ** 2))
        # tilted B0: float32 storage only (measured 6e-8); axial B0: measured 0.35 relative
        assert (err < 1e-5) if expect_match else (err > 0.1), (bdir, err)


def test_write_bids_dataset_arguments(tmp_path, phantom, phantom_fields):
    from qsmprep.sim import simulate_gre

    g = simulate_gre(phantom, TES, snr=None, fields=phantom_fields)
    root = write_bids_dataset(tmp_path / "ds", {"sub-A1": (phantom, g, phantom_fields)})
    assert (root / "sub-A1" / "anat" / "sub-A1_echo-3_part-phase_MEGRE.nii.gz").is_file()
    info = json.loads(
        (root / "derivatives/groundtruth/sub-A1/anat/sub-A1_groundtruth.json").read_text()
    )
    assert info["PeakSNR"] is None and info["NoiseStd"] == 0.0
    with pytest.raises(ValueError, match="alphanumeric"):
        write_bids_dataset(tmp_path / "x", {"sub-0_1": (phantom, g, phantom_fields)})
    with pytest.raises(ValueError, match="empty"):
        write_bids_dataset(tmp_path / "y", {})
    with pytest.raises(ValueError, match="repetition_time"):
        write_bids_dataset(
            tmp_path / "z", {"01": (phantom, g, phantom_fields)}, repetition_time=0.01
        )


def test_multi_orientation_subject(tmp_path):
    # One subject at three head orientations on one voxel grid (COSMOS layout): the affines
    # differ by the rotation, the ground-truth local field of each follows its own B0 direction.
    import nibabel as nib

    from qsmprep.recon.kernels import b0_dir_from_affine
    from qsmprep.sim import forward_field
    from qsmprep.sim.bids import simulate_bids_dataset

    root = simulate_bids_dataset(
        tmp_path / "ds",
        shape=(32, 32, 24),
        voxel_size=(4, 4, 4),
        snr=None,
        orientations={0: [0.0, (20.0, 0.0), (0.0, -20.0)]},
    )
    anat = root / "sub-01" / "anat"
    gt = root / "derivatives" / "groundtruth" / "sub-01" / "anat"
    chi = nib.load(gt / "sub-01_Chimap.nii.gz").get_fdata()
    mask = nib.load(gt / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    dirs = []
    for k in (1, 2, 3):
        img = nib.load(anat / f"sub-01_acq-ori{k}_echo-1_part-phase_MEGRE.nii.gz")
        assert img.shape == chi.shape
        b = np.array(b0_dir_from_affine(img.affine))
        dirs.append(b)
        local = nib.load(gt / f"sub-01_acq-ori{k}_desc-local_fieldmap.nii.gz").get_fdata()
        expected = forward_field(chi, (4, 4, 4), b)
        expected = np.where(mask, expected - expected[mask].mean(), 0)
        hz_per_ppm = 42.57747892 * 3.0
        np.testing.assert_allclose(local, expected * hz_per_ppm, atol=2e-3 * np.abs(local).max())
    angles = [np.degrees(np.arccos(np.clip(dirs[0] @ d, -1, 1))) for d in dirs[1:]]
    np.testing.assert_allclose(angles, [20.0, 20.0], atol=1e-6)
