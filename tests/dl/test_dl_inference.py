"""Inference of qsmprep.dl: padding, tiling with blending, OOM fallback, devices, bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from qsmprep.dl.inference import predict, resolve_device, tile_starts, tile_window  # noqa: E402
from qsmprep.dl.nets import build_model, default_config  # noqa: E402


def warmed(arch="unet", depth=3, base=4, seed=0, **kw):
    """Small model with non-trivial batch-norm running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(default_config(arch, depth=depth, base_channels=base, **kw)).train()
    side = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 2, 16, 16, 16) * 0.5, side=side)
    return model.eval()


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    shape = (112, 16, 16)
    field = (rng.normal(size=shape) * 0.05).astype(np.float32)
    mask = np.ones(shape, bool)
    mask[:, :2] = False
    mask[:5] = False
    return field, mask


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("torch") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


def test_tile_layout_and_partition_of_unity():
    assert tile_starts(112, 64, 16) == [0, 16, 32, 48]
    assert tile_starts(80, 48, 32) == [0, 32]
    assert tile_starts(96, 48, 32) == [0, 32, 48]  # last tile ends on the border
    assert tile_starts(40, 64, 16) == [0]
    # neighbours overlapping by exactly `overlap` sum to 1 over the overlap
    for overlap in (8, 16, 32, 48):
        w = tile_window(128, overlap, True, True)
        total = w[128 - overlap :] + w[:overlap]
        assert np.allclose(total, 1.0, atol=1e-12)
        # dead band of overlap // 4 voxels at the tile edge
        assert np.all(w[: overlap // 4] == 0) and w[overlap // 4] > 0
    assert np.all(tile_window(32, 16, False, False) == 1)


def test_predict_matches_direct_forward_and_pads(volume):
    field, mask = volume
    field, mask = field[:21, :14, :13], mask[:21, :14, :13].copy()
    mask[:, :, -3:] = False
    model = warmed()
    chi = predict(model, field, mask, (1.0, 1.0, 1.0))
    assert chi.shape == field.shape and chi.dtype == np.float32
    assert np.all(chi[~mask] == 0) and np.all(np.isfinite(chi))
    # by hand: [10 f m, m] zero-padded to (24, 16, 16), output / 10, cropped, masked
    x = torch.zeros(1, 2, 24, 16, 16)
    x[0, 0, :21, :14, :13] = torch.from_numpy(np.where(mask, field, 0) * 10)
    x[0, 1, :21, :14, :13] = torch.from_numpy(mask.astype(np.float32))
    with torch.no_grad():
        ref = model(x)[0, 0, :21, :14, :13].numpy() / 10
    assert np.abs(chi - np.where(mask, ref, 0)).max() <= 1e-6 * np.abs(ref).max()
    assert np.abs(chi).max() > 0


def test_predict_in_bf16_on_the_cpu_stays_close(volume):
    """bfloat16 keeps 8 mantissa bits (2**-9 relative per operation); through a depth-3 net
    the output should stay within 3 % of the float32 peak (bound set before measuring;
    measured 0.7 %)."""
    field, mask = volume
    model = warmed()
    ref = predict(model, field, mask, (1.0, 1.0, 1.0))
    got = predict(model, field, mask, (1.0, 1.0, 1.0), cpu_bf16=True)
    assert got.dtype == np.float32 and np.all(got[~mask] == 0)
    assert 0 < np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()


def test_predict_restores_mode_and_ignores_nan_outside_mask(volume):
    field, mask = volume
    field = field[:16, :16, :16].copy()
    mask = mask[:16, :16, :16]
    field[~mask] = np.nan
    model = warmed().train()
    chi = predict(model, field, mask, 1.0)
    assert model.training
    assert np.all(np.isfinite(chi))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_tiled_equals_full_when_dead_band_covers_receptive_field(volume):
    """Tiling bookkeeping: exact when no weighted voxel sees a tile border.

    For depth 2 the receptive-field radius is about 11 voxels; with overlap 48 the window
    gives zero weight to the 12 voxels next to every inner tile border, so the blended tiles
    must reproduce the single pass up to float32 rounding (measured 3e-8 relative).
    """
    field, mask = volume
    model = warmed(depth=2)
    full = predict(model, field, mask, 1.0)
    tiled = predict(model, field, mask, 1.0, tile_shape=(64, 32, 32), overlap=48)
    assert _rel(tiled, full) < 1e-6


def test_tiled_matches_full_within_1e_4(volume):
    """Depth-3 model: receptive-field radius ~25 voxels, beyond the dead band of 8 voxels.

    Voxels near tile borders see zero padding instead of tissue; the window gives them little
    weight and the overlap averages the rest. Tiles (48, 32, 32) with overlap 32: measured
    3.3e-5 relative (L2 over the volume), bound 1e-4. Tiles of 32 with overlap 16: measured
    4.1e-4, bound 2e-3 (with trained networks the far field of the receptive field is weaker).
    """
    field, mask = volume
    model = warmed(depth=3)
    full = predict(model, field, mask, 1.0)
    tiled = predict(model, field, mask, 1.0, tile_shape=(48, 32, 32), overlap=32)
    assert _rel(tiled, full) < 1e-4
    coarse = predict(model, field, mask, 1.0, tile_shape=32, overlap=16)
    assert _rel(coarse, full) < 2e-3


class _OOMModel(torch.nn.Module):
    """Wraps a model; raises CUDA OOM for inputs of more than `limit` voxels."""

    def __init__(self, model, limit):
        super().__init__()
        self.model = model
        self.limit = limit
        self.seen = []

    @property
    def multiple(self):
        return self.model.multiple

    @property
    def config(self):
        return self.model.config

    def forward(self, x, side=None, domain=None):
        self.seen.append(tuple(x.shape[2:]))
        if x[0, 0].numel() > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x, side=side, domain=domain)


def test_oom_falls_back_to_smaller_tiles(volume):
    field, mask = volume
    field, mask = field[:64], mask[:64]
    model = warmed(depth=2)
    oom = _OOMModel(model, limit=20 * 16 * 16)
    chi = predict(oom, field, mask, 1.0, overlap=4)
    # full (64, 16, 16) -> tiles (32, 16, 16) still too large -> (16, 16, 16) run
    assert oom.seen[:2] == [(64, 16, 16), (32, 16, 16)]
    assert set(oom.seen[2:]) == {(16, 16, 16)}
    ref = predict(model, field, mask, 1.0, tile_shape=16, overlap=4)
    assert np.array_equal(chi, ref)
    # an OOM that smaller tiles cannot avoid on the CPU is raised
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predict(_OOMModel(model, limit=10), field, mask, 1.0, overlap=4)

    class Broken(_OOMModel):
        def forward(self, x, side=None, domain=None):
            raise RuntimeError("boom")

    # other errors are not swallowed
    with pytest.raises(RuntimeError, match="boom"):
        predict(Broken(model, 0), field, mask, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask": np.ones((16, 16, 15), bool)}, "mask has shape"),
        ({"mask": np.zeros((16, 16, 16), bool)}, "all zero"),
        ({"field_ppm": np.full((16, 16, 16), np.nan, np.float32)}, "non-finite"),
        ({"voxel_size": (1.0, -1.0, 1.0)}, "voxel_size"),
        ({"b0_dir": (0.0, 0.0, 0.0)}, "b0_dir"),
        ({"field_ppm": np.zeros((16, 16), np.float32)}, "3D"),
        ({"tile_shape": 4}, "must exceed overlap"),
    ],
)
def test_predict_bad_input(kwargs, match):
    args = {
        "field_ppm": np.zeros((16, 16, 16), np.float32),
        "mask": np.ones((16, 16, 16), bool),
        "voxel_size": 1.0,
        "b0_dir": (0.0, 0.0, 1.0),
    }
    args.update(kwargs)
    model = warmed(depth=2)
    with pytest.raises(ValueError, match=match):
        predict(model, args.pop("field_ppm"), args.pop("mask"), **args)


