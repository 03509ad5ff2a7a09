"""``qsmprep-bench chain`` on a simulated thick-slice, tilted acquisition with ground truth.

Bounds come from the field-chain targets, written before measuring: TV and MEDI maps cover at
least 99 % of the true brain, the brain mask has a Dice of at least 0.97; and the benchmark's
own arithmetic (chain penalty, oracle runs on the true local field) holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qsmprep.benchmarks.chain import echo_pair_field, format_chain_table, score_acquisition
from qsmprep.cli import bench
from qsmprep.sim.bids import simulate_bids_dataset


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    bids = simulate_bids_dataset(
        root / "thick",
        shape=(72, 72, 36),
        voxel_size=(2.5, 2.5, 4.0),
        echo_times=(0.005, 0.010, 0.015, 0.020),
        tilt_deg=15.0,
        seed=7,
    )
    out = root / "bench"
    report = root / "chain.json"
    argv = ["chain", str(bids), "--out", str(out), "--methods", "tkd", "tv", "medi",
            "--json", str(report)]  # fmt: skip
    assert bench.main(argv) == 0
    return bids, out, json.loads(report.read_text())["scores"]


@pytest.mark.slow
def test_chain_scores_a_thick_slice_tilted_head(chain_run):
    _, _, scores = chain_run
    assert len(scores) == 1
    s = scores[0]
    assert s["dataset"] == "thick" and s["acquisition"] == "sub-01"
    for method in ("tv", "medi"):
        assert s["methods"][method]["covered"] >= 0.99, (method, s["methods"][method])
    for method, row in s["methods"].items():
        assert row["chain_penalty"] == pytest.approx(
            row["end_to_end"]["nrmse"] / row["noise_oracle"]["nrmse"]
        )
        # the true local field in the true mask is what the chain can at best deliver
        assert row["oracle"]["nrmse"] < row["end_to_end"]["nrmse"], method
    assert np.isfinite([s["total_nrmse"], s["local_nrmse"], s["oracle_field_nrmse"]]).all()
    assert 0 < s["kept"] <= 1


@pytest.mark.slow
def test_chain_reports_the_echo_pair_field(chain_run):
    s = chain_run[2][0]
    assert np.isfinite([s["echo_pair_nrmse"], s["echo_pair_slope"], s["fit_penalty"]]).all()
    # the data's own field is close to the truth on our phantom (no partial volume)
    assert s["echo_pair_nrmse"] < 5 and abs(s["echo_pair_slope"] - 1) < 0.02, s


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="fit penalty 11.4 on this head (17.9 before the steep-voxel rule): 27 voxels of its"
    " rim, where the true field steps by more than 1 / (2 TE1) = 100 Hz between neighbours, are"
    " unwrapped 1 / TE1 = 200 Hz off; with echo 1 at the echo spacing (5 ms) that error is linear"
    " in TE, so the fit residual does not flag it, and these voxels carried 99.7 % of the total"
    " field's squared error there; the rule marks the voxels whose own steps exceed 100 Hz, not"
    " all of them",
)
def test_chain_fit_penalty(chain_run):
    # unwrapping and the echo fit add no error beyond the data's own echo-pair estimate where
    # the chain uses the field (the reliable voxels)
    s = chain_run[2][0]
    assert s["fit_penalty"] <= 1.1, s["fit_penalty"]


def test_echo_pair_field_is_the_data_field():
    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    # a field well beyond the echo pair's unambiguous +-1 / (2 dTE) = +-100 Hz
    f = 250.0 * np.sin(np.linspace(0, 3, shape[0]))[:, None, None] + rng.normal(0, 20, shape)
    offset = rng.uniform(-np.pi, np.pi, shape)
    mask = np.ones(shape, bool)
    mask[0] = False
    for te in ((0.004, 0.009, 0.014, 0.019), (0.004, 0.009, 0.017)):
        te = np.asarray(te)
        phase = np.angle(np.exp(1j * (offset[..., None] + 2 * np.pi * f[..., None] * te)))
        mag = np.exp(-te / 0.03) * np.ones(shape + (te.size,))
        # the reference's mean is arbitrary: its circular mean difference is matched
        out = echo_pair_field(mag, phase, te, f + 7.0, mask)
        np.testing.assert_allclose(out[mask], f[mask], atol=1e-6)
    assert echo_pair_field(mag[..., :1], phase[..., :1], te[:1], f, mask) is None


@pytest.mark.slow
def test_chain_brain_mask_dice(chain_run):
    _, _, scores = chain_run
    assert scores[0]["dice"] >= 0.97, scores[0]["dice"]


@pytest.mark.slow
def test_chain_table_and_rescoring(chain_run):
    bids, out, scores = chain_run
    deriv = out / "thick" / "derivatives" / "qsmprep"
    again = score_acquisition(bids, deriv, "sub-01", ["tkd", "tv", "medi"])
    assert again.methods["tv"]["end_to_end"] == scores[0]["methods"]["tv"]["end_to_end"]
    table = format_chain_table([again])
    assert table.count("\n") == 4  # header, rule, one row per method
    assert "| thick | sub-01 |" in table
    with pytest.raises(ValueError, match="groundtruth"):
        bench.main(["chain", str(out), "--out", str(out / "x")])


@pytest.mark.slow
def test_chain_background_oracle(chain_run):
    """The App's background removal on the true total field: noise-free, in the true mask, it
    is closer to the true local field than the chain's own, and no method gains from it over
    the true local field (the background removal cannot add information)."""
    from qsmprep.recon.background import METHODS

    bids, out, scores = chain_run
    deriv = out / "thick" / "derivatives" / "qsmprep"
    s = score_acquisition(bids, deriv, "sub-01", ["tkd", "tv"], background="lbv")
    bg = s.background
    assert bg["method"] in METHODS
    assert 0 < bg["kept"] <= 1
    assert bg["local_nrmse"] < s.local_nrmse, (bg, s.local_nrmse)
    for method, row in s.methods.items():
        assert row["background_penalty"] == pytest.approx(
            row["background_oracle"]["nrmse"] / row["oracle"]["nrmse"]
        )
        assert row["background_penalty"] >= 1.0, (method, row)
        # the end-to-end columns do not depend on the oracle
        assert row["end_to_end"] == scores[0]["methods"][method]["end_to_end"]
    table = format_chain_table([s])
    assert table.count("\n") == 3 and "background penalty" in table
    assert f"({bg['method']})" in table


def test_chain_passes_dl_adapt_to_the_app(tmp_path, monkeypatch):
    """``qsmprep-bench chain --dl-adapt`` runs the App with ``--dl-adapt`` on each dataset."""
    import qsmprep.app as app

    seen = []
    monkeypatch.setattr(app, "run_participant", lambda s: seen.append(s) or 0)
    ds = tmp_path / "ds"
    (ds / "derivatives" / "groundtruth").mkdir(parents=True)
    bench.main(["chain", str(ds), "--out", str(tmp_path / "o"), "--methods", "dsbn",
                "--dl-adapt"])  # fmt: skip
    bench.main(["chain", str(ds), "--out", str(tmp_path / "o"), "--methods", "dsbn"])
    assert [s.dl_adapt for s in seen] == [True, False]
    assert seen[0].methods == ["dsbn"]


def test_chain_background_oracle_flag(tmp_path, monkeypatch):
    """``--background-oracle`` reaches the scoring with the App's background method and its
    ``--config`` section."""
    from types import SimpleNamespace

    import qsmprep.app as app
    import qsmprep.benchmarks.chain as chain

    seen = []
    monkeypatch.setattr(app, "run_participant", lambda s: 0)
    done = SimpleNamespace(to_dict=dict)
    monkeypatch.setattr(chain, "score_acquisition", lambda *a, **k: seen.append(k) or done)
    ds = tmp_path / "ds"
    (ds / "derivatives" / "groundtruth").mkdir(parents=True)
    mask = tmp_path / "o" / "ds" / "derivatives" / "qsmprep" / "sub-01" / "anat"
    mask.mkdir(parents=True)
    (mask / "sub-01_desc-local_mask.nii.gz").touch()
    monkeypatch.setattr(chain, "format_chain_table", lambda *a, **k: "")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"tfibg": {"max_iter": 2}}))
    base = ["chain", str(ds), "--out", str(tmp_path / "o"), "--methods", "tkd"]
    bench.main(base + ["--bg-method", "tfibg", "--config", str(config), "--background-oracle"])
    bench.main(base)
    assert seen[0]["background"] == "tfibg"
    assert seen[0]["background_params"] == {"max_iter": 2}
    assert seen[1]["background"] is None


def test_oracle_runs_get_the_noise_map_in_ppm(phantom, phantom_fields, tmp_path):
    """The oracle inversions read the noise map in ppm, as the App gives it: a lambda chosen
    from the noise (MEDI's and TFI's "noise") sees the noise std in ppm, not in Hz."""
    import nibabel as nib

    from qsmprep.benchmarks.chain import _oracle_inversion
    from qsmprep.recon.kernels import hz_to_ppm

    mag = tmp_path / "sub-01" / "anat" / "sub-01_echo-1_part-mag_MEGRE.nii.gz"
    mag.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(phantom.m0.astype(np.float32), phantom.affine), mag)
    meta = {"B0": 3.0, "EchoTime": [0.004, 0.008], "Sources": [str(mag.relative_to(tmp_path))]}
    mask = phantom.brain_mask
    noise_hz = np.where(mask, 0.4, 0.0)
    for method in ("medi", "tfi"):
        info = {}
        _oracle_inversion(
            method, phantom_fields["local_ppm"], mask, phantom.voxel_size, (0.0, 0.0, 1.0),
            {"lam": "noise", "max_iter": 1, "cg_max_iter": 2, "info": info},
            meta=meta, bids=tmp_path, noise_hz=noise_hz,
        )  # fmt: skip
        assert info["lam_noise_ppm"] == pytest.approx(hz_to_ppm(0.4, 3.0), rel=1e-5), method
