"""QSM workflow of one acquisition: field maps, inversions, metrics and derivatives."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep import methods as registry
from qsmprep.config import OUTPUTS
from qsmprep.dl.weights import TRAINED_BACKGROUND
from qsmprep.interfaces import R2StarMap
from qsmprep.recon.background import DEFAULT_METHOD
from qsmprep.recon.unwrap import resolve_method as resolve_unwrap_method
from qsmprep.space.plan import REFERENCE_REGIONS
from qsmprep.workflows._util import gpu_work, params_of
from qsmprep.workflows.field import init_field_wf
from qsmprep.workflows.inversion import init_inversion_wf
from qsmprep.workflows.metrics import init_metrics_wf
from qsmprep.workflows.outputs import init_qsm_derivatives_wf, init_swi_derivatives_wf
from qsmprep.workflows.swi import init_swi_wf, smwi_method_of

__all__ = ["UNWRAP_METHODS", "init_qsm_wf", "makes_r2star", "resolve_unwrap"]

LOGGER = logging.getLogger("qsmprep")

_OUTPUTS = [
    "brain_mask", "local_mask", "total_field", "noise_field", "local_field", "magnitude",
    "chimaps", "dc_residuals", "metrics_tsv", "metrics_json", "r2star", "t2star", "s0",
    "swi", "minip", "smwi_para", "smwi_dia",
]  # fmt: skip


UNWRAP_METHODS = ("auto", *registry.names("unwrap"))
"""Choices of ``--unwrap`` (the registry's unwrapping methods at import, :mod:`qsmprep.methods`);
``"auto"`` picks per acquisition (:func:`resolve_unwrap`)."""


def makes_r2star(outputs, n_echoes: int) -> bool:
    """Whether an acquisition of ``n_echoes`` gets R2*/T2*/S0 maps under ``outputs``
    (``None``: every output): asked for, and a decay to fit (two or more echoes)."""
    return "r2star" in (outputs or OUTPUTS) and int(n_echoes) >= 2


def resolve_unwrap(method: str, n_echoes: int) -> str:
    """The unwrapping method for an acquisition: ``"auto"`` means quality-guided region
    growing with temporal unwrapping for two or more echoes, and the Laplacian method for one
    echo (:func:`qsmprep.recon.unwrap.resolve_method`, which says why)."""
    return resolve_unwrap_method(method, n_echoes)


def init_qsm_wf(
    *,
    acquisition,
    output_dir: str | Path | None,
    methods: Sequence[str] = registry.defaults("inversion"),
    bg_method: str = DEFAULT_METHOD,
    unwrap_method: str = "auto",
    mask_method: str = "magnitude",
    method_params: Mapping[str, Mapping] | None = None,
    device: str = "cpu",
    phase_sign: int = 1,
    reference: str | Path | None = None,
    metrics: bool = True,
    omp_nthreads: int = 1,
    long_nthreads: int | None = None,
    outputs: Sequence[str] = OUTPUTS,
    reference_region: str = "mask",
    name: str = "qsm_wf",
) -> pe.Workflow:
    """Susceptibility maps of one acquisition, from its per-echo magnitude and phase files.

    Workflow graph::

        inputnode -> field_wf -> inversion_wf -> metrics_wf -> outputnode
                             \\-> derivatives_wf (masks, field maps, Chimaps [1])
                             \\-> r2star_map (magnitude, brain mask) -> derivatives_wf

    [1] with ``reference_region="mask"``; with ``"csf"`` the space workflow writes them.

    The acquisition's files and metadata are set on ``inputnode`` here; derivative names are
    derived from it (:func:`qsmprep.bids.derivative_path`). Embed the workflow in a larger one
    through ``inputnode``/``outputnode``; pass ``output_dir=None`` to leave out the sinks.

    Parameters
    ----------
    acquisition : :class:`qsmprep.bids.Acquisition`
        Uses ``magnitude``, ``phase``, ``echo_times``, ``b0``, ``b0_dir``, ``phase_units``
        and, for the derivative names and sidecars, its entities and ``sources``; a
        ``provided_mask`` / ``provided_field`` replaces the computed brain mask / total field
        (see :func:`~qsmprep.workflows.init_field_wf`).
    output_dir : path or None
        Root of the BIDS derivative dataset.
    methods : sequence of str
        Inversion methods (``desc-`` labels of the Chimaps).
    bg_method, unwrap_method, mask_method : str
        See :func:`~qsmprep.workflows.init_field_wf`; ``unwrap_method="auto"`` is resolved by
        :func:`resolve_unwrap` for this acquisition's number of echoes.
    method_params : dict, optional
        Keyword arguments by stage or method (``"mask"``, ``"unwrap"``, background and
        inversion method names).
    device : {"cpu", "auto", "cuda"}
        Device of background removal and inversion; GPU work is flagged with ``use_gpu``
        (:func:`~qsmprep.workflows.gpu_work`).
    phase_sign : {1, -1}
        Phase sign convention of the data.
    reference : path, optional
        A reference Chimap (ppm) on the acquisition's grid for the metrics.
    metrics : bool
        Include the metrics workflow (:func:`~qsmprep.workflows.init_metrics_wf`). Leave it
        out when the reference is computed from this workflow's outputs (COSMOS): the
        enclosing workflow then adds the metrics workflow beside it, as a nested workflow
        may not both feed and consume another one.
    omp_nthreads : int
        Threads of the CPU-heavy nodes.
    long_nthreads : int, optional
        Threads of the long-running inversion nodes (TV, MEDI, TFI); default ``omp_nthreads``
        (see :func:`~qsmprep.workflows.long_node_threads`).
    outputs : sequence of str
        Maps to make (:data:`qsmprep.config.OUTPUTS`). ``"r2star"`` adds the node ``r2star_map``
        (:class:`~qsmprep.interfaces.R2StarMap`, parameters from ``method_params["r2star"]``,
        e.g. ``{"method": "nlls"}``) on the 4D magnitude and the brain mask, and its R2*, T2*
        and S0 derivatives; an acquisition of one echo has no R2* and skips it (logged).
        ``"swi"`` adds the SWI workflow (:func:`~qsmprep.workflows.swi.init_swi_wf`): SWI and
        minIP from the loaded magnitude and the total field; with ``"chi"`` too, the SMWI of
        one Chimap: the first classical method of ``methods``
        (:func:`~qsmprep.workflows.swi.smwi_method_of`); none without a method.
    reference_region : {"mask", "csf"}
        Where the written native Chimaps have mean 0 (``--reference-region``). ``"mask"``:
        the local-field mask, as the inversions give them; this workflow writes them.
        ``"csf"``: the atlas ventricles, known only after registration; the space workflow
        (:func:`~qsmprep.workflows.space.add_space_wf`) references and writes them, and this
        workflow leaves out its Chimap sinks. ``outputnode.chimaps`` and the metrics are
        mean-referenced either way.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    magnitude, phase, echo_times, phase_units, phase_sign, b0, b0_dir
        Set from ``acquisition``.

    Outputs (``outputnode``)
    ------------------------
    brain_mask, local_mask, total_field, noise_field, local_field, magnitude
        From the field workflow (Hz; magnitude 4D).
    chimaps, dc_residuals
        Chi maps (ppm) and data-consistency residuals (%) in the order of ``methods``.
    meta_<method>
        Sidecar entries of each inversion (parameters, data-consistency residual, ...).
    r2star, t2star, s0
        R2* (1/s), T2* (s) and S0 maps in the brain mask (with ``"r2star"`` in ``outputs``).
    metrics_tsv, metrics_json
        The metrics table (with ``metrics`` only).
    swi, minip, smwi_para, smwi_dia
        Susceptibility-weighted images (with ``"swi"`` in ``outputs``; SMWI with ``"chi"``
        too).
    """
    methods = list(methods)
    use_gpu = gpu_work(device)
    a = acquisition
    n_echoes = len(a.echo_times)
    unwrap_method = resolve_unwrap(unwrap_method, n_echoes)
    if n_echoes == 1:
        LOGGER.info(
            "%s: one echo (TE %.2f ms): phase-offset removal is skipped (one echo cannot tell "
            "the offset from the field), the field is the unwrapped phase over 2 pi TE, and "
            "no voxel is judged unreliable (no multi-echo fit residual)",
            a.prefix, 1e3 * float(a.echo_times[0]),
        )  # fmt: skip
    n_voxels = int(np.prod(a.shape)) if getattr(a, "shape", None) else None
    outputs = list(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; choose from {list(OUTPUTS)}")
    if reference_region not in REFERENCE_REGIONS:
        raise ValueError(
            f"reference_region must be one of {list(REFERENCE_REGIONS)}, got {reference_region!r}"
        )
    make_r2star = makes_r2star(outputs, n_echoes)
    swi = "swi" in outputs
    smwi = swi and "chi" in outputs
    if "r2star" in outputs and not make_r2star:
        LOGGER.info("%s: one echo: no R2*/T2* map (a decay needs two or more echoes)", a.prefix)
    r2star_params = params_of(method_params, "r2star")
    r2star_method = r2star_params.pop("method", "auto")
    fields = ["magnitude", "phase", "echo_times", "phase_units", "phase_sign", "b0", "b0_dir"]

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    inputnode.inputs.magnitude = [str(p) for p in a.magnitude]
    inputnode.inputs.phase = [str(p) for p in a.phase]
    inputnode.inputs.echo_times = [float(t) for t in a.echo_times]
    inputnode.inputs.phase_units = a.phase_units
    inputnode.inputs.phase_sign = int(phase_sign)
    inputnode.inputs.b0 = float(a.b0)
    inputnode.inputs.b0_dir = [float(v) for v in a.b0_dir]
    outputnode = pe.Node(
        IdentityInterface(fields=[*_OUTPUTS, *[f"meta_{m}" for m in methods]]), name="outputnode"
    )

    # a brain mask and a total field the user provides (qsmprep.provided.attach_provided)
    provided_mask = getattr(a, "provided_mask", None)
    provided_field = getattr(a, "provided_field", None)
    # the networks get a local field made as their training data was
    deep = registry.names(kind="dl")
    dl_separate = bg_method != TRAINED_BACKGROUND and any(m in deep for m in methods)
    field_wf = init_field_wf(
        mask_method=mask_method,
        unwrap_method=unwrap_method,
        bg_method=bg_method,
        method_params=method_params,
        device=device,
        use_gpu=use_gpu,
        omp_nthreads=omp_nthreads,
        dl_bg_method=TRAINED_BACKGROUND if dl_separate else None,
        n_echoes=n_echoes,
        provided_mask=provided_mask is not None,
        provided_field=provided_field is not None,
        n_voxels=n_voxels,
    )
    if provided_mask is not None:
        field_wf.inputs.inputnode.brain_mask = str(provided_mask)
    if provided_field is not None:
        field_wf.inputs.inputnode.total_field = str(provided_field)
    inversion_wf = init_inversion_wf(
        methods=methods,
        method_params=method_params,
        device=device,
        use_gpu=use_gpu,
        omp_nthreads=omp_nthreads,
        long_nthreads=long_nthreads,
        dl_inputs=dl_separate,
        n_voxels=n_voxels,
    )
    if dl_separate:
        workflow.connect([
            (field_wf, inversion_wf, [
                (f"outputnode.dl_{k}", f"inputnode.dl_{k}")
                for k in ("local_field", "local_mask", "bg_meta")
            ]),
        ])  # fmt: skip

    workflow.connect([
        (inputnode, field_wf, [
            ("magnitude", "inputnode.magnitude"), ("phase", "inputnode.phase"),
            ("echo_times", "inputnode.echo_times"), ("phase_units", "inputnode.phase_units"),
            ("phase_sign", "inputnode.phase_sign"), ("b0_dir", "inputnode.b0_dir"),
            ("b0", "inputnode.b0"),
        ]),
        (inputnode, inversion_wf, [
            ("b0", "inputnode.b0"), ("b0_dir", "inputnode.b0_dir"),
            ("echo_times", "inputnode.echo_times"),
        ]),
        (field_wf, inversion_wf, [
            ("outputnode.local_field", "inputnode.local_field"),
            ("outputnode.local_mask", "inputnode.local_mask"),
            ("outputnode.total_field", "inputnode.total_field"),
            ("outputnode.magnitude", "inputnode.magnitude"),
            ("outputnode.noise_field", "inputnode.noise_field"),
            ("outputnode.brain_mask", "inputnode.brain_mask"),
            ("outputnode.reliable_mask", "inputnode.reliable_mask"),
            ("outputnode.bg_meta", "inputnode.bg_meta"),
        ]),
        (field_wf, outputnode, [
            ("outputnode.brain_mask", "brain_mask"), ("outputnode.local_mask", "local_mask"),
            ("outputnode.total_field", "total_field"),
            ("outputnode.noise_field", "noise_field"),
            ("outputnode.local_field", "local_field"), ("outputnode.magnitude", "magnitude"),
        ]),
        (inversion_wf, outputnode, [
            ("outputnode.chimaps", "chimaps"), ("outputnode.dc_residuals", "dc_residuals"),
            *[(f"outputnode.meta_{m}", f"meta_{m}") for m in methods],
        ]),
    ])  # fmt: skip
    if metrics:
        metrics_wf = init_metrics_wf(
            acquisition=a, methods=methods, output_dir=output_dir, reference=reference
        )
        workflow.connect([
            (field_wf, metrics_wf, [
                ("outputnode.local_field", "inputnode.local_field"),
                ("outputnode.local_mask", "inputnode.local_mask"),
            ]),
            (inversion_wf, metrics_wf, [("outputnode.chimaps", "inputnode.chimaps")]),
            (metrics_wf, outputnode, [
                ("outputnode.metrics_tsv", "metrics_tsv"),
                ("outputnode.metrics_json", "metrics_json"),
            ]),
        ])  # fmt: skip

    if make_r2star:
        r2star_map = pe.Node(
            R2StarMap(method=r2star_method, params=r2star_params), name="r2star_map"
        )
        workflow.connect([
            (inputnode, r2star_map, [("echo_times", "echo_times")]),
            (field_wf, r2star_map, [
                ("outputnode.magnitude", "magnitude"), ("outputnode.brain_mask", "mask"),
            ]),
            (r2star_map, outputnode, [("r2star", "r2star"), ("t2star", "t2star"), ("s0", "s0")]),
        ])  # fmt: skip

    if output_dir is not None:
        derivatives_wf = init_qsm_derivatives_wf(
            acquisition=a,
            output_dir=output_dir,
            methods=methods,
            bg_method=bg_method,
            mask_method=mask_method,
            unwrap_method=unwrap_method,
            phase_sign=phase_sign,
            method_params=method_params,
            r2star=make_r2star,
            provided_mask=provided_mask,
            provided_field=provided_field,
            chimaps=reference_region == "mask",  # "csf": the space workflow writes them
        )
        field_out = ["brain_mask", "local_mask", "total_field", "noise_field", "local_field"]
        workflow.connect([
            (field_wf, derivatives_wf, [
                (f"outputnode.{f}", f"inputnode.{f}") for f in field_out
            ]),
            (field_wf, derivatives_wf, [
                ("outputnode.bg_meta", "inputnode.bg_meta"),
                ("outputnode.local_mask_meta", "inputnode.local_mask_meta"),
                ("outputnode.reliable_mask", "inputnode.reliable_mask"),
            ]),
        ])  # fmt: skip
        if reference_region == "mask":
            workflow.connect([
                (inversion_wf, derivatives_wf, [
                    (f"outputnode.{k}_{m}", f"inputnode.{k}_{m}")
                    for m in methods for k in ("chimap", "meta")
                ]),
            ])  # fmt: skip
        if make_r2star:
            workflow.connect([
                (r2star_map, derivatives_wf, [
                    ("r2star", "inputnode.r2star"), ("t2star", "inputnode.t2star"),
                    ("s0", "inputnode.s0"), ("meta", "inputnode.r2star_meta"),
                ]),
            ])  # fmt: skip

    if swi:
        smwi_from = smwi_method_of(methods) if smwi else None
        swi_wf = init_swi_wf(method_params=method_params, smwi_method=smwi_from)
        workflow.connect([
            (inputnode, swi_wf, [("echo_times", "inputnode.echo_times")]),
            (field_wf, swi_wf, [
                ("outputnode.magnitude", "inputnode.magnitude"),
                ("outputnode.total_field", "inputnode.total_field"),
                ("outputnode.reliable_mask", "inputnode.mask"),
            ]),
            (swi_wf, outputnode, [
                ("outputnode.swi", "swi"), ("outputnode.minip", "minip"),
            ]),
        ])  # fmt: skip
        if smwi_from is not None:
            workflow.connect([
                (inversion_wf, swi_wf, [(f"outputnode.chimap_{smwi_from}", "inputnode.chimap")]),
                (swi_wf, outputnode, [
                    ("outputnode.smwi_para", "smwi_para"), ("outputnode.smwi_dia", "smwi_dia"),
                ]),
            ])  # fmt: skip
        if output_dir is not None:
            swi_derivatives_wf = init_swi_derivatives_wf(
                acquisition=a, output_dir=output_dir, smwi_method=smwi_from, phase_sign=phase_sign
            )
            outs = ["swi", "minip", "swi_meta", "minip_meta"]
            if smwi_from is not None:
                outs += ["smwi_para", "smwi_dia", "smwi_meta"]
            workflow.connect([
                (swi_wf, swi_derivatives_wf, [
                    (f"outputnode.{k}", f"inputnode.{k}") for k in outs
                ]),
            ])  # fmt: skip

    workflow.__desc__ = (
        f"Acquisition {a.prefix}: {n_echoes} echo{'es' if n_echoes != 1 else ''} at "
        f"{float(a.b0):g} T "
        f"(phase in {a.phase_units})."
    )
    workflow.__citations__ = []
    if make_r2star:
        how = (
            "chosen by the echoes: ARLO (Pei et al., 2015) for three or more equally spaced "
            "echoes, else a nonlinear or, for two echoes, a log-linear fit"
            if r2star_method == "auto"
            else registry.get(r2star_method, "r2star").summary
        )
        workflow.__desc__ += (
            f" R2* (1/s) was fitted to the magnitude of the echoes in the brain mask, {how}, "
            "clipped to [0, 1000] 1/s, with T2* = 1/R2* and S0."
        )
        # the registry record's references; "auto"'s phrase cites ARLO, the estimator it names
        cited = registry.get("arlo" if r2star_method == "auto" else r2star_method, "r2star")
        workflow.__citations__ += [c.key for c in cited.citations]
    return workflow
