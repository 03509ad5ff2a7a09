"""Finite differences and conjugate gradients against closed forms."""

import numpy as np
import pytest

from qsmprep.recon import kernels
from qsmprep.recon._backend import asarray, irfftn, rfftn, to_numpy
from qsmprep.recon.operators import cg, div, grad


@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_div_is_the_negative_adjoint_of_grad(boundary):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 10, 8))
    g = rng.normal(size=(3, 12, 10, 8))
    vs = (1.0, 1.5, 2.0)
    lhs = np.sum(grad(x, vs, boundary=boundary) * g)
    rhs = -np.sum(x * div(g, vs, boundary=boundary))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_grad_of_a_linear_ramp():
    vs = (1.0, 2.0, 0.5)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in (6, 5, 4)), indexing="ij")
    x = 3 * i * vs[0] - 2 * j * vs[1] + k * vs[2]  # slopes 3, -2, 1 per mm
    g = grad(x, vs, boundary="neumann")
    np.testing.assert_allclose(g[0][:-1], 3)
    np.testing.assert_allclose(g[1][:, :-1], -2)
    np.testing.assert_allclose(g[2][:, :, :-1], 1)
    assert np.all(g[0][-1] == 0)


def test_periodic_laplacian_matches_kspace_eigenvalues():
    # -div(grad x) in real space equals -L(k) in k-space (laplace_kernel): this identity makes
    # ADMM x-updates exact.
    rng = np.random.default_rng(1)
    shape, vs = (16, 12, 10), (1.0, 1.2, 2.0)
    x = rng.normal(size=shape)
    real = div(grad(x, vs), vs)
    lap = to_numpy(kernels.laplace_kernel(shape, vs, dtype=np.float64))
    ks = irfftn(lap * rfftn(x), s=shape)
    np.testing.assert_allclose(real, ks, atol=1e-10)


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_cg_solves_spd_system(device):
    if device == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    d = rng.uniform(1, 10, size=(8, 8, 8))
    b = rng.normal(size=(8, 8, 8))
    dd = asarray(d, device=device, dtype=np.float64)
    x, info = cg(
        lambda v: dd * v, asarray(b, device=device, dtype=np.float64), tol=1e-10, max_iter=200
    )
    np.testing.assert_allclose(to_numpy(x), b / d, rtol=1e-8)
    assert info["converged"] and info["iterations"] < 200
    # zero right-hand side returns zero at once
    x0, info0 = cg(lambda v: v, np.zeros(4))
    assert info0["iterations"] == 0 and not np.any(x0)
