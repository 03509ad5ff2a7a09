"""Brain masks from magnitude and from ROMEO phase quality."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from qsmprep.recon.mask import (
    combine_magnitude,
    field_reliability,
    largest_component,
    mask_from_magnitude,
    mask_from_phase_quality,
    phase_quality,
    refine_mask,
    robust_threshold,
    steep_voxels,
)

SCALP = 15
BONE = 13


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _shells(shape, vs):
    """Brain ball (r 45 mm), dark skull (45-53 mm), bright scalp (53-60 mm), in mm."""
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, vs, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = r <= 45
    img = np.where(brain, 1.0, 0.0) + np.where((r > 53) & (r <= 60), 0.9, 0.0)
    # an 8 mm wide bright bridge through the skull (like a vessel or the neck)
    img[(np.abs(y) <= 4) & (np.abs(z) <= 4) & (x > 0) & (r <= 60)] = 0.9
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.03, img.shape) + 1j * rng.normal(0, 0.03, img.shape)
    return np.abs(img + noise), brain


@pytest.mark.parametrize("vs", [(2.0, 2.0, 2.0), (1.5, 1.5, 3.0)])
def test_refine_separates_brain_from_scalp_in_mm(vs):
    shape = tuple(int(round(130 / d)) for d in vs)
    mag, brain = _shells(shape, vs)
    m = mask_from_magnitude(mag, vs)
    # the bridge connects brain and scalp; erosion by 6 mm cuts it. Measured Dice 0.9991 and
    # 0.9995: only a stub of the bridge inside the skull is kept (out to 52.2 and 49.5 mm),
    # no voxel of the scalp (r > 53 mm)
    assert dice(m, brain) > 0.99
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, vs, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    assert not np.any(m & (np.sqrt(x**2 + y**2 + z**2) > 53))
    # without the separation step the scalp (40000-65000 voxels) is kept through the bridge
    m0 = mask_from_magnitude(mag, vs, erode_mm=0)
    assert np.count_nonzero(m0 & ~brain) > 1000


def test_mask_from_magnitude_on_phantom(phantom2mm, gre2mm):
    truth = phantom2mm.brain_mask
    labels = phantom2mm.labels
    for kw in ({}, {"method": "robust"}):
        for mag in (gre2mm.magnitude, gre2mm.magnitude[..., 0]):
            m = mask_from_magnitude(mag, phantom2mm.voxel_size, **kw)
            assert m.dtype == bool and m.shape == truth.shape
            # measured Dice 0.9998 (no voxel outside the brain, 70 edge voxels of ~158000 out)
            assert dice(m, truth) > 0.995
            assert np.count_nonzero(m & (labels == SCALP)) == 0
            assert np.count_nonzero(m & (labels == BONE)) < 50


def test_mask_from_magnitude_3mm(phantom, phantom_fields):
    from qsmprep.sim import simulate_gre

    gre = simulate_gre(phantom, (0.004, 0.012, 0.020), snr=50, seed=2, fields=phantom_fields)
    m = mask_from_magnitude(gre.magnitude, phantom.voxel_size)
    assert dice(m, phantom.brain_mask) > 0.99  # measured 0.9996
    assert np.count_nonzero(m & (phantom.labels == SCALP)) == 0


def test_mask_from_phase_quality_on_phantom(phantom2mm, gre2mm):
    truth = phantom2mm.brain_mask
    m = mask_from_phase_quality(
        gre2mm.phase, gre2mm.magnitude, phantom2mm.voxel_size, echo_times=gre2mm.echo_times
    )
    # measured Dice 0.9973 (the outermost brain voxels have low-quality edges to the skull)
    assert dice(m, truth) > 0.99
    assert np.count_nonzero(m & (phantom2mm.labels == SCALP)) == 0
    assert np.count_nonzero(m & ~truth) < 50  # measured 1
    # a single echo with magnitude (no gradient coherence): measured Dice 0.9936
    m1 = mask_from_phase_quality(
        gre2mm.phase[..., 0], gre2mm.magnitude[..., 0], phantom2mm.voxel_size
    )
    assert dice(m1, truth) > 0.98


def test_phase_quality_closed_forms():
    shape = (20, 18, 16)
    g = 0.6  # rad per voxel along x
    phase = np.broadcast_to(g * np.arange(shape[0])[:, None, None], shape)
    q = phase_quality(phase)
    assert q.dtype == np.float32 and q.shape == shape
    inner = q[1:-1, 1:-1, 1:-1]
    # 4 edges of weight 1, 2 of weight 1 - g / pi
    np.testing.assert_allclose(inner, (4 + 2 * (1 - g / np.pi)) / 6, atol=1e-6)
    # a corner voxel has 3 edges inside the array
    assert q[0, 0, 0] == pytest.approx((2 + (1 - g / np.pi)) / 6, abs=1e-6)
    # magnitude coherence (min/max)^2: the edge across a 1:2 step along y weighs 1/4
    mag = np.ones(shape)
    mag[:, 9:, :] = 2.0
    qm = phase_quality(phase, mag)
    expect = (3 + 0.25 + 2 * (1 - g / np.pi)) / 6
    assert qm[5, 8, 5] == pytest.approx(expect, abs=1e-6)
    # two echoes with consistent gradients: gradient coherence 1, nothing changes
    te = (0.005, 0.010)
    two = np.stack([phase, 2 * phase], axis=-1)
    np.testing.assert_allclose(phase_quality(two, echo_times=te), q, atol=1e-6)
    # an inconsistent second echo (gradient 0) lowers the x-edge weights by 1 - g
    bad = np.stack([phase, np.zeros(shape)], axis=-1)
    qb = phase_quality(bad, echo_times=te)
    expect = (4 + 2 * (1 - g / np.pi) * (1 - g)) / 6
    np.testing.assert_allclose(qb[1:-1, 1:-1, 1:-1], expect, atol=1e-6)


def test_phase_quality_of_noise():
    rng = np.random.default_rng(1)
    phase = rng.uniform(-np.pi, np.pi, (40, 40, 40))
    q = phase_quality(phase)[1:-1, 1:-1, 1:-1]
    # |wrap(dphi)| of independent uniform phases is uniform on [0, pi]: mean edge weight 1/2;
    # 64000 voxels, each a mean of 6 edges: standard error ~5e-4
    assert abs(q.mean() - 0.5) < 0.005
    assert q.min() >= 0.0 and q.max() <= 1.0


def test_helpers():
    a = np.zeros((10, 10, 10), bool)
    a[1:4, 1:4, 1:4] = True
    a[6:9, 6:9, 6:9] = True
    a[6, 6, 5] = True
    big = largest_component(a)
    assert big.sum() == 28 and not big[1, 1, 1]
    mags = np.random.default_rng(0).random((6, 6, 6, 3))
    np.testing.assert_allclose(combine_magnitude(mags), np.sqrt((mags**2).sum(-1)), rtol=1e-6)
    # robustmask rule on signal 1 over 40 % and noise 0.01: max(5 noise, high / 5) = 0.2
    v = np.r_[np.full(600, 0.01), np.full(400, 1.0)]
    assert robust_threshold(v) == pytest.approx(0.2)
    empty = refine_mask(np.zeros((8, 8, 8), bool), 1.0)
    assert not empty.any()


def test_validation_errors(gre2mm):
    mag = gre2mm.magnitude
    with pytest.raises(ValueError, match="3D"):
        mask_from_magnitude(mag[..., 0, 0])
    bad = mag[..., 0].copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        mask_from_magnitude(bad)
    with pytest.raises(ValueError, match="no voxel"):
        mask_from_magnitude(mag, 2.0, threshold=1e9)
    with pytest.raises(ValueError, match="constant"):
        mask_from_magnitude(np.ones((8, 8, 8)))
    with pytest.raises(ValueError, match="voxel_size"):
        mask_from_magnitude(mag, (2.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="method"):
        mask_from_magnitude(mag, 2.0, method="bogus")
    with pytest.raises(ValueError, match="echo_times"):
        phase_quality(gre2mm.phase)
    with pytest.raises(ValueError, match="increasing"):
        phase_quality(gre2mm.phase, echo_times=gre2mm.echo_times[::-1])
    with pytest.raises(ValueError, match="magnitude has shape"):
        phase_quality(gre2mm.phase[..., 0], mag[:-1, ..., 0])
    with pytest.raises(ValueError, match="no voxel"):
        mask_from_phase_quality(gre2mm.phase[..., 0], threshold=1.5)


@pytest.mark.parametrize("voxel_size", [(1.5, 1.5, 1.5), (1.0, 1.0, 2.5)])
def test_field_reliability_trims_the_unreliable_rim_only(voxel_size):

    shape = (60, 60, 30)
    vs = np.asarray(voxel_size)
    x, y, z = (np.indices(shape).T * vs).T - ((np.asarray(shape) - 1) / 2 * vs)[
        :, None, None, None
    ]
    brain = (x / 40) ** 2 + (y / 40) ** 2 + (z / 30) ** 2 <= 1
    dist = ndi.distance_transform_edt(np.pad(brain, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    rng = np.random.default_rng(0)
    residual = np.where(brain, 0.01 + 0.001 * rng.standard_normal(shape), 0.0)
    rim_bad = brain & (dist <= 3.0) & (x > 20)  # a faulty patch of the edge
    deep_bad = brain & (dist > 15.0) & (np.abs(x) < 3) & (np.abs(y) < 3) & (np.abs(z) < 4)
    residual[rim_bad | deep_bad] = 0.2
    trimmed, reliable, info = field_reliability(brain, residual, tuple(vs), rim=6.0)
    assert not np.any(trimmed & rim_bad)  # the faulty rim is gone
    assert np.all(trimmed[deep_bad])  # deep outliers stay in the mask ...
    assert not np.any(reliable & (rim_bad | deep_bad))  # ... but are not reliable
    assert np.array_equal(reliable, brain & ~(rim_bad | deep_bad))
    # nothing else is lost but what one opening takes next to the trimmed patch
    lost = brain & ~trimmed & ~rim_bad
    assert lost.sum() < 0.2 * rim_bad.sum(), (lost.sum(), rim_bad.sum())
    assert info["unreliable"] == int((rim_bad | deep_bad).sum())
    # no residual (one or two echoes): nothing is judged
    t0, r0, i0 = field_reliability(brain, np.zeros(shape), tuple(vs))
    assert np.array_equal(t0, brain) and np.array_equal(r0, brain) and i0["unreliable"] == 0


def test_ball_morphology_in_the_box_equals_the_whole_array():
    """_erode and _dilate work inside the mask's bounding box; the result must be that of the
    distance transform of the whole array (array border = outside), masks touching the
    border, empty masks and anisotropic voxels included."""
    from qsmprep.recon.mask import _dilate, _erode

    rng = np.random.default_rng(7)
    for trial in range(24):
        shape = tuple(int(n) for n in rng.integers(6, 26, 3))
        vs = tuple(float(v) for v in rng.uniform(0.7, 3.0, 3))
        m = ndi.gaussian_filter(rng.random(shape), 2) > 0.5
        lo = [int(rng.integers(0, n // 3 + 1)) for n in shape]  # blobs in a random sub-box
        hi = [int(rng.integers(2 * n // 3, n + 1)) for n in shape]
        inner = np.zeros(shape, bool)
        inner[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        m &= inner
        if trial % 3 == 0:
            m[:, :, :2] = True
        if trial % 8 == 0:
            m[:] = False
        for r in (1.0, 2.5, 6.0):
            whole = ndi.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
            np.testing.assert_array_equal(_erode(m, r, vs), whole > r)
            if m.any():
                near = ndi.distance_transform_edt(~m, sampling=vs) <= r
                np.testing.assert_array_equal(_dilate(m, r, vs), near)


def _ball_with_field(shape=(40, 40, 30), gradient_hz=20.0):
    """A ball mask, a field rising by ``gradient_hz`` per voxel along x, a small residual."""
    idx = np.indices(shape)
    c = (np.asarray(shape) - 1) / 2
    brain = sum(((idx[i] - c[i]) / (0.45 * shape[i])) ** 2 for i in range(3)) <= 1
    field = gradient_hz * (idx[0] - c[0])
    rng = np.random.default_rng(0)
    residual = np.where(brain, 0.01 + 0.001 * rng.standard_normal(shape), 0.0)
    return brain, field, residual


def test_a_patch_off_by_one_over_te1_is_unreliable():
    """A 2 pi error of the first echo carried to the later echoes leaves a patch off by exactly
    1 / TE1 that the fit residual cannot see: the steps around it mark it unreliable, with
    the voxels on the other side of its steps and nothing else."""
    te1 = 0.004
    brain, field, residual = _ball_with_field()
    patch = np.zeros_like(brain)
    patch[35:37, 19:21, 15] = True  # within 6 mm (3 voxels) of the edge of the ball
    assert np.all(brain[patch])
    field = np.where(patch, field - 1 / te1, field)
    _, before, _ = field_reliability(brain, residual, 2.0)
    assert np.all(before[patch])  # the residual alone does not see it
    trimmed, reliable, info = field_reliability(brain, residual, 2.0, field=field, echo_time=te1)
    assert not np.any(reliable[patch])
    # the patch and its 6-connected neighbours in the mask: the two ends of every step
    ring = ndi.binary_dilation(patch) & brain
    assert np.array_equal(brain & ~reliable, ring)
    assert info["steep"] == int(ring.sum()) and info["unreliable"] == int(ring.sum())
    assert not np.any(trimmed & patch)  # within the rim: trimmed too


def test_a_steep_but_continuous_field_stays_reliable():
    # 100 Hz per voxel at TE1 4 ms: 0.4 x 1 / TE1, below the default max_step of one half
    brain, field, residual = _ball_with_field(gradient_hz=100.0)
    _, reliable, info = field_reliability(brain, residual, 2.0, field=field, echo_time=0.004)
    assert np.array_equal(reliable, brain) and info["steep"] == 0
    # a quarter of 1 / TE1 (62.5 Hz) marks every voxel with a neighbour in the mask
    _, reliable, info = field_reliability(
        brain, residual, 2.0, field=field, echo_time=0.004, max_step=0.25
    )
    assert not reliable.any()
    with pytest.raises(ValueError, match="max_step"):
        field_reliability(brain, residual, 2.0, field=field, echo_time=0.004, max_step=0)


def test_steep_voxels_are_judged_without_a_residual():
    """One or two echoes leave no residual spread: the steps still mark an aliased patch."""
    te1 = 0.004
    brain, field, _ = _ball_with_field()
    patch = np.zeros_like(brain)
    patch[20, 20, 15] = True
    field = np.where(patch, field + 1 / te1, field)
    _, reliable, info = field_reliability(
        brain, np.zeros(brain.shape), 2.0, field=field, echo_time=te1
    )
    assert np.array_equal(brain & ~reliable, ndi.binary_dilation(patch) & brain)
    assert info["threshold_rad"] is None and "residual judged no voxel" in info["note"]
    assert steep_voxels(field, brain, 0.5 / te1).sum() == 7  # the voxel and its 6 neighbours
