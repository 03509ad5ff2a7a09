"""Background removal (SHARP, V-SHARP, RESHARP, PDF, LBV) against ground truth and closed forms.

Errors are measured inside the mask each method returns: NRMSE (%) after de-meaning estimate and
truth there (the challenge-2.0 definition; the field mean is arbitrary) and the mean absolute
error (Hz) of the de-meaned fields. The phantom's local field is weak (std about 1.5 Hz at 3 T)
next to its background (std about 19 Hz). Part of the local field (that of sources near the
brain surface) is harmonic in the brain and cannot be told from the background by any method,
and on coarse voxels the near field of tissue just outside the mask is only approximately
harmonic on the voxel grid, so even the best errors are tens of percent. Bounds are the
measured values plus a margin of about 10 % of the value.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from qsmprep.recon import background as bg
from qsmprep.recon._backend import count_ffts
from qsmprep.recon.kernels import GAMMA_BAR, sphere_mask
from qsmprep.sim import forward_field, simulate_fields

HZ_PER_PPM = GAMMA_BAR * 3.0 * 1e-6  # 127.7 Hz per ppm at 3 T
NOISE_HZ = 0.5
"""White Gaussian noise added to the total field (Hz). A 5-echo 3 T field fit at SNR 100 leaves
about 0.2-0.3 Hz; 0.5 Hz is a noisier but realistic acquisition."""


def _demeaned(x, m):
    return x[m] - x[m].mean()


def _errors(est, truth, m):
    """(NRMSE %, mean abs error) of de-meaned fields inside ``m``."""
    e = _demeaned(est, m) - _demeaned(truth, m)
    return 100 * np.linalg.norm(e) / np.linalg.norm(_demeaned(truth, m)), np.abs(e).mean()


def _grid_mm(shape, voxel_size, centre_vox):
    return [
        ((np.arange(n) - c) * v).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, v, c) in enumerate(zip(shape, voxel_size, centre_vox, strict=True))
    ]


@pytest.fixture(scope="module")
def noisy_total(phantom_fields):
    rng = np.random.default_rng(0)
    total = phantom_fields["total_hz"]
    return (total + rng.normal(0.0, NOISE_HZ, total.shape)).astype(np.float32)


# measured on the 3 mm phantom (seed 1), default parameters:
#   method    clean NRMSE / MAE     noisy NRMSE / MAE     kept
#   sharp     72.4 % / 0.51 Hz      84.6 % / 0.68 Hz      0.76
#   vsharp    63.4 % / 0.49 Hz      76.8 % / 0.65 Hz      0.76 (radii 12, 9, 6 mm)
#   resharp   42.9 % / 0.31 Hz      60.8 % / 0.53 Hz      0.76
#   pdf       59.6 % / 0.50 Hz      67.4 % / 0.66 Hz      1.00
# SHARP and V-SHARP lose the low spatial frequencies of the local field in their truncated
# deconvolution; the noise (0.5 Hz white, a third of the local field's std) passes the SMV
# high-pass almost unchanged and adds the same amount to every method.
BOUNDS = {
    "sharp": (80.0, 0.57, 93.0, 0.75, 0.72),
    "vsharp": (70.0, 0.55, 85.0, 0.72, 0.72),
    "resharp": (48.0, 0.34, 67.0, 0.59, 0.72),
    "pdf": (66.0, 0.55, 74.0, 0.72, 0.99),
    # LBV: written from the goal before measuring, as good as PDF (the other method that keeps
    # the brain) and keeping the whole mask
    "lbv": (66.0, 0.55, 74.0, 0.72, 0.99),
    # TFI's background: written from the goal before measuring, as good as RESHARP (the best
    # here) while keeping the whole mask
    "tfibg": (48.0, 0.34, 67.0, 0.59, 0.99),
}
_INPUTS = {"tfibg": lambda ph: {"magnitude": ph.m0, "delta_te": 0.004}}
"""Extra inputs of the methods that invert the field (the chain gives them)."""
HARMONIC = [m for m in bg.METHODS if m not in _INPUTS]
"""The methods that are linear in the field (any unit) and need nothing but field and mask."""


_LBV_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="LBV on our phantoms: clean NRMSE 178.5 % (3 mm) and 179.6 % (2 mm) against the bound"
    " of PDF. The phantom's -0.5 ppm tissue borders the brain, so the background's discrete"
    " Laplacian in the first interior layers is 50x the local field's (measured 105 vs 2 Hz per"
    " voxel^2 at 2 mm) and LBV's zero boundary value does not hold there",
)


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=_LBV_XFAIL) if m == "lbv" else m for m in bg.METHODS]
)
def test_phantom_local_field(method, phantom, phantom_fields, noisy_total):
    vs = phantom.voxel_size
    brain = phantom.brain_mask
    truth = phantom_fields["local_hz"]
    nrmse_max, mae_max, nrmse_noisy_max, mae_noisy_max, kept_min = BOUNDS[method]
    extra = _INPUTS[method](phantom) if method in _INPUTS else {}

    local, m = bg.remove_background(phantom_fields["total_hz"], brain, vs, method=method, **extra)
    assert local.shape == brain.shape and m.dtype == bool
    assert not np.any(m & ~brain)
    assert np.all(local[~m] == 0) and np.all(np.isfinite(local))
    assert m.sum() >= kept_min * brain.sum()
    nrmse, mae = _errors(local, truth, m)
    assert nrmse < nrmse_max, nrmse
    assert mae < mae_max, mae

    local_n, m_n = bg.remove_background(noisy_total, brain, vs, method=method, **extra)
    np.testing.assert_array_equal(m_n, m)
    nrmse, mae = _errors(local_n, truth, m)
    assert nrmse < nrmse_noisy_max, nrmse
    assert mae < mae_noisy_max, mae


@pytest.mark.parametrize("radius", [4.0, 6.0, 9.0])
def test_resharp_at_least_as_good_as_sharp(radius, phantom, phantom_fields, noisy_total):
    # measured NRMSE (clean) SHARP / RESHARP: 4 mm 146 / 97 %, 6 mm 72 / 43 %, 9 mm 53 / 32 %;
    # same eroded mask for both, so the comparison is like for like.
    vs, brain, truth = phantom.voxel_size, phantom.brain_mask, phantom_fields["local_hz"]
    for total in (phantom_fields["total_hz"], noisy_total):
        ls, ms = bg.sharp(total, brain, vs, radius=radius)
        lr, mr = bg.resharp(total, brain, vs, radius=radius)
        np.testing.assert_array_equal(ms, mr)
        assert _errors(lr, truth, mr)[0] <= _errors(ls, truth, ms)[0]


@pytest.mark.parametrize(
    "method,bound",
    [("sharp", 74.0), ("vsharp", 84.0), ("resharp", 42.0), ("pdf", 60.0),
     pytest.param("lbv", 60.0, marks=_LBV_XFAIL)],
)  # fmt: skip
def test_errors_on_2mm_phantom(method, bound, phantom2mm, phantom2mm_fields):
    # measured (seed 0, 96 x 96 x 80 at 2 mm): SHARP 67.2 %, V-SHARP 76.1 % (radii 12 to 4 mm,
    # keeps 83 % of the brain against 74 %), RESHARP 37.4 %, PDF 54.2 %.
    vs, brain = phantom2mm.voxel_size, phantom2mm.brain_mask
    total, truth = phantom2mm_fields["total_hz"], phantom2mm_fields["local_hz"]
    local, m = bg.remove_background(total, brain, vs, method=method)
    assert _errors(local, truth, m)[0] < bound, method


# ------------------------------------------------------------------------------ closed forms


def _harmonic_background(shape, voxel_size, brain):
    """A purely harmonic field in the brain (Hz): 2nd-order solid harmonics plus the exact
    field of an air sphere (chi +9.4 ppm, radius 15 mm) centred 25 mm outside the brain."""
    centre = np.argwhere(brain).mean(axis=0)
    x, y, z = _grid_mm(shape, voxel_size, centre)
    poly = 3.0 * x / 50 - 2.0 * z / 50 + 4.0 * ((x / 50) ** 2 - (y / 50) ** 2) + 2.0 * x * z / 2500
    # sphere centre: below the brain along z (B0), 25 mm beyond the lowest brain voxel
    zmin = (np.argwhere(brain)[:, 2].min() - centre[2]) * voxel_size[2]
    a, zc = 15.0, zmin - 25.0 - 15.0
    r = np.sqrt(x**2 + y**2 + (z - zc) ** 2)
    cos2 = (z - zc) ** 2 / r**2
    sphere = 9.4 * (a / r) ** 3 * (3 * cos2 - 1) / 3 * HZ_PER_PPM
    return (poly + sphere).astype(np.float32)


# measured residual (% of the input's de-meaned norm in the returned mask): SMV methods
# 0.002-0.004 % (the ball's mean value property is exact for the polynomial part and nearly so
# for the sphere field; float32 round-off), PDF 1.1 % (early-stopped fit of sources far out).
@pytest.mark.parametrize(
    "method,bound",
    [("sharp", 0.05), ("vsharp", 0.05), ("resharp", 0.05), ("pdf", 1.5), ("lbv", 1.5)],
)
def test_harmonic_background_is_removed(method, bound, phantom):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    f = _harmonic_background(brain.shape, vs, brain)
    local, m = bg.remove_background(f, brain, vs, method=method)
    rel = 100 * np.linalg.norm(_demeaned(local, m)) / np.linalg.norm(_demeaned(f, m))
    assert rel < bound, rel


def _deep_sources(phantom, radius_mm=6.0):
    """chi (ppm) of two small balls at least ``radius_mm`` inside the 6 mm eroded mask."""
    vs, brain = phantom.voxel_size, phantom.brain_mask
    deep = bg.erode_mask_smv(brain, vs, 6.0 + radius_mm + 6.0)
    pts = np.argwhere(deep)
    centre = pts.mean(axis=0)
    a = pts[np.argmin(np.abs(pts - centre).sum(axis=1))]
    b = pts[np.argmax(((pts - a) * vs) @ np.ones(3))]
    chi = np.zeros(brain.shape)
    for c, val in ((a, 0.2), (b, -0.1)):
        x, y, z = _grid_mm(brain.shape, vs, c)
        chi += val * (x**2 + y**2 + z**2 <= radius_mm**2)
    return chi


# measured relative error in the returned mask: SHARP with a small truncation (1e-3) 0.4 %
# (exact up to the lost mean: the high-passed field lies inside the eroded mask), default
# SHARP 12.8 %, V-SHARP 6.4 %, RESHARP 9.6 %, PDF 14.7 % (the part of the field that looks
# harmonic in the mask: truncated, regularised or fitted away).
@pytest.mark.parametrize(
    "method,kw,bound",
    [
        ("sharp", {"threshold": 1e-3}, 1.0),
        ("sharp", {}, 15.0),
        ("vsharp", {}, 8.0),
        ("resharp", {}, 11.0),
        ("pdf", {}, 17.0),
        ("lbv", {}, 17.0),
    ],
)
def test_local_sources_inside_the_mask_are_kept(method, kw, bound, phantom):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    chi = _deep_sources(phantom)
    f = forward_field(chi, vs) * HZ_PER_PPM
    local, m = bg.remove_background(f, brain, vs, method=method, **kw)
    assert _errors(local, f, m)[0] < bound


@pytest.mark.parametrize("voxel_size", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5), (0.8, 1.2, 3.0)])
def test_lbv_recovers_a_local_field_that_vanishes_on_the_boundary(voxel_size):
    # closed form: the 7-point Laplacian is exact for quadratics, so a harmonic quadratic
    # background (in mm, anisotropic voxels included) is removed exactly and any local field
    # that is zero on the mask's boundary voxels comes back to the solver tolerance.
    shape = (40, 44, 24)
    vs = np.asarray(voxel_size)
    c = (np.asarray(shape) - 1) / 2 * vs
    x, y, z = (np.indices(shape).T * vs).T - c[:, None, None, None]
    brain = (x / 18) ** 2 + (y / 20) ** 2 + (z / 26) ** 2 <= 1
    inner = ndi.binary_erosion(brain, ndi.generate_binary_structure(3, 1))
    rng = np.random.default_rng(3)
    local = np.where(inner, ndi.gaussian_filter(rng.standard_normal(shape), 2.0), 0.0)
    background = 40 + 5 * x - 3 * z + 0.2 * (x**2 - z**2) + 0.1 * (y**2 - z**2) + 0.3 * x * y
    info = {}
    out, m = bg.lbv(local + background, brain, tuple(vs), info=info)
    np.testing.assert_array_equal(m, brain)
    assert info["converged"] and info["unknowns"] == int(inner.sum())
    rel = np.linalg.norm(out - local) / np.linalg.norm(local)
    assert rel < 1e-4, rel


def test_lbv_preconditioner_cuts_iterations_not_accuracy(phantom, phantom_fields):
    # bounds from the goal, before measuring here: at least 4x fewer CG iterations to the same
    # relative residual, and the same local field to the scale of the solver tolerance
    from qsmprep.recon._backend import count_ffts

    vs, brain = phantom.voxel_size, phantom.brain_mask
    total = phantom_fields["total_hz"]
    plain, pre = {}, {}
    ref, _ = bg.lbv(total, brain, vs, precondition=False, info=plain)
    with count_ffts() as ffts:
        out, _ = bg.lbv(total, brain, vs, info=pre)
    assert plain["converged"] and pre["converged"]
    assert pre["residual"] <= 1e-6 and plain["residual"] <= 1e-6
    assert pre["iterations"] * 4 <= plain["iterations"], (pre, plain)
    assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref)
    # each preconditioner step is a DST pair, counted as FFTs of twice (n + 1) points per axis
    assert len(ffts) >= 2 * pre["iterations"] and len(ffts) % 2 == 0
    assert all(kind == "r" and all(n % 2 == 0 for n in s) for kind, s in ffts.calls)


def test_lbv_peel_in_mm(phantom, phantom_fields):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    full, m0 = bg.lbv(phantom_fields["total_hz"], brain, vs)
    peeled, m3 = bg.lbv(phantom_fields["total_hz"], brain, vs, peel=3.0)
    dist = ndi.distance_transform_edt(np.pad(brain, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(m0, brain)
    np.testing.assert_array_equal(m3, brain & (dist > 3.0))
    np.testing.assert_array_equal(peeled[m3], full[m3])
    assert np.all(peeled[~m3] == 0)


def test_linear_in_the_field_so_unit_free(phantom, phantom_fields):
    # alpha and the CG tolerances are unit-free: ppm in gives the Hz result / 127.7 out.
    # (tfibg takes Hz and B0: tests/recon/test_recon_background_tfi.py)
    vs, brain = phantom.voxel_size, phantom.brain_mask
    for method in HARMONIC:
        hz, m1 = bg.remove_background(phantom_fields["total_hz"], brain, vs, method=method)
        ppm, m2 = bg.remove_background(phantom_fields["total_ppm"], brain, vs, method=method)
        np.testing.assert_array_equal(m1, m2)
        rel = np.linalg.norm(ppm * HZ_PER_PPM - hz) / np.linalg.norm(hz)
        assert rel < 1e-4, (method, rel)  # measured <= 5e-6 (float32 round-off)


def test_pdf_honours_oblique_b0(phantom):
    # total field simulated with B0 tilted 25 degrees from the array's third axis, with the
    # continuous kernel that PDF fits (the check is that PDF uses b0_dir, not kernel mismatch)
    b0_dir = (np.sin(np.radians(25.0)), 0.0, np.cos(np.radians(25.0)))
    fields = simulate_fields(phantom, b0_dir=b0_dir, kernel="continuous")
    vs, brain = phantom.voxel_size, phantom.brain_mask
    right, m = bg.pdf(fields["total_hz"], brain, vs, b0_dir=b0_dir)
    wrong, _ = bg.pdf(fields["total_hz"], brain, vs, b0_dir=(0.0, 0.0, 1.0))
    e_right = _errors(right, fields["local_hz"], m)[0]
    e_wrong = _errors(wrong, fields["local_hz"], m)[0]
    # measured 69 % with the right direction, 163 % with the axial one
    assert e_right < 76 and e_wrong > 2 * e_right


def test_pdf_weight_discounts_noisy_voxels(phantom, phantom_fields):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    rng = np.random.default_rng(3)
    sigma = np.full(brain.shape, NOISE_HZ, np.float32)
    sigma[:, :, : brain.shape[2] // 2 - 4] *= 20  # lower part of the brain: 10 Hz noise
    noisy = phantom_fields["total_hz"] + rng.normal(0.0, 1.0, brain.shape) * sigma
    quiet = brain & (sigma == NOISE_HZ)
    plain, _ = bg.pdf(noisy, brain, vs)
    weighted, _ = bg.pdf(noisy, brain, vs, weight=1.0 / sigma)
    truth = phantom_fields["local_hz"]
    # where the data are good, the weighted fit is better: measured 65.6 % vs 78.0 %
    assert _errors(weighted, truth, quiet)[0] < 0.92 * _errors(plain, truth, quiet)[0]


def test_pdf_erode_peels_voxel_layers(phantom, phantom_fields):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    local, m = bg.pdf(phantom_fields["total_hz"], brain, vs, erode=1)
    np.testing.assert_array_equal(m, ndi.binary_erosion(brain))
    assert np.all(local[~m] == 0)


# ---------------------------------------------------------------------- masks, info, FFTs


@pytest.mark.parametrize("radius", [3.0, 6.0, 7.5])
def test_smv_erosion_matches_morphological_erosion(radius, phantom):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    reach = [int(radius // v) for v in vs]
    ball = np.fft.fftshift(sphere_mask([2 * r + 1 for r in reach], vs, radius))
    expected = ndi.binary_erosion(brain, structure=ball)
    np.testing.assert_array_equal(bg.erode_mask_smv(brain, vs, radius), expected)


def test_vsharp_mask_and_default_radii(phantom, phantom_fields):
    assert bg.vsharp_radii((1.0, 1.0, 1.0)) == tuple(float(r) for r in range(12, 1, -1))
    assert bg.vsharp_radii(2.0) == (12.0, 10.0, 8.0, 6.0, 4.0)
    assert bg.vsharp_radii((3.0, 3.0, 3.0)) == (12.0, 9.0, 6.0)
    vs, brain = phantom.voxel_size, phantom.brain_mask
    info = {}
    with count_ffts() as c:
        _, m = bg.vsharp(phantom_fields["total_hz"], brain, vs, radii=(4.5, 9.0), info=info)
    assert info["radii"] == (9.0, 4.5)
    np.testing.assert_array_equal(m, bg.erode_mask_smv(brain, vs, 4.5))
    assert len(c) == 3 * 2 + 4


def test_resharp_info_and_fft_count(phantom, phantom_fields):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    info = {}
    with count_ffts() as c:
        bg.resharp(phantom_fields["total_hz"], brain, vs, info=info)
    assert info["converged"] and 0 < info["iterations"] < 300 and info["residual"] <= 3e-3
    assert len(c) == 9 + 4 * info["iterations"]  # preconditioned: two FFT pairs each
    # the crop to the mask box keeps the FFT grid well below the 64 x 64 x 48 volume
    assert np.prod(info["grid"]) < 0.8 * brain.size
    info = {}
    bg.resharp(phantom_fields["total_hz"], brain, vs, max_iter=3, info=info)
    assert info["iterations"] == 3 and not info["converged"] and info["residual"] > 3e-3
    with count_ffts() as c:
        bg.sharp(phantom_fields["total_hz"], brain, vs)
    assert len(c) == 7
    info = {}
    with count_ffts() as c:
        bg.pdf(phantom_fields["total_hz"], brain, vs, info=info)
    assert info["converged"] and len(c) == 2 + 4 * info["iterations"]


def test_nan_outside_the_mask_is_ignored(phantom, phantom_fields):
    vs, brain = phantom.voxel_size, phantom.brain_mask
    f = phantom_fields["total_hz"].copy()
    ref, _ = bg.sharp(f, brain, vs)
    f[~brain] = np.nan
    out, _ = bg.sharp(f, brain, vs)
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("method", HARMONIC)  # tfibg: tests/recon/test_recon_background_tfi.py
def test_torch_matches_numpy(method, phantom, phantom_fields):
    torch = pytest.importorskip("torch")
    vs, brain = phantom.voxel_size, phantom.brain_mask
    total = phantom_fields["total_hz"]
    ref, m_ref = bg.remove_background(total, brain, vs, method=method)
    out, m = bg.remove_background(
        torch.from_numpy(total), torch.from_numpy(brain), vs, method=method, device="torch"
    )
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(m, m_ref)
    # measured 2.5e-6 to 4.2e-6 (float32 SMV methods), 6e-7 (PDF, float64 iterations)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


# ------------------------------------------------------------------------------ bad input


def _bad_cases():
    f = np.zeros((8, 9, 10), np.float32)
    m = np.zeros((8, 9, 10), bool)
    m[2:6, 2:7, 2:8] = True
    nan = f.copy()
    nan[3, 3, 3] = np.nan
    return [
        ((f, m[:, :, :-1], 1.0), {}, "same voxel grid"),
        ((f, np.zeros_like(m), 1.0), {}, "all zero"),
        ((nan, m, 1.0), {}, "non-finite"),
        ((f, m, (1.0, 0.0, 1.0)), {}, "voxel_size"),
        ((f, m, -2.0), {}, "voxel_size"),
        ((f[..., None], m, 1.0), {}, "3D"),
        ((f, m, 1.0), {"method": "ismv"}, "unknown background"),
        ((f, m, 1.0), {"method": "lbv", "tol": 0.0}, "tol"),
        ((f, m, 1.0), {"method": "lbv", "peel": -1.0}, "peel"),
        ((f, m, 1.0), {"method": "lbv", "peel": 9.0}, "peel"),
        ((f, m, 1.0), {"method": "sharp", "radius": 0.5}, "radius"),
        ((f, m, 1.0), {"method": "vsharp", "radii": ()}, "radii"),
        ((f, m, 1.0), {"method": "resharp", "alpha": 0.0}, "alpha"),
        ((f, m, 1.0), {"method": "resharp", "tol": -1.0}, "tol"),
        ((f, m, 1.0), {"method": "pdf", "b0_dir": (0, 0, 0)}, "b0_dir"),
        ((f, m, 1.0), {"method": "pdf", "weight": -np.ones_like(f)}, "weight"),
        ((f, m, 1.0), {"method": "pdf", "weight": np.ones((8, 9, 9))}, "weight"),
        ((f, m, 1.0), {"method": "pdf", "erode": 5}, "erosions"),
        ((f, m, 1.0), {"method": "sharp", "radius": 3.0}, "smaller radius"),
        ((f, m, 1.0), {"method": "vsharp", "radii": (3.0, 2.0)}, "smaller radius"),
        ((f, m, 1.0), {"method": "sharp", "threshold": 1.5}, "threshold"),
        ((f.astype(np.complex64), m, 1.0), {}, "real array"),
    ]


@pytest.mark.parametrize("args,kw,match", _bad_cases())
def test_bad_input(args, kw, match):
    kw = {"method": "resharp", **kw}
    with pytest.raises(ValueError, match=match):
        bg.remove_background(*args, **kw)


def test_resharp_on_oblique_simulation_is_as_good_as_axial(phantom):
    # The simulator's finite-difference kernel for oblique background sources keeps the
    # background harmonic in the brain; with the continuous kernel the 9.4 ppm air edges ring
    # at the Nyquist frequency and RESHARP cannot remove it. Measured on the 3 mm phantom,
    # B0 tilted 20 degrees: axial 42.9 %, tilted 41.3 %, tilted with the continuous kernel 217 %.
    from qsmprep.sim.bids import tilt_affine

    tilted = dataclasses.replace(phantom, affine=tilt_affine(phantom.affine, 20.0))
    vs, brain = phantom.voxel_size, phantom.brain_mask
    errs = {}
    for name, ph, kernel in (
        ("axial", phantom, "auto"),
        ("tilted", tilted, "auto"),
        ("tilted_continuous", tilted, "continuous"),
    ):
        f = simulate_fields(ph, kernel=kernel)
        local, m = bg.resharp(f["total_hz"], brain, vs)
        errs[name] = _errors(local, f["local_hz"], m)[0]
    assert errs["tilted"] < 1.3 * errs["axial"], errs
    assert errs["tilted_continuous"] > 2 * errs["tilted"], errs


def test_cross_check_falls_back_where_lbv_fails(phantom, phantom_fields):
    # our phantom: tissue of -0.5 ppm borders the brain and LBV is far off (xfail above); the
    # cross-check against V-SHARP catches it and returns RESHARP's result
    vs, brain = phantom.voxel_size, phantom.brain_mask
    total = phantom_fields["total_hz"]
    local, m, check = bg.remove_background_checked(total, brain, vs, method="lbv")
    ref, ref_m = bg.resharp(total, brain, vs)
    assert check["fell_back"] and check["method"] == "resharp" and check["against"] == "vsharp"
    assert check["disagreement"] > bg.MAX_DISAGREEMENT
    np.testing.assert_array_equal(local, ref)
    np.testing.assert_array_equal(m, ref_m)
    # compared with the fallback itself, its one result serves both (the earlier default)
    local2, m2, check2 = bg.remove_background_checked(
        total, brain, vs, method="lbv", check_with="resharp"
    )
    assert check2["fell_back"] and check2["against"] == "resharp"
    assert check2["disagreement"] > bg.MAX_DISAGREEMENT
    np.testing.assert_array_equal(local2, ref)
    np.testing.assert_array_equal(m2, ref_m)
    # eroding methods are not checked
    _, _, c2 = bg.remove_background_checked(total, brain, vs, method="sharp")
    assert c2 == {"method": "sharp"}


def test_cross_check_keeps_lbv_where_it_holds(monkeypatch):
    # a local field that vanishes on the mask boundary plus a harmonic background: LBV is
    # exact there, RESHARP close, so no fallback
    shape, vs = (48, 48, 40), (2.0, 2.0, 2.0)
    x, y, z = (np.indices(shape).T * np.asarray(vs)).T - 47.0
    brain = (x / 40) ** 2 + (y / 38) ** 2 + (z / 32) ** 2 <= 1
    inner = ndi.binary_erosion(brain, ndi.generate_binary_structure(3, 1))
    chi = np.zeros(shape)
    chi[20:28, 22:30, 18:24] = 0.1  # a deep source
    local = forward_field(chi, vs) * HZ_PER_PPM
    # zero on the boundary layer: LBV's assumption holds exactly
    local = np.where(inner, local, 0.0)
    background = 3.0 * x - 2.0 * z + 0.05 * (x**2 - y**2)
    calls = []
    run = bg.remove_background

    def spy(*args, method, **kwargs):
        calls.append(method)
        return run(*args, method=method, **kwargs)

    monkeypatch.setattr(bg, "remove_background", spy)
    out, m, check = bg.remove_background_checked(local + background, brain, vs, method="lbv")
    assert not check["fell_back"] and check["method"] == "lbv", check
    np.testing.assert_array_equal(m, brain)
    # the check costs one V-SHARP; RESHARP, the fallback, runs only when it is needed
    assert calls == ["lbv", "vsharp"], calls
