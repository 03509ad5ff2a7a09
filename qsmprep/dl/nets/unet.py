"""3D U-Net for dipole inversion with pluggable normalisation, activation and first layer.

Encoder: ``depth`` levels of two 3x3x3 conv + norm + activation blocks with ``base_channels *
2**l`` channels, 2x2x2 max-pooling between levels (``depth - 1`` poolings). Decoder:
nearest-neighbour upsampling by 2, a 3x3x3 conv + norm + activation that halves the channels,
concatenation with the encoder features of the same level (skip connection) and two 3x3x3 conv
blocks. A final 1x1x1 conv (linear, with bias) gives the output channels. The spatial size of
the input must be a multiple of ``2**(depth - 1)``.

Normalisation: ``"batch"`` (:class:`torch.nn.BatchNorm3d`), ``"dsbn"``
(:class:`~qsmprep.dl.nets.dsbn.DomainBatchNorm3d`), ``"instance"`` (affine
:class:`torch.nn.InstanceNorm3d`) or ``"none"`` (convs then carry a bias). Convolutions that
feed a norm layer have no bias (it would be removed by the norm).

Reference: Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for biomedical
image segmentation. MICCAI 2015, LNCS 9351:234-241; Cicek O, Abdulkadir A, Lienkamp SS, Brox
T, Ronneberger O. 3D U-Net: learning dense volumetric segmentation from sparse annotation.
MICCAI 2016, LNCS 9901:424-432. For QSM: Yoon J, et al. Quantitative susceptibility mapping
using deep neural network: QSMnet. NeuroImage 2018;179:199-206.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qsmprep.dl.nets.adaptive import AdaptiveConv3d, check_side
from qsmprep.dl.nets.blocks import apply_norm, make_activation, make_norm
from qsmprep.dl.nets.dsbn import DOMAINS

__all__ = ["ConvBlock", "UNet3d"]


class ConvBlock(nn.Module):
    """Two ``conv 3x3x3 -> norm -> activation`` layers (the first may be adaptive)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str,
        activation: str,
        *,
        first: nn.Module | None = None,
    ):
        super().__init__()
        bias = norm == "none"
        self.conv1 = first or nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_channels)
        self.act2 = make_activation(activation)

    def forward(self, x, side=None, domain=None):
        if isinstance(self.conv1, AdaptiveConv3d):
            x = self.conv1(x, side)
        else:
            x = self.conv1(x)
        x = self.act1(apply_norm(self.norm1, x, domain))
        return self.act2(apply_norm(self.norm2, self.conv2(x), domain))


