"""Nipype interfaces: every trait documented, each interface run once on a tiny phantom.

The phantom is (32, 32, 24) voxels of 4 mm, three echoes (4, 8, 12 ms) at SNR 100; the brain
is cut by the field of view, which is harmless here (the numbers are measured on it).
"""

from __future__ import annotations

import gzip
import inspect
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
from nipype.interfaces.base import BaseInterface

import qsmprep.interfaces as qi
from qsmprep.interfaces import (
    BrainMask,
    ComputeMetrics,
    Cosmos,
    DipoleInversion,
    FitField,
    LoadEchoes,
    RemoveBackground,
    UnwrapPhase,
    WriteDerivative,
)
from qsmprep.metrics import nrmse
from qsmprep.recon.inversion.consistency import data_consistency
from qsmprep.recon.kernels import b0_dir_from_affine, ppm_to_hz
from qsmprep.sim import make_head_phantom, simulate_fields, simulate_gre
from qsmprep.sim.forward import forward_field

TE = (0.004, 0.008, 0.012)
B0 = 3.0


def _interfaces():
    return [
        obj for obj in vars(qi).values() if inspect.isclass(obj) and issubclass(obj, BaseInterface)
    ]


@pytest.mark.parametrize("iface", _interfaces(), ids=lambda c: c.__name__)
def test_every_trait_has_desc(iface):
    for spec in (iface.input_spec, iface.output_spec):
        for name in spec().visible_traits():
            assert spec().trait(name).desc, f"{iface.__name__}.{spec.__name__}.{name}: no desc"


def test_all_interfaces_are_walked():
    """Every interface that the package exports is checked by the test above."""
    exported = {n for n in qi.__all__ if inspect.isclass(getattr(qi, n))}
    assert {c.__name__ for c in _interfaces()} == exported
    assert {"DipoleInversion", "DeepInversion", "WriteDerivative"} <= exported


# --------------------------------------------------------------------------------------------
# the tiny dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Per-echo NIfTI files of a simulated acquisition, plus truths and helpers."""
    root = tmp_path_factory.mktemp("interfaces")
    ph = make_head_phantom((32, 32, 24), (4.0, 4.0, 4.0), seed=1)
    gre = simulate_gre(ph, TE, b0=B0, snr=100.0, seed=0, fields=simulate_fields(ph))
    b0_dir = b0_dir_from_affine(ph.affine)
    brain = ph.brain_mask
    chi = np.where(brain, ph.chi, 0.0)

    def write(arr, name, dtype=np.float32):
        path = root / name
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype), ph.affine), path)
        return str(path)

    out = {
        "root": root,
        "phantom": ph,
        "gre": gre,
        "brain": brain,
        "chi": chi,
        "b0_dir": list(b0_dir),
        "write": write,
        "magnitude": [write(gre.magnitude[..., n], f"e{n}_mag.nii.gz") for n in range(3)],
        "phase": [write(gre.phase[..., n], f"e{n}_phase.nii.gz") for n in range(3)],
        "brain_file": write(brain, "brain.nii.gz", np.uint8),
        "total_file": write(gre.total_field_hz, "total.nii.gz"),
    }
    # local field of the brain's own sources (exact forward model, in Hz)
    local_hz = ppm_to_hz(forward_field(chi, ph.voxel_size, b0_dir), B0) * brain
    out["local_hz"] = local_hz
    out["local_file"] = write(local_hz, "local.nii.gz")
    return out


@pytest.fixture(scope="module")
def loaded(data):
    res = LoadEchoes(magnitude=data["magnitude"], phase=data["phase"], echo_times=list(TE)).run(
        cwd=str(data["root"])
    )
    return res.outputs


def _img(path):
    return np.asarray(nib.load(path).dataobj)


