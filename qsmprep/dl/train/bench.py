"""Training throughput: :func:`benchmark` (patches/s of supervised steps, peak memory)."""

from __future__ import annotations

import time

import numpy as np
import torch

from qsmprep.dl.inference import resolve_device
from qsmprep.dl.nets import build_model, default_config
from qsmprep.dl.synth import SyntheticQSMData
from qsmprep.dl.train.config import TrainConfig, _synth_kwargs
from qsmprep.dl.train.record import _hardware, _peak_memory_mb
from qsmprep.dl.train.setup import _check_patch, _optimizer
from qsmprep.dl.train.steps import _predict, _sup


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
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Training throughput: patches/s of supervised steps and peak memory.

    Times ``warmup`` untimed and then ``steps`` timed AdamW steps (forward, L1 loss, backward,
    update) on synthetic batches, and the synthetic data generation separately.

    Returns
    -------
    dict with ``patches_per_s`` (training only), ``patches_per_s_with_data`` (generation
    included), ``step_s``, ``data_s`` (per batch), ``peak_memory_mb`` (CUDA
    ``max_memory_allocated`` on GPU, the process's ``ru_maxrss`` on CPU), ``parameters`` and the
    settings.
    """
    dev = resolve_device(device)
    ps = tuple(int(n) for n in np.atleast_1d(patch_size))
    ps = ps * 3 if len(ps) == 1 else ps
    torch.manual_seed(seed)
    model = build_model(default_config(arch, base_channels=base_channels, depth=depth)).to(dev)
    cfg = TrainConfig(arch=arch, patch_size=ps, batch_size=batch_size, steps=steps + warmup)
    _check_patch(cfg, model)
    opt, _ = _optimizer(cfg, model)
    synth = SyntheticQSMData(ps, kind=kind, seed=seed, device=dev, **_synth_kwargs(cfg, arch))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    use_amp = bool(amp and dev.type == "cuda")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    data_t, step_t = [], []
    model.train()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        b = synth.batch(batch_size)
        sync()
        t1 = time.perf_counter()
        dom = "source" if arch == "dsbn" else None
        loss = _sup(cfg, _predict(model, b, dom, use_amp), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            data_t.append(t1 - t0)
            step_t.append(t2 - t1)
    step_s, data_s = float(np.median(step_t)), float(np.median(data_t))
    return {
        "arch": arch,
        "patch_size": list(ps),
        "batch_size": batch_size,
        "base_channels": base_channels,
        "depth": depth,
        "device": str(dev),
        "hardware": _hardware(dev),
        "amp": use_amp,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "step_s": step_s,
        "data_s": data_s,
        "patches_per_s": batch_size / step_s,
        "patches_per_s_with_data": batch_size / (step_s + data_s),
        "peak_memory_mb": _peak_memory_mb(dev),
    }
