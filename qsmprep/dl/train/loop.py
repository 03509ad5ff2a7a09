"""The training loop, :func:`train`, and the resumption of an interrupted run."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import torch

from qsmprep.dl.checkpoint import load_checkpoint, save_checkpoint, write_model_card
from qsmprep.dl.inference import resolve_device
from qsmprep.dl.synth import SyntheticQSMData
from qsmprep.dl.train.config import TrainConfig, _synth_kwargs, resolve_speed
from qsmprep.dl.train.prefetch import Prefetched
from qsmprep.dl.train.record import (
    _Csv,
    _hardware,
    _peak_memory_mb,
    _rng_state,
    _set_rng_state,
    _tensorboard,
)
from qsmprep.dl.train.setup import _build, _check_patch, _data, _optimizer
from qsmprep.dl.train.steps import (
    _dc,
    _predict,
    _sup,
    _tv,
    _validate,
    deployed_domain,
    lambda_schedule,
    tkd_baseline,
)
from qsmprep.threads import limit_threads

log = logging.getLogger(__name__)


_BEFORE_SPEED = {"precision": "fp32", "channels_last": False, "prefetch": 0}
"""What a run saved before the speed settings existed did (``amp`` still applies on CUDA)."""

_BEFORE_HOLDOUT = {"target_holdout": 0}
"""What a run saved before the target hold-out existed did: it trained on every target scan."""


def _resume_config(cfg: TrainConfig) -> tuple[TrainConfig, Path]:
    last = Path(cfg.out) / "last.pt"
    if not last.is_file():
        raise ValueError(
            f"nothing to resume in {cfg.out}: no last.pt there; start the run without --resume "
            "or give the --out directory of the interrupted run"
        )
    payload = torch.load(last, map_location="cpu", weights_only=True)
    saved = (payload.get("extra") or {}).get("train_config")
    if not saved:
        raise ValueError(f"{last} has no training configuration; it cannot be resumed")
    saved = dict(saved)
    for key, legacy in {**_BEFORE_SPEED, **_BEFORE_HOLDOUT}.items():  # saved before they existed
        saved.setdefault(key, legacy)
    saved.update(quiet=cfg.quiet, device=cfg.device, resume=True, out=cfg.out, stop_at=cfg.stop_at)
    if cfg.threads:  # speed only: a resumed run may use other cores
        saved["threads"] = cfg.threads
    if cfg.command:
        saved["command"] = saved.get("command") or cfg.command
    return TrainConfig.from_dict(saved), last


def _speed_text(speed: dict) -> str:
    """``bf16, channels_last layout, 2 batches prefetched`` (the threads are in the hardware)."""
    layout = "channels_last" if speed["channels_last"] else "contiguous"
    n = speed["prefetch"]
    data = f"{n} batches prefetched" if n else "data made between the steps"
    return f"{speed['precision']}, {layout} layout, {data}"


def train(config) -> Path:
    """Train a dipole-inversion network; return the path of the final checkpoint.

    Parameters
    ----------
    config : TrainConfig or dict
        See :class:`TrainConfig`.

    Returns
    -------
    Path of ``<out>/<name>.pt``; the model card ``<name>.md`` is beside it (``<out>/last.pt``
    when ``stop_at`` ended the run early).

    Raises
    ------
    ValueError
        Inconsistent settings, a checkpoint of the wrong architecture, missing or unusable
        target scans, nothing to resume.
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    last = None
    if cfg.resume:
        cfg, last = _resume_config(cfg)
    cfg.validate()
    device = resolve_device(cfg.device)
    speed = resolve_speed(
        device, precision=cfg.precision, channels_last=cfg.channels_last, threads=cfg.threads,
        prefetch=cfg.prefetch, amp=cfg.amp,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, precision=speed["precision"])  # saved, and resumed
    with limit_threads(speed["threads"]):
        return _train(cfg, device, speed, last)