def test_load_echoes(data, loaded):
    mag, phase = _img(loaded.magnitude), _img(loaded.phase)
    assert mag.shape == phase.shape == (32, 32, 24, 3)
    # radians pass through unchanged (float32 in, float32 out)
    np.testing.assert_array_equal(phase, data["gre"].phase)
    np.testing.assert_array_equal(mag, data["gre"].magnitude)
    np.testing.assert_allclose(nib.load(loaded.phase).affine, data["phantom"].affine)


def test_load_echoes_integer_phase_and_sign(data, tmp_path):
    # Siemens 0..4095 storage: v = (phi + pi) / (2 pi) * 4096, rounded (4096 wraps to 0)
    phi = data["gre"].phase
    levels = np.round((phi + np.pi) / (2 * np.pi) * 4096) % 4096
    ints = [data["write"](levels[..., n], f"e{n}_int.nii.gz", np.int16) for n in range(3)]
    res = LoadEchoes(
        magnitude=data["magnitude"], phase=ints, echo_times=list(TE), phase_units="integer",
        phase_sign=-1,
    ).run(cwd=str(tmp_path))  # fmt: skip
    back = -_img(res.outputs.phase)
    err = np.angle(np.exp(1j * (back - phi)))
    # rounding to 4096 levels: at most half a level, pi / 4096 rad (+ float32 slack)
    assert np.abs(err).max() < np.pi / 4096 * 1.01


def test_load_echoes_rejects_mismatched_grids(data, tmp_path):
    small = data["write"](np.zeros((30, 32, 24)), "small.nii.gz")
    with pytest.raises(ValueError, match="small.nii.gz"):
        LoadEchoes(
            magnitude=data["magnitude"], phase=[*data["phase"][:2], small], echo_times=list(TE)
        ).run(cwd=str(tmp_path))


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def mask_file(data, loaded):
    return BrainMask(magnitude=loaded.magnitude).run(cwd=str(data["root"])).outputs.out_file


def test_brain_mask(data, loaded, mask_file, tmp_path):
    mask = _img(mask_file) > 0
    assert nib.load(mask_file).get_data_dtype() == np.uint8
    # measured Dice 1.000 (magnitude) and 0.990 (phase quality) against the phantom's brain
    assert _dice(mask, data["brain"]) > 0.97
    res = BrainMask(
        magnitude=loaded.magnitude, phase=loaded.phase, echo_times=list(TE), method="phase"
    ).run(cwd=str(tmp_path))
    assert _dice(_img(res.outputs.out_file) > 0, data["brain"]) > 0.95


@pytest.fixture(scope="module")
def unwrapped(data, loaded, mask_file):
    return (
        UnwrapPhase(
            phase=loaded.phase, magnitude=loaded.magnitude, mask=mask_file, echo_times=list(TE)
        )
        .run(cwd=str(data["root"]))
        .outputs.out_file
    )


def test_unwrap_phase(data, unwrapped):
    u = _img(unwrapped)
    m = data["brain"]
    # echo-2 minus echo-1 phase against 2 pi f dTE of the true field: measured median
    # |error| 0.014 rad (noise), well below the 2 pi of an unwrapping error
    err = (u[..., 1] - u[..., 0]) - 2 * np.pi * data["gre"].total_field_hz * (TE[1] - TE[0])
    assert np.median(np.abs(err[m])) < 0.05


def test_fit_field(data, loaded, mask_file, unwrapped):
    res = FitField(
        phase=unwrapped, magnitude=loaded.magnitude, mask=mask_file, echo_times=list(TE)
    ).run(cwd=str(data["root"]))
    total, noise = _img(res.outputs.total_field), _img(res.outputs.noise_field)
    m = data["brain"]
    # measured median |error| 0.28 Hz against the true total field (a few hundred Hz range)
    assert np.median(np.abs(total - data["gre"].total_field_hz)[m]) < 0.5
    assert np.all(np.isfinite(noise[m])) and np.all(noise[m] > 0)
    assert np.all(total[~(_img(mask_file) > 0)] == 0)
    # the noise map is finite everywhere: 0 outside the mask (no signal, no inf for viewers)
    assert np.all(np.isfinite(noise)) and np.all(noise[~(_img(mask_file) > 0)] == 0)
    assert math.isfinite(res.outputs.noise_std) and res.outputs.noise_std > 0


