"""``qsmprep ... --dl-adapt``: the networks adapt to the data being processed, then infer.

One simulated head (64 x 64 x 48 voxels of 2 mm, three echoes), the App run as a library,
without and with adaptation. The bounds were written before the first measurement: adapting
QSMInvNet (data-consistency fine-tuning) to the head's own field must lower the
data-consistency residual of its map (at most 0.98 of the shipped network's), and neither
adapted network may be worse against the true susceptibility by more than 1 NRMSE point.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")

from qsmprep.app import UsageError, make_settings, run  # noqa: E402
from qsmprep.app.adapt import MODELS_DIR, selection_label  # noqa: E402
from qsmprep.dl.checkpoint import file_sha256, load_checkpoint  # noqa: E402
from qsmprep.dl.weights import available_models, resolve_model  # noqa: E402
from qsmprep.metrics import nrmse  # noqa: E402
from qsmprep.sim.bids import simulate_bids_dataset  # noqa: E402
from qsmprep.validation import BIDSIGNORE  # noqa: E402

METHODS = ["dsbn", "dcfinetune"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    bids = simulate_bids_dataset(
        root / "bids", n_subjects=1, shape=(64, 64, 48), voxel_size=2.0,
        echo_times=(0.004, 0.008, 0.012), seed=3,
    )  # fmt: skip

    def app(out, **kw):
        s = make_settings(bids, root / out, "participant", work_dir=root / f"work-{out}",
                          methods=METHODS, nprocs=1, device="cpu", **kw)  # fmt: skip
        assert run(s) == 0
        return root / out

    plain = app("plain")
    adapted = app("adapted", dl_adapt=True, dl_adapt_steps=60)
    return {"bids": bids, "plain": plain, "adapted": adapted, "app": app}


def _sidecar(out, method) -> dict:
    return json.loads((out / "sub-01" / "anat" / f"sub-01_desc-{method}_Chimap.json").read_text())


def _nrmse(out, bids, method) -> float:
    gt = bids / "derivatives" / "groundtruth" / "sub-01" / "anat"
    truth = nib.load(next(gt.glob("*Chimap.nii.gz"))).get_fdata()
    mask = nib.load(next(gt.glob("*brain_mask.nii.gz"))).get_fdata() > 0
    chi = nib.load(out / "sub-01" / "anat" / f"sub-01_desc-{method}_Chimap.nii.gz").get_fdata()
    return nrmse(chi, truth, mask)


def test_adapted_weights_are_in_the_output_and_run(runs):
    models = runs["adapted"] / MODELS_DIR / "sub-01"
    registered = available_models(models)
    assert set(registered) == set(METHODS)
    for method in METHODS:
        entry = registered[method]
        assert entry.sha256 == file_sha256(entry.path)
        assert entry.card is not None and "Validation" in entry.card.read_text()
        manifest = json.loads((models / f"{method}_adaptation.json").read_text())
        assert list(manifest["TargetLocalFields"]) == ["sub-01_desc-local_fieldmap.nii.gz"]
        assert manifest["Steps"] == 60 and manifest["Sha256"] == entry.sha256
        shipped = resolve_model(method)
        assert manifest["InitialSha256"] == (shipped.sha256 or file_sha256(shipped.path))
        # the Chimap says which weights made it: the adapted ones, not the shipped ones
        params = _sidecar(runs["adapted"], method)["Parameters"]
        assert params["WeightsSha256"] == entry.sha256 != shipped.sha256
        assert _sidecar(runs["plain"], method)["Parameters"]["WeightsSha256"] == shipped.sha256
    # QSMInvNet+ runs its target batch norms, now with this dataset's statistics
    net, _ = load_checkpoint(registered["dsbn"].path)
    shipped_net, _ = load_checkpoint(resolve_model("dsbn").path)
    state, shipped_state = net.state_dict(), shipped_net.state_dict()
    target_bn = [k for k in state if ".bns.target.running_mean" in k]
    assert target_bn
    assert all(not np.allclose(state[k], shipped_state[k]) for k in target_bn)
    assert "models" in BIDSIGNORE.split()
    assert (runs["adapted"] / ".bidsignore").read_text() == BIDSIGNORE


def test_adaptation_lowers_the_data_consistency_residual(runs):
    before = _sidecar(runs["plain"], "dcfinetune")["DataConsistencyResidual"]
    after = _sidecar(runs["adapted"], "dcfinetune")["DataConsistencyResidual"]
    assert after <= 0.98 * before, (before, after)
    for method in METHODS:
        a, b = (
            _nrmse(runs["adapted"], runs["bids"], method),
            _nrmse(runs["plain"], runs["bids"], method),
        )
        assert a <= b + 1.0, (method, a, b)


def test_rerun_reuses_and_new_settings_adapt_again(runs, caplog):
    models = runs["adapted"] / MODELS_DIR / "sub-01"
    stamp = {m: (models / f"{m}.pt").stat().st_mtime_ns for m in METHODS}
    with caplog.at_level("INFO", logger="qsmprep"):
        runs["app"]("adapted", dl_adapt=True, dl_adapt_steps=60)
    assert {m: (models / f"{m}.pt").stat().st_mtime_ns for m in METHODS} == stamp
    assert sum("reuses" in r.getMessage() for r in caplog.records) == 2
    old = file_sha256(models / "dsbn.pt")
    runs["app"]("adapted", dl_adapt=True, dl_adapt_steps=3)
    assert file_sha256(models / "dsbn.pt") != old
    assert json.loads((models / "dsbn_adaptation.json").read_text())["Steps"] == 3
    assert _sidecar(runs["adapted"], "dsbn")["Parameters"]["WeightsSha256"] == file_sha256(
        models / "dsbn.pt"
    )


def test_networks_use_two_threads_after_adaptation(runs, tmp_path):
    """The adaptation trains in a process of its own, so the App's torch thread pool stays
    unused and the network nodes that Nipype forks afterwards may use several threads. When it
    trained in the App's process, a network node given two threads hung forever (torch's
    OpenMP pool does not survive a fork). A command-line run, as users start it: this test
    process has used torch's threads already."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "qsmprep", str(runs["bids"]), str(out), "participant",
            "-w", str(tmp_path / "work"), "--methods", "dsbn", "--outputs", "chi",
            "--dl-adapt", "--dl-adapt-steps", "2", "--nprocs", "2", "--omp-nthreads", "2",
            "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "sub-01" / "anat" / "sub-01_desc-dsbn_Chimap.nii.gz").is_file()
    params = _sidecar(out, "dsbn")["Parameters"]
    assert params["WeightsSha256"] == file_sha256(out / MODELS_DIR / "sub-01" / "dsbn.pt")


