"""Single-echo GRE: the field chain on one echo, and the BIDS App end to end on a T2starw."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from qsmprep.cli import run
from qsmprep.metrics import nrmse
from qsmprep.recon import echo, mask, unwrap
from qsmprep.sim import make_head_phantom, simulate_fields, simulate_gre
from qsmprep.sim.bids import simulate_bids_dataset

TE = 0.008
"""Echo time (s) of the single echo."""


def test_one_echo_field_is_phase_over_two_pi_te():
    """One echo in: unwrapping skips the offset removal, the field is ``phi / (2 pi TE)``.

    Tolerances, set from the goal before measuring: the fit reproduces the closed form to
    float32 round-off (1e-6 relative, 1e-4 Hz); its std is ``sigma / (2 pi M TE)`` to 1e-5
    relative; against the simulated truth (no phase offset, SNR 100) fewer than 0.5 % of the
    brain voxels carry an unwrapping error (more than half a period, ``1 / (2 TE)``) and the
    RMS error of the others is at most 1.5 times the RMS of the predicted std.
    """
    ph = make_head_phantom((48, 48, 40), (3.0, 3.0, 3.0), seed=2)
    fields = simulate_fields(ph)
    gre = simulate_gre(ph, (TE,), snr=100.0, seed=4, phase_offset=False, fields=fields)
    brain = ph.brain_mask
    assert gre.phase.shape[-1] == 1

    with pytest.raises(ValueError, match="needs >= 2 echoes"):
        unwrap.unwrap_multi_echo(
            gre.phase, gre.magnitude, (TE,), mask=brain, remove_offset=True, voxel_size=3.0
        )
    u = unwrap.unwrap_multi_echo(gre.phase, gre.magnitude, (TE,), mask=brain, voxel_size=3.0)
    # congruent with the wrapped input: the offset was not touched
    k = (u[..., 0] - gre.phase[..., 0])[brain] / (2 * np.pi)
    assert np.allclose(k, np.round(k), atol=1e-3)

    with pytest.raises(ValueError, match="one echo cannot give both"):
        echo.fit_field_linear(u, gre.magnitude, (TE,), mask=brain, offset=True)
    field, std, offset = echo.fit_field_linear(
        u, gre.magnitude, (TE,), mask=brain, noise_std=gre.noise_std
    )
    closed = u[..., 0].astype(np.float64) / (2 * np.pi * TE)
    assert np.allclose(field[brain], closed[brain], rtol=1e-6, atol=1e-4)
    assert not offset.any()
    m = gre.magnitude[..., 0].astype(np.float64)
    predicted = gre.noise_std / (2 * np.pi * m * TE)
    assert np.all(np.isfinite(std[brain]))
    assert np.allclose(std[brain], predicted[brain], rtol=1e-5)

    err = (field - gre.total_field_hz)[brain]
    wrong = np.abs(err) > 1 / (2 * TE)
    assert wrong.mean() < 0.005
    rms_err = np.sqrt(np.mean(err[~wrong] ** 2))
    rms_std = np.sqrt(np.mean(predicted[brain][~wrong] ** 2))
    assert rms_err <= 1.5 * rms_std, (rms_err, rms_std)

    # no residual with one echo: nothing is judged, and the info says so
    residual = echo.fit_residual(u, gre.magnitude, (TE,), field, offset, mask=brain)
    assert not residual.any()
    trimmed, reliable, info = mask.field_reliability(brain, residual, 3.0)
    assert np.array_equal(trimmed, brain) and np.array_equal(reliable, brain)
    assert info["unreliable"] == 0 and info["threshold_rad"] is None and "note" in info

    with pytest.raises(ValueError, match="at least two echoes"):
        echo.fit_field_complex(gre.magnitude, gre.phase, (TE,), mask=brain, init=(field, offset))


def _single_echo_copy(src, dst, echo=2):
    """``dst``: the BIDS dataset ``src`` with only echo ``echo`` kept, as a T2starw."""
    shutil.copytree(src, dst)
    anat = dst / "sub-01" / "anat"
    for p in sorted(anat.iterdir()):
        if f"_echo-{echo}_" in p.name:
            part = "mag" if "_part-mag_" in p.name else "phase"
            ext = ".json" if p.name.endswith(".json") else ".nii.gz"
            new = anat / f"sub-01_part-{part}_T2starw{ext}"
            if ext == ".json":
                side = json.loads(p.read_text())
                side.pop("EchoNumber", None)
                side.pop("EchoTrainLength", None)
                side["PulseSequenceType"] = "Spoiled gradient echo"
                new.write_text(json.dumps(side, indent=2))
                p.unlink()
            else:
                p.rename(new)
        else:
            p.unlink()
    return dst


def _tkd_nrmse(out, bids):
    gt = bids / "derivatives/groundtruth/sub-01/anat"
    truth = nib.load(gt / "sub-01_Chimap.nii.gz").get_fdata()
    brain = nib.load(gt / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    chi = nib.load(out / "sub-01/anat/sub-01_desc-tkd_Chimap.nii.gz").get_fdata()
    return nrmse(chi, truth, brain)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One simulated subject (3 mm, TE 4/8/12 ms) run on echo 2 alone (a T2starw: TKD, TV)
    and on all three echoes (TKD): ``(single_bids, single_out, multi_bids, multi_out, rcs)``."""
    tmp = tmp_path_factory.mktemp("single_echo")
    multi = tmp / "multi"
    simulate_bids_dataset(
        multi,
        n_subjects=1,
        shape=(32, 32, 24),
        voxel_size=3.0,
        echo_times=(0.004, TE, 0.012),
        seed=3,
    )
    single = _single_echo_copy(multi, tmp / "single")

    def app(bids, out, *methods):
        args = [str(bids), str(out), "participant", "-w", str(tmp / f"work_{out.name}")]
        return run.main([*args, "--methods", *methods, "--nprocs", "2", "--device", "cpu"])

    out_single, out_multi = tmp / "out_single", tmp / "out_multi"
    rcs = (app(single, out_single, "tkd", "tv"), app(multi, out_multi, "tkd"))
    return single, out_single, multi, out_multi, rcs


