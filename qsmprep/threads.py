"""Thread limits for one step: BLAS/OpenMP pools, scipy.fft workers, torch's threads.

A Nipype node is granted ``n_procs`` slots by the scheduler; :func:`limit_threads` makes the
numerics inside it use that many threads and no more, so that two nodes running side by side
do not oversubscribe the cores, and a node running alone uses every core it was granted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

__all__ = ["MAX_NODE_THREADS", "limit_threads", "share_cores"]

MAX_NODE_THREADS = 8
"""The most threads the App gives one node by default (fMRIPrep's cap): FFT-bound numerics
scale poorly beyond it."""


def share_cores(nprocs: int, n_nodes: int) -> int:
    """Threads of each of ``n_nodes`` long nodes that run side by side on ``nprocs`` cores.

    The cores are shared evenly (rounded down), at least one thread and at most
    :data:`MAX_NODE_THREADS` each: a lone node gets every core, and more nodes than cores run
    single-threaded side by side rather than one after the other. Side by side is the better
    use of the cores because the numerics scale sublinearly: on 2 cores MEDI takes 0.78x the
    time with two threads (docs/performance.md), so two nodes with one thread each finish well
    before the same two with two threads each, one after the other.
    """
    if nprocs < 1 or n_nodes < 0:
        raise ValueError(f"share_cores: nprocs >= 1 and n_nodes >= 0, got {nprocs}, {n_nodes}")
    return max(1, min(MAX_NODE_THREADS, nprocs // max(1, n_nodes)))


@contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Run the block with at most ``n`` threads in each pool.

    Covers the BLAS and OpenMP pools NumPy and SciPy load (threadpoolctl), the FFT workers of
    :mod:`qsmprep.recon._backend` and :func:`scipy.fft.set_workers`, and torch's intra-op
    threads when torch is imported. ``None`` (or < 1) leaves everything as it is.
    """
    if not n or int(n) < 1:
        yield
        return
    n = int(n)
    import scipy.fft
    from threadpoolctl import threadpool_limits

    from qsmprep.recon import _backend

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with ExitStack() as stack:
        stack.enter_context(threadpool_limits(limits=n))
        stack.enter_context(scipy.fft.set_workers(n))
        stack.enter_context(_backend.fft_workers(n))
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)
