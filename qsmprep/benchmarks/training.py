"""``qsmprep-train bench``: training throughput (patches/s) and peak memory of a network.

Times supervised training steps of one architecture on synthetic batches
(:func:`qsmprep.dl.train.benchmark`) and prints the result in two lines; with ``compare``,
times the baseline settings (float32, contiguous layout, every core, data made between the
steps) and the given ones interleaved in one process (:func:`qsmprep.dl.train.bench.compare`)
and prints a table with their ratio.
"""

from __future__ import annotations

from qsmprep.__about__ import __version__

__all__ = ["bench_training"]


def _describe(sp: dict) -> str:
    prefetch = f"prefetch {sp['prefetch']}" if sp["prefetch"] else "inline data"
    layout = "channels_last" if sp["channels_last"] else "contiguous"
    return f"{sp['precision']}, {layout}, {sp['threads']} threads, {prefetch}"


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
    precision: str = "auto",
    channels_last: bool | None = None,
    threads: int = 0,
    prefetch: int = 2,
    compare: bool = False,
    rounds: int = 3,
    baseline_threads: int = 0,
) -> dict:
    """Measure and print the training throughput; the dict of
    :func:`qsmprep.dl.train.benchmark` (same parameters), or with ``compare`` that of
    :func:`qsmprep.dl.train.bench.compare` (``rounds`` interleaved rounds; the baseline runs
    ``baseline_threads`` torch threads, 0: every core)."""
    from qsmprep.dl.train import bench

    kw = dict(
        patch_size=patch_size, batch_size=batch_size, base_channels=base_channels, depth=depth,
        steps=steps, warmup=warmup, device=device, kind=kind, amp=amp, precision=precision,
        channels_last=channels_last, threads=threads, prefetch=prefetch,
    )  # fmt: skip
    if compare:
        base = {"threads": int(baseline_threads)}
        r = bench.compare(arch, rounds=rounds, baseline=base, **kw)
    else:
        r = bench.benchmark(arch, **kw)
    print(
        f"# qsmprep {__version__} training throughput: {r['arch']} base {r['base_channels']} "
        f"depth {r['depth']}, {r['parameters']} parameters, batch {r['batch_size']} x "
        f"{'x'.join(map(str, r['patch_size']))}, {r['hardware']}, load average "
        f"{' '.join(map(str, r['load_average'] or []))}"
    )
    if not compare:
        print(
            f"{_describe(r)}: training step {r['step_s']:.3f} s ({r['patches_per_s']:.2f} "
            f"patches/s); synthetic batch {r['data_s']:.3f} s; with data "
            f"{r['patches_per_s_with_data']:.2f} patches/s; peak memory "
            f"{r['peak_memory_mb']:.0f} MiB"
        )
        return r
    rows = [("baseline", r["baseline"]), ("optimised", r["optimised"])]
    print(
        f"# {r['rounds']} interleaved rounds of {r['warmup']} + {r['steps']} steps each; "
        f"rates are medians over the rounds; peak memory {r['peak_memory_mb']:.0f} MiB"
    )
    head = ("setting", "step s", "data s", "patches/s", "with data", "settings")
    table = [head] + [
        (
            name,
            f"{x['step_s']:.3f}",
            f"{x['data_s']:.3f}",
            f"{x['patches_per_s']:.2f}",
            f"{x['patches_per_s_with_data']:.2f}",
            _describe(x),
        )
        for name, x in rows
    ]
    s = r["speedup"]
    table.append(
        ("ratio", "", "", f"{s['patches_per_s']:.2f}x", f"{s['patches_per_s_with_data']:.2f}x", "")
    )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return r
