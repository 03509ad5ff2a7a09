"""Synthetic training data: reproducibility, forward-model agreement, side information."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsmprep.dl.synth import SyntheticQSMData, phase_scale, synthetic_field
from qsmprep.recon.kernels import GAMMA_BAR
from qsmprep.sim.forward import forward_field

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# small phantom bank: (64, 64, 48) at 3 mm builds in well under a second
BANK = {"n_phantoms": 1, "phantom_shape": (64, 64, 48), "phantom_voxel_size": 3.0}
ANISO = ((0.6, 1.2), (0.6, 1.2), (0.6, 3.0))


def test_same_seed_same_batches():
    kw = dict(kind="mix", voxel_size=ANISO, b0_dir="random", seed=3, **BANK)
    a, b = SyntheticQSMData(16, **kw), SyntheticQSMData(16, **kw)
    for _ in range(2):
        ba, bb = a.batch(3), b.batch(3)
        assert ba.keys() == bb.keys()
        for k in ba:
            assert torch.equal(ba[k], bb[k]), k
    # batch k is a function of (seed, k): random access and resumed generators agree
    c = SyntheticQSMData(16, **kw)
    first = c.batch(3, index=1)
    assert c.counter == 0
    c.load_state_dict(a.state_dict())  # counter 2
    d = SyntheticQSMData(16, **kw)
    d.batch(3)
    assert torch.equal(d.batch(3)["chi"], first["chi"])
    assert torch.equal(c.batch(3)["chi"], a.batch(3)["chi"])
    other = SyntheticQSMData(16, **{**kw, "seed": 4}).batch(3)
    assert not torch.equal(other["chi"], first["chi"])


def test_field_is_the_forward_model_of_chi():
    """Each sample's field equals qsmprep.sim.forward_field of its chi (no noise)."""
    data = SyntheticQSMData(
        (16, 24, 32), kind="mix", voxel_size=ANISO, b0_dir="random", noise_ppm=0.0, seed=5, **BANK
    )
    b = data.batch(4)
    for i in range(4):
        chi = b["chi"][i, 0].numpy().astype(np.float64)
        m = b["mask"][i, 0].numpy() > 0
        ref = forward_field(chi, b["voxel_size"][i].numpy(), b["b0_dir"][i].numpy())
        got = b["field"][i, 0].numpy()
        # float32 FFTs against the float64 reference: measured <= 1.6e-7 of the peak field
        err = np.abs(got[m] - ref[m]).max() / np.abs(ref[m]).max()
        assert err < 1e-5, (i, err)
        assert np.all(got[~m] == 0)
    # the helper alone, on a batch with different kernels per sample
    f = synthetic_field(b["chi"], b["voxel_size"], b["b0_dir"])
    assert torch.allclose(f * b["mask"], b["field"], atol=1e-7)


def test_residual_background_is_smooth_and_off_by_default():
    kw = dict(kind="shapes", noise_ppm=0.0, whole_mask_prob=1.0, seed=2)
    plain = SyntheticQSMData(32, **kw).batch(3)
    same = SyntheticQSMData(32, background_ppm=0.0, **kw).batch(3)
    assert torch.equal(plain["field"], same["field"])  # off: the same stream as before
    b = SyntheticQSMData(32, background_ppm=0.004, **kw).batch(3)
    assert torch.equal(b["chi"][0], plain["chi"][0])  # drawn after the first sample's chi
    m = b["mask"] > 0
    bg = b["field"] - synthetic_field(b["chi"], b["voxel_size"], b["b0_dir"])
    level = float(bg[m].std())
    assert 0.0005 < level < 0.004, level  # amplitude 0.004 x a unit-std smooth field
    # smooth: neighbouring voxels differ by 0.11 x the field's spread (measured); white noise
    # of the same spread would give about 1.13 x
    step = float((bg[..., 1:] - bg[..., :-1])[m[..., 1:] & m[..., :-1]].abs().mean())
    assert step < 0.2 * level, (step, level)
    with pytest.raises(ValueError, match="background_ppm"):
        SyntheticQSMData(16, background_ppm=-0.1)


