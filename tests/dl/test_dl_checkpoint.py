"""Checkpoints of qsmprep.dl: bit-identical round trip, half precision, errors, model card."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from qsmprep.dl.checkpoint import (  # noqa: E402
    file_sha256,
    load_checkpoint,
    save_checkpoint,
    write_model_card,
)
from qsmprep.dl.nets import build_model, default_config  # noqa: E402

SIDE = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [0.7, 0.7, 2.0, 0.2, 0.0, 0.98]])


def trained(arch, steps=2):
    """Small model after a few optimiser steps (non-trivial weights and BN statistics)."""
    torch.manual_seed(0)
    model = build_model(default_config(arch, depth=2, base_channels=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5)
    model.train()
    for i in range(steps):
        domain = ("source", "target")[i % 2] if arch == "dsbn" else None
        loss = model(torch.randn(2, 2, 8, 8, 8), side=SIDE, domain=domain).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), opt, sched


@pytest.mark.parametrize("arch", ["unet", "dsbn", "adaptive"])
def test_round_trip_bit_identical(tmp_path, arch):
    model, opt, sched = trained(arch)
    if arch == "dsbn":
        model.default_domain = "target"
    path = tmp_path / "sub" / f"{arch}.pt"
    digest = save_checkpoint(
        path,
        model,
        step=2,
        optimizer=opt,
        scheduler=sched,
        data={"kind": "shapes", "patch_shape": (8, 8, 8), "voxel_size": np.array([1.0, 1.0])},
        metrics={"val_l1": np.float32(0.25)},
        extra={"lr": 1e-2},
    )
    assert digest == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    loaded, meta = load_checkpoint(path, arch=arch, sha256=digest)
    assert not loaded.training
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        for domain in ("source", "target", None):
            assert torch.equal(
                loaded(x, side=SIDE, domain=domain), model(x, side=SIDE, domain=domain)
            )
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) and sd0[k].dtype == sd1[k].dtype for k in sd0)
    assert loaded.config == model.config
    assert meta["step"] == 2 and meta["sha256"] == digest and meta["half"] is False
    assert meta["data"] == {"kind": "shapes", "patch_shape": (8, 8, 8), "voxel_size": [1.0, 1.0]}
    assert meta["metrics"] == {"val_l1": 0.25} and meta["extra"] == {"lr": 1e-2}
    assert set(meta["versions"]) == {"qsmprep", "torch", "numpy", "python"}
    assert meta["created"].endswith("+00:00")
    # optimizer and scheduler resume where they were
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(meta["optimizer"])
    s0, s1 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) for k in s0)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt2, T_0=5)
    sched2.load_state_dict(meta["scheduler"])
    assert sched2.last_epoch == sched.last_epoch == 2
    if arch == "dsbn":
        assert loaded.default_domain == "target"


def test_half_precision(tmp_path):
    model, _, _ = trained("unet")
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, model)
    save_checkpoint(half, model, half=True)
    raw = torch.load(half, weights_only=True)
    assert raw["state_dict"]["final.weight"].dtype == torch.float16
    # measured 0.70 of the float32 size for this tiny model (0.50 for the default 26 MB one,
    # where the weights dominate the file)
    assert half.stat().st_size < 0.8 * full.stat().st_size
    loaded, meta = load_checkpoint(half)
    assert meta["half"] is True
    assert all(v.dtype != torch.float16 for v in loaded.state_dict().values())
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        y0, y1 = model(x), loaded(x)
    # float16 weights (rounding 2^-11 relative): measured 2.5e-4 relative output change
    assert float((y1 - y0).norm() / y0.norm()) < 2e-3


def test_wrong_arch_names_file_and_both_archs(tmp_path):
    model, _, _ = trained("unet", steps=0)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    with pytest.raises(ValueError, match=r"m\.pt.*'unet'.*'adaptive'"):
        load_checkpoint(path, arch="adaptive")


def test_hash_mismatch_names_file_and_both_hashes(tmp_path):
    model, _, _ = trained("unet", steps=0)
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model)
    wrong = "0" * 64
    with pytest.raises(ValueError, match=rf"m\.pt.*{digest}.*{wrong}"):
        load_checkpoint(path, sha256=wrong)
    load_checkpoint(path, sha256=digest.upper())  # case does not matter


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*junk\.pt"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a qsmprep checkpoint"):
        load_checkpoint(other)
    # weights that do not fit the stored config
    model, _, _ = trained("unet", steps=0)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, model)
    payload = torch.load(bad, weights_only=True)
    payload["config"]["base_channels"] = 8
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="does not match its config"):
        load_checkpoint(bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model, _, _ = trained("unet", steps=0)
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model, step=1)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert file_sha256(path) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_extra_must_be_plain_data(tmp_path):
    model, _, _ = trained("unet", steps=0)
    with pytest.raises(ValueError, match=r"extra\['fn'\] holds a function"):
        save_checkpoint(tmp_path / "m.pt", model, extra={"fn": lambda: 0})
    assert not (tmp_path / "m.pt").exists()


def test_model_card(tmp_path):
    model, _, _ = trained("adaptive", steps=0)
    path = tmp_path / "adaptive.pt"
    save_checkpoint(path, model, step=7, data={"kind": "mix"}, metrics={"val_nrmse": 0.4321})
    _, meta = load_checkpoint(path)
    card = write_model_card(tmp_path / "adaptive.md", meta)
    text = card.read_text()
    assert text.startswith("# Model card: adaptive")
    for needle in (
        meta["sha256"],
        "step: 7",
        "val_nrmse | 0.4321",
        "kind | mix",
        "adaptive.pt",
        "Side information",
        "| torch |",
    ):
        assert needle in text, needle