def test_single_echo_t2starw_end_to_end(runs):
    """A dataset whose only acquisition is one echo runs end to end (TKD and TV)."""
    _, out, _, out_multi, rcs = runs
    assert rcs == (0, 0)
    anat = out / "sub-01" / "anat"
    for m in ("tkd", "tv"):
        assert (anat / f"sub-01_desc-{m}_Chimap.nii.gz").is_file()
    total = json.loads((anat / "sub-01_desc-total_fieldmap.json").read_text())
    assert total["PhaseOffsetRemoval"] == "skipped: single echo"
    assert total["UnwrapMethod"] == "laplacian"  # --unwrap auto, one echo
    assert total["EchoTime"] == [TE]
    local = json.loads((anat / "sub-01_desc-local_fieldmap.json").read_text())
    assert local["FieldReliability"]["unreliable"] == 0 and local["FieldReliability"]["note"]
    brain = nib.load(anat / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    reliable = nib.load(anat / "sub-01_desc-reliable_mask.nii.gz").get_fdata() > 0
    assert np.array_equal(brain, reliable)
    noise = nib.load(anat / "sub-01_desc-noise_fieldmap.nii.gz").get_fdata()[brain]
    assert np.all(np.isfinite(noise)) and np.all(noise > 0)
    report = (out / "sub-01.html").read_text()
    assert "(1 echo)" in report and "single echo" in report
    total_multi = json.loads(
        (out_multi / "sub-01/anat/sub-01_desc-total_fieldmap.json").read_text()
    )
    assert total_multi["PhaseOffsetRemoval"] == "MCPC-3D-S"
    assert total_multi["UnwrapMethod"] == "quality"


def test_single_echo_accuracy_against_all_echoes(runs):
    """Accuracy bound, set before measuring: TKD's NRMSE over the true brain mask on the single
    echo (TE 8 ms) is at most 1.5 times TKD's on all three echoes (4, 8, 12 ms) of the same
    simulated subject. One echo cannot remove the phase offset, whose non-harmonic part stays
    in the local field, and has no fit residual to find unreliable voxels, so it may be worse;
    not by more than half again. (Met since ``--unwrap auto`` uses the Laplacian method for
    one echo: 137.1 % against 100.7 %; region growing, the multi-echo default, scored
    228.5 %, with 19 edge voxels 2 pi off where the field aliases between 3 mm voxels.)
    """
    single, out, multi, out_multi, rcs = runs
    assert rcs == (0, 0)
    e_single, e_multi = _tkd_nrmse(out, single), _tkd_nrmse(out_multi, multi)
    print(f"TKD NRMSE over the true brain mask: one echo {e_single:.1f} %, three {e_multi:.1f} %")
    assert e_single <= 1.5 * e_multi, (e_single, e_multi)
