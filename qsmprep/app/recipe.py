"""The training recipe of the shipped networks, as one command: ``qsmprep-train recipe``.

The recipe makes every model that the BIDS App's deep-learning methods run, in order:

1. **Target domain.** ``target_datasets`` simulated heads (phantom seeds ``seed`` and up, far
   from the evaluation seeds of ``qsmprep-bench accuracy``), each at ``orientations`` head
   orientations, with realistic multi-echo signal and noise, processed by the BIDS App itself
   (quality-guided unwrapping, echo fit, RESHARP, COSMOS). The networks see pipeline-made local
   fields, not dipole-convolved ones: the domain shift that matters. ``target_val_heads`` more
   heads (the last subjects) are made the same way and held out of training: the target
   metrics of the adapted and transfer-learned models come from them
   (``TrainConfig.target_holdout``). The training heads are the same with or without them.
2. **Pre-training** on synthetic data (:class:`~qsmprep.dl.synth.SyntheticQSMData`): the
   conventional U-Net (``unet-pretrained``) and the adaptive-convolution U-Net with random
   voxel sizes and B0 directions (``adaptive-pretrained``).
3. **Adaptation** to the unlabelled target scans: QSMInvNet+ (``dsbn``: synthetic batches
   through the source BNs, target batches through the target BNs with the data-consistency
   loss), QSMInvNet (``dcfinetune``: fine-tuned by data consistency alone), both starting
   from ``unet-pretrained`` so that they get the same synthetic training, and the uQSM-style
   network (``unsup``: data consistency only, from scratch).
4. **Transfer learning** on the target scans with their COSMOS as the label: ``adaptive``
   (FMN frozen, decoder lr 1e-3, the rest 1e-5) and ``unet`` (the conventional baseline).

Every model is registered in ``OUT/weights/registry.json`` with its sha256 and model card, so
``QSMPREP_WEIGHTS_DIR=OUT/weights qsmprep ... --methods dsbn adaptive`` runs them. Profiles
set the size: ``tiny`` (a smoke test: seconds), ``cpu`` (what two CPU cores afford in about
an hour for all models, running independent stages side by side with ``--only``) and ``gpu``
(the full configuration for an H100-class GPU). Protocols (:mod:`qsmprep.app.protocols`) set
the training: ``qsmprep`` (the above), ``paper1`` and ``paper2`` (the published ones).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

__all__ = ["CONVENTIONAL_SYNTH", "PROFILES", "make_target_data", "recipe_configs", "run_recipe"]

log = logging.getLogger(__name__)

PROFILES: dict[str, dict] = {
    "tiny": {
        "pretrain_steps": 4, "adapt_steps": 3, "transfer_steps": 3, "patch": 16, "batch": 2,
        "base_channels": 4, "depth": 3, "target_shape": (48, 48, 40), "target_datasets": 1,
        "orientations": 3, "val_every": 0, "val_batches": 1, "target_val_heads": 0,
    },
    "cpu": {
        "pretrain_steps": 2000, "adapt_steps": 600, "transfer_steps": 300, "patch": 32,
        "batch": 4, "base_channels": 8, "depth": 4, "target_shape": (96, 96, 80),
        "target_datasets": 2, "orientations": 5, "val_every": 250, "val_batches": 4,
        "target_val_heads": 1,
    },
    "gpu": {
        "pretrain_steps": 20000, "adapt_steps": 5000, "transfer_steps": 2000, "patch": 64,
        "batch": 8, "base_channels": 16, "depth": 5, "target_shape": (96, 96, 80),
        "target_datasets": 4, "orientations": 5, "val_every": 500, "val_batches": 8,
        "target_val_heads": 1,
    },
}  # fmt: skip
"""Sizes of the recipe: steps per stage, patch edge, batch, network width and depth, data
(``target_datasets`` training heads and ``target_val_heads`` held-out ones; the ``tiny``
profile's one head validates on its training scans, as its model cards say)."""

CONVENTIONAL_SYNTH = {
    "voxel_size": ((1.0, 2.0),) * 3, "isotropic": True, "background_ppm": (0.0, 0.004),
}  # fmt: skip
"""Synthetic data of the networks without side information (all but the adaptive ones): cubic
voxels of 1-2 mm, B0 along the third axis. A conventional U-Net is tied to the resolution it
was trained at (pre-trained at 1 mm only, it scored 55 % NRMSE on a 2 mm phantom against 48 %
at 1 and 1.5 mm), so it is trained across the resolutions of common protocols and of the
target domain (2 mm). A smooth residual background field of 0-0.004 ppm stands for what
background removal leaves in measured local fields (without it the pre-trained U-Net scored
70.8 % against COSMOS on a pipeline-made target field, with it 61.3 %). The adaptive
networks take voxel size and B0 direction as inputs and draw both more widely
(:data:`qsmprep.dl.train.ADAPTIVE_SYNTH`)."""

ORIENTATIONS = [(0.0, 0.0), (25.0, 0.0), (-25.0, 0.0), (0.0, 25.0), (0.0, -25.0)]
"""Head rotations (about world x, about world y; degrees) of the target heads."""

TARGET_VOXEL = 2.0
"""Voxel size (mm) of the target heads; ``target_shape`` of a profile is at this size."""

# (registry name, training method, arch, init model, stage, description)
STAGES = [
    ("unet-pretrained", "supervised", "unet", None, "pretrain",
     "conventional U-Net pre-trained on synthetic data"),
    ("adaptive-pretrained", "supervised", "adaptive", None, "pretrain",
     "adaptive-convolution U-Net pre-trained on synthetic data (no transfer learning)"),
    ("dsbn", "dsbn", "dsbn", "unet-pretrained", "adapt",
     "QSMInvNet+: domain-specific batch norm, synthetic + unlabelled target scans"),
    ("dcfinetune", "dc-finetune", None, "unet-pretrained", "adapt",
     "QSMInvNet: pre-trained U-Net fine-tuned on target scans by data consistency"),
    ("unsup", "unsupervised", "unet", None, "adapt",
     "uQSM-style U-Net trained by data consistency only"),
    ("adaptive", "transfer", None, "adaptive-pretrained", "transfer",
     "adaptive-convolution U-Net, transfer-learned on target scans with COSMOS labels"),
    ("unet", "transfer", None, "unet-pretrained", "transfer",
     "conventional U-Net, transfer-learned on target scans with COSMOS labels"),
]  # fmt: skip


def target_plan(profile: str = "cpu", protocol: str = "qsmprep") -> dict:
    """How the target heads are simulated: ``n`` subjects, their ``grids`` ({index: (shape,
    voxel size)}; the field of view of the profile's ``target_shape`` at 2 mm, each axis an
    even number of voxels) and ``orientations`` (the same for every subject)."""
    from qsmprep.app.protocols import PROTOCOLS

    p = PROFILES[profile]
    spec = PROTOCOLS[protocol]["target"]
    n = int(p["target_datasets"]) + int(p.get("target_val_heads", 0))
    sizes = spec.get("voxel_sizes") or [(TARGET_VOXEL,) * 3]
    grids = {}
    for i in range(n):
        vs = tuple(float(v) for v in sizes[i % len(sizes)])
        shape = tuple(
            2 * round(s * TARGET_VOXEL / v / 2) for s, v in zip(p["target_shape"], vs, strict=True)
        )
        grids[i] = (shape, vs)
    rots = [tuple(map(float, r)) for r in spec.get("orientations") or ORIENTATIONS]
    return {"n": n, "grids": grids, "orientations": rots[: p["orientations"]]}


def make_target_data(
    out, *, profile: str = "cpu", seed: int = 0, nprocs: int = 2, protocol: str = "qsmprep"
) -> Path:
    """Simulate the target heads and run the BIDS App on them; return its output directory."""
    import json

    from qsmprep.app import make_settings, run
    from qsmprep.sim.bids import simulate_bids_dataset

    out = Path(out)
    bids = out / "bids"
    deriv = out / "derivatives"
    plan = target_plan(profile, protocol)
    n = plan["n"]
    record = out / "target_plan.json"
    planned = json.loads(json.dumps(_jsonable(plan)))
    if record.is_file():
        same = json.loads(record.read_text()) == planned
    else:  # made before the record was kept: the default plan
        same = planned == json.loads(json.dumps(_jsonable(target_plan(profile))))
    if (deriv / "dataset_description.json").is_file():
        have = [d for d in deriv.glob("sub-*") if d.is_dir()]
        if len(have) == n and same:
            return deriv  # made by an earlier (interrupted) run of the recipe
        log.warning(
            "recipe: %s holds %d target heads, the %s profile %d (%s); making them again",
            deriv, len(have), profile, n, "same plan" if same else "another plan",
        )  # fmt: skip
        shutil.rmtree(deriv)
        shutil.rmtree(out / "work", ignore_errors=True)
    if bids.exists():
        shutil.rmtree(bids)
    shape, vs = plan["grids"][0]
    simulate_bids_dataset(
        bids, n_subjects=n, shape=shape, voxel_size=vs, seed=seed,
        orientations={i: plan["orientations"] for i in range(n)}, grids=plan["grids"],
    )  # fmt: skip
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(planned, indent=1) + "\n")
    from qsmprep.dl.weights import TRAINED_BACKGROUND

    settings = make_settings(bids, deriv, methods=["tkd"], nprocs=nprocs, work_dir=out / "work",
                             bg_method=TRAINED_BACKGROUND)  # fmt: skip
    rc = run(settings)
    if rc != 0:
        raise RuntimeError(
            f"the BIDS App failed on the target data (exit {rc}): {bids} -> {deriv}, methods tkd,"
            f" background {TRAINED_BACKGROUND}"
        )
    return deriv


