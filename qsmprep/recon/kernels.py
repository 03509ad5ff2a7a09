"""k-space kernels and grid helpers: dipole, spherical mean value, discrete Laplacian.

Conventions (``../docs`` and design.md):

* arrays are in NIfTI voxel order (i, j, k); k-space grids are built per axis with
  ``fftfreq(N_i, d=voxel_size_i)`` so anisotropic voxels and non-cubic matrices are exact;
* kernels are returned on the **half spectrum** of :func:`scipy.fft.rfftn` (last axis
  ``N_k // 2 + 1``) because every input they act on is real;
* the B0 direction is a unit vector in voxel coordinates, obtained from the NIfTI affine with
  :func:`b0_dir_from_affine`, never assumed to be the third array axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft

from qsmprep.recon._backend import asarray, rfftn
from qsmprep.recon._checks import check_b0_dir, check_voxel_size

__all__ = [
    "GAMMA_BAR",
    "b0_dir_from_affine",
    "crop",
    "dipole_kernel",
    "dipole_kernel_fd",
    "hz_to_ppm",
    "kspace_grid",
    "laplace_kernel",
    "padded_shape",
    "ppm_to_hz",
    "smv_kernel",
    "sphere_mask",
]

GAMMA_BAR = 42.57747892e6
"""Proton gyromagnetic ratio over 2 pi, in Hz/T (CODATA 2018)."""


def hz_to_ppm(field_hz, b0: float):
    """Field offset in Hz to ppm of the main field: ``f / (GAMMA_BAR * B0) * 1e6``.

    ``b0`` is the field strength in tesla (e.g. 1 ppm at 3 T is 127.7 Hz).
    """
    if not b0 > 0:
        raise ValueError(f"field strength must be positive (T), got {b0!r}")
    return field_hz * (1e6 / (GAMMA_BAR * b0))


def ppm_to_hz(field_ppm, b0: float):
    """Inverse of :func:`hz_to_ppm`."""
    if not b0 > 0:
        raise ValueError(f"field strength must be positive (T), got {b0!r}")
    return field_ppm * (GAMMA_BAR * b0 * 1e-6)


def b0_dir_from_affine(affine) -> tuple[float, float, float]:
    """Unit B0 direction in voxel coordinates from a NIfTI affine.

    B0 points along world (scanner) z. With ``R`` the rotation part of the affine (its columns
    divided by the voxel sizes, so the voxel-to-world direction matrix), the direction in voxel
    coordinates is ``R^T [0, 0, 1]``. Reflections (negative determinant, LAS storage) are
    handled: the result refers to the array as stored. Recompute it after any reorientation.
    """
    a = np.asarray(affine, dtype=float)
    if a.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"affine must be 4x4 (or its 3x3 part), got shape {a.shape}")
    m = a[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(m)):
        raise ValueError(f"affine has a zero or non-finite column: {m.tolist()}")
    r = m / norms
    return check_b0_dir(r.T @ np.array([0.0, 0.0, 1.0]))


def padded_shape(shape: Sequence[int], pad: int | Sequence[int] = 0) -> tuple[int, ...]:
    """Grid for FFT work: each axis grown by ``pad`` voxels, then to a fast FFT length.

    Data sit at the start of the padded grid (``rfftn(x, s=...)`` pads at the end), so ``pad``
    is the distance over which circular wrap-around is avoided.
    """
    pads = np.broadcast_to(np.asarray(pad, dtype=int), (len(shape),))
    if np.any(pads < 0):
        raise ValueError(f"pad must be non-negative, got {pad!r}")
    return tuple(
        int(sfft.next_fast_len(int(n + p), real=True)) for n, p in zip(shape, pads, strict=True)
    )


def crop(x, shape: Sequence[int]):
    """The leading ``shape`` block of the last three axes (undoes the padding of FFT work)."""
    return x[..., : shape[0], : shape[1], : shape[2]]


def kspace_grid(shape: Sequence[int], voxel_size, rfft: bool = True):
    """Per-axis spatial frequencies (cycles/mm) as broadcastable arrays ``(kx, ky, kz)``."""
    vs = check_voxel_size(voxel_size)
    nx, ny, nz = (int(n) for n in shape)
    kx = np.fft.fftfreq(nx, d=vs[0])[:, None, None]
    ky = np.fft.fftfreq(ny, d=vs[1])[None, :, None]
    if rfft:
        kz = np.fft.rfftfreq(nz, d=vs[2])[None, None, :]
    else:
        kz = np.fft.fftfreq(nz, d=vs[2])[None, None, :]
    return kx, ky, kz


def dipole_kernel(
    shape: Sequence[int],
    voxel_size,
    b0_dir=(0.0, 0.0, 1.0),
    *,
    rfft: bool = True,
    device: str | None = "cpu",
    dtype=np.float32,
):
    """Unit dipole kernel in k-space, ``D(k) = 1/3 - (k . b)^2 / |k|^2`` with ``D(0) = 0``.

    Parameters
    ----------
    shape : 3 ints
        Grid (usually padded, see :func:`padded_shape`).
    voxel_size : float or 3 floats
        Voxel size in mm; each axis gets ``k_i = n_i / (N_i * dx_i)``.
    b0_dir : 3 floats
        B0 direction in voxel coordinates (normalised here).
    rfft : bool
        Return the half spectrum of ``rfftn`` (default) or the full spectrum.

    Returns
    -------
    D : array of ``shape`` (half spectrum: last axis ``N // 2 + 1``), real, unitless.

    References
    ----------
    Salomir R, de Senneville BD, Moonen CT. A fast calculation method for magnetic field
    inhomogeneity due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson
    B 2003;19B:26-34. Marques JP, Bowtell R. Concepts Magn Reson B 2005;25B:65-78.
    """
    b = check_b0_dir(b0_dir)
    ks = kspace_grid(shape, voxel_size, rfft=rfft)
    k2 = ks[0] ** 2 + ks[1] ** 2 + ks[2] ** 2
    # (k.b)^2 with the cross terms k_i k_j (i != j) averaged over the two signs of a Nyquist
    # frequency (it is its own alias): this keeps D(-k) = D(k) on the periodic grid, so a real
    # object gives a real field and a 90-degree grid rotation commutes with the kernel exactly
    # for an oblique B0.
    kt = [k.copy() for k in ks]
    for i, n in enumerate(shape):
        if int(n) % 2 == 0:
            kt[i][np.isclose(np.abs(kt[i]), 0.5 / check_voxel_size(voxel_size)[i])] = 0.0
    kb2 = sum(b[i] ** 2 * ks[i] ** 2 for i in range(3))
    kb2 = kb2 + (kt[0] * b[0] + kt[1] * b[1] + kt[2] * b[2]) ** 2
    kb2 = kb2 - sum(b[i] ** 2 * kt[i] ** 2 for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb2 / k2
    d[0, 0, 0] = 0.0
    return asarray(d, device=device, dtype=dtype)


def dipole_kernel_fd(
    shape: Sequence[int],
    voxel_size,
    b0_dir=(0.0, 0.0, 1.0),
    *,
    device: str | None = "cpu",
    dtype=np.float32,
):
    """Finite-difference dipole kernel (half spectrum): ``1/3 - (b.grad_h)^2 / lap_h``.

    ``lap_h`` is the 7-point Laplacian (``-sum_i (2 sin(pi n_i/N_i) / dx_i)^2``), the pure
    second derivatives in ``(b.grad_h)^2`` use the same 3-point stencils and the mixed ones
    central differences (``sin(2 pi n_i/N_i) / dx_i``). Unlike the continuous kernel, it is
    smooth and periodic across the edge of k-space for any B0 direction, so the field of sharp
    edges (air/tissue, 9.4 ppm) carries no Nyquist-frequency ringing, and the field outside the
    sources is exactly harmonic for the discrete Laplacian. It agrees with
    :func:`dipole_kernel` at low frequencies (second order). The simulator uses it for oblique
    B0, where the continuous kernel's jump at the Nyquist faces leaves non-harmonic ringing of
    the air/tissue field inside the brain.
    """
    b = check_b0_dir(b0_dir)
    vs = check_voxel_size(voxel_size)
    n = [
        np.fft.fftfreq(int(shape[0])),
        np.fft.fftfreq(int(shape[1])),
        np.fft.rfftfreq(int(shape[2])),
    ]
    shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    e2 = [((2 * np.sin(np.pi * n[i]) / vs[i]) ** 2).reshape(shapes[i]) for i in range(3)]
    t = [(np.sin(2 * np.pi * n[i]) / vs[i]).reshape(shapes[i]) for i in range(3)]
    num = sum(b[i] ** 2 * e2[i] for i in range(3))
    for i in range(3):
        for j in range(3):
            if i != j:
                num = num + b[i] * b[j] * t[i] * t[j]
    den = e2[0] + e2[1] + e2[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - num / den
    d[0, 0, 0] = 0.0
    return asarray(d, device=device, dtype=dtype)


def sphere_mask(shape: Sequence[int], voxel_size, radius: float) -> np.ndarray:
    """Binary ball of ``radius`` mm centred on voxel (0, 0, 0) of a periodic grid.

    A voxel belongs to the ball when its centre satisfies ``sum((n_i dx_i)^2) <= r^2`` with
    ``n_i`` the signed (wrapped) index, so the ball is ready for FFT convolution.
    """
    vs = check_voxel_size(voxel_size)
    if not radius > 0:
        raise ValueError(f"radius must be positive (mm), got {radius!r}")
    grids = [
        (np.fft.fftfreq(n, d=1.0 / n) * d).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, d) in enumerate(zip(shape, vs, strict=True))
    ]
    r2 = grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2
    return r2 <= radius**2 + 1e-9


def smv_kernel(
    shape: Sequence[int],
    voxel_size,
    radius: float,
    *,
    device: str | None = "cpu",
    dtype=np.float32,
):
    """k-space spherical mean value kernel ``S(k)`` (half spectrum), ``S(0) = 1``.

    The real-space kernel is the binary ball of :func:`sphere_mask` normalised to sum 1, so
    ``irfftn(S * rfftn(f))`` is the mean of ``f`` over the ball and ``1 - S`` is the SMV
    high-pass used by SHARP-family background removal.

    Reference: Li L, Leigh JS. High-precision mapping of the magnetic field utilizing the
    harmonic function mean value property. J Magn Reson 2001;148:442-448.
    """
    ball = sphere_mask(shape, voxel_size, radius).astype(np.float64)
    ball /= ball.sum()
    s = rfftn(ball).real
    return asarray(s, device=device, dtype=dtype)


def laplace_kernel(
    shape: Sequence[int],
    voxel_size,
    *,
    rfft: bool = True,
    device: str | None = "cpu",
    dtype=np.float32,
):
    """k-space eigenvalues of the periodic 7-point discrete Laplacian (non-positive).

    ``L(k) = sum_i 2 (cos(2 pi n_i / N_i) - 1) / dx_i^2`` (1/mm^2). ``-L`` is also
    ``sum_i |E_i(k)|^2`` for forward differences ``E_i``, which makes gradient-regularised
    k-space solvers exact.
    """
    vs = check_voxel_size(voxel_size)
    nx, ny, nz = (int(n) for n in shape)
    lx = (2 * (np.cos(2 * np.pi * np.fft.fftfreq(nx)) - 1) / vs[0] ** 2)[:, None, None]
    ly = (2 * (np.cos(2 * np.pi * np.fft.fftfreq(ny)) - 1) / vs[1] ** 2)[None, :, None]
    fz = np.fft.rfftfreq(nz) if rfft else np.fft.fftfreq(nz)
    lz = (2 * (np.cos(2 * np.pi * fz) - 1) / vs[2] ** 2)[None, None, :]
    return asarray(lx + ly + lz, device=device, dtype=dtype)
