"""Forward model: susceptibility to field by k-space dipole convolution."""

from __future__ import annotations

import numpy as np

from qsmprep.recon._backend import asarray, irfftn, rfftn, to_numpy
from qsmprep.recon._checks import check_b0_dir, check_finite, check_volume, check_voxel_size
from qsmprep.recon.kernels import crop, dipole_kernel, dipole_kernel_fd, padded_shape

__all__ = ["forward_field"]


def forward_field(
    chi,
    voxel_size,
    b0_dir=(0.0, 0.0, 1.0),
    *,
    pad: int | tuple[int, int, int] | None = None,
    kernel: str = "continuous",
    device: str | None = "cpu",
) -> np.ndarray:
    """Field perturbation of a susceptibility distribution, ``f = F^-1{ D F{chi} }``.

    Parameters
    ----------
    chi : (X, Y, Z) array
        Susceptibility (ppm, SI) relative to the medium outside the array: the array is
        zero-padded, so give ``chi - chi_outside``.
    voxel_size : float or 3 floats
        mm.
    b0_dir : 3 floats
        B0 direction in voxel coordinates.
    pad : int or 3 ints, optional
        Zero-padding in voxels per axis; default the array size (a 2N grid), which keeps the
        wrap-around of the slowly decaying dipole field below 1 % of its peak.
    kernel : {"continuous", "fd"}
        :func:`~qsmprep.recon.kernels.dipole_kernel` (default) or the finite-difference
        :func:`~qsmprep.recon.kernels.dipole_kernel_fd` (no Nyquist ringing for oblique B0).

    Returns
    -------
    field : (X, Y, Z) float64 array, relative field ``dB_z / B0`` in ppm (multiply by
        ``GAMMA_BAR * B0 * 1e-6`` for Hz). Positive chi gives a positive field along B0.
    """
    check_volume(chi, "chi")
    check_finite(chi, "chi")
    vs = check_voxel_size(voxel_size)
    b = check_b0_dir(b0_dir)
    shape = tuple(chi.shape)
    grid = padded_shape(shape, shape if pad is None else pad)
    x = asarray(chi, device=device, dtype=np.float64)
    if kernel not in ("continuous", "fd"):
        raise ValueError(f"kernel must be 'continuous' or 'fd', got {kernel!r}")
    make = dipole_kernel if kernel == "continuous" else dipole_kernel_fd
    d = make(grid, vs, b, device=device, dtype=np.float64)
    f = irfftn(d * rfftn(x, s=grid), s=grid)
    return to_numpy(crop(f, shape))
