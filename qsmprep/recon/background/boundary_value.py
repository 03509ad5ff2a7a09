"""LBV: Laplacian boundary value background removal (sparse PCG in SciPy on the CPU).

Notation as in :mod:`qsmprep.recon.background`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage, sparse
from scipy.sparse.linalg import LinearOperator
from scipy.sparse.linalg import cg as sparse_cg

from qsmprep.recon._backend import get_fft_workers, record_dst1
from qsmprep.recon._checks import check_field
from qsmprep.recon.background.common import fill_info

__all__ = ["lbv"]


def _peeled(m: np.ndarray, vs, peel: float) -> np.ndarray:
    """Mask voxels farther than ``peel`` mm from the nearest voxel outside (0: the mask)."""
    if peel <= 0:
        return m.copy()
    dist = ndimage.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    return m & (dist > peel)


def _box_preconditioner(inner: np.ndarray, vs, workers: int) -> LinearOperator:
    """The inverse of ``-L`` with zero values around a box that holds the interior, restricted
    to the interior voxels: ``P^T (-L_box)^-1 P`` with ``P`` the embedding in the box.

    ``-L_box`` (the 7-point Laplacian in mm with Dirichlet boundaries) is diagonal in the
    type-I DST: eigenvalues ``sum_i (2 - 2 cos(pi k_i / (n_i + 1))) / dx_i^2``, so one DST pair
    applies its inverse. The operator is symmetric positive definite, as CG needs. The system
    matrix is ``-L_box`` restricted to the interior with zero Dirichlet values on the mask's
    boundary instead of the box's, so they differ only near the boundary: on a 1 mm head
    (1.2 million unknowns) CG took 29 iterations to 1e-6 instead of 309, at 1.5 mm 26
    instead of 229. Each box side is padded to a fast DST length (``2 (n + 1)`` 5-smooth);
    float32 is enough for a preconditioner. The DSTs are counted as the real FFTs of doubled
    length they are computed by (:func:`qsmprep.recon._backend.record_dst1`).
    """
    idx = np.nonzero(inner)
    lo = [int(i.min()) for i in idx]
    ext = [int(i.max()) + 1 - low for i, low in zip(idx, lo, strict=True)]
    shape = tuple(sp_fft.next_fast_len(e + 1, real=True) - 1 for e in ext)
    flat = np.ravel_multi_index(tuple(i - low for i, low in zip(idx, lo, strict=True)), shape)
    eig = np.zeros(shape)
    for axis, (n, d) in enumerate(zip(shape, vs, strict=True)):
        k = np.arange(1, n + 1)
        e = (2.0 - 2.0 * np.cos(np.pi * k / (n + 1))) / (d * d)
        eig = eig + e.reshape([n if a == axis else 1 for a in range(3)])
    inv = (1.0 / eig).astype(np.float32)
    buf = np.zeros(shape, dtype=np.float32)  # only the interior's entries are ever written
    view = buf.reshape(-1)

    def apply(r):
        record_dst1(shape)
        record_dst1(shape)
        view[flat] = r
        y = sp_fft.dstn(buf, type=1, workers=workers)
        y *= inv
        y = sp_fft.idstn(y, type=1, workers=workers, overwrite_x=True)
        return y.reshape(-1)[flat].astype(np.float64)

    return LinearOperator((flat.size, flat.size), matvec=apply, dtype=np.float64)


def lbv(
    field,
    mask,
    voxel_size,
    *,
    tol: float = 1e-6,
    max_iter: int = 3000,
    peel: float = 0.0,
    precondition: bool = True,
    device: str | None = "cpu",
    info: dict | None = None,
):
    """LBV: Laplacian boundary value background removal.

    The background field is harmonic in the mask, so the local field has the Laplacian of the
    total field there. LBV takes the local field to be zero on the mask boundary (the voxels of
    the mask with a 6-neighbour outside it) and solves the Poisson problem with that Dirichlet
    condition on the remaining (interior) voxels::

        L f_L = L f   in the interior,      f_L = 0   on the boundary

    with ``L`` the 7-point Laplacian with spacing ``dx, dy, dz`` (mm, so anisotropic voxels are
    honoured). The linear system (symmetric positive definite, one unknown per interior voxel)
    is solved by SciPy's conjugate gradients in float64 on the CPU, preconditioned by the
    inverse Laplacian of a box around the mask (one pair of type-I DSTs per iteration). No
    voxel is lost to a kernel: the output covers the whole mask, less ``peel`` mm if asked.

    The zero boundary condition is the method's approximation: the true local field is not
    zero at the brain edge, and the error it leaves is the harmonic function with the true
    local field's boundary values, largest next to the boundary. Errors of the total field on
    the boundary (unwrapping faults, voxels outside the brain in the mask) enter the same way;
    ``peel`` removes layers where they dominate.

    Parameters
    ----------
    field, mask, voxel_size : as :func:`sharp`.
    tol : float
        CG stop: relative residual of the Poisson system (default 1e-6; the local field
        changed by less than 1e-4 of its norm between 1e-6 and 1e-8 on our phantoms).
    max_iter : int
        CG iteration limit (default 3000).
    peel : float
        Distance from the mask edge (mm) within which the result is discarded after the solve
        (default 0: the whole mask; Zhou et al. offer the same as a number of layers).
    precondition : bool
        Precondition CG with the box's inverse Laplacian (default True). Measured on one
        machine, two runs each, same process: a 1 mm simulated head (160 x 186 x 149, 1.2
        million unknowns) 12.7-13.2 s without, 7.9 s with (309 against 29 iterations);
        qsmdev sub-01 (1.5 mm, 0.5 million) 3.7-4.2 against 2.7-3.2 s (229 against 26);
        qsmdev-aniso (1 x 1 x 2.5 mm, 0.7 million) 5.7-6.2 against 4.4-5.6 s (260 against
        31). Both stop at the same relative residual; the local fields agreed to 3e-5 of
        their norm.
    device : str
        Accepted for a uniform signature; the solve always runs on the CPU.
    info : dict, optional
        Filled with ``iterations``, ``converged``, ``residual`` (relative), ``unknowns``.

    Returns
    -------
    local_field : (X, Y, Z) float32 array, zero on the boundary and outside ``mask_out``.
    mask_out : (X, Y, Z) bool, the mask less ``peel`` mm.

    Reference
    ---------
    Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the Laplacian
    boundary value problem. NMR Biomed 2014;27:312-319.
    """
    del device  # sparse solve on the CPU whatever the device
    f, m, vs = check_field(field, mask, voxel_size)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive (relative residual), got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
    peel = float(peel)
    if not (math.isfinite(peel) and peel >= 0):
        raise ValueError(f"peel must be a non-negative distance in mm, got {peel!r}")
    # interior: mask voxels whose six neighbours are in the mask (outside the array = outside)
    inner = ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=0)
    n = int(inner.sum())
    if n == 0:
        raise ValueError("mask has no interior voxel (every voxel touches its edge)")
    index = np.full(m.shape, -1, dtype=np.int64)
    index[inner] = np.arange(n)
    coords = np.nonzero(inner)
    f64 = f.astype(np.float64)
    rows, cols, vals = [], [], []
    diag = np.zeros(n)
    rhs = np.zeros(n)
    for axis, d in enumerate(vs):
        w = 1.0 / (d * d)
        for step in (1, -1):
            nb = list(coords)
            nb[axis] = nb[axis] + step  # interior voxels are never on the array border
            nb = tuple(nb)
            j = index[nb]
            diag += w
            rhs += w * (f64[coords] - f64[nb])  # (-L f) at the interior voxels
            known = j >= 0  # neighbour is an unknown; else boundary, where f_L = 0
            rows.append(np.flatnonzero(known))
            cols.append(j[known])
            vals.append(np.full(int(known.sum()), -w))
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    iterations = 0

    def count(_):
        nonlocal iterations
        iterations += 1

    pre = None
    if precondition:
        pre = _box_preconditioner(inner, vs, get_fft_workers())
    x, flag = sparse_cg(a, rhs, rtol=tol, atol=0.0, maxiter=int(max_iter), M=pre, callback=count)
    bnorm = float(np.linalg.norm(rhs))
    res = float(np.linalg.norm(rhs - a @ x)) / bnorm if bnorm > 0 else 0.0
    local = np.zeros(m.shape, dtype=np.float32)
    local[inner] = x
    out = _peeled(m, vs, peel)
    if not out.any():
        raise ValueError(f"mask vanishes when {peel:g} mm are peeled off; use a smaller peel")
    local[~out] = 0.0
    fill_info(info, iterations=iterations, converged=flag == 0, residual=res, unknowns=n)
    return local, out
