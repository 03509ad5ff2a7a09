"""The trained networks shipped in the package: integrity, and what they score on a phantom.

The shipped models come from ``qsmprep-train recipe --profile cpu`` (see their model cards);
the bounds below were measured on the 2 mm head phantom with 0.003 ppm field noise:

=================== ===== ===== ===== =====
model               NRMSE HFEN  corr  slope
=================== ===== ===== ===== =====
TKD (reference)     58.1  48.2  0.821 0.761
unet                52.8  42.9  0.852 0.669
dcfinetune          50.1  40.2  0.866 0.719
unsup               54.0  44.6  0.845 0.656
dsbn                57.1  40.5  0.845 0.880
adaptive            73.9  69.3  0.703 0.352
=================== ===== ===== ===== =====
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from qsmprep.app.recipe import STAGES  # noqa: E402
from qsmprep.dl.checkpoint import file_sha256, load_checkpoint  # noqa: E402
from qsmprep.dl.invert import dl_invert  # noqa: E402
from qsmprep.dl.weights import DL_METHODS, WEIGHTS_ENV, available_models, weights_dir  # noqa: E402
from qsmprep.metrics import evaluate  # noqa: E402
from qsmprep.recon.inversion.direct import tkd  # noqa: E402
from qsmprep.recon.inversion.reference import reference_mean  # noqa: E402


@pytest.fixture(autouse=True)
def _shipped(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


def test_every_model_of_the_recipe_is_shipped_intact():
    models = available_models()
    assert set(models) == {s[0] for s in STAGES}
    total = 0
    for name, e in models.items():
        assert e.sha256 == file_sha256(e.path), name
        _, meta = load_checkpoint(e.path, arch=e.arch, sha256=e.sha256)
        assert meta["step"] >= 300, name
        assert "qsmprep-train recipe" in e.card.read_text(), name
        total += e.path.stat().st_size
    assert total < 30e6  # the budget for all shipped weights
    assert weights_dir().name == "weights"


@pytest.fixture(scope="module")
def noisy(phantom2mm, phantom2mm_fields):
    m = phantom2mm.brain_mask
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.003, m.shape).astype(np.float32) * m
    return phantom2mm_fields["local_ppm"] + noise, m, reference_mean(phantom2mm.chi, m)


def _score(chi, m, truth):
    return evaluate(reference_mean(chi, m), truth, m)


@pytest.mark.parametrize(
    "method, nrmse_max, corr_min",
    [("unet", 56, 0.83), ("dcfinetune", 54, 0.85), ("unsup", 58, 0.82), ("dsbn", 60, 0.82),
     ("adaptive", 78, 0.68)],
)  # fmt: skip
def test_shipped_models_on_the_phantom(noisy, phantom2mm, method, nrmse_max, corr_min):
    field, m, truth = noisy
    assert method in DL_METHODS
    chi, info = dl_invert(method, field, m, phantom2mm.voxel_size, device="cpu")
    e = _score(chi, m, truth)
    assert e["nrmse"] < nrmse_max and e["corr"] > corr_min, (method, e["nrmse"], e["corr"])
    if method != "adaptive":  # the U-Nets recover edges better than TKD (HFEN)
        ref = _score(tkd(field, m, phantom2mm.voxel_size), m, truth)
        assert e["hfen"] < ref["hfen"], (method, e["hfen"], ref["hfen"])


def test_qsminvnet_plus_keeps_the_scale(noisy, phantom2mm):
    """QSMInvNet+ against QSMInvNet on the phantom: regression slope 0.88 vs 0.72."""
    field, m, truth = noisy
    e = {k: _score(dl_invert(k, field, m, phantom2mm.voxel_size, device="cpu")[0], m, truth)
         for k in ("dsbn", "dcfinetune")}  # fmt: skip
    assert e["dsbn"]["slope"] > e["dcfinetune"]["slope"] + 0.1, e
