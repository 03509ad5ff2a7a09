"""``qsmprep-train``: train, adapt and benchmark the deep-learning dipole inversions.

Subcommands::

    qsmprep-train pretrain --arch unet|dsbn|adaptive --out DIR        # synthetic data
    qsmprep-train adapt --method dsbn --target OUT_OR_BIDS --out DIR  # QSMInvNet+
    qsmprep-train adapt --method dc-finetune --init CKPT --target ... # QSMInvNet
    qsmprep-train adapt --method unsupervised --target ...            # uQSM-style
    qsmprep-train finetune --init CKPT --target ... --reference cosmos  # transfer learning
    qsmprep-train bench --arch unet --patch-size 64                   # throughput

``--target`` is a qsmprep output directory (``OUT/derivatives/qsmprep``) or a BIDS dataset
(the field chain runs first); which one is detected. Its last subject (``--target-holdout``,
``--target-val-subjects``) is held out of training for validation, or a separate dataset
validates (``--target-val-dir``). ``--resume`` continues an interrupted run
in ``--out`` to the same final weights. Each run writes ``<name>.pt``, its model card
``<name>.md``, ``last.pt`` (resumable) and ``train_log.csv`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from qsmprep.__about__ import __version__
from qsmprep.methods import names

__all__ = ["build_parser", "main"]


def _kv(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is valid JSON, else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _common(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--out", required=out_required, metavar="DIR", help="output directory of the run"
    )
    g.add_argument("--name", help="stem of the final checkpoint (default METHOD-ARCH)")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    g.add_argument(
        "--target-batch-size", type=int, default=None, help="target patches per dsbn step"
    )
    g.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        default=[64],
        metavar="N",
        help="patch shape: 1 or 3 ints, multiples of 2**(depth-1) (default 64)",
    )
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument(
        "--fmn-lr-scale",
        type=float,
        default=1.0,
        help="adaptive models: the filter-manifold network learns at --lr times this "
        "(default 1; transfer learning freezes it)",
    )
    g.add_argument(
        "--restart-steps",
        type=int,
        default=0,
        help="first period of the cosine warm restarts (default: all steps)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _speed(g)
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--stop-at", type=int, default=0, help="stop after this step (resume later)")
    g.add_argument("--log-every", type=int, default=10, help="CSV log interval (steps)")
    g.add_argument("--val-every", type=int, default=100, help="validation interval (steps)")
    g.add_argument(
        "--ckpt-every", type=int, default=100, help="resumable checkpoint interval (steps)"
    )
    g.add_argument("--val-batches", type=int, default=4, help="held-out batches")
    g.add_argument("--half", action="store_true", help="store the final weights as float16")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    m = p.add_argument_group("model")
    m.add_argument("--init", metavar="CKPT", help="checkpoint to start from")
    m.add_argument("--base-channels", type=int, default=None, help="first-level channels (16)")
    m.add_argument("--depth", type=int, default=None, help="U-Net levels (5)")
    m.add_argument(
        "--model",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other model config entries (activation=relu, ...)",
    )
    m.add_argument("--loss", choices=["l1", "l2"], default="l1", help="supervised loss")
    m.add_argument("--grad-weight", type=float, default=0.0, help="gradient-difference term")
    s = p.add_argument_group("synthetic data")
    s.add_argument(
        "--synth",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SyntheticQSMData options, e.g. kind=shapes, noise_ppm=[0,0.003], "
        'voxel_size=[[0.6,1.2],[0.6,1.2],[0.6,3]], b0_dir="random"',
    )


def _speed(g) -> None:
    """The speed options of training and of the benchmark (``TrainConfig`` fields)."""
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="arithmetic of the network: bf16 autocast (weights, losses and optimiser stay "
        "float32) or fp32; auto: bf16 on a CPU with native bfloat16, else fp32 (default auto)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last_3d memory layout of model and inputs (default: on the CPU)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: the cores available, less one for the prefetching "
        "worker)",
    )
    g.add_argument(
        "--prefetch",
        type=int,
        default=2,
        metavar="N",
        help="synthetic batches made ahead by a worker process (0: between the steps; CPU "
        "data only; default 2)",
    )
    g.add_argument("--amp", action="store_true", help="legacy: bfloat16 autocast on CUDA")


def _target(p: argparse.ArgumentParser, *, reference_default=None) -> None:
    t = p.add_argument_group("target scans")
    t.add_argument(
        "--target",
        metavar="DIR",
        help="qsmprep output directory (OUT/derivatives/qsmprep) or BIDS dataset",
    )
    t.add_argument(
        "--reference",
        default=reference_default,
        help="reference chi: a desc label (cosmos), a NIfTI file or a glob pattern"
        + (f" (default {reference_default})" if reference_default else ""),
    )
    t.add_argument("--b0", type=float, default=None, help="field strength override (T)")
    t.add_argument("--te", type=float, default=None, help="echo time of the phase scale (s)")
    t.add_argument("--participant-label", nargs="+", default=None, help="BIDS subjects")
    v = p.add_argument_group(
        "target validation",
        "The target scans are split by subject: the held-out subjects' scans validate and are "
        "never trained on. The model card names both sides.",
    )
    v.add_argument(
        "--target-holdout",
        type=int,
        default=1,
        metavar="N",
        help="hold the last N subjects of --target (by label) out of training to validate on "
        "(default 1; 0: none; with one subject nothing is held out and the card says so)",
    )
    v.add_argument(
        "--target-val-subjects",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="hold these subjects of --target out instead of the last N",
    )
    v.add_argument(
        "--target-val-dir",
        metavar="DIR",
        default=None,
        help="validate on this separate qsmprep output directory or BIDS dataset instead "
        "(all of --target trains)",
    )
    t.add_argument(
        "--bg-method",
        default="resharp",
        choices=sorted(names("background"), key=lambda m: (*_BG_HELP_ORDER, m).index(m)),
        help="BIDS datasets: background removal of the field chain",
    )


_BG_HELP_ORDER = ("resharp", "sharp", "vsharp", "pdf", "lbv")
"""Order of ``--bg-method``'s choices in this help; other registered methods follow."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmprep-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="supervised pre-training on synthetic data")
    pre.add_argument("--arch", choices=["unet", "dsbn", "adaptive"], default="unet")
    _common(pre)

    ad = sub.add_parser("adapt", help="adapt to unlabelled target scans (dsbn, dc, uQSM)")
    ad.add_argument("--arch", choices=["unet", "dsbn", "adaptive"], default=None)
    ad.add_argument("--method", choices=["dsbn", "dc-finetune", "unsupervised"], default="dsbn")
    ad.add_argument("--lambda-max", type=float, default=1.0, help="dsbn: weight of L_T")
    ad.add_argument(
        "--ramp", choices=["sigmoid", "linear", "none"], default="sigmoid", help="dsbn ramp"
    )
    ad.add_argument("--ramp-steps", type=int, default=0, help="dsbn ramp length (steps/2)")
    ad.add_argument("--tv-weight", type=float, default=0.0, help="unsupervised: TV term")
    _common(ad)
    _target(ad)

    ft = sub.add_parser("finetune", help="transfer learning on scans with a reference chi")
    ft.add_argument("--arch", choices=["unet", "dsbn", "adaptive"], default=None)
    ft.add_argument("--method", choices=["transfer"], default="transfer")
    ft.add_argument("--lr-decoder", type=float, default=1e-3, help="decoder learning rate")
    ft.add_argument("--lr-other", type=float, default=1e-5, help="encoder learning rate")
    _common(ft)
    _target(ft, reference_default="cosmos")

    b = sub.add_parser("bench", help="training throughput (patches/s) and peak memory")
    b.add_argument("--arch", choices=["unet", "dsbn", "adaptive"], default="unet")
    b.add_argument("--patch-size", type=int, default=64)
    b.add_argument("--batch-size", type=int, default=2)
    b.add_argument("--base-channels", type=int, default=16)
    b.add_argument("--depth", type=int, default=5)
    b.add_argument("--steps", type=int, default=5, help="timed steps")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--kind", choices=["shapes", "brain", "mix"], default="shapes")
    b.add_argument("--device", default="auto")
    _speed(b)
    b.add_argument(
        "--compare",
        action="store_true",
        help="also time the baseline (fp32, contiguous, every core, data between the steps), "
        "interleaved with these settings, and print both with their ratio",
    )
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --compare")
    b.add_argument(
        "--baseline-threads",
        type=int,
        default=0,
        help="torch threads of the --compare baseline (default 0: every core, as before)",
    )
    b.add_argument("--json", metavar="PATH", help="also write the result as JSON")

    r = sub.add_parser(
        "recipe",
        help="train and register every shipped model (target data, pre-training, adaptation, "
        "transfer learning; see qsmprep.app.recipe)",
    )
    r.add_argument("out", help="working folder; the models land in OUT/weights")
    r.add_argument("--profile", choices=["tiny", "cpu", "gpu"], default="cpu")
    r.add_argument(
        "--protocol",
        choices=["qsmprep", "paper1", "paper2"],
        default="qsmprep",
        help="training protocol (qsmprep.app.protocols): qsmprep (default) makes the shipped "
        "models; paper1 follows QSMInvNet+ (L2 loss, Adam at 1e-4, ReLU, dsbn trained from "
        "scratch at lambda 0.1, 1 and 10: models dsbn-lam0.1, dsbn-lam1, dsbn-lam10); paper2 "
        "the adaptive-convolution paper (both U-Nets pre-trained on the same shapes with "
        "random voxel sizes, B0 tilts and flips, warm restarts, target heads at 1, 1x1x2 and "
        "2x2x3 mm tilted 0-30 degrees with COSMOS labels). Use one OUT per protocol",
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--nprocs", type=int, default=2, help="processes of the BIDS App run")
    r.add_argument("--only", nargs="+", metavar="MODEL", help="train only these models")
    r.add_argument("--full-precision", action="store_true", help="store float32 weights")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args, argv) -> object:
    """The :class:`~qsmprep.dl.train.TrainConfig` of a parsed command line."""
    from qsmprep.dl.train import TrainConfig

    method = {"pretrain": "supervised"}.get(args.command, getattr(args, "method", None))
    model = dict(args.model)
    if args.base_channels is not None:
        model["base_channels"] = args.base_channels
    if args.depth is not None:
        model["depth"] = args.depth
    default_lr = 1e-3
    cfg = TrainConfig(
        method=method,
        arch=args.arch,
        model=model,
        init=args.init,
        steps=args.steps if args.steps is not None else 1000,
        batch_size=args.batch_size,
        target_batch_size=args.target_batch_size,
        patch_size=tuple(args.patch_size),
        lr=args.lr if args.lr is not None else default_lr,
        weight_decay=args.weight_decay,
        fmn_lr_scale=args.fmn_lr_scale,
        restart_steps=args.restart_steps,
        loss=args.loss,
        grad_weight=args.grad_weight,
        synth=dict(args.synth),
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        threads=args.threads,
        prefetch=args.prefetch,
        amp=args.amp,
        out=args.out,
        name=args.name,
        log_every=args.log_every,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        val_batches=args.val_batches,
        quiet=args.quiet,
        resume=args.resume,
        stop_at=args.stop_at,
        half=args.half,
        command="qsmprep-train " + shlex.join(argv),
    )
    if args.command in ("adapt", "finetune"):
        cfg.target = args.target
        cfg.reference = args.reference
        opts = {"bg_method": args.bg_method}
        for key in ("b0", "te", "participant_label"):
            if getattr(args, key) is not None:
                opts[key] = getattr(args, key)
        cfg.target_options = opts
        cfg.target_holdout = args.target_holdout
        cfg.target_val_subjects = args.target_val_subjects
        cfg.target_val_dir = args.target_val_dir
    if args.command == "adapt":
        cfg.lambda_max = args.lambda_max
        cfg.ramp = args.ramp
        cfg.ramp_steps = args.ramp_steps
        cfg.tv_weight = args.tv_weight
    if args.command == "finetune":
        cfg.transfer_lr_decoder = args.lr_decoder
        cfg.transfer_lr_other = args.lr_other
    return cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.command == "bench":
            from qsmprep.benchmarks.training import bench_training

            result = bench_training(
                args.arch, patch_size=args.patch_size, batch_size=args.batch_size,
                base_channels=args.base_channels, depth=args.depth, steps=args.steps,
                warmup=args.warmup, device=args.device, kind=args.kind, amp=args.amp,
                precision=args.precision, channels_last=args.channels_last,
                threads=args.threads, prefetch=args.prefetch, compare=args.compare,
                rounds=args.rounds, baseline_threads=args.baseline_threads,
            )  # fmt: skip
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=2)
            return 0
        if args.command == "recipe":
            from qsmprep.app.recipe import run_recipe

            weights = run_recipe(
                args.out, profile=args.profile, seed=args.seed, device=args.device,
                nprocs=args.nprocs, only=args.only, quiet=args.quiet,
                half=not args.full_precision, threads=args.threads or 0,
                protocol=args.protocol,
            )  # fmt: skip
            print(f"qsmprep-train: models in {weights} (use QSMPREP_WEIGHTS_DIR={weights})")
            return 0
        from qsmprep.dl.train import train

        path = train(config_from_args(args, argv))
        print(f"qsmprep-train: wrote {path}")
        return 0
    except ValueError as exc:
        print(f"qsmprep-train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