def recipe_configs(
    out,
    target,
    *,
    profile: str = "cpu",
    protocol: str = "qsmprep",
    seed: int = 0,
    device: str = "auto",
    quiet: bool = True,
    half: bool = True,
    threads: int = 0,
) -> list[tuple[str, object, str | None, str]]:
    """``[(name, TrainConfig, arch, description), ...]``: what :func:`run_recipe` trains.

    ``out`` is the recipe's folder and ``target`` the target data (a qsmprep output); the
    arguments are those of :func:`run_recipe`. Nothing is read or written.
    """
    from qsmprep.app.protocols import check_protocol, overrides_for, protocol_models
    from qsmprep.dl.train import TrainConfig

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {list(PROFILES)}")
    check_protocol(protocol, STAGES)
    p = PROFILES[profile]
    out = Path(out).absolute()
    weights = out / "weights"
    flag = "" if protocol == "qsmprep" else f" --protocol {protocol}"
    configs = []
    for name, row in protocol_models(protocol, STAGES):
        _, method, arch, init, stage, description = row
        over = copy.deepcopy(overrides_for(protocol, name, row))
        init = over.pop("init", init)
        description = over.pop("description", description)
        steps = int(p[f"{over.pop('budget', stage)}_steps"])
        cycles = int(over.pop("restart_cycles", 0))
        model = over.pop("model", {})
        scratch = {"base_channels": p["base_channels"], "depth": p["depth"]}
        cfg = TrainConfig(
            method=method,
            arch=arch,
            synth={} if _is_adaptive(arch, init) else dict(CONVENTIONAL_SYNTH),
            model={} if init else {**scratch, **model},
            init=str(weights / f"{init}.pt") if init else None,
            steps=steps,
            batch_size=int(p["batch"]),
            patch_size=(int(p["patch"]),) * 3,
            target=str(target) if stage != "pretrain" else None,
            target_holdout=int(p.get("target_val_heads", 0)),
            reference="cosmos" if stage == "transfer" else None,
            seed=seed,
            device=device,
            threads=int(threads or 0),
            out=str(out / "runs" / name),
            name=name,
            log_every=max(1, steps // 50),
            val_every=int(p["val_every"]),
            ckpt_every=max(1, steps // 10),
            val_batches=int(p["val_batches"]),
            quiet=quiet,
            half=half,
            command=f"qsmprep-train recipe {out} --profile {profile}{flag} --seed {seed} "
            f"--only {name}",
        )
        for key, value in over.items():
            setattr(cfg, key, value)
        if cycles:
            mult = int(cfg.restart_mult)
            cfg.restart_steps = max(1, -(-steps // sum(mult**k for k in range(cycles))))
        configs.append((name, cfg, arch, description))
    return configs


def run_recipe(
    out,
    *,
    profile: str = "cpu",
    seed: int = 0,
    device: str = "auto",
    nprocs: int = 2,
    only=None,
    quiet: bool = True,
    half: bool = True,
    threads: int = 0,
    protocol: str = "qsmprep",
) -> Path:
    """Train and register every model of a protocol; return the weights directory.

    Parameters
    ----------
    out : path
        Working folder: ``target/`` (data and pipeline outputs), ``runs/<name>/`` (checkpoints,
        CSV logs, model cards) and ``weights/`` (the registered models).
    profile : {"tiny", "cpu", "gpu"}
        See :data:`PROFILES`.
    seed : int
        Seed of the target heads and of every training run.
    device : {"auto", "cpu", "cuda"}
    nprocs : int
        Processes of the BIDS App run on the target data.
    only : iterable of str, optional
        Train only these models (their ``init`` models must exist in ``weights/``).
    quiet : bool
        No progress bars.
    half : bool
        Store the weights as float16 (half the size; outputs change by ~1e-4 relative).
    threads : int
        torch CPU threads of the training runs (0: the default of
        :class:`~qsmprep.dl.train.TrainConfig`). The other speed settings are its defaults.
    protocol : {"qsmprep", "paper1", "paper2"}
        The training protocol (:data:`qsmprep.app.protocols.PROTOCOLS`): ``qsmprep`` makes
        the shipped models; ``paper1`` and ``paper2`` follow the published ones. Use one
        ``out`` per protocol.

    A model whose final checkpoint is already registered is not trained again, so an
    interrupted recipe continues where it stopped.
    """
    from qsmprep.app.protocols import check_protocol
    from qsmprep.dl.checkpoint import file_sha256
    from qsmprep.dl.train import train
    from qsmprep.dl.weights import available_models, register_model

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {list(PROFILES)}")
    check_protocol(protocol, STAGES)
    out = Path(out).absolute()
    weights = out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    target = make_target_data(
        out / "target", profile=profile, seed=seed, nprocs=nprocs, protocol=protocol
    )
    done = set(available_models(weights))
    wanted = set(only) if only else None
    timings = {}
    configs = recipe_configs(
        out, target, profile=profile, protocol=protocol, seed=seed, device=device, quiet=quiet,
        half=half, threads=threads,
    )  # fmt: skip
    for name, cfg, arch, description in configs:
        if (wanted is not None and name not in wanted) or name in done:
            continue
        t0 = time.perf_counter()
        ckpt = train(cfg)
        timings[name] = time.perf_counter() - t0
        dest = weights / f"{name}.pt"
        shutil.copy2(ckpt, dest)
        card = ckpt.with_suffix(".md")
        card_dest = None
        if card.is_file():
            card_dest = weights / f"{name}.md"
            shutil.copy2(card, card_dest)
        arch_of = arch or _arch_of(dest)
        register_model(weights, name, dest, arch=arch_of, sha256=file_sha256(dest),
                       card=card_dest, description=description)  # fmt: skip
        log.info("recipe: %s trained in %.0f s", name, timings[name])
    return weights


def _jsonable(plan: dict) -> dict:
    return {**plan, "grids": [list(map(list, g)) for g in plan["grids"].values()]}


def _is_adaptive(arch, init) -> bool:
    return arch == "adaptive" or (init or "").startswith("adaptive")


def _arch_of(path: Path) -> str:
    from qsmprep.dl.checkpoint import load_checkpoint

    _, meta = load_checkpoint(path)
    return meta["config"]["arch"]
