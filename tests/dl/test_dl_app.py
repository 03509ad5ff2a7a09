"""Deep-learning methods in the BIDS App: weights registry, DeepInversion, CLI start-up checks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from qsmprep.dl.checkpoint import file_sha256, save_checkpoint  # noqa: E402
from qsmprep.dl.invert import dl_invert  # noqa: E402
from qsmprep.dl.nets import build_model, default_config  # noqa: E402
from qsmprep.dl.weights import (  # noqa: E402
    WEIGHTS_ENV,
    available_models,
    register_model,
    resolve_model,
)
from qsmprep.recon.inversion.reference import reference_mean  # noqa: E402

B0 = 3.0
HZ_PER_PPM = 42.577478 * B0


def _tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(default_config(arch, base_channels=4, depth=3))


@pytest.fixture()
def weights_dir(tmp_path, monkeypatch):
    """A weights directory with tiny models for dsbn and unet, registered with their sha256."""
    d = tmp_path / "weights"
    for name, arch in (("dsbn", "dsbn"), ("unet", "unet"), ("adaptive", "adaptive")):
        sha = save_checkpoint(d / f"{name}.pt", _tiny(arch), step=7)
        register_model(d, name, d / f"{name}.pt", arch=arch, sha256=sha, description=arch)
    monkeypatch.setenv(WEIGHTS_ENV, str(d))
    return d


def test_registry_round_trip(weights_dir):
    models = available_models()
    assert set(models) == {"dsbn", "unet", "adaptive"}
    e = resolve_model("dsbn")
    assert e.path == weights_dir / "dsbn.pt" and e.arch == "dsbn"
    assert e.sha256 == file_sha256(e.path)


def test_missing_model_names_the_variable_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=WEIGHTS_ENV) as err:
        resolve_model("dsbn")
    assert "qsmprep-train" in str(err.value) and "weights" in str(err.value)
    with pytest.raises(ValueError, match="unknown deep-learning method"):
        resolve_model("qsmnet")


def test_tampered_weights_are_refused(weights_dir):
    reg = json.loads((weights_dir / "registry.json").read_text())
    reg["models"]["unet"]["sha256"] = "0" * 64
    (weights_dir / "registry.json").write_text(json.dumps(reg))
    field = np.zeros((12, 12, 12), np.float32)
    with pytest.raises(ValueError, match="SHA-256"):
        dl_invert("unet", field, field > -1, (1, 1, 1), device="cpu")


def test_wrong_architecture_is_refused(weights_dir):
    field = np.zeros((12, 12, 12), np.float32)
    with pytest.raises(ValueError, match="arch"):  # a U-Net checkpoint given to dsbn
        dl_invert("dsbn", field, field > -1, (1, 1, 1), weights=weights_dir / "unet.pt")


def test_dl_invert_matches_the_network(weights_dir):
    """dl_invert = mask * network([f * 10 * m, m]) / 10, on the input grid, target domain."""
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.02, (16, 12, 20)).astype(np.float32)
    mask = np.zeros(field.shape, bool)
    mask[2:14, 2:10, 3:17] = True
    chi, info = dl_invert("dsbn", field, mask, (1.0, 1.0, 1.5), device="cpu")
    assert info["Domain"] == "target" and info["WeightsSha256"] == file_sha256(
        weights_dir / "dsbn.pt"
    )
    net = _tiny("dsbn").eval()  # same seed: same weights as the registered checkpoint
    x = torch.from_numpy(np.stack([field * 10 * mask, mask.astype(np.float32)]))[None]
    pad = [(-n) % 4 for n in field.shape]
    x = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    with torch.no_grad():
        ref = net(x, domain="target")[0, 0, :16, :12, :20].numpy() / 10 * mask
    assert chi.shape == field.shape and not chi[~mask].any()
    np.testing.assert_allclose(chi, ref, rtol=1e-5, atol=1e-7)


def test_adaptive_side_information_changes_the_map(weights_dir):
    """The adaptive network's output depends on the voxel size and B0 direction given."""
    rng = np.random.default_rng(1)
    field = rng.normal(0, 0.02, (16, 16, 16)).astype(np.float32)
    mask = np.ones(field.shape, bool)
    a, _ = dl_invert("adaptive", field, mask, (1, 1, 1), (0, 0, 1), device="cpu")
    b, _ = dl_invert("adaptive", field, mask, (1, 1, 2), (0, 0.5, 0.866), device="cpu")
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()


