"""Image-quality metrics: closed forms, the published scoring code, and the QSM-CI scorer."""

import math

import numpy as np
import pytest
from scipy import ndimage

from qsmprep import metrics

N = 64


def _brain(n=N, seed=0):
    """Smooth random chi (ppm) in an ellipsoidal 'brain' mask, with six deep-grey 'nuclei'.

    Texture: white noise smoothed by a Gaussian (sigma 2 voxels), 0.03 ppm std in the mask;
    nuclei: balls of radius 4 voxels, +0.06 ... +0.18 ppm, labels 1-6; the rest of the mask is
    label 8. Chi is 0 outside the mask.
    """
    rng = np.random.default_rng(seed)
    g = np.indices((n,) * 3).astype(float) - (n - 1) / 2
    mask = (g[0] / 26) ** 2 + (g[1] / 22) ** 2 + (g[2] / 20) ** 2 <= 1
    chi = ndimage.gaussian_filter(rng.standard_normal((n,) * 3), 2.0)
    chi *= 0.03 / chi[mask].std()
    labels = np.where(mask, 8, 0)
    centres = [(-8, -6, 0), (8, -6, 0), (-6, 6, 2), (6, 6, -2), (0, 12, -8), (0, -12, 6)]
    values = [0.06, 0.18, 0.10, 0.14, 0.12, 0.16]
    for lab, (c, v) in enumerate(zip(centres, values, strict=True), start=1):
        ball = sum((g[k] - c[k]) ** 2 for k in range(3)) <= 16
        chi[ball] += v
        labels[ball] = lab
    return np.where(mask, chi, 0.0), mask, labels


@pytest.fixture(scope="module")
def brain():
    return _brain()


@pytest.fixture(scope="module")
def degraded(brain):
    """Strongly degraded (blur 0.8 voxel, scale 0.85, offset 0.01 ppm, noise 0.01 ppm) and
    mildly degraded (scale 0.95, noise 0.003 ppm) copies of the reference."""
    chi, _, _ = brain
    rng = np.random.default_rng(1)
    strong = (
        0.85 * ndimage.gaussian_filter(chi, 0.8) + 0.01 + 0.01 * rng.standard_normal(chi.shape)
    )
    mild = 0.95 * chi + 0.003 * rng.standard_normal(chi.shape)
    return strong, mild


# ----------------------------------------------------------------------------- closed forms


def test_identical_maps_score_perfectly(brain):
    chi, mask, labels = brain
    for convention in ("challenge", "qsm_ci"):
        res = metrics.evaluate(chi, chi, mask, labels, convention=convention)
        # exact up to float64 rounding of sums over ~5e4 voxels
        for key in ("nrmse", "nrmse_detrend", "nrmse_raw", "hfen"):
            assert res[key] < 1e-10, key
        for key in ("ssim", "xsim", "corr", "slope", "roi_slope", "coverage"):
            assert res[key] == pytest.approx(1.0, abs=1e-10), key
        assert abs(res["intercept"]) < 1e-12
        assert res["psnr"] == math.inf
        assert res["psnr_all255"] == math.inf
        assert res["n_voxels"] == int(mask.sum())