@pytest.mark.parametrize(
    ("method", "bound"),
    # measured NRMSE against the local field of the brain's sources from the true total
    # field: RESHARP 47 %, V-SHARP 50 %, PDF 62 % (4 mm voxels, brain cut by the FOV)
    [("resharp", 55.0), ("vsharp", 57.0), ("pdf", 70.0)],
)
def test_remove_background(data, method, bound, tmp_path):
    res = RemoveBackground(
        total_field=data["total_file"], mask=data["brain_file"], method=method,
        b0_dir=data["b0_dir"], params={"tol": 3e-3} if method != "vsharp" else {},
    ).run(cwd=str(tmp_path))  # fmt: skip
    local, lmask = _img(res.outputs.local_field), _img(res.outputs.local_mask) > 0
    assert lmask.sum() > 0.6 * data["brain"].sum()
    assert nrmse(local, data["gre"].local_field_hz, lmask) < bound
    assert "Parameters" in res.outputs.meta
    json.dumps(res.outputs.meta)  # sidecar-ready


@pytest.mark.parametrize(
    ("method", "params", "min_corr"),
    # correlation with the true chi from the exact local field, measured: TKD 0.891,
    # L2 0.842, MEDI (3 Gauss-Newton iterations) 0.939
    [("tkd", {}, 0.85), ("l2", {}, 0.80), ("medi", {"max_iter": 3}, 0.90)],
)
def test_dipole_inversion(data, loaded, method, params, min_corr, tmp_path):
    iface = DipoleInversion(
        local_field=data["local_file"], mask=data["brain_file"], method=method, params=params,
        b0=B0, b0_dir=data["b0_dir"], echo_times=list(TE), magnitude=loaded.magnitude,
        device="auto",
    )  # fmt: skip
    res = iface.run(cwd=str(tmp_path))
    chi, m = _img(res.outputs.out_file), data["brain"]
    assert np.corrcoef(chi[m], data["chi"][m])[0, 1] > min_corr
    assert abs(chi[m].mean()) < 1e-6  # referenced to the mean of the mask
    assert np.all(chi[~m] == 0)
    # the residual output is the recon function's, on the field in ppm
    dc = data_consistency(chi, data["local_hz"] / (B0 * 42.577478), m, (4.0,) * 3,
                          b0_dir=data["b0_dir"])  # fmt: skip
    assert res.outputs.dc_residual == pytest.approx(dc, rel=1e-4)
    # measured 16 % (TKD), 25 % (L2), 16 % (MEDI): the map does not explain the field exactly
    assert 5.0 < res.outputs.dc_residual < 35.0
    assert res.outputs.meta["DataConsistencyResidual"] == pytest.approx(dc, abs=1e-3)
    json.dumps(res.outputs.parameters)
    if method == "tkd":
        assert res.outputs.parameters["threshold"] == 0.19
    if method == "medi":  # echo spacing and field strength come from the inputs
        assert res.outputs.parameters["delta_te"] == pytest.approx(TE[1] - TE[0])
        assert res.outputs.parameters["max_iter"] == 3


def test_use_gpu_is_not_hashed(data):
    a = DipoleInversion(local_field=data["local_file"], mask=data["brain_file"], method="tkd",
                        b0=B0)  # fmt: skip
    h1 = a.inputs.get_hashval()[1]
    a.inputs.use_gpu = True
    assert a.inputs.get_hashval()[1] == h1
    a.inputs.device = "cuda"
    assert a.inputs.get_hashval()[1] != h1


