"""``qsmprep-train``: smoke runs of each subcommand and exit codes of bad input."""

from __future__ import annotations

import json

import pytest

from qsmprep.cli.train import main
from qsmprep.dl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "--patch-size", "16", "--base-channels", "4", "--depth", "3", "--batch-size", "1",
    "--device", "cpu", "--quiet", "--threads", "1", "--val-batches", "1", "--log-every", "1",
    "--synth", "kind=shapes",
]  # fmt: skip


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_pre")
    assert main(["pretrain", "--arch", "unet", "--out", str(out), "--steps", "2", *TINY]) == 0
    return out / "supervised-unet.pt"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.dl.test_dl_target import write_qsmprep_output

    root = tmp_path_factory.mktemp("cli_target")
    write_qsmprep_output(root / "derivatives" / "qsmprep")
    return root  # the demo layout: derivatives/qsmprep below it


def test_pretrain_writes_checkpoint_card_and_log(unet_ckpt, capsys):
    out = unet_ckpt.parent
    assert (out / "supervised-unet.md").is_file() and (out / "train_log.csv").is_file()
    model, meta = load_checkpoint(unet_ckpt, arch="unet")
    assert meta["step"] == 2 and model.config["base_channels"] == 4
    assert meta["extra"]["command"].startswith("qsmprep-train pretrain --arch unet")
    assert meta["extra"]["command"] in (out / "supervised-unet.md").read_text()


def test_adapt_dsbn_and_resume(tmp_path, target, capsys):
    out = tmp_path / "dsbn"
    args = ["adapt", "--method", "dsbn", "--target", str(target), "--out", str(out), *TINY]
    assert main([*args, "--steps", "3", "--stop-at", "2"]) == 0
    assert "last.pt" in capsys.readouterr().out
    assert main(["adapt", "--out", str(out), "--resume", "--quiet"]) == 0
    model, meta = load_checkpoint(out / "dsbn-dsbn.pt", arch="dsbn")
    assert meta["step"] == 3 and model.default_domain == "target"


def test_finetune_transfer(tmp_path, target, unet_ckpt):
    out = tmp_path / "ft"
    code = main(
        ["finetune", "--init", str(unet_ckpt), "--target", str(target), "--out", str(out),
         "--steps", "2", *TINY]
    )  # fmt: skip
    assert code == 0
    _, meta = load_checkpoint(out / "transfer-unet.pt")
    assert meta["data"]["target"]["reference"] == "cosmos"


def test_target_validation_options(tmp_path, target, capsys):
    from qsmprep.cli.train import build_parser, config_from_args

    base = ["adapt", "--target", str(target), "--out", str(tmp_path)]
    cfg = config_from_args(build_parser().parse_args(base), base)
    assert (cfg.target_holdout, cfg.target_val_subjects, cfg.target_val_dir) == (1, None, None)
    argv = [*base, "--target-holdout", "2", "--target-val-subjects", "01", "sub-03"]
    cfg = config_from_args(build_parser().parse_args(argv), argv)
    assert cfg.target_holdout == 2 and cfg.target_val_subjects == ["01", "sub-03"]
    argv = ["finetune", *base[1:], "--target-val-dir", str(tmp_path / "val")]
    cfg = config_from_args(build_parser().parse_args(argv), argv)
    assert cfg.target_val_dir == str(tmp_path / "val")
    # the one-subject target of these tests: nothing held out, and the checkpoint says so
    out = tmp_path / "unsup"
    argv = ["adapt", "--method", "unsupervised", "--target", str(target), "--out", str(out)]
    assert main([*argv, "--steps", "1", *TINY]) == 0
    _, meta = load_checkpoint(out / "unsupervised-unet.pt")
    assert meta["metrics"]["target_validation"] == "training scans (one subject)"
    assert main([*argv, "--steps", "1", *TINY, "--target-val-subjects", "01"]) == 1
    assert "leaves no target subject to train on" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["adapt", "--method", "unsupervised"], "--target"),
        (["adapt", "--method", "dsbn", "--target", "/nonexistent/qsmprep"], "does not exist"),
        (["finetune", "--target", "."], "--init"),
        (["adapt", "--method", "dc-finetune", "--target", "."], "--init"),
        (["pretrain", "--resume"], "nothing to resume"),
        (["pretrain", "--patch-size", "18"], "multiple of 4"),
    ],
)
def test_errors_exit_nonzero(tmp_path, argv, message, capsys):
    sub, rest = argv[0], argv[1:]  # later options win: the tested ones come last
    assert main([sub, *TINY, "--steps", "2", "--out", str(tmp_path / "o"), *rest]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qsmprep-train: error:") and message in err


def test_architecture_of_init(tmp_path, target, unet_ckpt, capsys):
    # QSMInvNet+ may start from a batch-norm U-Net: it becomes a DSBN network
    code = main(
        ["adapt", "--method", "dsbn", "--init", str(unet_ckpt), "--target", str(target),
         "--out", str(tmp_path / "dsbn"), "--steps", "1", *TINY]
    )  # fmt: skip
    assert code == 0
    from qsmprep.dl.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "dsbn" / "dsbn-dsbn.pt", arch="dsbn")
    assert model.default_domain == "target"
    code = main(
        ["pretrain", "--arch", "adaptive", "--init", str(unet_ckpt), "--out", str(tmp_path)]
    )
    assert code == 1 and "'adaptive'" in capsys.readouterr().err


def test_bench_and_usage_errors(tmp_path, capsys):
    js = tmp_path / "bench.json"
    argv = ["bench", "--arch", "unet", "--patch-size", "16", "--base-channels", "4"]
    assert main([*argv, "--depth", "3", "--steps", "1", "--device", "cpu", "--json", str(js)]) == 0
    assert "patches/s" in capsys.readouterr().out
    r = json.loads(js.read_text())
    assert r["patches_per_s"] > 0 and r["peak_memory_mb"] > 0
    fast = ["--precision", "bf16", "--threads", "1", "--baseline-threads", "1", "--prefetch", "1"]
    assert main([*argv, "--depth", "3", "--steps", "1", "--compare", "--rounds", "1", *fast]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "optimised" in table
    ratio = [line.split() for line in table.splitlines() if line.startswith("ratio")][0]
    assert len(ratio) == 3 and all(float(x.rstrip("x")) > 0 for x in ratio[1:])
    with pytest.raises(SystemExit) as e:
        main(["adapt", "--method", "magic", "--out", str(tmp_path)])
    assert e.value.code == 2
