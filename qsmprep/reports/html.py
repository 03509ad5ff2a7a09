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

import datetime as _dt
import html
import json
import logging
import os
import re
import traceback
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep import methods as registry
from qsmprep.__about__ import __version__
from qsmprep.reports.collect import (
    AcquisitionFiles,
    SubjectFiles,
    find_subject_files,
    load_volume,
    parse_name,
    read_sidecar,
    read_tsv,
    sidecar_value,
    subject_label,
    to_float,
)
from qsmprep.reports.methods import methods_text as _methods_text
from qsmprep.reports.space import space_section

__all__ = ["build_subject_report", "load_settings", "write_text_atomic"]

LOGGER = logging.getLogger("qsmprep.reports")

#: Preferred order of methods on the page (others follow alphabetically): the classical
#: inversions in the registry's order.
_METHOD_ORDER = registry.view("inversion", kind="classical")
#: Units of metric columns, shown in the table header.
METRIC_UNITS = {"nrmse": "%", "hfen": "%", "psnr": "dB", "dc_residual": "%"}

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


# --------------------------------------------------------------------------------------------
# small helpers


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


def _key(d: Mapping, name: str):
    """``d[name]`` with a case-insensitive key (``None`` when absent)."""
    for k, v in d.items():
        if k.lower() == name.lower():
            return v
    return None


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x, digits: int = 4) -> str:
    value = to_float(x)
    if value is None:
        return _esc(x)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def method_order(methods, preferred=()) -> list[str]:
    """``methods`` in page order: ``preferred`` first, then the usual order, then A to Z."""
    order = [m for m in preferred if m in methods]
    order += [m for m in _METHOD_ORDER if m in methods and m not in order]
    order += sorted(m for m in methods if m not in order)
    return order


class _Report:
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
        return Path(os.path.relpath(path, self.output_dir)).as_posix()

    def figure(self, path: Path | None, caption: str, alt: str) -> str:
        if path is None or not Path(path).is_file():
            return f'<p class="note">Figure not available: {_esc(alt)} (see Errors).</p>'
        return (
            f'<figure><img src="{_esc(self.rel(path))}" alt="{_esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )


# --------------------------------------------------------------------------------------------
# raw inputs (for the input summary and the mask background)


def _source_paths(sources, output_dir: Path, settings: Mapping) -> list[Path]:
    """Existing files named by a sidecar's ``Sources`` (BIDS URIs or dataset-relative)."""
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list):
        return []
    roots: dict[str, Path] = {}
    desc = read_sidecar(output_dir / "dataset_description.json")
    for name, link in (desc.get("DatasetLinks") or {}).items():
        if isinstance(link, str) and not link.startswith(("http:", "https:", "doi:")):
            roots[name] = Path(link.removeprefix("file://"))
    base = []
    if settings.get("bids_dir"):
        base.append(Path(settings["bids_dir"]))
    base += [*roots.values(), output_dir.parent.parent, output_dir.parent]
    out = []
    for src in sources:
        if not isinstance(src, str):
            continue
        candidates = []
        match = re.match(r"^bids:([^:]*):(.*)$", src)
        if match:
            name, rel = match.groups()
            if name in roots:
                candidates.append(roots[name] / rel)
            candidates += [b / rel for b in base]
        elif os.path.isabs(src):
            candidates.append(Path(src))
        else:
            candidates += [b / src for b in base]
            if "/" not in src:  # a bare file name: its place in a BIDS dataset
                ents, _ = parse_name(src)
                if "sub" in ents:
                    ses = f"ses-{ents['ses']}/" if "ses" in ents else ""
                    rel = f"sub-{ents['sub']}/{ses}anat/{src}"
                    candidates += [b / rel for b in base]
        for cand in candidates:
            if cand.is_file():
                out.append(cand)
                break
    return out


