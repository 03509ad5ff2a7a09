"""Thread limits for one step: BLAS/OpenMP pools, scipy.fft workers, torch's threads.

A Nipype node is granted ``n_procs`` slots by the scheduler; :func:`limit_threads` makes the
numerics inside it use that many threads and no more, so that two nodes running side by side
do not oversubscribe the cores, and a node running alone uses every core it was granted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

__all__ = ["limit_threads"]


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
