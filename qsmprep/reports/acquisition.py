"""One acquisition's section of the subject page, part by part.

:func:`acquisition_section` reads what the parts share (sidecars, masks, raw first echo,
Chimaps, reference) into an :class:`_Acquisition` and writes, in this order: the inputs
(table and first-echo figure), the brain and local-field masks, the field maps, the
susceptibility maps and their comparison with the reference, the R2* map, the SWI images
(:func:`qsmprep.reports.swi.swi_section`), the metrics table and the template-space part
(:func:`qsmprep.reports.space.space_section`). Every figure and table is drawn through
:meth:`~qsmprep.reports.markup.Report.attempt`, so one that fails leaves a note on the page
and its traceback in the report log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from qsmprep.reports.collect import (
    AcquisitionFiles,
    SubjectFiles,
    load_volume,
    parse_name,
    read_sidecar,
    read_tsv,
    sidecar_key,
    sidecar_value,
    to_float,
)
from qsmprep.reports.markup import METRIC_UNITS, Report, esc, fmt, method_order, table
from qsmprep.reports.sources import first_echo, reference_path, source_paths
from qsmprep.reports.space import space_section
from qsmprep.reports.swi import swi_section

__all__ = ["acquisition_section"]


@dataclass
class _Acquisition:
    """What the parts of one acquisition's section share; ``vs`` (voxel size) and ``view``
    are filled in by the first part that can."""

    acq: AcquisitionFiles
    sidecars: list[dict]
    brain: np.ndarray | None = None
    local: np.ndarray | None = None
    vs: tuple | None = None
    view: object = None
    mag: np.ndarray | None = None
    phase: np.ndarray | None = None
    raw: list = field(default_factory=list)
    chis: dict = field(default_factory=dict)
    ref: np.ndarray | None = None
    ref_name: str | None = None

    @property
    def eval_mask(self):
        """The local-field mask where it is non-empty, else the brain mask."""
        local = self.local
        return local if local is not None and local.any() else self.brain


# --------------------------------------------------------------------------------------------
# reading


def _recorded_params(acq) -> tuple[dict, str | None]:
    """Parameters recorded in the Chimap and local-field sidecars, and the background
    removal method."""
    params = {}
    for method, path in acq.chimaps.items():
        side = read_sidecar(path)
        if isinstance(sidecar_key(side, "Parameters"), dict):
            params[method] = sidecar_key(side, "Parameters")
    local_side = read_sidecar(acq.fields["local"]) if "local" in acq.fields else {}
    bg = sidecar_key(local_side, "Method") or sidecar_key(local_side, "BackgroundMethod")
    if isinstance(bg, str) and isinstance(sidecar_key(local_side, "Parameters"), dict):
        params[bg] = sidecar_key(local_side, "Parameters")
    return params, bg


def _read_masks(rep: Report, a: _Acquisition) -> None:
    acq = a.acq
    if "brain" in acq.masks:
        loaded = rep.attempt(f"{acq.prefix}: read brain mask", load_volume, acq.masks["brain"])
        if loaded is not None:
            brain, a.vs, _ = loaded
            a.brain = brain > 0
    if "local" in acq.masks:
        loaded = rep.attempt(f"{acq.prefix}: read local mask", load_volume, acq.masks["local"])
        if loaded is not None:
            local, vs_l, _ = loaded
            a.local = local > 0
            a.vs = a.vs or vs_l
            if a.brain is not None and a.local.shape != a.brain.shape:
                rep.problems.append(f"{acq.prefix}: local mask and brain mask differ in shape")
                a.local = None


def _read_raw(rep: Report, a: _Acquisition, settings) -> None:
    """The raw inputs (first echo), via the sidecars' ``Sources``."""
    acq = a.acq
    sources = sidecar_value(a.sidecars, "Sources", "RawSources")
    a.raw = source_paths(sources, rep.output_dir, settings) if sources else []
    mag_path, phase_path = first_echo(a.raw)
    if mag_path is not None:
        loaded = rep.attempt(f"{acq.prefix}: read {mag_path.name}", load_volume, mag_path)
        a.mag, vs_m = (loaded[0], loaded[1]) if loaded else (None, None)
        a.vs = a.vs or vs_m
    if phase_path is not None:
        loaded = rep.attempt(f"{acq.prefix}: read {phase_path.name}", load_volume, phase_path)
        a.phase, vs_p = (loaded[0], loaded[1]) if loaded else (None, None)
        a.vs = a.vs or vs_p