def test_cosmos(data, tmp_path):
    ph, chi, m = data["phantom"], data["chi"], data["brain"]
    dirs = [data["b0_dir"], [0.0, -0.342, 0.940], [0.342, 0.0, 0.940]]
    fields = [
        data["write"](ppm_to_hz(forward_field(chi, ph.voxel_size, d), B0) * m, f"lf{i}.nii.gz")
        for i, d in enumerate(dirs)
    ]
    res = Cosmos(
        local_fields=fields, masks=[data["brain_file"]] * 3, b0_dirs=dirs, b0=[B0] * 3
    ).run(cwd=str(tmp_path))
    out = _img(res.outputs.out_file)
    # measured 7.0 % NRMSE against the truth (TKD on one orientation: 46 %)
    assert nrmse(out, chi, m) < 10.0
    assert abs(out[m].mean()) < 1e-6
    assert np.array_equal(_img(res.outputs.mask) > 0, m)
    with pytest.raises(ValueError, match="one of each per orientation"):
        Cosmos(local_fields=fields, masks=[data["brain_file"]] * 3, b0_dirs=dirs[:2],
               b0=[B0] * 3).run(cwd=str(tmp_path))  # fmt: skip


def test_compute_metrics(data, tmp_path):
    m = data["brain"]
    ref = data["write"](np.where(m, data["chi"] - data["chi"][m].mean(), 0), "ref.nii.gz")
    noisy = data["write"](
        np.where(m, data["chi"] + np.random.default_rng(0).normal(0, 0.02, m.shape), 0),
        "noisy.nii.gz",
    )
    common = {"mask": data["brain_file"], "local_field": data["local_file"], "b0": B0,
              "b0_dir": data["b0_dir"]}  # fmt: skip
    res = ComputeMetrics(
        in_files=[ref, noisy], methods=["truth", "noisy"], reference=ref, **common
    ).run(cwd=str(tmp_path))
    truth, other = res.outputs.rows
    assert truth["reference"] == "ref.nii.gz"
    assert truth["nrmse"] == pytest.approx(0.0, abs=1e-9) and truth["corr"] == pytest.approx(1)
    # the true chi explains the exact local field: measured 1.5e-5 % (padding of the grid)
    assert truth["dc_residual"] < 1e-3
    assert other["nrmse"] > 1.0 and other["dc_residual"] > truth["dc_residual"]
    lines = Path(res.outputs.out_tsv).read_text().splitlines()
    assert lines[0].split("\t") == list(qi.METRIC_COLUMNS)
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["truth", "noisy"]
    payload = json.loads(Path(res.outputs.out_json).read_text())
    assert payload["Reference"] == "ref.nii.gz" and len(payload["Metrics"]) == 2
    assert set(payload["Columns"]) == set(qi.METRIC_COLUMNS)

    # without a reference: only the reference-free residual, the rest "n/a"
    (tmp_path / "noref").mkdir()
    res = ComputeMetrics(in_files=[noisy], methods=["noisy"], **common).run(
        cwd=str(tmp_path / "noref")
    )
    row = Path(res.outputs.out_tsv).read_text().splitlines()[1].split("\t")
    assert row[:2] == ["noisy", "none"] and row[2:-1] == ["n/a"] * 7
    assert float(row[-1]) == pytest.approx(other["dc_residual"], rel=1e-5)


def test_write_derivative(data, tmp_path):
    target = tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-tkd_Chimap.nii.gz"
    res = WriteDerivative(
        in_file=data["local_file"], out_file=str(target), sidecar={"Units": "ppm", "Method": "x"},
        meta={"Method": "tkd", "DataConsistencyResidual": 12.5},
    ).run(cwd=str(tmp_path))  # fmt: skip
    assert res.outputs.out_file == str(target)
    assert target.read_bytes() == Path(data["local_file"]).read_bytes()
    side = json.loads(target.with_name("sub-01_desc-tkd_Chimap.json").read_text())
    assert side == {"Units": "ppm", "Method": "tkd", "DataConsistencyResidual": 12.5}
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    assert WriteDerivative().always_run
    with pytest.raises(ValueError, match="file types differ"):
        WriteDerivative(in_file=data["local_file"], out_file=str(tmp_path / "x.tsv")).run(
            cwd=str(tmp_path)
        )