def test_affine_recon_closed_forms(brain):
    """recon = a * ref + b: slope a, intercept b, de-meaned NRMSE 100 |a - 1|, detrended 0."""
    chi, mask, labels = brain
    a, b = 0.8, 0.02
    rec = a * chi + b
    assert metrics.nrmse(rec, chi, mask) == pytest.approx(100 * abs(a - 1), rel=1e-10)
    assert metrics.nrmse(rec, chi, mask, detrend=True) < 1e-10
    fit = metrics.regression(rec, chi, mask)
    assert fit.slope == pytest.approx(a, rel=1e-12)
    assert fit.intercept == pytest.approx(b, rel=1e-10)
    assert metrics.correlation(rec, chi, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.correlation(-rec, chi, mask) == pytest.approx(-1.0, abs=1e-12)
    assert metrics.roi_slope(rec, chi, labels, mask=mask) == pytest.approx(a, rel=1e-10)
    # Without de-meaning the offset counts: ||(a-1) t + b|| / ||t|| over the mask.
    t = chi[mask]
    expected = 100 * np.linalg.norm((a - 1) * t + b) / np.linalg.norm(t)
    assert metrics.nrmse(rec, chi, mask, demean=False) == pytest.approx(expected, rel=1e-10)
    # A pure offset is invisible to the de-meaned NRMSE and to the correlation.
    assert metrics.nrmse(chi + 0.05, chi, mask) < 1e-10


def test_nrmse_of_white_noise(brain):
    """recon = ref + white noise of std s: NRMSE -> 100 s sqrt(N) / ||t - mean(t)||."""
    chi, mask, _ = brain
    s = 0.005
    t = chi[mask]
    expected = 100 * s * np.sqrt(t.size) / np.linalg.norm(t - t.mean())
    for seed in range(3):
        rec = chi + s * np.random.default_rng(10 + seed).standard_normal(chi.shape)
        # The noise norm fluctuates by ~sqrt(1/(2N)) = 0.3 % (N = 47912); measured deviations
        # for seeds 10-14 were within 0.8 %; bound 2 %.
        assert metrics.nrmse(rec, chi, mask) == pytest.approx(expected, rel=0.02)


def test_psnr_closed_forms(brain):
    chi, mask, _ = brain
    c = 0.004
    data_range = chi[mask].max() - chi[mask].min()
    # In-mask variant: MSE = c^2 exactly for a constant offset.
    expected = 20 * np.log10(data_range / c)
    assert metrics.psnr(chi + c, chi, mask) == pytest.approx(expected, rel=1e-12)

    # all255 variant, positive maps: the min over all voxels is the background 0, so no shift;
    # scale 255 / M with M = max(ref) + c; MSE averaged over all N_all voxels:
    # PSNR = 10 log10(M^2 N_all / (c^2 N_mask)).
    pos = np.where(mask, chi - chi[mask].min() + 0.01, 0.0)
    m_peak = pos.max() + c
    expected = 10 * np.log10(m_peak**2 * mask.size / (c**2 * mask.sum()))
    got = metrics.psnr(pos + c, pos, mask, variant="all255")
    assert got == pytest.approx(expected, rel=1e-12)
    # ... and it grows by 10 log10(N2 / N1) when the zero background grows.
    big = np.pad(pos, 16)
    got_big = metrics.psnr(big + c, big, np.pad(mask, 16), variant="all255")
    assert got_big - got == pytest.approx(10 * np.log10(big.size / pos.size), rel=1e-10)
    # The in-mask variant does not depend on the field of view.
    assert metrics.psnr(big + c, big, np.pad(mask, 16)) == pytest.approx(
        metrics.psnr(pos + c, pos, mask), rel=1e-12
    )


def test_challenge_log_kernel_matches_explicit_15cube():
    """The separable LoG equals compute_hfen.m's explicit 15^3 kernel (zero-mean, correlated
    with zero padding), and annihilates constants and linear ramps away from the border."""
    rng = np.random.default_rng(3)
    x = ndimage.gaussian_filter(rng.standard_normal((32, 30, 28)), 1.0)
    sigma, size = 1.5, 15
    u = np.arange(size) - 7.0
    gx, gy, gz = np.meshgrid(u, u, u, indexing="ij")
    h = np.exp(-(gx**2 + gy**2 + gz**2) / (2 * sigma**2))
    h /= h.sum()
    kern = h * ((gx**2 + gy**2 + gz**2) / sigma**4 - 3 / sigma**2)
    kern -= kern.sum() / size**3
    ref = ndimage.correlate(x, kern, mode="constant", cval=0.0)
    got = metrics._log_challenge(x, sigma, size)
    # float64 rounding only
    assert np.max(np.abs(got - ref)) < 1e-12 * np.max(np.abs(ref))

    inner = (slice(7, -7),) * 3
    ramp = 1.0 + np.tensordot(np.array([0.3, -0.2, 0.5]), np.indices((32, 30, 28)), 1)
    # the kernel sums to 0 and is symmetric: exact zero up to rounding (measured ~1e-15)
    assert np.max(np.abs(metrics._log_challenge(ramp, sigma, size)[inner])) < 1e-12


def test_xsim_challenge_equals_two_term_ssim():
    """Milovic's l * c * s product with C3 = C2 equals the two-term SSIM formula."""
    rng = np.random.default_rng(4)
    a = 0.05 * ndimage.gaussian_filter(rng.standard_normal((24,) * 3), 1.5)
    b = 0.8 * a + 0.01 * rng.standard_normal(a.shape)
    u = np.arange(-3, 4)
    gx, gy, gz = np.meshgrid(u, u, u, indexing="ij")
    w = np.exp(-(gx**2 + gy**2 + gz**2) / (2 * 1.5**2))
    w /= w.sum()

    def f(x):  # convn(x, w, 'same') with zero padding
        return ndimage.convolve(x, w, mode="constant", cval=0.0)

    mu1, mu2 = f(a), f(b)
    v1, v2, cov = f(a * a) - mu1**2, f(b * b) - mu2**2, f(a * b) - mu1 * mu2
    c1, c2 = 1e-4, 1e-6
    two_term = (2 * mu1 * mu2 + c1) * (2 * cov + c2) / ((mu1**2 + mu2**2 + c1) * (v1 + v2 + c2))
    got = metrics._xsim_challenge_map(a, b)
    assert np.max(np.abs(got - two_term)) < 1e-10  # rounding only (measured ~1e-15)


def test_ssim_equals_skimage_scalar_on_full_interior():
    """With the mask = volume minus the 5-voxel border, the masked mean of the SSIM map is
    skimage's scalar SSIM (which averages the border-cropped map)."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(5)
    t = 0.05 * ndimage.gaussian_filter(rng.standard_normal((40,) * 3), 2.0)
    r = t + 0.01 * rng.standard_normal(t.shape)
    mask = np.zeros(t.shape, bool)
    mask[5:-5, 5:-5, 5:-5] = True
    # The maps are zeroed outside the mask first, so compare on zeroed maps.
    tz, rz = np.where(mask, t, 0), np.where(mask, r, 0)
    expected = structural_similarity(
        rz,
        tz,
        data_range=tz[mask].max() - tz[mask].min(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert metrics.ssim(r, t, mask) == pytest.approx(expected, rel=1e-12)
    # SSIM with the default data range is invariant to a common scaling of both maps.
    assert metrics.ssim(7 * r, 7 * t, mask) == pytest.approx(expected, rel=1e-9)


def test_metrics_order_degradations(brain, degraded):
    """Every metric ranks the mild degradation above the strong one."""
    chi, mask, _ = brain
    strong, mild = degraded
    rs = metrics.evaluate(strong, chi, mask)
    rm = metrics.evaluate(mild, chi, mask)
    for key in ("nrmse", "nrmse_detrend", "nrmse_raw", "hfen"):
        assert rm[key] < rs[key], key
    for key in ("ssim", "xsim", "psnr", "psnr_all255", "corr"):
        assert rm[key] > rs[key], key


# ----------------------------------------------------------------------------- QSM-CI scorer


def test_qsm_ci_convention_reproduces_qsm_ci(brain, degraded):
    """evaluate(convention='qsm_ci') gives qsm_ci.qsm_eval.score_arrays' numbers."""
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    chi, mask, labels = brain
    for rec in degraded:
        ref, _ = qsm_eval.score_arrays(rec, chi, mask.astype(np.uint8), seg=labels)
        ours = metrics.evaluate(
            rec, chi, mask, labels, convention="qsm_ci", roi_ids=metrics.DGM_LABELS
        )
        pairs = {
            "nrmse": "nrmse",
            "nrmse_detrend": "nrmse_detrend",
            "hfen": "hfen",
            "xsim": "xsim",
            "correlation": "corr",
            "coverage": "coverage",
            "dgm_linearity": "roi_linearity",
        }
        # Same definitions, float64 sums in a different order: measured agreement ~1e-15
        # relative; bound 1e-9.
        for theirs, key in pairs.items():
            assert ours[key] == pytest.approx(ref[theirs], rel=1e-9, abs=1e-12), key
        # The qsm_ci linear fit and ours are the same least-squares line.
        slope, intercept = qsm_eval.linear_fit(chi[mask], rec[mask])
        assert ours["slope"] == pytest.approx(slope, rel=1e-9)
        assert ours["intercept"] == pytest.approx(intercept, rel=1e-9)


def test_challenge_variants_vs_qsm_ci(brain, degraded):
    """The challenge HFEN/XSIM differ from QSM-CI's by construction (HFEN: 15^3 zero-mean
    kernel, zero padding, whole-volume norms vs scipy's 17^3 LoG and in-mask norms; XSIM: 7^3
    Gaussian vs 5^3 uniform window). The measured gaps on these maps: HFEN 2.3 % and 0.2 %
    relative (almost all from the norm region: whole volume vs mask), XSIM 0.0010 and 0.0003
    absolute; bounds 5 % and 0.01."""
    chi, mask, _ = brain
    for rec in degraded:
        h_c = metrics.hfen(rec, chi, mask)
        h_q = metrics.hfen(rec, chi, mask, variant="qsm_ci")
        assert h_c == pytest.approx(h_q, rel=0.05)
        x_c = metrics.xsim(rec, chi, mask)
        x_q = metrics.xsim(rec, chi, mask, variant="qsm_ci")
        assert abs(x_c - x_q) < 0.01
    # ... and the variants agree on the ranking of the two degradations.
    strong, mild = degraded
    for v in ("challenge", "qsm_ci"):
        assert metrics.hfen(mild, chi, mask, variant=v) < metrics.hfen(
            strong, chi, mask, variant=v
        )
        assert metrics.xsim(mild, chi, mask, variant=v) > metrics.xsim(
            strong, chi, mask, variant=v
        )


# ----------------------------------------------------------------------------- ROI statistics


def test_roi_means(brain):
    chi, mask, labels = brain
    stats = metrics.roi_means(chi, labels)
    assert sorted(stats) == [1, 2, 3, 4, 5, 6, 8]
    for lab, s in stats.items():
        v = chi[labels == lab]
        assert s["count"] == v.size
        assert s["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert s["median"] == pytest.approx(np.median(v), rel=1e-12)
        assert s["std"] == pytest.approx(v.std(), rel=1e-12)
    # Float labels holding whole numbers (as read from NIfTI) are accepted; absent ids omitted.
    sub = metrics.roi_means(chi, labels.astype(np.float32), label_ids=[2, 99])
    assert list(sub) == [2]
    assert sub[2] == stats[2]
    # A mask restricts every region.
    half = mask.copy()
    half[: N // 2] = False
    assert metrics.roi_means(chi, labels, [8], mask=half)[8]["count"] == int(
        (half & (labels == 8)).sum()
    )
    with pytest.raises(ValueError, match="integer label"):
        metrics.roi_means(chi, labels + 0.5)


def test_roi_statistics_on_head_phantom():
    """Phantom labels: ROI means are the labelled voxels' means; ROI slope of an affine recon
    is its slope; evaluate's DGM linearity equals QSM-CI's dgm_linearity."""
    sim = pytest.importorskip("qsmprep.sim")
    if not hasattr(sim, "make_head_phantom"):
        pytest.skip("no head phantom")
    ph = sim.make_head_phantom((64, 64, 48), (3.0, 3.0, 3.0), seed=0)
    mask = ph.brain_mask
    chi = np.where(mask, ph.chi.astype(np.float64), 0.0)
    stats = metrics.roi_means(chi, ph.labels, mask=mask)
    for lab in metrics.DGM_LABELS:
        sel = mask & (ph.labels == lab)
        assert stats[lab]["count"] == int(sel.sum())
        assert stats[lab]["mean"] == pytest.approx(chi[sel].mean(), rel=1e-12)
    rec = 0.7 * chi + 0.01
    assert metrics.roi_slope(rec, chi, ph.labels, metrics.DGM_LABELS, mask=mask) == pytest.approx(
        0.7, rel=1e-10
    )
    rng = np.random.default_rng(2)
    rec = 0.9 * ndimage.gaussian_filter(chi, 1.0) + 0.01 * rng.standard_normal(chi.shape)
    res = metrics.evaluate(rec, chi, mask, ph.labels, roi_ids=metrics.DGM_LABELS)
    assert set(res["roi"]) == set(metrics.DGM_LABELS)
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    rec_z = np.where(mask, rec, 0.0)
    assert res["roi_linearity"] == pytest.approx(
        qsm_eval.dgm_linearity(rec_z, chi, ph.labels), rel=1e-9
    )


# ----------------------------------------------------------------------------- validation


def test_validation_errors(brain):
    chi, mask, _ = brain
    with pytest.raises(ValueError, match="same voxel grid"):
        metrics.nrmse(chi[:-1], chi, mask)
    with pytest.raises(ValueError, match="mask is all zero"):
        metrics.xsim(chi, chi, np.zeros_like(mask))
    bad = chi.copy()
    bad[N // 2, N // 2, N // 2] = np.nan
    with pytest.raises(ValueError, match="recon has 1 non-finite"):
        metrics.evaluate(bad, chi, mask)
    with pytest.raises(ValueError, match="reference has 1 non-finite"):
        metrics.hfen(chi, bad, mask)
    with pytest.raises(ValueError, match="constant"):
        metrics.nrmse(chi, np.where(mask, 0.1, 0.0), mask)
    with pytest.raises(ValueError, match="variant"):
        metrics.xsim(chi, chi, mask, variant="matlab")
    with pytest.raises(ValueError, match="variant"):
        metrics.psnr(chi, chi, mask, variant="db")
    with pytest.raises(ValueError, match="3D"):
        metrics.ssim(chi[..., None], chi[..., None], mask[..., None])


def test_values_outside_mask_are_ignored(brain, degraded):
    """NaN or garbage outside the mask scores as the zero-filled recon (documented)."""
    chi, mask, labels = brain
    rec = degraded[0]
    clean = np.where(mask, rec, 0.0)
    dirty = np.where(mask, rec, np.nan)
    dirty[0, 0, 0] = 1e3
    ref_dirty = np.where(mask, chi, 5.0)
    a = metrics.evaluate(clean, chi, mask, labels)
    b = metrics.evaluate(dirty, ref_dirty, mask, labels)
    assert a == b
