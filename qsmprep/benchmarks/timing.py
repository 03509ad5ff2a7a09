"""Timing helpers shared by the benchmarks: the FFT pair that costs are measured against."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["fft_pair_seconds", "sync"]


def fft_pair_seconds(shape, device: str, repeat: int = 5) -> float:
    """Median wall time (s) of one ``rfftn`` + ``irfftn`` pair of a float32 grid ``shape``.

    Runs through :mod:`qsmprep.recon._backend` on ``device`` as the numerics do; the first of
    ``repeat + 1`` runs (plans, caches) is not counted.
    """
    from qsmprep.recon._backend import asarray, irfftn, rfftn

    x = asarray(np.random.default_rng(0).random(shape, dtype=np.float32), device=device)
    times = []
    for _ in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        y = irfftn(rfftn(x), s=shape)
        sync(device)
        times.append(time.perf_counter() - t0)
    del y
    return float(np.median(times[1:]))


def sync(device: str) -> None:
    """Wait for the GPU's queued work on a ``cuda`` device (nothing to do otherwise)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