def test_noise_level_and_weight():
    data = SyntheticQSMData(32, kind="shapes", noise_ppm=0.004, whole_mask_prob=1.0, seed=1)
    b = data.batch(2)
    clean = synthetic_field(b["chi"], b["voxel_size"], b["b0_dir"])
    noise = (b["field"] - clean)[b["mask"] > 0]
    # noise std 0.004 ppm modulated by a smooth factor in [0.5, 2] (log-normal about 1):
    # measured 0.0040-0.0041 over seeds 0-3
    assert 0.003 < float(noise.std()) < 0.0055
    w = b["weight"][b["mask"] > 0]
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(w.min()) > 0


def test_side_information_of_random_voxel_sizes_and_b0():
    data = SyntheticQSMData(
        16, kind="shapes", voxel_size=ANISO, b0_dir="random", max_tilt_deg=30.0, seed=2
    )
    b = data.batch(16)
    vs, bd = b["voxel_size"].numpy(), b["b0_dir"].numpy()
    assert np.all((vs[:, :2] >= 0.6) & (vs[:, :2] <= 1.2)) and np.all(
        (vs[:, 2] >= 0.6) & (vs[:, 2] <= 3.0)
    )
    assert np.array_equal(vs[:, 0], vs[:, 1])  # square in-plane voxels
    assert np.ptp(vs[:, 2]) > 0.5  # the slice thickness varies
    np.testing.assert_allclose(np.linalg.norm(bd, axis=1), 1.0, atol=1e-6)
    tilt = np.degrees(np.arccos(np.clip(bd[:, 2], -1, 1)))
    # uniform over the 30-degree cap: the largest of 16 tilts measured 29.5-29.9 degrees
    assert tilt.max() <= 30.0 + 1e-3 and tilt.max() > 20.0
    # phase per ppm: 2 pi GAMMA_BAR B0 TE 1e-6 with B0 from {1.5, 3, 7} T and TE in 15-25 ms
    b0, te = b["b0"].numpy(), b["te"].numpy()
    assert set(np.round(b0, 3)) <= {1.5, 3.0, 7.0}
    assert np.all((te >= 0.015) & (te <= 0.025))
    expected = 2 * math.pi * GAMMA_BAR * 1e-6 * b0 * te
    np.testing.assert_allclose(b["phase_scale"].numpy(), expected, rtol=1e-6)
    assert phase_scale(3.0, 0.02) == pytest.approx(16.0513, rel=1e-4)
    # fixed settings
    fixed = SyntheticQSMData(16, kind="shapes", voxel_size=(1.0, 1.0, 2.0), seed=0).batch(2)
    np.testing.assert_array_equal(fixed["voxel_size"].numpy(), [[1, 1, 2]] * 2)
    np.testing.assert_array_equal(fixed["b0_dir"].numpy(), [[0, 0, 1]] * 2)
    # cubic voxels of random size
    iso = SyntheticQSMData(16, kind="shapes", voxel_size=((1.0, 2.0),) * 3, isotropic=True,
                           seed=1).batch(8)["voxel_size"].numpy()  # fmt: skip
    assert np.all(iso[:, 0] == iso[:, 1]) and np.all(iso[:, 0] == iso[:, 2])
    assert np.all((iso >= 1.0) & (iso <= 2.0)) and np.ptp(iso[:, 0]) > 0.3


def test_chi_is_referenced_and_masked():
    b = SyntheticQSMData(16, kind="mix", seed=7, **BANK).batch(4)
    for i in range(4):
        chi, m = b["chi"][i, 0], b["mask"][i, 0] > 0
        assert bool(m.any())
        assert abs(float(chi[m].mean())) < 1e-6
        assert bool((chi[~m] == 0).all())


