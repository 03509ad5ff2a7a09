"""Training protocols of the recipe: our defaults and the published ones, as data.

``qsmprep-train recipe OUT --protocol NAME`` (``run_recipe(..., protocol=NAME)``) trains the
models of one protocol. A protocol is a dict:

``title``, ``citation``
    What it is and where it was published (None for our own).
``models``
    ``[(name, base), ...]``: the models it trains, in order; ``base`` names the row of
    :data:`qsmprep.app.recipe.STAGES` (method, arch, init, stage, description) that the model
    starts from. None: every row of ``STAGES`` under its own name.
``overrides``
    ``{key: {setting: value}}`` applied over the recipe's configuration in this order: ``"*"``
    (every model), the stage (``"pretrain"``, ``"adapt"``, ``"transfer"``), the base row's
    name, the model's name. A setting is a :class:`~qsmprep.dl.train.TrainConfig` field (the
    value replaces the recipe's; ``synth`` too, so two models given the same ``synth`` draw the
    same batches) or one of :data:`SPECIAL`.
``target``
    How the target heads are simulated, beyond the profile: ``voxel_sizes`` (mm, given to the
    subjects in turn, the field of view kept) and ``orientations`` (head rotations, degrees
    about world x and y; COSMOS of each subject's set is the transfer-learning label). Empty:
    2 mm heads at :data:`qsmprep.app.recipe.ORIENTATIONS`.
``deviations``
    ``[(setting, value, why), ...]``: one line per departure from our defaults, and why the
    paper did it (the table of ``docs/deep-learning.md``, "Protocols"). The model cards'
    command lines name the protocol.

The ``qsmprep`` protocol is empty: it gives exactly the configurations of the recipe without a
protocol (tested).
"""

from __future__ import annotations

import dataclasses

__all__ = ["PROTOCOLS", "SPECIAL", "PAPER2_SYNTH", "check_protocol", "protocol_models"]

SPECIAL = {
    "model": "network options merged into the recipe's (models built from scratch only)",
    "init": "model name to start from, or None for scratch (replaces the base row's)",
    "budget": "which profile step count to use: 'pretrain', 'adapt' or 'transfer'",
    "restart_cycles": "cosine periods in the run: restart_steps = steps / sum(mult^k), k < n",
    "description": "registry description (replaces the base row's)",
}
"""Override keys that are not :class:`~qsmprep.dl.train.TrainConfig` fields."""

PAPER2_SYNTH = {
    "kind": "shapes",
    "voxel_size": ((0.5, 2.5), (0.5, 2.5), (0.5, 3.5)),
    "b0_dir": "random",
    "max_tilt_deg": 45.0,
    "flip_prob": 0.5,
}
"""Synthetic data of both paper-2 networks: anatomy-free shapes, the adaptive network's
voxel-size and B0-tilt ranges (:data:`qsmprep.dl.train.ADAPTIVE_SYNTH`) and random flips."""

LAMBDAS = (0.1, 1.0, 10.0)
"""The paper-1 sweep of the weight of ``L_T`` (log-spaced about our default 1; the values of
the paper were not available to us)."""


def _lam(v: float) -> str:
    return f"dsbn-lam{v:g}"


