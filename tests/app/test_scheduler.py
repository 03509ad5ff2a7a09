"""The MultiProc scheduler that wakes when a node finishes (qsmprep.app.scheduler)."""

from __future__ import annotations

import nipype.pipeline.engine as pe
from nipype.interfaces.utility import Function
from nipype.pipeline.plugins import base as plugin_base

from qsmprep.app.levels import _plugin
from qsmprep.app.scheduler import WakingMultiProcPlugin


def _add_one(x):
    return x + 1


def _chain(base_dir, n):
    wf = pe.Workflow(name="chain", base_dir=str(base_dir))
    nodes = [
        pe.Node(Function(input_names=["x"], output_names=["y"], function=_add_one), name=f"n{i}")
        for i in range(n)
    ]
    nodes[0].inputs.x = 0
    nodes[1].run_without_submitting = True  # run in the scheduler's process, as our data sinks
    for a, b in zip(nodes, nodes[1:], strict=False):
        wf.connect(a, "y", b, "x")
    return wf


def test_each_finished_node_wakes_the_loop_and_the_results_are_nipypes(tmp_path):
    # a poll interval far longer than a node: without the wake-up each of the chain's nodes
    # would wait out (part of) it, and no wait would end early; the second node runs in the
    # scheduler's process, which no worker's callback reports
    n = 4
    wf = _chain(tmp_path, n)
    wf.config["execution"] = {"poll_sleep_duration": 30.0, "remove_unnecessary_outputs": False}
    plugin = WakingMultiProcPlugin(plugin_args={"n_procs": 2})
    graph = wf.run(plugin=plugin)
    assert plugin.wakeups >= n  # one per node, each ending a 30 s wait early
    assert plugin.timeouts == 0  # nor does the last pass, after the last node, wait
    ends = {node.name: node.result.outputs.y for node in graph.nodes()}
    assert ends == {f"n{i}": i + 1 for i in range(n)}
    assert plugin_base.sleep.__module__ == "time"  # Nipype's sleep is back after the run

    # run again: every node is found cached, and none waits either
    again = WakingMultiProcPlugin(plugin_args={"n_procs": 2})
    wf.run(plugin=again)
    assert again.timeouts == 0


def test_multiproc_is_the_waking_plugin_and_other_plugins_keep_their_names():
    assert isinstance(_plugin("MultiProc", {"n_procs": 1}), WakingMultiProcPlugin)
    assert _plugin("Linear", {}) == "Linear"
