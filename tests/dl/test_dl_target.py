"""Target scans for adaptation: qsmprep outputs and BIDS datasets, patches, references, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qsmprep.dl.target import TargetScans, detect_source, find_target_scans
from qsmprep.recon.kernels import GAMMA_BAR, b0_dir_from_affine, ppm_to_hz
from qsmprep.sim.bids import tilt_affine
from qsmprep.sim.forward import forward_field
from qsmprep.sim.phantom import make_head_phantom

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE, VOXEL = (40, 40, 32), 5.0
ECHOES = [0.004, 0.008, 0.012, 0.016, 0.02]


def _save(path: Path, data, affine, sidecar=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    if sidecar is not None:
        Path(str(path)[: -len(".nii.gz")] + ".json").write_text(json.dumps(sidecar))


def write_qsmprep_output(root, *, cosmos: bool = True, b0_in_sidecar: bool = True) -> dict:
    """A qsmprep output directory with the real naming: two head orientations of one phantom.

    ``sub-01_acq-ori{1,2}_desc-{local,noise}_fieldmap`` (Hz, 3 T), ``desc-local_mask`` and the
    subject's ``desc-cosmos_Chimap`` (the phantom's brain chi, mean 0 in the mask). The local
    fields are the exact dipole fields of that chi along each orientation's B0.
    """
    root = Path(root)
    ph = make_head_phantom(SHAPE, VOXEL, seed=1)
    m = ph.brain_mask
    chi = np.where(m, ph.chi - ph.chi[m].mean(), 0.0)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "qsmprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    anat = root / "sub-01" / "anat"
    x = np.linspace(0.0, 1.0, SHAPE[0])[:, None, None]
    noise_hz = np.where(m, 0.4 + 0.4 * x, np.inf).astype(np.float32)
    out = {"chi": chi.astype(np.float32), "mask": m, "noise": noise_hz, "fields": {}}
    for k, tilt in ((1, 0.0), (2, 20.0)):
        aff = tilt_affine(ph.affine, tilt)
        b0_dir = b0_dir_from_affine(aff)
        hz = np.where(m, ppm_to_hz(forward_field(chi, VOXEL, b0_dir), 3.0), 0.0)
        meta = {"Units": "Hz", "EchoTime": ECHOES, "B0Direction": list(b0_dir)}
        if b0_in_sidecar:
            meta["B0"] = 3.0
        name = f"sub-01_acq-ori{k}"
        _save(anat / f"{name}_desc-local_fieldmap.nii.gz", hz.astype(np.float32), aff, meta)
        _save(anat / f"{name}_desc-local_mask.nii.gz", m.astype(np.uint8), aff, {})
        _save(anat / f"{name}_desc-noise_fieldmap.nii.gz", noise_hz, aff, {"Units": "Hz"})
        out["fields"][name] = (hz.astype(np.float32), b0_dir, aff)
    if cosmos:
        _save(anat / "sub-01_desc-cosmos_Chimap.nii.gz", chi.astype(np.float32), ph.affine)
    return out


@pytest.fixture(scope="module")
def qsmprep_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("target") / "derivatives" / "qsmprep"
    return root, write_qsmprep_output(root)


def test_loads_qsmprep_outputs(qsmprep_out):
    root, truth = qsmprep_out
    scans, kind, found, skipped = find_target_scans(root)
    assert kind == "derivatives" and found == root and not skipped
    assert [s.name for s in scans] == ["sub-01_acq-ori1", "sub-01_acq-ori2"]
    for s in scans:
        hz, b0_dir, _ = truth["fields"][s.name]
        # Hz -> ppm: f / (GAMMA_BAR B0) 1e6, exact up to float32 rounding
        np.testing.assert_allclose(s.field_ppm, hz / (GAMMA_BAR * 3.0) * 1e6, rtol=1e-6, atol=0)
        assert s.voxel_size == (VOXEL,) * 3
        np.testing.assert_allclose(s.b0_dir, b0_dir, atol=1e-6)
        assert s.b0 == 3.0 and s.te == 0.02  # the longest echo
        assert np.array_equal(s.mask, truth["mask"])
    # the tilted orientation: B0 20 degrees off the third voxel axis, in the y-z plane
    tilt = math.degrees(math.acos(scans[1].b0_dir[2]))
    assert tilt == pytest.approx(20.0, abs=1e-4)  # the NIfTI stores the affine in float32
    assert scans[1].b0_dir[0] == pytest.approx(0.0, abs=1e-9)
    # the directory above derivatives/qsmprep (the layout of `qsmprep demo`) is found too
    assert detect_source(root.parent.parent) == ("derivatives", root)


def test_patches(qsmprep_out):
    root, truth = qsmprep_out
    data = TargetScans(root, (16, 16, 16), seed=3, min_mask_fraction=0.5)
    b = data.batch(4)
    assert set(b) == {"field", "mask", "weight", "voxel_size", "b0_dir", "phase_scale", "b0", "te"}
    assert b["field"].shape == (4, 1, 16, 16, 16) and b["voxel_size"].shape == (4, 3)
    for i in range(4):
        m = b["mask"][i, 0] > 0
        assert float(m.float().mean()) >= 0.5
        assert bool((b["field"][i, 0][~m] == 0).all())
        w = b["weight"][i, 0]
        assert float(w[m].mean()) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(
        b["phase_scale"].numpy(), 2 * math.pi * GAMMA_BAR * 3.0 * 0.02 * 1e-6, rtol=1e-6
    )
    again = TargetScans(root, (16, 16, 16), seed=3, min_mask_fraction=0.5).batch(4)
    assert all(torch.equal(b[k], again[k]) for k in b)
    # the weight is the inverse noise level (normalised): exact on a whole-volume patch
    whole = TargetScans(data.scans[:1], SHAPE, seed=0).batch(1)
    m = truth["mask"]
    w = whole["weight"][0, 0].numpy()
    inv = 1.0 / truth["noise"][m]
    np.testing.assert_allclose(w[m], inv / inv.mean(), rtol=1e-5)


def test_reference_chi(qsmprep_out):
    root, truth = qsmprep_out
    data = TargetScans(root, (16, 16, 16), reference="cosmos", seed=1)
    assert data.labelled and len(data) == 2
    b = data.batch(3)
    for i in range(3):
        m = b["mask"][i, 0] > 0
        assert abs(float(b["chi"][i, 0][m].mean())) < 1e-6  # referenced per patch
    # whole-volume patch: chi is the reference map re-referenced to its mask mean
    whole = TargetScans(data.scans, SHAPE, seed=0).batch(1)
    m = truth["mask"]
    chi = truth["chi"]
    np.testing.assert_allclose(whole["chi"][0, 0].numpy()[m], chi[m] - chi[m].mean(), atol=1e-6)
    # a reference given as a file, and as a glob pattern
    f = next(root.rglob("*_desc-cosmos_Chimap.nii.gz"))
    assert TargetScans(root, 16, reference=str(f)).labelled
    assert TargetScans(root, 16, reference="sub-*_desc-cosmos_Chimap.nii.gz").labelled


def test_clear_errors(tmp_path, qsmprep_out):
    root, _ = qsmprep_out
    with pytest.raises(ValueError, match="does not exist") as e:
        TargetScans(tmp_path / "nope")
    assert "qsmprep output directory" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a qsmprep output directory"):
        TargetScans(empty)
    (empty / "dataset_description.json").write_text('{"DatasetType": "derivative"}')
    with pytest.raises(ValueError, match="no local field maps") as e:
        TargetScans(empty)
    assert str(empty) in str(e.value) and "participant" in str(e.value)
    nocosmos = tmp_path / "nocosmos"
    write_qsmprep_output(nocosmos, cosmos=False)
    with pytest.raises(ValueError, match="no usable target scans") as e:
        TargetScans(nocosmos, reference="cosmos")
    assert "no reference map found" in str(e.value) and "orientations" in str(e.value)
    nob0 = tmp_path / "nob0"
    write_qsmprep_output(nob0, b0_in_sidecar=False)
    with pytest.raises(ValueError, match="B0"):
        TargetScans(nob0)
    assert TargetScans(nob0, b0=3.0).scans[0].b0 == 3.0  # the override fixes it


def test_bids_dataset_runs_the_field_chain(tmp_path):
    from qsmprep.sim.bids import simulate_bids_dataset

    bids = simulate_bids_dataset(tmp_path / "bids", shape=SHAPE, voxel_size=(VOXEL,) * 3, seed=2)
    data = TargetScans(bids, 16, seed=0)
    assert data.kind == "bids" and [s.name for s in data.scans] == ["sub-01"]
    s = data.scans[0]
    assert s.b0 == 3.0 and s.te == pytest.approx(0.02) and s.noise is not None
    np.testing.assert_allclose(s.b0_dir, (0, 0, 1), atol=1e-9)
    # the field is that of the chain on the acquisition, in ppm (the qsmprep app's local field)
    from qsmprep.bids import collect_acquisitions, load_magnitude, load_phase
    from qsmprep.recon.chain import compute_local_field

    (a,) = collect_acquisitions(bids)
    mag = np.stack([load_magnitude(p) for p in a.magnitude], axis=-1)
    pha = np.stack([load_phase(p, a.phase_units) for p in a.phase], axis=-1)
    maps = compute_local_field(mag, pha, a.echo_times, a.voxel_size, b0_dir=a.b0_dir)
    assert np.array_equal(s.mask, maps.local_mask)
    expected = maps.local_hz[s.mask] / (GAMMA_BAR * 3.0) * 1e6
    np.testing.assert_allclose(s.field_ppm[s.mask], expected, rtol=1e-6, atol=1e-9)
    b = data.batch(2)
    assert b["field"].shape == (2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="COSMOS"):
        TargetScans(bids, 16, reference="cosmos")
