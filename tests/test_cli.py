"""End-to-end: the demo command and the benchmark command on small grids."""

import json

import nibabel as nib
import numpy as np
import pytest

from qsmprep.cli import bench, run


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run.main(["demo", str(out), "--shape", "72", "72", "60", "--voxel-size", "2.5"]) == 0
    text = capsys.readouterr().out
    anat = out / "derivatives" / "qsmprep" / "sub-01" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    assert names == sorted(
        f"sub-01_{d}.{e}"
        for d in (
            "desc-brain_mask",
            "desc-total_fieldmap",
            "desc-local_fieldmap",
            "desc-local_mask",
        )
        for e in ("nii.gz", "json")
    )
    assert not list((out / "derivatives" / "qsmprep").glob(".*partial"))
    desc = json.loads((out / "derivatives" / "qsmprep" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    side = json.loads((anat / "sub-01_desc-local_fieldmap.json").read_text())
    assert side["Units"] == "Hz" and side["Settings"]["bg_method"] == "resharp"
    assert all(s.startswith("sub-01/anat/") for s in side["Sources"])
    # the written local field agrees with the ground truth written by the simulator
    local = nib.load(anat / "sub-01_desc-local_fieldmap.nii.gz")
    truth = nib.load(
        out / "bids/derivatives/groundtruth/sub-01/anat/sub-01_desc-local_fieldmap.nii.gz"
    )
    np.testing.assert_allclose(local.affine, truth.affine)
    gt = out / "bids/derivatives/groundtruth/sub-01/anat"
    true_mask = np.asarray(nib.load(gt / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    m = (np.asarray(nib.load(anat / "sub-01_desc-local_mask.nii.gz").dataobj) > 0) & true_mask
    est, ref = local.get_fdata()[m], truth.get_fdata()[m]
    nrmse = (
        100
        * np.linalg.norm((est - est.mean()) - (ref - ref.mean()))
        / np.linalg.norm(ref - ref.mean())
    )
    assert nrmse < 60, nrmse  # coarse 2.5 mm grid; the printed figure must be this one
    assert f"NRMSE {nrmse:.1f} %" in text


def test_demo_rejects_a_dataset_without_phase(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    with pytest.raises(ValueError, match="part-phase"):
        run._load_megre(tmp_path / "bids", "01")


def test_bench_field_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["field", "--shape", "64", "64", "48", "--voxel-size", "3", "--echoes", "3"]
    assert bench.main([*args, "--bg-methods", "resharp", "sharp", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    stages = {r["stage"]: r for r in res["rows"]}
    assert {"mask", "unwrap", "echo_fit", "background_resharp", "background_sharp"} <= set(stages)
    # counted FFTs: SHARP needs at least one forward+inverse pair
    assert stages["background_sharp"]["fft_equivalents"] >= 2
    assert (
        stages["background_resharp"]["fft_equivalents"]
        > stages["background_sharp"]["fft_equivalents"]
    )
    assert "| stage |" in capsys.readouterr().out
