"""Interfaces whose numerics use the threads their node was granted (``num_threads``)."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, traits

from qsmprep.threads import limit_threads

__all__ = ["ThreadedInterface", "ThreadsInputSpec"]


class ThreadsInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(
        1,
        usedefault=True,
        nohash=True,
        desc="threads of the numerics (BLAS, FFT, torch); the builders set the node's n_procs",
    )


class ThreadedInterface(SimpleInterface):
    """A :class:`SimpleInterface` run under :func:`qsmprep.threads.limit_threads`."""

    def run(self, cwd=None, ignore_exception=None, **inputs):
        self.inputs.trait_set(**inputs)
        with limit_threads(self.inputs.num_threads):
            return super().run(cwd=cwd, ignore_exception=ignore_exception)
