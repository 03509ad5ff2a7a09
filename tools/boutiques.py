#!/usr/bin/env python
"""Write the Boutiques descriptor of the BIDS App from its parser.

    python tools/boutiques.py            # writes qsmprep/data/boutiques.json
    python tools/boutiques.py --check    # exit 1 when the file differs from the parser

Every option of ``qsmprep.cli.run.build_parser`` becomes one input (flag, type, choices,
default, list-ness and help text taken from argparse), in the layout ``bosh validate --bids``
checks: ``mkdir -p [OUTPUT_DIR]; qsmprep [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL]
[PARTICIPANT_LABEL] [SESSION_LABEL] ...``. The tests compare the file with this output, so
a new option fails the tests until the descriptor is regenerated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep.cli.run import build_parser

DESCRIPTOR = Path(__file__).resolve().parents[1] / "qsmprep" / "data" / "boutiques.json"
IMAGE = "ghcr.io/qsmprep/qsmprep"
SKIP = {"help", "version"}
# inputs named by a path that qsmprep creates rather than reads
CREATED_PATHS = {"work_dir"}


def _flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _input(action: argparse.Action) -> dict:
    dest = action.dest
    inp: dict = {
        "id": dest,
        "name": dest.replace("_", " ").capitalize(),
        "description": (action.help or "").replace("%(default)s", str(action.default)),
        "value-key": f"[{dest.upper()}]",
        "command-line-flag": _flag(action),
        "optional": True,
    }
    if isinstance(action, argparse._CountAction | argparse._StoreTrueAction):
        inp["type"] = "Flag"
        return inp
    if action.type is Path:
        inp["type"] = "String" if dest in CREATED_PATHS else "File"
    elif action.type in (int, float):
        inp["type"] = "Number"
        if action.type is int:
            inp["integer"] = True
    else:
        inp["type"] = "String"
    if action.nargs in ("+", "*"):
        inp["list"] = True
        if action.nargs == "+":
            inp["min-list-entries"] = 1
    if action.choices is not None:
        inp["value-choices"] = list(action.choices)
    # an empty list means "not given": Boutiques would pass it as a list that must not be empty
    if action.default not in (None, argparse.SUPPRESS, []):
        inp["default-value"] = action.default
    return inp


def build_descriptor() -> dict:
    """The descriptor (a dict) of this version's BIDS App parser."""
    parser = build_parser()
    positional = {a.dest: a for a in parser._actions if not a.option_strings}
    options = [a for a in parser._actions if a.option_strings and a.dest not in SKIP]
    first = ["participant_label", "session_label"]  # the BIDS App template's order
    options.sort(key=lambda a: first.index(a.dest) if a.dest in first else len(first))

    inputs = [
        {
            "id": "bids_dir",
            "name": "BIDS directory",
            "type": "File",
            "description": positional["bids_dir"].help,
            "value-key": "[BIDS_DIR]",
            "optional": False,
        },
        {
            "id": "output_dir_name",
            "name": "Output directory name",
            "type": "String",
            "description": positional["output_dir"].help
            + " (participant level: created if needed)",
            "value-key": "[OUTPUT_DIR]",
            "optional": True,
        },
        {
            "id": "participant_level_analysis_dir",
            "name": "Participant-level output directory",
            "type": "File",
            "description": "the output folder of the participant level (group level)",
            "value-key": "[OUTPUT_DIR]",
            "optional": True,
        },
        {
            "id": "analysis_level",
            "name": "Analysis level",
            "type": "String",
            "description": positional["analysis_level"].help,
            "value-key": "[ANALYSIS_LEVEL]",
            "value-choices": list(positional["analysis_level"].choices),
            "optional": False,
        },
        *[_input(a) for a in options],
    ]
    keys = " ".join(i["value-key"] for i in inputs if i["value-key"] != "[OUTPUT_DIR]")
    keys = keys.replace("[BIDS_DIR]", "[BIDS_DIR] [OUTPUT_DIR]", 1)
    return {
        "name": "qsmprep",
        "tool-version": __version__,
        "description": parser.description,
        "author": "The qsmprep developers",
        "url": "https://github.com/qsmprep/qsmprep",
        "command-line": f"mkdir -p [OUTPUT_DIR]; qsmprep {keys}",
        "container-image": {"type": "docker", "image": f"{IMAGE}:{__version__}"},
        "schema-version": "0.5",
        "inputs": inputs,
        "groups": [
            {
                "id": "output_directory",
                "name": "Output directory",
                "description": "participant level: the folder to write; group level: the "
                "folder the participant level wrote",
                "members": ["output_dir_name", "participant_level_analysis_dir"],
                "mutually-exclusive": True,
                "one-is-required": True,
            }
        ],
        "output-files": [
            {
                "id": "output_dir",
                "name": "Output directory",
                "description": "BIDS derivative dataset: Chimaps (ppm), masks, field maps, "
                "metrics, reports",
                "path-template": "[OUTPUT_DIR]",
                "optional": False,
            }
        ],
        "suggested-resources": {"cpu-cores": 4, "ram": 16, "walltime-estimate": 3600},
        "tags": {"domain": ["neuroimaging", "mri", "qsm", "bids-app"]},
    }


def render() -> str:
    return json.dumps(build_descriptor(), indent=2) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DESCRIPTOR.is_file() or DESCRIPTOR.read_text() != text:
            print(f"{DESCRIPTOR} is out of date: run python tools/boutiques.py", file=sys.stderr)
            return 1
        print(f"{DESCRIPTOR} is up to date")
        return 0
    DESCRIPTOR.parent.mkdir(parents=True, exist_ok=True)
    DESCRIPTOR.write_text(text)
    print(f"wrote {DESCRIPTOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
