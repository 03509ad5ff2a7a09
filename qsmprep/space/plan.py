"""What a run does in template space, resolved and checked against the TemplateFlow home.

:func:`plan_spaces` turns ``--output-spaces`` and ``--reference-region`` into a
:class:`SpacePlan`: the templates to register to (with their files at every resolution in the
home), the grid of each output space, and the atlases of the ROI statistics. It reads only
file names and headers, so it runs at command-line start-up, and every missing file raises
:class:`~qsmprep.space.templates.TemplateNotFoundError` before any processing starts.

Rules:

- no template space and ``--reference-region mask``: nothing to do in template space;
- each output space needs its template's brain T1w and brain mask;
- the atlases (:data:`~qsmprep.space.atlas.DEFAULT_ATLASES`, those present) are taken from the
  first output space whose template has one; ROI statistics are skipped with a warning when
  none has any;
- ``--reference-region csf`` needs ventricles in an atlas: from the output spaces' templates,
  else from :data:`~qsmprep.space.templates.DEFAULT_TEMPLATE` (registered to for that purpose
  alone); missing ones raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qsmprep.space.atlas import (
    CSF_LABEL,
    DEFAULT_ATLASES,
    ROIS,
    atlas_files,
    parse_atlas,
    roi_members,
)
from qsmprep.space.templates import (
    DEFAULT_TEMPLATE,
    OutputSpace,
    TemplateNotFoundError,
    available_resolutions,
    parse_output_spaces,
    prefetch_hint,
    template_file,
    template_files,
    templateflow_home,
)

__all__ = ["REFERENCE_REGIONS", "SpacePlan", "plan_from_settings", "plan_spaces", "space_params"]

REFERENCE_REGIONS = ("mask", "csf")
"""``--reference-region`` choices: the local-mask mean, or the atlas ventricles."""


@dataclass
class SpacePlan:
    """Template-space work of a run (see :func:`plan_spaces`); JSON-able via :meth:`to_dict`."""

    home: Path
    spaces: list[OutputSpace] = field(default_factory=list)
    grids: dict[str, str] = field(default_factory=dict)  # space spec -> T1w of its grid
    registrations: dict[str, dict] = field(default_factory=dict)  # template -> files
    atlas_template: str | None = None
    atlases: list[dict] = field(default_factory=list)  # {spec, dseg, table}
    rois: dict[int, str] = field(default_factory=dict)
    reference_region: str = "mask"
    warnings: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """Whether any registration is needed."""
        return bool(self.registrations)

    @property
    def roi_stats(self) -> bool:
        return bool(self.atlases)

    def describe(self) -> str:
        """A human-readable summary (``qsmprep-templates check``)."""
        lines = [f"TemplateFlow home: {self.home}"]
        if not self.enabled:
            lines.append("no template space requested: native space only")
        for tpl, files in self.registrations.items():
            lines.append(f"registration to {tpl}: {', '.join(Path(p).name for p in files['T1w'])}")
        for spec, grid in self.grids.items():
            lines.append(f"output space {spec}: grid of {Path(grid).name}")
        for a in self.atlases:
            lines.append(f"atlas {a['spec']} ({self.atlas_template}): {Path(a['dseg']).name}")
        if self.rois:
            lines.append("ROIs: " + ", ".join(self.rois.values()))
        lines.append(f"reference region: {self.reference_region}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "home": str(self.home),
            "spaces": [s.spec for s in self.spaces],
            "grids": dict(self.grids),
            "registrations": self.registrations,
            "atlas_template": self.atlas_template,
            "atlases": [
                {
                    "spec": a["spec"],
                    "dseg": a["dseg"],
                    "table": {str(k): v for k, v in a["table"].items()},
                }
                for a in self.atlases
            ],
            "rois": {str(k): v for k, v in self.rois.items()},
            "reference_region": self.reference_region,
            "warnings": list(self.warnings),
        }


def _registration_files(name: str, cohort, home) -> dict:
    res = available_resolutions(name, home=home, cohort=cohort)
    if not res:
        # raises the clear error for res-01
        template_file(name, suffix="T1w", desc="brain", res=1, cohort=cohort, home=home)
    t1w, masks = [], []
    for r in res:
        t1w.append(
            str(template_file(name, suffix="T1w", desc="brain", res=r, cohort=cohort, home=home))
        )
        masks.append(
            str(template_file(name, suffix="mask", desc="brain", res=r, cohort=cohort, home=home))
        )
    return {"T1w": t1w, "mask": masks, "res": res}


def _find_atlases(template: str, atlases, home) -> list[dict]:
    found = []
    for spec in atlases:
        spec = parse_atlas(spec)
        for r in available_resolutions(template, home=home) or [1]:
            try:
                dseg, table = atlas_files(template, spec, res=r, home=home)
            except TemplateNotFoundError:
                continue
            found.append({"spec": str(spec), "dseg": str(dseg), "table": table})
            break
    return found


def plan_spaces(
    output_spaces: Sequence[str] | None,
    *,
    reference_region: str = "mask",
    atlases: Sequence[str] = DEFAULT_ATLASES,
    home=None,
) -> SpacePlan:
    """Resolve the template-space work of a run and check its files (see the module doc).

    Raises
    ------
    ValueError
        A malformed output space or reference region.
    TemplateNotFoundError
        A template or atlas file that the run needs is not in the TemplateFlow home.
    """
    if reference_region not in REFERENCE_REGIONS:
        raise ValueError(
            f"reference region {reference_region!r} is not one of {list(REFERENCE_REGIONS)}"
        )
    home = Path(home) if home is not None else templateflow_home()
    spaces = parse_output_spaces(output_spaces)
    plan = SpacePlan(home=home, spaces=spaces, reference_region=reference_region)
    for space in spaces:
        files = template_files(space, home=home)
        plan.grids[space.spec] = str(files["T1w"])
        key = space.name if space.cohort is None else f"{space.name}:cohort-{space.cohort}"
        if key not in plan.registrations:
            plan.registrations[key] = _registration_files(space.name, space.cohort, home)
    if not spaces and reference_region == "mask":
        return plan

    candidates = list(dict.fromkeys(s.name for s in spaces if s.cohort is None))
    for name in candidates:
        found = _find_atlases(name, atlases, home)
        if found:
            plan.atlas_template, plan.atlases = name, found
            break
    if not plan.atlases and reference_region == "csf" and DEFAULT_TEMPLATE not in candidates:
        found = _find_atlases(DEFAULT_TEMPLATE, atlases, home)
        if found:
            plan.atlas_template, plan.atlases = DEFAULT_TEMPLATE, found
    if plan.atlases:
        for a in plan.atlases:
            for roi in roi_members(a["table"]):
                plan.rois.setdefault(roi, ROIS[roi])
        plan.rois = {k: ROIS[k] for k in ROIS if k in plan.rois}
        if plan.atlas_template not in plan.registrations:
            plan.registrations[plan.atlas_template] = _registration_files(
                plan.atlas_template, None, home
            )
    names = ", ".join(str(parse_atlas(a)) for a in atlases)
    where = ", ".join(candidates) or DEFAULT_TEMPLATE
    if reference_region == "csf" and CSF_LABEL not in plan.rois:
        tpl = plan.atlas_template or (candidates[0] if candidates else DEFAULT_TEMPLATE)
        raise TemplateNotFoundError(
            f"--reference-region csf needs an atlas with the ventricles in template {tpl!r}"
            f" (one of: {names}); none was found in {home} for {where}.\n"
            + prefetch_hint(tpl, home, atlas="HOSPA", desc="th50", suffix="dseg")
        )
    if not plan.atlases:
        plan.warnings.append(
            f"no atlas ({names}) in the TemplateFlow home for {where}: ROI statistics are skipped"
        )
    missing = [ROIS[k] for k in ROIS if k not in plan.rois]
    if plan.atlases and missing:
        plan.warnings.append(f"the atlases have no {', '.join(missing)}: not in the ROI tables")
    return plan


def space_params(settings) -> tuple[list[str], dict]:
    """Atlases and registration keyword arguments from the ``"space"`` config section.

    ``{"space": {"atlases": ["HCPEx", "HOSPA:desc-th50"], "resolution_mm": 2.0,
    "syn_iterations": [40, 20, 0], "n4": true, "seed": 1}}``: ``atlases`` (default
    :data:`~qsmprep.space.atlas.DEFAULT_ATLASES`) is read here, the rest goes to
    :func:`qsmprep.space.registration.register_to_template`.
    """
    section = dict((getattr(settings, "method_params", None) or {}).get("space") or {})
    atlases = section.pop("atlases", None) or list(DEFAULT_ATLASES)
    if isinstance(atlases, str):
        atlases = [atlases]
    from qsmprep.space.registration import REGISTRATION_DEFAULTS

    unknown = sorted(set(section) - set(REGISTRATION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in the 'space' config section; known: "
            f"{['atlases', *REGISTRATION_DEFAULTS]}"
        )
    return [str(parse_atlas(a)) for a in atlases], section


def plan_from_settings(settings, home=None) -> SpacePlan:
    """:func:`plan_spaces` for :class:`qsmprep.config.Settings` (``output_spaces``,
    ``reference_region`` and the ``"space"`` config section)."""
    atlases, _ = space_params(settings)
    return plan_spaces(
        getattr(settings, "output_spaces", None) or [],
        reference_region=getattr(settings, "reference_region", "mask"),
        atlases=atlases,
        home=home,
    )
