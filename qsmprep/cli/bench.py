"""``qsmprep-bench``: benchmarks measured as ratios within one run.

``qsmprep-bench field`` simulates a multi-echo head (default 224 x 224 x 160 at 1 mm, 5 echoes)
and runs the field chain stage by stage. For each stage it prints the wall time, the number of
FFTs it ran in units of one real FFT of the image grid (FFT-equivalents, counted by
:func:`qsmprep.recon._backend.count_ffts`, padding included) and the ratio of its time to
``FFT-equivalents / 2`` forward+inverse pairs of that grid, timed in the same run. A ratio near
1 means the stage costs no more than its FFTs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from qsmprep.__about__ import __version__

__all__ = ["main"]


def _fft_pair_seconds(shape, device: str, repeat: int = 5) -> float:
    from qsmprep.recon._backend import asarray, irfftn, rfftn

    x = asarray(np.random.default_rng(0).random(shape, dtype=np.float32), device=device)
    times = []
    for _ in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        y = irfftn(rfftn(x), s=shape)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del y
    return float(np.median(times[1:]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _nrmse(est, truth, m) -> float:
    e = est[m] - est[m].mean()
    t = truth[m] - truth[m].mean()
    return float(100 * np.linalg.norm(e - t) / np.linalg.norm(t))


def bench_field(args) -> dict:
    from qsmprep.recon import background
    from qsmprep.recon.chain import compute_local_field, stage
    from qsmprep.recon.kernels import b0_dir_from_affine
    from qsmprep.sim import make_head_phantom, simulate_gre

    shape = tuple(args.shape)
    vs = tuple(args.voxel_size) * 3 if len(args.voxel_size) == 1 else tuple(args.voxel_size)
    te = tuple(args.te1 + i * args.dte for i in range(args.echoes))
    t0 = time.perf_counter()
    ph = make_head_phantom(shape, vs, seed=args.seed)
    gre = simulate_gre(ph, te, b0=args.b0, snr=args.snr, seed=args.seed)
    t_sim = time.perf_counter() - t0
    print(
        f"# qsmprep {__version__} field benchmark: {shape} at {vs} mm, {len(te)} echoes "
        f"({', '.join(f'{1e3 * t:g}' for t in te)} ms), {args.b0} T, SNR {args.snr}, "
        f"device {args.device}; simulation {t_sim:.1f} s (not counted)",
        flush=True,
    )
    pair = _fft_pair_seconds(shape, args.device)
    print(f"# one rfftn + irfftn pair of {shape} (float32): {1e3 * pair:.1f} ms", flush=True)

    profile: dict = {}
    t0 = time.perf_counter()
    maps = compute_local_field(
        gre.magnitude,
        gre.phase,
        te,
        vs,
        b0_dir=b0_dir_from_affine(ph.affine),
        unwrap_method=args.unwrap,
        bg_method="resharp",
        device=args.device,
        profile=profile,
    )
    chain_total = time.perf_counter() - t0
    rows = []
    for name, rec in profile.items():
        rows.append((name, rec["seconds"], rec["ffts"].equivalents(shape)))
    rows.append(("chain total (with resharp)", chain_total, sum(r[2] for r in rows)))
    errors = {"resharp": _nrmse(maps.local_hz, gre.local_field_hz, maps.local_mask)}

    methods = [m for m in args.bg_methods if m != "resharp"]
    for m in methods:
        prof: dict = {}
        with stage(prof, m):
            local, lmask = background.remove_background(
                maps.total_hz, maps.mask, vs, method=m, device=args.device
            )
            _sync(args.device)
        rows.append((f"background_{m}", prof[m]["seconds"], prof[m]["ffts"].equivalents(shape)))
        errors[m] = _nrmse(local, gre.local_field_hz, lmask)

    print()
    print("| stage | wall (s) | FFT-equivalents | time / (FFT pairs x pair time) |")
    print("|---|---:|---:|---:|")
    out_rows = []
    for name, sec, eq in rows:
        ratio = sec / (eq / 2 * pair) if eq > 0 else float("nan")
        print(f"| {name} | {sec:.2f} | {eq:.1f} | {ratio:.2f} |")
        out_rows.append({"stage": name, "seconds": sec, "fft_equivalents": eq, "ratio": ratio})
    print()
    print("| background method | local-field NRMSE vs truth (%) |")
    print("|---|---:|")
    for m, e in errors.items():
        print(f"| {m} | {e:.1f} |")
    return {
        "version": __version__,
        "shape": shape,
        "voxel_size": vs,
        "echo_times": te,
        "device": args.device,
        "fft_pair_seconds": pair,
        "rows": out_rows,
        "local_field_nrmse": errors,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsmprep-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    sub = p.add_subparsers(dest="bench", required=True)
    f = sub.add_parser("field", help="field chain: mask, unwrap, echo fit, background removal")
    f.add_argument("--shape", type=int, nargs=3, default=[224, 224, 160])
    f.add_argument("--voxel-size", type=float, nargs="+", default=[1.0], help="mm")
    f.add_argument("--echoes", type=int, default=5)
    f.add_argument("--te1", type=float, default=0.004, help="first echo time (s)")
    f.add_argument("--dte", type=float, default=0.004, help="echo spacing (s)")
    f.add_argument("--b0", type=float, default=3.0, help="field strength (T)")
    f.add_argument("--snr", type=float, default=100.0)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--unwrap", choices=["quality", "laplacian"], default="quality")
    f.add_argument(
        "--bg-methods",
        nargs="+",
        default=["resharp", "sharp", "vsharp", "pdf"],
        choices=["resharp", "sharp", "vsharp", "pdf"],
    )
    f.add_argument("--device", default="cpu", help="cpu (NumPy/scipy), torch (CPU), cuda")
    f.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.bench == "field":
        result = bench_field(args)
    else:  # pragma: no cover - argparse restricts the choices
        return 2
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
