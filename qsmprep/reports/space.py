"""Template-space parts of the reports: registration figure, ROI tables, group ROI summary.

Everything here reads the derivatives on disk, like the rest of :mod:`qsmprep.reports`::

    sub-<label>/figures/<prefix>_space-<tpl>_desc-registration_overlay.png
    sub-<label>[/ses-<label>]/anat/<prefix>_from-<native>_to-<tpl>_mode-image_xfm.json   (Dice)
    sub-<label>[/ses-<label>]/anat/<prefix>_desc-<method>_roistats.tsv (+ .json)
    sub-<label>[/ses-<label>]/anat/<prefix>_desc-r2star_roistats.tsv (+ .json)      (R2*, 1/s)

The registration figure shows the template's edges (Canny, red) over the magnitude resampled
into the template: edges that follow the warped anatomy (brain outline, ventricles, deep grey
nuclei) show a good registration.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep._atomic import write_text
from qsmprep.reports.collect import parse_name, read_sidecar, read_tsv, to_float
from qsmprep.reports.markup import esc

__all__ = [
    "collect_roistats",
    "group_roistats_section",
    "registration_figure",
    "space_section",
]

_ID_COLUMNS = ("subject", "session", "acq", "rec", "run")
R2STAR_DESC = "r2star"
"""``desc`` of the R2* ROI table (the others are named after their inversion method)."""
_ENTITY_OF = {"subject": "sub", "session": "ses", "acq": "acq", "rec": "rec", "run": "run"}


def _canonical(path):
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32))
    return data, tuple(float(z) for z in img.header.get_zooms()[:3])


def registration_figure(warped, template, template_mask, path, *, title: str = "") -> Path:
    """Template edges (red) over the magnitude warped into the template; 3 x 3 slices.

    Parameters
    ----------
    warped, template, template_mask : path
        NIfTI images on one grid (the registration grid): the warped magnitude, the template
        T1w and its brain mask.
    path : path
        Output PNG.
    title : str
        Figure title (acquisition and template).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from skimage.feature import canny

    from qsmprep.reports.figures import View, panel_title, save_figure

    mov, vs = _canonical(warped)
    tpl, _ = _canonical(template)
    mask, _ = _canonical(template_mask)
    if mov.shape != tpl.shape:
        raise ValueError(f"warped {mov.shape} and template {tpl.shape} differ in grid")
    view = View.from_mask(mask > 0, vs, margin_mm=4.0)
    lo, hi = np.percentile(mov[mask > 0], [1, 99.5]) if (mask > 0).any() else (0.0, 1.0)
    fig = Figure(figsize=(8.0, 8.4), facecolor="white")
    FigureCanvasAgg(fig)
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.02)
    axes = fig.subplots(3, 3)
    red = ListedColormap(["#ff2a2a"])
    offsets = (-15.0, 0.0, 15.0)  # mm from the brain centre
    tnorm = tpl / max(float(np.percentile(tpl[mask > 0], 99)), 1e-6) if (mask > 0).any() else tpl
    for row, off in enumerate(offsets):
        centre = tuple(
            int(np.clip(round(c + off / v), 0, n - 1))
            for c, v, n in zip(view.center, vs, mov.shape, strict=True)
        )
        shifted = View(view.voxel_size, centre, view.box)
        planes_m = shifted.planes(mov)
        planes_t = shifted.planes(tnorm)
        for col, ((img, extent), (timg, _)) in enumerate(zip(planes_m, planes_t, strict=True)):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent)
            edges = canny(
                timg.astype(np.float64), sigma=1.0, low_threshold=0.05, high_threshold=0.15
            )
            overlay = np.ma.masked_where(~edges, edges.astype(float))
            ax.imshow(
                overlay, cmap=red, vmin=0, vmax=1, origin="lower", extent=extent,
                interpolation="nearest",
            )  # fmt: skip
            ax.set_axis_off()
            plane = ("axial", "coronal", "sagittal")[col]
            panel_title(ax, f"{plane} {off:+.0f} mm", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# subject report


def _acq_files(output_dir: Path, prefix: str):
    ents, _ = parse_name(prefix + "_x")
    sub = ents.get("sub")
    root = output_dir / f"sub-{sub}"
    figs = sorted((root / "figures").glob(f"{prefix}_space-*_desc-registration_overlay.png"))
    anat = [p for p in root.rglob(f"{prefix}_*") if "figures" not in p.parts]
    xfm = sorted(p for p in anat if p.name.endswith("_xfm.json") and "_from-" in p.name)
    roi = sorted(p for p in anat if p.name.endswith("_roistats.tsv"))
    spaces = sorted(p for p in anat if "_space-" in p.name and p.name.endswith("_Chimap.nii.gz"))
    return figs, xfm, roi, spaces


def _roi_table(roi_files, digits: int = 4) -> tuple[str, str]:
    """HTML table (ROI rows, method columns: mean +- std, n) and the provenance note."""
    by_method: dict[str, dict[str, dict]] = {}
    reference = set()
    atlases = set()
    for path in roi_files:
        ents, _ = parse_name(path.name)
        method = ents.get("desc", "?")
        _, rows = read_tsv(path)
        by_method[method] = {r["roi"]: r for r in rows}
        side = read_sidecar(path)
        if side.get("Reference"):
            reference.add(str(side["Reference"]))
        if side.get("Atlases"):
            atlases.add(f"{', '.join(map(str, side['Atlases']))} in {side.get('Template')}")
    rois = list(dict.fromkeys(r for m in by_method.values() for r in m))
    head = "".join(f"<th>{esc(m)}</th>" for m in by_method)
    lines = [f'<div class="scroll"><table><tr><th>ROI</th>{head}</tr>']
    for roi in rois:
        cells = []
        for rows in by_method.values():
            r = rows.get(roi, {})
            mean, sd = to_float(r.get("mean")), to_float(r.get("std"))
            if mean is None:
                cells.append("<td>n/a</td>")
            else:
                sd_txt = f" &plusmn; {sd:.{digits}f}" if sd is not None else ""
                cells.append(
                    f'<td class="num">{mean:.{digits}f}{sd_txt} ({esc(r.get("voxels"))})</td>'
                )
        lines.append(f"<tr><th>{esc(roi)}</th>{''.join(cells)}</tr>")
    lines.append("</table></div>")
    note = "Reference: " + ("; ".join(sorted(reference)) or "n/a") + "."
    if atlases:
        note += " Atlases: " + "; ".join(sorted(atlases)) + "."
    return "".join(lines), note


def space_section(output_dir, prefix: str, rel=None) -> str:
    """HTML of the template-space results of one acquisition ('' when it has none).

    ``rel`` maps a path to the link written in the page (default: relative to
    ``output_dir``).
    """
    output_dir = Path(output_dir)
    figs, xfm, roi, spaces = _acq_files(output_dir, prefix)
    if not (figs or xfm or roi or spaces):
        return ""
    rel = rel or (lambda p: Path(p).relative_to(output_dir).as_posix())
    out = ["<h3>Template space</h3>"]
    rows = []
    for side_path in xfm:
        side = read_sidecar(side_path)
        ents, _ = parse_name(side_path.name)
        if "Dice" in side and side.get("To", ents.get("to")) == side.get("Template"):
            rows.append(
                f"<tr><th>{esc(ents.get('to', '?'))}</th>"
                f'<td class="num">{float(side["Dice"]):.3f}</td>'
                f"<td>{esc(side.get('Transforms', ''))}</td></tr>"
            )
    if rows:
        out.append(
            "<table><tr><th>template</th><th>Dice (brain masks)</th><th>registration</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    for fig in figs:
        ents, _ = parse_name(fig.name)
        out.append(
            f'<figure><img src="{esc(rel(fig))}" alt="registration to {esc(ents.get("space"))}">'
            f"<figcaption>Registration to {esc(ents.get('space'))}: template edges (red) over "
            "the magnitude resampled into the template, slices 15 mm apart.</figcaption></figure>"
        )
    if spaces:
        names = ", ".join(f"<code>{esc(p.name)}</code>" for p in spaces)
        out.append(f"<p>Susceptibility maps in template space: {names}.</p>")
    r2star = [p for p in roi if parse_name(p.name)[0].get("desc") == R2STAR_DESC]
    roi = [p for p in roi if p not in r2star]
    if roi:
        table, note = _roi_table(roi)
        out.append(
            "<p>Atlas regions warped to this acquisition (ANTs, generic-label interpolation), "
            "intersected with the local-field mask: mean &plusmn; standard deviation of chi "
            f"(ppm) and voxel count per method. {esc(note)}</p>"
        )
        out.append(table)
    if r2star:
        table, _ = _roi_table(r2star, digits=1)
        out.append(
            "<p>R2* per atlas region, intersected with the brain mask: mean &plusmn; standard "
            "deviation (1/s) and voxel count.</p>"
        )
        out.append(table)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# group level


def collect_roistats(output_dir) -> tuple[list[str], list[dict[str, str]]]:
    """All ``*_roistats.tsv`` under ``output_dir/sub-*`` as rows with entity, method and units
    columns (``method`` is the file's ``desc``: an inversion, or ``r2star`` for R2* in 1/s)."""
    output_dir = Path(output_dir)
    rows = []
    columns = [*_ID_COLUMNS, "method", "units"]
    for sub in sorted(output_dir.glob("sub-*")):
        if not sub.is_dir():
            continue
        for path in sorted(sub.rglob("*_roistats.tsv")):
            if "figures" in path.relative_to(sub).parts:
                continue
            ents, _ = parse_name(path.name)
            ids = {c: ents.get(_ENTITY_OF[c], "n/a") for c in _ID_COLUMNS}
            cols, file_rows = read_tsv(path)
            units = str(read_sidecar(path).get("Units", "n/a"))
            for c in cols:
                if c not in columns:
                    columns.append(c)
            for r in file_rows:
                rows.append({**ids, "method": ents.get("desc", "n/a"), "units": units, **r})
    for r in rows:
        for c in columns:
            r.setdefault(c, "n/a")
    return columns, rows


def _summary_table(rows, methods, rois, digits: int) -> tuple[str, dict]:
    """HTML table (ROI rows, method columns: mean +- sd over acquisitions, n) and the values."""
    values = {
        roi: {
            m: [
                v
                for r in rows
                if r["roi"] == roi and r["method"] == m
                if (v := to_float(r.get("mean"))) is not None
            ]
            for m in methods
        }
        for roi in rois
    }
    head = "".join(f"<th>{esc(m)}</th>" for m in methods)
    table = [f'<div class="scroll"><table><tr><th>ROI</th>{head}</tr>']
    for roi in rois:
        cells = []
        for m in methods:
            vals = values[roi][m]
            if not vals:
                cells.append("<td>n/a</td>")
                continue
            mean = sum(vals) / len(vals)
            sd = (
                math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                if len(vals) > 1
                else None
            )
            sd_txt = f" &plusmn; {sd:.{digits}f}" if sd is not None else ""
            cells.append(f'<td class="num">{mean:.{digits}f}{sd_txt} (n={len(vals)})</td>')
        table.append(f"<tr><th>{esc(roi)}</th>{''.join(cells)}</tr>")
    table.append("</table></div>")
    return "".join(table), values


def group_roistats_section(output_dir, problems: list, tracebacks: list) -> list[str]:
    """Write ``group_roistats.tsv`` and return the group page's ROI section (``[]`` if none)."""
    from qsmprep.reports.figures import metric_strip_figure

    output_dir = Path(output_dir)
    columns, rows = collect_roistats(output_dir)
    if not rows:
        return []
    lines = ["\t".join(columns)] + ["\t".join(str(r.get(c, "n/a")) for c in columns) for r in rows]
    write_text(output_dir / "group_roistats.tsv", "\n".join(lines) + "\n")
    r2_rows = [r for r in rows if r["method"] == R2STAR_DESC]
    rows = [r for r in rows if r["method"] != R2STAR_DESC]
    body = ['<section id="roistats"><h2>Atlas regions</h2>']
    values = {}
    if rows:
        methods = list(dict.fromkeys(r["method"] for r in rows))
        rois = list(dict.fromkeys(r["roi"] for r in rows))
        table, values = _summary_table(rows, methods, rois, 4)
        body.append(
            "<p>Mean susceptibility (ppm) per atlas region and method: mean &plusmn; standard "
            "deviation over acquisitions (n). Table: <code>group_roistats.tsv</code>.</p>" + table
        )
    if r2_rows:
        rois = list(dict.fromkeys(r["roi"] for r in r2_rows))
        table, _ = _summary_table(r2_rows, [R2STAR_DESC], rois, 1)
        body.append(
            "<p>Mean R2* (1/s) per atlas region (brain mask): mean &plusmn; standard deviation "
            "over acquisitions (n); rows with <code>method</code> r2star and "
            "<code>units</code> 1/s in <code>group_roistats.tsv</code>.</p>" + table
        )
    body.append('<div class="plots">')
    for roi, by_method in values.items():
        path = output_dir / "figures" / f"group_desc-{roi}_roistats.png"
        try:
            metric_strip_figure(
                {k: v for k, v in by_method.items() if v}, path, metric=roi, unit="ppm"
            )
        except Exception as exc:  # noqa: BLE001 - the page is best effort
            problems.append(f"{roi} ROI plot: {type(exc).__name__}: {exc}")
            tracebacks.append(traceback.format_exc())
            continue
        body.append(
            f'<figure><img src="figures/{esc(path.name)}" alt="{esc(roi)} per method">'
            f"<figcaption>{esc(roi)}: mean chi per acquisition and method.</figcaption></figure>"
        )
    body.append("</div></section>")
    return body