def test_predict_grid_too_small_for_depth():
    model = build_model(default_config("unet", depth=5, base_channels=4))
    with pytest.raises(ValueError, match=r"\(40, 40, 12\).*16"):
        predict(model, np.zeros((40, 40, 12)), np.ones((40, 40, 12)), 1.0)


def test_predict_adaptive_uses_side_information(volume):
    field, mask = volume
    field, mask = field[:32, :16, :16], mask[:32, :16, :16]
    model = warmed("adaptive", depth=2)
    a = predict(model, field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))
    b = predict(model, field, mask, (0.6, 0.6, 2.0), (0.0, 0.5, 0.866))
    c = predict(model, field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, -1.0))
    assert _rel(b, a) > 1e-3
    assert np.array_equal(a, c)  # B0 and -B0: same acquisition


def test_predict_dsbn_domain(volume):
    field, mask = volume
    field, mask = field[:32, :16, :16], mask[:32, :16, :16]
    model = warmed("dsbn", depth=2).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 2, 16, 16, 16) * 3 + 1, domain="target")
    src = predict(model, field, mask, 1.0, domain="source")
    tgt = predict(model, field, mask, 1.0, domain="target")
    assert _rel(tgt, src) > 1e-2
    assert np.array_equal(predict(model, field, mask, 1.0), src)
    model.default_domain = "target"
    assert np.array_equal(predict(model, field, mask, 1.0), tgt)
