"""Finite-difference operators and a conjugate-gradient solver shared by iterative methods.

Written once for NumPy and torch (``xp`` namespace from :mod:`qsmprep.recon._backend`).
Gradients are forward differences divided by the voxel size (1/mm); :func:`div` is the
negative adjoint of :func:`grad` under the same boundary condition, so ``-div(grad(x))`` is a
symmetric positive semi-definite Laplacian.

Boundary conditions:

``"periodic"``
    Wraps around; matches the k-space eigenvalues of
    :func:`qsmprep.recon.kernels.laplace_kernel`, which makes ADMM x-updates exact.
``"neumann"``
    Replicate boundary: the difference across the last face is 0 (MEDI's ``fgrad``/``bdiv``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qsmprep.recon._backend import axpy, namespace

__all__ = ["cg", "div", "grad"]


def _roll(xp, x, shift: int, axis: int):
    if hasattr(xp, "roll"):
        return xp.roll(x, shift, axis=axis)
    raise NotImplementedError("array namespace without roll")  # pragma: no cover


def grad(x, voxel_size, *, boundary: str = "periodic"):
    """Forward-difference gradient of a 3D array, stacked on a new first axis: ``(3, X, Y, Z)``.

    ``g_i[n] = (x[n + e_i] - x[n]) / dx_i``; the last difference along each axis wraps
    (periodic) or is 0 (neumann).
    """
    xp = namespace(x)
    out = []
    for axis, d in enumerate(voxel_size):
        g = (_roll(xp, x, -1, axis) - x) / d
        if boundary == "neumann":
            idx = [slice(None)] * 3
            idx[axis] = slice(-1, None)
            g[tuple(idx)] = 0
        elif boundary != "periodic":
            raise ValueError(f"boundary must be 'periodic' or 'neumann', got {boundary!r}")
        out.append(g)
    return xp.stack(out)


def div(g, voxel_size, *, boundary: str = "periodic"):
    """Divergence, the negative adjoint of :func:`grad`: ``<grad x, g> = -<x, div g>``."""
    xp = namespace(g)
    out = None
    for axis, d in enumerate(voxel_size):
        gi = g[axis]
        if boundary == "neumann":
            # adjoint of the replicate-boundary forward difference (MEDI's bdiv)
            idx = [slice(None)] * 3
            idx[axis] = slice(-1, None)
            gi = xp.asarray(gi, copy=True) if hasattr(gi, "copy") else gi.clone()
            gi[tuple(idx)] = 0
        elif boundary != "periodic":
            raise ValueError(f"boundary must be 'periodic' or 'neumann', got {boundary!r}")
        term = (gi - _roll(xp, gi, 1, axis)) / d
        out = term if out is None else out + term
    return out


def cg(
    apply_a: Callable,
    b,
    x0=None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    precondition: Callable | None = None,
):
    """Conjugate gradients for a symmetric positive (semi-)definite operator.

    Solves ``A x = b`` (real arrays of any shape; inner products over all elements in float64)
    and stops when ``||r|| <= tol ||b||`` or after ``max_iter`` iterations.
    ``precondition``: a symmetric positive definite ``P ~ A^-1`` applied to the residual
    (preconditioned CG); the stopping test stays on the residual of ``A x = b``.

    Returns
    -------
    x : array like ``b``
    info : dict with ``iterations``, ``residual`` (relative) and ``converged``.

    Reference: Hestenes MR, Stiefel E. Methods of conjugate gradients for solving linear
    systems. J Res Natl Bur Stand 1952;49:409-436.
    """
    xp = namespace(b)

    def dot(u, v):
        if isinstance(u, np.ndarray) and u.flags.c_contiguous and v.flags.c_contiguous:
            return float(np.dot(u.reshape(-1), v.reshape(-1)))  # BLAS, no temporary
        return float(xp.sum(u * v))

    if x0 is None:
        x = xp.zeros_like(b)
        r = b + 0
    else:
        x = x0 + 0
        r = b - apply_a(x)
    bnorm = dot(b, b) ** 0.5
    if bnorm == 0:
        return xp.zeros_like(b), {"iterations": 0, "residual": 0.0, "converged": True}
    pre = precondition
    z = r if pre is None else pre(r)
    p = z + 0
    rz = dot(r, z)
    rr = rz if pre is None else dot(r, r)
    it = 0
    while it < max_iter and rr**0.5 > tol * bnorm:
        ap = apply_a(p)
        pap = dot(p, ap)
        if pap <= 0 or rz <= 0:
            break
        alpha = rz / pap
        # in place, one pass each (x and r are private copies)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rr = dot(r, r)
        if pre is None:
            z, rz_new = r, rr
        else:
            z = pre(r)
            rz_new = dot(r, z)
        p *= rz_new / rz
        p += z
        rz = rz_new
        it += 1
    res = rr**0.5 / bnorm
    return x, {"iterations": it, "residual": res, "converged": res <= tol}
