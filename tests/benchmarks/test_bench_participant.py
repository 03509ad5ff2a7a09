"""``qsmprep-bench participant``: wall time, per-node time and memory, critical path."""

import json

import pytest

from qsmprep.benchmarks.participant import format_participant_table, run_participant_bench
from qsmprep.cli import bench


def test_participant_bench_small(tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (r,) = run_participant_bench(
        tmp_path, shape=(32, 32, 24), voxel_size=3.0, echo_times=(0.004, 0.008, 0.012),
        methods=("tkd", "tv"), nprocs=2, outputs=["chi"],
    )  # fmt: skip
    assert r.exit_code == 0 and r.omp_nthreads == 1
    names = {n.name.split(".")[-1] for n in r.nodes}
    assert {"load_echoes", "fit_field", "remove_background", "inversion_tv"} <= names
    # the critical path is a chain through the field chain: at most the wall time
    crit = [n for n in r.nodes if n.critical]
    assert {"load_echoes", "fit_field"} <= {n.name.split(".")[-1] for n in crit}
    # the longest chain is at least any single node (each node is a chain of one)
    assert max(n.seconds for n in r.nodes) <= r.critical_path + 1e-9
    assert 0 < r.critical_path <= r.wall
    for a, b in zip(crit, crit[1:], strict=False):  # a chain: each starts after the last ended
        assert b.start >= a.end - 1.0
    # the resource monitor recorded peak memory for the compute nodes
    assert all(n.peak_gb and 0 < n.peak_gb < 8 for n in r.nodes if "inversion_" in n.name)
    assert set(r.stages) == {"field chain", "tkd", "tv"} and r.stages["field chain"] > 0
    table = format_participant_table(r)
    assert "wall time of the participant level" in table and "| field chain |" in table
    # Nipype's per-interface traces (.proc-*) stay out of the directory the user ran from
    assert not list(cwd.iterdir())


def test_participant_bench_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"tkd": {"threshold": 0.15}}))
    argv = ["participant", str(tmp_path / "b"), "--shape", "32", "32", "24", "--voxel-size",
            "3", "--echo-times", "0.004", "0.008", "--methods", "tkd", "--outputs", "chi",
            "--json", str(out), "--config", str(config), "--bg-method", "vsharp"]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "critical path" in printed and "background vsharp" in printed
    (run,) = json.loads(out.read_text())["runs"]
    assert run["exit_code"] == 0 and run["critical_path"] > 0 and run["nodes"]
    assert run["bg_method"] == "vsharp"
    # --config and --bg-method reach the App, as qsmprep's own
    (sidecar,) = (tmp_path / "b" / "derivatives-cpu").rglob("*desc-tkd_Chimap.json")
    meta = json.loads(sidecar.read_text())
    assert meta["Parameters"]["threshold"] == 0.15 and meta["BackgroundMethod"] == "vsharp"


def test_participant_bench_simulates_with_scipy_ffts(tmp_path, monkeypatch):
    """The head is simulated with scipy's FFTs whatever the engine setting: torch's FFT with
    more than one thread in the process that forks the App's workers left them a thread pool
    whose first FFT never ended (``QSMPREP_FFT_ENGINE=torch qsmprep-bench participant`` hung)."""
    import qsmprep.sim.bids
    from qsmprep.recon import _backend

    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(_backend.get_fft_engine())
        raise Stop

    monkeypatch.setattr(qsmprep.sim.bids, "simulate_bids_dataset", spy)
    with _backend.fft_engine("torch"), pytest.raises(Stop):
        run_participant_bench(tmp_path, shape=(32, 32, 24), voxel_size=3.0)
    assert seen == ["scipy"]
    assert _backend.get_fft_engine() == "auto"
