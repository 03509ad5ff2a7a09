"""Layers shared by the networks: activations and normalisations by name.

Used by the U-Net (:mod:`qsmprep.dl.nets.unet`) and the filter-manifold network of the
adaptive convolution (:mod:`qsmprep.dl.nets.adaptive`); this module imports neither.

Normalisation: ``"batch"`` (:class:`torch.nn.BatchNorm3d`), ``"dsbn"``
(:class:`~qsmprep.dl.nets.dsbn.DomainBatchNorm3d`), ``"instance"`` (affine
:class:`torch.nn.InstanceNorm3d`) or ``"none"`` (:class:`torch.nn.Identity`).
"""

from __future__ import annotations

import torch
from torch import nn

from qsmprep.dl.nets.dsbn import DOMAINS, DomainBatchNorm3d

__all__ = ["ACTIVATIONS", "NORMS", "apply_norm", "make_activation", "make_norm"]

ACTIVATIONS = ("elu", "relu", "leaky_relu")
NORMS = ("batch", "dsbn", "instance", "none")


def make_activation(name: str) -> nn.Module:
    """Activation layer by name: ``"elu"``, ``"relu"`` or ``"leaky_relu"`` (slope 0.1)."""
    if name == "elu":
        return nn.ELU(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    raise ValueError(f"unknown activation {name!r}; use one of {ACTIVATIONS}")


def make_norm(name: str, channels: int) -> nn.Module:
    """Normalisation layer by name (see :data:`NORMS`)."""
    if name == "batch":
        return nn.BatchNorm3d(channels)
    if name == "dsbn":
        return DomainBatchNorm3d(channels, DOMAINS)
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {name!r}; use one of {NORMS}")


def apply_norm(layer: nn.Module, x: torch.Tensor, domain: str | None) -> torch.Tensor:
    """``layer(x)``, with the domain for a :class:`~qsmprep.dl.nets.dsbn.DomainBatchNorm3d`."""
    if isinstance(layer, DomainBatchNorm3d):
        return layer(x, domain)
    return layer(x)
