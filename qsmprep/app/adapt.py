"""``qsmprep ... --dl-adapt``: adapt the networks to the data being processed, then infer.

Paper 1's protocol (Liu & Koch, QSMInvNet+) adapts a network trained on synthetic data to the
unlabelled scans it is to reconstruct. With ``--dl-adapt`` the participant level does that
before its workflows run:

1. **Target fields.** The field chain runs on every selected acquisition with the background
   removal the networks were trained on (:data:`qsmprep.dl.weights.TRAINED_BACKGROUND`), as a
   run of the App itself into ``<work_dir>/dl_adapt/target`` (Nipype's cache makes a rerun
   cheap). No label is used: only the local fields, their masks and noise maps.
2. **Adaptation.** Each adaptable method selected (:data:`ADAPTABLE`) is trained on them from
   the model it would run otherwise: ``dsbn`` (QSMInvNet+: synthetic batches through the
   source batch norms with the supervised loss, the dataset's fields through the target batch
   norms with the data-consistency loss) and ``dcfinetune`` (QSMInvNet: fine-tuned by data
   consistency alone). Every acquisition trains (``target_holdout=0``): the protocol adapts to
   the very scans it reconstructs, which the model card says.
3. **Weights in the output dataset.** ``<output_dir>/models/dl-adapt/<selection>/<method>.pt``
   (:func:`selection_label`: ``sub-01+sub-02``, so array jobs do not share weights) with its
   model card (``.md``), registered with its sha256 in ``registry.json`` there, and
   ``adaptation.json`` recording what it was adapted on (the acquisitions and the sha256 of
   their local fields), from which model and with which settings. The methods then run these
   weights (their Chimap sidecars name the file and its sha256); a rerun on the same
   acquisitions with the same settings reuses them, anything else adapts again.

Each training runs in a fresh (spawned) Python process. This process forks Nipype's MultiProc
workers afterwards, and torch's OpenMP thread pool, once used here with more than one thread,
makes a forked child hang in its first multi-threaded torch operation: a network node given
two threads (``--omp-nthreads 2``) after an adaptation trained in this process never ended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from qsmprep import _atomic as atomic
from qsmprep.__about__ import __version__
from qsmprep.app.settings import UsageError
from qsmprep.config import Settings

__all__ = ["ADAPTABLE", "ADAPT_LR", "MODELS_DIR", "adapt_networks", "selection_label"]

LOGGER = logging.getLogger("qsmprep")

ADAPTABLE = {"dsbn": "dsbn", "dcfinetune": "dc-finetune"}
"""App methods that ``--dl-adapt`` adapts, and their training method
(:class:`~qsmprep.dl.train.TrainConfig` ``method``)."""

ADAPT_LR = {"dsbn": 1e-3, "dcfinetune": 1e-4}
"""Learning rate of each adaptation. Measured on ``../shared/data/qsmdev`` (2 heads, 300 steps,
NRMSE over the true brain mask): QSMInvNet+ went from 78.8 / 81.2 % (shipped) to 72.5 / 75.8 %
at 1e-3 and 74.6 / 77.3 % at 1e-4; QSMInvNet, fine-tuned by data consistency alone, went from
71.6 / 75.6 % to 80.1 / 81.1 % at 1e-3 (the data term alone pulls it towards a noisy inverse)
and 73.0 / 75.0 % at 1e-4 (paper 1's Adam rate), with HFEN 63.6 / 69.4 -> 62.2 / 67.3 %."""

MODELS_DIR = Path("models") / "dl-adapt"
"""Where the adapted weights go, relative to the output dataset."""

MANIFEST = "adaptation.json"


def selection_label(settings: Settings, subjects: list[str]) -> str:
    """The folder name of one selection's adaptation: ``sub-01+sub-02`` (up to 4 subjects,
    no session or BIDS filter), else that or ``<N>-subjects`` with a hash of the selection.

    Array jobs that each process some participants into one output folder adapt to their
    own selection each, side by side, instead of overwriting each other's weights."""
    subjects = sorted(subjects)
    base = "+".join(f"sub-{s}" for s in subjects) if len(subjects) <= 4 else (
        f"{len(subjects)}-subjects"
    )  # fmt: skip
    if len(subjects) <= 4 and not settings.session_label and not settings.bids_filters:
        return base
    key = json.dumps(
        {"subjects": subjects, "sessions": settings.session_label,
         "filters": settings.bids_filters}, sort_keys=True,
    )  # fmt: skip
    return f"{base}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _target_settings(settings: Settings, subjects: list[str], label: str) -> Settings:
    """The App run that makes the target fields: the chain with the networks' background."""
    from qsmprep.dl.weights import TRAINED_BACKGROUND

    base = settings.work_dir / "dl_adapt"
    return dataclasses.replace(
        settings,
        output_dir=base / label / "target",
        work_dir=base / "work",
        participant_label=list(subjects),
        methods=["tkd"],
        bg_method=TRAINED_BACKGROUND,
        outputs=["chi"],
        output_spaces=[],
        reference=None,
        skip_bids_validation=True,  # the run that asks for it has validated the input
        dl_adapt=False,
        dl_adapt_steps=settings.dl_adapt_steps,
    )


def _target_fields(target: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the local fields of the target run."""
    from qsmprep.dl.checkpoint import file_sha256

    files = sorted(target.glob("sub-*/**/*_desc-local_fieldmap.nii.gz"))
    return {f.name: file_sha256(f) for f in files}


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def adapt_networks(settings: Settings, subjects: list[str], run_participant) -> dict[str, Path]:
    """Adapt the selected adaptable networks to ``subjects``' scans; their weights files.

    ``run_participant`` is :func:`qsmprep.app.levels.run_participant` (given by its caller),
    which makes the target fields. Returns ``{method: weights file}`` (empty when no
    adaptable method is selected; a warning says so). Raises
    :class:`~qsmprep.app.settings.UsageError` when no target field could be made.
    """
    methods = [m for m in settings.methods if m in ADAPTABLE]
    if not methods:
        LOGGER.warning(
            "--dl-adapt has nothing to adapt: it adapts %s, and --methods has none of them",
            " and ".join(ADAPTABLE),
        )
        return {}
    label = selection_label(settings, subjects)
    models = settings.output_dir / MODELS_DIR / label
    models.mkdir(parents=True, exist_ok=True)
    # a second run of the same selection waits here, then reuses what the first made
    with atomic.locked(models / ".adapt.lock"):
        return _adapt_all(settings, subjects, label, models, methods, run_participant)


def _adapt_all(settings, subjects, label, models, methods, run_participant) -> dict[str, Path]:
    """The target run, then each method's adaptation or reuse (under the selection's lock)."""
    t0 = time.perf_counter()
    target_settings = _target_settings(settings, subjects, label)
    LOGGER.info(
        "--dl-adapt: making the target fields of %d subject(s) in %s",
        len(subjects),
        target_settings.output_dir,
    )
    rc = run_participant(target_settings)
    fields = _target_fields(target_settings.output_dir)
    if not fields:
        raise UsageError(
            f"--dl-adapt: the field chain made no local field to adapt on (exit {rc}; see the"
            f" logs in {target_settings.output_dir / 'logs'}); run without --dl-adapt, or fix"
            " the input"
        )
    if rc != 0:
        LOGGER.warning(
            "--dl-adapt: some acquisitions failed in the target run; adapting on the %d local"
            " field(s) made",
            len(fields),
        )
    out: dict[str, Path] = {}
    fresh = _FreshProcess()
    try:
        _adapt_methods(settings, methods, fields, target_settings, models, out, fresh)
    finally:
        fresh.close()
    LOGGER.info("--dl-adapt: done in %.0f s", time.perf_counter() - t0)
    return out


def _adapt_methods(settings, methods, fields, target_settings, models, out, fresh) -> None:
    """Adapt (or reuse) each method's weights into ``out``; trainings run by ``fresh``."""
    from qsmprep.dl.checkpoint import file_sha256
    from qsmprep.dl.weights import register_model, resolve_model

    for method in methods:
        params = settings.params(method)
        init = resolve_model(method, model=params.get("model"), weights=params.get("weights"))
        record = {
            "Method": method,
            "TrainingMethod": ADAPTABLE[method],
            "InitialModel": init.name,
            "InitialSha256": init.sha256 or file_sha256(init.path),
            "Steps": int(settings.dl_adapt_steps),
            "LearningRate": ADAPT_LR[method],
            "Seed": 0,
            "TargetLocalFields": fields,
            "TargetBackgroundMethod": target_settings.bg_method,
            "QsmprepVersion": __version__,
        }
        weights = models / f"{method}.pt"
        manifest = models / f"{method}_{MANIFEST}"
        old = _read_manifest(manifest)
        if weights.is_file() and old is not None:
            same = {k: v for k, v in old.items() if k not in ("Sha256", "Seconds")} == record
            if same and old.get("Sha256") == file_sha256(weights):
                LOGGER.info("--dl-adapt: %s reuses %s (same scans and settings)", method, weights)
                out[method] = weights
                continue
        out[method] = _adapt_one(settings, method, init, record, target_settings.output_dir,
                                 models, fresh)  # fmt: skip
        record.update(Sha256=file_sha256(out[method]), Seconds=round(record.pop("_seconds"), 1))
        atomic.write_text(manifest, json.dumps(record, indent=1) + "\n")
        card = models / f"{method}.md"
        register_model(
            models,
            method,
            out[method],
            arch=init.arch or "unet",
            sha256=record["Sha256"],
            card=card if card.is_file() else None,
            description=f"{method} adapted by qsmprep --dl-adapt to {len(fields)} scan(s)",
        )


class _FreshProcess:
    """A spawned interpreter that runs the trainings of an adaptation, one after the other
    (started on first use; this process's torch thread pool stays unused: see the module
    docstring). A training's exception is raised here."""

    def __init__(self):
        self._pool = None

    def __call__(self, fn, *args):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _train_adaptation(cfg) -> Path:
    """The training of one adaptation (run in a fresh process): the synthetic batches are drawn
    with the ``synth`` settings that the initial model's checkpoint records."""
    from qsmprep.dl.checkpoint import load_checkpoint
    from qsmprep.dl.train import train

    _, meta = load_checkpoint(cfg.init)  # builds the network: torch work, kept out of the App
    synth = dict(((meta.get("extra") or {}).get("train_config") or {}).get("synth") or {})
    return train(dataclasses.replace(cfg, synth=synth))


def _adapt_one(
    settings: Settings, method: str, init, record: dict, target: Path, models: Path, fresh
) -> Path:
    """Train one adaptation (in a fresh process); copy its checkpoint and model card into the
    output dataset.

    The synthetic batches of ``dsbn`` are drawn as in the initial model's own training (the
    ``synth`` settings its checkpoint records), so adaptation does not change that domain."""
    from qsmprep.dl.train import TrainConfig

    runs = settings.work_dir / "dl_adapt" / models.name / "runs" / method
    if runs.exists():
        shutil.rmtree(runs)  # an interrupted or outdated run: adapt from the start
    steps = int(settings.dl_adapt_steps)
    cfg = TrainConfig(
        method=ADAPTABLE[method],
        arch="dsbn" if method == "dsbn" else None,
        init=str(init.path),
        steps=steps,
        lr=ADAPT_LR[method],
        batch_size=4,
        patch_size=(32, 32, 32),
        target=str(target),
        target_holdout=0,
        seed=0,
        device=settings.compute_device,
        threads=int(settings.nprocs),
        out=str(runs),
        name=method,
        log_every=max(1, steps // 20),
        val_every=0,
        ckpt_every=max(1, steps // 5),
        val_batches=2,
        quiet=True,
        command=f"qsmprep {settings.bids_dir} {settings.output_dir} participant --methods "
        f"{method} --dl-adapt --dl-adapt-steps {steps}",
    )
    LOGGER.info("--dl-adapt: adapting %s (%s, %d steps) from %s", method, cfg.method, steps,
                init.path)  # fmt: skip
    t0 = time.perf_counter()
    ckpt = fresh(_train_adaptation, cfg)
    record["_seconds"] = time.perf_counter() - t0
    dest = models / f"{method}.pt"
    tmp = dest.with_suffix(".pt.tmp")
    shutil.copy2(ckpt, tmp)
    tmp.replace(dest)
    card = ckpt.with_suffix(".md")
    if card.is_file():
        atomic.write_text(models / f"{method}.md", card.read_text())
    LOGGER.info("--dl-adapt: %s adapted in %.0f s -> %s", method, record["_seconds"], dest)
    return dest
