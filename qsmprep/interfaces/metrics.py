"""Quality metrics of the chi maps of one acquisition: a TSV and a JSON file."""

from __future__ import annotations

import json
import math
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep import metrics
from qsmprep.interfaces._nifti import load, voxel_size
from qsmprep.recon.inversion.consistency import data_consistency
from qsmprep.recon.kernels import hz_to_ppm

__all__ = ["METRIC_COLUMNS", "ComputeMetrics"]

REFERENCE_COLUMNS = ("nrmse", "hfen", "ssim", "xsim", "psnr", "slope", "corr")
"""Columns that compare with the reference (:func:`qsmprep.metrics.evaluate`; "n/a" without)."""

METRIC_COLUMNS = ("method", "reference", *REFERENCE_COLUMNS, "dc_residual")
"""Columns of ``<prefix>_metrics.tsv``, in order."""

COLUMN_DESCRIPTIONS = {
    "method": {"Description": "inversion method (the desc- label of the Chimap)"},
    "reference": {"Description": "file name of the reference Chimap, or none"},
    "nrmse": {"Description": "de-meaned normalised RMS error", "Units": "%"},
    "hfen": {"Description": "high-frequency error norm (LoG sigma 1.5 voxels)", "Units": "%"},
    "ssim": {"Description": "structural similarity"},
    "xsim": {"Description": "SSIM with the QSM challenge 2.0 constants"},
    "psnr": {"Description": "peak signal-to-noise ratio in the mask", "Units": "dB"},
    "slope": {"Description": "regression slope of the map against the reference"},
    "corr": {"Description": "Pearson correlation with the reference"},
    "dc_residual": {
        "Description": "data-consistency residual 100 ||M (D chi - f)|| / ||M f|| (de-meaned),"
        " reference-free",
        "Units": "%",
    },
}


class _MetricsInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="chi maps (ppm)")
    methods = traits.List(traits.Str, mandatory=True, desc="method name of each chi map")
    mask = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    local_field = File(exists=True, mandatory=True, desc="local field (Hz)")
    b0 = traits.Float(mandatory=True, desc="field strength (T)")
    b0_dir = traits.List(
        traits.Float,
        minlen=3,
        maxlen=3,
        value=[0.0, 0.0, 1.0],
        usedefault=True,
        desc="B0 direction in voxel coordinates",
    )
    reference = File(exists=True, desc="reference chi map (ppm) on the same grid")
    reference_mask = File(exists=True, desc="where the reference is valid (else: mask)")
    reference_name = traits.Str(desc="name of the reference in the table (default: file name)")


class _MetricsOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="one row per method (METRIC_COLUMNS)")
    out_json = File(exists=True, desc="the same values with column descriptions")
    rows = traits.List(traits.Dict, desc="one dict per method (None for n/a)")


class ComputeMetrics(SimpleInterface):
    """Metrics against an optional reference and the data-consistency residual per method."""

    input_spec = _MetricsInputSpec
    output_spec = _MetricsOutputSpec

    def _run_interface(self, runtime):
        inp = self.inputs
        if len(inp.in_files) != len(inp.methods):
            raise ValueError(f"got {len(inp.in_files)} chi maps for methods {inp.methods}")
        m, _ = load(inp.mask, bool)
        field_hz, img = load(inp.local_field)
        field, vs = hz_to_ppm(field_hz, inp.b0), voxel_size(img)
        ref = name = None
        if isdefined(inp.reference):
            ref, _ = load(inp.reference)
            if ref.shape != m.shape:
                raise ValueError(
                    f"reference {inp.reference} has shape {ref.shape} but the maps have shape"
                    f" {m.shape}; give a reference Chimap on the grid of the acquisition"
                )
            name = inp.reference_name if isdefined(inp.reference_name) else None
            name = name or os.path.basename(inp.reference)
        evaluated = m
        if isdefined(inp.reference_mask):
            evaluated = m & load(inp.reference_mask, bool)[0]
        rows = []
        for method, f in zip(inp.methods, inp.in_files, strict=True):
            chi, _ = load(f)
            row = {"method": method, "reference": name or "none"}
            scores = metrics.evaluate(chi, ref, evaluated) if ref is not None else {}
            row.update({k: _finite(scores.get(k)) for k in REFERENCE_COLUMNS})
            row["dc_residual"] = data_consistency(chi, field, m, vs, b0_dir=tuple(inp.b0_dir))
            rows.append(row)
        self._results["rows"] = rows
        self._results["out_tsv"] = _write_tsv(rows, os.path.abspath("metrics.tsv"))
        desc = {k: COLUMN_DESCRIPTIONS[k] for k in METRIC_COLUMNS}
        payload = {"Columns": desc, "Reference": name or "none", "Metrics": rows}
        path = os.path.abspath("metrics.json")
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=2)
        self._results["out_json"] = path
        return runtime


def _finite(v):
    """A float, or None for a missing or non-finite value (JSON has no NaN)."""
    return float(v) if v is not None and math.isfinite(v) else None


def _cell(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _write_tsv(rows, path) -> str:
    lines = ["\t".join(METRIC_COLUMNS)]
    lines += ["\t".join(_cell(r[c]) for c in METRIC_COLUMNS) for r in rows]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
