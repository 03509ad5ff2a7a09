"""Networks for deep-learning dipole inversion: U-Net, DSBN U-Net, adaptive-convolution U-Net.

All models map ``(B, 2, X, Y, Z)`` inputs ``[field_ppm * field_scale * mask, mask]`` to
``(B, 1, X, Y, Z)`` outputs ``chi_ppm * chi_scale``, with ``forward(x, side=None,
domain=None)``; see :class:`~qsmprep.dl.nets.unet.UNet3d`.

Architectures (``config["arch"]``):

``"unet"``
    conventional 3D U-Net with batch norm (QSMnet/DeepQSM-style baseline);
``"dsbn"``
    the same U-Net with every batch norm replaced by a
    :class:`~qsmprep.dl.nets.dsbn.DomainBatchNorm3d` (QSMInvNet+);
``"adaptive"``
    the U-Net whose first encoder conv is an
    :class:`~qsmprep.dl.nets.adaptive.AdaptiveConv3d` fed with ``side = [voxel size (mm) x3,
    B0 unit vector in voxel axes x3]``.
"""

from __future__ import annotations

from qsmprep.dl.nets.adaptive import AdaptiveConv3d, FilterManifoldNetwork
from qsmprep.dl.nets.blocks import ACTIVATIONS, NORMS
from qsmprep.dl.nets.dsbn import DOMAINS, DomainBatchNorm3d
from qsmprep.dl.nets.unet import UNet3d

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "DOMAINS",
    "NORMS",
    "AdaptiveConv3d",
    "DomainBatchNorm3d",
    "FilterManifoldNetwork",
    "UNet3d",
    "build_model",
    "default_config",
]

ARCHS = ("unet", "dsbn", "adaptive")

_COMMON = {
    "in_channels": 2,
    "out_channels": 1,
    "base_channels": 16,
    "depth": 5,
    "activation": "elu",
    "field_scale": 10.0,
    "chi_scale": 10.0,
    "n_side": 6,
    "default_domain": "source",
}
_NORM = {"unet": "batch", "dsbn": "dsbn", "adaptive": "batch"}


def default_config(arch: str, **overrides) -> dict:
    """Complete, validated model config for ``arch`` with ``overrides`` applied.

    Keys: ``arch``; ``in_channels`` (2); ``out_channels`` (1); ``base_channels`` (16);
    ``depth`` (5 levels, 4 poolings, spatial multiple 16); ``activation`` (``"elu"``,
    ``"relu"``, ``"leaky_relu"``); ``norm`` (``"batch"`` for unet/adaptive, ``"dsbn"`` for dsbn;
    also ``"instance"``, ``"none"``); ``field_scale`` (10: network input = local field in ppm
    times this); ``chi_scale`` (10: chi in ppm = network output divided by this); ``n_side``
    (6); ``default_domain`` (``"source"``; DSBN layers use it when no domain is given, set to
    ``"target"`` after adaptation); ``fmn_hidden`` ((64, 64, 64), adaptive only).

    Raises ValueError for an unknown arch, unknown keys or invalid values.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    cfg = {"arch": arch, **_COMMON, "norm": _NORM[arch]}
    if arch == "adaptive":
        cfg["fmn_hidden"] = (64, 64, 64)
    unknown = sorted(set(overrides) - set(cfg) - {"fmn_hidden"})
    if unknown:
        raise ValueError(
            f"unknown model config keys {unknown}; valid keys are {sorted({*cfg, 'fmn_hidden'})}"
        )
    cfg.update(overrides)
    if "fmn_hidden" in cfg:
        cfg["fmn_hidden"] = tuple(int(h) for h in cfg["fmn_hidden"])
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    for key in ("in_channels", "out_channels", "base_channels", "depth", "n_side"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config[{key!r}] must be a positive integer, got {v!r}")
    if cfg["depth"] < 2:
        raise ValueError(f"config['depth'] must be at least 2 (levels), got {cfg['depth']}")
    if cfg["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"config['activation'] must be one of {ACTIVATIONS}, got {cfg['activation']!r}"
        )
    if cfg["norm"] not in NORMS:
        raise ValueError(f"config['norm'] must be one of {NORMS}, got {cfg['norm']!r}")
    if cfg["arch"] == "dsbn" and cfg["norm"] != "dsbn":
        raise ValueError(f"arch 'dsbn' needs norm 'dsbn', got {cfg['norm']!r}")
    for key in ("field_scale", "chi_scale"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"config[{key!r}] must be a positive number, got {v!r}")
        cfg[key] = float(v)
    if cfg["default_domain"] not in DOMAINS:
        raise ValueError(
            f"config['default_domain'] must be one of {DOMAINS}, got {cfg['default_domain']!r}"
        )
    if cfg["arch"] == "adaptive":
        hid = cfg["fmn_hidden"]
        if len(hid) != 3 or min(hid) < 1:
            raise ValueError(f"config['fmn_hidden'] must be 3 positive widths, got {hid!r}")


def build_model(config: dict) -> UNet3d:
    """Build the model described by ``config`` (missing keys take :func:`default_config` values).

    Raises ValueError for an unknown arch, unknown keys or invalid values.
    """
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError(f"config must be a dict with an 'arch' key (one of {ARCHS})")
    rest = {k: v for k, v in config.items() if k != "arch"}
    return UNet3d(default_config(config["arch"], **rest))