def _first_echo(paths: list[Path]) -> tuple[Path | None, Path | None]:
    """The first-echo magnitude and phase among raw input files."""
    best: dict[str, tuple[int, Path]] = {}
    for p in paths:
        if not p.name.endswith((".nii", ".nii.gz")):
            continue
        ents, suffix = parse_name(p.name)
        part = ents.get("part") or {"phase": "phase", "magnitude": "mag"}.get(suffix)
        if part not in ("mag", "phase"):
            continue
        try:
            echo = int(ents.get("echo", 1))
        except ValueError:
            echo = 1
        if part not in best or echo < best[part][0]:
            best[part] = (echo, p)
    return (best.get("mag", (0, None))[1], best.get("phase", (0, None))[1])


# --------------------------------------------------------------------------------------------
# one acquisition


def _reference_path(acq: AcquisitionFiles, files: SubjectFiles, output_dir, settings, metrics):
    """The reference Chimap of an acquisition: named in its metrics table, else the settings'
    reference, else the COSMOS map of its session (``None`` when the table says ``none``)."""
    names = {r.get("reference", "") for r in metrics[1]} if metrics else set()
    names = {n for n in names if n and n.lower() not in ("none", "n/a")}
    if metrics and not names and "reference" in metrics[0]:
        return None
    setting = settings.get("reference")
    for name in sorted(names):
        cand = [Path(name), Path(output_dir) / name]
        if setting and Path(setting).name == Path(name).name:
            cand.append(Path(setting))
        cos = files.cosmos.get(acq.session)
        if cos is not None and cos.name == Path(name).name:
            cand.append(cos)
        cand += sorted(files.root.rglob(Path(name).name))
        for c in cand:
            if c.is_file():
                return c
    if setting and Path(setting).is_file():
        return Path(setting)
    return files.cosmos.get(acq.session)


def _inputs_table(acq, sidecars, grid_img, raw_files) -> str:
    rows = []
    te = sidecar_value(sidecars, "EchoTime", "EchoTimes", "echo_times")
    if te is not None:
        tes = te if isinstance(te, list) else [te]
        ms = [f"{1e3 * float(t):.2f}" for t in tes if to_float(t) is not None]
        n = len(ms)
        rows.append(
            ("Echo times (ms)", _esc(", ".join(ms)) + f" ({n} echo{'es' if n != 1 else ''})")
        )
    b0 = sidecar_value(sidecars, "B0", "MagneticFieldStrength", "b0", "FieldStrength")
    if b0 is not None:
        rows.append(("Field strength B0 (T)", _fmt(b0)))
    if grid_img is not None:
        zooms = grid_img.header.get_zooms()[:3]
        rows.append(("Voxel size (mm)", " x ".join(f"{float(z):.3g}" for z in zooms)))
        rows.append(("Matrix", " x ".join(str(int(n)) for n in grid_img.shape[:3])))
        rows.append(("Orientation", "".join(nib.aff2axcodes(grid_img.affine))))
    b0dir = sidecar_value(sidecars, "B0Direction", "b0_dir", "B0Dir")
    if b0dir is None and grid_img is not None:
        try:
            from qsmprep.recon.kernels import b0_dir_from_affine

            b0dir = [float(v) for v in b0_dir_from_affine(grid_img.affine)]
        except Exception:  # noqa: BLE001 - informative only
            b0dir = None
    if isinstance(b0dir, list | tuple):
        rows.append(("B0 direction (voxel axes)", ", ".join(f"{float(v):+.3f}" for v in b0dir)))
    units = sidecar_value(sidecars, "PhaseUnits", "phase_units", "PhaseUnit", "InputPhaseUnits")
    if units is not None:
        rows.append(("Phase units (input)", _esc(units)))
    conv = sidecar_value(sidecars, "PhaseConversion", "phase_conversion")
    if conv is not None:
        rows.append(("Phase conversion", _esc(conv)))
    sign = sidecar_value(sidecars, "PhaseSign", "phase_sign")
    if sign is not None:
        rows.append(("Phase sign", _esc(sign)))
    sources = sidecar_value(sidecars, "Sources", "RawSources")
    if isinstance(sources, list) and sources:
        suffixes = sorted({parse_name(str(s))[1] for s in sources if ".nii" in str(s)} - {""})
        rows.append(
            ("Input files", f"{len(sources)}" + (f" ({', '.join(suffixes)})" if suffixes else ""))
        )
        rows.append(("Inputs found for display", "yes" if raw_files else "no"))
    if acq.chimaps:
        rows.append(("Susceptibility maps", _esc(", ".join(method_order(acq.chimaps)))))
    return _table(rows) if rows else '<p class="note">No sidecar information found.</p>'


