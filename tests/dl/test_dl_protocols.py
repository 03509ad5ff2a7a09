"""Recipe protocols: ``qsmprep`` is today's recipe; ``paper1`` and ``paper2`` as documented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qsmprep.app.protocols import PROTOCOLS, SPECIAL, check_protocol  # noqa: E402
from qsmprep.app.recipe import (  # noqa: E402
    CONVENTIONAL_SYNTH,
    ORIENTATIONS,
    PROFILES,
    STAGES,
    recipe_configs,
    target_plan,
)
from qsmprep.dl.synth import SyntheticQSMData  # noqa: E402
from qsmprep.dl.train import TrainConfig  # noqa: E402
from qsmprep.dl.train.config import _synth_kwargs  # noqa: E402
from qsmprep.dl.train.setup import _build, _optimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _configs(protocol, profile="cpu", **kw):
    out = recipe_configs("/tmp/recipe", "/tmp/target", profile=profile, protocol=protocol, **kw)
    return {name: (cfg, arch) for name, cfg, arch, _ in out}


def _before(out, target, profile, seed=0, device="auto", quiet=True, half=True, threads=0):
    """The configurations of the recipe before protocols existed (its loop, copied)."""
    p = PROFILES[profile]
    out = Path(out).absolute()
    weights = out / "weights"
    cfgs = {}
    for name, method, arch, init, stage, _ in STAGES:
        steps = int(p[f"{stage}_steps"])
        adaptive = arch == "adaptive" or (init or "").startswith("adaptive")
        cfgs[name] = TrainConfig(
            method=method, arch=arch,
            synth={} if adaptive else dict(CONVENTIONAL_SYNTH),
            model={} if init else {"base_channels": p["base_channels"], "depth": p["depth"]},
            init=str(weights / f"{init}.pt") if init else None, steps=steps,
            batch_size=int(p["batch"]), patch_size=(int(p["patch"]),) * 3,
            target=str(target) if stage != "pretrain" else None,
            target_holdout=int(p.get("target_val_heads", 0)),
            reference="cosmos" if stage == "transfer" else None, seed=seed, device=device,
            threads=int(threads or 0), out=str(out / "runs" / name), name=name,
            log_every=max(1, steps // 50), val_every=int(p["val_every"]),
            ckpt_every=max(1, steps // 10), val_batches=int(p["val_batches"]), quiet=quiet,
            half=half,
            command=f"qsmprep-train recipe {out} --profile {profile} --seed {seed} --only {name}",
        )  # fmt: skip
    return cfgs


@pytest.mark.parametrize("profile", list(PROFILES))
def test_qsmprep_protocol_is_todays_recipe(profile):
    got = _configs("qsmprep", profile, seed=3, threads=2, half=False)
    want = _before("/tmp/recipe", "/tmp/target", profile, seed=3, threads=2, half=False)
    assert list(got) == list(want)
    for name, (cfg, arch) in got.items():
        assert json.dumps(cfg.to_dict()) == json.dumps(want[name].to_dict()), name
        assert arch == want[name].arch
    assert target_plan(profile) == {
        "n": PROFILES[profile]["target_datasets"] + PROFILES[profile]["target_val_heads"],
        "grids": dict.fromkeys(
            range(PROFILES[profile]["target_datasets"] + PROFILES[profile]["target_val_heads"]),
            (PROFILES[profile]["target_shape"], (2.0, 2.0, 2.0)),
        ),
        "orientations": ORIENTATIONS[: PROFILES[profile]["orientations"]],
    }


def test_protocols_are_documented_data():
    for name, p in PROTOCOLS.items():
        check_protocol(name, STAGES)
        assert {"title", "citation", "models", "overrides", "target", "deviations"} <= set(p)
        assert all(len(line) == 3 and all(line) for line in p["deviations"]), name
        assert bool(p["deviations"]) == (name != "qsmprep")
    assert "arXiv:2206.13225" in PROTOCOLS["paper1"]["citation"]
    assert set(SPECIAL) == {"model", "init", "budget", "restart_cycles", "description"}
    with pytest.raises(ValueError, match="unknown protocol"):
        _configs("paper3")
    # the command line offers the same protocols
    from qsmprep.cli.train import build_parser

    args = build_parser().parse_args(["recipe", "OUT", "--protocol", "paper2"])
    assert args.protocol == "paper2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recipe", "OUT", "--protocol", "paper3"])


def test_paper1_settings():
    cfgs = _configs("paper1")
    assert list(cfgs) == [
        "unet-pretrained", "dcfinetune", "dsbn-lam0.1", "dsbn-lam1", "dsbn-lam10",
    ]  # fmt: skip
    for name, (cfg, _) in cfgs.items():
        assert (cfg.loss, cfg.lr, cfg.weight_decay) == ("l2", 1e-4, 0.0), name
        assert cfg.synth["kind"] == "brain" and cfg.restart_steps == 0
        assert "--protocol paper1" in cfg.command
    lams = {n: c.lambda_max for n, (c, _) in cfgs.items() if n.startswith("dsbn")}
    assert lams == {"dsbn-lam0.1": 0.1, "dsbn-lam1": 1.0, "dsbn-lam10": 10.0}
    for name in lams:  # trained on synthetic and target data at once, from scratch
        cfg = cfgs[name][0]
        assert cfg.init is None and cfg.method == "dsbn" and cfg.target == "/tmp/target"
        assert cfg.steps == PROFILES["cpu"]["pretrain_steps"]
        assert cfg.model == {"base_channels": 8, "depth": 4, "activation": "relu"}
    assert cfgs["dcfinetune"][0].init.endswith("weights/unet-pretrained.pt")
    # the network and optimiser they make: ReLU only; Adam (AdamW without weight decay)
    cfg = cfgs["dsbn-lam1"][0]
    cfg.model = {**cfg.model, "base_channels": 4, "depth": 3}
    model, arch, _ = _build(cfg, torch.device("cpu"))
    acts = {type(m).__name__ for m in model.modules()} & {"ReLU", "ELU", "LeakyReLU"}
    assert arch == "dsbn" and acts == {"ReLU"}
    opt, _ = _optimizer(cfg, model)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-4, 0.0)]
    adam = torch.optim.Adam([p.detach().clone().requires_grad_() for p in model.parameters()],
                            lr=1e-4)  # fmt: skip
    for p, q in zip(model.parameters(), adam.param_groups[0]["params"], strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    adam.step()
    same = zip(model.parameters(), adam.param_groups[0]["params"], strict=True)
    assert all(torch.equal(p, q) for p, q in same)


def test_paper2_settings():
    cfgs = _configs("paper2")
    assert list(cfgs) == ["unet-pretrained", "adaptive-pretrained", "adaptive", "unet"]
    u, a = cfgs["unet-pretrained"][0], cfgs["adaptive-pretrained"][0]
    assert (u.arch, a.arch) == ("unet", "adaptive")
    # the same anatomy-free data for both: the same generator settings, the same batches
    su, sa = _synth_kwargs(u, "unet"), _synth_kwargs(a, "adaptive")
    assert su == sa and su["kind"] == "shapes" and su["flip_prob"] == 0.5
    assert su["b0_dir"] == "random" and su["max_tilt_deg"] == 45.0 and u.seed == a.seed
    bu = SyntheticQSMData(16, seed=u.seed, **su).batch(2)
    ba = SyntheticQSMData(16, seed=a.seed, **sa).batch(2)
    assert all(torch.equal(bu[k], ba[k]) for k in bu)
    for name, (cfg, _) in cfgs.items():
        assert cfg.restart_mult == 2 and cfg.restart_steps > 0, name
        # three periods (1 + 2 + 4 parts) cover the run
        assert cfg.restart_steps * 7 >= cfg.steps > cfg.restart_steps * 3, name
        assert (cfg.loss, cfg.lr, cfg.weight_decay) == ("l1", 1e-3, 1e-4)  # ours
    assert cfgs["adaptive"][0].reference == "cosmos" == cfgs["unet"][0].reference
    assert cfgs["adaptive"][0].init.endswith("adaptive-pretrained.pt")
    # real warm restarts: the learning rate jumps back up twice in the run
    cfg = cfgs["unet-pretrained"][0]
    opt, sched = _optimizer(cfg, torch.nn.Linear(2, 2))
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    jumps = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1] * 5]
    assert jumps == [cfg.restart_steps, 3 * cfg.restart_steps], jumps


def test_paper2_target_heads(tmp_path):
    plan = target_plan("gpu", "paper2")
    sizes = [vs for _, vs in plan["grids"].values()]
    assert sizes == [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (2.0, 2.0, 3.0)] + sizes[:2]
    for shape, vs in plan["grids"].values():  # the field of view of 96 x 96 x 80 at 2 mm
        assert np.allclose(np.multiply(shape, vs), (192, 192, 160), atol=vs[2])
    tilts = {round(float(np.hypot(*r)), 6) for r in plan["orientations"]}
    assert tilts == {0.0, 15.0, 30.0}
    # each subject is simulated on its grid, each orientation with its tilted B0
    import nibabel as nib

    from qsmprep.sim.bids import simulate_bids_dataset

    root = simulate_bids_dataset(
        tmp_path / "bids", n_subjects=2,
        shape=(32, 32, 16), voxel_size=(1.0, 1.0, 2.0), snr=None, lesions=False,
        orientations={0: [(0.0, 0.0), (30.0, 0.0)], 1: [(0.0, 15.0)]},
        grids={1: ((16, 16, 12), (2.0, 2.0, 3.0))}, echo_times=(0.01, 0.02),
    )  # fmt: skip
    for sub, acq, zooms, tilt in (("01", "ori1", (1, 1, 2), 0), ("01", "ori2", (1, 1, 2), 30),
                                  ("02", "ori1", (2, 2, 3), 15)):  # fmt: skip
        img = nib.load(next((root / f"sub-{sub}" / "anat").glob(f"*acq-{acq}*echo-1*mag*.nii*")))
        assert np.allclose(img.header.get_zooms()[:3], zooms)
        axes = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        b0 = np.linalg.solve(axes, [0.0, 0.0, 1.0])  # B0 (world z) in voxel axes
        assert np.degrees(np.arccos(abs(b0[2]))) == pytest.approx(tilt, abs=1e-6)


def test_paper1_recipe_registers_the_lambda_sweep(tmp_path, monkeypatch):
    from qsmprep.app import recipe
    from qsmprep.dl.checkpoint import load_checkpoint
    from qsmprep.dl.weights import available_models
    from tests.dl.test_dl_target import write_qsmprep_output

    def target(out, **kw):  # a small qsmprep output instead of the simulated heads
        assert kw["protocol"] == "paper1"
        root = Path(out) / "derivatives"
        write_qsmprep_output(root)
        return root

    monkeypatch.setattr(recipe, "make_target_data", target)
    weights = recipe.run_recipe(tmp_path, profile="tiny", device="cpu", protocol="paper1")
    models = available_models(weights)
    assert set(models) == {"unet-pretrained", "dcfinetune", "dsbn-lam0.1", "dsbn-lam1",
                           "dsbn-lam10"}  # fmt: skip
    for lam in (0.1, 1.0, 10.0):
        entry = models[f"dsbn-lam{lam:g}"]
        assert entry.arch == "dsbn" and f"lambda {lam:g}" in entry.description
        _, meta = load_checkpoint(entry.path)
        c = meta["extra"]["train_config"]
        assert c["lambda_max"] == lam and c["loss"] == "l2" and c["init"] is None
        assert meta["config"]["activation"] == "relu"


def test_target_data_of_another_plan_are_made_again(tmp_path, monkeypatch):
    from qsmprep.app.recipe import make_target_data

    deriv = tmp_path / "derivatives"
    (deriv / "sub-01").mkdir(parents=True)
    (deriv / "dataset_description.json").write_text("{}")

    class Simulated(Exception):
        pass

    def simulate(*args, **kw):
        raise Simulated(kw["grids"])

    monkeypatch.setattr("qsmprep.sim.bids.simulate_bids_dataset", simulate)
    # no record: made before protocols, with the default plan, which paper2 is not
    with pytest.raises(Simulated, match=r"\(1\.0, 1\.0, 1\.0\)"):
        make_target_data(tmp_path, profile="tiny", protocol="paper2")
    assert not deriv.exists()
    # a record of the same plan keeps them
    (deriv / "sub-01").mkdir(parents=True)
    (deriv / "dataset_description.json").write_text("{}")
    plan = target_plan("tiny", "paper2")
    record = {**plan, "grids": [[list(s), list(v)] for s, v in plan["grids"].values()]}
    (tmp_path / "target_plan.json").write_text(json.dumps(record))
    assert make_target_data(tmp_path, profile="tiny", protocol="paper2") == deriv
    with pytest.raises(Simulated):  # and the default plan is another one
        make_target_data(tmp_path, profile="tiny", protocol="qsmprep")
