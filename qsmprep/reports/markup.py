"""HTML pieces shared by the report pages: escaping, numbers, tables, style sheet, skeleton.

:func:`esc` is the one escaping function of :mod:`qsmprep.reports`: every text taken from
the files on disk (names, sidecar values, messages) goes through it before it reaches a page.
:class:`Report` collects the fragments and the problems of the per-subject page; :func:`page`
wraps the sections of either page (subject or group) into one self-contained document.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import traceback
from pathlib import Path

from qsmprep import methods as registry
from qsmprep.reports.collect import to_float

__all__ = ["CSS", "METRIC_UNITS", "Report", "esc", "fmt", "method_order", "page", "table"]

#: Preferred order of methods on the page (others follow alphabetically): the classical
#: inversions in the registry's order.
_METHOD_ORDER = registry.view("inversion", kind="classical")
#: Units of metric columns, shown in the table header.
METRIC_UNITS = {"nrmse": "%", "hfen": "%", "psnr": "dB", "dc_residual": "%"}

#: The inline style sheet of every page.
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.45}
header{background:#233;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:1.5em} header p{margin:4px 0 0;color:#cde;font-size:.9em}
nav{background:#eef2f3;padding:8px 24px;font-size:.9em;border-bottom:1px solid #ccd}
nav a{margin-right:14px;color:#135;text-decoration:none}
main{padding:8px 24px 40px;max-width:1100px}
section{margin:18px 0 26px} h2{border-bottom:2px solid #233;padding-bottom:3px}
h3{margin:18px 0 6px;color:#234}
figure{margin:8px 0 14px} figure img{max-width:100%;height:auto;border:1px solid #ddd;
background:#fff} figcaption{font-size:.85em;color:#555}
table{border-collapse:collapse;font-size:.88em;margin:6px 0 12px;background:#fff}
th,td{border:1px solid #ccd;padding:3px 8px;text-align:left}
th{background:#eef2f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0}
.error{background:#fdecea;border-left:4px solid #d32f2f;padding:6px 10px;margin:8px 0}
.ok{background:#e8f5e9;border-left:4px solid #388e3c;padding:6px 10px;margin:8px 0}
pre{background:#f3f3f3;padding:8px;overflow-x:auto;font-size:.8em;max-height:320px}
.refs li{font-size:.88em;margin-bottom:3px}
.plots{display:flex;flex-wrap:wrap;gap:0 16px} td.num{white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
"""


def esc(x) -> str:
    """``str(x)`` with ``&``, ``<``, ``>`` and both quotes escaped (text and attributes)."""
    return html.escape(str(x), quote=True)


def fmt(x, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (scientific when tiny or huge), or the
    escaped text when ``x`` is not a finite number."""
    value = to_float(x)
    if value is None:
        return esc(x)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def table(rows: list[tuple[str, str]]) -> str:
    """A two-column table: escaped names, values already HTML."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def method_order(methods, preferred=()) -> list[str]:
    """``methods`` in page order: ``preferred`` first, then the usual order, then A to Z."""
    order = [m for m in preferred if m in methods]
    order += [m for m in _METHOD_ORDER if m in methods and m not in order]
    order += sorted(m for m in methods if m not in order)
    return order


def page(title: str, heading: str, byline: str, body: list[str], nav=None) -> str:
    """A whole page around the sections in ``body``.

    ``title``, ``heading`` and ``byline`` are HTML (escaped by the caller); the byline is
    followed by the time of generation. ``nav`` (``(anchor, text)`` pairs) adds a bar of
    links to the sections.
    """
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    links = ""
    if nav is not None:
        links = "<nav>" + "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav) + "</nav>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>qsmprep: {title}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{heading}</h1><p>{byline}, generated {now}</p></header>{links}<main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


class Report:
    """Collects page fragments, user-facing problems and the tracebacks of a report."""

    def __init__(self, output_dir: Path, label: str):
        self.output_dir = output_dir
        self.label = label
        self.figdir = output_dir / f"sub-{label}" / "figures"
        self.problems: list[str] = []  # short messages for the page
        self.tracebacks: list[str] = []  # for the log file

    def attempt(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, or ``None`` after recording the failure of ``what``."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a report never fails the run
            self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
            self.tracebacks.append(f"--- {what}\n{traceback.format_exc()}")
            return None

    def rel(self, path: Path) -> str:
        """``path`` relative to the output directory, with forward slashes."""
        return Path(os.path.relpath(path, self.output_dir)).as_posix()

    def figure(self, path: Path | None, caption: str, alt: str) -> str:
        """A ``<figure>`` of the PNG at ``path``, or a note when it was not drawn."""
        if path is None or not Path(path).is_file():
            return f'<p class="note">Figure not available: {esc(alt)} (see Errors).</p>'
        return (
            f'<figure><img src="{esc(self.rel(path))}" alt="{esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
