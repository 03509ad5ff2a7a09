"""Setting a run up: the model (fresh or from ``init``), optimiser and scheduler, data sources."""

from __future__ import annotations

import logging

import torch

from qsmprep.dl.checkpoint import load_checkpoint
from qsmprep.dl.nets import build_model, default_config
from qsmprep.dl.synth import SyntheticQSMData
from qsmprep.dl.train.config import _NEEDS_TARGET, TrainConfig, _synth_kwargs

log = logging.getLogger(__name__)


def _build(cfg: TrainConfig, device: torch.device):
    """Model (fresh or from ``init``) and the resolved architecture."""
    if cfg.init:
        expect = None if cfg.method == "dsbn" else cfg.arch  # a unet init becomes a dsbn
        model, meta = load_checkpoint(cfg.init, device=device, arch=expect)
        arch = model.config["arch"]
        if cfg.method == "dsbn" and arch != "dsbn":
            if arch != "unet" or model.config["norm"] != "batch":
                raise ValueError(
                    f"init checkpoint {cfg.init} holds a {arch!r} model with "
                    f"{model.config['norm']!r} norm; method 'dsbn' starts from a 'dsbn' model "
                    "or a batch-norm 'unet' (pretrain with --arch unet or --arch dsbn)"
                )
            model = _dsbn_from_unet(model)
            arch = "dsbn"
        return model, arch, meta
    arch = cfg.arch or ("dsbn" if cfg.method == "dsbn" else "unet")
    torch.manual_seed(cfg.seed)
    model = build_model(default_config(arch, **cfg.model)).to(device)
    return model, arch, None


def _dsbn_from_unet(model):
    """The DSBN network with ``model``'s weights, each domain starting from its batch norms."""
    from qsmprep.dl.nets.dsbn import dsbn_state_from_batchnorm

    c = {k: v for k, v in model.config.items() if k != "arch"}
    c.update(norm="dsbn", default_domain="source")
    dsbn = build_model(default_config("dsbn", **c)).to(next(model.parameters()).device)
    dsbn.load_state_dict(dsbn_state_from_batchnorm(model.state_dict(), dsbn.state_dict()))
    dsbn.train(model.training)
    return dsbn