def _train(cfg: TrainConfig, device: torch.device, speed: dict, last) -> Path:
    last_payload = None
    bf16, cl = speed["precision"] == "bf16", speed["channels_last"]
    out = Path(cfg.out)

    if cfg.resume:
        model, meta = load_checkpoint(last, device=device)
        last_payload = meta
        arch = model.config["arch"]
        init_meta = None
    else:
        model, arch, init_meta = _build(cfg, device)
    _check_patch(cfg, model)
    model.train()
    if cl:
        model = model.to(memory_format=torch.channels_last_3d)
    opt, sched = _optimizer(cfg, model)
    synth, val, target, tval, validation = _data(cfg, arch, device)
    if arch == "dsbn":  # the batch norms of every reported metric (see _validate)
        validation["batch_norms"] = deployed_domain(cfg) or model.default_domain
    if cfg.method in ("transfer",) and not target.labelled:
        raise ValueError("transfer learning needs target scans with a reference chi")

    start = 0
    if last_payload is not None:
        start = int(last_payload["step"])
        opt.load_state_dict(last_payload["optimizer"])
        sched.load_state_dict(last_payload["scheduler"])
        state = last_payload["extra"]
        if synth is not None and state.get("synth_state"):
            synth.load_state_dict(state["synth_state"])
        if target is not None and state.get("target_state"):
            target.load_state_dict(state["target_state"])
        _set_rng_state(state.get("rng") or {}, device)
        wall_before = float(state.get("wall_s", 0.0))
        tkd_nrmse = state.get("tkd_val_nrmse")
    else:
        wall_before = 0.0
        tkd_nrmse = tkd_baseline(val) if (val and cfg.method in ("supervised", "dsbn")) else None
    out.mkdir(parents=True, exist_ok=True)
    csv_log = _Csv(out / "train_log.csv", start)
    tb = _tensorboard(out)
    tb_target = cfg.target_batch_size or cfg.batch_size
    ramp = int(cfg.ramp_steps) or max(1, cfg.steps // 2)

    def data_state() -> dict:
        return {
            "train_config": cfg.to_dict(),
            "synth_state": None if synth is None else synth.state_dict(),
            "target_state": None if target is None else target.state_dict(),
            "rng": _rng_state(device),
            "wall_s": wall_before + time.perf_counter() - t_start,
            "tkd_val_nrmse": tkd_nrmse,
        }

    def describe() -> dict:
        d = {"method": cfg.method}
        if synth is not None or val:
            d["synthetic"] = SyntheticQSMData(
                cfg.patch_shape, seed=cfg.seed, **_synth_kwargs(cfg, arch)
            ).describe()
        if target is not None:
            d["target"] = target.describe()
        if validation:
            d["validation"] = dict(validation)
        if cfg.init:
            d["init"] = str(cfg.init)
            if init_meta is not None:
                d["init_sha256"] = init_meta.get("sha256")
        return d

    log.info("training %s/%s on %s: %s", cfg.method, arch, _hardware(device), _speed_text(speed))
    from tqdm.auto import tqdm

    quiet = cfg.quiet or not sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start, disable=quiet, desc=f"{cfg.method}/{arch}")
    t_start = time.perf_counter()
    metrics: dict = dict((last_payload or {}).get("metrics") or {})
    if start == 0 and (val or tval):  # the untrained model, for reference
        metrics = _validate(cfg, model, val, tval, cl)
        csv_log.write({"step": 0, "elapsed_s": 0.0, **metrics})
    t_last, n_patches = time.perf_counter(), 0
    end = min(cfg.stop_at, cfg.steps) if cfg.stop_at else cfg.steps
    source = synth
    if synth is not None and speed["prefetch"] > 0:
        source = Prefetched(synth, cfg.batch_size, ahead=speed["prefetch"], count=end - start)
    try:
        for step in range(start + 1, cfg.steps + 1):
            lam = None
            loss_s = loss_t = None
            if cfg.method == "supervised":
                b = source.batch(cfg.batch_size)
                dom = "source" if arch == "dsbn" else None
                loss = loss_s = _sup(cfg, _predict(model, b, dom, bf16, cl), b)
                n_patches += cfg.batch_size
            elif cfg.method == "dsbn":
                bs = source.batch(cfg.batch_size)
                bt = target.batch(tb_target)
                loss_s = _sup(cfg, _predict(model, bs, "source", bf16, cl), bs)
                loss_t = _dc(_predict(model, bt, "target", bf16, cl), bt)
                lam = lambda_schedule(step - 1, cfg.lambda_max, ramp, cfg.ramp)
                loss = loss_s + lam * loss_t
                n_patches += cfg.batch_size + tb_target
            elif cfg.method in ("dc-finetune", "unsupervised"):
                bt = target.batch(cfg.batch_size)
                chi = _predict(model, bt, None, bf16, cl)
                loss = loss_t = _dc(chi, bt)
                if cfg.method == "unsupervised" and cfg.tv_weight > 0:
                    loss = loss + cfg.tv_weight * _tv(chi, bt["mask"])
                n_patches += cfg.batch_size
            else:  # transfer
                bt = target.batch(cfg.batch_size)
                loss = loss_t = _sup(cfg, _predict(model, bt, None, bf16, cl), bt)
                n_patches += cfg.batch_size
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training loss became {loss_value} at step {step}; lower --lr (now {cfg.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.clip_grad
                )
            lr_now = max(g["lr"] for g in opt.param_groups)  # the rate of this step
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}")

            do_val = (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps
            do_log = (cfg.log_every and step % cfg.log_every == 0) or do_val
            if do_val and (val or tval):
                metrics = _validate(cfg, model, val, tval, cl)
            if do_log:
                now = time.perf_counter()
                row = {
                    "step": step,
                    "loss": loss_value,
                    "loss_source": None if loss_s is None else float(loss_s.detach()),
                    "loss_target": None if loss_t is None else float(loss_t.detach()),
                    "lambda": lam,
                    "lr": lr_now,
                    "patches_per_s": n_patches / max(now - t_last, 1e-9),
                    "elapsed_s": wall_before + now - t_start,
                    **(metrics if do_val else {}),
                }
                csv_log.write(row)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step" and isinstance(v, float):
                            tb.add_scalar(k, v, step)
                t_last, n_patches = now, 0
            stop = bool(cfg.stop_at) and step == cfg.stop_at and step < cfg.steps
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps) or stop:
                save_checkpoint(
                    out / "last.pt", model, step=step, optimizer=opt, scheduler=sched,
                    extra=data_state(), data=describe(), metrics=metrics,
                )  # fmt: skip
            if stop:
                bar.close()
                log.info("stopped at step %d; resume with resume=True (--resume)", step)
                return out / "last.pt"
    finally:
        if source is not synth:
            source.close()
    bar.close()
    if tb is not None:
        tb.close()

    wall = wall_before + time.perf_counter() - t_start
    if cfg.method == "dsbn":
        model.default_domain = "target"
    if cl:  # the saved weights in the ordinary layout
        model = model.to(memory_format=torch.contiguous_format)
    # the resumable state of the finished run (resume then has nothing left to do)
    save_checkpoint(
        out / "last.pt", model, step=cfg.steps, optimizer=opt, scheduler=sched,
        extra=data_state(), data=describe(), metrics=metrics,
    )  # fmt: skip
    name = cfg.name or f"{cfg.method}-{arch}"
    held = dict(metrics)
    if tkd_nrmse is not None:
        held["val_tkd_nrmse"] = tkd_nrmse
    if tval:  # whether the target figures are held out, beside them
        held["target_validation"] = validation["target_validation"]
    extra = {
        "command": cfg.command or "",
        "method": cfg.method,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "patch_size": list(cfg.patch_shape),
        "lr": cfg.lr,
        "device": str(device),
        "hardware": _hardware(device),
        "precision": speed["precision"],
        "channels_last": cl,
        "threads": speed["threads"],
        "prefetch": speed["prefetch"],
        "wall_time_s": round(wall, 1),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "train_config": cfg.to_dict(),
    }
    final = out / f"{name}.pt"
    save_checkpoint(
        final, model, step=cfg.steps, data=describe(), metrics=held, extra=extra, half=cfg.half
    )
    _, meta = load_checkpoint(final, device="cpu")
    card = write_model_card(final.with_suffix(".md"), meta)
    with open(card, "a", encoding="utf-8") as fh:
        fh.write("\n## Reproduce\n\n")
        if cfg.command:
            fh.write(f"```\n{cfg.command}\n```\n\n")
        fh.write(
            f"Seed {cfg.seed}, {cfg.steps} steps of {cfg.batch_size} patches "
            f"{'x'.join(map(str, cfg.patch_shape))} on {_hardware(device)} "
            f"({_speed_text(speed)}), wall time {wall:.0f} s. Log: `train_log.csv`.\n"
        )
    log.info("wrote %s (sha256 %s) and %s", final, meta["sha256"], card)
    return final