def _read_chimaps(rep: Report, a: _Acquisition, preferred) -> None:
    acq = a.acq
    for method in method_order(acq.chimaps, preferred):
        loaded = rep.attempt(
            f"{acq.prefix}: read {method} Chimap", load_volume, acq.chimaps[method]
        )
        if loaded is None:
            continue
        if a.brain is not None and loaded[0].shape != a.brain.shape:
            rep.problems.append(f"{acq.prefix}: {method} Chimap has another grid than the mask")
            continue
        a.chis[method] = loaded[0]
        a.vs = a.vs or loaded[1]


def _read_reference(rep: Report, a: _Acquisition, files: SubjectFiles, settings, metrics):
    acq = a.acq
    ref_path = rep.attempt(
        f"{acq.prefix}: find reference",
        reference_path,
        acq,
        files,
        rep.output_dir,
        settings,
        metrics,
    )
    if ref_path is None:
        return
    loaded = rep.attempt(f"{acq.prefix}: read reference {ref_path.name}", load_volume, ref_path)
    if loaded is None:
        return
    brain = a.brain
    shape = brain.shape if brain is not None else next(iter(a.chis.values()), loaded[0]).shape
    if loaded[0].shape == shape:
        a.ref = loaded[0]
        a.ref_name = ref_path.name
    else:
        rep.problems.append(
            f"{acq.prefix}: reference {ref_path.name} is on another grid "
            f"{loaded[0].shape} than the acquisition {shape}; no comparison"
        )


# --------------------------------------------------------------------------------------------
# the parts of the section


def _inputs_table(acq, sidecars, grid_img, raw_files) -> str:
    rows = []
    te = sidecar_value(sidecars, "EchoTime", "EchoTimes", "echo_times")
    if te is not None:
        tes = te if isinstance(te, list) else [te]
        ms = [f"{1e3 * float(t):.2f}" for t in tes if to_float(t) is not None]
        n = len(ms)
        rows.append(
            ("Echo times (ms)", esc(", ".join(ms)) + f" ({n} echo{'es' if n != 1 else ''})")
        )
    b0 = sidecar_value(sidecars, "B0", "MagneticFieldStrength", "b0", "FieldStrength")
    if b0 is not None:
        rows.append(("Field strength B0 (T)", fmt(b0)))
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
        rows.append(("Phase units (input)", esc(units)))
    conv = sidecar_value(sidecars, "PhaseConversion", "phase_conversion")
    if conv is not None:
        rows.append(("Phase conversion", esc(conv)))
    sign = sidecar_value(sidecars, "PhaseSign", "phase_sign")
    if sign is not None:
        rows.append(("Phase sign", esc(sign)))
    sources = sidecar_value(sidecars, "Sources", "RawSources")
    if isinstance(sources, list) and sources:
        suffixes = sorted({parse_name(str(s))[1] for s in sources if ".nii" in str(s)} - {""})
        rows.append(
            ("Input files", f"{len(sources)}" + (f" ({', '.join(suffixes)})" if suffixes else ""))
        )
        rows.append(("Inputs found for display", "yes" if raw_files else "no"))
    if acq.chimaps:
        rows.append(("Susceptibility maps", esc(", ".join(method_order(acq.chimaps)))))
    return table(rows) if rows else '<p class="note">No sidecar information found.</p>'


