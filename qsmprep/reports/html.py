"""Per-subject HTML report, built from the derivative files on disk alone.

:func:`build_subject_report` writes ``output_dir/sub-<label>.html``: one self-contained page
(inline style, no scripts, no network) whose figures are PNG files under
``output_dir/sub-<label>/figures/`` referenced by relative paths, so the output directory
can be moved or archived as a whole. Sections, per acquisition: inputs (from the sidecars
and image headers), brain and local-field masks, total/local/noise field maps, one mosaic per
inversion method on a common colour scale, differences and scatter plots against the
reference when there is one, and the metrics table; then the COSMOS map(s), a methods
paragraph with citations (:func:`qsmprep.reports.methods.methods_paragraph`) and the errors
(failed acquisitions with their crash logs, figures that could not be drawn).

A report never fails a run: every part is drawn on its own, exceptions are caught and their
tracebacks written to ``output_dir/logs/report-sub-<label>.log``, and the page shows what
could be rendered.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep.reports.acquisition import acquisition_section
from qsmprep.reports.collect import SubjectFiles, find_subject_files, subject_label
from qsmprep.reports.markup import Report, esc, page, table
from qsmprep.reports.methods import methods_text as _methods_text
from qsmprep.reports.sections import cosmos_section, errors_section, methods_section

__all__ = ["build_subject_report", "load_settings", "write_text_atomic"]

LOGGER = logging.getLogger("qsmprep.reports")


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    from qsmprep._atomic import write_text

    return write_text(path, text)


def load_settings(output_dir, settings=None) -> dict:
    """Settings as a plain dict: ``settings`` (a dict or an object with ``to_dict()``), else
    ``output_dir/qsmprep_settings.json``, else ``{}``."""
    if settings is not None:
        if hasattr(settings, "to_dict"):
            return dict(settings.to_dict())
        return dict(settings)
    try:
        data = json.loads((Path(output_dir) / "qsmprep_settings.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _merge_params(settings: dict, params: dict) -> dict:
    """Settings with the parameters recorded in the sidecars merged into ``method_params``.

    Of the recorded (effective) parameters, only the key ones of a method
    (:data:`qsmprep.reports.methods.METHODS`) and those set in the settings are kept, so the
    methods paragraph stays readable.
    """
    from qsmprep.reports.methods import METHODS

    s = dict(settings)
    mp = {k: dict(v) for k, v in (s.get("method_params") or {}).items() if isinstance(v, dict)}
    for method, p in params.items():
        keys = set(mp.get(method, {}))
        if method in METHODS:
            keys |= set(METHODS[method].key_params)
        mp[method] = {**mp.get(method, {}), **{k: v for k, v in p.items() if k in keys}}
    s["method_params"] = mp
    return s


def _summary_section(rep: Report, files: SubjectFiles) -> str:
    summary = ['<section id="summary"><h2>Summary</h2>']
    if not files.acquisitions and not files.cosmos:
        summary.append(
            f'<p class="error">No derivatives were found under '
            f"<code>{esc(rep.rel(files.root))}</code>.</p>"
        )
    rows = []
    for acq in files.acquisitions:
        n = len(acq.chimaps)
        rows.append(
            (
                acq.prefix,
                f'<a href="#{esc(acq.prefix)}">{n} susceptibility map{"s" if n != 1 else ""}</a>',
            )
        )
    if files.cosmos:
        rows.append(("COSMOS", f'<a href="#cosmos">{len(files.cosmos)} map(s)</a>'))
    if rows:
        summary.append(table(rows))
    summary.append("</section>")
    return "\n".join(summary)


def _acquisition_sections(rep, files, settings, body, nav) -> dict:
    """Append every acquisition's section to ``body`` and ``nav``; return what they tell the
    methods paragraph (``params``, ``references``, ``units``, ``echo_counts``,
    ``r2star_methods``)."""
    preferred = list(settings.get("methods") or [])
    seen: dict = {
        "params": {},
        "references": set(),
        "units": set(),
        "echo_counts": set(),
        "r2star_methods": set(),
    }
    for acq in files.acquisitions:
        res = rep.attempt(
            f"{acq.prefix}: section", acquisition_section, rep, acq, files, settings, preferred
        )
        if res is None:
            body.append(
                f'<section id="{esc(acq.prefix)}"><h2>{esc(acq.prefix)}</h2>'
                '<p class="error">This section could not be rendered.</p></section>'
            )
        else:
            body.append(res[0])
            info = res[1]
            for k, v in info["params"].items():
                seen["params"].setdefault(k, v)
            if isinstance(info.get("phase_units"), str):
                seen["units"].add(info["phase_units"])
            if info.get("reference"):
                seen["references"].add(info["reference"])
            if isinstance(info.get("echoes"), int):
                seen["echo_counts"].add(info["echoes"])
            if isinstance(info.get("r2star_method"), str):
                seen["r2star_methods"].add(info["r2star_method"])
        nav.append((acq.prefix, acq.prefix))
    return seen


def _methods_paragraph(rep: Report, settings: dict, seen: dict, files: SubjectFiles):
    """The generated methods text (``None`` when it failed)."""
    ms = _merge_params(settings, seen["params"])
    ms.setdefault("phase_units", sorted(seen["units"]))
    ms.setdefault("echo_counts", sorted(seen["echo_counts"]))
    ms.setdefault("r2star_methods", sorted(seen["r2star_methods"]))
    references = seen["references"]
    if not ms.get("reference") and len(references) == 1 and not files.cosmos:
        ms["reference"] = next(iter(references))
    return rep.attempt("methods paragraph", _methods_text, ms, cosmos=bool(files.cosmos))


def _sections(rep: Report, raw: str, label: str, settings, methods_text, body, nav) -> None:
    """Append the summary, acquisition, COSMOS and methods sections to ``body`` and ``nav``."""
    subject_label(raw)  # a clear error for a malformed label
    s = load_settings(rep.output_dir, settings)
    files = find_subject_files(rep.output_dir, label)
    body.append(_summary_section(rep, files))
    nav.append(("summary", "Summary"))
    seen = _acquisition_sections(rep, files, s, body, nav)
    cos = rep.attempt("COSMOS section", cosmos_section, rep, files)
    if cos:
        body.append(cos)
        nav.append(("cosmos", "COSMOS"))
    if methods_text is None:
        text = _methods_paragraph(rep, s, seen, files)
    else:
        text = str(methods_text)
    if text is not None:
        body.append(methods_section(text))
        nav.append(("methods", "Methods"))


def _write_log(rep: Report, log_path: Path, logger: logging.Logger) -> None:
    """The tracebacks of the report in ``log_path`` (removed when there are none)."""
    label = rep.label
    try:
        if rep.tracebacks:
            text = f"qsmprep {__version__} report for sub-{label}\n" + "\n".join(rep.tracebacks)
            write_text_atomic(log_path, text)
            logger.warning(
                "report for sub-%s is incomplete (%d problem(s)); see %s",
                label,
                len(rep.problems),
                log_path,
            )
        elif log_path.exists():
            log_path.unlink()
    except Exception:  # noqa: BLE001
        logger.exception("could not write the report log %s", log_path)


def build_subject_report(
    output_dir, subject, *, settings=None, methods_text=None, log=None
) -> Path:
    """Write the HTML report of one subject from its derivatives; never raises.

    Parameters
    ----------
    output_dir : path
        The qsmprep output (derivative) directory.
    subject : str
        Subject label, ``"01"`` or ``"sub-01"``.
    settings : dict or Settings, optional
        Effective settings (``Settings`` or its ``to_dict()``); default: read
        ``output_dir/qsmprep_settings.json``. Used for the methods paragraph, the method
        order, the expected methods, the reference and the BIDS directory (raw inputs).
    methods_text : str, optional
        A methods paragraph to show instead of the generated one
        (:func:`qsmprep.reports.methods.methods_paragraph`, with the parameters recorded in
        the Chimap and local-field sidecars).
    log : optional
        Errors of the run to list in the Errors section: a mapping ``{acquisition id: crash
        log path or message}`` or a sequence of paths/messages. Crash logs under
        ``output_dir/logs`` whose name contains ``sub-<label>`` are listed anyway. A
        ``logging.Logger`` is instead used to warn when the report met problems.

    Returns
    -------
    Path
        ``output_dir/sub-<label>.html`` (written even when parts failed; the tracebacks go to
        ``output_dir/logs/report-sub-<label>.log``).
    """
    output_dir = Path(output_dir)
    raw = str(subject)
    label = raw[4:] if raw.startswith("sub-") else raw
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        label = "invalid"  # never overwrite another subject's page; the error is on the page
    rep = Report(output_dir, label)
    page_path = output_dir / f"sub-{label}.html"
    log_path = output_dir / "logs" / f"report-sub-{label}.log"
    logger = log if isinstance(log, logging.Logger) else LOGGER
    body: list[str] = []
    nav: list[tuple[str, str]] = []
    try:
        _sections(rep, raw, label, settings, methods_text, body, nav)
    except Exception as exc:  # noqa: BLE001 - a report never fails the run
        rep.problems.append(f"report: {type(exc).__name__}: {exc}")
        rep.tracebacks.append(f"--- report\n{traceback.format_exc()}")
    try:
        body.append(errors_section(rep, log, log_path))
    except Exception as exc:  # noqa: BLE001
        rep.tracebacks.append(f"--- errors section\n{traceback.format_exc()}")
        body.append(
            f'<section id="errors"><h2>Errors</h2><p class="error">{esc(exc)}</p></section>'
        )
    nav.append(("errors", "Errors"))
    try:
        html = page(
            f"sub-{esc(label)}",
            f"sub-{esc(label)}",
            f"qsmprep {esc(__version__)} report",
            body,
            nav,
        )
        write_text_atomic(page_path, html)
    except Exception:  # noqa: BLE001
        rep.tracebacks.append(f"--- writing {page_path}\n{traceback.format_exc()}")
    _write_log(rep, log_path, logger)
    return page_path
