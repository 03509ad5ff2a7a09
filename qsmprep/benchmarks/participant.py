"""A whole participant, timed as a user runs it: ``qsmprep-bench participant``.

Simulates one head (default 160 x 186 x 149 at 1 mm, 4 echoes: the size of a 1 mm whole-head
acquisition), runs the BIDS App's participant level on it with the chosen methods, processes
and threads, with Nipype's resource monitor on, and reads back from the work directory, per
node: wall time and peak memory (RSS of the worker process while the node ran, GB, which
includes the worker's imported libraries, about 0.1-0.4 GB). From the workflow graph it
finds the critical path (the chain of dependent nodes with the largest summed time, a lower
bound of the wall time with unlimited cores) and the span of each stage (field chain: first
field node's start to the last one's end; each inversion).

The simulation is not counted; the wall time is that of the App (discovery, validation,
workflow, report).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

__all__ = ["NodeTiming", "ParticipantBench", "format_participant_table", "run_participant_bench"]

DEFAULT_SHAPE = (160, 186, 149)
DEFAULT_ECHO_TIMES = (0.004, 0.008, 0.012, 0.016)


@dataclass
class NodeTiming:
    """One node of the run: its name in the graph and what its result file recorded."""

    name: str
    seconds: float
    start: float
    end: float
    peak_gb: float | None = None
    cpu_percent: float | None = None
    critical: bool = False


@dataclass
class ParticipantBench:
    """Result of one App run (see the module doc)."""

    device: str
    shape: tuple
    voxel_size: float
    n_echoes: int
    methods: list
    nprocs: int
    omp_nthreads: int
    wall: float
    exit_code: int
    nodes: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)
    long_nthreads: int | None = None  # threads of the long-running inversion nodes
    bg_method: str | None = None  # the background removal the run used

    @property
    def critical_path(self) -> float:
        return sum(n.seconds for n in self.nodes if n.critical)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["critical_path"] = self.critical_path
        return d


def _runtime(result_file: Path):
    from nipype.utils.filemanip import loadpkl

    rt = getattr(loadpkl(str(result_file)), "runtime", None)
    if rt is None:
        return None

    def stamp(key):
        value = getattr(rt, key, None)
        return datetime.fromisoformat(value).timestamp() if value else None

    start, end = stamp("startTime"), stamp("endTime")
    if start is None or end is None:
        return None
    return {
        "seconds": float(getattr(rt, "duration", end - start)),
        "start": start,
        "end": end,
        "peak_gb": getattr(rt, "mem_peak_gb", None),
        "cpu_percent": getattr(rt, "cpu_percent", None),
    }


def node_timings(settings, acquisitions) -> list[NodeTiming]:
    """Timings of every node of the participant workflows that ran in ``settings.work_dir``,
    with the critical path marked (longest chain of dependent nodes by summed time)."""
    import networkx as nx

    from qsmprep.bids import group_orientations
    from qsmprep.workflows import init_participant_wf

    groups = group_orientations(acquisitions)
    out: list[NodeTiming] = []
    for sub in sorted({a.subject for a in acquisitions}):
        wf = init_participant_wf(
            [a for a in acquisitions if a.subject == sub],
            settings,
            {k: v for k, v in groups.items() if k[0] == sub},
        )
        wf.base_dir = str(settings.work_dir)
        graph = wf._create_flat_graph()
        timed = {}
        for node in graph.nodes():
            node.base_dir = wf.base_dir
            result = Path(node.output_dir()) / f"result_{node.name}.pklz"
            rt = _runtime(result) if result.is_file() else None
            if rt is not None:
                timed[node] = NodeTiming(name=node.fullname, **rt)
        # critical path: longest chain of dependent nodes by summed time
        best: dict = {}
        for node in nx.topological_sort(graph):
            t = timed[node].seconds if node in timed else 0.0
            preds = [p for p in graph.predecessors(node) if p in best]
            prev = max(preds, key=lambda p: best[p][0]) if preds else None
            best[node] = (t + (best[prev][0] if prev is not None else 0.0), prev)
        if best:
            node = max(best, key=lambda n: best[n][0])
            while node is not None:
                if node in timed:
                    timed[node].critical = True
                node = best[node][1]
        out.extend(timed.values())
    return sorted(out, key=lambda n: n.start)


def _stages(nodes: list[NodeTiming], methods) -> dict:
    def span(match):
        sel = [n for n in nodes if match(n.name)]
        return max(n.end for n in sel) - min(n.start for n in sel) if sel else None

    stages = {"field chain": span(lambda s: ".field_wf." in s)}
    for m in methods:
        stages[m] = span(lambda s, m=m: s.endswith(f"inversion_wf.inversion_{m}"))
    return {k: v for k, v in stages.items() if v is not None}


def run_participant_bench(
    out_dir,
    *,
    shape=DEFAULT_SHAPE,
    voxel_size: float = 1.0,
    echo_times=DEFAULT_ECHO_TIMES,
    methods=("tkd", "tv", "medi"),
    nprocs: int = 2,
    omp_nthreads: int | None = None,
    devices=("cpu",),
    outputs=None,
    seed: int = 0,
    method_params: dict | None = None,
    bg_method: str | None = None,
) -> list[ParticipantBench]:
    """Simulate one head and run the participant level once per device; see the module doc
    (``method_params``: as ``qsmprep --config``; ``bg_method``: as ``--bg-method``, default the
    App's)."""
    from qsmprep.app import default_omp_nthreads, run_participant
    from qsmprep.bids import collect_acquisitions
    from qsmprep.config import DEFAULT_BG_METHOD, OUTPUTS, Settings
    from qsmprep.recon._backend import fft_engine
    from qsmprep.sim.bids import simulate_bids_dataset
    from qsmprep.workflows import long_node_threads

    out_dir = Path(out_dir).absolute()
    bids = out_dir / "bids"
    shape = tuple(int(n) for n in shape)
    if not (bids / "dataset_description.json").is_file():
        t0 = time.perf_counter()
        # scipy's FFTs here, whatever QSMPREP_FFT_ENGINE says: the App's workers are forked
        # from this process, and torch's FFT with more than one thread would leave them a
        # thread pool that does not survive the fork (their first torch FFT never ends)
        with fft_engine("scipy"):
            simulate_bids_dataset(
                bids, n_subjects=1, shape=shape, voxel_size=float(voxel_size),
                echo_times=tuple(echo_times), seed=seed,
            )  # fmt: skip
        print(f"# simulated {shape} at {voxel_size} mm in {time.perf_counter() - t0:.1f} s "
              "(not counted)", flush=True)  # fmt: skip
    omp = omp_nthreads if omp_nthreads is not None else default_omp_nthreads(nprocs)
    results = []
    for device in devices:
        deriv, work = out_dir / f"derivatives-{device}", out_dir / f"work-{device}"
        settings = Settings(
            bids_dir=bids, output_dir=deriv, work_dir=work, methods=list(methods),
            nprocs=nprocs, omp_nthreads=omp, long_nthreads=omp_nthreads, device=device,
            outputs=list(outputs or OUTPUTS), resource_monitor=True,
            plugin_args={"n_procs": nprocs}, method_params=dict(method_params or {}),
            bg_method=bg_method or DEFAULT_BG_METHOD,
        )  # fmt: skip
        t0 = time.perf_counter()
        code = run_participant(settings)
        wall = time.perf_counter() - t0
        acqs = collect_acquisitions(bids)
        nodes = node_timings(settings, acqs)
        results.append(
            ParticipantBench(
                device=device,
                shape=shape,
                voxel_size=float(voxel_size),
                n_echoes=len(echo_times),
                methods=list(methods),
                nprocs=nprocs,
                omp_nthreads=omp,
                wall=wall,
                exit_code=code,
                nodes=nodes,
                stages=_stages(nodes, methods),
                long_nthreads=long_node_threads(settings, len(acqs)),
                bg_method=settings.bg_method,
            )  # fmt: skip
        )
    return results


def format_participant_table(result: ParticipantBench, *, top: int = 15) -> str:
    """Markdown: the run's summary, the stages and the ``top`` longest nodes."""
    r = result
    lines = [
        f"## device {r.device}: {'x'.join(map(str, r.shape))} at {r.voxel_size:g} mm, "
        f"{r.n_echoes} echoes, methods {' '.join(r.methods)}"
        + (f", background {r.bg_method}" if r.bg_method else "")
        + f", {r.nprocs} process(es), "
        f"{r.omp_nthreads} thread(s) per node"
        + (f", {r.long_nthreads} per long-running inversion node" if r.long_nthreads else ""),
        "",
        f"- wall time of the participant level: **{r.wall:.1f} s** (exit code {r.exit_code})",
        f"- critical path (dependent nodes, summed): {r.critical_path:.1f} s; all nodes summed: "
        f"{sum(n.seconds for n in r.nodes):.1f} s over {len(r.nodes)} nodes",
    ]
    peaks = [n.peak_gb for n in r.nodes if n.peak_gb is not None]
    if peaks:
        worst = max((n for n in r.nodes if n.peak_gb is not None), key=lambda n: n.peak_gb)
        lines.append(f"- largest peak memory: {worst.peak_gb:.2f} GB ({worst.name})")
    lines += ["", "| stage | span (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r.stages.items()]
    lines += ["", "| node | s | peak GB | critical path |", "|---|---|---|---|"]
    for n in sorted(r.nodes, key=lambda n: -n.seconds)[:top]:
        gb = f"{n.peak_gb:.2f}" if n.peak_gb is not None else "n/a"
        mark = "*" if n.critical else ""
        lines.append(f"| {n.name} | {n.seconds:.1f} | {gb} | {mark} |")
    return "\n".join(lines)
