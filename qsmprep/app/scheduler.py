"""Nipype's MultiProc scheduler, woken by finished nodes instead of a fixed poll.

Nipype's distributed plugins loop over "collect finished nodes, submit ready ones, sleep
``poll_sleep_duration``". Every node on the critical path therefore waits, after its
predecessor ends, for the rest of that sleep: half the poll interval on average, per node.
A shorter interval costs the main process CPU time in the loop, which the workers need.

:class:`WakingMultiProcPlugin` keeps the loop and the interval (the longest wait when nothing
happens) but ends the wait as soon as a worker returns a node's result (MultiProc's result
callback, run in the executor's thread, sets an event that the loop waits on) or a node run in
this process (``run_without_submitting``) or found cached has finished, whose successors may be
ready; the loop's last pass, after the last node, does not wait at all. The loop's own
logic is Nipype's, unchanged; only its ``sleep`` is replaced while :meth:`run` runs (Nipype
calls the ``sleep`` of :mod:`nipype.pipeline.plugins.base`, looked up at call time).
"""

from __future__ import annotations

import threading

import numpy as np
from nipype.pipeline.plugins import base as _plugin_base
from nipype.pipeline.plugins.multiproc import MultiProcPlugin

__all__ = ["WakingMultiProcPlugin"]


class WakingMultiProcPlugin(MultiProcPlugin):
    """MultiProc whose scheduling loop wakes when a node finishes (module docstring).

    Takes MultiProc's ``plugin_args`` (``n_procs``, ``memory_gb``, ``status_callback``, ...).
    """

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._finished = threading.Event()
        self.wakeups = 0
        """Waits ended early by a finished node (for tests and diagnostics)."""
        self.timeouts = 0
        """Waits that ran the whole interval."""

    def _async_callback(self, args):
        try:
            super()._async_callback(args)
        finally:
            self._finished.set()

    def _task_finished_cb(self, jobid, cached=False):
        # also for nodes run in this process or found cached: their successors may be ready
        # now, and Nipype would submit them only after the next wait
        super()._task_finished_cb(jobid, cached=cached)
        self._finished.set()

    def _wait(self, seconds: float) -> None:
        if np.all(self.proc_done) and not np.any(self.proc_pending):
            return  # the loop ends now: Nipype's last pass would otherwise sleep a full interval
        # clear before the loop looks at the results: a node that finishes after this
        # point sets the event again and ends the next wait at once
        if self._finished.wait(max(0.0, seconds)):
            self.wakeups += 1
        else:
            self.timeouts += 1
        self._finished.clear()

    def run(self, graph, config, updatehash=False):
        sleep = _plugin_base.sleep
        _plugin_base.sleep = self._wait
        try:
            return super().run(graph, config, updatehash=updatehash)
        finally:
            _plugin_base.sleep = sleep
