"""Sphinx configuration of the qsmprep documentation (``make docs``: warnings are errors)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package, also when it is not installed

from qsmprep.__about__ import __version__  # noqa: E402

project = "qsmprep"
author = "The qsmprep developers"
copyright = "The qsmprep developers"  # noqa: A001
version = release = __version__

extensions = [
    "myst_parser",
    "sphinxarg.ext",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "none"  # the numpy-style docstrings give types and units
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True

html_theme = "furo"
html_title = f"qsmprep {__version__}"
html_static_path: list[str] = []


def _write(name: str, text: str) -> None:
    """Write ``_generated/<name>`` when its text changed (unchanged files are not rebuilt)."""
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    path = out / name
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _write_methods() -> None:
    """``_generated/methods.md``: the table of methods, from the registry (qsmprep.methods)."""
    from qsmprep.methods import markdown

    _write("methods.md", markdown())


def _write_references() -> None:
    """``_generated/references.md``: the full references, from the package's citation table."""
    from qsmprep.reports.methods import CITATIONS

    lines = [
        "# References",
        "",
        "The references that the methods paragraph of each subject's report draws from, by"
        " key (`qsmprep.reports.methods.CITATIONS`).",
        "",
    ]
    lines += [f"- **{key}**: {text}" for key, text in sorted(CITATIONS.items())]
    _write("references.md", "\n".join(lines) + "\n")


_write_methods()
_write_references()
