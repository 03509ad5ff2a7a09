"""The App as a library (:mod:`qsmprep.app`): the command line only parses and calls it."""

import ast
from pathlib import Path

import pytest

import qsmprep
from qsmprep.app import UsageError, make_settings
from qsmprep.cli import run

PACKAGE = Path(qsmprep.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_below_the_command_line_imports_it():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        bad = sorted(
            n for n in _imports(path) if n == "qsmprep.cli" or n.startswith("qsmprep.cli.")
        )
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_make_settings_builds_what_the_command_line_builds(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(bids), str(out), "participant", "-w", str(work), "--methods", "tkd", "tv", "tkd",
            "--nprocs", "3", "--participant-label", "sub-01", "02",
            "--bg-method", "resharp"]  # fmt: skip
    cli = run.settings_from_args(run.build_parser().parse_args(argv))
    lib = make_settings(bids, out, work_dir=work, methods=["tkd", "tv", "tkd"], nprocs=3,
                        participant_label=["sub-01", "02"], bg_method="resharp")  # fmt: skip
    assert lib.to_dict() == cli.to_dict()
    assert lib.methods == ["tkd", "tv"] and lib.participant_label == ["01", "02"]
    assert lib.omp_nthreads == 2
    assert lib.plugin_args == {"n_procs": 3}
    # the defaults of the command line, and its checks
    default = run.settings_from_args(run.build_parser().parse_args([str(bids), str(out), "group"]))
    assert make_settings(bids, out, "group").to_dict() == default.to_dict()
    with pytest.raises(UsageError, match="unknown method"):
        make_settings(bids, out, methods=["nope"])
    with pytest.raises(UsageError, match="is not a folder"):
        make_settings(tmp_path / "missing", out)