def test_write_derivative_compresses_an_uncompressed_intermediate(data, tmp_path):
    # intermediates are .nii (fast to write); a .nii.gz derivative is compressed on publishing,
    # with no time stamp, so equal data give equal bytes
    img = nib.load(data["local_file"])
    raw = tmp_path / "field.nii"
    nib.save(img, str(raw))
    outs = []
    for k in (1, 2):
        target = tmp_path / f"out{k}" / "sub-01_desc-local_fieldmap.nii.gz"
        WriteDerivative(in_file=str(raw), out_file=str(target)).run(cwd=str(tmp_path))
        assert gzip.decompress(target.read_bytes()) == raw.read_bytes()
        np.testing.assert_array_equal(nib.load(str(target)).get_fdata(), img.get_fdata())
        outs.append(target.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method", ["tv", "medi", "tkd"])
def test_dipole_inversion_on_the_whole_brain(data, loaded, method, tmp_path):
    # the local field known in the brain less its edge layer and one unreliable patch: TV and
    # MEDI cover the whole brain mask (zero data weight outside the known field), TKD the
    # local mask; the sidecar says which
    brain = data["brain"]
    local = ndi.binary_erosion(brain)
    reliable = brain.copy()
    reliable[10:13, 10:13, 8:11] = False
    affine = nib.load(data["brain_file"]).affine
    files = {}
    noise = np.where(brain, 0.3, 0.0)  # Hz
    for name, arr in (("local", local), ("reliable", reliable), ("noise", noise)):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), files[name])
    params = {"max_iter": 3} if method == "medi" else {}
    iface = DipoleInversion(
        local_field=data["local_file"], mask=files["local"], brain_mask=data["brain_file"],
        reliable_mask=files["reliable"], method=method, params=params, b0=B0,
        b0_dir=data["b0_dir"], echo_times=list(TE), magnitude=loaded.magnitude,
        noise_field=files["noise"], bg_meta={"Method": "lbv"},
    )  # fmt: skip
    res = iface.run(cwd=str(tmp_path))
    chi = _img(res.outputs.out_file)
    meta = res.outputs.meta
    assert meta["BackgroundMethod"] == "lbv"
    if method == "tkd":
        assert np.all(chi[~local] == 0) and meta["Mask"] == "desc-local_mask"
        assert meta["Reference"] == "mean of local mask"
    else:
        assert np.count_nonzero(chi[brain]) >= 0.99 * brain.sum()
        assert meta["Mask"] == "desc-brain_mask" and meta["Reference"] == "mean of brain mask"
        assert "zero outside desc-local_mask" in meta["DataWeight"]
        assert abs(chi[brain].mean()) < 1e-6
        assert np.corrcoef(chi[brain], data["chi"][brain])[0, 1] > 0.8


def test_medi_noise_lambda_reads_the_noise_map_in_ppm(data, loaded, tmp_path):
    # --config {"medi": {"lam": "noise"}}: the noise map on disk is in Hz; MEDI's lambda
    # 4 / sigma needs it in ppm. The same run with that lambda given as a number must give
    # the same map (a noise map passed in Hz would give a 128 x smaller lambda).
    brain = data["brain"]
    affine = nib.load(data["brain_file"]).affine
    noise_file = str(tmp_path / "noise.nii.gz")
    nib.save(nib.Nifti1Image(np.where(brain, 0.5, 0.0).astype(np.float32), affine), noise_file)
    sigma_ppm = 0.5 / (B0 * 42.57747892)
    maps = []
    for lam in ("noise", 4.0 / sigma_ppm):
        out = tmp_path / str(lam)
        out.mkdir()
        res = DipoleInversion(
            local_field=data["local_file"], mask=data["brain_file"], method="medi",
            params={"lam": lam, "max_iter": 2}, b0=B0, b0_dir=data["b0_dir"],
            echo_times=list(TE), magnitude=loaded.magnitude, noise_field=noise_file,
        ).run(cwd=str(out))  # fmt: skip
        assert res.outputs.parameters["lam"] == lam
        if lam == "noise":  # the value it chose, in the sidecar
            chosen = res.outputs.meta["NoiseLambda"]
            assert chosen["Lambda"] == pytest.approx(4.0 / sigma_ppm, rel=1e-6)
            assert chosen["NoiseStd"] == pytest.approx(sigma_ppm, rel=1e-6)
            json.dumps(res.outputs.meta)
        else:
            assert "NoiseLambda" not in res.outputs.meta
        maps.append(_img(res.outputs.out_file))
    assert np.abs(maps[0] - maps[1]).max() <= 1e-6 * np.abs(maps[1]).max()


