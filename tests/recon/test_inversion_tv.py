"""Total-variation dipole inversion (ADMM): accuracy, convergence, weights, backends, inputs.

Accuracy is measured against the phantom's true chi inside the brain mask with
``qsmprep.metrics`` (de-meaned NRMSE and HFEN in %, SSIM, XSIM). The local field is the exact
field of the brain's own sources, so the errors are those of the inversion alone. The noisy
field adds white Gaussian noise of 0.003 ppm in the mask (the recipe shared by every inversion
test). Bounds are the measured values plus a margin of about 5 % of the value (errors) or 0.02
(similarities): data and noise are seeded, so only floating-point differences between FFT
libraries can move them.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep import metrics
from qsmprep.recon._backend import count_ffts, irfftn, rfftn
from qsmprep.recon.inversion import tkd, tv
from qsmprep.recon.kernels import b0_dir_from_affine, dipole_kernel
from qsmprep.recon.operators import grad
from qsmprep.sim import forward_field

NOISE_PPM = 0.003


def _noisy(local, mask):
    rng = np.random.default_rng(0)
    return (local + rng.normal(0.0, NOISE_PPM, local.shape) * mask).astype(np.float32)


def _scores(chi, phantom):
    e = metrics.evaluate(chi, phantom.chi, phantom.brain_mask)
    return {k: e[k] for k in ("nrmse", "hfen", "ssim", "xsim")}


@pytest.fixture(scope="module")
def case2mm(phantom2mm, phantom2mm_fields):
    """Local field (noise-free, noisy), mask, voxel size and B0 direction of the 2 mm phantom."""
    local = phantom2mm_fields["local_ppm"]
    mask = phantom2mm.brain_mask
    b0 = b0_dir_from_affine(phantom2mm.affine)
    return local, _noisy(local, mask), mask, phantom2mm.voxel_size, b0


@pytest.fixture(scope="module")
def results2mm(case2mm):
    """Default TV of the noise-free and the noisy field, with their ``info`` dicts."""
    local, noisy, mask, vs, b0 = case2mm
    out = {}
    for name, field in (("clean", local), ("noisy", noisy)):
        info = {}
        out[name] = (tv(field, mask, vs, b0_dir=b0, info=info), info)
    return out


# Measured on the 2 mm phantom (96 x 96 x 80, seed 0), default parameters (lam 2e-4, mask as
# data weight, rho 300 lam h, mu 0.1, relax 1.8, tol 1e-3):
#               NRMSE   HFEN   SSIM    XSIM   iterations
#   noise-free  19.03   14.12  0.975   0.826  138
#   noisy       23.56   16.77  0.961   0.780  124
# (TKD, threshold 0.19: 45.6 / 47.5 / 0.769 / 0.586 and 58.1 / 48.9 / 0.716 / 0.407.)
BOUNDS = {
    "clean": {"nrmse": 20.0, "hfen": 15.0, "ssim": 0.955, "xsim": 0.80},
    "noisy": {"nrmse": 24.8, "hfen": 17.6, "ssim": 0.94, "xsim": 0.76},
}


def test_start_from_tkd_saves_iterations(case2mm, results2mm, phantom2mm):
    """The default start (TKD, tol 2e-3) against the former one (zero, tol 1e-3) on the noisy
    2 mm phantom: at least 15 % fewer iterations (measured 75 against 102) at an NRMSE within
    0.5 points (issue 18's budget; measured 23.65 against 23.65 %)."""
    local, noisy, mask, vs, b0 = case2mm
    chi, info = results2mm["noisy"]
    info0 = {}
    chi0 = tv(noisy, mask, vs, b0_dir=b0, init="zero", tol=1e-3, info=info0)
    assert info["init"] == "tkd" and info0["init"] == "zero"
    assert info["iterations"] <= 0.85 * info0["iterations"], (info, info0)
    now, before = _scores(chi, phantom2mm)["nrmse"], _scores(chi0, phantom2mm)["nrmse"]
    assert abs(now - before) <= 0.5, (now, before)


@pytest.mark.parametrize("name", ["clean", "noisy"])
def test_phantom_accuracy(results2mm, phantom2mm, name):
    chi, info = results2mm[name]
    s = _scores(chi, phantom2mm)
    b = BOUNDS[name]
    assert s["nrmse"] < b["nrmse"], s
    assert s["hfen"] < b["hfen"], s
    assert s["ssim"] > b["ssim"], s
    assert s["xsim"] > b["xsim"], s
    assert chi.dtype == np.float32 and chi.shape == phantom2mm.chi.shape
    assert np.all(chi[~phantom2mm.brain_mask] == 0)
    # default tolerance reached well before the limit (measured 138 and 124 of 250)
    assert info["converged"] and info["iterations"] < 200, info


def test_beats_tkd_on_noisy_data(case2mm, results2mm, phantom2mm):
    # measured NRMSE: TV 23.6 %, TKD (0.19) 58.1 %; require TV below half of TKD's error
    local, noisy, mask, vs, b0 = case2mm
    e_tv = _scores(results2mm["noisy"][0], phantom2mm)["nrmse"]
    e_tkd = _scores(tkd(noisy, mask, vs, b0_dir=b0, threshold=0.19), phantom2mm)["nrmse"]
    assert e_tv < 0.5 * e_tkd, (e_tv, e_tkd)


def test_mask_data_term_beats_unweighted(case2mm, results2mm, phantom2mm):
    # The unweighted data term over the whole grid (data_mask=False, one FFT pair per
    # iteration) takes the field outside the mask for 0 and errs near the mask edge: measured
    # NRMSE 44.4 % against 23.6 % (noisy). Require a 10-point gap.
    local, noisy, mask, vs, b0 = case2mm
    info = {}
    chi = tv(noisy, mask, vs, b0_dir=b0, data_mask=False, info=info)
    e_full = _scores(chi, phantom2mm)["nrmse"]
    e_mask = _scores(results2mm["noisy"][0], phantom2mm)["nrmse"]
    assert e_mask < e_full - 10.0, (e_mask, e_full)
    assert info["ffts_per_iteration"] == 2 and info["converged"]


def test_sphere_values():
    # Two balls of radius 10 mm (0.2 and -0.1 ppm) in an ellipsoidal mask, 1 mm voxels. The
    # centre value relative to the median of the mask away from the balls was measured within
    # 2 % of the truth (0.1978 and -0.0983 ppm); the bound is 10 %.
    n = 64
    ii = np.indices((n, n, n), dtype=float)

    def ball(c, r):
        return ((ii[0] - c[0]) ** 2 + (ii[1] - c[1]) ** 2 + (ii[2] - c[2]) ** 2) <= r * r

    chi = np.zeros((n, n, n), np.float32)
    chi[ball((18, 32, 32), 10)] = 0.2
    chi[ball((46, 32, 32), 10)] = -0.1
    mask = ((ii[0] - 32) / 30) ** 2 + ((ii[1] - 32) / 22) ** 2 + ((ii[2] - 32) / 22) ** 2 <= 1
    field = forward_field(chi, 1.0) * mask
    x = tv(field, mask, 1.0)
    ref = np.median(x[mask & ~ball((18, 32, 32), 14) & ~ball((46, 32, 32), 14)])
    assert abs(x[18, 32, 32] - ref - 0.2) < 0.02
    assert abs(x[46, 32, 32] - ref + 0.1) < 0.01


@pytest.fixture(scope="module")
def periodic_case(phantom):
    """A problem that matches TV's own model: periodic field of the 3 mm phantom's brain,
    full mask, no padding (the grid is the array), so the objective can be evaluated."""
    chi = (phantom.chi * phantom.brain_mask).astype(np.float32)
    vs = phantom.voxel_size
    d = dipole_kernel(chi.shape, vs)
    field = irfftn(d * rfftn(chi), s=chi.shape).astype(np.float32)
    field += np.random.default_rng(0).normal(0.0, NOISE_PPM, chi.shape).astype(np.float32)
    return chi, field, np.ones(chi.shape, bool), vs, d


def _objective(x, field, d, vs, lam=2e-4):
    """1/2 ||D x - f||^2 + lam h ||grad x||_1 with h the mean voxel size (here isotropic)."""
    r = irfftn(d * rfftn(x), s=x.shape) - field
    h = float(np.prod(vs)) ** (1 / 3)
    tv_term = np.abs(grad(x.astype(np.float64), vs)).sum()
    return 0.5 * float(np.sum(r.astype(np.float64) ** 2)) + lam * h * float(tv_term)


def test_objective_decreases_and_converges(periodic_case):
    chi, field, mask, vs, d = periodic_case
    assert tuple(dipole_kernel(chi.shape, vs).shape) == tuple(d.shape)
    values = []
    for n in (1, 5, 20, 80):
        info = {}
        x = tv(field, mask, vs, pad=0, max_iter=n, info=info)
        assert info["grid"] == chi.shape
        values.append(_objective(x, field, d, vs))
    # measured 2.28, 1.25, 1.074, 1.0666: strictly decreasing
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), values
    info = {}
    x = tv(field, mask, vs, pad=0, info=info)
    # stopped by the default tolerance (2e-3 on the relative change, from TKD)
    assert info["converged"] and info["iterations"] < 250 and info["rel_change"] < 2e-3
    tight = tv(field, mask, vs, pad=0, data_mask=False, tol=1e-6, max_iter=3000)
    j, j_tight = _objective(x, field, d, vs), _objective(tight, field, d, vs)
    # the minimiser beats the truth (measured 1.067 against 1.280) ...
    assert j_tight <= j < _objective(chi, field, d, vs)
    # ... and the default tolerance stops within 0.1 % of the minimum (measured 0.04 % from
    # zero with tol 1e-3, 0.083 % from TKD with 2e-3, 0.119 % with 3e-3)
    assert j < 1.001 * j_tight, (j, j_tight)
    # With W = 1 everywhere, the weighted (y-split) and unweighted (exact x-update) solvers
    # share the minimiser: measured 0.3 % and 0.6 % from the tight solution.
    fast = tv(field, mask, vs, pad=0, data_mask=False)
    for sol in (x, fast):
        assert np.linalg.norm(sol - tight) < 0.015 * np.linalg.norm(tight)


