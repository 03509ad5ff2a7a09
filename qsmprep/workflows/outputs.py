"""Derivative sinks: publish the maps of a workflow into the BIDS derivative dataset.

Names follow :func:`qsmprep.bids.derivative_path`; every NIfTI gets a JSON sidecar with its
units, method, parameters, ``Sources`` (BIDS-relative input paths) and ``GeneratedBy``. Files
are written by :class:`~qsmprep.interfaces.WriteDerivative` (temporary name, then rename).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep.__about__ import __version__
from qsmprep.bids.derivatives import derivative_path
from qsmprep.interfaces import WriteDerivative
from qsmprep.workflows._util import params_of

__all__ = [
    "GENERATED_BY",
    "acquisition_sources",
    "cosmos_path",
    "init_cosmos_derivatives_wf",
    "init_metrics_derivatives_wf",
    "init_qsm_derivatives_wf",
    "init_swi_derivatives_wf",
]

GENERATED_BY = {"Name": "qsmprep", "Version": __version__}
"""``GeneratedBy`` entry of every sidecar."""

SKIPPED_SINGLE_ECHO = "skipped: single echo"
"""``PhaseOffsetRemoval`` of a total field map of one echo: the offset stays in the field."""

CHIMAP_REFERENCE = "mean of local mask"
"""``Reference`` entry of a Chimap sidecar: chi has mean 0 over the local-field mask."""


def acquisition_sources(acquisition) -> list[str]:
    """BIDS-relative input paths of an acquisition (magnitude then phase, by echo)."""
    sources = getattr(acquisition, "sources", None)
    if sources is not None:
        return list(sources)
    return [Path(p).name for p in [*acquisition.magnitude, *acquisition.phase]]


def _sink(name: str, out_file: Path, sidecar: dict | None) -> pe.Node:
    ds = WriteDerivative(out_file=str(out_file))
    if sidecar is not None:
        ds.inputs.sidecar = sidecar
    return pe.Node(ds, name=name, run_without_submitting=True)


def init_qsm_derivatives_wf(
    *,
    acquisition,
    output_dir: str | Path,
    methods: Sequence[str],
    bg_method: str,
    mask_method: str,
    unwrap_method: str,
    phase_sign: int = 1,
    method_params: Mapping[str, Mapping] | None = None,
    r2star: bool = False,
    provided_mask: str | Path | None = None,
    provided_field: str | Path | None = None,
    chimaps: bool = True,
    name: str = "qsm_derivatives_wf",
) -> pe.Workflow:
    """Write the masks, field maps and Chimaps of one acquisition (and its R2* maps).

    ``provided_mask`` / ``provided_field``: the brain mask / total field the user gave
    (``--mask-dir`` / ``--field-dir``); their sidecars say ``"Method": "provided"`` and
    ``"Source"``: the file's absolute path. ``chimaps=False`` leaves out the Chimap sinks
    (``ds_chimap_<method>``) and their inputs, for when another workflow writes the Chimaps
    (the space workflow, with ``--reference-region csf``).

    Inputs (``inputnode``)
    ----------------------
    brain_mask, local_mask, reliable_mask, total_field, noise_field, local_field
        From the field workflow.
    bg_meta, local_mask_meta
        Sidecar entries of the background removal, for the local field and the local mask.
    chimap_<method>, meta_<method>
        From the inversion workflow (with ``chimaps`` only).
    r2star, t2star, s0, r2star_meta
        With ``r2star``: the maps of :class:`~qsmprep.interfaces.R2StarMap` and its sidecar
        entries, written as ``<prefix>_R2starmap`` (1/s), ``<prefix>_T2starmap`` (s) and
        ``<prefix>_S0map`` (BIDS quantitative-map suffixes).

    Each sink node (``ds_<map>``) reports its written path as ``out_file``.
    """
    workflow = pe.Workflow(name=name)
    a = acquisition
    fields = ["brain_mask", "local_mask", "total_field", "noise_field", "local_field"]
    chimap_methods = list(methods) if chimaps else []
    per_method = [f"{k}_{m}" for m in chimap_methods for k in ("chimap", "meta")]
    inputnode = pe.Node(
        IdentityInterface(
            fields=[
                *fields,
                "reliable_mask",
                "bg_meta",
                "local_mask_meta",
                *per_method,
                "r2star",
                "t2star",
                "s0",
                "r2star_meta",
            ]
        ),
        name="inputnode",
    )
    base = {"Sources": acquisition_sources(a), "GeneratedBy": GENERATED_BY}
    if a.notes:
        base["InputNotes"] = list(a.notes)
    echo = {
        "EchoTime": [float(t) for t in a.echo_times],
        "B0": float(a.b0),
        "PhaseUnits": a.phase_units,
        "PhaseSign": int(phase_sign),
    }

    single = len(a.echo_times) == 1
    if single:
        offset_removal = SKIPPED_SINGLE_ECHO
    elif params_of(method_params, "unwrap").get("remove_offset", True) is False:
        offset_removal = "none (remove_offset=False)"
    else:
        offset_removal = "MCPC-3D-S"

    def path(desc, suffix, ext=".nii.gz"):
        return derivative_path(output_dir, a, desc=desc, suffix=suffix, extension=ext)

    mask_side = {
        "Type": "Brain",
        "Method": mask_method,
        "Parameters": params_of(method_params, "mask"),
    }
    if provided_mask is not None:
        mask_side = {"Type": "Brain", "Method": "provided", "Source": str(provided_mask)}
    ds_brain_mask = _sink("ds_brain_mask", path("brain", "mask"), {**mask_side, **base})
    ds_local_mask = _sink(
        "ds_local_mask",
        path("local", "mask"),
        {
            "Type": "Brain",
            "Description": "voxels where the local field is valid; TKD, TSVD and L2 maps cover"
            " them, TV and MEDI maps the brain mask",
            "BackgroundMethod": bg_method,
            **base,
        },
    )
    ds_reliable_mask = _sink(
        "ds_reliable_mask",
        path("reliable", "mask"),
        {
            "Type": "Brain",
            "Description": "the brain mask: the total field was provided, with no multi-echo fit"
            " residual to judge it by, so no voxel is marked unreliable"
            if provided_field is not None
            else "the brain mask: with one echo there is no multi-echo fit residual"
            " to judge the field by, so no voxel is marked unreliable"
            if single
            else "brain voxels whose phase evolves linearly over the echoes (multi-echo"
            " fit residual within the robust threshold); the inversions give the others zero"
            " data weight, and those near the edge are left out of LBV's and PDF's mask",
            "Parameters": params_of(method_params, "reliability"),
            **base,
        },
    )
    total_side = {
        "Units": "Hz",
        "Description": "total field offset: unwrapped phase of the single echo over 2 pi TE"
        if single
        else "total field offset: weighted linear fit of the unwrapped phase",
        "SkullStripped": True,
        "UnwrapMethod": unwrap_method,
        "PhaseOffsetRemoval": offset_removal,
    }
    if provided_field is not None:
        total_side = {
            "Units": "Hz",
            "Description": "total field offset as provided (Source), 0 outside the brain mask;"
            " not unwrapped or fitted here",
            "SkullStripped": True,
            "Method": "provided",
            "Source": str(provided_field),
        }
    ds_total_field = _sink(
        "ds_total_field", path("total", "fieldmap"), {**total_side, **echo, **base}
    )
    ds_noise_field = _sink(
        "ds_noise_field",
        path("noise", "fieldmap"),
        {
            "Units": "Hz",
            "Description": "standard deviation a weighted fit of the echoes would give the"
            " provided total field (magnitude and echo times only)"
            if provided_field is not None
            else "standard deviation of the total field: the phase noise (noise std"
            " over magnitude) over 2 pi TE of the single echo"
            if single
            else "standard deviation of the fitted total field",
            "SkullStripped": True,
            **echo,
            **base,
        },
    )
    ds_local_field = _sink(
        "ds_local_field",
        path("local", "fieldmap"),
        {
            "Units": "Hz",
            "Description": "local field after background field removal",
            "SkullStripped": True,
            "Method": bg_method,
            "B0Direction": [float(v) for v in a.b0_dir],
            **echo,
            **base,
        },
    )

    workflow.connect([
        (inputnode, ds_brain_mask, [("brain_mask", "in_file")]),
        (inputnode, ds_local_mask, [("local_mask", "in_file"), ("local_mask_meta", "meta")]),
        (inputnode, ds_reliable_mask, [("reliable_mask", "in_file")]),
        (inputnode, ds_total_field, [("total_field", "in_file")]),
        (inputnode, ds_noise_field, [("noise_field", "in_file")]),
        (inputnode, ds_local_field, [("local_field", "in_file"), ("bg_meta", "meta")]),
    ])  # fmt: skip

    for method in chimap_methods:
        ds_chimap = _sink(
            f"ds_chimap_{method}",
            path(method, "Chimap"),
            {
                "Units": "ppm",
                "SkullStripped": True,
                "Method": method,
                "Reference": CHIMAP_REFERENCE,
                "B0": float(a.b0),
                "B0Direction": [float(v) for v in a.b0_dir],
                "EchoTime": [float(t) for t in a.echo_times],
                "BackgroundMethod": bg_method,
                **base,
            },
        )
        workflow.connect([
            (inputnode, ds_chimap, [(f"chimap_{method}", "in_file"), (f"meta_{method}", "meta")]),
        ])  # fmt: skip
    if r2star:
        relax = {
            "SkullStripped": True,
            "EchoTime": [float(t) for t in a.echo_times],
            "MagneticFieldStrength": float(a.b0),
            "SignalModel": "S(TE) = S0 exp(-R2star TE), fitted to the magnitude of each voxel",
            **base,
        }
        maps = (
            ("r2star", "R2starmap", "1/s", "R2* = 1/T2*, clipped to R2starRange"),
            ("t2star", "T2starmap", "s", "T2* = 1/R2*, at most T2starMax"),
            ("s0", "S0map", "arbitrary", "signal at TE = 0, least squares given R2*"),
        )
        for key, suffix, units, desc in maps:
            ds = _sink(
                f"ds_{key}",
                path(None, suffix),
                {"Units": units, "Description": desc, **relax},
            )
            workflow.connect([
                (inputnode, ds, [(key, "in_file"), ("r2star_meta", "meta")]),
            ])  # fmt: skip
    return workflow


SWI_DESCS = ("swi", "minip", "smwipara", "smwidia")
"""``desc-`` labels of the susceptibility-weighted images (suffix ``T2starw``)."""


def init_swi_derivatives_wf(
    *,
    acquisition,
    output_dir: str | Path,
    smwi_method: str | None = None,
    phase_sign: int = 1,
    name: str = "swi_derivatives_wf",
) -> pe.Workflow:
    """Write the SWI, its minIP and (with ``smwi_method``) the two SMWI of one acquisition.

    Named ``<prefix>_desc-{swi,minip,smwipara,smwidia}_T2starw.nii.gz``: T2*-weighted images
    of the whole head (``SkullStripped: false``), a name the BIDS validator accepts.

    Inputs (``inputnode``)
    ----------------------
    swi, minip, swi_meta, minip_meta
        From :class:`~qsmprep.interfaces.ComputeSWI`.
    smwi_para, smwi_dia, smwi_meta
        From :class:`~qsmprep.interfaces.ComputeSMWI` (with ``smwi_method``).
    """
    workflow = pe.Workflow(name=name)
    a = acquisition
    inputnode = pe.Node(
        IdentityInterface(
            fields=["swi", "minip", "swi_meta", "minip_meta", "smwi_para", "smwi_dia", "smwi_meta"]
        ),
        name="inputnode",
    )
    base = {
        "SkullStripped": False,
        "EchoTime": [float(t) for t in a.echo_times],
        "B0": float(a.b0),
        "PhaseSign": int(phase_sign),
        "Sources": acquisition_sources(a),
        "GeneratedBy": GENERATED_BY,
    }

    def path(desc):
        return derivative_path(output_dir, a, desc=desc, suffix="T2starw", extension=".nii.gz")

    swi_text = (
        "susceptibility-weighted image (CLEAR-SWI style): root-sum-of-squares magnitude over "
        "echoes times the phase mask (1 - phi/pi for positive phi, 1 otherwise) to the power "
        "'power', phi = 2 pi TE x the total field high-passed with a Gaussian of 'sigma_mm'; "
        "phase weighting in the reliable brain mask, the magnitude elsewhere"
    )
    ds_swi = _sink("ds_swi", path("swi"), {"Description": swi_text, "Method": "swi", **base})
    ds_minip = _sink(
        "ds_minip",
        path("minip"),
        {
            "Description": "sliding minimum intensity projection of the SWI over slabs of "
            "'slab_mm' along the array axis closest to world z; only full slabs, each voxel "
            "at the centre of its slab (the affine is the SWI's moved by half a slab)",
            "Method": "minip",
            **base,
        },
    )
    workflow.connect([
        (inputnode, ds_swi, [("swi", "in_file"), ("swi_meta", "meta")]),
        (inputnode, ds_minip, [("minip", "in_file"), ("minip_meta", "meta")]),
    ])  # fmt: skip
    if smwi_method is not None:
        chimap = derivative_path(output_dir, a, desc=smwi_method, suffix="Chimap").name
        for key, sign in (("para", "paramagnetic"), ("dia", "diamagnetic")):
            ds = _sink(
                f"ds_smwi_{key}",
                path(f"smwi{key}"),
                {
                    "Description": f"susceptibility-map-weighted image ({sign} weighting): the "
                    "combined magnitude times the susceptibility mask (1 at chi of the other "
                    "sign, falling linearly to 0 at 'threshold' ppm) to the power 'power'",
                    "Method": f"smwi{key}",
                    "SusceptibilityMap": chimap,
                    "SusceptibilityMethod": smwi_method,
                    **base,
                },
            )
            workflow.connect([
                (inputnode, ds, [(f"smwi_{key}", "in_file"), ("smwi_meta", "meta")]),
            ])  # fmt: skip
    return workflow


def init_metrics_derivatives_wf(
    *,
    acquisition,
    output_dir: str | Path,
    name: str = "metrics_derivatives_wf",
) -> pe.Workflow:
    """Write ``<prefix>_metrics.tsv`` and ``<prefix>_metrics.json`` of one acquisition.

    Inputs (``inputnode``): ``metrics_tsv``, ``metrics_json``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["metrics_tsv", "metrics_json"]), name="inputnode"
    )
    tsv, json = (
        derivative_path(output_dir, acquisition, suffix="metrics", extension=ext)
        for ext in (".tsv", ".json")
    )
    ds_metrics_tsv = _sink("ds_metrics_tsv", tsv, None)
    ds_metrics_json = _sink("ds_metrics_json", json, None)
    workflow.connect([
        (inputnode, ds_metrics_tsv, [("metrics_tsv", "in_file")]),
        (inputnode, ds_metrics_json, [("metrics_json", "in_file")]),
    ])  # fmt: skip
    return workflow


