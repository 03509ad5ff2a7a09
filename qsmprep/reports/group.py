"""Group level: every subject's metrics in one table and a summary page with plots.

:func:`build_group_report` gathers ``sub-*/[ses-*/]anat/<prefix>_metrics.tsv`` into
``output_dir/group_metrics.tsv`` (with ``subject``, ``session``, ``acq``, ``rec`` and ``run``
columns parsed from the file names, ``n/a`` where an entity is absent) and writes
``output_dir/group.html``: the mean, standard deviation and count of every metric per method,
box plots with the individual values per method (figures under ``output_dir/figures/``), links
to the subject reports and the full table. Tables without reference columns (or with ``n/a``
in them) are fine: a metric is plotted only where it has values.
"""

from __future__ import annotations

import logging
import math
import traceback
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep._atomic import write_text
from qsmprep.reports.collect import parse_name, read_tsv, to_float
from qsmprep.reports.markup import METRIC_UNITS, esc, method_order, page
from qsmprep.reports.space import group_roistats_section

__all__ = ["GROUP_METRICS", "build_group_report", "collect_metrics"]

LOGGER = logging.getLogger("qsmprep.reports")

#: Entity columns added in front of the metrics, from the file names.
ID_COLUMNS = ("subject", "session", "acq", "rec", "run")
_ENTITY_OF = {"subject": "sub", "session": "ses", "acq": "acq", "rec": "rec", "run": "run"}
#: Metrics plotted on the group page (when present), in this order.
GROUP_METRICS = ("nrmse", "hfen", "ssim", "xsim", "psnr", "slope", "corr", "dc_residual")


def _metric_files(output_dir: Path) -> list[Path]:
    files = []
    for sub in sorted(output_dir.glob("sub-*")):
        if sub.is_dir():
            files += [
                p
                for p in sorted(sub.rglob("*_metrics.tsv"))
                if "figures" not in p.relative_to(sub).parts
            ]
    return files