def test_brain_patches_and_lesions():
    data = SyntheticQSMData(
        32, kind="brain", lesion_prob=1.0, max_lesions=3, contrast_prob=0.0, seed=4, **BANK
    )
    b = data.batch(4)
    m = b["mask"] > 0
    # patches are centred on brain voxels of the phantom
    assert all(float(b["mask"][i].mean()) > 0.05 for i in range(4))
    chi = b["chi"][m]
    # brain tissue (-0.05..0.4 ppm) plus haemorrhages up to +1.5 and calcifications to -0.8
    assert float(chi.max()) > 0.3
    assert float(chi.min()) > -1.2 and float(chi.max()) < 2.0
    plain = SyntheticQSMData(
        32, kind="brain", lesion_prob=0.0, contrast_prob=0.0, elastic_prob=0.0, seed=4, **BANK
    ).batch(4)
    pm = plain["mask"] > 0
    # phantom values relative to the patch mean: veins 0.4 ppm at most
    assert float(plain["chi"][pm].abs().max()) < 0.6


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        SyntheticQSMData(16, kind="cubes")
    with pytest.raises(ValueError, match="patch_shape"):
        SyntheticQSMData((4, 16, 16))
    with pytest.raises(ValueError, match="voxel_size"):
        SyntheticQSMData(16, voxel_size=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="isotropic"):
        SyntheticQSMData(16, voxel_size=ANISO, isotropic=True)
    with pytest.raises(ValueError, match="b0_dir"):
        SyntheticQSMData(16, b0_dir=(0, 0, 0))
    with pytest.raises(ValueError, match="max_tilt_deg"):
        SyntheticQSMData(16, b0_dir="random", max_tilt_deg=120)
    with pytest.raises(ValueError, match="probability"):
        SyntheticQSMData(16, lesion_prob=1.5)


def test_flips_mirror_the_acquisition_and_keep_the_forward_model():
    """A flip mirrors chi and negates B0 along that axis; the field stays D * chi."""
    import itertools

    kw = dict(kind="shapes", voxel_size=ANISO, b0_dir="random", noise_ppm=0.0, seed=11)
    plain = SyntheticQSMData(16, **kw).batch(6)
    off = SyntheticQSMData(16, flip_prob=0.0, **kw).batch(6)
    assert all(torch.equal(plain[k], off[k]) for k in plain)  # off: the same stream
    b = SyntheticQSMData(16, flip_prob=0.5, **kw).batch(6)
    subsets = [s for r in range(4) for s in itertools.combinations(range(3), r)]
    flipped = 0
    for i in range(6):
        c0, c1 = plain["chi"][i, 0], b["chi"][i, 0]
        # the flips are drawn after the samples: each sample is the unflipped one, mirrored
        axes = [s for s in subsets if torch.equal(c0.flip(list(s)), c1)]
        assert len(axes) == 1, i
        axes = list(axes[0])
        flipped += bool(axes)
        sign = np.array([-1.0 if a in axes else 1.0 for a in range(3)])
        b0 = b["b0_dir"][i].numpy()
        assert np.allclose(b0, plain["b0_dir"][i].numpy() * sign)
        m = b["mask"][i, 0].numpy() > 0
        assert torch.equal(b["mask"][i, 0], plain["mask"][i, 0].flip(axes))
        vs = b["voxel_size"][i].numpy()
        ref = forward_field(c1.numpy().astype(np.float64), vs, b0)
        got = b["field"][i, 0].numpy()
        peak = np.abs(ref[m]).max()
        # qsmprep's forward model of the flipped chi with the flipped B0: measured <= 2.2e-7
        assert np.abs(got[m] - ref[m]).max() / peak < 1e-5, i
        # and the mirror image of the unflipped field: measured <= 1.5e-7
        mirror = plain["field"][i, 0].flip(axes).numpy()
        assert np.abs(got[m] - mirror[m]).max() / peak < 1e-5, i
        if axes:  # keeping B0 would break the pair (measured 0.35-1.4 of the peak)
            wrong = forward_field(c1.numpy().astype(np.float64), vs, plain["b0_dir"][i].numpy())
            assert np.abs(got[m] - wrong[m]).max() / peak > 0.1, i
    assert 0 < flipped < 6
    with pytest.raises(ValueError, match="flip_prob"):
        SyntheticQSMData(16, flip_prob=1.5)
