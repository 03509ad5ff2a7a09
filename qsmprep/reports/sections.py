"""Sections of a subject page besides the acquisitions: COSMOS, methods and errors."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from qsmprep.reports.collect import SubjectFiles, load_volume
from qsmprep.reports.markup import Report, esc

__all__ = ["cosmos_section", "errors_section", "methods_section"]


def cosmos_section(rep: Report, files: SubjectFiles) -> str:
    from qsmprep.reports import figures as F

    if not files.cosmos:
        return ""
    out = ['<section id="cosmos"><h2>COSMOS</h2>']
    for ses, path in sorted(files.cosmos.items(), key=lambda kv: str(kv[0])):
        loaded = rep.attempt(f"read {path.name}", load_volume, path)
        if loaded is None:
            continue
        chi, vs, _ = loaded
        mask = chi != 0
        view = F.View.from_mask(mask, vs)
        vmax = F.common_scale([chi], mask)
        stem = path.name.split("_desc-")[0]
        fig = rep.attempt(
            f"{path.name} mosaic",
            F.chi_mosaic_figure,
            chi,
            view,
            rep.figdir / f"{stem}_desc-cosmos_mosaic.png",
            vmax=vmax,
            title="COSMOS",
            mask=mask if mask.any() else None,
        )
        what = f" (session {esc(ses)})" if ses else ""
        out.append(
            rep.figure(
                fig,
                f"COSMOS map{what} from several head orientations, "
                f"<code>{esc(path.name)}</code>, [-{vmax:.3g}, {vmax:.3g}] ppm.",
                "COSMOS map",
            )
        )
    out.append("</section>")
    return "\n".join(out)


def _crash_logs(output_dir: Path, label: str) -> list[Path]:
    logs = output_dir / "logs"
    if not logs.is_dir():
        return []
    own = f"report-sub-{label}"
    pat = re.compile(rf"(^|[^A-Za-z0-9])sub-{re.escape(label)}([^A-Za-z0-9]|$)")
    return sorted(
        p
        for p in logs.rglob("*")
        if p.is_file() and pat.search(p.name) and not p.name.startswith(own)
    )


def _tail(path: Path, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return ""
    return "".join(lines[-n:])


def _log_entries(log) -> list[tuple[str, str]]:
    """``(what, message or path)`` pairs from the ``log`` argument."""
    if log is None or isinstance(log, logging.Logger):
        return []
    if isinstance(log, Mapping):
        return [(str(k), str(v)) for k, v in log.items()]
    if isinstance(log, str | os.PathLike):
        return [("", str(log))]
    return [("", str(v)) for v in log]


def errors_section(rep: Report, log, log_path: Path) -> str:
    out = ['<section id="errors"><h2>Errors</h2>']
    entries = _log_entries(log)
    crash = _crash_logs(rep.output_dir, rep.label)
    if not (entries or crash or rep.problems):
        out.append('<p class="ok">No errors were recorded for this subject.</p></section>')
        return "\n".join(out)
    for what, msg in entries:
        path = Path(msg)
        shown = rep.rel(path) if path.is_absolute() and path.is_file() else msg
        out.append(
            f'<p class="error">{"<b>" + esc(what) + "</b>: " if what else ""}{esc(shown)}</p>'
        )
    for path in crash:
        out.append(
            f'<details><summary class="error">Crash log <code>{esc(rep.rel(path))}</code>'
            f"</summary><pre>{esc(_tail(path))}</pre></details>"
        )
    if rep.problems:
        out.append("<p>Problems met while building this report:</p><ul>")
        out += [f"<li>{esc(p)}</li>" for p in rep.problems]
        out.append("</ul>")
        if rep.tracebacks:
            out.append(f"<p>Tracebacks: <code>{esc(rep.rel(log_path))}</code></p>")
    out.append("</section>")
    return "\n".join(out)


def methods_section(text) -> str:
    out = ['<section id="methods"><h2>Methods</h2>']
    if isinstance(text, str):
        paragraph, refs = text, []
        if "\n\nReferences\n" in text:
            paragraph, _, tail = text.partition("\n\nReferences\n")
            refs = [re.sub(r"^\[\d+\]\s*", "", r) for r in tail.splitlines() if r.strip()]
    else:
        paragraph, refs = text.paragraph, text.references
    out.append(f"<p>{esc(paragraph)}</p>")
    if refs:
        out.append('<h3>References</h3><ol class="refs">')
        out += [f"<li>{esc(r)}</li>" for r in refs]
        out.append("</ol>")
    out.append("</section>")
    return "\n".join(out)
