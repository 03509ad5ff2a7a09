"""Atlas regions of interest: canonical deep grey nuclei from TemplateFlow atlases, ROI statistics.

qsmprep reports susceptibility in a fixed set of regions, numbered as in the simulator's
ground truth (:data:`qsmprep.sim.phantom.LABEL_NAMES`):

====  ==================  =============================================
 1    caudate             label names matching ``caudate``
 2    globus_pallidus     ``pallid`` (pallidum, globus pallidus int./ext.)
 3    putamen             ``putamen``
 4    red_nucleus         ``red nucleus``, ``red_n``, ``ruber``
 5    dentate             ``dentate`` (not the hippocampal dentate gyrus)
 6    substantia_nigra    ``nigra``, ``SN_``
 7    thalamus            ``thalamus``, ``thal_`` (all thalamic nuclei)
18    ventricles          ``ventric`` (lateral, third, fourth ventricles)
====  ==================  =============================================

Left and right (and sub-nuclei) are merged. A region is taken from the first atlas of the list
that has it (:func:`canonical_labels`), so the default ``("HCPEx", "HOSPA:desc-th50")`` takes
the nuclei from HCPEx and the ventricles from Harvard-Oxford. Atlases are TemplateFlow
``dseg`` images with a label table ``tpl-<name>_atlas-<atlas>[_desc-<d>]_dseg.tsv`` (columns
``index``, ``name``); for ``HOSPA`` the standard Harvard-Oxford subcortical table is built in.

The array functions here (:func:`roi_statistics`, :func:`reference_region`) do no I/O.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qsmprep.space.templates import template_file

__all__ = [
    "CSF_LABEL",
    "DEFAULT_ATLASES",
    "HOSPA_LABELS",
    "ROIS",
    "ROI_COLUMNS",
    "AtlasSpec",
    "atlas_files",
    "canonical_labels",
    "parse_atlas",
    "read_label_table",
    "reference_region",
    "roi_statistics",
]

ROIS: dict[int, str] = {
    1: "caudate",
    2: "globus_pallidus",
    3: "putamen",
    4: "red_nucleus",
    5: "dentate",
    6: "substantia_nigra",
    7: "thalamus",
    18: "ventricles",
}
"""Canonical regions: label value -> name (the ``roi`` column of the ROI tables)."""

CSF_LABEL = 18
"""Label of the ventricles: the reference region of ``--reference-region csf``."""

_PATTERNS: dict[int, tuple[str, str | None]] = {
    # label: (regex on the normalised label name, exclusion regex)
    1: (r"caudate", None),
    2: (r"pallid", None),
    3: (r"putamen", None),
    4: (r"red nucleus|\bred n\b|ruber", None),
    5: (r"dentate", r"gyrus"),
    6: (r"nigra|\bsn\b", None),
    7: (r"thalam|\bthal\b", None),
    18: (r"ventric", None),
}

DEFAULT_ATLASES = ("HCPEx", "HOSPA:desc-th50")
"""Atlases of the ROI statistics, in order of precedence (see :mod:`qsmprep.space.atlas`)."""

HOSPA_LABELS: dict[int, str] = {
    1: "Left Cerebral White Matter",
    2: "Left Cerebral Cortex",
    3: "Left Lateral Ventricle",
    4: "Left Thalamus",
    5: "Left Caudate",
    6: "Left Putamen",
    7: "Left Pallidum",
    8: "Brain-Stem",
    9: "Left Hippocampus",
    10: "Left Amygdala",
    11: "Left Accumbens",
    12: "Right Cerebral White Matter",
    13: "Right Cerebral Cortex",
    14: "Right Lateral Ventricle",
    15: "Right Thalamus",
    16: "Right Caudate",
    17: "Right Putamen",
    18: "Right Pallidum",
    19: "Right Hippocampus",
    20: "Right Amygdala",
    21: "Right Accumbens",
}
"""Harvard-Oxford subcortical labels (FSL order, 1-based) as in TemplateFlow's ``HOSPA``."""

_BUILTIN_TABLES = {"HOSPA": HOSPA_LABELS}

ROI_COLUMNS = ("roi", "label", "mean", "median", "std", "voxels")
"""Columns of ``<prefix>_desc-<method>_roistats.tsv``."""


