"""Domain-specific batch normalisation (DSBN) for 3D feature maps.

Every batch-norm layer keeps one copy per domain (separate running mean/variance and separate
affine scale/shift); all other weights of the network are shared. A call normalises the whole
batch with the copy of one domain, so mixed training uses single-domain batches (or one forward
pass per domain).

Reference: Chang W-G, You T, Seo S, Kwak S, Han B. Domain-specific batch normalization for
unsupervised domain adaptation. Proc IEEE/CVF CVPR 2019.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DOMAINS", "DomainBatchNorm3d", "dsbn_state_from_batchnorm"]

DOMAINS = ("source", "target")
"""Domain names; index 0 (``"source"``) is the labelled synthetic domain."""


class DomainBatchNorm3d(nn.Module):
    """Batch normalisation with one :class:`torch.nn.BatchNorm3d` per domain.

    ``y = gamma_d (x - mu_d) / sqrt(var_d + eps) + beta_d`` where ``d`` is the domain of the
    batch; in training mode ``mu_d, var_d`` are the batch statistics and the running statistics
    of domain ``d`` alone are updated.

    Parameters
    ----------
    num_features : int
        Channels ``C`` of the ``(B, C, X, Y, Z)`` input.
    domains : sequence of str
        Domain names (default :data:`DOMAINS`); the first is the default domain.
    **bn_kwargs
        Passed to every :class:`torch.nn.BatchNorm3d` (``eps``, ``momentum``...).
    """

    def __init__(self, num_features: int, domains: Sequence[str] = DOMAINS, **bn_kwargs):
        super().__init__()
        domains = tuple(domains)
        if not domains or len(set(domains)) != len(domains):
            raise ValueError(f"domains must be distinct names, got {domains!r}")
        self.domains = domains
        self.num_features = int(num_features)
        self.bns = nn.ModuleDict({d: nn.BatchNorm3d(num_features, **bn_kwargs) for d in domains})

    def check_domain(self, domain: str | None) -> str:
        """``domain`` (``None`` = the first domain) checked against :attr:`domains`."""
        if domain is None:
            return self.domains[0]
        if domain not in self.bns:
            raise ValueError(f"unknown domain {domain!r}; use one of {self.domains}")
        return domain

    def forward(self, x: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        return self.bns[self.check_domain(domain)](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, domains={self.domains}"


def dsbn_state_from_batchnorm(bn_state: dict, dsbn_state: dict) -> dict:
    """A DSBN network's state dict filled from the state of the same network with plain BN.

    Every ``<layer>.bns.<domain>.<tensor>`` of ``dsbn_state`` takes ``<layer>.<tensor>`` of
    ``bn_state`` (each domain starts from the one set of statistics and affine parameters);
    every other key is copied as is. This starts QSMInvNet+ from a U-Net pre-trained on
    synthetic data, so that it gets the same synthetic training as the other adapted networks.

    Raises
    ------
    ValueError
        When the two networks differ in anything but their normalisation layers.
    """
    out, used = {}, set()
    for key, ref in dsbn_state.items():
        parts = key.split(".")
        src = key
        if "bns" in parts:
            i = parts.index("bns")
            src = ".".join(parts[:i] + parts[i + 2 :])
        if src not in bn_state:
            raise ValueError(f"the batch-norm network has no {src!r} (for {key!r})")
        value = bn_state[src]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"{src!r} has shape {tuple(value.shape)}, "
                f"the DSBN network needs {tuple(ref.shape)}"
            )
        out[key] = value.detach().clone().to(ref.dtype)
        used.add(src)
    extra = sorted(set(bn_state) - used)
    if extra:
        raise ValueError(f"the batch-norm network has tensors the DSBN one lacks: {extra}")
    return out
