import os
import subprocess
import sys

import numpy as np
import pytest

from qsmprep.recon import _backend


def test_fft_workers_setting():
    x = np.random.default_rng(0).normal(size=(8, 10, 6)).astype(np.float32)
    ref = _backend.rfftn(x)
    assert _backend.get_fft_workers() == -1
    with _backend.fft_workers(1):
        assert _backend.get_fft_workers() == 1
        # the default engine: torch with one thread, scipy with more; equal to float32 rounding
        np.testing.assert_allclose(_backend.rfftn(x), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
        with _backend.fft_engine("scipy"):  # one engine: the thread count changes nothing
            np.testing.assert_array_equal(_backend.rfftn(x), ref)
    assert _backend.get_fft_workers() == -1
    assert _backend.set_fft_workers(2) == -1
    assert _backend.set_fft_workers(None) == 2
    assert _backend.get_fft_workers() == -1
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers"):
            _backend.set_fft_workers(bad)
    assert _backend.get_fft_workers() == -1


@pytest.mark.parametrize("shape", [(8, 10, 6), (9, 7, 5)])
def test_fft_engines_agree(shape):
    """torch's CPU FFT and scipy.fft (the two engines of NumPy arrays) give the same
    transforms to float32 rounding, on even and odd grids, padded or not, real and complex."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    c = (x + 1j * rng.normal(size=shape)).astype(np.complex64)
    padded = tuple(n + 3 for n in shape)
    out = {}
    for engine in _backend.FFT_ENGINES:
        with _backend.fft_engine(engine):
            spec = _backend.rfftn(x, s=padded)
            out[engine] = (
                spec,
                _backend.irfftn(spec, s=padded),
                _backend.fftn(c),
                _backend.ifftn(_backend.fftn(c)),
            )
            assert isinstance(spec, np.ndarray) and spec.dtype == np.complex64
    for a, b in zip(out["torch"], out["scipy"], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())
    np.testing.assert_allclose(out["torch"][1][: shape[0], : shape[1], : shape[2]], x, atol=1e-5)
    np.testing.assert_allclose(out["torch"][3], c, atol=1e-5)


def test_fft_engine_setting_and_awkward_arrays():
    x = np.random.default_rng(2).normal(size=(6, 8, 10)).astype(np.float32)
    ref = _backend.rfftn(x)
    assert _backend.get_fft_engine() == "auto"
    old = _backend.set_fft_engine("torch")
    # read-only, reversed and strided views are transformed like their copies
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_allclose(_backend.rfftn(ro), ref, atol=1e-5)
    np.testing.assert_allclose(
        _backend.rfftn(x[::-1]), _backend.rfftn(np.ascontiguousarray(x[::-1])), atol=1e-5
    )
    big = np.random.default_rng(3).normal(size=(12, 8, 20)).astype(np.float32)
    np.testing.assert_allclose(
        _backend.rfftn(big[::2, :, ::2]),
        _backend.rfftn(np.ascontiguousarray(big[::2, :, ::2])),
        atol=1e-5,
    )
    # integers go to scipy (which promotes them), the setting is restored
    assert _backend.rfftn(np.ones((4, 4, 4), dtype=np.int16))[0, 0, 0] == 64
    assert _backend.set_fft_engine("scipy") == "torch"
    assert _backend.get_fft_engine() == "scipy"
    with _backend.fft_engine("torch"):
        assert _backend.get_fft_engine() == "torch"
    assert _backend.set_fft_engine("torch") == "scipy"
    with pytest.raises(ValueError, match="FFT engine"):
        _backend.set_fft_engine("fftw")
    # a thread count for the FFTs is honoured for torch's pool and then given back
    import torch

    before = torch.get_num_threads()
    with _backend.fft_workers(1):
        np.testing.assert_allclose(_backend.rfftn(x), ref, atol=1e-5)
    assert torch.get_num_threads() == before
    _backend.set_fft_engine(old)
    assert _backend.get_fft_engine() == "auto"


def test_auto_engine_uses_torch_for_one_thread_only(monkeypatch):
    """``auto``: torch's FFT for single-threaded FFTs (a node given one thread), scipy for the
    others, whose torch pool would not survive a fork."""
    import scipy.fft
    import torch

    calls = []
    for mod, name in ((torch.fft, "rfftn"), (scipy.fft, "rfftn")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _mod=mod.__name__, **k):
            calls.append(_mod)
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    x = np.ones((4, 6, 8), np.float32)
    with _backend.fft_engine("auto"):
        for workers, engine in ((1, "torch.fft"), (2, "scipy.fft"), (-1, "scipy.fft")):
            calls.clear()
            with _backend.fft_workers(workers):
                _backend.rfftn(x)
                assert _backend.active_fft_engine() == engine.split(".")[0]
            assert calls == [engine], (workers, calls)
    with _backend.fft_engine("torch"), _backend.fft_workers(2):
        assert _backend.active_fft_engine() == "torch"


def test_auto_engine_times_both_on_large_single_threaded_grids(monkeypatch):
    """``auto`` with one thread on a grid of at least CALIBRATE_MIN_VOXELS: a transform's first
    CALIBRATE_AFTER calls run torch, the next times both engines, the faster one runs from
    then on, per transform; more threads, a fixed engine or a small grid time nothing."""
    import time

    monkeypatch.setattr(_backend, "_CHOICES", {})
    monkeypatch.setattr(_backend, "_SEEN", {})
    monkeypatch.setattr(_backend, "CALIBRATE_MIN_VOXELS", 500)
    slow = {"engine": "torch"}
    calls = []
    for engine, real in dict(_backend._RUN).items():

        def run(kind, x, shape, _real=real, _engine=engine):
            calls.append((_engine, kind))
            if _engine == slow["engine"]:
                time.sleep(0.02)
            return _real(kind, x, shape)

        monkeypatch.setitem(_backend._RUN, engine, run)
    x = np.random.default_rng(4).normal(size=(8, 10, 12)).astype(np.float32)
    with _backend.fft_engine("scipy"):
        ref = _backend.rfftn(x)
        back = _backend.irfftn(ref, s=x.shape)
    assert calls == [("scipy", "rfftn"), ("scipy", "irfftn")]
    with _backend.fft_engine("auto"), _backend.fft_workers(1):
        calls.clear()
        for _ in range(_backend.CALIBRATE_AFTER):
            _backend.rfftn(x)
        assert calls == [("torch", "rfftn")] * _backend.CALIBRATE_AFTER
        assert not _backend.fft_engine_choices()
        calls.clear()
        spec = _backend.rfftn(x)
        rounds = _backend.CALIBRATE_ROUNDS
        assert sorted(calls) == sorted([("torch", "rfftn"), ("scipy", "rfftn")] * rounds)
        np.testing.assert_array_equal(spec, ref)  # the faster (scipy) engine's own result
        calls.clear()
        for _ in range(3):
            _backend.rfftn(x)
        assert calls == [("scipy", "rfftn")] * 3
        (choice,) = _backend.fft_engine_choices().values()
        assert choice["engine"] == "scipy" and choice["torch_ms"] >= 20 > choice["scipy_ms"]
        # the inverse is a transform of its own; now scipy is the slow one
        slow["engine"] = "scipy"
        for _ in range(_backend.CALIBRATE_AFTER):
            _backend.irfftn(spec, s=x.shape)
        calls.clear()
        np.testing.assert_allclose(
            _backend.irfftn(spec, s=x.shape), back, rtol=0, atol=1e-5 * np.abs(back).max()
        )
        assert calls.count(("torch", "irfftn")) == calls.count(("scipy", "irfftn")) == rounds
        calls.clear()
        _backend.irfftn(spec, s=x.shape)
        assert calls == [("torch", "irfftn")]
        engines = {k[0]: v["engine"] for k, v in _backend.fft_engine_choices().items()}
        assert engines == {"rfftn": "scipy", "irfftn": "torch"}
        # below the size limit: torch, untimed
        calls.clear()
        _backend.rfftn(x[:4, :5, :6])
        assert calls == [("torch", "rfftn")]
    for engine, workers, expect in (("auto", 2, "scipy"), ("torch", 1, "torch")):
        with _backend.fft_engine(engine), _backend.fft_workers(workers):
            calls.clear()
            _backend.rfftn(x + 1)
            assert calls == [(expect, "rfftn")], (engine, workers, calls)
    assert len(_backend.fft_engine_choices()) == 2


_FORK_SCRIPT = """
import os, sys, time
import numpy as np
import torch
from qsmprep.recon import _backend

torch.set_num_threads(2)  # the parent uses torch's pool, as a test session or an adaptation
x = torch.randn(1, 4, 48, 48, 48)
for _ in range(3):
    torch.nn.functional.conv3d(x, torch.randn(8, 4, 3, 3, 3)).sum()
pid = os.fork()
if pid == 0:  # a Nipype worker: a node given one thread, FFTs by the default engine
    with _backend.fft_workers(1):
        y = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)
        for _ in range(10):
            _backend.irfftn(_backend.rfftn(y), s=y.shape)
    os._exit(0)
t = time.time()
while time.time() - t < 120:
    if os.waitpid(pid, os.WNOHANG)[0]:
        sys.exit(0)
    time.sleep(0.1)
os.kill(pid, 9)
sys.exit(3)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_default_engine_survives_a_fork_after_torch_used_threads():
    """A forked worker's single-threaded FFTs end (with two threads, torch's pool hangs)."""
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], timeout=300)
    assert proc.returncode == 0, "the forked worker's FFTs never ended"


def test_fft_bench_reports_both_engines(capsys):
    from qsmprep.cli import bench

    args = ["fft", "--shapes", "16", "12", "10", "--threads", "1", "--rounds", "1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| 16x12x10 | 1 |" in out
    from qsmprep.benchmarks.timing import bench_fft

    (row,) = bench_fft([(16, 12, 10)], threads=(1,), rounds=1)["rows"]
    assert row["max_rel_diff"] < 1e-5 and row["pair_ratio"] > 0
    assert bench.main(["fft", "--shapes", "16", "12"]) == 2