def test_noise_weights_help_outside_the_noisy_region(case2mm, phantom2mm):
    # A slab with 10x the noise (0.03 ppm; 28 % of the mask). Weighting the data term by
    # 1 / sigma lowered the NRMSE in the rest of the mask from 27.2 % to 25.6 % (mask-only
    # weight), and over the whole mask from 205 % to 57 %.
    local, _, mask, vs, b0 = case2mm
    sigma = np.full(local.shape, NOISE_PPM, np.float32)
    slab = np.zeros(local.shape, bool)
    slab[:, :32, :] = True
    sigma[slab] = 10 * NOISE_PPM
    rng = np.random.default_rng(0)
    field = local + rng.normal(0.0, 1.0, local.shape) * sigma * mask
    rest = mask & ~slab
    plain = tv(field, mask, vs, b0_dir=b0)
    weighted = tv(field, mask, vs, b0_dir=b0, weight=1.0 / sigma)
    e_plain = metrics.nrmse(plain, phantom2mm.chi, rest)
    e_weighted = metrics.nrmse(weighted, phantom2mm.chi, rest)
    assert e_weighted < e_plain - 0.8, (e_weighted, e_plain)
    assert metrics.nrmse(weighted, phantom2mm.chi, mask) < 0.5 * metrics.nrmse(
        plain, phantom2mm.chi, mask
    )


