"""The package has no import cycle, function-level imports included (tools/import_cycles.py)."""

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_cycles.py"


def test_no_import_cycles():
    run = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no cycles" in run.stdout


def test_the_tool_finds_a_hidden_cycle(tmp_path):
    """A cycle through a function-level import is found (the one dl/nets/unet.py had)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_cycles", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n\n    return a\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = tool.import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.a"}
    assert tool.cycles(graph) == [["pkg.a", "pkg.b"]]
