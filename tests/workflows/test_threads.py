"""Nodes use the threads they are granted: BLAS/OpenMP, scipy.fft, torch."""

import scipy.fft
import torch
from nipype.interfaces.base import TraitedSpec, traits
from threadpoolctl import threadpool_info

from qsmprep.interfaces._threads import ThreadedInterface, ThreadsInputSpec
from qsmprep.recon._backend import get_fft_workers
from qsmprep.threads import limit_threads
from qsmprep.workflows import init_qsm_wf
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
