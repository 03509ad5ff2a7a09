"""``qsmprep-train bench``: training throughput (patches/s) and peak memory of a network.

Times supervised training steps of one architecture on synthetic batches
(:func:`qsmprep.dl.train.benchmark`) and prints the result in two lines.
"""

from __future__ import annotations

from qsmprep.__about__ import __version__

__all__ = ["bench_training"]


def bench_training(
    arch: str = "unet",
    *,
    patch_size: int = 64,
    batch_size: int = 2,
    base_channels: int = 16,
    depth: int = 5,
    steps: int = 5,
    warmup: int = 1,
    device: str = "auto",
    kind: str = "shapes",
    amp: bool = False,
) -> dict:
    """Measure and print the training throughput; the dict of
    :func:`qsmprep.dl.train.benchmark` (same parameters)."""
    from qsmprep.dl.train import benchmark

    r = benchmark(
        arch,
        patch_size=patch_size,
        batch_size=batch_size,
        base_channels=base_channels,
        depth=depth,
        steps=steps,
        warmup=warmup,
        device=device,
        kind=kind,
        amp=amp,
    )
    print(
        f"# qsmprep {__version__} training throughput: {r['arch']} base {r['base_channels']} "
        f"depth {r['depth']}, {r['parameters']} parameters, batch {r['batch_size']} x "
        f"{'x'.join(map(str, r['patch_size']))}, {r['hardware']}"
    )
    print(
        f"training step {r['step_s']:.3f} s ({r['patches_per_s']:.2f} patches/s); synthetic "
        f"batch {r['data_s']:.3f} s; with data {r['patches_per_s_with_data']:.2f} patches/s; "
        f"peak memory {r['peak_memory_mb']:.0f} MiB"
    )
    return r
