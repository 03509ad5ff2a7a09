"""``--output-spaces`` entries: template names, resolutions and cohorts (no I/O).

A settings-level parser at the ground of the package, so that :class:`qsmprep.config.Settings`
validates its output spaces without importing the template-space code
(:mod:`qsmprep.space.templates` re-exports both names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["OutputSpace", "parse_output_spaces"]

_NAME = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class OutputSpace:
    """One ``--output-spaces`` entry: a TemplateFlow template, optionally a resolution.

    ``res`` is the TemplateFlow resolution index (``1`` for ``res-01``, 1 mm on the MNI
    templates); ``None`` means the template's first resolution, and no ``res-`` entity in the
    output names.
    """

    name: str
    res: int | None = None
    cohort: str | None = None

    @property
    def spec(self) -> str:
        """The entry as written on the command line (``Name[:cohort-c][:res-n]``)."""
        out = self.name
        if self.cohort is not None:
            out += f":cohort-{self.cohort}"
        if self.res is not None:
            out += f":res-{self.res}"
        return out

    @property
    def entities(self) -> str:
        """``space-<name>[_cohort-<c>][_res-<n>]`` of the derivative names."""
        out = f"space-{self.name}"
        if self.cohort is not None:
            out += f"_cohort-{self.cohort}"
        if self.res is not None:
            out += f"_res-{self.res}"
        return out


def parse_output_spaces(values) -> list[OutputSpace]:
    """Parse ``--output-spaces`` entries into template spaces (``native`` is implicit).

    Each entry is ``native`` or ``<Template>[:res-<n>][:cohort-<label>]``, e.g.
    ``MNI152NLin2009cAsym:res-1``. Repeated entries are kept once. Raises ValueError for a
    malformed entry, naming it and the expected form.
    """
    out: list[OutputSpace] = []
    for value in values or []:
        text = str(value).strip()
        if text in ("", "native", "anat", "MEGRE", "T2starw"):
            continue
        name, *mods = text.split(":")
        res = cohort = None
        bad = not _NAME.match(name)
        for mod in mods:
            key, sep, val = mod.partition("-")
            if key == "res" and sep and val.isdigit() and int(val) > 0:
                res = int(val)
            elif key == "cohort" and sep and _NAME.match(val):
                cohort = val
            else:
                bad = True
        if bad:
            raise ValueError(
                f"output space {text!r} is not of the form <Template>[:res-<n>][:cohort-<c>]"
                " (e.g. MNI152NLin2009cAsym:res-1) or 'native'"
            )
        space = OutputSpace(name, res, cohort)
        if space not in out:
            out.append(space)
    return out