def test_command_line(runs, tmp_path):
    from qsmprep.cli.run import build_parser, settings_from_args

    argv = [str(runs["bids"]), str(tmp_path / "o"), "participant", "--methods", *METHODS]
    s = settings_from_args(
        build_parser().parse_args([*argv, "--dl-adapt", "--dl-adapt-steps", "7"])
    )
    assert s.dl_adapt and s.dl_adapt_steps == 7
    s = settings_from_args(build_parser().parse_args(argv))
    assert not s.dl_adapt and s.dl_adapt_steps == 300


def test_selections_adapt_side_by_side(tmp_path):
    """Array jobs that each process some participants into one output folder adapt to their
    own selection, in folders of their own."""
    from qsmprep.config import Settings

    s = Settings(bids_dir=tmp_path, output_dir=tmp_path / "o")
    assert selection_label(s, ["02", "01"]) == "sub-01+sub-02"
    assert selection_label(s, ["01"]) != selection_label(s, ["02"])
    many = [f"{i:02d}" for i in range(10)]
    assert selection_label(s, many).startswith("10-subjects-")
    assert selection_label(s, many) != selection_label(s, many[1:] + ["99"])
    ses = Settings(bids_dir=tmp_path, output_dir=tmp_path / "o", session_label=["pre"])
    assert selection_label(ses, ["01"]).startswith("sub-01-")
    assert selection_label(ses, ["01"]) != selection_label(s, ["01"])


def test_bad_steps_are_a_usage_error(runs):
    with pytest.raises(UsageError, match="--dl-adapt-steps"):
        make_settings(runs["bids"], runs["bids"].parent / "x", "participant", methods=METHODS,
                      dl_adapt=True, dl_adapt_steps=0)  # fmt: skip


def test_failed_adaptation_drops_only_the_adapted_methods(runs, monkeypatch, capsys):
    """An adaptation that fails: the other methods' maps are made, the adaptable ones are not
    (no map from weights other than those asked for), and the run exits with 1 saying why."""
    import qsmprep.app.adapt as adapt

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the adaptation")

    monkeypatch.setattr(adapt, "_adapt_one", broken)
    out, work = runs["bids"].parent / "broken", runs["bids"].parent / "work-plain"
    s = make_settings(runs["bids"], out, "participant", work_dir=work,
                      methods=["tkd", "dsbn"], nprocs=1, device="cpu", dl_adapt=True)  # fmt: skip
    assert run(s) == 1
    anat = out / "sub-01" / "anat"
    assert (anat / "sub-01_desc-tkd_Chimap.nii.gz").is_file()
    assert not list(anat.glob("*dsbn*"))
    err = capsys.readouterr().err
    assert "--dl-adapt" in err and "out of memory in the adaptation" in err and "dsbn" in err
    s = make_settings(runs["bids"], out, "participant", work_dir=work,
                      methods=["dsbn"], nprocs=1, device="cpu", dl_adapt=True)  # fmt: skip
    assert run(s) == 1  # nothing left to run: a usage error, printed
    assert "out of memory in the adaptation" in capsys.readouterr().err
