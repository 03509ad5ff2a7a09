"""``qsmprep-bench``: benchmarks measured as ratios within one run.

Each subcommand parses its options and calls a module of :mod:`qsmprep.benchmarks`:
``field`` (:mod:`~qsmprep.benchmarks.field`: the field chain stage by stage, in units of its
FFTs), ``fft`` (:func:`~qsmprep.benchmarks.timing.bench_fft`: the FFT engines side by
side), ``inversion`` (:mod:`~qsmprep.benchmarks.inversion`: time, FFTs and accuracy of each
dipole inversion), ``accuracy``, ``chain``, ``participant`` and ``space`` (the App run on
simulated or development data and scored).
"""

from __future__ import annotations

import argparse
import json
import sys

from qsmprep.__about__ import __version__
from qsmprep.benchmarks.inversion import INVERSION_METHODS
from qsmprep.config import BG_METHODS
from qsmprep.methods import defaults, names

__all__ = ["build_parser", "main"]


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
    f.add_argument("--unwrap", choices=names("unwrap"), default=defaults("unwrap")[0])
    f.add_argument(
        "--bg-methods",
        nargs="+",
        default=list(BG_METHODS),
        choices=BG_METHODS,
    )
    f.add_argument("--device", default="cpu", help="cpu (NumPy/scipy), torch (CPU), cuda")
    f.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    t = sub.add_parser(
        "fft", help="FFT engines of the NumPy path (torch, scipy) side by side, per grid"
    )
    t.add_argument(
        "--shapes", type=int, nargs="+", metavar="N",
        help="grids as N N N triples (default: a 2 mm head, MEDI's 1 mm grid, 224x224x160)",
    )  # fmt: skip
    t.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--json", metavar="PATH", help="also write the results as JSON")

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
    c.add_argument(
        "--dl-adapt", action="store_true",
        help="adapt dsbn / dcfinetune to each dataset first, as qsmprep --dl-adapt",
    )  # fmt: skip
    c.add_argument(
        "--background-oracle", action="store_true",
        help="also run the background removal on the true total field (noise-free, true mask)"
        " and each method on its local field: what the background removal alone costs",
    )  # fmt: skip
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
    q.add_argument("--config", metavar="PATH", help="method parameters, as qsmprep --config")
    q.add_argument(
        "--bg-method", choices=BG_METHODS, help="as qsmprep --bg-method (default: the App's)"
    )
    q.add_argument("--nprocs", type=int, default=2)
    q.add_argument(
        "--omp-nthreads", type=int,
        help="default: as the App (nprocs - 1, 1 to 8; the long-running inversions share the"
        " cores)",
    )  # fmt: skip
    q.add_argument(
        "--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
        help="one run per device (the App's --device)",
    )  # fmt: skip
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    s = sub.add_parser(
        "space",
        help="template space: atlas ROI means vs ground-truth labels, registration Dice, extra "
        "wall time per participant (see qsmprep.benchmarks.space)",
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
        from qsmprep.benchmarks.field import bench_field

        result = bench_field(
            shape=args.shape, voxel_size=args.voxel_size, echoes=args.echoes, te1=args.te1,
            dte=args.dte, b0=args.b0, snr=args.snr, seed=args.seed, unwrap=args.unwrap,
            bg_methods=args.bg_methods, device=args.device,
        )  # fmt: skip
    elif args.bench == "fft":
        from qsmprep.benchmarks.timing import DEFAULT_FFT_SHAPES, bench_fft, format_fft_table

        shapes = DEFAULT_FFT_SHAPES
        if args.shapes:
            if len(args.shapes) % 3:
                print("qsmprep-bench fft: --shapes takes N N N triples", file=sys.stderr)
                return 2
            shapes = [args.shapes[k : k + 3] for k in range(0, len(args.shapes), 3)]
        result = bench_fft(shapes, threads=args.threads, rounds=args.rounds)
        print(format_fft_table(result))
    elif args.bench == "inversion":
        from qsmprep.benchmarks.inversion import bench_inversion

        result = bench_inversion(
            shape=args.shape, voxel_size=args.voxel_size, b0=args.b0, noise_hz=args.noise_hz,
            snr=args.snr, orientations=args.orientations, seed=args.seed, methods=args.methods,
            device=args.device,
        )  # fmt: skip
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
            method_params=params, nprocs=args.nprocs, seed=args.seed, dl_adapt=args.dl_adapt,
            background_oracle=args.background_oracle,
        )  # fmt: skip
        print()
        print(format_chain_table(scores))
        result = {"scores": [s.to_dict() for s in scores]}
    elif args.bench == "participant":
        from qsmprep.benchmarks.participant import (
            format_participant_table,
            run_participant_bench,
        )
        from qsmprep.config import load_method_params

        runs = run_participant_bench(
            args.out_dir, shape=args.shape, voxel_size=args.voxel_size,
            echo_times=args.echo_times, methods=args.methods, nprocs=args.nprocs,
            omp_nthreads=args.omp_nthreads, devices=args.devices, outputs=args.outputs,
            seed=args.seed, method_params=load_method_params(args.config) if args.config else {},
            bg_method=args.bg_method,
        )  # fmt: skip
        for r in runs:
            print(format_participant_table(r))
        result = {"runs": [r.to_dict() for r in runs]}
        failed = any(r.exit_code != 0 for r in runs)
    elif args.bench == "space":
        from qsmprep.benchmarks.space import run_space_benchmark

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
