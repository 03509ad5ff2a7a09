"""``qsmprep-bench accuracy``: the pipeline runs, the scores are those of the maps it wrote."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsmprep.benchmarks.accuracy import ROWS_ADAPTIVE, _table, _variants  # noqa: E402
from qsmprep.dl.checkpoint import save_checkpoint  # noqa: E402
from qsmprep.dl.nets import build_model, default_config  # noqa: E402
from qsmprep.dl.weights import WEIGHTS_ENV, register_model  # noqa: E402
from qsmprep.metrics import evaluate  # noqa: E402


def test_variants_split_models_of_one_method():
    v = _variants(ROWS_ADAPTIVE)
    assert v["adaptive"] == ("adaptive", {})
    assert v["adaptivepretrained"] == ("adaptive", {"model": "adaptive-pretrained"})
    assert set(v) == {"adaptive", "adaptivepretrained", "unet", "tv", "medi"}


def test_table_mean_and_std():
    scores = {"TV": {"truth": [{"nrmse": 10.0}, {"nrmse": 20.0}]}}
    md = _table(scores, [("TV", "tv", {})], [("nrmse", "NRMSE (%)", 1)], "truth")
    assert "| TV | 15.0 ± 5.0 |" in md


@pytest.mark.slow
def test_accuracy_bench_scores_the_written_maps(tmp_path, monkeypatch):
    from qsmprep.cli.bench import main

    wdir = tmp_path / "weights"
    for name, arch in (("adaptive", "adaptive"), ("adaptive-pretrained", "adaptive"),
                       ("unet", "unet")):  # fmt: skip
        torch.manual_seed(0)
        net = build_model(default_config(arch, base_channels=4, depth=3))
        sha = save_checkpoint(wdir / f"{name}.pt", net)
        register_model(wdir, name, wdir / f"{name}.pt", arch=arch, sha256=sha)
    monkeypatch.setenv(WEIGHTS_ENV, str(wdir))
    out = tmp_path / "acc"
    argv = ["accuracy", str(out), "--datasets", "1", "--shape", "48", "48", "48"]
    rc = main([*argv, "--sets", "tilted", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    md = (out / "accuracy.md").read_text()
    assert "Table 2b" in md and (out / "scatter_tilted.png").is_file()
    # the TV row is the metric of the TV map the App wrote, against the simulated truth
    anat = next((out / "derivatives" / "tilted").glob("run*/sub-01/anat"))
    tv = np.asarray(nib.load(anat / "sub-01_desc-tv_Chimap.nii.gz").dataobj)
    mask = np.asarray(nib.load(anat / "sub-01_desc-local_mask.nii.gz").dataobj) > 0
    truth_file = out / "data/tilted/derivatives/groundtruth/sub-01/anat/sub-01_Chimap.nii.gz"
    truth = np.asarray(nib.load(truth_file).dataobj)
    expected = evaluate(tv, truth, mask)["nrmse"]
    got = res["adaptive_tilted"]["TV"]["truth"][0]["nrmse"]
    assert got == pytest.approx(expected, rel=1e-6)
    # a classical method must beat an untrained network by far: the scores are not shuffled
    untrained = res["adaptive_tilted"]["Adaptive U-Net + TL"]["truth"][0]["nrmse"]
    assert got < 0.8 * untrained


@pytest.mark.slow
def test_external_datasets_score_every_acquisition(tmp_path, monkeypatch):
    """A dataset of another simulator: every acquisition is scored against its truth."""
    import qsmprep.benchmarks.accuracy as acc
    from qsmprep.sim.bids import simulate_bids_dataset

    wdir = tmp_path / "weights"
    torch.manual_seed(0)
    net = build_model(default_config("adaptive", base_channels=4, depth=3))
    sha = save_checkpoint(wdir / "adaptive-pretrained.pt", net)
    register_model(wdir, "adaptive-pretrained", wdir / "adaptive-pretrained.pt",
                   arch="adaptive", sha256=sha)  # fmt: skip
    monkeypatch.setenv(WEIGHTS_ENV, str(wdir))
    rows = [("TKD", "tkd", {}), ("Adaptive U-Net, no TL", "adaptive",
                                {"model": "adaptive-pretrained"})]  # fmt: skip
    monkeypatch.setattr(acc, "ROWS_EXTERNAL", rows)
    ext = simulate_bids_dataset(tmp_path / "ext", shape=(48, 48, 48), seed=11,
                                orientations={0: [0.0, 20.0]})  # fmt: skip
    res = acc.run_accuracy(tmp_path / "acc", sets=(), external=(ext,))
    tkd_scores = res["external"]["ext"]["TKD"]["truth"]
    assert len(tkd_scores) == 2  # acq-ori1 and acq-ori2
    anat = next((tmp_path / "acc" / "derivatives" / "ext").glob("run*/sub-01/anat"))
    truth = np.asarray(nib.load(ext / "derivatives/groundtruth/sub-01/anat/sub-01_Chimap.nii.gz")
                       .dataobj)  # fmt: skip
    for k, acq in enumerate(("ori1", "ori2")):
        chi = np.asarray(nib.load(anat / f"sub-01_acq-{acq}_desc-tkd_Chimap.nii.gz").dataobj)
        m = np.asarray(nib.load(anat / f"sub-01_acq-{acq}_desc-local_mask.nii.gz").dataobj) > 0
        assert tkd_scores[k]["nrmse"] == pytest.approx(evaluate(chi, truth, m)["nrmse"], rel=1e-6)
    # TKD recovers the phantom, the untrained network does not
    net_scores = res["external"]["ext"]["Adaptive U-Net, no TL"]["truth"]
    assert max(s["nrmse"] for s in tkd_scores) < 0.8 * min(s["nrmse"] for s in net_scores)
    assert "External data: `ext` (2 scans" in res["markdown"]
    with pytest.raises(ValueError, match="groundtruth"):
        acc.run_accuracy(tmp_path / "acc2", sets=(), external=(tmp_path / "acc",))