def _optimizer(cfg: TrainConfig, model):
    """AdamW (param groups for transfer) and its cosine warm-restart scheduler."""
    if cfg.method == "transfer":
        groups = model.param_groups_for_transfer()
        for p in groups["fmn"]:
            p.requires_grad_(False)
        params = [
            {"params": groups["decoder"], "lr": cfg.transfer_lr_decoder, "name": "decoder"},
            {"params": groups["encoder"], "lr": cfg.transfer_lr_other, "name": "encoder"},
        ]
    else:
        fmn = set()
        if float(cfg.fmn_lr_scale) != 1.0:
            fmn = {id(p) for p in model.param_groups_for_transfer()["fmn"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in fmn]
        params = [{"params": rest, "name": "all"}]
        if fmn:
            params.append({
                "params": [p for p in model.parameters() if id(p) in fmn],
                "lr": cfg.lr * float(cfg.fmn_lr_scale), "name": "fmn",
            })  # fmt: skip
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base = min(g["lr"] for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt,
        T_0=int(cfg.restart_steps) or int(cfg.steps),
        T_mult=int(cfg.restart_mult),
        eta_min=base * float(cfg.lr_min_ratio),
    )
    return opt, sched


def _check_patch(cfg: TrainConfig, model) -> None:
    m = model.multiple
    if any(n % m or n < m for n in cfg.patch_shape):
        raise ValueError(
            f"patch size {cfg.patch_shape} is not a multiple of {m} (2**(depth-1) for depth "
            f"{model.config['depth']}); choose e.g. --patch-size {max(m, 64 // m * m)}"
        )


SYNTH_VAL_SEED = 7919
"""Offset of the synthetic validation data's seed from the run's ``seed``."""
TARGET_VAL_SEED = 104729
"""Offset of the seed of the target validation patches from the run's ``seed``."""


def _data(cfg: TrainConfig, arch: str, device: torch.device):
    """(synthetic train, synthetic val batches, target train, target val batches, validation).

    ``validation`` says what the validation batches are (for the checkpoint and model card):
    the synthetic seed and, for target methods, how the target was split
    (:func:`_target_split`). The training target never holds a held-out scan.
    """
    from qsmprep.dl.target import TargetScans

    ps = cfg.patch_shape
    synth = val = target = tval = None
    validation: dict = {}
    skw = _synth_kwargs(cfg, arch)
    if cfg.method in ("supervised", "dsbn"):
        synth = SyntheticQSMData(ps, seed=cfg.seed, device=device, **skw)
    if cfg.val_batches > 0:
        held = SyntheticQSMData(ps, seed=cfg.seed + SYNTH_VAL_SEED, device=device, **skw)
        val = [held.batch(cfg.batch_size) for _ in range(cfg.val_batches)]
        validation["synthetic_seed"] = cfg.seed + SYNTH_VAL_SEED
        validation["synthetic_batches"] = cfg.val_batches
    if cfg.method in _NEEDS_TARGET:
        ref = cfg.reference
        if cfg.method == "transfer" and ref is None:
            ref = "cosmos"
        opts = dict(cfg.target_options)
        full = TargetScans(cfg.target, ps, reference=ref, seed=cfg.seed + 1, device=device, **opts)
        target, held_t, info = _target_split(cfg, full, ref, device, opts)
        validation.update(info)
        if held_t is not None:
            tb = cfg.target_batch_size or cfg.batch_size
            tval = [held_t.batch(tb) for _ in range(cfg.val_batches)]
    return synth, val, target, tval, validation


def _target_split(cfg: TrainConfig, full, ref, device, opts: dict):
    """``(training target, validation target or None, description)`` of a run's target scans.

    The held-out subjects of ``full`` (:func:`~qsmprep.dl.target.split_by_subject`), or a
    separate dataset (``target_val_dir``), validate; nothing is loaded for validation when
    ``val_batches`` is 0, but the training scans are the same.
    """
    from qsmprep.dl.target import TargetScans, detect_source, split_by_subject

    seed = cfg.seed + TARGET_VAL_SEED
    if cfg.target_val_dir:
        held = None
        info = {"target_validation": "separate dataset", "target_val_dir": cfg.target_val_dir}
        _, root = detect_source(cfg.target_val_dir)
        if full.root is not None and root.resolve() == full.root.resolve():
            raise ValueError(
                f"--target-val-dir {cfg.target_val_dir} is the training target {full.root}; "
                "give another dataset, or hold subjects out of --target (--target-holdout, "
                "--target-val-subjects)"
            )
        if cfg.val_batches > 0:
            vopts = {k: v for k, v in opts.items() if k != "participant_label"}
            held = TargetScans(
                cfg.target_val_dir, full.patch_shape, reference=ref, seed=seed, device=device,
                **vopts,
            )  # fmt: skip
            shared = sorted(set(full.subjects) & set(held.subjects))
            if shared:
                log.warning(
                    "target: the validation dataset %s also has subject(s) %s; they are taken "
                    "to be other people than the training target's",
                    cfg.target_val_dir, ", ".join(f"sub-{x}" for x in shared),
                )  # fmt: skip
        info["target_train_subjects"] = full.subjects
        if held is not None:
            info["target_val_subjects"] = held.subjects
            info["target_val_scans"] = [s.name for s in held.scans]
            info["target_val_seed"] = seed
        return full, held, info
    train_scans, val_scans, note = split_by_subject(
        full.scans, holdout=cfg.target_holdout, subjects=cfg.target_val_subjects
    )
    target = full if not val_scans else full.subset(train_scans, seed=full.seed)
    held = None
    if cfg.val_batches > 0:
        held = full.subset(val_scans or full.scans, seed=seed)
    info = {"target_validation": note, "target_train_subjects": target.subjects}
    validated = val_scans or full.scans  # what the target metrics come from
    info["target_val_subjects"] = list(dict.fromkeys(s.subject for s in validated))
    info["target_val_scans"] = [s.name for s in validated]
    if held is not None:
        info["target_val_seed"] = seed
    return target, held, info
