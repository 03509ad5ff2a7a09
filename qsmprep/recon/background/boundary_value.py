"""LBV: Laplacian boundary value background removal (sparse CG in SciPy on the CPU).

Notation as in :mod:`qsmprep.recon.background`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg as sparse_cg

from qsmprep.recon._checks import check_field
from qsmprep.recon.background.common import fill_info

__all__ = ["lbv"]


def _peeled(m: np.ndarray, vs, peel: float) -> np.ndarray:
    """Mask voxels farther than ``peel`` mm from the nearest voxel outside (0: the mask)."""
    if peel <= 0:
        return m.copy()
    dist = ndimage.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    return m & (dist > peel)


def lbv(
    field,
    mask,
    voxel_size,
    *,
    tol: float = 1e-6,
    max_iter: int = 3000,
    peel: float = 0.0,
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
    is solved by SciPy's conjugate gradients in float64 on the CPU. No voxel is lost to a
    kernel: the output covers the whole mask, less ``peel`` mm if asked.

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

    x, flag = sparse_cg(a, rhs, rtol=tol, atol=0.0, maxiter=int(max_iter), callback=count)
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
