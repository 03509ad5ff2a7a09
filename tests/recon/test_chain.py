"""The whole field chain: on our phantom, and on the external development data when present."""

import json
from pathlib import Path

import numpy as np
import pytest

from qsmprep.recon.chain import compute_local_field
from qsmprep.recon.kernels import b0_dir_from_affine

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _nrmse(est, truth, m):
    e = est[m] - est[m].mean()
    t = truth[m] - truth[m].mean()
    return 100 * np.linalg.norm(e - t) / np.linalg.norm(t)


def _chain(phantom, gre, **kwargs):
    """The field chain on a simulated acquisition of ``phantom``."""
    return compute_local_field(
        gre.magnitude, gre.phase, gre.echo_times, phantom.voxel_size,
        b0_dir=b0_dir_from_affine(phantom.affine), **kwargs,
    )  # fmt: skip


def test_chain_on_phantom(phantom2mm, gre2mm):
    profile = {}
    maps = _chain(phantom2mm, gre2mm, profile=profile)
    assert set(profile) == {"mask", "unwrap", "echo_fit", "reliability", "background_lbv"}
    # the default LBV disagrees with V-SHARP on this phantom (tissue of -0.5 ppm borders its
    # brain; measured 157 %, limit 75 %; 181 % against RESHARP; 140 % once the reliability
    # stage took the rim's steep voxels out of LBV's mask), so the chain falls back to RESHARP
    check = maps.settings["bg_check"]
    assert check["fell_back"] and check["method"] == maps.settings["bg_method"] == "resharp"
    assert check["disagreement"] > 125
    inside = maps.mask & phantom2mm.brain_mask
    # Total field: exact unwrapping plus an M^2-weighted fit at SNR 100 leaves only noise and
    # the partial-volume edge; measured median |error| 0.13 Hz inside the true brain.
    err_total = np.abs(maps.total_hz - gre2mm.total_field_hz)[inside]
    assert np.median(err_total) < 0.5
    # Local field against the truth inside the eroded mask: measured NRMSE 42 % over 74 % of
    # the brain. The floor is the phase noise at SNR 100 (field std ~0.3 Hz against a local
    # field of a few Hz rms) and the harmonic part of the local field that no background
    # method can tell from the background.
    m = maps.local_mask & phantom2mm.brain_mask
    nrmse = _nrmse(maps.local_hz, gre2mm.local_field_hz, m)
    assert nrmse < 50, nrmse
    assert m.sum() > 0.65 * phantom2mm.brain_mask.sum()


def test_chain_with_tfibg_keeps_the_whole_brain(phantom2mm, gre2mm):
    """``--bg-method tfibg`` through the whole chain: the local field covers the brain mask
    (TFI's model field on its unreliable voxels), so it keeps >= 97 % of the true brain (the
    field-chain target), and is within the default chain's bound (50 %) over all of it.
    Measured: 99.96 % kept, 40.1 % NRMSE (slope 0.88); the default chain: 42 % over 74 %."""
    maps = _chain(phantom2mm, gre2mm, bg_method="tfibg", b0=3.0)
    assert maps.settings["bg_method"] == "tfibg"
    assert np.array_equal(maps.local_mask, maps.mask)
    true = phantom2mm.brain_mask
    assert (maps.local_mask & true).sum() >= 0.97 * true.sum()
    assert _nrmse(maps.local_hz, gre2mm.local_field_hz, maps.local_mask & true) < 50


def _load_shared(dataset, subject):
    nib = pytest.importorskip("nibabel")
    root = SHARED / dataset
    anat = root / f"sub-{subject}" / "anat"
    phase, mag, te = [], [], []
    for j in sorted(anat.glob(f"sub-{subject}_echo-*_part-phase_MEGRE.json")):
        te.append(json.loads(j.read_text())["EchoTime"])
        img = nib.load(str(j).replace(".json", ".nii.gz"))
        phase.append(img.get_fdata(dtype=np.float32))
        mag.append(
            nib.load(
                str(j).replace("part-phase", "part-mag").replace(".json", ".nii.gz")
            ).get_fdata(dtype=np.float32)
        )
    gt = root / "derivatives" / "groundtruth" / f"sub-{subject}" / "anat"
    truth = {
        k: nib.load(gt / f"sub-{subject}_{k}.nii.gz").get_fdata(dtype=np.float32)
        for k in ("desc-local_fieldmap", "desc-total_fieldmap", "desc-brain_mask")
    }
    return (
        np.stack(mag, -1),
        np.stack(phase, -1),
        te,
        img.affine,
        img.header.get_zooms()[:3],
        truth,
    )


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("subject", ["01", "02"])
def test_chain_on_external_development_data(subject):
    # Data made by another team's forward model (qsm-forward): checks our chain against someone
    # else's physics, including an oblique slab (sub-02). Measured with our mask and RESHARP:
    # mask Dice 0.987 / 0.989 (the truth leaves out the outermost CSF layer), local-field NRMSE
    # 43.8 / 45.4 % over 78 / 77 % of the brain; its local field is only ~1 Hz rms, so the
    # phase noise (field std ~0.34 Hz) sets most of the error.
    if not (SHARED / "qsmdev").is_dir():
        pytest.skip("../shared/data is not available")
    mag, phase, te, affine, zooms, truth = _load_shared("qsmdev", subject)
    maps = compute_local_field(
        mag, phase, te, zooms, b0_dir=b0_dir_from_affine(affine), bg_method="resharp"
    )
    true_mask = truth["desc-brain_mask"] > 0
    dice = 2 * (maps.mask & true_mask).sum() / (maps.mask.sum() + true_mask.sum())
    assert dice > 0.97, dice
    m = maps.local_mask & true_mask
    nrmse = _nrmse(maps.local_hz, truth["desc-local_fieldmap"], m)
    assert nrmse < 52, nrmse


