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
    # preconditioned by the exact inverse: one iteration
    x, info = cg(lambda v: dd * v, asarray(b, device=device, dtype=np.float64), tol=1e-10,
                 precondition=lambda r: r / dd)  # fmt: skip
    np.testing.assert_allclose(to_numpy(x), b / d, rtol=1e-8)
    assert info["iterations"] == 1 and info["converged"]
    # zero right-hand side returns zero at once
    x0, info0 = cg(lambda v: v, np.zeros(4))
    assert info0["iterations"] == 0 and not np.any(x0)


def test_pcg_on_a_masked_convolution_matches_cg_in_fewer_iterations():
    """RESHARP's system ``(M K M + alpha) z = b`` (K a high-pass convolution, M a ball): CG
    preconditioned by ``M (K + shift)^-1 M`` reaches the same solution (both solved to 1e-8)
    and the tolerance of 1e-3 in at most half the iterations."""
    n = 32
    ax = np.arange(n) - n / 2
    r2 = ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2
    m = (r2 < (0.4 * n) ** 2).astype(np.float64)
    k = np.fft.fftfreq(n)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    h2 = (1.0 - np.exp(-k2 * 60.0)) ** 2  # a smooth high-pass, 0 at k = 0
    alpha = 1e-4

    def apply_a(z):
        return m * np.real(np.fft.ifftn(h2 * np.fft.fftn(m * z))) + alpha * z

    def precondition(r):
        return m * np.real(np.fft.ifftn(np.fft.fftn(m * r) / (h2 + 1e-3)))

    b = m * np.random.default_rng(5).normal(size=(n, n, n))
    plain, pi = cg(apply_a, b, tol=1e-8, max_iter=5000)
    pre, qi = cg(apply_a, b, tol=1e-8, max_iter=5000, precondition=precondition)
    assert pi["converged"] and qi["converged"]
    np.testing.assert_allclose(pre, plain, atol=1e-6 * np.abs(plain).max())
    _, pi = cg(apply_a, b, tol=1e-3, max_iter=5000)
    _, qi = cg(apply_a, b, tol=1e-3, max_iter=5000, precondition=precondition)
    assert qi["converged"] and qi["iterations"] <= pi["iterations"] / 2, (pi, qi)
