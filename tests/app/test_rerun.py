"""Safe reruns: a killed run resumes, array jobs share one output folder, writes are atomic.

The end-to-end tests run the BIDS App as subprocesses on the smallest volumes that exercise
the chain (32 x 32 x 24 voxels of 3 mm, three echoes).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmprep import _atomic
from qsmprep.config import Settings
from qsmprep.interfaces import WriteDerivative
from qsmprep.sim.bids import simulate_bids_dataset

REPO = Path(__file__).resolve().parents[2]
MAPS = ("brain_mask", "local_mask", "reliable_mask", "total_fieldmap", "noise_fieldmap",
        "local_fieldmap")  # fmt: skip


def _dataset(root: Path, n_subjects: int) -> Path:
    return simulate_bids_dataset(
        root,
        n_subjects=n_subjects,
        shape=(32, 32, 24),
        voxel_size=3.0,
        echo_times=(0.004, 0.008, 0.012),
        seed=3,
    )


def _command(bids, out, work, methods, *extra) -> list[str]:
    return [
        sys.executable, "-m", "qsmprep.cli.run", str(bids), str(out), "participant",
        "--methods", *methods, "-w", str(work), "--nprocs", "1", "--device", "cpu", *extra,
    ]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(NIPYPE_NO_ET="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def _check_outputs(out: Path, sub: str, methods) -> None:
    """Every derivative of ``sub`` is there, loads, and its sidecar is valid JSON."""
    anat = out / f"sub-{sub}" / "anat"
    stems = [f"sub-{sub}_desc-{m}" for m in MAPS]
    stems += [f"sub-{sub}_desc-{m}_Chimap" for m in methods]
    for stem in stems:
        img = nib.load(anat / f"{stem}.nii.gz")
        assert img.shape == (32, 32, 24), stem
        np.asarray(img.dataobj)  # the whole (gzip) stream decodes
        assert json.loads((anat / f"{stem}.json").read_text())["GeneratedBy"]
    for m in methods:
        chi = nib.load(anat / f"sub-{sub}_desc-{m}_Chimap.nii.gz").get_fdata()
        assert np.isfinite(chi).all() and np.count_nonzero(chi) > 1000, m
    assert (anat / f"sub-{sub}_metrics.tsv").is_file()
    json.loads((anat / f"sub-{sub}_metrics.json").read_text())
    assert (out / f"sub-{sub}.html").is_file()
    assert not list(out.rglob("*.tmp")), "a temporary file was left in the output folder"


def _finished_nodes(work: Path) -> dict[Path, tuple[int, int]]:
    """Node folders whose run completed: result file and a finished hash file.

    Maps each node's result file to its (inode, mtime); Nipype rewrites the file whenever it
    executes the node again and leaves it alone when it reuses the node.
    """
    out = {}
    for res in work.rglob("result_*.pklz"):
        hashes = [p.name for p in res.parent.glob("_0x*.json")]
        if hashes and not any(h.endswith("_unfinished.json") for h in hashes):
            st = res.stat()
            out[res] = (st.st_ino, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------------------------
# (a) SIGKILL in the middle of a participant, then the same command


@pytest.mark.slow
def test_killed_run_resumes_and_reuses_finished_nodes(tmp_path, record_property):
    bids, out, work = _dataset(tmp_path / "bids", 1), tmp_path / "out", tmp_path / "work"
    cmd = _command(bids, out, work, ["tkd", "tv"])
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    # Kill once the total field is fitted and the TV inversion has started (its unfinished
    # hash file is written before it computes): a node dies mid-run, others have finished.
    deadline = time.monotonic() + 120
    tv = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(work.rglob("inversion_tv/_0x*.json"))
        if found and list(work.rglob("result_fit_field.pklz")):
            tv = found[0]
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; see killed.log"
    assert tv is not None, "the TV inversion never started"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: MultiProc's worker too
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    before = _finished_nodes(work)
    names = sorted(p.parent.name for p in before)
    assert "fit_field" in names and "inversion_tv" not in names, names

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    _check_outputs(out, "01", ["tkd", "tv"])
    assert not (out / "logs" / "sub-01_error.log").exists()

    after = _finished_nodes(work)
    assert set(after) >= set(before)
    # sinks (ds_*) publish into the output folder on every run by design: cheap, and a
    # deleted derivative comes back; every other finished node must be reused
    computed = {p: v for p, v in before.items() if not p.parent.name.startswith("ds_")}
    rerun_nodes = sorted(p.parent.name for p, v in computed.items() if after[p] != v)
    assert not rerun_nodes, f"finished nodes were executed again: {rerun_nodes}"
    assert len(computed) >= 4  # load, mask, unwrap, fit at least
    record_property("nodes_finished_before_kill", len(before))
    record_property("computing_nodes_reused", len(computed))
    print(f"killed mid inversion_tv; {len(computed)} finished computing nodes reused, "
          f"{len(before) - len(computed)} sinks rewritten: {names}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# (b) array jobs writing into one output folder; atomic derivative writes


@pytest.mark.slow
def test_concurrent_array_tasks_share_one_output_folder(tmp_path):
    bids, out = _dataset(tmp_path / "bids", 2), tmp_path / "out"
    procs = []
    for sub in ("01", "02"):  # as an HPC array would: one work folder per participant
        cmd = _command(bids, out, tmp_path / f"work-{sub}", ["tkd"], "--participant-label", sub)
        log = open(tmp_path / f"sub-{sub}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()), log)
        )
    for proc, log in procs:
        assert proc.wait(timeout=300) == 0, Path(log.name).read_text()[-3000:]
        log.close()

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qsmprep"
    assert (out / "dataset_description.json").stat().st_mode & 0o777 == 0o644
    settings = json.loads((out / "qsmprep_settings.json").read_text())
    assert settings["participant_label"] == ["01", "02"]
    assert settings["methods"] == ["tkd"]
    for sub in ("01", "02"):
        _check_outputs(out, sub, ["tkd"])
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    assert not list((out / "logs").glob("crash-*"))
    assert not list((out / "logs").glob("*error*"))


def _write_settings(root: str, label: str, barrier) -> None:
    s = Settings(bids_dir=root, output_dir=Path(root) / "out", participant_label=[label])
    barrier.wait()
    s.write(Path(root) / "out" / "qsmprep_settings.json")


def test_settings_file_merges_participants_under_a_lock(tmp_path, caplog):
    labels = [f"{i:02d}" for i in range(1, 9)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(labels))
    procs = [
        ctx.Process(target=_write_settings, args=(str(tmp_path), lab, barrier)) for lab in labels
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    path = tmp_path / "out" / "qsmprep_settings.json"
    assert json.loads(path.read_text())["participant_label"] == labels
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".qsmprep_settings.json.lock",
        "qsmprep_settings.json",
    ]

    # a run over all participants absorbs the lists; other differences are reported
    Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", methods=["tv"]).write(path)
    data = json.loads(path.read_text())
    assert data["participant_label"] is None and data["methods"] == ["tv"]
    assert "methods" in caplog.text
    # a broken file (written by something else) is replaced, not fatal
    path.write_text('{"participant_label": ["0')
    Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", participant_label=["03"]).write(path)
    assert json.loads(path.read_text())["participant_label"] == ["03"]
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.fixture()
def disk_full_midway(monkeypatch):
    """Writes fail with ENOSPC after the first 4 KiB chunk (the file is half written)."""
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    monkeypatch.setattr(_atomic, "_CHUNK", 4096)
    monkeypatch.setattr(_atomic, "_write", write)
    return calls


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_write_derivative_on_a_full_disk_leaves_no_partial_file(
    tmp_path, disk_full_midway, existing
):
    src = tmp_path / "work" / "chi.nii.gz"
    src.parent.mkdir()
    src.write_bytes(np.random.default_rng(0).bytes(3 * 4096))
    anat = tmp_path / "out" / "sub-01" / "anat"
    target = anat / "sub-01_desc-tkd_Chimap.nii.gz"
    sidecar = anat / "sub-01_desc-tkd_Chimap.json"
    if existing:  # the complete result of an earlier run stays as it was
        anat.mkdir(parents=True)
        target.write_bytes(b"old data")
        sidecar.write_text('{"old": true}')
    node = WriteDerivative(in_file=str(src), out_file=str(target), sidecar={"Units": "ppm"})
    with pytest.raises(_atomic.DiskFullError) as err:
        node.run(cwd=str(tmp_path / "work"))
    assert err.value.errno == errno.ENOSPC
    assert str(target) in str(err.value) and "disk is full" in str(err.value)
    assert len(disk_full_midway) == 2  # the copy failed midway, after one chunk
    if existing:
        assert target.read_bytes() == b"old data"
        assert json.loads(sidecar.read_text()) == {"old": True}
        assert sorted(p.name for p in anat.iterdir()) == [sidecar.name, target.name]
    else:
        assert sorted(anat.iterdir()) == []  # no final name, no temporary file


def test_atomic_helpers_name_the_file_on_other_errors(tmp_path, monkeypatch):
    def write(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_atomic, "_write", write)
    target = tmp_path / "dataset_description.json"
    with pytest.raises(OSError, match="cannot write .*dataset_description.json: Input/output"):
        _atomic.write_text(target, "{}")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    keep = [anat / "sub-01_desc-tkd_Chimap.nii.gz", anat / "notes.tmp"]
    stale = [anat / ".sub-01_desc-tkd_Chimap.nii.gz.x1y2z3.tmp", tmp_path / ".sub-01.html.tmp"]
    for p in keep + stale:
        p.write_text("x")
    assert sorted(_atomic.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert _atomic.remove_stale_temporaries(tmp_path / "missing") == []


# --------------------------------------------------------------------------------------------
# (c) two CPU runs give identical maps


@pytest.mark.slow
def test_two_cpu_runs_give_identical_chimaps(tmp_path):
    bids = _dataset(tmp_path / "bids", 1)
    methods = ["tkd", "tv", "medi"]
    outs = []
    for run in ("a", "b"):
        out = tmp_path / f"out-{run}"
        cmd = _command(bids, out, tmp_path / f"work-{run}", methods)
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        outs.append(out / "sub-01" / "anat")
    a, b = outs
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {f"sub-01_desc-{m}_Chimap.nii.gz" for m in methods} <= set(files)
    for name in files:
        if name.endswith(".nii.gz"):
            x, y = (np.asanyarray(nib.load(d / name).dataobj) for d in (a, b))
            assert np.array_equal(x, y, equal_nan=True), name
        else:  # sidecars, metrics: no timestamps or run-specific paths in them
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_participant_busy_in_another_run_is_left_alone(tmp_path, capsys):
    """Two runs of one participant with one work directory: the second refuses that
    participant (it would overwrite the first one's nodes), names the lock, exits 1."""
    import fcntl

    from qsmprep.cli import run

    bids = tmp_path / "bids"
    simulate_bids_dataset(
        bids, n_subjects=1, shape=(32, 32, 24), voxel_size=3.0,
        echo_times=(0.004, 0.008, 0.012), seed=3,
    )  # fmt: skip
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    fd = os.open(work / ".sub-01.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "the other run"
    try:
        code = run.main([str(bids), str(out), "participant", "-w", str(work),
                         "--methods", "tkd", "--skip-bids-validation"])  # fmt: skip
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert code == 1
    assert "another qsmprep run is processing sub-01" in err and ".sub-01.lock" in err
    assert not (out / "sub-01").exists() and not (out / "sub-01.html").exists()
