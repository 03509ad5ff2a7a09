"""``qsmprep-bench``: benchmarks measured as ratios within one run.

``qsmprep-bench inversion`` times each dipole inversion on a simulated head (noisy local
field) and scores it against the true susceptibility (NRMSE, HFEN, SSIM, XSIM).

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
from qsmprep.config import BG_METHODS, DEFAULT_BG_METHOD
from qsmprep.methods import get, names, resolve

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
        bg_method=DEFAULT_BG_METHOD,
        device=args.device,
        profile=profile,
    )
    chain_total = time.perf_counter() - t0
    rows = []
    for name, rec in profile.items():
        rows.append((name, rec["seconds"], rec["ffts"].equivalents(shape)))
    rows.append((f"chain total (with {DEFAULT_BG_METHOD})", chain_total, sum(r[2] for r in rows)))
    errors = {DEFAULT_BG_METHOD: _nrmse(maps.local_hz, gre.local_field_hz, maps.local_mask)}

    methods = [m for m in args.bg_methods if m != DEFAULT_BG_METHOD]
    for m in methods:
        prof: dict = {}
        with stage(prof, m):
            local, lmask = background.remove_background(
                maps.total_hz,
                maps.trimmed if get(m).keeps_mask else maps.mask,
                vs,
                method=m,
                device=args.device,
            )
            _sync(args.device)
        rows.append((f"background_{m}", prof[m]["seconds"], prof[m]["ffts"].equivalents(shape)))
        errors[m] = _nrmse(local, gre.local_field_hz, lmask)

    print()
    print("| stage | wall (s) | FFT-equivalents | time / (FFT pairs x pair time) |")
    print("|---|---:|---:|---:|")
    out_rows = []
    for name, sec, eq in rows:
        # the ratio says how close an FFT-bound stage is to its FFT cost; for stages without
        # FFTs and for the whole chain (mostly non-FFT work) it is not meaningful
        fft_bound = eq > 0 and not name.startswith("chain")
        ratio = sec / (eq / 2 * pair) if fft_bound else float("nan")
        shown = f"{ratio:.2f}" if fft_bound else "-"
        print(f"| {name} | {sec:.2f} | {eq:.1f} | {shown} |")
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


INVERSION_METHODS = names("inversion", kind=("classical", "multi-orientation"))
"""Choices of ``qsmprep-bench inversion --methods``: the inversions of one or several
orientations that run on arrays (the networks run in ``accuracy``)."""


def bench_inversion(args) -> dict:
    """Time and score each dipole inversion on one simulated head (noisy local field)."""
    import inspect

    from qsmprep import metrics
    from qsmprep.recon._backend import count_ffts
    from qsmprep.recon.kernels import b0_dir_from_affine, hz_to_ppm
    from qsmprep.sim import make_head_phantom, simulate_fields, simulate_gre

    shape = tuple(args.shape)
    vs = tuple(args.voxel_size) * 3 if len(args.voxel_size) == 1 else tuple(args.voxel_size)
    t0 = time.perf_counter()
    ph = make_head_phantom(shape, vs, seed=args.seed)
    b0_dir = b0_dir_from_affine(ph.affine)
    fields = simulate_fields(ph, b0=args.b0)
    mask = ph.brain_mask
    rng = np.random.default_rng(args.seed)
    noise_ppm = args.noise_hz * float(hz_to_ppm(1.0, args.b0))
    local = (fields["local_ppm"] + rng.normal(0.0, noise_ppm, shape) * mask).astype(np.float32)
    truth = np.where(mask, ph.chi, 0.0).astype(np.float32)
    te = (0.004, 0.008, 0.012, 0.016, 0.020)
    magnitude = simulate_gre(ph, te, b0=args.b0, snr=args.snr, seed=args.seed).magnitude[..., 0]
    cosmos_inputs = None
    if any(get(m).kind == "multi-orientation" for m in args.methods):
        dirs = [np.array(b0_dir)]
        for ax, ang in ((0, 25.0), (1, -25.0), (0, -20.0))[: args.orientations - 1]:
            t = np.deg2rad(ang)
            c, s_ = np.cos(t), np.sin(t)
            rot = np.eye(3)
            i, j = [a for a in range(3) if a != ax][:2]
            rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s_, s_, c
            dirs.append(rot @ np.array(b0_dir))
        cosmos_inputs = (
            [
                simulate_fields(ph, b0_dir=tuple(d), b0=args.b0)["local_ppm"]
                + rng.normal(0.0, noise_ppm, shape) * mask
                for d in dirs
            ],
            [tuple(d) for d in dirs],
        )
    t_sim = time.perf_counter() - t0
    print(
        f"# qsmprep {__version__} inversion benchmark: {shape} at {vs} mm, {args.b0} T, "
        f"local-field noise {args.noise_hz} Hz ({noise_ppm:.4f} ppm), device {args.device}; "
        f"simulation {t_sim:.1f} s (not counted)",
        flush=True,
    )
    pair = _fft_pair_seconds(shape, args.device)
    print(f"# one rfftn + irfftn pair of {shape} (float32): {1e3 * pair:.1f} ms", flush=True)

    rows = []
    for name in args.methods:
        info: dict = {}
        record, func = get(name), resolve(name)
        kw = {"b0_dir": b0_dir, "device": args.device}
        if "info" in inspect.signature(func).parameters:
            kw["info"] = info
        extra = {"magnitude": magnitude, "b0": args.b0}  # the record's inputs that we have
        kw.update({k: v for k, v in extra.items() if k in record.inputs})
        _sync(args.device)
        t1 = time.perf_counter()
        with count_ffts() as counter:
            if record.kind == "multi-orientation":
                fs, dirs = cosmos_inputs
                chi = func(fs, mask, vs, dirs, device=args.device)
            else:
                chi = func(local, mask, vs, **kw)
            _sync(args.device)
        sec = time.perf_counter() - t1
        eq = counter.equivalents(shape)
        scores = metrics.evaluate(chi, truth, mask)
        row = {
            "method": name,
            "seconds": sec,
            "iterations": info.get("iterations"),
            "fft_equivalents": eq,
            "seconds_per_fft_equivalent": sec / eq if eq else float("nan"),
            "ratio_to_fft_time": sec / (eq / 2 * pair) if eq else float("nan"),
            **{k: scores[k] for k in ("nrmse", "hfen", "ssim", "xsim")},
        }
        rows.append(row)
        print(f"  {name}: {sec:.2f} s", flush=True)

    print()
    print(
        "| method | wall (s) | iterations | FFT-equivalents | ms per FFT-equivalent "
        "| time / FFT time | NRMSE (%) | HFEN (%) | SSIM | XSIM |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        it = "" if r["iterations"] is None else str(r["iterations"])
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {it} | {r['fft_equivalents']:.0f} "
            f"| {1e3 * r['seconds_per_fft_equivalent']:.1f} | {r['ratio_to_fft_time']:.2f} "
            f"| {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['ssim']:.3f} | {r['xsim']:.3f} |"
        )
    return {
        "version": __version__,
        "shape": shape,
        "voxel_size": vs,
        "device": args.device,
        "noise_hz": args.noise_hz,
        "fft_pair_seconds": pair,
        "rows": rows,
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
        default=list(BG_METHODS),
        choices=BG_METHODS,
    )
    f.add_argument("--device", default="cpu", help="cpu (NumPy/scipy), torch (CPU), cuda")
    f.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    i = sub.add_parser("inversion", help="dipole inversion: time, FFTs and accuracy per method")
    i.add_argument("--shape", type=int, nargs=3, default=[224, 224, 160])
    i.add_argument("--voxel-size", type=float, nargs="+", default=[1.0], help="mm")
    i.add_argument("--b0", type=float, default=3.0, help="field strength (T)")
    i.add_argument(
        "--noise-hz", type=float, default=0.38, help="std of the noise added to the local field"
    )
    i.add_argument("--snr", type=float, default=100.0, help="SNR of the magnitude (MEDI edges)")
    i.add_argument("--orientations", type=int, default=3, help="head orientations for COSMOS")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument(
        "--methods", nargs="+", default=list(INVERSION_METHODS), choices=INVERSION_METHODS
    )
    i.add_argument("--device", default="cpu", help="cpu (NumPy/scipy), torch (CPU), cuda")
    i.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    a = sub.add_parser(
        "accuracy",
        help="the QSMInvNet+ and adaptive-convolution comparisons on simulated test sets, run "
        "through the BIDS App (see qsmprep.benchmarks.accuracy)",
    )
    a.add_argument("out_dir", help="folder for data, derivatives, accuracy.md and figures")
    a.add_argument("--datasets", type=int, default=3, help="simulated heads per test set")
    a.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80], help="2 mm grid")
    a.add_argument("--seed", type=int, default=5000, help="first phantom seed of the test sets")
    a.add_argument("--tilt", type=float, default=30.0, help="slab tilt of the tilted set (deg)")
    a.add_argument("--snr", type=float, default=100.0)
    a.add_argument(
        "--sets", nargs="*", default=["multi", "tilted"], choices=["multi", "tilted"],
        help="simulated test sets (default both; none with an empty list)",
    )  # fmt: skip
    a.add_argument(
        "--external", nargs="+", default=[], metavar="BIDS_DIR",
        help="also score every method on these simulated BIDS datasets with ground truth "
        "(derivatives/groundtruth), e.g. data made by another simulator",
    )  # fmt: skip
    a.add_argument("--nprocs", type=int, default=2)
    a.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    a.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    c = sub.add_parser(
        "chain",
        help="per-stage accuracy of the field chain: runs the App on BIDS datasets with ground "
        "truth and scores mask, fields and each method against the truth and against oracle "
        "fields (see qsmprep.benchmarks.chain)",
    )
    c.add_argument(
        "datasets", nargs="+", metavar="BIDS_DIR",
        help="BIDS datasets with derivatives/groundtruth, e.g. ../shared/data/qsmdev",
    )  # fmt: skip
    c.add_argument("--out", default="out/bench-chain", help="folder for derivatives and work")
    c.add_argument("--methods", nargs="+", default=["tkd", "tv", "medi"])
    c.add_argument("--bg-method", choices=BG_METHODS, help="default: the App's default")
    c.add_argument("--config", metavar="PATH", help="method parameters, as qsmprep --config")
    c.add_argument("--nprocs", type=int, default=2)
    c.add_argument("--seed", type=int, default=0, help="noise of the noise-matched oracle")
    c.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    q = sub.add_parser(
        "participant",
        help="a whole participant as a user runs it: wall time, per-node time and peak memory,"
        " critical path (see qsmprep.benchmarks.participant)",
    )
    q.add_argument("out_dir", help="folder for the simulated data, derivatives and work")
    q.add_argument("--shape", type=int, nargs=3, default=[160, 186, 149])
    q.add_argument("--voxel-size", type=float, default=1.0, help="isotropic voxel size (mm)")
    q.add_argument("--echo-times", type=float, nargs="+", default=[0.004, 0.008, 0.012, 0.016])
    q.add_argument("--methods", nargs="+", default=["tkd", "tv", "medi"])
    q.add_argument("--outputs", nargs="+", help="as qsmprep --outputs (default all)")
    q.add_argument("--nprocs", type=int, default=2)
    q.add_argument("--omp-nthreads", type=int, help="default: as the App (nprocs - 1, 1 to 8)")
    q.add_argument(
        "--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
        help="one run per device (the App's --device)",
    )  # fmt: skip
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    s = sub.add_parser(
        "space",
        help="template space: atlas ROI means vs ground-truth labels, registration Dice, extra "
        "wall time per participant (see qsmprep.space.bench)",
    )
    s.add_argument("bids_dir", help="BIDS dataset with derivatives/groundtruth (dseg, Chimap)")
    s.add_argument("out_dir", help="folder for the derivatives and work directories")
    s.add_argument("--methods", nargs="+", default=["tv"])
    s.add_argument("--output-spaces", nargs="+", default=["MNI152NLin2009cAsym:res-1"])
    s.add_argument("--reference-region", choices=["mask", "csf"], default="mask")
    s.add_argument("--nprocs", type=int, default=2)
    s.add_argument("--no-timing", action="store_true", help="skip the native-only run")
    s.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    failed = False
    if args.bench == "field":
        result = bench_field(args)
    elif args.bench == "inversion":
        result = bench_inversion(args)
    elif args.bench == "accuracy":
        from qsmprep.benchmarks.accuracy import run_accuracy

        result = run_accuracy(
            args.out_dir, datasets=args.datasets, shape=tuple(args.shape), seed=args.seed,
            tilt=args.tilt, snr=args.snr, nprocs=args.nprocs, device=args.device,
            sets=tuple(args.sets), external=tuple(args.external),
        )  # fmt: skip
        print(result["markdown"])
    elif args.bench == "chain":
        from qsmprep.benchmarks.chain import format_chain_table, run_chain
        from qsmprep.config import load_method_params

        params = load_method_params(args.config) if args.config else {}
        scores = run_chain(
            args.datasets, args.out, methods=args.methods, bg_method=args.bg_method,
            method_params=params, nprocs=args.nprocs, seed=args.seed,
        )  # fmt: skip
        print()
        print(format_chain_table(scores))
        result = {"scores": [s.to_dict() for s in scores]}
    elif args.bench == "participant":
        from qsmprep.benchmarks.participant import (
            format_participant_table,
            run_participant_bench,
        )

        runs = run_participant_bench(
            args.out_dir, shape=args.shape, voxel_size=args.voxel_size,
            echo_times=args.echo_times, methods=args.methods, nprocs=args.nprocs,
            omp_nthreads=args.omp_nthreads, devices=args.devices, outputs=args.outputs,
            seed=args.seed,
        )  # fmt: skip
        for r in runs:
            print(format_participant_table(r))
        result = {"runs": [r.to_dict() for r in runs]}
        failed = any(r.exit_code != 0 for r in runs)
    elif args.bench == "space":
        from qsmprep.space.bench import run_space_benchmark

        result = run_space_benchmark(
            args.bids_dir, args.out_dir, methods=args.methods, output_spaces=args.output_spaces,
            reference_region=args.reference_region, nprocs=args.nprocs,
            timing=not args.no_timing,
        )  # fmt: skip
        print(result["markdown"])
    else:  # pragma: no cover - argparse restricts the choices
        return 2
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
