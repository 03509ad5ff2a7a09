"""Deployment recipes: the embedding example, the SLURM job array, the Apptainer definition, the
Dockerfile, the cluster-plugin configuration and the Boutiques descriptor."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from qsmprep.cli.run import build_parser, settings_from_args

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
DESCRIPTOR = ROOT / "qsmprep" / "data" / "boutiques.json"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- embedding qsmprep's workflow in a user's pipeline -------------------------------------


def test_embed_example_runs_and_matches_truth(tmp_path):
    example = _load(WORKFLOWS / "embed_example.py", "embed_example")
    rows = example.main([str(tmp_path), "--methods", "tkd", "tv", "--nprocs", "2"])
    assert (tmp_path / "roi_stats.tsv").is_file()
    assert (tmp_path / "work" / "my_pipeline" / "roi_stats").is_dir()  # the user's node ran

    brain = {r["method"]: float(r["nrmse_pct"]) for r in rows if r["region"] == "brain"}
    # Measured on this 64 x 64 x 54, 3 mm head (seed 0, SNR 100), chi against the simulated
    # truth in the local mask: TKD 76.5 %, TV 52.6 %. Bounds with ~10 % margin; TV must beat
    # TKD clearly (its regularisation removes most of the streaking).
    assert brain["tkd"] < 85.0
    assert brain["tv"] < 60.0
    assert brain["tv"] < brain["tkd"] - 10.0

    roi = [r for r in rows if r["region"] != "brain"]
    assert {r["region"] for r in roi} == set(example.ROIS.values())
    for method, max_err, min_corr in (("tkd", 0.035, 0.99), ("tv", 0.012, 0.99)):
        est = np.array([float(r["mean_ppm"]) for r in roi if r["method"] == method])
        ref = np.array([float(r["reference_ppm"]) for r in roi if r["method"] == method])
        # Region means against the truth on the same zero (mean of the mask). Measured over the
        # 7 regions: TKD max error 0.027 ppm (globus pallidus, underestimated), correlation
        # 0.998; TV max error 0.0071 ppm (thalamus), correlation 0.998.
        assert np.max(np.abs(est - ref)) < max_err, (method, est, ref)
        assert np.corrcoef(est, ref)[0, 1] > min_corr, (method, est, ref)


# --- SLURM job array ------------------------------------------------------------------------


@pytest.fixture
def bids_root(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text(
        "participant_id\tage\nsub-01\t30\nsub-02\t41\nsub-10\t\n"
    )
    return root


def _slurm(args, env, check=True):
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    r = subprocess.run(
        ["bash", str(WORKFLOWS / "slurm_array.sh"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_slurm_dry_run_prints_the_apptainer_command(bids_root, tmp_path):
    env = {
        "BIDS_DIR": str(bids_root),
        "OUT_DIR": str(tmp_path / "out"),
        "SIF": "/images/qsmprep.sif",
        "SCRATCH": "/scratch/me",
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_MEM_PER_NODE": "16384",
        "QSMPREP_ARGS": "--methods tkd tv",
    }
    r = _slurm(["--dry-run", "--task-id", "3"], env)
    expected = (
        f"apptainer run --cleanenv -B {bids_root}:/data:ro -B {tmp_path / 'out'}:/out "
        "-B /scratch/me/qsmprep_work/sub-10:/work /images/qsmprep.sif /data /out participant "
        "--participant-label 10 --nprocs 4 --omp-nthreads 1 --mem-gb 14 --methods tkd tv "
        "-w /work"
    )
    assert r.stdout.strip() == expected
    assert not (tmp_path / "out").exists()  # a dry run creates nothing

    # the same command from SLURM's task id, also after a requeue (the work dir is the
    # participant's, not the job's): resumption reuses Nipype's cache
    env |= {"SLURM_ARRAY_TASK_ID": "3", "DRY_RUN": "1", "SLURM_JOB_ID": "777"}
    env |= {"SLURM_RESTART_COUNT": "1"}
    assert _slurm([], env).stdout.strip() == expected

    # the qsmprep part is accepted by the BIDS App's parser
    words = shlex.split(expected)
    args = build_parser().parse_args(words[words.index("/images/qsmprep.sif") + 1 :])
    assert args.participant_label == ["10"] and args.methods == ["tkd", "tv"]
    assert str(args.work_dir) == "/work" and args.mem_gb == 14


def test_slurm_list_file_gpu_and_native(bids_root, tmp_path):
    lst = tmp_path / "subjects.txt"
    lst.write_text("# pilot\nsub-02\n\n05\n")
    env = {
        "BIDS_DIR": str(bids_root),
        "OUT_DIR": str(tmp_path / "out"),
        "PARTICIPANTS": str(lst),
        "TMPDIR": str(tmp_path / "node"),
        "GPU": "1",
    }
    r = _slurm(["--dry-run", "--task-id=2"], env)
    assert r.stdout.split() == [
        "qsmprep", str(bids_root), str(tmp_path / "out"), "participant",
        "--participant-label", "05", "--nprocs", "1", "--omp-nthreads", "1",
        "--device", "cuda", "-w", str(tmp_path / "node" / "qsmprep_work" / "sub-05"),
    ]  # fmt: skip
    r = _slurm(["--dry-run", "--task-id", "3"], env, check=False)
    assert r.returncode == 1 and "only 2 participant(s)" in r.stderr
    r = _slurm(["--dry-run"], {k: v for k, v in env.items()}, check=False)
    assert r.returncode == 1 and "no task id" in r.stderr


def test_slurm_task_runs_the_command_with_its_work_dir(bids_root, tmp_path):
    """Without --dry-run the task creates its folders and executes the command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "qsmprep"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called.txt"}\n')
    stub.chmod(0o755)
    env = {
        "BIDS_DIR": str(bids_root),
        "OUT_DIR": str(tmp_path / "out"),
        "WORK_ROOT": str(tmp_path / "work"),
        "SLURM_ARRAY_TASK_ID": "1",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    r = _slurm([], env)
    assert "sub-01" in r.stdout
    assert (tmp_path / "work" / "sub-01").is_dir() and (tmp_path / "out").is_dir()
    called = (tmp_path / "called.txt").read_text().split()
    assert called[:3] == [str(bids_root), str(tmp_path / "out"), "participant"]
    assert called[-2:] == ["-w", str(tmp_path / "work" / "sub-01")]


# --- images ---------------------------------------------------------------------------------


def test_apptainer_definition_runs_the_entrypoint():
    text = (WORKFLOWS / "qsmprep.def").read_text()
    header = dict(
        line.split(":", 1) for line in text.splitlines() if re.match(r"^(Bootstrap|From):", line)
    )
    assert header["Bootstrap"].strip() == "docker"
    assert re.fullmatch(r"\S+/qsmprep:\{\{ TAG \}\}", header["From"].strip())
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, flags=re.M | re.S))
    assert set(sections) >= {"arguments", "runscript", "test", "environment", "help"}
    assert 'exec /opt/venv/bin/qsmprep "$@"' in sections["runscript"]
    assert "qsmprep --version" in sections["test"]
    assert "TEMPLATEFLOW_HOME=/opt/templateflow" in sections["environment"]