def _metrics_table(columns, rows) -> str:
    if not rows:
        return '<p class="note">The metrics table is empty.</p>'
    head = "".join(
        f"<th>{_esc(c)}{' (' + METRIC_UNITS[c] + ')' if c in METRIC_UNITS else ''}</th>"
        for c in columns
    )
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "n/a")
            num = to_float(v) is not None
            cells.append(f'<td class="num">{_fmt(v)}</td>' if num else f"<td>{_esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _acquisition_section(rep: _Report, acq, files, settings, preferred) -> tuple[str, dict]:
    from qsmprep.reports import figures as F

    out = [f'<section id="{_esc(acq.prefix)}"><h2>{_esc(acq.prefix)}</h2>']
    info: dict = {"params": {}}
    sidecars = [read_sidecar(p) for p in acq.sidecars()]
    te = sidecar_value(sidecars, "EchoTime", "EchoTimes", "echo_times")
    if te is not None:
        info["echoes"] = len(te) if isinstance(te, list) else 1
    for method, path in acq.chimaps.items():
        side = read_sidecar(path)
        if isinstance(_key(side, "Parameters"), dict):
            info["params"][method] = _key(side, "Parameters")
    local_side = read_sidecar(acq.fields["local"]) if "local" in acq.fields else {}
    bg = _key(local_side, "Method") or _key(local_side, "BackgroundMethod")
    if isinstance(bg, str) and isinstance(_key(local_side, "Parameters"), dict):
        info["params"][bg] = _key(local_side, "Parameters")

    # grid and masks
    grid_path = acq.any_image()
    grid_img = (
        rep.attempt(f"{acq.prefix}: read image header", nib.load, str(grid_path))
        if grid_path
        else None
    )
    brain = local = None
    vs = None
    if "brain" in acq.masks:
        loaded = rep.attempt(f"{acq.prefix}: read brain mask", load_volume, acq.masks["brain"])
        if loaded is not None:
            brain, vs, _ = loaded
            brain = brain > 0
    if "local" in acq.masks:
        loaded = rep.attempt(f"{acq.prefix}: read local mask", load_volume, acq.masks["local"])
        if loaded is not None:
            local, vs_l, _ = loaded
            local = local > 0
            vs = vs or vs_l
            if brain is not None and local.shape != brain.shape:
                rep.problems.append(f"{acq.prefix}: local mask and brain mask differ in shape")
                local = None
    eval_mask = local if local is not None and local.any() else brain

    # raw inputs (first echo), via the sidecars' Sources
    sources = sidecar_value(sidecars, "Sources", "RawSources")
    raw = _source_paths(sources, rep.output_dir, settings) if sources else []
    mag_path, phase_path = _first_echo(raw)
    mag = phase = None
    if mag_path is not None:
        loaded = rep.attempt(f"{acq.prefix}: read {mag_path.name}", load_volume, mag_path)
        mag, vs_m = (loaded[0], loaded[1]) if loaded else (None, None)
        vs = vs or vs_m
    if phase_path is not None:
        loaded = rep.attempt(f"{acq.prefix}: read {phase_path.name}", load_volume, phase_path)
        phase, vs_p = (loaded[0], loaded[1]) if loaded else (None, None)
        vs = vs or vs_p

    out.append("<h3>Inputs</h3>")
    out.append(
        rep.attempt(f"{acq.prefix}: inputs table", _inputs_table, acq, sidecars, grid_img, raw)
        or ""
    )
    if mag is not None or phase is not None:
        center = F.View.from_mask(brain, vs).center if brain is not None else None
        view = F.View.full((mag if mag is not None else phase).shape, vs, center)
        units = str(sidecar_value(sidecars, "PhaseUnits", "phase_units") or "rad")
        if phase is not None and units != "rad" and np.abs(phase).max() <= 3.2:
            units = "rad"  # a converted copy
        fig = rep.attempt(
            f"{acq.prefix}: input figure",
            F.input_summary_figure,
            mag,
            phase,
            view,
            rep.figdir / f"{acq.prefix}_desc-inputs_summary.png",
            phase_units="rad" if units == "rad" else units,
        )
        out.append(
            rep.figure(
                fig, "First echo: magnitude and phase (whole field of view).", "input summary"
            )
        )
    else:
        out.append(
            '<p class="note">The raw inputs named in the sidecars\' <code>Sources</code> were '
            "not found (is the BIDS directory available?), so the input images are not shown."
            "</p>"
        )

    # masks
    out.append("<h3>Brain mask</h3>")
    if brain is not None:
        view = F.View.from_mask(brain, vs)
        background = mag if mag is not None and mag.shape == brain.shape else None
        fig = rep.attempt(
            f"{acq.prefix}: mask figure",
            F.mask_overlay_figure,
            background,
            brain,
            view,
            rep.figdir / f"{acq.prefix}_desc-mask_overlay.png",
            local_mask=local,
        )
        out.append(
            rep.figure(
                fig,
                "Brain mask (red) and the mask where the local field and "
                "susceptibility are valid (cyan).",
                "mask overlay",
            )
        )
        voxel_ml = float(np.prod(vs)) / 1000.0
        rows = [("Brain mask volume (ml)", f"{brain.sum() * voxel_ml:.1f}")]
        if local is not None:
            frac = 100.0 * local.sum() / max(int(brain.sum()), 1)
            rows.append(
                (
                    "Local-field mask volume (ml)",
                    f"{local.sum() * voxel_ml:.1f} ({frac:.0f}% of the brain mask)",
                )
            )
        out.append(_table(rows))
    else:
        what = "could not be read (see Errors)" if "brain" in acq.masks else "was not found"
        out.append(f'<p class="error">The brain mask of this acquisition {what}.</p>')
        view = F.View.from_mask(local, vs) if local is not None else None

    # fields
    out.append("<h3>Field maps</h3>")
    fields = {}
    for name in ("total", "local", "noise"):
        if name in acq.fields:
            loaded = rep.attempt(f"{acq.prefix}: read {name} field", load_volume, acq.fields[name])
            if loaded is not None and (brain is None or loaded[0].shape == brain.shape):
                fields[name] = loaded[0]
                vs = vs or loaded[1]
            elif loaded is not None:
                rep.problems.append(
                    f"{acq.prefix}: {name} field map has another grid than the mask"
                )
    if fields:
        if view is None:
            view = F.View.full(next(iter(fields.values())).shape, vs)
        fig = rep.attempt(
            f"{acq.prefix}: field figure",
            F.field_maps_figure,
            fields,
            view,
            rep.figdir / f"{acq.prefix}_desc-fields_fieldmap.png",
            mask={"total": brain, "local": eval_mask, "noise": brain},
        )
        out.append(
            rep.figure(
                fig,
                "Total field (in the brain mask), local field after background "
                "removal and field noise standard deviation, in Hz; "
                "symmetric colour scale at the 99th percentile of |f|.",
                "field maps",
            )
        )
        if bg:
            out.append(f"<p>Background removal: <b>{_esc(bg)}</b>.</p>")
    else:
        out.append('<p class="note">No field maps were found.</p>')

    # susceptibility maps
    chis = {}
    for method in method_order(acq.chimaps, preferred):
        loaded = rep.attempt(
            f"{acq.prefix}: read {method} Chimap", load_volume, acq.chimaps[method]
        )
        if loaded is None:
            continue
        if brain is not None and loaded[0].shape != brain.shape:
            rep.problems.append(f"{acq.prefix}: {method} Chimap has another grid than the mask")
            continue
        chis[method] = loaded[0]
        vs = vs or loaded[1]
    metrics = None
    if acq.metrics_tsv is not None:
        metrics = rep.attempt(f"{acq.prefix}: read metrics table", read_tsv, acq.metrics_tsv)
    ref_path = rep.attempt(
        f"{acq.prefix}: find reference",
        _reference_path,
        acq,
        files,
        rep.output_dir,
        settings,
        metrics,
    )
    ref = None
    if ref_path is not None:
        loaded = rep.attempt(
            f"{acq.prefix}: read reference {ref_path.name}", load_volume, ref_path
        )
        if loaded is not None:
            shape = (
                brain.shape if brain is not None else next(iter(chis.values()), loaded[0]).shape
            )
            if loaded[0].shape == shape:
                ref = loaded[0]
            else:
                rep.problems.append(
                    f"{acq.prefix}: reference {ref_path.name} is on another grid "
                    f"{loaded[0].shape} than the acquisition {shape}; no comparison"
                )
    info["reference"] = ref_path.name if ref is not None else None
    info["phase_units"] = sidecar_value(sidecars, "PhaseUnits", "phase_units")
    out.append("<h3>Susceptibility maps</h3>")
    if chis and vs is not None:
        if view is None:
            view = F.View.full(next(iter(chis.values())).shape, vs)
        vols = list(chis.values()) + ([ref] if ref is not None else [])
        vmax = F.common_scale(vols, eval_mask)
        out.append(
            f"<p>All maps on one grey scale, [-{vmax:.3g}, {vmax:.3g}] ppm (99th percentile of "
            "|chi| over all maps in the local-field mask); black is outside the mask.</p>"
        )
        for method, chi in chis.items():
            fig = rep.attempt(
                f"{acq.prefix}: {method} mosaic",
                F.chi_mosaic_figure,
                chi,
                view,
                rep.figdir / f"{acq.prefix}_desc-{method}_mosaic.png",
                vmax=vmax,
                title=method.upper(),
                mask=eval_mask,
            )
            out.append(
                rep.figure(
                    fig,
                    f"<b>{_esc(method)}</b> ({_esc(acq.chimaps[method].name)})",
                    f"{method} susceptibility map",
                )
            )
        if ref is not None:
            fig = rep.attempt(
                f"{acq.prefix}: reference mosaic",
                F.chi_mosaic_figure,
                ref,
                view,
                rep.figdir / f"{acq.prefix}_desc-reference_mosaic.png",
                vmax=vmax,
                title="reference",
                mask=eval_mask,
            )
            out.append(
                rep.figure(
                    fig,
                    f"<b>Reference</b> ({_esc(ref_path.name)})",
                    "reference susceptibility map",
                )
            )

        # comparison with the reference
        out.append("<h3>Comparison with the reference</h3>")
        if ref is not None and eval_mask is not None and eval_mask.any():
            diff_max = F.common_scale([c - ref for c in chis.values()], eval_mask)
            out.append(
                f"<p>Reference: <code>{_esc(ref_path.name)}</code>. Differences (method - "
                f"reference) on one scale, [-{diff_max:.3g}, {diff_max:.3g}] ppm; scatter plots "
                "over the local-field mask with the identity (dashed) and the least-squares line "
                "(method = slope x reference + intercept).</p>"
            )
            for method, chi in chis.items():
                res = rep.attempt(
                    f"{acq.prefix}: {method} comparison",
                    F.comparison_figure,
                    chi,
                    ref,
                    view,
                    rep.figdir / f"{acq.prefix}_desc-{method}_comparison.png",
                    mask=eval_mask,
                    diff_vmax=diff_max,
                    chi_vmax=vmax,
                    title=method.upper(),
                    reference_name="reference",
                )
                fig, slope = res if res is not None else (None, float("nan"))
                out.append(
                    rep.figure(
                        fig,
                        f"<b>{_esc(method)}</b> - reference; slope {slope:.3f}",
                        f"{method} comparison",
                    )
                )
        else:
            out.append(
                '<p class="note">No reference map: differences and scatter plots are not '
                "shown (give <code>--reference</code>, or acquire several head "
                "orientations for COSMOS).</p>"
            )
    else:
        out.append('<p class="error">No susceptibility map was found for this acquisition.</p>')

    # relaxation maps
    if "R2starmap" in acq.relaxation:
        out.append("<h3>R2* map</h3>")
        r2path = acq.relaxation["R2starmap"]
        loaded = rep.attempt(f"{acq.prefix}: read R2* map", load_volume, r2path)
        r2side = read_sidecar(r2path)
        info["r2star_method"] = _key(r2side, "Method")
        if loaded is not None and (brain is None or loaded[0].shape == brain.shape):
            r2 = loaded[0]
            if view is None:
                view = F.View.full(r2.shape, vs or loaded[1])
            fig = rep.attempt(
                f"{acq.prefix}: R2* mosaic",
                F.r2star_mosaic_figure,
                r2,
                view,
                rep.figdir / f"{acq.prefix}_desc-r2star_mosaic.png",
                mask=brain,
            )
            out.append(
                rep.figure(
                    fig,
                    f"<b>R2*</b> ({_esc(r2path.name)}), 1/s, in the brain mask; scale 0 to the "
                    "99th percentile.",
                    "R2* map",
                )
            )
            rows = []
            if brain is not None and brain.any():
                rows.append(("Median R2* in the brain mask (1/s)", f"{np.median(r2[brain]):.1f}"))
            rows.append(("Method", _esc(_key(r2side, "Method") or "n/a")))
            rng = _key(r2side, "R2starRange")
            low, high = _key(r2side, "ClippedLowVoxels"), _key(r2side, "ClippedHighVoxels")
            if rng is not None:
                rows.append(
                    (
                        "Clipped to the range (1/s)",
                        f"{_esc(rng)}: {_esc(low)} voxel(s) below, {_esc(high)} above",
                    )
                )
            out.append(_table(rows))
        elif loaded is not None:
            rep.problems.append(f"{acq.prefix}: R2* map has another grid than the mask")
    out.append(rep.attempt(f"{acq.prefix}: SWI section", _swi_section, rep, acq, brain, vs) or "")

    # metrics
    out.append("<h3>Metrics</h3>")
    if metrics is not None:
        out.append(rep.attempt(f"{acq.prefix}: metrics table", _metrics_table, *metrics) or "")
        out.append(
            "<p>NRMSE, HFEN (%), SSIM, XSIM, PSNR (dB), slope and correlation compare each map "
            "with the reference (n/a without one); dc_residual (%) is the reference-free data "
            "consistency 100 ||M (D chi - f)|| / ||M f||.</p>"
        )
    else:
        out.append('<p class="note">No metrics table (<code>_metrics.tsv</code>) was found.</p>')
    out.append(
        rep.attempt(
            f"{acq.prefix}: template space", space_section, rep.output_dir, acq.prefix, rep.rel
        )
        or ""
    )
    missing = [m for m in (settings.get("methods") or []) if m not in acq.chimaps]
    if missing:
        rep.problems.append(f"{acq.prefix}: no Chimap for {', '.join(missing)}")
    out.append("</section>")
    return "\n".join(out), info


_SWI_TITLES = {
    "swi": ("SWI", "susceptibility-weighted image: combined magnitude times the phase mask"),
    "minip": ("minIP", "minimum intensity projection of the SWI over sliding slabs"),
    "smwipara": ("SMWI para", "magnitude weighted by the paramagnetic susceptibility mask"),
    "smwidia": ("SMWI dia", "magnitude weighted by the diamagnetic susceptibility mask"),
}


def _swi_section(rep: _Report, acq, brain, vs) -> str:
    """Mosaics of the SWI, its minIP and the SMWI, with their parameters."""
    from qsmprep.reports import figures as F

    if not acq.swi:
        return ""
    out = ["<h3>Susceptibility-weighted images</h3>"]
    center = F.View.from_mask(brain, vs).center if brain is not None and vs else None
    for desc, (title, text) in _SWI_TITLES.items():
        path = acq.swi.get(desc)
        if path is None:
            continue
        loaded = rep.attempt(f"{acq.prefix}: read {path.name}", load_volume, path)
        if loaded is None:
            continue
        vol, vs_i, _ = loaded
        # the minIP has fewer slices than the SWI: centre its planes by the fraction
        c = None
        if center is not None and brain is not None:
            c = tuple(
                min(int(round(ci * n / nb)), n - 1)
                for ci, n, nb in zip(center, vol.shape, brain.shape, strict=True)
            )
        view = F.View.full(vol.shape, vs_i, c)
        fig = rep.attempt(
            f"{acq.prefix}: {desc} mosaic",
            F.weighted_mosaic_figure,
            vol,
            view,
            rep.figdir / f"{acq.prefix}_desc-{desc}_mosaic.png",
            title=title,
        )
        side = read_sidecar(path)
        params = _key(side, "Parameters")
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in params.items()) if params else ""
        extra = (
            f" from the {_esc(side['SusceptibilityMethod'])} map"
            if side.get("SusceptibilityMethod")
            else ""
        )
        caption = f"<b>{_esc(title)}</b> ({_esc(path.name)}): {_esc(text)}{extra}" + (
            f"; {shown}" if shown else ""
        )
        out.append(rep.figure(fig, caption, f"{title} mosaic"))
    return "\n".join(out)


