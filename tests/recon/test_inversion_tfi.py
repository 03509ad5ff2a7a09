"""TFI: total field inversion on the simulated heads, against the chain it replaces.

Ground truth: ``phantom.chi`` inside the brain mask; metrics de-mean in the mask. The noisy
fields are the recipe of the inversion tests (0.003 ppm Gaussian noise in the brain, seed 0),
added to the *total* field here. The bounds come from the field-chain issue's targets: a chain
penalty (NRMSE from the total field over the same method on the true local field with the same
noise) of at most 1.3, and an inversion of the total field that beats background removal
followed by MEDI, the chain it replaces.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep import metrics
from qsmprep.recon.background import resharp
from qsmprep.recon.inversion.medi import medi
from qsmprep.recon.inversion.tfi import tfi

NOISE_PPM = 0.003
DELTA_TE = 0.004  # echo spacing of the gre2mm fixture (s)


def _noisy(field, mask, seed=0):
    rng = np.random.default_rng(seed)
    return (field + rng.normal(0, NOISE_PPM, field.shape) * mask).astype(np.float32)


def _nrmse(chi, ph, mask):
    return metrics.nrmse(chi, ph.chi, mask)


def _run(method, field, ph, mask, **kw):
    """``method`` (tfi or medi) with the recipe's uniform noise map and echo spacing."""
    noise = np.full(mask.shape, NOISE_PPM)
    return method(field, mask, ph.voxel_size, magnitude=ph.m0, noise_std=noise,
                  delta_te=DELTA_TE, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def head2mm(phantom2mm, phantom2mm_fields):
    mask = phantom2mm.brain_mask
    total = _noisy(phantom2mm_fields["total_ppm"], mask)
    local = _noisy(phantom2mm_fields["local_ppm"], mask)
    return phantom2mm, mask, total, local


@pytest.fixture(scope="module")
def tfi2mm(head2mm):
    ph, mask, total, _ = head2mm
    info = {}
    return _run(tfi, total, ph, mask, info=info), info


@pytest.fixture(scope="module")
def medi_oracle2mm(head2mm):
    """MEDI on the true local field with the same noise level (the noise-matched oracle)."""
    ph, mask, _, local = head2mm
    return _run(medi, local, ph, mask)


def test_tfi_covers_the_brain_and_beats_resharp_then_medi(head2mm, tfi2mm):
    """The chain TFI replaces: RESHARP (the chain's fallback on these phantoms, where LBV fails)
    then MEDI over the whole brain mask with data in RESHARP's mask."""
    ph, mask, total, _ = head2mm
    chi, _ = tfi2mm
    assert np.count_nonzero(chi[mask]) >= 0.99 * mask.sum()
    assert not chi[~mask].any()
    local, local_mask = resharp(total, mask, ph.voxel_size)
    chained = _run(medi, local, ph, mask, data_mask=local_mask)
    assert _nrmse(chi, ph, mask) < _nrmse(chained, ph, mask)


@pytest.fixture(scope="module")
def tfi_oracle2mm(head2mm):
    """TFI on the true local field with the same noise level (its noise-matched oracle)."""
    ph, mask, _, local = head2mm
    return _run(tfi, local, ph, mask)


def test_tfi_chain_penalty_on_the_2mm_head(head2mm, tfi2mm, tfi_oracle2mm):
    """The issue's chain penalty: TFI from the total field over TFI on the noise-matched true
    local field (measured 45.6 / 47.7 %)."""
    ph, mask, _, _ = head2mm
    assert _nrmse(tfi2mm[0], ph, mask) / _nrmse(tfi_oracle2mm, ph, mask) <= 1.3


@pytest.mark.xfail(
    strict=True,
    reason="measured 1.40 (TFI 45.6 % from the total field, MEDI 32.6 % on the noisy true "
    "local field): the unregularised sources outside the brain absorb part of the brain's own "
    "field (TFI on that local field itself scores 47.7 %)",
)
def test_tfi_within_1_3_of_medi_on_the_true_local_field(head2mm, tfi2mm, medi_oracle2mm):
    ph, mask, _, _ = head2mm
    assert _nrmse(tfi2mm[0], ph, mask) / _nrmse(medi_oracle2mm, ph, mask) <= 1.3


def test_info_and_noise_lambda(tfi2mm):
    _, info = tfi2mm
    assert info["lam_noise_ppm"] == pytest.approx(NOISE_PPM)
    c = 2 * np.pi * DELTA_TE * 42.57747892 * 3.0
    assert info["lam"] == pytest.approx(min(4.0 / NOISE_PPM, 1000 * c), rel=1e-6)
    assert info["p_b"] == 30.0
    assert info["pad"] == (6, 6, 6)  # 12 mm at 2 mm
    assert 1 <= info["iterations"] <= 10
    assert len(info["cg_iterations"]) == info["iterations"]


def test_without_noise_map_uses_the_toolbox_lambda(phantom, phantom_fields):
    info = {}
    tfi(
        phantom_fields["total_ppm"],
        phantom.brain_mask,
        phantom.voxel_size,
        magnitude=phantom.m0,
        delta_te=DELTA_TE,
        max_iter=1,
        cg_max_iter=5,
        info=info,
    )
    c = 2 * np.pi * DELTA_TE * 42.57747892 * 3.0
    assert info["lam"] == pytest.approx(1000 * c, rel=1e-6)
    assert info["lam_noise_ppm"] is None


def test_torch_is_as_accurate_as_numpy(phantom, phantom_fields):
    """The devices agree in accuracy: NRMSE against the truth within 0.5 points (the margin
    issue 18 allows a numerical change). Voxel by voxel they differ by float32 round-off, which
    the preconditioned system (30 x outside the brain) amplifies: measured 1e-4 to 3.7e-3 of
    the map's norm, varying with torch's thread count."""
    torch = pytest.importorskip("torch")
    kw = dict(magnitude=phantom.m0, delta_te=DELTA_TE, max_iter=2, cg_max_iter=10)
    args = (phantom_fields["total_ppm"], phantom.brain_mask, phantom.voxel_size)
    a = tfi(*args, **kw)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's CPU threads stall on a busy 2-core machine
    try:
        b = tfi(*args, device="torch", **kw)
    finally:
        torch.set_num_threads(n_threads)
    assert isinstance(b, np.ndarray) and b.dtype == np.float32
    m = phantom.brain_mask
    assert abs(_nrmse(a, phantom, m) - _nrmse(b, phantom, m)) <= 0.5


def test_bad_inputs_raise(phantom, phantom_fields):
    f, m, vs = phantom_fields["total_ppm"], phantom.brain_mask, phantom.voxel_size
    with pytest.raises(ValueError, match="magnitude is required"):
        tfi(f, m, vs, magnitude=None)
    with pytest.raises(ValueError, match='"noise" needs noise_std'):
        tfi(f, m, vs, magnitude=phantom.m0, lam="noise")
    with pytest.raises(ValueError, match="p_b must be positive"):
        tfi(f, m, vs, magnitude=phantom.m0, p_b=0)
    with pytest.raises(ValueError, match="milliseconds"):
        tfi(f, m, vs, magnitude=phantom.m0, delta_te=5.0)
    bad = f.copy()
    bad[m.nonzero()[0][0], m.nonzero()[1][0], m.nonzero()[2][0]] = np.nan
    with pytest.raises(ValueError, match="total_field"):
        tfi(bad, m, vs, magnitude=phantom.m0)