PROTOCOLS: dict[str, dict] = {
    "qsmprep": {
        "title": "qsmprep's defaults (the shipped models)",
        "citation": None,
        "models": None,
        "overrides": {},
        "target": {},
        "deviations": [],
    },
    "paper1": {
        "title": "QSMInvNet+ (domain-specific batch norm) as published",
        "citation": (
            "Liu J, Koch KM. Exploring domain adaption for deep neural network trained QSM. "
            "Proc ISMRM 2021:3980; arXiv:2206.13225"
        ),
        "models": [("unet-pretrained", "unet-pretrained"), ("dcfinetune", "dcfinetune")]
        + [(_lam(v), "dsbn") for v in LAMBDAS],
        "overrides": {
            "*": {
                "loss": "l2",
                "lr": 1e-4,
                "weight_decay": 0.0,
                "model": {"activation": "relu"},
                "synth": {
                    "kind": "brain",
                    "voxel_size": ((1.0, 2.0),) * 3,
                    "isotropic": True,
                    "background_ppm": (0.0, 0.004),
                },  # fmt: skip
            },
            "dsbn": {"init": None, "budget": "pretrain"},
            **{
                _lam(v): {
                    "lambda_max": v,
                    "description": f"QSMInvNet+ as published (paper 1), lambda {v:g}: "
                    "domain-specific batch norm, synthetic + unlabelled target scans",
                }
                for v in LAMBDAS
            },
        },
        "target": {},
        "deviations": [
            ("loss", "l2", "the paper's supervised loss is the mean squared error"),
            (
                "optimiser",
                "Adam, lr 1e-4 (AdamW with weight_decay 0)",
                "the paper trained with Adam at 1e-4; AdamW without decay is Adam",
            ),
            ("activation", "relu", "the paper's U-Net has ReLU layers"),
            (
                "synthetic data",
                "kind brain (1-2 mm, B0 along z)",
                "the paper simulated whole brains (one COSMOS map, elastic, contrast and lesion "
                "augmentation), not geometric shapes",
            ),
            (
                "dsbn",
                "from scratch, pre-training's step budget",
                "QSMInvNet+ is trained on synthetic and target data at once (L_S + lambda L_T), "
                "not adapted from a pre-trained U-Net",
            ),
            (
                "lambda",
                "sweep 0.1, 1, 10 (dsbn-lam0.1, dsbn-lam1, dsbn-lam10)",
                "the weight of L_T is the method's one free parameter; the paper tuned it",
            ),
            (
                "models",
                "unet-pretrained, dcfinetune, the dsbn sweep",
                "the paper compares QSMInvNet+ with QSMInvNet (pre-trained, then fine-tuned by "
                "data consistency)",
            ),
        ],
    },
    "paper2": {
        "title": "adaptive-convolution U-Net against a conventional U-Net, as published",
        "citation": (
            "Graf S, Wohlgemuth WA, Deistung A. Incorporating a-priori information in deep "
            "learning models for quantitative susceptibility mapping via adaptive convolution. "
            "Front Neurosci 2024;18:1366165 (adaptive convolution: Kang D, Dhar D, Chan AB, "
            "NeurIPS 2017)"
        ),
        "models": [
            ("unet-pretrained", "unet-pretrained"),
            ("adaptive-pretrained", "adaptive-pretrained"),
            ("adaptive", "adaptive"),
            ("unet", "unet"),
        ],
        "overrides": {
            "*": {"synth": PAPER2_SYNTH, "restart_cycles": 3, "restart_mult": 2},
        },
        "target": {
            "voxel_sizes": [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (2.0, 2.0, 3.0)],
            "orientations": [(0.0, 0.0), (15.0, 0.0), (-30.0, 0.0), (0.0, 15.0), (0.0, -30.0)],
        },
        "deviations": [
            (
                "synthetic data",
                "shapes; 0.5-2.5 (in-plane) and 0.5-3.5 mm voxels, B0 tilted "
                "up to 45 deg, for both networks",
                "the comparison isolates adaptive convolution: both networks see the same "
                "anatomy-free data (same draws, same seed); ours trains the U-Net on 1-2 mm "
                "cubic voxels with B0 along z, as it is used",
            ),
            (
                "flips",
                "flip_prob 0.5 per axis (B0 mirrored with the data)",
                "the paper augmented by random flips",
            ),
            (
                "learning-rate schedule",
                "3 cosine periods, each twice the last (restart_mult 2)",
                "the paper used cosine annealing with warm restarts; ours is one cosine",
            ),
            (
                "target heads",
                "1 x 1 x 1, 1 x 1 x 2 and 2 x 2 x 3 mm (subjects in turn), "
                "B0 tilts 0, 15 and 30 deg",
                "transfer learning on several voxel sizes and FOV tilts is what the side "
                "information is for; ours are 2 mm heads",
            ),
            (
                "reference",
                "COSMOS of each subject's tilted set",
                "the paper's transfer-learning labels were COSMOS maps",
            ),
            (
                "models",
                "unet-pretrained, adaptive-pretrained, adaptive, unet",
                "the paper's ablation: with and without adaptive convolution, with and without "
                "transfer learning",
            ),
        ],
    },
}
"""The training protocols of the recipe (see the module doc)."""


def protocol_models(protocol: str, stages) -> list[tuple[str, tuple]]:
    """``[(name, stage_row), ...]`` of a protocol, ``stage_row`` a row of ``stages``."""
    p = PROTOCOLS[protocol]
    rows = {row[0]: row for row in stages}
    if p["models"] is None:
        return [(row[0], row) for row in stages]
    return [(name, rows[base]) for name, base in p["models"]]


def overrides_for(protocol: str, name: str, row: tuple) -> dict:
    """The merged overrides of one model (``"*"``, stage, base row, model name)."""
    p = PROTOCOLS[protocol]["overrides"]
    out: dict = {}
    for key in ("*", row[4], row[0], name):
        for k, v in p.get(key, {}).items():
            out[k] = {**out.get(k, {}), **v} if k == "model" else v
    return out


def check_protocol(protocol: str, stages) -> None:
    """Raise ValueError when a protocol names an unknown setting, row or init model."""
    from qsmprep.dl.train import TrainConfig

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    names = {row[0] for row in stages}
    for key, over in PROTOCOLS[protocol]["overrides"].items():
        bad = sorted(set(over) - fields - set(SPECIAL))
        if bad:
            raise ValueError(f"protocol {protocol!r}, {key!r}: unknown settings {bad}")
    seen: set[str] = set()
    for name, base in PROTOCOLS[protocol]["models"] or [(r[0], r[0]) for r in stages]:
        if base not in names:
            raise ValueError(f"protocol {protocol!r}: {name!r} has no stage {base!r}")
        row = next(r for r in stages if r[0] == base)
        init = overrides_for(protocol, name, row).get("init", row[3])
        if init is not None and init not in seen:
            raise ValueError(f"protocol {protocol!r}: {name!r} starts from untrained {init!r}")
        seen.add(name)