def _cosmos_section(rep: _Report, files: SubjectFiles) -> str:
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
        what = f" (session {_esc(ses)})" if ses else ""
        out.append(
            rep.figure(
                fig,
                f"COSMOS map{what} from several head orientations, "
                f"<code>{_esc(path.name)}</code>, [-{vmax:.3g}, {vmax:.3g}] ppm.",
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


def _errors_section(rep: _Report, log, log_path: Path) -> str:
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
            f'<p class="error">{"<b>" + _esc(what) + "</b>: " if what else ""}{_esc(shown)}</p>'
        )
    for path in crash:
        out.append(
            f'<details><summary class="error">Crash log <code>{_esc(rep.rel(path))}</code>'
            f"</summary><pre>{_esc(_tail(path))}</pre></details>"
        )
    if rep.problems:
        out.append("<p>Problems met while building this report:</p><ul>")
        out += [f"<li>{_esc(p)}</li>" for p in rep.problems]
        out.append("</ul>")
        if rep.tracebacks:
            out.append(f"<p>Tracebacks: <code>{_esc(rep.rel(log_path))}</code></p>")
    out.append("</section>")
    return "\n".join(out)


def _methods_section(text) -> str:
    out = ['<section id="methods"><h2>Methods</h2>']
    if isinstance(text, str):
        paragraph, refs = text, []
        if "\n\nReferences\n" in text:
            paragraph, _, tail = text.partition("\n\nReferences\n")
            refs = [re.sub(r"^\[\d+\]\s*", "", r) for r in tail.splitlines() if r.strip()]
    else:
        paragraph, refs = text.paragraph, text.references
    out.append(f"<p>{_esc(paragraph)}</p>")
    if refs:
        out.append('<h3>References</h3><ol class="refs">')
        out += [f"<li>{_esc(r)}</li>" for r in refs]
        out.append("</ol>")
    out.append("</section>")
    return "\n".join(out)


def _page(label: str, body: list[str], nav: list[tuple[str, str]]) -> str:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    links = "".join(f'<a href="#{_esc(a)}">{_esc(t)}</a>' for a, t in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>qsmprep: sub-{_esc(label)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>sub-{_esc(label)}</h1><p>qsmprep {_esc(__version__)} report, "
        f"generated {now}</p></header><nav>{links}</nav><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


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
    rep = _Report(output_dir, label)
    page_path = output_dir / f"sub-{label}.html"
    log_path = output_dir / "logs" / f"report-sub-{label}.log"
    logger = log if isinstance(log, logging.Logger) else LOGGER
    body: list[str] = []
    nav: list[tuple[str, str]] = []
    try:
        subject_label(raw)  # a clear error for a malformed label
        s = load_settings(output_dir, settings)
        files = find_subject_files(output_dir, label)
        preferred = list(s.get("methods") or [])
        summary = ['<section id="summary"><h2>Summary</h2>']
        if not files.acquisitions and not files.cosmos:
            summary.append(
                f'<p class="error">No derivatives were found under '
                f"<code>{_esc(rep.rel(files.root))}</code>.</p>"
            )
        rows = []
        for acq in files.acquisitions:
            n = len(acq.chimaps)
            rows.append(
                (
                    acq.prefix,
                    f'<a href="#{_esc(acq.prefix)}">{n} susceptibility '
                    f"map{'s' if n != 1 else ''}</a>",
                )
            )
        if files.cosmos:
            rows.append(("COSMOS", f'<a href="#cosmos">{len(files.cosmos)} map(s)</a>'))
        if rows:
            summary.append(_table(rows))
        summary.append("</section>")
        body.append("\n".join(summary))
        nav.append(("summary", "Summary"))
        params: dict = {}
        references = set()
        units = set()
        echo_counts = set()
        r2star_methods: set[str] = set()
        for acq in files.acquisitions:
            res = rep.attempt(
                f"{acq.prefix}: section", _acquisition_section, rep, acq, files, s, preferred
            )
            if res is None:
                body.append(
                    f'<section id="{_esc(acq.prefix)}"><h2>{_esc(acq.prefix)}</h2>'
                    '<p class="error">This section could not be rendered.</p></section>'
                )
            else:
                body.append(res[0])
                for k, v in res[1]["params"].items():
                    params.setdefault(k, v)
                if isinstance(res[1].get("phase_units"), str):
                    units.add(res[1]["phase_units"])
                if res[1].get("reference"):
                    references.add(res[1]["reference"])
                if isinstance(res[1].get("echoes"), int):
                    echo_counts.add(res[1]["echoes"])
                if isinstance(res[1].get("r2star_method"), str):
                    r2star_methods.add(res[1]["r2star_method"])
            nav.append((acq.prefix, acq.prefix))
        cos = rep.attempt("COSMOS section", _cosmos_section, rep, files)
        if cos:
            body.append(cos)
            nav.append(("cosmos", "COSMOS"))
        if methods_text is None:
            ms = _merge_params(s, params)
            ms.setdefault("phase_units", sorted(units))
            ms.setdefault("echo_counts", sorted(echo_counts))
            ms.setdefault("r2star_methods", sorted(r2star_methods))
            if not ms.get("reference") and len(references) == 1 and not files.cosmos:
                ms["reference"] = next(iter(references))
            text = rep.attempt("methods paragraph", _methods_text, ms, cosmos=bool(files.cosmos))
        else:
            text = str(methods_text)
        if text is not None:
            body.append(_methods_section(text))
            nav.append(("methods", "Methods"))
    except Exception as exc:  # noqa: BLE001 - a report never fails the run
        rep.problems.append(f"report: {type(exc).__name__}: {exc}")
        rep.tracebacks.append(f"--- report\n{traceback.format_exc()}")
    try:
        body.append(_errors_section(rep, log, log_path))
    except Exception as exc:  # noqa: BLE001
        rep.tracebacks.append(f"--- errors section\n{traceback.format_exc()}")
        body.append(
            f'<section id="errors"><h2>Errors</h2><p class="error">{_esc(exc)}</p></section>'
        )
    nav.append(("errors", "Errors"))
    try:
        write_text_atomic(page_path, _page(label, body, nav))
    except Exception:  # noqa: BLE001
        rep.tracebacks.append(f"--- writing {page_path}\n{traceback.format_exc()}")
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
    return page_path