def init_cosmos_derivatives_wf(
    *,
    acquisitions: Sequence,
    output_dir: str | Path,
    name: str = "cosmos_derivatives_wf",
) -> pe.Workflow:
    """Write the COSMOS Chimap of one orientation group.

    Named ``sub-<label>[_ses-<label>]_desc-cosmos_Chimap.nii.gz`` (see
    :func:`qsmprep.bids.derivative_path`).

    Inputs (``inputnode``): ``chimap``, ``meta`` (sidecar entries of the COSMOS node).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["chimap", "meta"]), name="inputnode")
    first = acquisitions[0]
    ds_cosmos = _sink(
        "ds_cosmos",
        cosmos_path(output_dir, acquisitions),
        {
            "Units": "ppm",
            "SkullStripped": True,
            "Method": "cosmos",
            "Reference": "mean of the common local mask of the orientations",
            "B0": [float(a.b0) for a in acquisitions],
            "B0Direction": [[float(v) for v in a.b0_dir] for a in acquisitions],
            "Orientations": [a.prefix for a in acquisitions],
            "EchoTime": [float(t) for t in first.echo_times],
            "Sources": [s for a in acquisitions for s in acquisition_sources(a)],
            "GeneratedBy": GENERATED_BY,
        },
    )
    workflow.connect([(inputnode, ds_cosmos, [("chimap", "in_file"), ("meta", "meta")])])
    return workflow


def cosmos_path(output_dir, acquisitions: Sequence) -> Path:
    """Derivative path of the COSMOS Chimap of an orientation group."""
    first = acquisitions[0]
    return derivative_path(
        output_dir, (first.subject, first.session), desc="cosmos", suffix="Chimap"
    )
