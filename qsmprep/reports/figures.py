"""Report figures: orthogonal slices of masks, fields and susceptibility maps, comparisons.

Every figure is a small PNG (matplotlib ``Figure`` objects on the Agg canvas: no pyplot, no
change of the global backend) written atomically (temporary name, then rename) under
``output_dir/sub-<label>/figures/`` with a BIDS-like name ``<prefix>_desc-<what>_<kind>.png``.
Volumes are expected in the closest RAS+ orientation
(:func:`qsmprep.reports.collect.load_volume`), so the three planes through the brain centre
are, left to right: axial (seen from above, anterior up), coronal (seen from behind) and
sagittal (seen from the subject's right, anterior right), in the neurological convention (the
subject's left on the left). Physical aspect ratios honour the voxel size.

Colour scales:

- magnitude: grey, 0.5th to 99.5th percentile; phase: grey, [-pi, pi] for radians;
- field maps (Hz): diverging, symmetric about 0 at the 99th percentile of ``|f|`` in the mask;
- susceptibility-weighted images (SWI, minIP, SMWI): grey, 0 to the 99.5th percentile of the
  nonzero voxels;
- susceptibility (ppm): grey, **one symmetric scale for every method of an acquisition**
  (:func:`common_scale`, the 99th percentile of ``|chi|`` over all methods in the mask), so
  that the mosaics compare; differences to the reference: diverging, one scale for all methods.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage as ndi

__all__ = [
    "View",
    "chi_mosaic_figure",
    "common_scale",
    "comparison_figure",
    "field_maps_figure",
    "input_summary_figure",
    "mask_overlay_figure",
    "metric_strip_figure",
    "panel_title",
    "save_figure",
    "weighted_mosaic_figure",
]

#: Resolution of saved figures (dots per inch): ~800 px wide for an 8-inch figure.
DPI = 100
#: Longest side (pixels) of a displayed slice; larger slices are subsampled.
MAX_SLICE_PIXELS = 256
#: Most points drawn in a scatter plot (a fixed random subset of the mask voxels).
MAX_SCATTER_POINTS = 20000
_PLANES = ("axial", "coronal", "sagittal")
_FIG_WIDTH = 8.0  # inches


@dataclass(frozen=True)
class View:
    """Which part of a (RAS+) volume to show: the crop box and the centre of the planes.

    Attributes: ``voxel_size`` (mm), ``center`` (voxel indices of the three planes) and
    ``box`` (three ``slice`` objects, the crop).
    """

    voxel_size: tuple[float, float, float]
    center: tuple[int, int, int]
    box: tuple[slice, slice, slice]

    @classmethod
    def from_mask(cls, mask, voxel_size, margin_mm: float = 6.0) -> View:
        """Centre of mass of ``mask`` and its bounding box grown by ``margin_mm``.

        An empty (or missing) mask gives the whole volume and the array centre.
        """
        m = np.asarray(mask) > 0
        vs = tuple(float(v) for v in voxel_size)
        if not m.any():
            return cls.full(m.shape, vs)
        center = tuple(int(round(c)) for c in ndi.center_of_mass(m))
        idx = np.nonzero(m)
        box = []
        for ax in range(3):
            pad = int(math.ceil(margin_mm / vs[ax]))
            lo = max(int(idx[ax].min()) - pad, 0)
            hi = min(int(idx[ax].max()) + pad + 1, m.shape[ax])
            box.append(slice(lo, hi))
        return cls(vs, center, tuple(box))

    @classmethod
    def full(cls, shape, voxel_size, center=None) -> View:
        """The whole volume, planes through ``center`` (default: the array centre)."""
        shape = tuple(int(n) for n in shape[:3])
        if center is None:
            center = tuple(n // 2 for n in shape)
        return cls(
            tuple(float(v) for v in voxel_size), tuple(center), tuple(slice(0, n) for n in shape)
        )

    def planes(self, volume) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
        """The axial, coronal and sagittal slices through ``center``, cropped to ``box``.

        Each is ``(image, extent)``: a 2D array for ``imshow(..., origin="lower")`` (rows =
        second in-plane axis) and its extent in mm; slices longer than
        :data:`MAX_SLICE_PIXELS` are subsampled.
        """
        v = np.asarray(volume)
        cx, cy, cz = (min(max(c, 0), n - 1) for c, n in zip(self.center, v.shape[:3], strict=True))
        bx, by, bz = self.box
        vx, vy, vz = self.voxel_size
        cuts = [
            (v[bx, by, cz], vx, vy),
            (v[bx, cy, bz], vx, vz),
            (v[cx, by, bz], vy, vz),
        ]
        out = []
        for img, du, dv in cuts:
            step = max(1, math.ceil(max(img.shape) / MAX_SLICE_PIXELS))
            img = img[::step, ::step]
            extent = (0.0, img.shape[0] * du * step, 0.0, img.shape[1] * dv * step)
            out.append((np.ascontiguousarray(img.T), extent))
        return out

    def widths_heights(self) -> tuple[list[float], float]:
        """Physical widths of the three panels and the tallest height (mm)."""
        n = [s.stop - s.start for s in self.box]
        vx, vy, vz = self.voxel_size
        widths = [n[0] * vx, n[0] * vx, n[1] * vy]
        height = max(n[1] * vy, n[2] * vz)
        return widths, height


def save_figure(fig: Figure, path) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix) via a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = path.suffix.lstrip(".") or "png"
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI, facecolor=fig.get_facecolor())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def common_scale(volumes, mask=None, percentile: float = 99.0, floor: float = 1e-6) -> float:
    """Symmetric display limit: the ``percentile`` of ``|x|`` over all ``volumes`` in ``mask``.

    Parameters
    ----------
    volumes : iterable of arrays of one shape
    mask : array, optional
        Voxels to use (nonzero); default every voxel.
    percentile : float
        In [0, 100].
    floor : float
        Smallest limit returned (keeps the scale valid for all-zero maps).

    Returns
    -------
    float
        The limit ``v``; show the maps on ``[-v, v]``.
    """
    values = []
    for vol in volumes:
        v = np.asarray(vol, dtype=np.float32)
        v = v[np.asarray(mask) > 0] if mask is not None else v.ravel()
        if v.size > 200000:  # a regular subsample is plenty for a percentile
            v = v[:: v.size // 200000]
        values.append(np.abs(v[np.isfinite(v)]))
    allv = np.concatenate(values) if values else np.zeros(0, np.float32)
    if allv.size == 0:
        return float(floor)
    return float(max(np.percentile(allv, percentile), floor))


def _masked(volume, mask):
    v = np.array(volume, dtype=np.float32)
    if mask is not None:
        v[np.asarray(mask) <= 0] = np.nan
    return v


def _new_figure(size) -> Figure:
    fig = Figure(figsize=size, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _grid_figure(view: View, n_rows: int, extra_cols: Sequence[float] = (), colorbar=True):
    """A figure with ``n_rows`` rows of three plane panels, a colour-bar column (index 3) and
    extra columns (relative widths in units of the panel height), e.g. for a scatter plot."""
    widths, height = view.widths_heights()
    ratios = list(widths)
    if colorbar:
        ratios.append(0.04 * sum(widths))
    ratios += [height * r for r in extra_cols]
    total = sum(ratios)
    row_h = _FIG_WIDTH * height / total
    fig = _new_figure((_FIG_WIDTH, n_rows * (row_h + 0.3) + 0.1))
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.04, wspace=0.01, hspace=0.02)
    grid = fig.add_gridspec(n_rows, len(ratios), width_ratios=ratios)
    return fig, grid


def _plane_row(fig, grid, row, view, volume, *, cmap, vmin, vmax, title, bad="black"):
    """Draw the three planes of ``volume`` on row ``row``; return the last image artist."""
    cm = matplotlib.colormaps[cmap].with_extremes(bad=bad)
    im = None
    for col, ((img, extent), plane) in enumerate(zip(view.planes(volume), _PLANES, strict=True)):
        ax = fig.add_subplot(grid[row, col])
        im = ax.imshow(
            img, cmap=cm, vmin=vmin, vmax=vmax, origin="lower", extent=extent, aspect="equal"
        )
        ax.set_axis_off()
        panel_title(ax, f"{title}: {plane}" if col == 0 else plane)
    return im


def panel_title(ax, text, fontsize=8):
    """A left-aligned title above an image panel (axes off).

    Drawn as a text artist rather than ``Axes.set_title``: matplotlib repositions a title on
    every draw and layout pass by measuring the tick labels of every axis, which made the
    title, not the image, most of the cost of a report figure.
    """
    ax.text(0.0, 1.0, text, transform=ax.transAxes, fontsize=fontsize, ha="left", va="bottom")


def _colorbar(fig, grid, row, im, label):
    cax = fig.add_subplot(grid[row, 3])
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(label, fontsize=8)


def input_summary_figure(magnitude, phase, view: View, path, *, phase_units: str = "rad") -> Path:
    """Magnitude and phase of the first echo, three planes each.

    Parameters
    ----------
    magnitude, phase : (X, Y, Z) arrays or None
        First echo in RAS+ orientation; a missing one is left out.
    view : View
        Planes and crop (usually the whole field of view).
    path : path
        Output PNG.
    phase_units : str
        ``"rad"`` shows [-pi, pi]; anything else (scanner integers) the data range.
    """
    rows = [x for x in (magnitude, phase) if x is not None]
    if not rows:
        raise ValueError("input_summary_figure needs a magnitude or a phase image")
    fig, grid = _grid_figure(view, len(rows))
    row = 0
    if magnitude is not None:
        lo, hi = np.percentile(magnitude, [0.5, 99.5])
        im = _plane_row(
            fig,
            grid,
            row,
            view,
            magnitude,
            cmap="gray",
            vmin=lo,
            vmax=max(hi, lo + 1e-6),
            title="Magnitude, echo 1",
        )
        _colorbar(fig, grid, row, im, "a.u.")
        row += 1
    if phase is not None:
        if phase_units == "rad":
            lo, hi, unit = -np.pi, np.pi, "rad"
        else:
            lo, hi, unit = float(np.min(phase)), float(np.max(phase)), phase_units
            hi = max(hi, lo + 1e-6)
        im = _plane_row(
            fig, grid, row, view, phase, cmap="gray", vmin=lo, vmax=hi, title="Phase, echo 1"
        )
        _colorbar(fig, grid, row, im, unit)
    return save_figure(fig, path)


def mask_overlay_figure(background, brain_mask, view: View, path, *, local_mask=None) -> Path:
    """Brain mask (red fill and outline) and local-field mask (cyan outline) on a background.

    Parameters
    ----------
    background : (X, Y, Z) array or None
        Usually the first-echo magnitude; ``None`` shows the masks on black.
    brain_mask, local_mask : (X, Y, Z) arrays
        Nonzero inside; ``local_mask`` optional.
    view, path : see :func:`input_summary_figure`.
    """
    brain = np.asarray(brain_mask) > 0
    fig, grid = _grid_figure(view, 1, colorbar=False)
    bg_planes = view.planes(background) if background is not None else None
    if background is not None:
        lo, hi = np.percentile(background, [0.5, 99.5])
    else:
        lo, hi = 0.0, 1.0
    local_planes = view.planes(np.asarray(local_mask) > 0) if local_mask is not None else None
    for col, ((m, extent), plane) in enumerate(zip(view.planes(brain), _PLANES, strict=True)):
        ax = fig.add_subplot(grid[0, col])
        bg = bg_planes[col][0] if bg_planes is not None else np.zeros(m.shape, np.float32)
        ax.imshow(
            bg,
            cmap="gray",
            vmin=lo,
            vmax=max(hi, lo + 1e-6),
            origin="lower",
            extent=extent,
            aspect="equal",
        )
        fill = np.ma.masked_where(~m, m.astype(np.float32))
        ax.imshow(fill, cmap="autumn", alpha=0.3, origin="lower", extent=extent, aspect="equal")
        _outline(ax, m, extent, "red")
        if local_planes is not None:
            _outline(ax, local_planes[col][0], extent, "cyan")
        ax.set_axis_off()
        title = "Brain mask (red), local-field mask (cyan)" if col == 0 else ""
        panel_title(ax, f"{title}: {plane}" if title else plane)
    return save_figure(fig, path)


def _outline(ax, m, extent, color):
    m = np.asarray(m, dtype=np.float32)
    if m.min() == m.max():
        return
    ny, nx = m.shape
    x = np.linspace(extent[0], extent[1], nx, endpoint=False) + (extent[1] - extent[0]) / nx / 2
    y = np.linspace(extent[2], extent[3], ny, endpoint=False) + (extent[3] - extent[2]) / ny / 2
    ax.contour(x, y, m, levels=[0.5], colors=color, linewidths=0.8)


def field_maps_figure(fields: Mapping[str, np.ndarray], view: View, path, *, mask=None) -> Path:
    """Field maps (Hz), one row each, symmetric colour scale per row (99th pct. of ``|f|``).

    ``fields`` maps a row title (e.g. ``"total"``, ``"local"``) to a volume; a title
    containing ``"noise"`` is shown on a sequential scale from 0 instead. ``mask`` is one
    array for every row, or a mapping from row title to array (``None``: no mask); voxels
    outside it are black and do not enter the colour scale.
    """
    items = [(k, v) for k, v in fields.items() if v is not None]
    if not items:
        raise ValueError("field_maps_figure needs at least one field map")
    fig, grid = _grid_figure(view, len(items))
    for row, (name, vol) in enumerate(items):
        m = mask.get(name) if isinstance(mask, Mapping) else mask
        shown = _masked(vol, m)
        lim = common_scale([vol], m)
        if "noise" in name:
            im = _plane_row(
                fig,
                grid,
                row,
                view,
                shown,
                cmap="viridis",
                vmin=0,
                vmax=lim,
                title=f"{name} field std",
            )
        else:
            im = _plane_row(
                fig,
                grid,
                row,
                view,
                shown,
                cmap="RdBu_r",
                vmin=-lim,
                vmax=lim,
                title=f"{name} field",
            )
        _colorbar(fig, grid, row, im, "Hz")
    return save_figure(fig, path)


def chi_mosaic_figure(chi, view: View, path, *, vmax: float, title: str, mask=None) -> Path:
    """Susceptibility (ppm) on the three planes, grey scale ``[-vmax, vmax]``.

    Use one ``vmax`` (:func:`common_scale`) for every method of an acquisition.
    Voxels outside ``mask`` are black.
    """
    fig, grid = _grid_figure(view, 1)
    im = _plane_row(
        fig, grid, 0, view, _masked(chi, mask), cmap="gray", vmin=-vmax, vmax=vmax, title=title
    )
    _colorbar(fig, grid, 0, im, "ppm")
    return save_figure(fig, path)


def r2star_mosaic_figure(r2star, view: View, path, *, mask=None, percentile=99.0) -> Path:
    """R2* (1/s) on the three planes, scale ``[0, v]`` with ``v`` the ``percentile`` of R2*
    in ``mask`` (at least 1 1/s); voxels outside ``mask`` are black."""
    vmax = common_scale([np.clip(r2star, 0, None)], mask, percentile=percentile, floor=1.0)
    fig, grid = _grid_figure(view, 1)
    im = _plane_row(
        fig, grid, 0, view, _masked(r2star, mask), cmap="inferno", vmin=0, vmax=vmax, title="R2*"
    )
    _colorbar(fig, grid, 0, im, "R2* (1/s)")
    return save_figure(fig, path)


def weighted_mosaic_figure(volume, view: View, path, *, title: str) -> Path:
    """A susceptibility-weighted image (SWI, minIP, SMWI) on the three planes, grey scale from
    0 to the 99.5th percentile of its nonzero voxels (dark veins stay dark)."""
    v = np.asarray(volume, dtype=np.float32)
    nz = v[v > 0]
    hi = float(np.percentile(nz, 99.5)) if nz.size else 1.0
    fig, grid = _grid_figure(view, 1)
    im = _plane_row(fig, grid, 0, view, v, cmap="gray", vmin=0.0, vmax=max(hi, 1e-6), title=title)
    _colorbar(fig, grid, 0, im, "a.u.")
    return save_figure(fig, path)


def _regression(x, y):
    """Ordinary least squares ``y = a x + b`` (as :func:`qsmprep.metrics.regression`)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xm, ym = x.mean(), y.mean()
    sxx = float(np.sum((x - xm) ** 2))
    if sxx <= 0:
        return float("nan"), float("nan")
    a = float(np.sum((x - xm) * (y - ym)) / sxx)
    return a, float(ym - a * xm)