def test_deep_inversion_interface(weights_dir, phantom, phantom_fields, tmp_path):
    from qsmprep.interfaces import DeepInversion

    aff = phantom.affine
    f = tmp_path / "local.nii.gz"
    m = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(phantom_fields["local_ppm"] * HZ_PER_PPM, aff), f)
    nib.save(nib.Nifti1Image(phantom.brain_mask.astype(np.uint8), aff), m)
    node = DeepInversion(local_field=str(f), mask=str(m), method="unet", b0=B0)
    node.base_dir = str(tmp_path)
    res = node.run(cwd=str(tmp_path))
    out = nib.load(res.outputs.out_file)
    chi = np.asarray(out.dataobj)
    mask = phantom.brain_mask
    expected, _ = dl_invert(
        "unet", phantom_fields["local_ppm"], mask, phantom.voxel_size, device="cpu"
    )
    np.testing.assert_allclose(chi, reference_mean(expected, mask), atol=1e-6)
    assert abs(chi[mask].mean()) < 1e-6 and not chi[~mask].any()
    params = res.outputs.meta["Parameters"]
    assert params["WeightsSha256"] == file_sha256(weights_dir / "unet.pt")
    assert params["Model"] == "unet" and params["TrainingSteps"] == 7
    assert res.outputs.dc_residual > 0


def test_new_weights_are_not_answered_from_the_cache(weights_dir, tmp_path):
    """A Nipype node of the workflow reruns when the registered weights change."""
    from nipype.pipeline import engine as pe

    from qsmprep.dl.weights import weights_sha256
    from qsmprep.interfaces import DeepInversion

    rng = np.random.default_rng(1)
    f, m = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(0, 2, (16, 16, 16)).astype(np.float32), np.eye(4)), f)
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.uint8), np.eye(4)), m)

    def run():
        node = pe.Node(DeepInversion(local_field=str(f), mask=str(m), method="unet", b0=B0),
                       name="inversion_unet", base_dir=str(tmp_path / "work"))  # fmt: skip
        node.inputs.weights_sha256 = weights_sha256("unet")
        res = node.run()
        return np.asarray(nib.load(res.outputs.out_file).dataobj), res.outputs.meta

    first, meta1 = run()
    # retrain: other weights under the same registered name
    sha = save_checkpoint(weights_dir / "unet.pt", _tiny("unet", seed=5), step=9)
    register_model(weights_dir, "unet", weights_dir / "unet.pt", arch="unet", sha256=sha)
    second, meta2 = run()
    assert meta2["Parameters"]["WeightsSha256"] == sha != meta1["Parameters"]["WeightsSha256"]
    assert np.abs(second - first).max() > 1e-3 * np.abs(first).max()
    # weights that changed between building and running the node are refused
    node = DeepInversion(local_field=str(f), mask=str(m), method="unet", b0=B0)
    node.inputs.weights_sha256 = "0" * 64
    with pytest.raises(ValueError, match="not those the workflow was built with"):
        node.run(cwd=str(tmp_path))
    assert weights_sha256("unet", weights=weights_dir / "unet.pt") == sha
    assert weights_sha256("unet", model="no-such-model") is None


def test_deep_inversion_rejects_unknown_params(weights_dir, tmp_path):
    from qsmprep.interfaces import DeepInversion

    f = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), f)
    node = DeepInversion(local_field=str(f), mask=str(f), method="unet", b0=B0)
    node.inputs.params = {"lam": 1.0}
    with pytest.raises(ValueError, match="unknown parameters"):
        node.run(cwd=str(tmp_path))


def test_workflow_uses_deep_inversion_nodes(weights_dir):
    from qsmprep.interfaces import DeepInversion, DipoleInversion
    from qsmprep.workflows.inversion import init_inversion_wf

    wf = init_inversion_wf(methods=["tkd", "dsbn", "adaptive"], device="cuda", use_gpu=True)
    assert isinstance(wf.get_node("inversion_dsbn").interface, DeepInversion)
    assert isinstance(wf.get_node("inversion_tkd").interface, DipoleInversion)
    assert wf.get_node("inversion_adaptive").interface.inputs.use_gpu
    node = wf.get_node("inversion_dsbn").interface
    assert node.inputs.weights_sha256 == file_sha256(weights_dir / "dsbn.pt")
    assert "domain-specific batch normalization" in wf.__desc__


def test_cli_refuses_a_method_without_weights(tmp_path, monkeypatch, capsys):
    from qsmprep.cli.run import main

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "none"))
    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--methods", "tkd", "dsbn"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "dsbn" in err and WEIGHTS_ENV in err
    assert not out.exists() or not any(out.rglob("*Chimap*"))
