"""Training speed settings: bf16 autocast, channels_last, prefetched data, bench --compare."""

from __future__ import annotations

import math

import pytest
import torch

from qsmprep.dl.nets import build_model, default_config
from qsmprep.dl.synth import SyntheticQSMData
from qsmprep.dl.train import TrainConfig, _optimizer
from qsmprep.dl.train.bench import compare
from qsmprep.dl.train.config import resolve_speed
from qsmprep.dl.train.prefetch import Prefetched
from qsmprep.dl.train.steps import _predict, _sup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EASY = {"kind": "shapes", "noise_ppm": 0.0, "whole_mask_prob": 1.0, "n_shapes": (2, 6)}


def _losses(precision: str, channels_last: bool, steps: int = 5) -> list[float]:
    """Losses of ``steps`` AdamW steps of a tiny U-Net (same init, same batches)."""
    torch.manual_seed(0)
    model = build_model(default_config("unet", base_channels=4, depth=3)).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    cfg = TrainConfig(patch_size=16, batch_size=2, steps=steps, lr=1e-3)
    opt, _ = _optimizer(cfg, model)
    synth = SyntheticQSMData(16, seed=0, **EASY)
    out = []
    for _ in range(steps):
        b = synth.batch(2)
        loss = _sup(cfg, _predict(model, b, None, precision == "bf16", channels_last), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_bf16_and_channels_last_steps_give_the_fp32_loss():
    """bf16 autocast keeps 8 bits of mantissa (relative rounding 2**-9 per operation); the
    masked mean over 8192 voxels averages most of it out, so the loss of each of five steps
    should stay within 3 % of float32's (bound set before measuring). The channels_last
    layout only reorders sums: within 1e-4. Measured: bf16 7e-4, bf16 + channels_last 1.2e-3,
    channels_last 3e-7."""
    ref = _losses("fp32", False)
    cases = (("fp32", True, 1e-4), ("bf16", False, 0.03), ("bf16", True, 0.03))
    for precision, cl, bound in cases:
        got = _losses(precision, cl)
        rel = [abs(a - b) / b for a, b in zip(got, ref, strict=True)]
        assert max(rel) < bound, (precision, cl, rel)


def test_prefetched_batches_are_the_inline_ones_in_order():
    inline = SyntheticQSMData(16, seed=3, **EASY)
    ahead = SyntheticQSMData(16, seed=3, **EASY)
    ahead.counter = inline.counter = 2  # as after a resume
    with Prefetched(ahead, 2, ahead=2, count=4) as src:
        # 4 from the worker, then inline again
        for _ in range(6):
            a, b = inline.batch(2), src.batch(2)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
            assert ahead.state_dict() == inline.state_dict()
        with pytest.raises(ValueError, match="prefetched"):
            src.batch(3)
    with pytest.raises(ValueError, match="ahead"):
        Prefetched(ahead, 2, ahead=0, count=1)


def test_speed_settings_resolve():
    cpu = torch.device("cpu")
    s = resolve_speed(cpu, precision="fp32", channels_last=False, threads=3, prefetch=1)
    assert s == {"precision": "fp32", "channels_last": False, "threads": 3, "prefetch": 1}
    s = resolve_speed(cpu, precision="auto", prefetch=2)
    assert s["precision"] in ("fp32", "bf16") and s["threads"] >= 1 and s["channels_last"]
    gpu = torch.device("cuda")  # a GPU run keeps what it did: fp32, contiguous, data inline
    s = resolve_speed(gpu, prefetch=2)
    assert (s["precision"], s["channels_last"], s["prefetch"]) == ("fp32", False, 0)
    assert resolve_speed(gpu, amp=True)["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="prefetch"):
        TrainConfig(prefetch=-1).validate()


def test_compare_reports_a_ratio():
    r = compare(
        "unet", patch_size=16, batch_size=2, base_channels=4, depth=3, steps=1, rounds=1,
        device="cpu", precision="bf16", threads=1, prefetch=1, baseline={"threads": 1},
    )  # fmt: skip
    assert r["baseline"]["precision"] == "fp32" and not r["baseline"]["channels_last"]
    assert r["optimised"]["precision"] == "bf16" and r["optimised"]["prefetch"] == 1
    for key in ("patches_per_s", "patches_per_s_with_data"):
        ratio = r["speedup"][key]
        assert math.isfinite(ratio) and ratio > 0
        assert ratio == pytest.approx(r["optimised"][key] / r["baseline"][key])
