"""Timing helpers shared by the benchmarks: the FFT pair that costs are measured against, and
``qsmprep-bench fft`` (the FFT engines of the NumPy path side by side)."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["bench_fft", "fft_pair_seconds", "format_fft_table", "sync"]


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


DEFAULT_FFT_SHAPES = ((80, 96, 80), (135, 162, 135), (224, 224, 160))
"""Grids of ``qsmprep-bench fft``: a 2 mm head, MEDI's grid of a 1 mm head, a 1 mm FOV."""


def bench_fft(shapes=DEFAULT_FFT_SHAPES, threads=(1, 2), rounds: int = 5) -> dict:
    """Forward and inverse real FFT time of each engine of the NumPy path, as ratios.

    For each grid and thread count the engines (:data:`qsmprep.recon._backend.FFT_ENGINES`)
    take turns, ``rounds`` times each after one untimed warm-up, on the same float32 volume;
    the median of each is reported, with ``scipy / torch`` (above 1: torch faster). Taking
    turns keeps a noisy machine's drift out of the ratio. The largest difference between the
    engines' transforms (relative to the largest coefficient) is reported too.
    """
    from qsmprep.recon import _backend as be
    from qsmprep.threads import limit_threads

    rows = []
    for shape in shapes:
        shape = tuple(int(n) for n in shape)
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        for n in threads:
            times = {(e, k): [] for e in be.FFT_ENGINES for k in ("forward", "inverse")}
            spectra = {}
            with limit_threads(int(n)):
                for r in range(rounds + 1):
                    for engine in be.FFT_ENGINES:
                        with be.fft_engine(engine):
                            t0 = time.perf_counter()
                            spec = be.rfftn(x)
                            t1 = time.perf_counter()
                            be.irfftn(spec, s=shape)
                            t2 = time.perf_counter()
                        if r:
                            times[engine, "forward"].append(t1 - t0)
                            times[engine, "inverse"].append(t2 - t1)
                        spectra[engine] = spec
            ref = spectra["scipy"]
            diff = float(np.abs(spectra["torch"] - ref).max() / np.abs(ref).max())
            row = {"shape": list(shape), "threads": int(n), "max_rel_diff": diff}
            for (engine, kind), t in times.items():
                row[f"{engine}_{kind}_ms"] = 1e3 * float(np.median(t))
            for kind in ("forward", "inverse"):
                row[f"{kind}_ratio"] = row[f"scipy_{kind}_ms"] / row[f"torch_{kind}_ms"]
            pair = [row[f"{e}_forward_ms"] + row[f"{e}_inverse_ms"] for e in ("scipy", "torch")]
            row["pair_ratio"] = pair[0] / pair[1]
            rows.append(row)
    return {"rows": rows, "rounds": rounds, "engine": be.get_fft_engine()}


def format_fft_table(result: dict) -> str:
    """Markdown table of :func:`bench_fft`."""
    lines = [
        "| grid | threads | scipy fwd / inv (ms) | torch fwd / inv (ms) | scipy / torch, pair |"
        " max rel. diff |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['threads']} "
            f"| {r['scipy_forward_ms']:.1f} / {r['scipy_inverse_ms']:.1f} "
            f"| {r['torch_forward_ms']:.1f} / {r['torch_inverse_ms']:.1f} "
            f"| {r['pair_ratio']:.2f} | {r['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)
