"""Direct dipole inversions (TKD, TSVD, closed-form L2) and susceptibility referencing.

Accuracy is measured against the phantom's true chi inside the brain mask with the metrics of
``qsmprep.metrics`` (de-meaned NRMSE and HFEN in %, SSIM, XSIM). The local field is the exact
field of the brain's own sources (``simulate_fields``), so the errors are those of the
inversion alone: mostly streaking from the magic-angle cone, which no single-orientation
direct method can fill, and the smoothing of the regularised ones. The noisy field adds white
Gaussian noise of 0.003 ppm in the mask (about 0.4 Hz at 3 T, the field error of a 5-echo fit
at SNR 100; the recipe shared by every inversion test). Bounds are the measured values plus a
margin of 5 % of the value (errors) or 0.02 (similarities): the data and noise are seeded, so
only floating-point differences between FFT libraries can move them.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep import metrics
from qsmprep.recon import operators
from qsmprep.recon._backend import count_ffts, irfftn, rfftn
from qsmprep.recon.inversion import l2, reference_mean, reference_roi, tkd, tsvd
from qsmprep.recon.inversion.direct import _truncated_inverse
from qsmprep.recon.kernels import b0_dir_from_affine, dipole_kernel
from qsmprep.sim import forward_field

NOISE_PPM = 0.003


def _noisy(local, mask):
    rng = np.random.default_rng(0)
    return (local + rng.normal(0.0, NOISE_PPM, local.shape) * mask).astype(np.float32)


@pytest.fixture(scope="module")
def fields2mm(phantom2mm, phantom2mm_fields):
    local = phantom2mm_fields["local_ppm"]
    return local, _noisy(local, phantom2mm.brain_mask)


METHODS = {
    "tkd": (tkd, {}),
    "tkd_corrected": (tkd, {"correct": True}),
    "tsvd": (tsvd, {}),
    "l2_gradient": (l2, {}),
    "l2_identity": (l2, {"reg": "identity"}),
    "l2_laplacian": (l2, {"reg": "laplacian"}),
}

# Measured on the 2 mm phantom (96 x 96 x 80, seed 0), default parameters (threshold 0.19;
# lam 0.04 mm^2, 0.015, 0.1 mm^4):
#   method          noise-free: NRMSE  HFEN   SSIM   XSIM    noisy: NRMSE  HFEN   SSIM   XSIM
#   tkd                         45.6   47.5   0.768  0.586           58.1   48.9   0.716  0.407
#   tkd_corrected               50.2   52.5   0.741  0.554           68.5   54.6   0.664  0.363
#   tsvd                        56.6   57.0   0.721  0.477           60.5   57.6   0.702  0.404
#   l2_gradient                 53.6   50.8   0.723  0.500           55.9   51.7   0.711  0.450
#   l2_identity                 49.1   50.4   0.772  0.586           55.7   51.2   0.741  0.449
#   l2_laplacian                63.2   54.8   0.637  0.381           64.4   55.9   0.631  0.365
# The Schweser correction scales the whole map by 1/PSF(0) = 1.23, streaks included, so it
# raises NRMSE while fixing the scale (see test_schweser_correction_fixes_the_slope).
MEASURED = {
    "tkd": ((45.6, 47.5, 0.768, 0.586), (58.1, 48.9, 0.716, 0.407)),
    "tkd_corrected": ((50.2, 52.5, 0.741, 0.554), (68.5, 54.6, 0.664, 0.363)),
    "tsvd": ((56.6, 57.0, 0.721, 0.477), (60.5, 57.6, 0.702, 0.404)),
    "l2_gradient": ((53.6, 50.8, 0.723, 0.500), (55.9, 51.7, 0.711, 0.450)),
    "l2_identity": ((49.1, 50.4, 0.772, 0.586), (55.7, 51.2, 0.741, 0.449)),
    "l2_laplacian": ((63.2, 54.8, 0.637, 0.381), (64.4, 55.9, 0.631, 0.365)),
}


def _scores(chi, truth, mask):
    return (
        metrics.nrmse(chi, truth, mask),
        metrics.hfen(chi, truth, mask),
        metrics.ssim(chi, truth, mask),
        metrics.xsim(chi, truth, mask),
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_phantom_accuracy(name, phantom2mm, fields2mm):
    fn, kwargs = METHODS[name]
    brain, vs = phantom2mm.brain_mask, phantom2mm.voxel_size
    b0 = b0_dir_from_affine(phantom2mm.affine)
    for field, measured in zip(fields2mm, MEASURED[name], strict=True):
        chi = fn(field, brain, vs, b0_dir=b0, **kwargs)
        assert chi.dtype == np.float32 and chi.shape == brain.shape
        assert np.all(chi[~brain] == 0) and np.all(np.isfinite(chi))
        nrmse, hfen, ssim, xsim = _scores(chi, phantom2mm.chi, brain)
        assert nrmse < 1.05 * measured[0], nrmse
        assert hfen < 1.05 * measured[1], hfen
        assert ssim > measured[2] - 0.02, ssim
        assert xsim > measured[3] - 0.02, xsim


def test_schweser_correction_fixes_the_slope(phantom2mm, fields2mm):
    # Regression slope of recon on truth (brain mask), measured: TKD 0.760 (clean) / 0.761
    # (noisy), corrected 0.984 / 0.985; PSF(0) = 0.773 on this grid. The corrected map is the
    # plain one divided by PSF(0), exactly (float32 round-off).
    brain, vs = phantom2mm.brain_mask, phantom2mm.voxel_size
    for field in fields2mm:
        info = {}
        plain = tkd(field, brain, vs, info=info)
        corrected = tkd(field, brain, vs, correct=True)
        np.testing.assert_allclose(corrected, plain / info["psf0"], rtol=1e-4, atol=1e-6)
        s_plain = metrics.regression(plain, phantom2mm.chi, brain).slope
        s_corr = metrics.regression(corrected, phantom2mm.chi, brain).slope
        assert abs(1 - s_corr) < abs(1 - s_plain)
        assert 0.72 < s_plain < 0.80 and 0.95 < s_corr < 1.02, (s_plain, s_corr)


# ------------------------------------------------------------------------------------ sphere


@pytest.fixture(scope="module")
def sphere():
    """Unit-chi ball of radius 10 mm centred in a 64 mm cube at 1 mm, oblique B0."""
    shape, vs = (64, 64, 64), (1.0, 1.0, 1.0)
    axes = [(np.arange(n) - n / 2 + 0.5) * d for n, d in zip(shape, vs, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    b0 = np.array([0.3, -0.2, 1.0]) / np.linalg.norm([0.3, -0.2, 1.0])
    return {"r": r, "vs": vs, "b0": b0, "field": forward_field((r <= 10.0) * 1.0, vs, b0)}


# Ratio of the recovered to the true chi at the centre (mean over the voxels within 3 mm),
# after referencing to the background (voxels more than 13 mm from the centre). The mask is the
# whole cube, so the field is known around the sphere: with a tight mask the truncated far
# field biases every single-orientation method low (an ellipsoidal mask 12 mm outside the
# sphere gave TKD-corrected 0.92). Measured: TKD corrected 1.026, L2 gradient 0.917,
# L2 Laplacian 0.978. The classic TKD is low by about 1 - PSF(0) (0.829 for PSF(0) = 0.808),
# which is why the sphere test uses the corrected variant; TSVD is low (0.702) and its
# correction overshoots (1.149) because the cone it zeroes holds less of a compact object's
# spectrum than of the k-space cube; identity-L2 shrinks chi itself (0.690).
SPHERE_WITHIN_10 = {
    "tkd_corrected": (tkd, {"correct": True}),
    "l2_gradient": (l2, {}),
    "l2_laplacian": (l2, {"reg": "laplacian"}),
}
SPHERE_BIASED = {  # name: (function, kwargs, (low, high) bounds on the ratio)
    "tkd": (tkd, {}, (0.80, 0.86)),
    "tsvd": (tsvd, {}, (0.67, 0.73)),
    "tsvd_corrected": (tsvd, {"correct": True}, (1.10, 1.20)),
    "l2_identity": (l2, {"reg": "identity"}, (0.65, 0.72)),
}


def _centre_ratio(fn, kwargs, sphere, chi0):
    r, vs, b0 = sphere["r"], sphere["vs"], sphere["b0"]
    mask = np.ones(r.shape, bool)
    chi = fn(chi0 * sphere["field"], mask, vs, b0_dir=b0, **kwargs)
    chi = reference_roi(chi, mask, r > 13.0)
    return float(chi[r <= 3.0].mean()) / chi0


@pytest.mark.parametrize("chi0", [0.2, -0.1])
@pytest.mark.parametrize("name", sorted(SPHERE_WITHIN_10))
def test_sphere_centre(name, chi0, sphere):
    fn, kwargs = SPHERE_WITHIN_10[name]
    ratio = _centre_ratio(fn, kwargs, sphere, chi0)
    assert abs(ratio - 1.0) < 0.10, ratio


@pytest.mark.parametrize("name", sorted(SPHERE_BIASED))
def test_sphere_centre_known_bias(name, sphere):
    fn, kwargs, (lo, hi) = SPHERE_BIASED[name]
    assert lo < _centre_ratio(fn, kwargs, sphere, -0.1) < hi


# ------------------------------------------------------------------------------ closed forms


def _periodic_setup(threshold=None):
    """A random chi band-limited to |D| > threshold on a periodic grid, and its field."""
    shape, vs = (32, 30, 24), (0.8, 1.0, 1.5)
    b0 = np.array([0.2, 0.4, 1.0]) / np.linalg.norm([0.2, 0.4, 1.0])
    rng = np.random.default_rng(3)
    d = dipole_kernel(shape, vs, b0, dtype=np.float64)
    spec = rfftn(rng.normal(size=shape))
    if threshold is not None:
        spec = spec * (np.abs(d) > threshold)
    chi = irfftn(spec, s=shape)
    chi -= chi.mean()
    field = irfftn(d * rfftn(chi), s=shape)
    return chi, field, np.ones(shape, bool), vs, b0


@pytest.mark.parametrize("fn", [tkd, tsvd])
def test_truncated_division_exact_outside_the_cone(fn):
    # chi without spectrum in the truncated cone is recovered exactly on a periodic grid
    # (full mask, no padding); float32 FFTs leave about 1e-6 of its range.
    chi, field, mask, vs, b0 = _periodic_setup(threshold=0.25)
    out = fn(field, mask, vs, b0_dir=b0, threshold=0.19, pad=0)
    assert np.max(np.abs(out - chi)) < 1e-5 * np.max(np.abs(chi))


def test_truncated_inverse_kernel_convention():
    # k = 0 -> 0; |D| <= thr -> sign(D) / thr with sign(0) = +1; else 1 / D (TKD); 0 (TSVD).
    d = np.array([[[0.0, 0.0, -0.1, 0.1, 0.5, -0.6]]], dtype=np.float32)
    tkd_inv = _truncated_inverse(d, 0.2, False, np)
    np.testing.assert_allclose(tkd_inv[0, 0], [0.0, 5.0, -5.0, 5.0, 2.0, -1 / 0.6], rtol=1e-6)
    tsvd_inv = _truncated_inverse(d, 0.2, True, np)
    np.testing.assert_allclose(tsvd_inv[0, 0], [0.0, 0.0, 0.0, 0.0, 2.0, -1 / 0.6], rtol=1e-6)


@pytest.mark.parametrize("fn", [tkd, tsvd, l2])
def test_field_mean_is_ignored(fn):
    # D(0) = 0: a constant field carries no susceptibility information and gives chi = 0.
    mask = np.ones((24, 24, 24), bool)
    out = fn(np.full(mask.shape, 0.05, np.float32), mask, 1.0, pad=0)
    assert np.max(np.abs(out)) < 1e-8


@pytest.mark.parametrize(
    ("reg", "lam"), [("gradient", 0.04), ("identity", 0.015), ("laplacian", 0.1)]
)
def test_l2_solves_its_normal_equations(reg, lam):
    # On a periodic grid the result must satisfy D^T (D chi - f) + lam Gamma^T Gamma chi = 0,
    # with Gamma built from the finite-difference operators (1/mm, anisotropic voxels): this
    # checks the k-space symbol -L = |grad|^2 and the mm units of lam. Residual measured
    # 3e-7 to 1.4e-6 of the data term (float32 FFTs).
    _, field, mask, vs, b0 = _periodic_setup()
    chi = l2(field, mask, vs, b0_dir=b0, lam=lam, reg=reg, pad=0).astype(np.float64)
    shape = chi.shape
    d = dipole_kernel(shape, vs, b0, dtype=np.float64)
    data = irfftn(d * rfftn(irfftn(d * rfftn(chi), s=shape) - field), s=shape)

    def lap(x):
        return operators.div(operators.grad(x, vs), vs)

    reg_term = {"gradient": -lap(chi), "identity": chi, "laplacian": lap(lap(chi))}[reg]
    residual = data + lam * reg_term
    residual -= residual.mean()  # k = 0 is not solved (set to 0)
    assert np.linalg.norm(residual) < 1e-5 * np.linalg.norm(data)


def test_one_fft_pair_on_the_cropped_grid(phantom, phantom_fields):
    # 2 FFTs of the mask's bounding box padded by 20 mm (7 voxels at 3 mm) to a fast length,
    # smaller than the full matrix.
    brain, vs, local = phantom.brain_mask, phantom.voxel_size, phantom_fields["local_ppm"]
    for fn, kwargs in METHODS.values():
        info = {}
        with count_ffts() as counter:
            fn(local, brain, vs, info=info, **kwargs)
        assert len(counter) == 2
        assert np.prod(info["grid"]) < np.prod(brain.shape)
        assert all(c[1] == tuple(info["grid"]) for c in counter.calls)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_matches_numpy(name, phantom, phantom_fields):
    # Same algorithm on torch (CPU) and NumPy/scipy.fft in float32: measured max difference
    # about 2e-7 of the map's range.
    fn, kwargs = METHODS[name]
    brain, vs, local = phantom.brain_mask, phantom.voxel_size, phantom_fields["local_ppm"]
    a = fn(local, brain, vs, **kwargs)
    b = fn(local, brain, vs, device="torch", **kwargs)
    assert isinstance(b, np.ndarray) and b.dtype == np.float32
    assert np.max(np.abs(a - b)) < 1e-5 * np.max(np.abs(a))


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("fn", [tkd, tsvd, l2])
def test_bad_inputs(fn):
    mask = np.zeros((16, 16, 16), bool)
    mask[4:12, 4:12, 4:12] = True
    field = np.zeros(mask.shape, np.float32)
    with pytest.raises(ValueError, match="shape"):
        fn(field, mask[:, :, :8], 1.0)
    with pytest.raises(ValueError, match="all zero"):
        fn(field, np.zeros_like(mask), 1.0)
    bad = field.copy()
    bad[8, 8, 8] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fn(bad, mask, 1.0)
    bad = field.copy()
    bad[0, 0, 0] = np.inf  # outside the mask: ignored
    assert np.all(fn(bad, mask, 1.0) == 0)
    with pytest.raises(ValueError, match="voxel_size"):
        fn(field, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="voxel_size"):
        fn(field, mask, -1.0)
    with pytest.raises(ValueError, match="zero length"):
        fn(field, mask, 1.0, b0_dir=(0, 0, 0))
    with pytest.raises(ValueError, match="3D"):
        fn(field[..., None], mask, 1.0)
    with pytest.raises(ValueError, match="pad"):
        fn(field, mask, 1.0, pad=-1)


def test_bad_parameters():
    mask = np.ones((8, 8, 8), bool)
    field = np.zeros(mask.shape, np.float32)
    for thr in (0.0, -0.1, 0.7, np.nan):
        with pytest.raises(ValueError, match="threshold"):
            tkd(field, mask, 1.0, threshold=thr)
    with pytest.raises(ValueError, match="lam"):
        l2(field, mask, 1.0, lam=-1.0)
    with pytest.raises(ValueError, match="reg"):
        l2(field, mask, 1.0, reg="tv")


# ------------------------------------------------------------------------------ referencing


def _ref_case():
    rng = np.random.default_rng(5)
    chi = rng.normal(0.0, 0.05, (12, 10, 8)) + 0.3
    mask = np.zeros(chi.shape, bool)
    mask[2:10, 2:8, 1:7] = True
    roi = np.zeros(chi.shape, bool)
    roi[3:6, 3:6, 2:5] = True
    return chi, mask, roi


def test_reference_mean_closed_form():
    chi, mask, _ = _ref_case()
    chi[~mask] = np.nan  # never read
    info = {}
    out = reference_mean(chi, mask, info=info)
    assert out.dtype == np.float32 and np.all(out[~mask] == 0)
    assert abs(float(out[mask].mean())) < 1e-7
    np.testing.assert_allclose(out[mask], chi[mask] - chi[mask].mean(), atol=1e-7)
    assert info["offset"] == pytest.approx(chi[mask].mean())


def test_reference_roi_closed_form():
    chi, mask, roi = _ref_case()
    out = reference_roi(chi, mask, roi)
    assert np.all(out[~mask] == 0)
    assert abs(float(out[roi].mean())) < 1e-7
    np.testing.assert_allclose(out[mask], chi[mask] - chi[roi].mean(), atol=1e-7)
    # median: an outlier (calcification) in the ROI does not move the reference
    chi2 = chi.copy()
    chi2[roi] = 0.1
    chi2[4, 4, 3] = 5.0
    info = {}
    out = reference_roi(chi2, mask, roi, statistic="median", info=info)
    assert info["offset"] == pytest.approx(0.1) and info["n_voxels"] == roi.sum()
    np.testing.assert_allclose(out[mask], chi2[mask] - 0.1, atol=1e-6)
    # only the part of the ROI inside the mask counts
    wide = roi.copy()
    wide[0, 0, 0] = True
    chi3 = chi.copy()
    chi3[0, 0, 0] = 100.0
    np.testing.assert_array_equal(reference_roi(chi3, mask, wide), reference_roi(chi, mask, roi))


def test_reference_bad_inputs():
    chi, mask, roi = _ref_case()
    outside = np.zeros_like(roi)
    outside[0, 0, 0] = True
    with pytest.raises(ValueError, match="overlap"):
        reference_roi(chi, mask, outside)
    with pytest.raises(ValueError, match="all zero"):
        reference_roi(chi, mask, np.zeros_like(roi))
    with pytest.raises(ValueError, match="statistic"):
        reference_roi(chi, mask, roi, statistic="mode")
    with pytest.raises(ValueError, match="shape"):
        reference_roi(chi, mask, roi[:, :, :4])
    with pytest.raises(ValueError, match="shape"):
        reference_mean(chi, mask[:, :, :4])
    bad = chi.copy()
    bad[5, 5, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        reference_mean(bad, mask)
    with pytest.raises(ValueError, match="all zero"):
        reference_mean(chi, np.zeros_like(mask))