def test_dockerfile_pins_and_settings():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.M)[1]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base)
    assert [m for m in re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.M)] == [
        "build",
        "assets",
        "runtime",
    ]
    assert 'ENTRYPOINT ["qsmprep"]' in text
    assert "ARG TORCH_VARIANT=cuda" in text and "download.pytorch.org/whl/cpu" in text
    assert "qsmprep-templates install --templateflow-home" in text
    for env in ("OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "TEMPLATEFLOW_HOME=/opt/templateflow"):
        assert env in text
    for label in ("version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    # the Apptainer runscript names the virtual environment the image installs
    assert "python3 -m venv /opt/venv" in text
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert dockerignore[dockerignore.index("*") :][:4] == [
        "*",
        "!pyproject.toml",
        "!README.md",
        "!qsmprep/",
    ]


def test_slurm_graph_plugin_config_is_accepted(tmp_path):
    (tmp_path / "bids").mkdir()
    args = build_parser().parse_args(
        [str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]
        + ["--nipype-plugin", "SLURMGraph"]
        + ["--plugin-config", str(WORKFLOWS / "slurm_plugin.json")]
    )
    settings = settings_from_args(args)
    assert settings.plugin == "SLURMGraph"
    assert settings.plugin_args["dont_resubmit_completed_jobs"] is True
    assert "--time=" in settings.plugin_args["sbatch_args"]


# --- Boutiques descriptor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def test_boutiques_descriptor_is_package_data_and_valid():
    bosh = pytest.importorskip("boutiques.bosh").bosh
    packaged = resources.files("qsmprep") / "data" / "boutiques.json"
    assert packaged.is_file()
    # bosh validate: the schema, and the BIDS App conventions (command-line template, output
    # directory, analysis levels); raises DescriptorValidationError on failure
    bosh(["validate", "--bids", str(DESCRIPTOR)])


def test_boutiques_descriptor_covers_every_parser_option(descriptor):
    """Each option of the parser is an input with its flag, type, choices and default."""
    by_flag = {i.get("command-line-flag"): i for i in descriptor["inputs"]}
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        flags = [f for f in action.option_strings if f in by_flag]
        assert flags, (
            f"parser option {action.option_strings} is missing from {DESCRIPTOR.name}: "
            "run python tools/boutiques.py"
        )
        inp = by_flag[flags[0]]
        assert inp["id"] == action.dest
        if action.choices is not None:
            assert inp["value-choices"] == list(action.choices), action.dest
        if inp["type"] != "Flag":  # an empty list default is "not given"
            expected = None if action.default == [] else action.default
            assert inp.get("default-value") == expected, action.dest
        assert inp.get("list", False) == (action.nargs in ("+", "*")), action.dest
        kind = {int: "Number", float: "Number"}.get(action.type)
        if kind:
            assert inp["type"] == kind and inp.get("integer", False) == (action.type is int)
    positional = {a.dest for a in parser._actions if not a.option_strings}
    keys = {i["value-key"] for i in descriptor["inputs"]}
    assert {f"[{p.upper()}]" for p in positional} <= keys
    # the file is exactly what the generator writes from this parser
    generator = _load(ROOT / "tools" / "boutiques.py", "boutiques_generator")
    assert DESCRIPTOR.read_text() == generator.render(), "run python tools/boutiques.py"


def test_boutiques_invocation_renders_a_command_the_parser_accepts(tmp_path):
    bosh = pytest.importorskip("boutiques.bosh").bosh
    (tmp_path / "bids").mkdir()
    invocation = {
        "bids_dir": str(tmp_path / "bids"),
        "output_dir_name": str(tmp_path / "out"),
        "analysis_level": "participant",
        "participant_label": ["01", "02"],
        "methods": ["tkd", "tv"],
        "phase_sign": -1,
        "b0": 2.89,
        "nprocs": 2,
        "bg_method": "vsharp",
        "verbose": True,
        "work_dir": str(tmp_path / "work"),
    }
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps(invocation))
    out = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(inv)])
    mkdir, _, command = out.shell_command.partition(";")
    assert mkdir == f"mkdir -p {tmp_path / 'out'}"
    words = shlex.split(command)
    assert words[0] == "qsmprep"
    args = build_parser().parse_args(words[1:])
    assert args.bids_dir == tmp_path / "bids" and args.analysis_level == "participant"
    assert args.participant_label == ["01", "02"] and args.methods == ["tkd", "tv"]
    assert args.phase_sign == -1 and args.b0 == 2.89 and args.nprocs == 2
    assert args.bg_method == "vsharp" and args.verbose == 1
    assert args.work_dir == tmp_path / "work"


@pytest.mark.skipif(shutil.which("bosh") is None, reason="the bosh command is not installed")
def test_bosh_command_line_validates():
    r = subprocess.run(
        ["bosh", "validate", "--bids", str(DESCRIPTOR)], capture_output=True, text=True
    )
    assert r.returncode == 0 and "BIDS validation OK" in r.stdout + r.stderr


def test_python_version_floor_matches_ci():
    """pyproject's requires-python is the lowest version the CI matrix tests."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'requires-python = ">=(3\.\d+)"', text)[1]
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    versions = re.search(r"python-version: \[([^\]]+)\]", ci)[1]
    assert floor == min(
        (v.strip(" \"'") for v in versions.split(",")), key=lambda v: int(v.split(".")[1])
    )
    assert sys.version_info >= tuple(int(x) for x in floor.split("."))