def test_r2star_map(tmp_path, monkeypatch):
    """R2StarMap: the recon fit on a NIfTI decay, 0 outside the mask, counts in the sidecar."""
    monkeypatch.chdir(tmp_path)
    te = [0.004, 0.008, 0.012, 0.016]
    r2 = np.linspace(5.0, 60.0, 8 * 9 * 10).reshape(8, 9, 10)
    mag = 500.0 * np.exp(-r2[..., None] * np.asarray(te))
    mask = np.zeros(r2.shape, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    aff = np.diag([1.0, 1.0, 2.5, 1.0])
    nib.save(nib.Nifti1Image(mag.astype(np.float32), aff), tmp_path / "mag.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), tmp_path / "mask.nii.gz")
    res = qi.R2StarMap(
        magnitude=str(tmp_path / "mag.nii.gz"), mask=str(tmp_path / "mask.nii.gz"),
        echo_times=te, params={"max_iter": 20},
    ).run()  # fmt: skip
    out = res.outputs
    assert out.meta["Method"] == "arlo" and out.meta["ClippedHighVoxels"] == 0
    got = nib.load(out.r2star).get_fdata()
    inside = mask > 0
    np.testing.assert_allclose(got[inside], r2[inside], rtol=1e-4)  # Simpson bias < 5e-5
    assert np.all(got[~inside] == 0)
    np.testing.assert_allclose(nib.load(out.t2star).get_fdata()[inside], 1 / got[inside], 1e-5)
    np.testing.assert_allclose(nib.load(out.s0).get_fdata()[inside], 500.0, rtol=1e-3)
    assert np.allclose(nib.load(out.r2star).affine, aff)


def test_messages_name_the_acquisition_of_a_work_file():
    from qsmprep.interfaces.field import _acquisition_of

    assert _acquisition_of("/w/sub-01_echo-1_part-mag_MEGRE_4d_brainmask_totalfield.nii") == (
        "sub-01"
    )
    assert _acquisition_of("sub-02_ses-a_acq-swi_part-mag_T2starw_totalfield.nii") == (
        "sub-02_ses-a_acq-swi"
    )
    assert _acquisition_of("field.nii") == "field.nii"


def test_tfi_inverts_the_total_field(data, loaded, tmp_path):
    # a total field inversion reads total_field (Hz), not local_field: its map is the function's
    # on the total field in ppm over the brain mask, with data on the brain's reliable voxels
    from qsmprep.recon.inversion.tfi import tfi
    from qsmprep.recon.kernels import hz_to_ppm
    from qsmprep.recon.mask import combine_magnitude
    from qsmprep.threads import limit_threads

    brain = data["brain"]
    reliable = brain.copy()
    reliable[10:13, 10:13, 8:11] = False
    affine = nib.load(data["brain_file"]).affine
    files = {}
    for name, arr in (("reliable", reliable), ("noise", np.where(brain, 0.3, 0.0))):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), files[name])
    kw = dict(
        local_field=data["local_file"], mask=data["brain_file"], brain_mask=data["brain_file"],
        reliable_mask=files["reliable"], method="tfi", params={"max_iter": 2}, b0=B0,
        b0_dir=data["b0_dir"], echo_times=list(TE), magnitude=loaded.magnitude,
        noise_field=files["noise"], bg_meta={"Method": "lbv"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="total_field"):
        DipoleInversion(**kw).run(cwd=str(tmp_path))
    res = DipoleInversion(total_field=data["total_file"], **kw).run(cwd=str(tmp_path))
    meta = res.outputs.meta
    assert meta["FieldInput"] == "desc-total_fieldmap"
    assert meta["BackgroundMethod"] == "none (total field inversion)"
    assert meta["Mask"] == "desc-brain_mask"
    sigma_ppm = 0.3 / (B0 * 42.57747892)
    assert meta["NoiseLambda"]["NoiseStd"] == pytest.approx(sigma_ppm, rel=1e-5)
    # the node's inputs as the node makes them (hz_to_ppm of the files), with its thread count
    # and so its FFT engine: TFI's CG (100 iterations in its second step) amplifies float32
    # rounding of its inputs (the engines agree to 1e-7) to a few 1e-4 of the map
    total_ppm = hz_to_ppm(_img(data["total_file"]), B0)
    noise_ppm = hz_to_ppm(np.where(reliable, _img(files["noise"]), 1.0), B0)
    with limit_threads(1):
        want = tfi(
            total_ppm, brain, data["phantom"].voxel_size, b0_dir=data["b0_dir"],
            magnitude=combine_magnitude(_img(loaded.magnitude)),
            noise_std=noise_ppm, data_mask=reliable,
            delta_te=TE[1] - TE[0], b0=B0, max_iter=2,
        )  # fmt: skip
    want[brain] -= want[brain].mean()
    got = _img(res.outputs.out_file)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_remove_background_tfibg(data, loaded, tmp_path):
    # TFI's background gets the magnitude, noise map, reliable voxels, echo times and B0 from
    # the node; its local field covers the whole brain (TFI's model field on the unreliable
    # voxels) and beats RESHARP inside RESHARP's mask (RESHARP: 47 % there, the bound of
    # test_remove_background)
    brain = data["brain"]
    affine = nib.load(data["brain_file"]).affine
    noise_file = str(tmp_path / "noise.nii.gz")
    nib.save(nib.Nifti1Image(np.where(brain, 0.3, 0.0).astype(np.float32), affine), noise_file)
    reliable = brain.copy()
    reliable[10:13, 10:13, 8:11] = False  # unreliable voxels: the model's field there
    reliable_file = str(tmp_path / "reliable.nii.gz")
    nib.save(nib.Nifti1Image(reliable.astype(np.uint8), affine), reliable_file)
    kw = dict(total_field=data["total_file"], mask=data["brain_file"], method="tfibg",
              b0_dir=data["b0_dir"])  # fmt: skip
    with pytest.raises(ValueError, match="magnitude"):
        RemoveBackground(**kw).run(cwd=str(tmp_path))
    res = RemoveBackground(
        **kw, magnitude=loaded.magnitude, noise_field=noise_file,
        reliable_mask=reliable_file, echo_times=list(TE), b0=B0,
    ).run(cwd=str(tmp_path))  # fmt: skip
    local, lmask = _img(res.outputs.local_field), _img(res.outputs.local_mask) > 0
    assert np.array_equal(lmask, brain) and np.all(local[brain & ~reliable] != 0)
    assert not local[~brain].any()
    (tmp_path / "resharp").mkdir()
    ref = RemoveBackground(
        total_field=data["total_file"],
        mask=data["brain_file"],
        method="resharp",
        b0_dir=data["b0_dir"],
    ).run(cwd=str(tmp_path / "resharp"))
    rmask = _img(ref.outputs.local_mask) > 0
    truth = data["gre"].local_field_hz
    assert nrmse(local, truth, rmask) <= nrmse(_img(ref.outputs.local_field), truth, rmask)
    used = res.outputs.meta["Parameters"]
    assert used["b0"] == B0 and used["delta_te"] == pytest.approx(TE[1] - TE[0])
    assert used["fill"] is True
    assert "magnitude" not in used and "noise_std" not in used
    json.dumps(res.outputs.meta)