def collect_metrics(output_dir) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of all ``*_metrics.tsv`` under ``output_dir/sub-*``.

    Each row gets the ``subject``, ``session``, ``acq``, ``rec`` and ``run`` of its file
    (``n/a`` when absent); metric columns are the union over files in order of first
    appearance, ``n/a`` where a file lacks one.
    """
    columns: list[str] = []
    rows: list[dict[str, str]] = []
    for path in _metric_files(Path(output_dir)):
        cols, file_rows = read_tsv(path)
        ents, _ = parse_name(path.name)
        ids = {c: ents.get(_ENTITY_OF[c], "n/a") for c in ID_COLUMNS}
        for c in cols:
            if c not in columns and c not in ID_COLUMNS:
                columns.append(c)
        for row in file_rows:
            rows.append({**ids, **{k: v for k, v in row.items() if k not in ID_COLUMNS}})
    all_columns = [*ID_COLUMNS, *columns]
    for row in rows:
        for c in all_columns:
            if row.get(c) in (None, ""):
                row[c] = "n/a"
    return all_columns, rows


def _write_tsv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    lines = ["\t".join(columns)]
    lines += ["\t".join(str(row.get(c, "n/a")) for c in columns) for row in rows]
    return write_text(path, "\n".join(lines) + "\n")


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd, n


def build_group_report(output_dir) -> tuple[Path, Path]:
    """Write ``group_metrics.tsv`` and ``group.html`` in ``output_dir``.

    The table is the product of the group level: a failure to read the metrics or to write
    the table raises. The page is best effort: a plot that fails is reported on the page and
    its traceback written to ``output_dir/logs/report-group.log``.

    Returns
    -------
    (Path, Path)
        The TSV and the HTML page.
    """
    output_dir = Path(output_dir)
    columns, rows = collect_metrics(output_dir)
    tsv_path = _write_tsv(output_dir / "group_metrics.tsv", columns, rows)
    html_path = output_dir / "group.html"
    log_path = output_dir / "logs" / "report-group.log"
    problems: list[str] = []
    tracebacks: list[str] = []
    body: list[str] = []
    try:
        body = _group_body(output_dir, columns, rows, problems, tracebacks)
    except Exception as exc:  # noqa: BLE001 - the page is best effort
        problems.append(f"group page: {type(exc).__name__}: {exc}")
        tracebacks.append(traceback.format_exc())
    if problems:
        body.append('<section id="errors"><h2>Errors</h2><ul>')
        body += [f"<li>{esc(p)}</li>" for p in problems]
        body.append(f"</ul><p>Tracebacks: <code>logs/{log_path.name}</code></p></section>")
    html = page("group", "Group report", f"qsmprep {esc(__version__)}", body)
    write_text(html_path, html)
    try:
        if tracebacks:
            write_text(log_path, "\n".join(tracebacks))
            LOGGER.warning("group report is incomplete; see %s", log_path)
        elif log_path.exists():
            log_path.unlink()
    except OSError:
        LOGGER.exception("could not write %s", log_path)
    return tsv_path, html_path


def _group_body(output_dir: Path, columns, rows, problems, tracebacks) -> list[str]:
    from qsmprep.reports.figures import metric_strip_figure

    body = []
    subjects = sorted({r["subject"] for r in rows})
    methods = method_order({r.get("method", "n/a") for r in rows})
    pages = sorted(output_dir.glob("sub-*.html"))
    body.append('<section id="summary"><h2>Summary</h2>')
    if not rows:
        body.append(
            '<p class="note">No metrics tables (<code>sub-*/**/*_metrics.tsv</code>) '
            "were found.</p>"
        )
    body.append(
        f"<p>{len(rows)} rows from {len(subjects)} subject(s); methods: "
        f"{esc(', '.join(methods)) or 'none'}. Table: <code>group_metrics.tsv</code>.</p>"
    )
    if pages:
        links = " ".join(f'<a href="{esc(p.name)}">{esc(p.stem)}</a>' for p in pages)
        body.append(f"<p>Subject reports: {links}</p>")
    body.append("</section>")

    metrics = [c for c in GROUP_METRICS if c in columns]
    values = {
        m: {
            meth: [
                v
                for r in rows
                if r.get("method") == meth and (v := to_float(r.get(m))) is not None
            ]
            for meth in methods
        }
        for m in metrics
    }
    plotted = [m for m in metrics if any(values[m].values())]
    if plotted:
        head = "".join(
            f"<th>{esc(m)}{' (' + METRIC_UNITS[m] + ')' if m in METRIC_UNITS else ''}</th>"
            for m in plotted
        )
        lines = [f'<div class="scroll"><table><tr><th>method</th>{head}</tr>']
        for meth in methods:
            cells = []
            for m in plotted:
                vals = values[m][meth]
                if vals:
                    mean, sd, n = _stats(vals)
                    sd_txt = f" &plusmn; {sd:.3g}" if n > 1 else ""
                    cells.append(f'<td class="num">{mean:.4g}{sd_txt} (n={n})</td>')
                else:
                    cells.append("<td>n/a</td>")
            lines.append(f"<tr><th>{esc(meth)}</th>{''.join(cells)}</tr>")
        lines.append("</table></div>")
        body.append(
            '<section id="stats"><h2>Metrics per method</h2>'
            "<p>Mean &plusmn; standard deviation (number of acquisitions).</p>"
            + "".join(lines)
            + "</section>"
        )
        body.append('<section id="plots"><h2>Plots</h2><div class="plots">')
        for m in plotted:
            path = output_dir / "figures" / f"group_desc-{m}_boxplot.png"
            try:
                metric_strip_figure(
                    {k: v for k, v in values[m].items() if v},
                    path,
                    metric=m,
                    unit=METRIC_UNITS.get(m, ""),
                )
            except Exception as exc:  # noqa: BLE001 - the page is best effort
                problems.append(f"{m} plot: {type(exc).__name__}: {exc}")
                tracebacks.append(traceback.format_exc())
                continue
            body.append(
                f'<figure><img src="figures/{esc(path.name)}" alt="{esc(m)} per method">'
                f"<figcaption>{esc(m)} per method: box (quartiles, median) and every "
                "acquisition.</figcaption></figure>"
            )
        body.append("</div></section>")
    elif rows:
        body.append('<p class="note">No numeric metric values to plot.</p>')

    body += group_roistats_section(output_dir, problems, tracebacks)
    if rows:
        head = "".join(f"<th>{esc(c)}</th>" for c in columns)
        lines = [f'<div class="scroll"><table><tr>{head}</tr>']
        for r in rows:
            cells = []
            for c in columns:
                v = to_float(r.get(c)) if c not in ID_COLUMNS else None
                txt = f"{v:.4g}" if v is not None else esc(r.get(c, "n/a"))
                cells.append(f'<td class="num">{txt}</td>' if v is not None else f"<td>{txt}</td>")
            lines.append("<tr>" + "".join(cells) + "</tr>")
        lines.append("</table></div>")
        body.append('<section id="table"><h2>All metrics</h2>' + "".join(lines) + "</section>")
    return body