def test_weighted_tv_keeps_edges(case2mm, results2mm, phantom2mm):
    # TV weight 0 on the 30 % of mask voxels with the largest magnitude gradient (a MEDI-like
    # edge mask) leaves those edges unsmoothed: on noise-free data NRMSE 19.0 -> 17.8 % and
    # HFEN 14.1 -> 13.2 % (measured; on noisy data the unregularised edges pass noise).
    local, _, mask, vs, b0 = case2mm
    gm = np.sqrt((grad(phantom2mm.m0.astype(np.float32), vs) ** 2).sum(0))
    g = np.where(gm > np.percentile(gm[mask], 70), 0.0, 1.0)
    s_wtv = _scores(tv(local, mask, vs, b0_dir=b0, tv_weight=g), phantom2mm)
    s_tv = _scores(results2mm["clean"][0], phantom2mm)
    assert s_wtv["nrmse"] < s_tv["nrmse"] - 0.6, (s_wtv, s_tv)
    assert s_wtv["hfen"] < s_tv["hfen"] - 0.4, (s_wtv, s_tv)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"data_mask": False}, {"tv_weight": "random"}, {"weight": "random", "max_iter": 30}],
    ids=["default", "unweighted", "tv_weight", "weight"],
)
def test_torch_matches_numpy(phantom, phantom_fields, kwargs):
    # float32 on both; measured max difference 3e-7 ppm with equal iteration counts
    local, mask, vs = phantom_fields["local_ppm"], phantom.brain_mask, phantom.voxel_size
    rng = np.random.default_rng(1)
    kw = {
        k: (rng.uniform(0.5, 1.5, local.shape) if v == "random" else v) for k, v in kwargs.items()
    }
    i_np, i_t = {}, {}
    a = tv(local, mask, vs, info=i_np, **kw)
    b = tv(local, mask, vs, device="torch", info=i_t, **kw)
    assert isinstance(b, np.ndarray) and b.dtype == np.float32
    assert abs(i_np["iterations"] - i_t["iterations"]) <= 1
    assert np.max(np.abs(a - b)) < 1e-5