@pytest.mark.shared
@pytest.mark.slow
def test_default_chain_keeps_the_brain_on_external_data():
    # Targets of the field-chain work, written before measuring: the default background removal
    # keeps >= 97 % of the true brain, the local field has slope 0.95-1.05 against the truth,
    # and the chain does not fall back (LBV agrees with V-SHARP inside V-SHARP's mask).
    if not (SHARED / "qsmdev").is_dir():
        pytest.skip("../shared/data is not available")
    mag, phase, te, affine, zooms, truth = _load_shared("qsmdev", "01")
    maps = compute_local_field(mag, phase, te, zooms, b0_dir=b0_dir_from_affine(affine))
    true_mask = truth["desc-brain_mask"] > 0
    assert not maps.settings["bg_check"]["fell_back"]
    kept = (maps.local_mask & true_mask).sum() / true_mask.sum()
    assert kept >= 0.97, kept


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="local-field slope 0.899 on qsmdev sub-01 (LBV's zero boundary value shrinks the"
    " field near the edge; 0.900 even from the true total field in the true mask); target"
    " 0.95-1.05",
)
def test_default_chain_local_field_slope_on_external_data():
    if not (SHARED / "qsmdev").is_dir():
        pytest.skip("../shared/data is not available")
    mag, phase, te, affine, zooms, truth = _load_shared("qsmdev", "01")
    maps = compute_local_field(mag, phase, te, zooms, b0_dir=b0_dir_from_affine(affine))
    m = maps.local_mask & (truth["desc-brain_mask"] > 0)
    e = maps.local_hz[m] - maps.local_hz[m].mean()
    t = truth["desc-local_fieldmap"][m] - truth["desc-local_fieldmap"][m].mean()
    slope = float(e @ t / (t @ t))
    assert 0.95 <= slope <= 1.05, slope


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "subject"), [("qsmdev", "01"), ("qsmdev-aniso", "01")])
def test_unwrapping_and_fit_add_no_error_on_external_data(dataset, subject):
    # Target written before measuring: where the chain uses the total field (the reliable
    # voxels of both brain masks), unwrapping and the echo fit add at most 10 % to the NRMSE of
    # the data's own field (the echo-pair estimate, its 2 pi ambiguities resolved with the truth)
    from qsmprep.benchmarks.chain import echo_pair_field

    if not (SHARED / dataset).is_dir():
        pytest.skip("../shared/data is not available")
    mag, phase, te, affine, zooms, truth = _load_shared(dataset, subject)
    maps = compute_local_field(mag, phase, te, zooms, b0_dir=b0_dir_from_affine(affine))
    t_total = truth["desc-total_fieldmap"]
    used = maps.reliable & (truth["desc-brain_mask"] > 0)
    pair = echo_pair_field(mag, phase, te, t_total, used)
    penalty = _nrmse(maps.total_hz, t_total, used) / _nrmse(pair, t_total, used)
    assert penalty <= 1.1, penalty


@pytest.fixture(scope="module")
def tfibg_on_qsmdev():
    """The field chain with ``tfibg`` on qsmdev sub-01, and the truth."""
    if not (SHARED / "qsmdev").is_dir():
        pytest.skip("../shared/data is not available")
    mag, phase, te, affine, zooms, truth = _load_shared("qsmdev", "01")
    maps = compute_local_field(
        mag, phase, te, zooms, b0_dir=b0_dir_from_affine(affine), bg_method="tfibg", b0=3.0
    )
    return maps, truth


def _local_fit(maps, truth):
    """NRMSE (%) and slope of the local field against the truth over the true brain it covers."""
    m = maps.local_mask & (truth["desc-brain_mask"] > 0)
    e = maps.local_hz[m] - maps.local_hz[m].mean()
    t = truth["desc-local_fieldmap"][m] - truth["desc-local_fieldmap"][m].mean()
    return 100 * float(np.linalg.norm(e - t) / np.linalg.norm(t)), float(e @ t / (t @ t))


@pytest.mark.shared
@pytest.mark.slow
def test_tfibg_chain_targets_on_external_data(tfibg_on_qsmdev):
    """The field-chain targets, written before the work: >= 97 % of the true brain kept, and
    a local-field NRMSE at most 1.15x that of the noise-matched oracle field (the true local
    field plus white noise at the chain's own noise map; `qsmprep-bench chain`)."""
    maps, truth = tfibg_on_qsmdev
    true_mask = truth["desc-brain_mask"] > 0
    assert (maps.local_mask & true_mask).sum() >= 0.97 * true_mask.sum()
    local = truth["desc-local_fieldmap"]
    inside = maps.mask & (maps.field_std_hz > 0) & np.isfinite(maps.field_std_hz)
    sd = np.where(inside, maps.field_std_hz, np.median(maps.field_std_hz[inside]))
    noisy = local + sd * np.random.default_rng(0).standard_normal(local.shape)
    e = noisy[true_mask] - noisy[true_mask].mean()
    t = local[true_mask] - local[true_mask].mean()
    oracle = 100 * float(np.linalg.norm(e - t) / np.linalg.norm(t))
    assert _local_fit(maps, truth)[0] <= 1.15 * oracle


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="tfibg's local-field slope on qsmdev sub-01 is 0.938 over the whole brain"
    " (`qsmprep-bench chain`; 0.950 on its reliable voxels alone); target 0.95-1.05",
)
def test_tfibg_local_field_slope_on_external_data(tfibg_on_qsmdev):
    slope = _local_fit(*tfibg_on_qsmdev)[1]
    assert 0.95 <= slope <= 1.05, slope