class UpBlock(nn.Module):
    """Nearest-neighbour upsampling by 2, then ``conv 3x3x3 -> norm -> activation``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, activation: str):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=norm == "none")
        self.norm = make_norm(norm, out_channels)
        self.act = make_activation(activation)

    def forward(self, x, domain=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.act(apply_norm(self.norm, self.conv(x), domain))


class UNet3d(nn.Module):
    """3D U-Net built from a config dict (see :func:`qsmprep.dl.nets.default_config`).

    ``forward(x, side=None, domain=None)`` maps ``(B, in_channels, X, Y, Z)`` to
    ``(B, out_channels, X, Y, Z)``; ``X, Y, Z`` must be multiples of :attr:`multiple`.

    * ``side`` — ``(B, 6)`` side information, required when ``config["arch"] ==
      "adaptive"`` (first encoder conv is an :class:`AdaptiveConv3d`), ignored otherwise.
    * ``domain`` — ``"source"``/``"target"`` for DSBN layers; ``None`` uses
      :attr:`default_domain`. Other norms ignore it.

    Build it with :func:`qsmprep.dl.nets.build_model`, which validates the config.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        depth = int(c["depth"])
        chans = [int(c["base_channels"]) * 2**level for level in range(depth)]
        norm, act = c["norm"], c["activation"]
        first = None
        if c["arch"] == "adaptive":
            first = AdaptiveConv3d(
                int(c["in_channels"]),
                chans[0],
                3,
                n_side=int(c["n_side"]),
                hidden=tuple(c["fmn_hidden"]),
                activation=act,
            )
        self.encoder = nn.ModuleList()
        prev = int(c["in_channels"])
        for level, ch in enumerate(chans):
            block = ConvBlock(prev, ch, norm, act, first=first if level == 0 else None)
            self.encoder.append(block)
            prev = ch
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(depth - 2, -1, -1):
            self.up.append(UpBlock(chans[level + 1], chans[level], norm, act))
            self.decoder.append(ConvBlock(2 * chans[level], chans[level], norm, act))
        self.final = nn.Conv3d(chans[0], int(c["out_channels"]), 1)

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this: ``2 ** (depth - 1)``."""
        return 2 ** (int(self.config["depth"]) - 1)

    @property
    def arch(self) -> str:
        return self.config["arch"]

    @property
    def needs_side(self) -> bool:
        """True when :meth:`forward` requires side information (adaptive model)."""
        return self.config["arch"] == "adaptive"

    @property
    def default_domain(self) -> str:
        """Domain used by DSBN layers when ``domain=None`` (stored in the config)."""
        return self.config.get("default_domain", DOMAINS[0])

    @default_domain.setter
    def default_domain(self, value: str) -> None:
        if value not in DOMAINS:
            raise ValueError(f"default_domain must be one of {DOMAINS}, got {value!r}")
        self.config["default_domain"] = value

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(B, in_channels, X, Y, Z)`` on the right grid."""
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(getattr(x, "shape", ()))
            raise ValueError(f"input must be a (B, C, X, Y, Z) tensor, got shape {shape}")
        cin = int(self.config["in_channels"])
        if x.shape[1] != cin:
            raise ValueError(
                f"input has {x.shape[1]} channels, the model expects {cin} "
                "([scaled field * mask, mask])"
            )
        m = self.multiple
        spatial = tuple(int(n) for n in x.shape[2:])
        if any(n < m or n % m for n in spatial):
            raise ValueError(
                f"spatial shape {spatial} is not a multiple of {m} (2**(depth-1) for depth "
                f"{self.config['depth']}) in every axis, or smaller than {m}; zero-pad the volume "
                "to a multiple (qsmprep.dl.inference.predict does) or use a smaller depth"
            )

    def forward(self, x: torch.Tensor, side=None, domain: str | None = None) -> torch.Tensor:
        self.check_input(x)
        if self.needs_side:
            side = check_side(side, x.shape[0], int(self.config["n_side"]))
        if domain is None:
            domain = self.default_domain
        elif domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; use one of {DOMAINS} or None")
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x, side if level == 0 else None, domain)
            if level < len(self.encoder) - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for up, block in zip(self.up, self.decoder, strict=True):
            x = up(x, domain)
            x = block(torch.cat([skips.pop(), x], dim=1), None, domain)
        return self.final(x)

    def param_groups_for_transfer(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split for transfer learning: ``{"fmn", "encoder", "decoder"}``.

        ``fmn``: the filter-manifold network of the adaptive first conv (empty otherwise);
        ``encoder``: the rest of the down path and the bottleneck; ``decoder``: the up path
        (upsampling convs, decoder blocks) and the final 1x1x1 conv. Each parameter is in
        exactly one group.
        """
        fmn = []
        first = self.encoder[0].conv1
        if isinstance(first, AdaptiveConv3d):
            fmn = list(first.parameters())
        fmn_ids = {id(p) for p in fmn}
        encoder = [p for p in self.encoder.parameters() if id(p) not in fmn_ids]
        decoder = [*self.up.parameters(), *self.decoder.parameters(), *self.final.parameters()]
        return {"fmn": fmn, "encoder": encoder, "decoder": decoder}
