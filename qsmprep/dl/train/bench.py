"""Training throughput: :func:`benchmark` (patches/s of supervised steps, peak memory) and
:func:`compare` (the baseline settings against others, interleaved in one process)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from qsmprep.dl.inference import resolve_device
from qsmprep.dl.nets import build_model, default_config
from qsmprep.dl.synth import SyntheticQSMData
from qsmprep.dl.train.config import TrainConfig, _synth_kwargs, resolve_speed
from qsmprep.dl.train.prefetch import Prefetched
from qsmprep.dl.train.record import _hardware, _peak_memory_mb
from qsmprep.dl.train.setup import _check_patch, _optimizer
from qsmprep.dl.train.steps import _predict, _sup
from qsmprep.threads import limit_threads

BASELINE = {"precision": "fp32", "channels_last": False, "threads": 0, "prefetch": 0}
"""Settings of :func:`compare`'s baseline: training as it was before the speed options
(float32, contiguous layout, torch's threads on every core, data made between the steps)."""


class _Variant:
    """One model, optimiser and data source with its speed settings, timed in blocks."""

    def __init__(self, arch, ps, batch_size, base_channels, depth, dev, kind, seed, speed):
        self.arch, self.dev, self.batch_size, self.speed = arch, dev, int(batch_size), speed
        torch.manual_seed(seed)
        model = build_model(default_config(arch, base_channels=base_channels, depth=depth))
        model = model.to(dev)
        if speed["channels_last"]:
            model = model.to(memory_format=torch.channels_last_3d)
        self.cfg = TrainConfig(arch=arch, patch_size=ps, batch_size=batch_size, steps=10**6)
        _check_patch(self.cfg, model)
        self.model = model.train()
        self.opt, _ = _optimizer(self.cfg, model)
        skw = _synth_kwargs(self.cfg, arch)
        self.synth = SyntheticQSMData(ps, kind=kind, seed=seed, device=dev, **skw)
        self.parameters = int(sum(p.numel() for p in model.parameters()))
        self.step_t: list[float] = []
        self.data_t: list[float] = []
        self.block_rates: list[tuple[float, float]] = []

    def _sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def block(self, warmup: int, steps: int) -> None:
        """``warmup`` untimed then ``steps`` timed steps, under this variant's threads (the
        worker, if any, starts here: its start-up falls in the warm-up)."""
        sp = self.speed
        bf16 = sp["precision"] == "bf16"
        dom = "source" if self.arch == "dsbn" else None
        with limit_threads(sp["threads"]):
            src = self.synth
            if sp["prefetch"] > 0:
                src = Prefetched(
                    self.synth, self.batch_size, ahead=sp["prefetch"], count=warmup + steps
                )
            wall = busy = 0.0
            try:
                for i in range(warmup + steps):
                    self._sync()
                    t0 = time.perf_counter()
                    b = src.batch(self.batch_size)
                    self._sync()
                    t1 = time.perf_counter()
                    pred = _predict(self.model, b, dom, bf16, sp["channels_last"])
                    loss = _sup(self.cfg, pred, b)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.opt.step()
                    self._sync()
                    t2 = time.perf_counter()
                    if i >= warmup:
                        self.data_t.append(t1 - t0)
                        self.step_t.append(t2 - t1)
                        wall += t2 - t0
                        busy += t2 - t1
            finally:
                if src is not self.synth:
                    src.close()
        if steps > 0:
            n = self.batch_size * steps
            self.block_rates.append((n / max(busy, 1e-12), n / max(wall, 1e-12)))

    def result(self) -> dict:
        step_s, data_s = float(np.median(self.step_t)), float(np.median(self.data_t))
        return {
            **self.speed,
            "step_s": step_s,
            "data_s": data_s,
            "patches_per_s": float(np.median([r[0] for r in self.block_rates])),
            "patches_per_s_with_data": float(np.median([r[1] for r in self.block_rates])),
        }


def _setup(arch, patch_size, device, speed_kw):
    dev = resolve_device(device)
    ps = tuple(int(n) for n in np.atleast_1d(patch_size))
    ps = ps * 3 if len(ps) == 1 else ps
    return dev, ps, resolve_speed(dev, **speed_kw)


def _common(arch, ps, batch_size, base_channels, depth, dev, parameters) -> dict:
    return {
        "arch": arch,
        "patch_size": list(ps),
        "batch_size": batch_size,
        "base_channels": base_channels,
        "depth": depth,
        "device": str(dev),
        "hardware": _hardware(dev),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "parameters": parameters,
    }


def benchmark(
    arch: str = "unet",
    *,
    patch_size=64,
    batch_size: int = 2,
    base_channels: int = 16,
    depth: int = 5,
    steps: int = 5,
    warmup: int = 1,
    device="cpu",
    kind: str = "shapes",
    precision: str = "auto",
    channels_last: bool | None = None,
    threads: int = 0,
    prefetch: int = 2,
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Training throughput of one setting: patches/s of supervised steps and peak memory.

    Times ``warmup`` untimed and then ``steps`` timed AdamW steps (forward, L1 loss, backward,
    update) on synthetic batches, and the synthetic data (generated between the steps, or the
    wait for the prefetching worker) separately. ``precision``, ``channels_last``, ``threads``
    and ``prefetch`` as in :class:`~qsmprep.dl.train.TrainConfig` (defaults the same);
    ``amp`` is its legacy CUDA switch.

    Returns
    -------
    dict with ``patches_per_s`` (patches over the time of the timed training steps),
    ``patches_per_s_with_data`` (over their wall time, data included), ``step_s``, ``data_s``
    (medians per batch), ``peak_memory_mb`` (CUDA ``max_memory_allocated`` on GPU, the
    process's ``ru_maxrss`` on CPU), ``parameters``, the resolved speed settings, the load
    average and the other settings.
    """
    speed_kw = dict(
        precision=precision, channels_last=channels_last, threads=threads, prefetch=prefetch,
        amp=amp,
    )  # fmt: skip
    dev, ps, speed = _setup(arch, patch_size, device, speed_kw)
    v = _Variant(arch, ps, batch_size, base_channels, depth, dev, kind, seed, speed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    v.block(warmup, steps)
    out = _common(arch, ps, batch_size, base_channels, depth, dev, v.parameters)
    out.update(v.result())
    out["amp"] = speed["precision"] == "bf16"
    out["peak_memory_mb"] = _peak_memory_mb(dev)
    return out


def compare(
    arch: str = "unet",
    *,
    patch_size=64,
    batch_size: int = 2,
    base_channels: int = 16,
    depth: int = 5,
    steps: int = 5,
    warmup: int = 1,
    rounds: int = 3,
    device="cpu",
    kind: str = "shapes",
    precision: str = "auto",
    channels_last: bool | None = None,
    threads: int = 0,
    prefetch: int = 2,
    amp: bool = False,
    seed: int = 0,
    baseline: dict | None = None,
) -> dict:
    """The :data:`BASELINE` settings against the given ones, interleaved in one process.

    ``rounds`` rounds, each timing a block of ``warmup`` + ``steps`` steps of both settings
    (the order alternating from round to round), so that both see the same load on a shared
    machine; the rates are medians over the blocks. Same model, data seed and step as
    :func:`benchmark`. ``baseline``: other baseline settings (keys of :data:`BASELINE`
    replaced).

    Returns
    -------
    dict with ``baseline`` and ``optimised`` (the per-setting fields of :func:`benchmark`),
    ``speedup`` (``patches_per_s`` and ``patches_per_s_with_data``, optimised over baseline)
    and the common settings.
    """
    base_kw = {**BASELINE, **(baseline or {})}
    base_kw.setdefault("amp", False)
    opt_kw = dict(
        precision=precision, channels_last=channels_last, threads=threads, prefetch=prefetch,
        amp=amp,
    )  # fmt: skip
    dev, ps, base_speed = _setup(arch, patch_size, device, base_kw)
    _, _, opt_speed = _setup(arch, patch_size, device, opt_kw)
    variants = [
        _Variant(arch, ps, batch_size, base_channels, depth, dev, kind, seed, sp)
        for sp in (base_speed, opt_speed)
    ]
    for r in range(int(rounds)):
        for v in variants if r % 2 == 0 else variants[::-1]:
            v.block(warmup, steps)
    out = _common(arch, ps, batch_size, base_channels, depth, dev, variants[0].parameters)
    out.update(steps=steps, warmup=warmup, rounds=rounds)
    out["baseline"], out["optimised"] = (v.result() for v in variants)
    out["speedup"] = {
        k: out["optimised"][k] / out["baseline"][k]
        for k in ("patches_per_s", "patches_per_s_with_data")
    }
    out["peak_memory_mb"] = _peak_memory_mb(dev)
    return out
