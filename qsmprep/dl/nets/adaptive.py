"""Adaptive convolution: conv weights generated per sample from side information.

A small fully connected *filter-manifold network* (FMN) maps the side information of each
sample, here ``[voxel size (mm) x3, B0 unit vector in voxel axes x3]``, to the full kernel
and bias of a 3D convolution, ``(W, b) = g_theta(z)``. A batch is convolved in one call by
folding the batch into the channel axis and using a grouped convolution with one group per
sample.

References
----------
Kang D, Dhar D, Chan AB. Incorporating side information by adaptive convolution. Advances in
Neural Information Processing Systems 30 (NeurIPS 2017).
Side information for QSM (voxel size and B0 direction feeding the first layer) as proposed by
Graf et al. in ISMRM 2023/2024 abstracts (not verified here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qsmprep.dl.nets.blocks import make_activation

__all__ = ["AdaptiveConv3d", "FilterManifoldNetwork", "check_side", "side_features"]

N_SIDE = 6


def check_side(side, batch: int, n_side: int = N_SIDE) -> torch.Tensor:
    """Validate side information: a finite ``(batch, n_side)`` tensor with positive voxel sizes.

    Raises a ValueError that says what to pass when ``side`` is missing or malformed.
    """
    what = (
        f"pass side=(B, {n_side}) tensor [voxel_size_x, voxel_size_y, voxel_size_z (mm), "
        "b0_x, b0_y, b0_z (unit B0 vector in voxel axes)]"
    )
    if side is None:
        raise ValueError(f"the adaptive model needs side information: {what}")
    if not isinstance(side, torch.Tensor):
        side = torch.as_tensor(side, dtype=torch.float32)
    if side.ndim == 1:
        side = side[None]
    if side.ndim != 2 or side.shape[1] != n_side or side.shape[0] not in (1, batch):
        raise ValueError(f"side has shape {tuple(side.shape)} for a batch of {batch}; {what}")
    if not bool(torch.isfinite(side).all()):
        raise ValueError(f"side information has non-finite values; {what}")
    if n_side >= 3 and not bool((side[:, :3] > 0).all()):
        raise ValueError(f"voxel sizes in the side information must be positive (mm); {what}")
    return side.expand(batch, n_side)


def side_features(side: torch.Tensor) -> torch.Tensor:
    """FMN input from raw side information: ``[log voxel size, +-b0]``.

    The logarithm centres typical voxel sizes (0.5-3 mm) on zero. The dipole kernel depends on
    ``b b^T`` only, so ``b`` and ``-b`` describe the same acquisition: the B0 vector is flipped
    to a non-negative z component (unit length restored) so that both give the same kernels.
    """
    vs = side[:, :3].clamp_min(1e-6).log()
    rest = side[:, 3:]
    if rest.shape[1] == 3:
        sign = torch.where(rest[:, 2:3] < 0, -1.0, 1.0).to(rest.dtype)
        rest = rest * sign
        rest = rest / rest.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.cat([vs, rest], dim=1)


class FilterManifoldNetwork(nn.Module):
    """Four fully connected layers from side information to a conv kernel and bias.

    ``z -> Linear(n_side, h1) -> act -> Linear(h1, h2) -> act -> Linear(h2, h3) -> act ->
    Linear(h3, Cout*Cin*k^3 + Cout)``, reshaped to ``weight (B, Cout, Cin, k, k, k)`` and
    ``bias (B, Cout)``.

    Initialisation: hidden layers are He-initialised (zero bias) so that their activations keep
    unit scale; the bias of the last layer holds a He-initialised (Kaiming normal, fan-in)
    kernel and a zero conv bias, and its weight is scaled down (``init_scale``, relative to the
    He standard deviation), so the generated kernel starts as a conventional He-initialised
    conv plus a small side-information dependent change (a few percent of its norm between
    typical acquisitions).

    Parameters
    ----------
    n_side : int
        Length of the side-information vector (6).
    out_channels, in_channels, kernel_size : int
        Shape of the generated kernel.
    hidden : 3 ints
        Widths of the three hidden layers.
    activation : str
        ``"elu"``, ``"relu"`` or ``"leaky_relu"``.
    init_scale : float
        Standard deviation of the initial side-dependent part of the kernel relative to the He
        standard deviation ``sqrt(2 / (Cin k^3))`` (per unit of hidden activation).
    """

    def __init__(
        self,
        n_side: int,
        out_channels: int,
        in_channels: int,
        kernel_size: int = 3,
        hidden: Sequence[int] = (64, 64, 64),
        *,
        activation: str = "elu",
        init_scale: float = 0.1,
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if len(hidden) != 3 or min(hidden) < 1:
            raise ValueError(f"hidden must be 3 positive widths (4 layers), got {hidden!r}")
        self.n_side = int(n_side)
        self.out_channels = int(out_channels)
        self.in_channels = int(in_channels)
        self.kernel_size = int(kernel_size)
        k3 = self.kernel_size**3
        self.n_weight = self.out_channels * self.in_channels * k3
        widths = (self.n_side, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), make_activation(activation)]
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(hidden[-1], self.n_weight + self.out_channels)
        he_std = math.sqrt(2.0 / (self.in_channels * k3))
        with torch.no_grad():
            for layer in self.hidden:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    layer.bias.zero_()
            self.head.weight.normal_(0.0, init_scale * he_std / math.sqrt(hidden[-1]))
            self.head.bias.zero_()
            self.head.bias[: self.n_weight].normal_(0.0, he_std)

    def forward(self, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.hidden(side_features(side)))
        b = side.shape[0]
        k = self.kernel_size
        weight = out[:, : self.n_weight].reshape(b, self.out_channels, self.in_channels, k, k, k)
        bias = out[:, self.n_weight :]
        return weight, bias


class AdaptiveConv3d(nn.Module):
    """3D convolution whose kernel and bias come from a :class:`FilterManifoldNetwork`.

    ``y_b = W(z_b) * x_b + b(z_b)`` for each sample ``b``, computed for the whole batch as one
    grouped convolution: ``conv3d(x.view(1, B Cin, ...), W.view(B Cout, Cin, k, k, k),
    groups=B)``. Zero padding keeps the spatial size (odd ``kernel_size``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        n_side: int = N_SIDE,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "elu",
        init_scale: float = 0.1,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.n_side = int(n_side)
        self.fmn = FilterManifoldNetwork(
            n_side,
            out_channels,
            in_channels,
            kernel_size,
            hidden,
            activation=activation,
            init_scale=init_scale,
        )

    def forward(self, x: torch.Tensor, side) -> torch.Tensor:
        b, c = x.shape[:2]
        if c != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {c}")
        side = check_side(side, b, self.n_side).to(device=x.device, dtype=torch.float32)
        weight, bias = self.fmn(side)
        weight = weight.to(x.dtype).reshape(b * self.out_channels, c, *weight.shape[-3:])
        y = F.conv3d(
            x.reshape(1, b * c, *x.shape[2:]),
            weight,
            bias.to(x.dtype).reshape(-1),
            padding=self.kernel_size // 2,
            groups=b,
        )
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"n_side={self.n_side}"
        )