def _inputs_part(rep: Report, a: _Acquisition, grid_img) -> list[str]:
    from qsmprep.reports import figures as F

    acq, mag, phase = a.acq, a.mag, a.phase
    out = ["<h3>Inputs</h3>"]
    out.append(
        rep.attempt(f"{acq.prefix}: inputs table", _inputs_table, acq, a.sidecars, grid_img, a.raw)
        or ""
    )
    if mag is None and phase is None:
        out.append(
            '<p class="note">The raw inputs named in the sidecars\' <code>Sources</code> were '
            "not found (is the BIDS directory available?), so the input images are not shown."
            "</p>"
        )
        return out
    center = F.View.from_mask(a.brain, a.vs).center if a.brain is not None else None
    view = F.View.full((mag if mag is not None else phase).shape, a.vs, center)
    units = str(sidecar_value(a.sidecars, "PhaseUnits", "phase_units") or "rad")
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
        rep.figure(fig, "First echo: magnitude and phase (whole field of view).", "input summary")
    )
    return out


def _mask_part(rep: Report, a: _Acquisition) -> list[str]:
    """The brain and local-field masks; sets ``a.view`` to the view around the masks."""
    from qsmprep.reports import figures as F

    acq, brain, local, vs = a.acq, a.brain, a.local, a.vs
    out = ["<h3>Brain mask</h3>"]
    if brain is None:
        what = "could not be read (see Errors)" if "brain" in acq.masks else "was not found"
        out.append(f'<p class="error">The brain mask of this acquisition {what}.</p>')
        a.view = F.View.from_mask(local, vs) if local is not None else None
        return out
    a.view = F.View.from_mask(brain, vs)
    background = a.mag if a.mag is not None and a.mag.shape == brain.shape else None
    fig = rep.attempt(
        f"{acq.prefix}: mask figure",
        F.mask_overlay_figure,
        background,
        brain,
        a.view,
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
    out.append(table(rows))
    return out


def _fields_part(rep: Report, a: _Acquisition, bg) -> list[str]:
    from qsmprep.reports import figures as F

    acq, brain = a.acq, a.brain
    out = ["<h3>Field maps</h3>"]
    fields = {}
    for name in ("total", "local", "noise"):
        if name in acq.fields:
            loaded = rep.attempt(f"{acq.prefix}: read {name} field", load_volume, acq.fields[name])
            if loaded is not None and (brain is None or loaded[0].shape == brain.shape):
                fields[name] = loaded[0]
                a.vs = a.vs or loaded[1]
            elif loaded is not None:
                rep.problems.append(
                    f"{acq.prefix}: {name} field map has another grid than the mask"
                )
    if not fields:
        out.append('<p class="note">No field maps were found.</p>')
        return out
    if a.view is None:
        a.view = F.View.full(next(iter(fields.values())).shape, a.vs)
    fig = rep.attempt(
        f"{acq.prefix}: field figure",
        F.field_maps_figure,
        fields,
        a.view,
        rep.figdir / f"{acq.prefix}_desc-fields_fieldmap.png",
        mask={"total": brain, "local": a.eval_mask, "noise": brain},
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
        out.append(f"<p>Background removal: <b>{esc(bg)}</b>.</p>")
    return out


def _chimaps_part(rep: Report, a: _Acquisition) -> list[str]:
    """One mosaic per method (and the reference) on a common scale, then the comparison."""
    from qsmprep.reports import figures as F

    acq, chis, ref, eval_mask = a.acq, a.chis, a.ref, a.eval_mask
    out = ["<h3>Susceptibility maps</h3>"]
    if not (chis and a.vs is not None):
        out.append('<p class="error">No susceptibility map was found for this acquisition.</p>')
        return out
    if a.view is None:
        a.view = F.View.full(next(iter(chis.values())).shape, a.vs)
    vols = list(chis.values()) + ([ref] if ref is not None else [])
    vmax = F.common_scale(vols, eval_mask)
    out.append(
        f"<p>All maps on one grey scale, [-{vmax:.3g}, {vmax:.3g}] ppm (99th percentile of "
        "|chi| over all maps in the local-field mask); black is outside the mask.</p>"
    )
    # (name in file and messages, map, title, caption)
    shown = [
        (m, chi, m.upper(), f"<b>{esc(m)}</b> ({esc(acq.chimaps[m].name)})")
        for m, chi in chis.items()
    ]
    if ref is not None:
        shown.append(("reference", ref, "reference", f"<b>Reference</b> ({esc(a.ref_name)})"))
    for name, chi, title, caption in shown:
        fig = rep.attempt(
            f"{acq.prefix}: {name} mosaic",
            F.chi_mosaic_figure,
            chi,
            a.view,
            rep.figdir / f"{acq.prefix}_desc-{name}_mosaic.png",
            vmax=vmax,
            title=title,
            mask=eval_mask,
        )
        out.append(rep.figure(fig, caption, f"{name} susceptibility map"))
    out += _comparison_part(rep, a, vmax)
    return out


def _comparison_part(rep: Report, a: _Acquisition, vmax: float) -> list[str]:
    """Difference maps and scatter plots of every method against the reference."""
    from qsmprep.reports import figures as F

    acq, ref, eval_mask = a.acq, a.ref, a.eval_mask
    out = ["<h3>Comparison with the reference</h3>"]
    if ref is None or eval_mask is None or not eval_mask.any():
        out.append(
            '<p class="note">No reference map: differences and scatter plots are not '
            "shown (give <code>--reference</code>, or acquire several head "
            "orientations for COSMOS).</p>"
        )
        return out
    diff_max = F.common_scale([c - ref for c in a.chis.values()], eval_mask)
    out.append(
        f"<p>Reference: <code>{esc(a.ref_name)}</code>. Differences (method - "
        f"reference) on one scale, [-{diff_max:.3g}, {diff_max:.3g}] ppm; scatter plots "
        "over the local-field mask with the identity (dashed) and the least-squares line "
        "(method = slope x reference + intercept).</p>"
    )
    for method, chi in a.chis.items():
        res = rep.attempt(
            f"{acq.prefix}: {method} comparison",
            F.comparison_figure,
            chi,
            ref,
            a.view,
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
                f"<b>{esc(method)}</b> - reference; slope {slope:.3f}",
                f"{method} comparison",
            )
        )
    return out


def _r2star_part(rep: Report, a: _Acquisition, info: dict) -> list[str]:
    """The R2* map and its summary; records its method in ``info["r2star_method"]``."""
    from qsmprep.reports import figures as F

    acq, brain = a.acq, a.brain
    if "R2starmap" not in acq.relaxation:
        return []
    out = ["<h3>R2* map</h3>"]
    r2path = acq.relaxation["R2starmap"]
    loaded = rep.attempt(f"{acq.prefix}: read R2* map", load_volume, r2path)
    r2side = read_sidecar(r2path)
    info["r2star_method"] = sidecar_key(r2side, "Method")
    if loaded is not None and brain is not None and loaded[0].shape != brain.shape:
        rep.problems.append(f"{acq.prefix}: R2* map has another grid than the mask")
        return out
    if loaded is None:
        return out
    r2 = loaded[0]
    if a.view is None:
        a.view = F.View.full(r2.shape, a.vs or loaded[1])
    fig = rep.attempt(
        f"{acq.prefix}: R2* mosaic",
        F.r2star_mosaic_figure,
        r2,
        a.view,
        rep.figdir / f"{acq.prefix}_desc-r2star_mosaic.png",
        mask=brain,
    )
    out.append(
        rep.figure(
            fig,
            f"<b>R2*</b> ({esc(r2path.name)}), 1/s, in the brain mask; scale 0 to the "
            "99th percentile.",
            "R2* map",
        )
    )
    rows = []
    if brain is not None and brain.any():
        rows.append(("Median R2* in the brain mask (1/s)", f"{np.median(r2[brain]):.1f}"))
    rows.append(("Method", esc(sidecar_key(r2side, "Method") or "n/a")))
    rng = sidecar_key(r2side, "R2starRange")
    low, high = sidecar_key(r2side, "ClippedLowVoxels"), sidecar_key(r2side, "ClippedHighVoxels")
    if rng is not None:
        rows.append(
            (
                "Clipped to the range (1/s)",
                f"{esc(rng)}: {esc(low)} voxel(s) below, {esc(high)} above",
            )
        )
    out.append(table(rows))
    return out


def _metrics_table(columns, rows) -> str:
    if not rows:
        return '<p class="note">The metrics table is empty.</p>'
    head = "".join(
        f"<th>{esc(c)}{' (' + METRIC_UNITS[c] + ')' if c in METRIC_UNITS else ''}</th>"
        for c in columns
    )
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "n/a")
            num = to_float(v) is not None
            cells.append(f'<td class="num">{fmt(v)}</td>' if num else f"<td>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _metrics_part(rep: Report, acq, metrics) -> list[str]:
    out = ["<h3>Metrics</h3>"]
    if metrics is None:
        out.append('<p class="note">No metrics table (<code>_metrics.tsv</code>) was found.</p>')
        return out
    out.append(rep.attempt(f"{acq.prefix}: metrics table", _metrics_table, *metrics) or "")
    out.append(
        "<p>NRMSE, HFEN (%), SSIM, XSIM, PSNR (dB), slope and correlation compare each map "
        "with the reference (n/a without one); dc_residual (%) is the reference-free data "
        "consistency 100 ||M (D chi - f)|| / ||M f||.</p>"
    )
    return out


# --------------------------------------------------------------------------------------------
# the whole section


def acquisition_section(
    rep: Report, acq: AcquisitionFiles, files: SubjectFiles, settings, preferred
) -> tuple[str, dict]:
    """The HTML section of one acquisition, and what it tells the methods paragraph.

    Returns ``(html, info)``: ``info`` holds ``params`` (the parameters recorded per method),
    ``echoes``, ``reference`` (the name of the reference map shown, or ``None``),
    ``phase_units`` and ``r2star_method`` where known.
    """
    out = [f'<section id="{esc(acq.prefix)}"><h2>{esc(acq.prefix)}</h2>']
    a = _Acquisition(acq, [read_sidecar(p) for p in acq.sidecars()])
    info: dict = {"params": {}}
    te = sidecar_value(a.sidecars, "EchoTime", "EchoTimes", "echo_times")
    if te is not None:
        info["echoes"] = len(te) if isinstance(te, list) else 1
    info["params"], bg = _recorded_params(acq)

    grid_path = acq.any_image()
    grid_img = (
        rep.attempt(f"{acq.prefix}: read image header", nib.load, str(grid_path))
        if grid_path
        else None
    )
    _read_masks(rep, a)
    _read_raw(rep, a, settings)
    out += _inputs_part(rep, a, grid_img)
    out += _mask_part(rep, a)
    out += _fields_part(rep, a, bg)

    _read_chimaps(rep, a, preferred)
    metrics = None
    if acq.metrics_tsv is not None:
        metrics = rep.attempt(f"{acq.prefix}: read metrics table", read_tsv, acq.metrics_tsv)
    _read_reference(rep, a, files, settings, metrics)
    info["reference"] = a.ref_name
    info["phase_units"] = sidecar_value(a.sidecars, "PhaseUnits", "phase_units")
    out += _chimaps_part(rep, a)
    out += _r2star_part(rep, a, info)
    out.append(
        rep.attempt(f"{acq.prefix}: SWI section", swi_section, rep, acq, a.brain, a.vs) or ""
    )
    out += _metrics_part(rep, acq, metrics)
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
