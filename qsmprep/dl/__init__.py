"""Deep-learning dipole inversion: networks, losses, inference and checkpoints (torch).

Importing :mod:`qsmprep.dl` is cheap; torch is imported when one of the names below is first
used (lazy attributes), so the rest of qsmprep never pays for it.

Conventions: tensors are ``(B, C, X, Y, Z)`` float32 with array axes = NIfTI voxel axes. Network
inputs are ``[local field (ppm) * field_scale * mask, mask]``; network output divided by
``chi_scale`` is chi in ppm. Side information for the adaptive model is ``(B, 6)``:
``[voxel size x, y, z (mm), B0 unit vector in voxel axes]``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ARCHS": "qsmprep.dl.nets",
    "DOMAINS": "qsmprep.dl.nets",
    "build_model": "qsmprep.dl.nets",
    "default_config": "qsmprep.dl.nets",
    "supervised_loss": "qsmprep.dl.losses",
    "gradient_loss": "qsmprep.dl.losses",
    "data_consistency_loss": "qsmprep.dl.losses",
    "dipole_kernel_torch": "qsmprep.dl.losses",
    "dc_weight": "qsmprep.dl.losses",
    "predict": "qsmprep.dl.inference",
    "resolve_device": "qsmprep.devices",
    "save_checkpoint": "qsmprep.dl.checkpoint",
    "load_checkpoint": "qsmprep.dl.checkpoint",
    "write_model_card": "qsmprep.dl.checkpoint",
    "file_sha256": "qsmprep.dl.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qsmprep.dl' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