def test_fft_count(phantom, phantom_fields):
    local, mask, vs = phantom_fields["local_ppm"], phantom.brain_mask, phantom.voxel_size
    for data_mask, per_iter, setup in ((True, 4, 0), (False, 2, 1)):
        for init, start in (("zero", 0), ("tkd", 2 + 2 * data_mask)):
            info = {}
            with count_ffts() as c:
                tv(local, mask, vs, data_mask=data_mask, max_iter=10, info=info, init=init)
            assert info["iterations"] == 10 and not info["converged"]
            assert info["init"] == init
            # weighted: 2 forward + 2 inverse per iteration; unweighted: 1 + 1, plus F{f}
            # once; the start from TKD: its pair, and with the weight D chi_0 for y_0
            assert len(c) == setup + start + per_iter * 10
        assert set(s for _, s in c.calls) == {tuple(info["grid"])}


def test_bad_input(phantom, phantom_fields):
    local = phantom_fields["local_ppm"]
    mask = phantom.brain_mask
    vs = phantom.voxel_size
    bad = local.copy()
    bad[tuple(np.argwhere(mask)[0])] = np.nan
    cases = [
        ((local, mask[:-1], vs), {}, "shape"),
        ((local, np.zeros_like(mask), vs), {}, "all zero"),
        ((bad, mask, vs), {}, "non-finite"),
        ((local[..., None], mask, vs), {}, "3D"),
        ((local, mask, (3.0, 0.0, 3.0)), {}, "voxel_size"),
        ((local, mask, vs), {"b0_dir": (0, 0, 0)}, "zero length"),
        ((local, mask, vs), {"lam": 0.0}, "lam"),
        ((local, mask, vs), {"rho": -1.0}, "rho"),
        ((local, mask, vs), {"mu": float("nan")}, "mu"),
        ((local, mask, vs), {"relax": 2.0}, "relax"),
        ((local, mask, vs), {"tol": 0.0}, "tol"),
        ((local, mask, vs), {"init": "tsvd"}, "init"),
        ((local, mask, vs), {"max_iter": 0}, "max_iter"),
        ((local, mask, vs), {"weight": -np.ones_like(local)}, "weight"),
        ((local, mask, vs), {"weight": np.ones(local.shape[:2])}, "weight"),
        ((local, mask, vs), {"tv_weight": np.zeros_like(local)}, "tv_weight"),
        ((local, mask, vs), {"tv_weight": np.ones((2, 2, 2))}, "tv_weight"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            tv(*args, **kwargs)
