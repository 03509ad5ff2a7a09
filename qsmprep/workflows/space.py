"""Template-space workflow of one acquisition: registration, atlas ROIs, template-space maps.

Workflow graph (``space_<prefix>_wf``)::

    inputnode (magnitude, brain_mask, local_mask, chimaps, meta_<method>)
      -> register_<tpl> (rigid + affine + SyN, antspyx) -> registration figure, transforms
      -> atlas_to_native (atlas labels -> native, generic label)        [with atlases]
      -> reference_<method> (chi - mean in the ventricles)              [--reference-region csf]
      -> roistats_<method> (mean, median, std, voxels per region)       [with atlases]
      -> to_<space>_<method> (chi resampled into each output space)

Derivatives (under ``output_dir/sub-<label>[/ses-<label>]/anat/``, fMRIPrep's naming for
transforms)::

    <prefix>_from-<suffix>_to-<tpl>_mode-image_xfm.h5      (+ .json: Dice, parameters)
    <prefix>_from-<tpl>_to-<suffix>_mode-image_xfm.h5
    <prefix>_space-<tpl>[_res-<n>]_desc-<method>_Chimap.nii.gz   (+ .json)
    <prefix>_desc-atlas_dseg.nii.gz + .tsv                  (atlas regions in native space)
    <prefix>_desc-<method>_roistats.tsv (+ .json)
    sub-<label>/figures/<prefix>_space-<tpl>_desc-registration_overlay.png

``<suffix>`` is the acquisition's BIDS suffix (``MEGRE`` or ``T2starw``): the native space of
the magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface, Merge, Select
from nipype.pipeline import engine as pe

from qsmprep.bids.derivatives import derivative_path
from qsmprep.interfaces import WriteDerivative
from qsmprep.interfaces.space import (
    ApplyTemplateTransform,
    AtlasToNative,
    ReferenceToRegion,
    RegisterToTemplate,
    RegistrationFigure,
    ROIStatistics,
)
from qsmprep.recon.background import DEFAULT_METHOD
from qsmprep.space.atlas import CSF_LABEL
from qsmprep.space.plan import space_params
from qsmprep.workflows._util import node_label
from qsmprep.workflows.outputs import CHIMAP_REFERENCE, GENERATED_BY, acquisition_sources
from qsmprep.workflows.qsm import makes_r2star

__all__ = ["add_space_wf", "init_space_wf", "space_path"]


def space_path(output_dir, acquisition, name: str, *, figures: bool = False) -> Path:
    """``<anat folder>/<prefix>_<name>`` (or ``sub-<label>/figures/<prefix>_<name>``)."""
    anat = derivative_path(output_dir, acquisition, suffix="x").parent
    if figures:
        anat = Path(output_dir) / f"sub-{acquisition.subject}" / "figures"
    return anat / f"{acquisition.prefix}_{name}"


def _sink(name: str, out_file: Path, sidecar: dict | None = None) -> pe.Node:
    ds = WriteDerivative(out_file=str(out_file))
    if sidecar is not None:
        ds.inputs.sidecar = sidecar
    return pe.Node(ds, name=name, run_without_submitting=True)


def init_space_wf(
    *,
    acquisition,
    plan,
    methods: Sequence[str],
    output_dir: str | Path | None,
    bg_method: str = DEFAULT_METHOD,
    registration_params: dict | None = None,
    omp_nthreads: int = 1,
    r2star: bool = False,
    name: str = "space_wf",
) -> pe.Workflow:
    """Registration to the templates of ``plan``, atlas ROI statistics and template-space maps.

    Parameters
    ----------
    acquisition : :class:`qsmprep.bids.Acquisition`
        For derivative names and sidecars.
    plan : :class:`qsmprep.space.SpacePlan`
        From :func:`qsmprep.space.plan_spaces` (checked at start-up).
    methods : sequence of str
        Inversion methods, in the order of the ``chimaps`` input.
    output_dir : path or None
        Root of the derivative dataset (``None``: no sinks).
    bg_method : str
        Recorded in the Chimap sidecars.
    registration_params : dict, optional
        Keyword arguments of :func:`qsmprep.space.registration.register_to_template`.
    omp_nthreads : int
        ITK threads of the registration nodes.
    r2star : bool
        The acquisition has an R2* map (input ``r2star``): with atlases, its ROI table too
        (``<prefix>_desc-r2star_roistats.tsv``, 1/s, regions in the brain mask).
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    magnitude, brain_mask, local_mask
        4D magnitude and masks from the field workflow.
    chimaps
        Chi maps (ppm, mean-referenced) in the order of ``methods``.
    r2star
        R2* map (1/s), with ``r2star``.
    meta_<method>
        Inversion sidecar entries (used when the native Chimaps are written here).

    Outputs (``outputnode``)
    ------------------------
    chimaps
        The native chi maps as referenced (ventricles with ``csf``), in ``methods`` order.
    forward_xfm, inverse_xfm, dice
        Of the atlas template's registration (or the first one).
    labels, roistats
        Native atlas labels and the ROI tables (one per method), when atlases are used.
    """
    methods = list(methods)
    a = acquisition
    csf = plan.reference_region == "csf"
    params = dict(registration_params or {})
    workflow = pe.Workflow(name=name)
    fields = ["magnitude", "brain_mask", "local_mask", "chimaps", *[f"meta_{m}" for m in methods]]
    if r2star:
        fields.append("r2star")
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(
        IdentityInterface(
            fields=["chimaps", "forward_xfm", "inverse_xfm", "dice", "labels", "roistats"]
        ),
        name="outputnode",
    )
    base = {"Sources": acquisition_sources(a), "GeneratedBy": GENERATED_BY}
    native = a.suffix

    regs = {}
    for template, files in plan.registrations.items():
        tpl_name = template.split(":")[0]
        label = node_label(template)
        reg = pe.Node(
            RegisterToTemplate(
                template=template,
                template_t1w=list(files["T1w"]),
                template_mask=list(files["mask"]),
                params=params,
                num_threads=omp_nthreads,
            ),
            name=f"register_{label}",
            n_procs=omp_nthreads,
            mem_gb=2.0,
        )
        workflow.connect([
            (inputnode, reg, [("magnitude", "magnitude"), ("brain_mask", "brain_mask")]),
        ])  # fmt: skip
        regs[template] = reg
        if output_dir is None:
            continue
        fig = pe.Node(
            RegistrationFigure(title=f"{a.prefix} -> {tpl_name}"), name=f"figure_{label}"
        )
        ds_fig = _sink(
            f"ds_figure_{label}",
            space_path(
                output_dir, a, f"space-{tpl_name}_desc-registration_overlay.png", figures=True
            ),
        )
        fwd_name = f"from-{native}_to-{tpl_name}_mode-image_xfm.h5"
        inv_name = f"from-{tpl_name}_to-{native}_mode-image_xfm.h5"
        ds_fwd = _sink(
            f"ds_xfm_to_{label}",
            space_path(output_dir, a, fwd_name),
            {
                "Description": f"composite ITK transform (rigid, affine, SyN) from the "
                f"{native} magnitude to {tpl_name}: resamples native images into the template",
                "From": native,
                "To": tpl_name,
                **base,
            },
        )
        ds_inv = _sink(
            f"ds_xfm_from_{label}",
            space_path(output_dir, a, inv_name),
            {
                "Description": f"inverse of {a.prefix}_{fwd_name}: resamples template images "
                "(atlases) into the native grid",
                "From": tpl_name,
                "To": native,
                **base,
            },
        )
        workflow.connect([
            (reg, fig, [("warped", "warped"), ("fixed", "fixed"), ("fixed_mask", "fixed_mask")]),
            (fig, ds_fig, [("out_file", "in_file")]),
            (reg, ds_fwd, [("forward_xfm", "in_file"), ("meta", "meta")]),
            (reg, ds_inv, [("inverse_xfm", "in_file"), ("meta", "meta")]),
        ])  # fmt: skip

    main_tpl = plan.atlas_template or next(iter(plan.registrations))
    main_reg = regs[main_tpl]
    workflow.connect([
        (main_reg, outputnode, [
            ("forward_xfm", "forward_xfm"), ("inverse_xfm", "inverse_xfm"), ("dice", "dice"),
        ]),
    ])  # fmt: skip

    select = {}
    for i, method in enumerate(methods):
        sel = pe.Node(Select(index=[i]), name=f"select_{method}", run_without_submitting=True)
        workflow.connect([(inputnode, sel, [("chimaps", "inlist")])])
        select[method] = (sel, "out")

    atlas = None
    if plan.atlases:
        atlas = pe.Node(
            AtlasToNative(
                atlases=[
                    {"spec": x["spec"], "dseg": str(x["dseg"]), "table": dict(x["table"])}
                    for x in plan.atlases
                ],
                num_threads=omp_nthreads,
            ),
            name="atlas_to_native",
        )
        workflow.connect([
            (main_reg, atlas, [("inverse_xfm", "inverse_xfm")]),
            (inputnode, atlas, [("brain_mask", "brain_mask")]),
            (atlas, outputnode, [("out_file", "labels")]),
        ])  # fmt: skip
        if output_dir is not None:
            ds_dseg = _sink(
                "ds_atlas_dseg",
                space_path(output_dir, a, "desc-atlas_dseg.nii.gz"),
                {
                    "Description": "atlas regions warped from the template to this "
                    "acquisition (labels in the .tsv)",
                    "Template": plan.atlas_template,
                    **base,
                },
            )
            ds_dseg_tsv = _sink(
                "ds_atlas_dseg_tsv", space_path(output_dir, a, "desc-atlas_dseg.tsv")
            )
            workflow.connect([
                (atlas, ds_dseg, [("out_file", "in_file"), ("meta", "meta")]),
                (atlas, ds_dseg_tsv, [("out_tsv", "in_file")]),
            ])  # fmt: skip

    final = {}  # method -> (node, output) of the referenced native chi
    reference_text = CHIMAP_REFERENCE
    if csf:
        reference_text = "mean of the atlas ventricles (CSF) in the local mask"
    for method in methods:
        src = select[method]
        if csf:
            ref = pe.Node(ReferenceToRegion(label=CSF_LABEL), name=f"reference_{method}")
            workflow.connect([
                (src[0], ref, [(src[1], "chimap")]),
                (atlas, ref, [("out_file", "labels")]),
                (inputnode, ref, [("local_mask", "mask"), (f"meta_{method}", "meta")]),
            ])  # fmt: skip
            final[method] = (ref, "out_file")
            if output_dir is not None:
                ds = _sink(
                    f"ds_chimap_{method}",
                    derivative_path(output_dir, a, desc=method, suffix="Chimap"),
                    {
                        "Units": "ppm",
                        "Method": method,
                        "Reference": reference_text,
                        "B0": float(a.b0),
                        "B0Direction": [float(v) for v in a.b0_dir],
                        "EchoTime": [float(t) for t in a.echo_times],
                        "BackgroundMethod": bg_method,
                        "Atlases": [x["spec"] for x in plan.atlases],
                        "AtlasTemplate": plan.atlas_template,
                        **base,
                    },
                )
                workflow.connect([(ref, ds, [("out_file", "in_file"), ("meta", "meta")])])
        else:
            final[method] = src

        if atlas is not None:
            stats = pe.Node(ROIStatistics(), name=f"roistats_{method}")
            workflow.connect([
                (final[method][0], stats, [(final[method][1], "chimap")]),
                (atlas, stats, [("out_file", "labels"), ("rois", "rois")]),
                (inputnode, stats, [("local_mask", "mask")]),
            ])  # fmt: skip
            if output_dir is not None:
                ds = _sink(
                    f"ds_roistats_{method}",
                    space_path(output_dir, a, f"desc-{method}_roistats.tsv"),
                    {
                        "Description": "susceptibility per atlas region (native space, "
                        "regions intersected with the local-field mask)",
                        "Units": "ppm",
                        "Method": method,
                        "Reference": reference_text,
                        "Template": plan.atlas_template,
                        "Atlases": [x["spec"] for x in plan.atlases],
                        "Columns": {
                            "roi": "region name",
                            "label": "value in <prefix>_desc-atlas_dseg.nii.gz",
                            "mean": "mean chi (ppm)",
                            "median": "median chi (ppm)",
                            "std": "standard deviation of chi (ppm)",
                            "voxels": "voxels of the region in the local-field mask",
                        },
                        **base,
                    },
                )
                workflow.connect([(stats, ds, [("out_file", "in_file")])])

    if atlas is not None and r2star:
        stats = pe.Node(ROIStatistics(), name="roistats_r2star")
        workflow.connect([
            (inputnode, stats, [("r2star", "chimap"), ("brain_mask", "mask")]),
            (atlas, stats, [("out_file", "labels"), ("rois", "rois")]),
        ])  # fmt: skip
        if output_dir is not None:
            ds = _sink(
                "ds_roistats_r2star",
                space_path(output_dir, a, "desc-r2star_roistats.tsv"),
                {
                    "Description": "R2* per atlas region (native space, regions intersected "
                    "with the brain mask, where the R2* map is defined)",
                    "Units": "1/s",
                    "Map": "R2starmap",
                    "Template": plan.atlas_template,
                    "Atlases": [x["spec"] for x in plan.atlases],
                    "Columns": {
                        "roi": "region name",
                        "label": "value in <prefix>_desc-atlas_dseg.nii.gz",
                        "mean": "mean R2* (1/s)",
                        "median": "median R2* (1/s)",
                        "std": "standard deviation of R2* (1/s)",
                        "voxels": "voxels of the region in the brain mask",
                    },
                    **base,
                },
            )
            workflow.connect([(stats, ds, [("out_file", "in_file")])])

    for space in plan.spaces:
        key = space.name if space.cohort is None else f"{space.name}:cohort-{space.cohort}"
        reg = regs[key]
        grid = plan.grids[space.spec]
        for method in methods:
            label = node_label(f"{space.spec}_{method}")
            warp = pe.Node(
                ApplyTemplateTransform(
                    reference=str(grid), suffix=f"_{node_label(space.entities)}",
                    num_threads=omp_nthreads,
                ),
                name=f"to_{label}",
            )  # fmt: skip
            workflow.connect([
                (final[method][0], warp, [(final[method][1], "in_file")]),
                (reg, warp, [(("forward_xfm", _as_list), "transforms")]),
            ])  # fmt: skip
            if output_dir is None:
                continue
            ds = _sink(
                f"ds_{label}",
                space_path(output_dir, a, f"{space.entities}_desc-{method}_Chimap.nii.gz"),
                {
                    "Units": "ppm",
                    "Method": method,
                    "Reference": reference_text,
                    "Template": space.name,
                    "Resolution": space.res,
                    "Interpolation": "linear (ANTs)",
                    "Transform": space_path(
                        output_dir, a, f"from-{native}_to-{space.name}_mode-image_xfm.h5"
                    ).name,
                    "B0": float(a.b0),
                    "BackgroundMethod": bg_method,
                    **base,
                },
            )
            workflow.connect([(warp, ds, [("out_file", "in_file")])])

    merged = pe.Node(Merge(len(methods)), name="merge_chimaps", run_without_submitting=True)
    for i, method in enumerate(methods, start=1):
        workflow.connect([(final[method][0], merged, [(final[method][1], f"in{i}")])])
    workflow.connect([(merged, outputnode, [("out", "chimaps")])])

    spaces_txt = ", ".join(s.spec for s in plan.spaces) or "none"
    workflow.__desc__ = (
        "The echo-combined magnitude (root sum of squares, N4 bias-corrected, brain-masked) was "
        "registered to the TemplateFlow template(s) "
        f"{', '.join(t.split(':')[0] for t in plan.registrations)} (Ciric et al., 2022) with "
        "ANTs (rigid, affine and symmetric normalisation, Mattes mutual information; Avants et "
        f"al., 2008); susceptibility maps were resampled into {spaces_txt}."
        + (
            f" Atlas regions ({', '.join(plan.rois.values())}; atlases "
            f"{', '.join(x['spec'] for x in plan.atlases)}) were warped to each acquisition "
            "with generic-label interpolation and summarised per method (mean, median, "
            "standard deviation, voxels)."
            if plan.atlases
            else ""
        )
        + (
            " Susceptibility was referenced to the mean over the atlas ventricles (CSF)."
            if csf
            else ""
        )
    )
    workflow.__citations__ = ["templateflow", "ants"]
    return workflow


def _as_list(value):
    return [value]


def add_space_wf(workflow: pe.Workflow, qsm_wf: pe.Workflow, acquisition, settings, plan):
    """Add the space workflow of one acquisition beside its QSM workflow and connect them.

    Feeds it the magnitude, masks and Chimaps from the ``outputnode`` of ``qsm_wf`` (and, with
    ``--reference-region csf``, the inversion sidecar entries ``meta_<method>``: the space
    workflow then writes the referenced native Chimaps, and ``qsm_wf`` must have been built
    with ``reference_region="csf"``, without Chimap sinks). Returns the space workflow
    (``space_<prefix>_wf``).
    """
    methods = list(settings.methods)
    r2star = makes_r2star(getattr(settings, "outputs", None), len(acquisition.echo_times))
    space_wf = init_space_wf(
        acquisition=acquisition,
        plan=plan,
        methods=methods,
        output_dir=settings.output_dir,
        bg_method=settings.bg_method,
        registration_params=space_params(settings)[1],
        omp_nthreads=settings.omp_nthreads,
        r2star=r2star,
        name=f"space_{node_label(acquisition.prefix)}_wf",
    )
    workflow.connect([
        (qsm_wf, space_wf, [
            ("outputnode.magnitude", "inputnode.magnitude"),
            ("outputnode.brain_mask", "inputnode.brain_mask"),
            ("outputnode.local_mask", "inputnode.local_mask"),
            ("outputnode.chimaps", "inputnode.chimaps"),
        ]),
    ])  # fmt: skip
    if r2star:
        workflow.connect([(qsm_wf, space_wf, [("outputnode.r2star", "inputnode.r2star")])])
    if plan.reference_region == "csf":
        workflow.connect([
            (qsm_wf, space_wf, [(f"outputnode.meta_{m}", f"inputnode.meta_{m}") for m in methods]),
        ])  # fmt: skip
    return space_wf
