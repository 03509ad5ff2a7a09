"""``qsmprep-train recipe``: every shipped model is trained, registered and runnable."""

from __future__ import annotations

import stat

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsmprep.app.recipe import STAGES, run_recipe  # noqa: E402
from qsmprep.dl.checkpoint import file_sha256, load_checkpoint  # noqa: E402
from qsmprep.dl.invert import DL_ARCH, dl_invert  # noqa: E402
from qsmprep.dl.weights import DL_METHODS, WEIGHTS_ENV, available_models  # noqa: E402


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("recipe")
    return out, run_recipe(out, profile="tiny", device="cpu")


def test_every_model_is_registered_with_its_hash_and_card(recipe):
    _, weights = recipe
    models = available_models(weights)
    assert set(models) == {s[0] for s in STAGES}
    for entry in models.values():
        assert entry.sha256 == file_sha256(entry.path)
        assert entry.card is not None and entry.card.read_text().startswith("# Model card")
        mode = entry.path.stat().st_mode
        assert mode & stat.S_IROTH, f"{entry.path} is not readable by other users"
        _, meta = load_checkpoint(entry.path, arch=entry.arch, sha256=entry.sha256)
        assert meta["step"] >= 3
    # the adapted and transferred models start from the pre-trained ones
    assert models["dsbn"].arch == "dsbn" and models["adaptive"].arch == "adaptive"
    _, meta = load_checkpoint(models["dsbn"].path)
    assert meta["config"]["default_domain"] == "target"
    # QSMInvNet+ and QSMInvNet both start from the pre-trained U-Net
    pre = models["unet-pretrained"].sha256
    for name in ("dsbn", "dcfinetune", "unet"):
        assert load_checkpoint(models[name].path)[1]["data"]["init_sha256"] == pre, name
    # conventional networks: cubic 1-2 mm voxels; adaptive ones: anisotropic 0.5-3.5 mm
    syn = load_checkpoint(models["unet-pretrained"].path)[1]["data"]["synthetic"]
    assert syn["isotropic"] and syn["voxel_size"] == [[1.0, 2.0]] * 3
    syn = load_checkpoint(models["adaptive-pretrained"].path)[1]["data"]["synthetic"]
    assert not syn["isotropic"] and syn["voxel_size"][2] == [0.5, 3.5]
    assert syn["b0_dir"] == "random"


def test_every_app_method_runs_the_recipe_models(recipe, monkeypatch):
    _, weights = recipe
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.02, (20, 20, 20)).astype(np.float32)
    mask = np.ones(field.shape, bool)
    for method in DL_METHODS:
        chi, info = dl_invert(method, field, mask, (2, 2, 2), device="cpu")
        assert np.isfinite(chi).all() and info["Architecture"] == DL_ARCH[method]
        assert info["WeightsSha256"] == file_sha256(weights / f"{info['Model']}.pt")


def test_rerun_continues_without_retraining(recipe):
    out, weights = recipe
    before = {p.name: p.stat().st_mtime_ns for p in weights.glob("*.pt")}
    run_recipe(out, profile="tiny", device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in weights.glob("*.pt")} == before


def test_target_validation_of_the_profiles(recipe, tmp_path, monkeypatch):
    from qsmprep.app.recipe import PROFILES, make_target_data

    # the tiny profile's one head validates on its training scans, and the cards say so
    _, weights = recipe
    models = available_models(weights)
    for name in ("dsbn", "dcfinetune", "unsup", "adaptive", "unet"):
        _, meta = load_checkpoint(models[name].path)
        v = meta["data"]["validation"]
        assert v["target_validation"] == "training scans (target_holdout 0)", name
        assert "target_validation" in models[name].card.read_text()
    # the trained profiles hold a head out beyond their training heads
    assert PROFILES["cpu"]["target_val_heads"] == 1 and PROFILES["gpu"]["target_val_heads"] == 1
    # target data of an earlier run with as many heads are kept; others are made again
    deriv = tmp_path / "derivatives"
    (deriv / "sub-01").mkdir(parents=True)
    (deriv / "dataset_description.json").write_text("{}")
    assert make_target_data(tmp_path, profile="tiny") == deriv

    class Simulated(Exception):
        pass

    def simulate(*args, **kw):
        raise Simulated(kw["n_subjects"])

    monkeypatch.setattr("qsmprep.sim.bids.simulate_bids_dataset", simulate)
    with pytest.raises(Simulated, match="3"):
        make_target_data(tmp_path, profile="cpu")
    assert not deriv.exists()
