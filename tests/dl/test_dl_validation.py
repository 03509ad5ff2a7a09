"""Honest validation: DSBN metrics through the deployed batch norms, target hold-out by subject,
model cards that say what was held out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qsmprep.dl.checkpoint import load_checkpoint
from qsmprep.dl.target import TargetScan, TargetScans, split_by_subject
from qsmprep.dl.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"base_channels": 4, "depth": 3}
SHAPE = (20, 20, 16)


def _cfg(out, **kw) -> TrainConfig:
    base = dict(
        method="unsupervised", arch="unet", model=dict(TINY), steps=1, batch_size=2,
        patch_size=16, synth={"kind": "shapes"}, seed=0, device="cpu", out=str(out),
        val_every=0, ckpt_every=0, log_every=1, val_batches=1, threads=1, prefetch=0,
        quiet=True,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _ball() -> np.ndarray:
    g = np.indices(SHAPE).astype(float)
    c = (np.array(SHAPE, float)[:, None, None, None] - 1) / 2
    return ((g - c) ** 2).sum(0) < 7.0**2


def _scan(name: str, value: float) -> TargetScan:
    """A scan whose local field is ``value`` ppm everywhere in its mask (a fingerprint)."""
    m = _ball()
    return TargetScan(
        name=name, field_ppm=np.where(m, value, 0.0).astype(np.float32), mask=m, noise=None,
        voxel_size=(2.0, 2.0, 2.0), b0_dir=(0.0, 0.0, 1.0), b0=3.0, te=0.02,
    )  # fmt: skip


# scans of three subjects, each with its own field value (``sub-10`` sorts last by number)
SCANS = {
    "sub-01_acq-ori1": 0.01, "sub-01_acq-ori2": 0.02, "sub-02": 0.03, "sub-10_ses-a": 0.04,
    "sub-10_ses-b": 0.05,
}  # fmt: skip


def _values(batches) -> set[float]:
    """The field values (ppm, rounded) the patches of ``batches`` hold, 0 left out."""
    vals = set()
    for b in batches:
        f = b["field"][b["mask"] > 0]
        vals |= {round(float(v), 4) for v in torch.unique(f)}
    return vals - {0.0}


# ----------------------------------------------------------------------------- DSBN metrics


def _dsbn_apart():
    """A tiny DSBN net whose target batch norms' running statistics differ from the source's."""
    from qsmprep.dl.nets import build_model, default_config

    torch.manual_seed(0)
    model = build_model(default_config("dsbn", **TINY))
    for m in model.modules():
        if type(m).__name__ == "DomainBatchNorm3d":
            t = m.bns["target"]
            t.running_mean.add_(0.3)
            t.running_var.mul_(2.5)
    return model


def test_dsbn_metrics_go_through_the_target_batch_norms():
    from qsmprep.dl.losses import supervised_loss
    from qsmprep.dl.synth import SyntheticQSMData
    from qsmprep.dl.train.steps import _nrmse, _predict, _validate

    model = _dsbn_apart()
    val = [SyntheticQSMData(16, seed=5, kind="shapes").batch(2) for _ in range(2)]
    cfg = TrainConfig(method="dsbn")
    out = _validate(cfg, model, val, None)
    assert model.training  # validation leaves the model as it found it

    model.eval()
    with torch.no_grad():
        ref = {}
        for dom in ("source", "target"):
            chis = [_predict(model, b, dom) for b in val]
            ref[dom] = (
                float(np.mean([float(supervised_loss(c, b["chi"], b["mask"])) for c, b in
                               zip(chis, val, strict=True)])),
                float(np.mean([_nrmse(c, b["chi"], b["mask"]) for c, b in
                               zip(chis, val, strict=True)])),
            )  # fmt: skip
    # the reported figures are the deployed (target) ones; the source-BN ones are beside them
    assert out["val_loss"] == pytest.approx(ref["target"][0], rel=1e-9)
    assert out["val_nrmse"] == pytest.approx(ref["target"][1], rel=1e-9)
    assert out["val_loss_source_bn"] == pytest.approx(ref["source"][0], rel=1e-9)
    assert out["val_nrmse_source_bn"] == pytest.approx(ref["source"][1], rel=1e-9)
    # an untrained net's output is small beside chi, so NRMSE is near 100 % either way
    # (measured 100.062 vs 100.037 %), but the two differ far beyond float rounding
    assert out["val_nrmse"] != pytest.approx(out["val_nrmse_source_bn"], rel=1e-6)
    assert out["val_loss"] != pytest.approx(out["val_loss_source_bn"], rel=1e-6)

    # a DSBN net pre-trained (supervised) is deployed with its default (source) batch norms
    sup = _validate(TrainConfig(method="supervised"), model, val, None)
    assert sup["val_nrmse"] == pytest.approx(ref["source"][1], rel=1e-9)
    assert "val_nrmse_source_bn" not in sup


# ----------------------------------------------------------------------------- the split


def test_split_by_subject_holds_whole_subjects_out_deterministically(caplog):
    scans = [_scan(n, v) for n, v in SCANS.items()]
    train_s, val_s, note = split_by_subject(scans)
    assert note == "held-out subjects"
    assert [s.name for s in val_s] == ["sub-10_ses-a", "sub-10_ses-b"]  # 10 after 2
    assert {s.subject for s in train_s} == {"01", "02"}
    assert not {s.subject for s in train_s} & {s.subject for s in val_s}
    # the split depends on the labels only, not on the order the scans come in
    again = split_by_subject(scans[::-1])
    assert {s.name for s in again[1]} == {s.name for s in val_s}
    t2, v2, _ = split_by_subject(scans, holdout=2)
    assert {s.subject for s in v2} == {"02", "10"} and {s.subject for s in t2} == {"01"}
    t3, v3, _ = split_by_subject(scans, subjects=["sub-01"])
    assert [s.name for s in v3] == ["sub-01_acq-ori1", "sub-01_acq-ori2"]
    assert not {s.subject for s in t3} & {"01"}
    assert split_by_subject(scans, holdout=0)[1:] == ([], "training scans (target_holdout 0)")
    with pytest.raises(ValueError, match="leaves no target subject"):
        split_by_subject(scans, holdout=3)
    with pytest.raises(ValueError, match=r"\['99'\] are not among"):
        split_by_subject(scans, subjects=["99"])
    one = [s for s in scans if s.subject == "01"]
    with caplog.at_level(logging.WARNING):
        t1, v1, note1 = split_by_subject(one)
    assert t1 == one and v1 == [] and note1 == "training scans (one subject)"
    assert "nothing is held out" in caplog.text


def test_subset_draws_only_its_own_scans():
    scans = [_scan(n, v) for n, v in SCANS.items()]
    full = TargetScans(scans, 16, seed=3)
    train_s, val_s, _ = split_by_subject(scans)
    tr, va = full.subset(train_s, seed=3), full.subset(val_s, seed=9)
    assert tr.subjects == ["01", "02"] and va.subjects == ["10"]
    assert _values(tr.batch(4) for _ in range(10)) == {0.01, 0.02, 0.03}
    assert _values(va.batch(4) for _ in range(5)) == {0.04, 0.05}
    assert full.counter == 0 and len(full) == 5  # the full set is untouched
    # the training patches are those of a target made of the training scans alone (so adding
    # a held-out subject to a dataset leaves the training batches as they were)
    alone = TargetScans(train_s, 16, seed=3)
    for k in range(3):
        a, b = tr.batch(2, index=k), alone.batch(2, index=k)
        assert all(torch.equal(a[key], b[key]) for key in a)


# ----------------------------------------------------------------------------- training runs


def _write_output(root: Path, subjects: dict[str, float]) -> Path:
    """A qsmprep output directory: one scan per subject, a constant field (Hz) in a ball."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "qsmprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    m = _ball()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for sub, hz in subjects.items():
        anat = root / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        f = anat / f"sub-{sub}_desc-local_fieldmap.nii.gz"
        nib.save(nib.Nifti1Image(np.where(m, hz, 0.0).astype(np.float32), aff), str(f))
        (anat / f"sub-{sub}_desc-local_fieldmap.json").write_text(
            json.dumps({"Units": "Hz", "B0": 3.0, "EchoTime": 0.02})
        )
        nib.save(
            nib.Nifti1Image(m.astype(np.uint8), aff),
            str(anat / f"sub-{sub}_desc-local_mask.nii.gz"),
        )
    return root


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Subjects 01-03 with fields 1, 2, 3 Hz (0.0078, 0.0157, 0.0235 ppm at 3 T)."""
    return _write_output(tmp_path_factory.mktemp("three"), {"01": 1.0, "02": 2.0, "03": 3.0})


def _ppm(hz: float) -> float:
    from qsmprep.recon.kernels import hz_to_ppm

    return round(float(hz_to_ppm(np.float32(hz), 3.0)), 4)


def test_training_never_sees_the_held_out_subject(tmp_path, three):
    from qsmprep.dl.train.setup import _data

    cpu = torch.device("cpu")
    cfg = _cfg(tmp_path, target=str(three), val_batches=3)
    _, _, target, tval, info = _data(cfg, "unet", cpu)
    assert target.subjects == ["01", "02"] and info["target_val_subjects"] == ["03"]
    assert not set(target.subjects) & set(info["target_val_subjects"])
    assert info["target_validation"] == "held-out subjects"
    assert info["target_val_scans"] == ["sub-03"]
    # the training patches come from the training subjects' fields only, the validation
    # patches from the held-out subject's
    assert _values(target.batch(2) for _ in range(20)) == {_ppm(1.0), _ppm(2.0)}
    assert _values(tval) == {_ppm(3.0)}
    # deterministic: the same split and the same batches again
    _, _, target2, tval2, info2 = _data(cfg, "unet", cpu)
    assert info2 == info and target2.subjects == target.subjects
    assert all(torch.equal(a["field"], b["field"]) for a, b in zip(tval, tval2, strict=True))
    # named subjects instead of the last one
    cfg = _cfg(tmp_path, target=str(three), target_val_subjects=["01"])
    _, _, target, tval, info = _data(cfg, "unet", cpu)
    assert target.subjects == ["02", "03"] and info["target_val_subjects"] == ["01"]
    assert _values(tval) == {_ppm(1.0)}
    # a separate validation dataset: every subject of --target trains
    other = _write_output(tmp_path / "other", {"07": 4.0})
    cfg = _cfg(tmp_path, target=str(three), target_val_dir=str(other))
    _, _, target, tval, info = _data(cfg, "unet", cpu)
    assert target.subjects == ["01", "02", "03"] and info["target_val_subjects"] == ["07"]
    assert info["target_validation"] == "separate dataset" and _values(tval) == {_ppm(4.0)}
    with pytest.raises(ValueError, match="is the training target"):
        _data(_cfg(tmp_path, target=str(three), target_val_dir=str(three)), "unet", cpu)
    with pytest.raises(ValueError, match="not both"):
        _cfg(tmp_path, target=str(three), target_val_dir=str(other),
             target_val_subjects=["01"]).validate()  # fmt: skip


def test_dsbn_card_names_the_held_out_subject_and_batch_norms(tmp_path, three):
    path = train(_cfg(tmp_path, method="dsbn", arch="dsbn", target=str(three), steps=2))
    _, meta = load_checkpoint(path, arch="dsbn")
    v = meta["data"]["validation"]
    assert v["target_validation"] == "held-out subjects"
    assert v["target_train_subjects"] == ["01", "02"] and v["target_val_subjects"] == ["03"]
    assert meta["data"]["target"]["subjects"] == ["01", "02"]
    assert meta["data"]["target"]["scans"] == ["sub-01", "sub-02"]
    assert v["batch_norms"] == "target" and v["synthetic_seed"] == 7919
    m = meta["metrics"]
    assert {"val_nrmse", "val_nrmse_source_bn", "val_loss_source_bn", "val_target_dc"} <= set(m)
    assert m["target_validation"] == "held-out subjects"
    card = path.with_suffix(".md").read_text()
    assert "## Validation" in card and "went through the `target` batch norms" in card
    for row in (
        "| target_val_subjects | 03 |", "| target_val_scans | sub-03 |",
        "| target_train_subjects | 01, 02 |", "| batch_norms | target |",
        "| synthetic_seed | 7919 |", "| target_validation | held-out subjects |",
    ):  # fmt: skip
        assert row in card, row
    with open(tmp_path / "train_log.csv") as fh:
        header = fh.readline().strip().split(",")
    assert "val_nrmse_source_bn" in header and "val_loss_source_bn" in header


def test_one_subject_is_flagged_as_not_held_out(tmp_path):
    one = _write_output(tmp_path / "one", {"01": 1.0})
    path = train(_cfg(tmp_path / "run", target=str(one)))
    _, meta = load_checkpoint(path)
    note = "training scans (one subject)"
    assert meta["data"]["validation"]["target_validation"] == note
    assert meta["metrics"]["target_validation"] == note
    assert meta["data"]["validation"]["target_val_subjects"] == ["01"]
    assert f"| target_validation | {note} |" in path.with_suffix(".md").read_text()


def test_resuming_a_run_from_before_the_hold_out_trains_on_every_scan(tmp_path):
    """A run saved before ``target_holdout`` existed trained on all target scans: resumed, it
    still does."""
    from qsmprep.dl.train.loop import _resume_config

    saved = TrainConfig(method="unsupervised", target="t", out=str(tmp_path)).to_dict()
    for key in ("target_holdout", "target_val_subjects", "target_val_dir"):
        del saved[key]
    torch.save({"extra": {"train_config": saved}}, tmp_path / "last.pt")
    cfg, _ = _resume_config(TrainConfig(out=str(tmp_path), resume=True))
    assert cfg.target_holdout == 0 and cfg.target_val_dir is None