class AtlasSpec(tuple):
    """``(atlas, desc)`` parsed from ``"HOSPA:desc-th50"`` (desc ``None`` when absent)."""

    __slots__ = ()

    def __new__(cls, atlas: str, desc: str | None = None):
        return super().__new__(cls, (atlas, desc))

    @property
    def atlas(self) -> str:
        return self[0]

    @property
    def desc(self) -> str | None:
        return self[1]

    def __str__(self) -> str:
        return self.atlas + (f":desc-{self.desc}" if self.desc else "")


def parse_atlas(spec) -> AtlasSpec:
    """``"HOSPA:desc-th50"`` -> ``AtlasSpec("HOSPA", "th50")``; ValueError when malformed."""
    if isinstance(spec, AtlasSpec):
        return spec
    name, *mods = str(spec).split(":")
    desc = None
    ok = bool(re.fullmatch(r"[A-Za-z0-9]+", name))
    for mod in mods:
        key, _, val = mod.partition("-")
        if key == "desc" and re.fullmatch(r"[A-Za-z0-9]+", val):
            desc = val
        else:
            ok = False
    if not ok:
        raise ValueError(
            f"atlas {spec!r} is not of the form <Atlas>[:desc-<d>], e.g. HOSPA:desc-th50"
        )
    return AtlasSpec(name, desc)


