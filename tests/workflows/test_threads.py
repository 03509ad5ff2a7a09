"""Nodes use the threads they are granted: BLAS/OpenMP, scipy.fft, torch."""

import pytest
import scipy.fft
import torch
from nipype.interfaces.base import TraitedSpec, traits
from threadpoolctl import threadpool_info

from qsmprep.config import Settings
from qsmprep.interfaces._threads import ThreadedInterface, ThreadsInputSpec
from qsmprep.recon._backend import get_fft_workers
from qsmprep.threads import limit_threads, share_cores
from qsmprep.workflows import init_participant_wf, init_qsm_wf, long_node_threads
from tests.workflows.test_workflows import _acq, _nodes


def test_limit_threads_sets_every_pool_and_restores_it():
    before = (get_fft_workers(), scipy.fft.get_workers(), torch.get_num_threads())
    with limit_threads(1):
        assert get_fft_workers() == 1 and scipy.fft.get_workers() == 1
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert (get_fft_workers(), scipy.fft.get_workers(), torch.get_num_threads()) == before
    with limit_threads(None):  # no limit: nothing changes
        assert get_fft_workers() == before[0]


class _Out(TraitedSpec):
    workers = traits.Int()
    blas = traits.List(traits.Int)


class _Probe(ThreadedInterface):
    input_spec = ThreadsInputSpec
    output_spec = _Out

    def _run_interface(self, runtime):
        self._results["workers"] = get_fft_workers()
        self._results["blas"] = [p["num_threads"] for p in threadpool_info()]
        return runtime


def test_threaded_interface_runs_under_its_thread_count(tmp_path):
    res = _Probe(num_threads=1).run(cwd=str(tmp_path))
    assert res.outputs.workers == 1 and set(res.outputs.blas) == {1}
    assert get_fft_workers() == -1  # restored after the run


def test_heavy_nodes_get_the_threads_they_reserve():
    nodes = _nodes(init_qsm_wf(acquisition=_acq(), output_dir=None, methods=["tkd", "tv"],
                               omp_nthreads=3))  # fmt: skip
    threaded = {k: n for k, n in nodes.items() if "num_threads" in n.inputs.copyable_trait_names()}
    names = {k.split(".")[-1] for k in threaded}
    assert {"load_echoes", "unwrap_phase", "fit_field", "remove_background",
            "inversion_tv", "r2star_map"} <= names  # fmt: skip
    for name, node in threaded.items():
        # a node never runs more threads than the scheduler reserved for it
        assert node.inputs.num_threads <= node.n_procs, name
    assert nodes["qsm_wf.inversion_wf.inversion_tv"].inputs.num_threads == 3
    assert nodes["qsm_wf.field_wf.unwrap_phase"].n_procs == 3


def test_share_cores():
    # a lone node gets every core (at most 8); more nodes than cores: one thread each
    cases = {(2, 1): 2, (2, 2): 1, (2, 6): 1, (3, 2): 1, (4, 2): 2, (4, 1): 4, (16, 2): 8,
             (16, 1): 8, (1, 1): 1, (8, 0): 8, (12, 3): 4}  # fmt: skip
    assert {k: share_cores(*k) for k in cases} == cases
    with pytest.raises(ValueError, match="nprocs >= 1"):
        share_cores(0, 1)


def _threads_of(tmp_path, acqs, **kw):
    """``{node name: (n_procs, num_threads)}`` of the participant workflow's threaded nodes."""
    s = Settings(bids_dir="/data", output_dir=tmp_path / "out", device="cpu", **kw)
    nodes = _nodes(init_participant_wf(acqs, s))
    out = {}
    for name, node in nodes.items():
        if "num_threads" in node.inputs.copyable_trait_names():
            key = name.split(".", 1)[1]  # without the participant workflow's name
            out[key] = (node.n_procs, node.inputs.num_threads)
    return out


def test_long_inversions_share_the_cores(tmp_path):
    one, two = [_acq()], [_acq(acq="a"), _acq(acq="b")]
    # 2 cores, --omp-nthreads not given: a lone MEDI gets both cores, TKD and the chain one
    t = _threads_of(tmp_path, one, methods=["tkd", "medi"], nprocs=2, omp_nthreads=1)
    assert t["qsm_sub_01_wf.inversion_wf.inversion_medi"] == (2, 2)
    assert t["qsm_sub_01_wf.inversion_wf.inversion_tkd"] == (1, 1)
    assert t["qsm_sub_01_wf.field_wf.unwrap_phase"] == (1, 1)
    # TV and MEDI side by side, one core each
    t = _threads_of(tmp_path, one, methods=["tkd", "tv", "medi"], nprocs=2, omp_nthreads=1)
    assert {k: v for k, v in t.items() if "inversion_" in k} == {
        f"qsm_sub_01_wf.inversion_wf.inversion_{m}": (1, 1) for m in ("tkd", "tv", "medi")
    }
    # two acquisitions with MEDI each: one core each
    t = _threads_of(tmp_path, two, methods=["medi"], nprocs=2, omp_nthreads=1)
    assert sorted(v for k, v in t.items() if "inversion_medi" in k) == [(1, 1), (1, 1)]
    # 4 cores: TV and MEDI side by side with two each (nprocs - 1 = 3 would serialise them)
    t = _threads_of(tmp_path, one, methods=["tv", "medi"], nprocs=4, omp_nthreads=3)
    assert t["qsm_sub_01_wf.inversion_wf.inversion_tv"] == (2, 2)
    assert t["qsm_sub_01_wf.inversion_wf.inversion_medi"] == (2, 2)
    assert t["qsm_sub_01_wf.field_wf.unwrap_phase"] == (3, 3)
    # --omp-nthreads given: that many, whatever the work
    t = _threads_of(tmp_path, one, methods=["medi"], nprocs=4, omp_nthreads=1, long_nthreads=1)
    assert t["qsm_sub_01_wf.inversion_wf.inversion_medi"] == (1, 1)
    # nodes one at a time (Linear): every core for each
    s = Settings(bids_dir="/data", output_dir=tmp_path / "o", methods=["tv", "medi"], nprocs=4,
                 omp_nthreads=3, plugin="Linear")  # fmt: skip
    assert long_node_threads(s, 2) == 4
    # no long method, or the inversions on a GPU: omp_nthreads
    s = Settings(bids_dir="/data", output_dir=tmp_path / "o", methods=["tkd"], nprocs=4,
                 omp_nthreads=3)  # fmt: skip
    assert long_node_threads(s, 1) == 3
    s.methods, s.device = ["medi"], "cuda"
    assert long_node_threads(s, 1) == 3