def comparison_figure(
    chi,
    reference,
    view: View,
    path,
    *,
    mask,
    diff_vmax: float,
    chi_vmax: float,
    title: str,
    reference_name: str = "reference",
) -> tuple[Path, float]:
    """Difference ``chi - reference`` on three planes and a scatter plot of chi vs reference.

    The scatter uses every voxel of ``mask`` (at most :data:`MAX_SCATTER_POINTS`, a fixed
    random subset), with the identity line and the least-squares line ``chi = a ref + b``
    (reference as the independent variable, as in :func:`qsmprep.metrics.regression`).

    Returns
    -------
    (Path, float)
        The figure and the fitted slope ``a`` (NaN for a constant reference).
    """
    m = np.asarray(mask) > 0
    diff = np.asarray(chi, np.float32) - np.asarray(reference, np.float32)
    fig, grid = _grid_figure(view, 1, extra_cols=(1.1,))
    im = _plane_row(
        fig,
        grid,
        0,
        view,
        _masked(diff, m),
        cmap="RdBu_r",
        vmin=-diff_vmax,
        vmax=diff_vmax,
        title=f"{title} - {reference_name}",
    )
    _colorbar(fig, grid, 0, im, "ppm")
    x = np.asarray(reference, np.float32)[m]
    y = np.asarray(chi, np.float32)[m]
    slope, intercept = _regression(x, y) if x.size > 1 else (float("nan"), float("nan"))
    ax = fig.add_subplot(grid[0, 4])
    if x.size > MAX_SCATTER_POINTS:
        pick = np.random.default_rng(0).choice(x.size, MAX_SCATTER_POINTS, replace=False)
        xs, ys = x[pick], y[pick]
    else:
        xs, ys = x, y
    lim = 1.5 * chi_vmax
    ax.scatter(xs, ys, s=1, alpha=0.25, color="0.2", linewidths=0, rasterized=True)
    line = np.array([-lim, lim])
    ax.plot(line, line, "--", color="0.5", lw=0.8, label="identity")
    if np.isfinite(slope):
        ax.plot(
            line, slope * line + intercept, color="tab:red", lw=1.2, label=f"slope {slope:.3f}"
        )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=6)
    ax.set_xlabel(f"{reference_name} (ppm)", fontsize=7)
    ax.set_ylabel(f"{title} (ppm)", fontsize=7)
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    return save_figure(fig, path), slope


def metric_strip_figure(values: Mapping[str, Sequence[float]], path, *, metric: str, unit=""):
    """Box plot with the individual points (jittered) of one metric per method.

    ``values`` maps a method to its values across subjects/acquisitions (finite floats).
    """
    items = [(k, np.asarray(v, float)) for k, v in values.items() if len(v)]
    if not items:
        raise ValueError(f"no values of {metric!r} to plot")
    fig = _new_figure((max(3.0, 0.9 * len(items) + 1.5), 3.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([v for _, v in items], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, (_, v) in enumerate(items, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=12, alpha=0.7, zorder=3)
    ax.set_xticks(range(1, len(items) + 1), [k for k, _ in items], fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric, fontsize=8)
    ax.set_title(metric, fontsize=9, loc="left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
