"""Template space: TemplateFlow templates read offline, ANTs registration, atlas ROI statistics.

- :mod:`qsmprep.space.templates`: ``--output-spaces`` parsing and offline TemplateFlow look-up;
- :mod:`qsmprep.space.plan`: what a run does in template space, checked at start-up;
- :mod:`qsmprep.space.registration`: rigid + affine + SyN registration (antspyx);
- :mod:`qsmprep.space.atlas`: canonical deep grey nuclei, ROI statistics, CSF referencing;
- :mod:`qsmprep.space.install`: filling a TemplateFlow home from PyPI packages.

The report's template-space parts (registration figure, ROI tables, group summary) are in
:mod:`qsmprep.reports.space`.
"""

from qsmprep.space.atlas import (
    CSF_LABEL,
    DEFAULT_ATLASES,
    ROIS,
    canonical_labels,
    reference_region,
    roi_statistics,
)
from qsmprep.space.plan import REFERENCE_REGIONS, SpacePlan, plan_spaces
from qsmprep.space.templates import (
    DEFAULT_TEMPLATE,
    OutputSpace,
    TemplateNotFoundError,
    parse_output_spaces,
    template_file,
    templateflow_home,
)

__all__ = [
    "CSF_LABEL",
    "DEFAULT_ATLASES",
    "DEFAULT_TEMPLATE",
    "REFERENCE_REGIONS",
    "ROIS",
    "OutputSpace",
    "SpacePlan",
    "TemplateNotFoundError",
    "canonical_labels",
    "parse_output_spaces",
    "plan_spaces",
    "reference_region",
    "roi_statistics",
    "template_file",
    "templateflow_home",
]
