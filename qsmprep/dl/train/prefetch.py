"""Synthetic batches made ahead of the training steps by a worker process: :class:`Prefetched`.

A batch of :class:`~qsmprep.dl.synth.SyntheticQSMData` depends only on the generator's seed
and the batch's index, so a worker can make batches ``k, k + 1, ...`` while the network trains
on batch ``k - 1``: the run sees the same batches in the same order as without prefetching
(bit-identical when the inline generation also runs on one thread, as the worker does: torch's
reductions round by thread count). The worker is a :class:`torch.utils.data.DataLoader`
process with one torch thread and one FFT thread, so it takes one core from the network.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, Dataset

from qsmprep.dl.synth import SyntheticQSMData
from qsmprep.recon._backend import active_fft_engine, set_fft_engine, set_fft_workers

__all__ = ["Prefetched"]


class _Batches(Dataset):
    """Batch ``i`` of a generator, by index (what the worker calls)."""

    def __init__(self, synth: SyntheticQSMData, batch_size: int):
        self.synth = synth
        self.batch_size = int(batch_size)

    def __getitem__(self, index: int) -> dict:
        return self.synth.batch(self.batch_size, index=int(index))


def _init_worker(engine: str, _worker_id: int) -> None:
    """One thread, and the FFT engine that the inline batches use (the default engine picks
    by thread count, and engines agree only to rounding: batches must be bit-identical)."""
    torch.set_num_threads(1)
    set_fft_workers(1)
    set_fft_engine(engine)


class Prefetched:
    """The next ``count`` batches of ``synth``, made ``ahead`` at a time by a worker process.

    :meth:`batch` returns the batch that ``synth.batch(batch_size)`` would have returned and
    advances ``synth.counter`` the same way, so ``synth.state_dict()`` stays what a resumed
    run needs. Batches are made on the CPU (a generator on a GPU is used inline). Close it
    (or use it as a context manager) to stop the worker.

    Parameters
    ----------
    synth : SyntheticQSMData
        The generator; batches ``synth.counter`` to ``synth.counter + count - 1`` are made.
    batch_size : int
        Patches per batch.
    ahead : int
        Batches made ahead of the one in use (>= 1).
    count : int
        Batches to make in all.
    """

    def __init__(self, synth: SyntheticQSMData, batch_size: int, *, ahead: int, count: int):
        if int(ahead) < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead!r}")
        self.synth = synth
        self.batch_size = int(batch_size)
        start = int(synth.counter)
        self._stop = start + max(int(count), 0)
        self._iter = None
        if synth.device.type == "cpu" and count > 0:
            loader = DataLoader(
                _Batches(synth, self.batch_size),
                batch_size=None,
                sampler=range(start, self._stop),
                num_workers=1,
                prefetch_factor=int(ahead),
                worker_init_fn=functools.partial(_init_worker, active_fft_engine()),
            )
            self._iter = iter(loader)

    def batch(self, batch_size: int | None = None) -> dict:
        """The next batch (``batch_size``, if given, must be the one prefetched)."""
        if batch_size is not None and int(batch_size) != self.batch_size:
            raise ValueError(f"batches of {self.batch_size} are prefetched, not {batch_size}")
        if self._iter is None or self.synth.counter >= self._stop:
            return self.synth.batch(self.batch_size)
        out = next(self._iter)
        self.synth.counter += 1
        return out

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
