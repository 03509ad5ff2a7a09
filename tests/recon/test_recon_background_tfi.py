"""TFI's background (``tfibg``): the local field over the whole brain, on the simulated heads.

Bounds from the field-chain goal, written before measuring: a background removal that keeps
the whole brain and is at least as accurate there as RESHARP is on the part of the brain its
erosion keeps; with noise, at least as accurate as RESHARP inside RESHARP's own mask.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep.recon.background import remove_background, resharp, tfibg
from qsmprep.recon.kernels import ppm_to_hz

NOISE_HZ = 0.38  # 0.003 ppm at 3 T, the inversion tests' recipe


def _fit(est, ref, m):
    """NRMSE (%) and slope of de-meaned fields in ``m``."""
    e = est[m] - est[m].mean()
    r = ref[m] - ref[m].mean()
    return 100 * np.linalg.norm(e - r) / np.linalg.norm(r), float(e @ r / (r @ r))


@pytest.fixture(scope="module")
def head2mm(phantom2mm, phantom2mm_fields):
    ph, f = phantom2mm, phantom2mm_fields
    mask = ph.brain_mask
    rng = np.random.default_rng(0)
    noisy = f["total_hz"] + rng.normal(0, NOISE_HZ, mask.shape) * mask
    return ph, mask, f["total_hz"], noisy.astype(np.float32), f["local_hz"]


def test_tfibg_keeps_the_brain_and_beats_resharp(head2mm):
    ph, mask, total, _, local = head2mm
    est, out = tfibg(total, mask, ph.voxel_size, magnitude=ph.m0, delta_te=0.004)
    assert np.array_equal(out, mask) and not est[~mask].any()
    ref, ref_mask = resharp(total, mask, ph.voxel_size)
    assert _fit(est, local, mask)[0] <= _fit(ref, local, ref_mask)[0]


def test_tfibg_with_noise_beats_resharp_in_its_mask(head2mm):
    ph, mask, _, noisy, local = head2mm
    noise = np.full(mask.shape, NOISE_HZ)
    est, _ = remove_background(
        noisy, mask, ph.voxel_size, method="tfibg", magnitude=ph.m0, noise_std=noise,
        delta_te=0.004,
    )  # fmt: skip
    ref, ref_mask = resharp(noisy, mask, ph.voxel_size)
    assert _fit(est, local, ref_mask)[0] <= _fit(ref, local, ref_mask)[0]


def test_tfibg_takes_hz_and_b0(phantom, phantom_fields):
    """The field in Hz at 1.5 T gives the local field in Hz of the same map in ppm."""
    m, vs = phantom.brain_mask, phantom.voxel_size
    kw = dict(magnitude=phantom.m0, max_iter=1, cg_max_iter=5)
    at3 = tfibg(ppm_to_hz(phantom_fields["total_ppm"], 3.0), m, vs, b0=3.0, **kw)[0]
    at15 = tfibg(ppm_to_hz(phantom_fields["total_ppm"], 1.5), m, vs, b0=1.5, **kw)[0]
    np.testing.assert_allclose(at15 * 2.0, at3, atol=1e-4 * np.abs(at3).max())


def test_tfibg_needs_the_magnitude(phantom, phantom_fields):
    with pytest.raises(ValueError, match="magnitude"):
        tfibg(phantom_fields["total_hz"], phantom.brain_mask, phantom.voxel_size)


def test_tfibg_torch_is_as_accurate_as_numpy(phantom, phantom_fields):
    """Local-field NRMSE within 0.5 points on either device (as TFI's own test)."""
    torch = pytest.importorskip("torch")
    m, vs, total = phantom.brain_mask, phantom.voxel_size, phantom_fields["total_hz"]
    kw = dict(magnitude=phantom.m0, delta_te=0.004, max_iter=2, cg_max_iter=10)
    a, _ = tfibg(total, m, vs, **kw)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b, _ = tfibg(total, m, vs, device="torch", **kw)
    finally:
        torch.set_num_threads(n_threads)
    truth = phantom_fields["local_hz"]
    assert abs(_fit(a, truth, m)[0] - _fit(b, truth, m)[0]) <= 0.5


@pytest.fixture(scope="module")
def unreliable2mm(head2mm):
    """The noisy 2 mm head with an unreliable region: the brain within 6 mm of its edge in the
    lower third of the head (where air and bone border it), its total field corrupted there."""
    from scipy import ndimage

    ph, mask, _, noisy, local = head2mm
    rim = mask & ~ndimage.binary_erosion(mask, iterations=3)
    low = np.zeros_like(mask)
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    low[..., : z[0] + (z[-1] - z[0]) // 3] = True
    bad = rim & low
    rng = np.random.default_rng(1)
    total = np.where(bad, noisy + rng.normal(0, 20.0, mask.shape), noisy).astype(np.float32)
    kw = dict(
        magnitude=ph.m0, noise_std=np.full(mask.shape, NOISE_HZ), data_mask=mask & ~bad,
        delta_te=0.004,
    )  # fmt: skip
    return ph, mask, bad, local, tfibg(total, mask, ph.voxel_size, **kw), kw, total


def test_tfibg_fills_the_unreliable_voxels(unreliable2mm):
    """The filled voxels are a better estimate of the local field than none (NRMSE < 100 %
    there, where zero scores 100 %), and the local field covers the whole mask."""
    ph, mask, bad, local, (est, out), _, _ = unreliable2mm
    assert bad.sum() > 0.05 * mask.sum()
    assert np.array_equal(out, mask) and np.all(est[bad] != 0)
    assert _fit(est, local, bad)[0] < 100.0


def test_tkd_gains_from_the_filled_field(unreliable2mm):
    """TKD, which has no data weight, is more accurate over the whole brain on the filled
    local field than on the reliable voxels alone (``fill=False``)."""
    from qsmprep.metrics import evaluate
    from qsmprep.recon.inversion.direct import tkd
    from qsmprep.recon.kernels import hz_to_ppm

    ph, mask, bad, _, (est, out), kw, total = unreliable2mm
    part, part_mask = tfibg(total, mask, ph.voxel_size, fill=False, **kw)
    assert np.array_equal(part_mask, mask & ~bad) and not part[bad].any()
    vs, chi = ph.voxel_size, ph.chi
    whole = evaluate(tkd(hz_to_ppm(est, 3.0), out, vs), chi, mask)["nrmse"]
    reliable = evaluate(tkd(hz_to_ppm(part, 3.0), part_mask, vs), chi, mask)["nrmse"]
    assert whole < reliable


@pytest.mark.slow
def test_steep_voxels_keep_unwrapping_errors_out_of_tfibg():
    """The chain from the raw echoes of our 3 mm head (the embedding example's, 64 x 64 x 54,
    seed 0, TE1 4 ms): a few rim voxels come out of the unwrapping off by exactly 1 / TE1,
    where the fit residual is blind. Without the steep-voxel rule of the reliability stage TFI's
    background fits them; with it, they lose their data weight. The bound asks for a clear
    gain, a tenth of the error, and that most of those voxels are caught (measured when the rule
    was written: 53.2 against 37.9 % NRMSE of the local field, 7 of 9 voxels caught, 58 voxels
    unreliable in all)."""
    from qsmprep.recon.chain import compute_local_field
    from qsmprep.sim import make_head_phantom, simulate_fields, simulate_gre

    te = (0.004, 0.008, 0.012, 0.016, 0.020)
    ph = make_head_phantom((64, 64, 54), (3.0, 3.0, 3.0), seed=0)
    f = simulate_fields(ph)
    gre = simulate_gre(ph, te, b0=3.0, snr=100.0, seed=0, fields=f)
    truth = ph.brain_mask
    scores, caught = [], []
    for max_step in (np.inf, 0.5):
        maps = compute_local_field(
            gre.magnitude, gre.phase, te, ph.voxel_size, bg_method="tfibg",
            reliability_params={"max_step": max_step},
        )  # fmt: skip
        m = maps.local_mask & truth
        scores.append(_fit(maps.local_hz, f["local_hz"], m)[0])
        err = maps.total_hz - f["total_hz"]
        aliased = maps.mask & (np.abs(err - np.median(err[maps.mask])) > 0.5 / te[0])
        caught.append((int(aliased.sum()), int((aliased & ~maps.reliable).sum())))
    assert caught[0][0] > 0, caught  # the head has such voxels ...
    assert caught[0][1] == 0, caught  # ... that the residual does not see
    assert caught[1][1] > caught[1][0] / 2, caught
    assert scores[1] <= 0.9 * scores[0], (scores, caught)