def read_label_table(path) -> dict[int, str]:
    """``{index: name}`` of a TemplateFlow ``dseg.tsv`` (columns ``index`` and ``name``)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = {}
    for row in rows:
        keys = {k.lower(): v for k, v in row.items() if k}
        idx = keys.get("index", keys.get("label"))
        name = keys.get("name", keys.get("label_name", keys.get("abbreviation")))
        if idx is None or name is None:
            raise ValueError(f"label table {path} needs the columns 'index' and 'name'")
        out[int(float(idx))] = str(name)
    return out


def atlas_files(template: str, spec, *, res: int = 1, cohort=None, home=None):
    """The ``dseg`` image and label table of an atlas in the TemplateFlow home.

    Returns ``(dseg_path, {index: name})``. The table is
    ``tpl-<template>_atlas-<atlas>[_desc-<d>]_dseg.tsv`` (or without ``desc``); the built-in
    table is used for ``HOSPA`` when the file is absent. Raises
    :class:`~qsmprep.space.templates.TemplateNotFoundError` when the image (or the table of an
    atlas without a built-in one) is missing.
    """
    spec = parse_atlas(spec)
    dseg = template_file(
        template,
        suffix="dseg",
        res=res,
        atlas=spec.atlas,
        desc=spec.desc,
        cohort=cohort,
        home=home,
    )
    last_error = None
    for desc in dict.fromkeys([spec.desc, None]):
        try:
            tsv = template_file(
                template,
                suffix="dseg",
                atlas=spec.atlas,
                desc=desc,
                cohort=cohort,
                extension=".tsv",
                home=home,
            )
            return dseg, read_label_table(tsv)
        except ValueError as exc:
            last_error = exc
    if spec.atlas in _BUILTIN_TABLES:
        return dseg, dict(_BUILTIN_TABLES[spec.atlas])
    raise last_error


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def roi_members(table: Mapping[int, str]) -> dict[int, list[int]]:
    """Atlas label values of each canonical region (``{roi label: [atlas labels]}``)."""
    out: dict[int, list[int]] = {}
    for roi, (pattern, exclude) in _PATTERNS.items():
        ids = []
        for idx, name in table.items():
            text = _normalise(name)
            if re.search(pattern, text) and not (exclude and re.search(exclude, text)):
                ids.append(int(idx))
        if ids:
            out[roi] = sorted(ids)
    return out


def canonical_labels(atlases: Sequence[tuple[np.ndarray, Mapping[int, str]]]) -> tuple:
    """Merge atlases (on one grid) into one image of canonical region labels.

    Parameters
    ----------
    atlases : sequence of (labels, table)
        Integer label arrays of one shape and their ``{index: name}`` tables, in order of
        precedence: a region comes from the first atlas that has it, and a voxel keeps the
        first region given to it.

    Returns
    -------
    (labels, sources)
        ``uint8`` array of :data:`ROIS` values (0 elsewhere) and ``{roi label: atlas position}``.
    """
    out = None
    sources: dict[int, int] = {}
    for pos, (data, table) in enumerate(atlases):
        data = np.asarray(data)
        if out is None:
            out = np.zeros(data.shape, np.uint8)
        elif data.shape != out.shape:
            raise ValueError(f"atlases are on different grids: {data.shape} vs {out.shape}")
        data = np.rint(data).astype(np.int64) if data.dtype.kind == "f" else data
        for roi, ids in roi_members(table).items():
            if roi in sources:
                continue
            sel = np.isin(data, ids) & (out == 0)
            if sel.any():
                out[sel] = roi
                sources[roi] = pos
    if out is None:
        raise ValueError("no atlas given")
    return out, sources


def roi_statistics(chi, labels, mask=None, rois: Mapping[int, str] = ROIS) -> list[dict]:
    """Mean, median, standard deviation and voxel count of ``chi`` in each region.

    Parameters
    ----------
    chi : (X, Y, Z) array
        Susceptibility (ppm).
    labels : (X, Y, Z) int array
        Region labels on the grid of ``chi`` (:data:`ROIS` values).
    mask : (X, Y, Z) bool array, optional
        Voxels where ``chi`` is valid (the local-field mask); a region is its intersection.
    rois : dict
        ``{label: name}`` of the regions to report.

    Returns
    -------
    One dict per region with the :data:`ROI_COLUMNS` keys; ``mean``, ``median`` and ``std``
    (ppm, population standard deviation) are NaN for a region without voxels.
    """
    chi = np.asarray(chi, dtype=np.float64)
    labels = np.asarray(labels)
    if chi.shape != labels.shape:
        raise ValueError(f"chi {chi.shape} and labels {labels.shape} must share one grid")
    valid = np.isfinite(chi)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != chi.shape:
            raise ValueError(f"mask {mask.shape} and chi {chi.shape} must share one grid")
        valid &= mask
    rows = []
    for lab, name in rois.items():
        v = chi[(labels == lab) & valid]
        if v.size:
            stats = (float(v.mean()), float(np.median(v)), float(v.std()))
        else:
            stats = (float("nan"),) * 3
        rows.append(
            {"roi": name, "label": int(lab), "mean": stats[0], "median": stats[1],
             "std": stats[2], "voxels": int(v.size)}
        )  # fmt: skip
    return rows


def reference_region(
    chi, labels, mask=None, label: int = CSF_LABEL
) -> tuple[np.ndarray, float, int]:
    """Reference ``chi`` to its mean over one region: ``chi - mean(chi[region])`` in the mask.

    Parameters
    ----------
    chi : (X, Y, Z) array
        Susceptibility (ppm); zero outside ``mask``.
    labels : (X, Y, Z) int array
        Region labels (:data:`ROIS` values).
    mask : (X, Y, Z) bool array, optional
        Where ``chi`` is valid; the region is intersected with it and the output is 0 outside.
    label : int
        The reference region (default :data:`CSF_LABEL`, the ventricles).

    Returns
    -------
    (chi_referenced, offset, voxels)
        The referenced map (float32), the subtracted mean (ppm) and the region's voxel count.

    Raises
    ------
    ValueError
        When the region has no voxel in the mask (the ventricles fell outside the local-field
        mask, e.g. a slab that misses them): give ``--reference-region mask`` instead.
    """
    chi = np.asarray(chi, dtype=np.float64)
    labels = np.asarray(labels)
    m = np.ones(chi.shape, bool) if mask is None else np.asarray(mask, bool)
    if labels.shape != chi.shape or m.shape != chi.shape:
        raise ValueError(
            f"chi {chi.shape}, labels {labels.shape} and mask {m.shape} must share one grid"
        )
    region = (labels == label) & m & np.isfinite(chi)
    n = int(region.sum())
    if n == 0:
        name = ROIS.get(label, str(label))
        raise ValueError(
            f"the reference region {name!r} (label {label}) has no voxel inside the mask; "
            "check the registration figure, or use the mask mean (--reference-region mask)"
        )
    offset = float(chi[region].mean())
    out = np.where(m, chi - offset, 0.0).astype(np.float32)
    return out, offset, n


def write_roi_table(rows: Sequence[Mapping], path) -> Path:
    """Write ROI rows as a tab-separated table (``n/a`` for NaN), columns :data:`ROI_COLUMNS`."""
    lines = ["\t".join(ROI_COLUMNS)]
    for row in rows:
        cells = []
        for c in ROI_COLUMNS:
            v = row.get(c, "n/a")
            if isinstance(v, float):
                cells.append("n/a" if not np.isfinite(v) else f"{v:.6g}")
            else:
                cells.append(str(v))
        lines.append("\t".join(cells))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
