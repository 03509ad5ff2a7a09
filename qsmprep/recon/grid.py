"""The FFT grid of the k-space methods: the mask's bounding box, zero-padded.

Background removal (:mod:`qsmprep.recon.background`) and the dipole inversions
(:mod:`qsmprep.recon.inversion`) crop the data to the bounding box of the mask and zero-pad
it before any transform (:class:`Grid`): the FFTs stay small, and a kernel that reaches no
further than the padding never wraps one side of the box onto the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qsmprep.recon._backend import asarray, to_numpy
from qsmprep.recon.kernels import padded_shape

__all__ = ["Grid", "pad_voxels", "spectrum_mean"]


@dataclass
class Grid:
    """Bounding box of the mask (``box``, slices into the full volume) inside an FFT grid.

    The cropped data sit at the start of a grid of shape ``grid`` (``>= box + pad`` on every
    axis, a fast FFT length); the rest is zero. A kernel that reaches ``pad`` voxels or less
    therefore never wraps around onto the box.
    """

    full: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    grid: tuple[int, int, int]
    device: str | None

    @classmethod
    def around(cls, mask: np.ndarray, pad, device) -> Grid:
        """The grid of the bounding box of ``mask`` padded by ``pad`` voxels (one or 3)."""
        idx = np.nonzero(mask)
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        n = tuple(s.stop - s.start for s in box)
        return cls(tuple(mask.shape), box, padded_shape(n, pad), device)

    @property
    def n(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)

    def embed(self, x: np.ndarray, dtype=np.float32):
        """Crop a full-size NumPy volume to the box and zero-pad it to the grid (on device)."""
        out = np.zeros(self.grid, dtype=dtype)
        n = self.n
        out[: n[0], : n[1], : n[2]] = x[self.box]
        return asarray(out, device=self.device, dtype=dtype)

    def extract(self, x, dtype=np.float32) -> np.ndarray:
        """A grid volume (any backend) back to a full-size NumPy volume, zero outside the box."""
        out = np.zeros(self.full, dtype=dtype)
        n = self.n
        out[self.box] = to_numpy(x[: n[0], : n[1], : n[2]])
        return out


def pad_voxels(pad, voxel_size, default_mm: float) -> tuple[int, int, int]:
    """``pad`` as voxels per axis (one or 3 whole numbers); ``None`` gives ``default_mm``
    millimetres rounded up to whole voxels."""
    if pad is None:
        return tuple(int(math.ceil(default_mm / d)) for d in voxel_size)
    p = np.broadcast_to(np.asarray(pad), (3,))
    if not np.all(np.isfinite(p.astype(float))) or np.any(p < 0) or np.any(p != np.round(p)):
        raise ValueError(f"pad must be a non-negative number of voxels (one or 3), got {pad!r}")
    return tuple(int(v) for v in p)


def spectrum_mean(p, shape: Sequence[int]) -> float:
    """Mean over the full spectrum of a real, even function given on the rfft half spectrum."""
    a = np.asarray(to_numpy(p), dtype=np.float64)
    nz = int(shape[-1])
    w = np.full(a.shape[-1], 2.0)
    w[0] = 1.0
    if nz % 2 == 0:
        w[-1] = 1.0  # the Nyquist plane is its own mirror
    return float((a * w).sum() / math.prod(int(n) for n in shape))
