"""Reports: figures, the per-subject HTML page and the group summary.

- :func:`build_subject_report` (``output_dir/sub-<label>.html``; never raises),
- :func:`build_group_report` (``output_dir/group_metrics.tsv`` and ``group.html``),
- :func:`methods_paragraph` (methods text with citations from the effective settings),
- :mod:`qsmprep.reports.space`: their template-space parts (registration figure, ROI tables).

Both reports read only the derivative files on disk, so they can be rebuilt from an output
directory at any time.
"""

from qsmprep.reports.group import build_group_report, collect_metrics
from qsmprep.reports.html import build_subject_report
from qsmprep.reports.methods import methods_paragraph, methods_text

__all__ = [
    "build_group_report",
    "build_subject_report",
    "collect_metrics",
    "methods_paragraph",
    "methods_text",
]
