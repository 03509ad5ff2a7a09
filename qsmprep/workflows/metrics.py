"""Metrics workflow: scores of an acquisition's chi maps, written as TSV + JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep.interfaces import ComputeMetrics
from qsmprep.workflows.outputs import init_metrics_derivatives_wf

__all__ = ["init_metrics_wf"]


def init_metrics_wf(
    *,
    acquisition,
    methods: Sequence[str],
    output_dir: str | Path | None,
    reference: str | Path | None = None,
    reference_input: str | None = None,
    name: str = "metrics_wf",
) -> pe.Workflow:
    """Metrics of the chi maps of one acquisition against an optional reference.

    Without a reference the table holds the reference-free data-consistency residual and
    ``n/a`` elsewhere (columns: :data:`qsmprep.interfaces.METRIC_COLUMNS`).

    Parameters
    ----------
    acquisition : :class:`qsmprep.bids.Acquisition`
        Gives ``b0``, ``b0_dir`` and the derivative names.
    methods : sequence of str
        Method of each chi map, in the order of ``inputnode.chimaps``.
    output_dir : path or None
        Root of the derivative dataset (None: no sink).
    reference : path, optional
        A reference Chimap file on the acquisition's grid.
    reference_input : str, optional
        Name (for the table) of a reference map connected to ``inputnode.reference`` and
        ``inputnode.reference_mask`` by the enclosing workflow, e.g. the COSMOS Chimap.
        Ignored when ``reference`` is given.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    chimaps, local_field, local_mask
        Chi maps (ppm), local field (Hz) and its mask.
    reference, reference_mask
        Only with ``reference_input``.

    Outputs (``outputnode``)
    ------------------------
    metrics_tsv, metrics_json, rows
        The table as files and as a list of dicts.
    """
    with_input = reference is None and reference_input is not None
    fields = ["chimaps", "local_field", "local_mask"]
    if with_input:
        fields += ["reference", "reference_mask"]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(
        IdentityInterface(fields=["metrics_tsv", "metrics_json", "rows"]), name="outputnode"
    )
    compute_metrics = pe.Node(
        ComputeMetrics(
            methods=list(methods),
            b0=float(acquisition.b0),
            b0_dir=[float(v) for v in acquisition.b0_dir],
        ),
        name="compute_metrics",
    )
    if reference is not None:
        if not Path(reference).is_file():
            raise ValueError(
                f"reference map {reference} does not exist; give a Chimap (ppm) on the grid of"
                f" {acquisition.prefix}"
            )
        compute_metrics.inputs.reference = str(reference)
        compute_metrics.inputs.reference_name = Path(reference).name
    elif with_input:
        compute_metrics.inputs.reference_name = reference_input
    workflow.connect([
        (inputnode, compute_metrics, [
            ("chimaps", "in_files"), ("local_field", "local_field"), ("local_mask", "mask"),
        ]),
        (compute_metrics, outputnode, [
            ("out_tsv", "metrics_tsv"), ("out_json", "metrics_json"), ("rows", "rows"),
        ]),
    ])  # fmt: skip
    if with_input:
        workflow.connect([
            (inputnode, compute_metrics, [
                ("reference", "reference"), ("reference_mask", "reference_mask"),
            ]),
        ])  # fmt: skip
    if output_dir is not None:
        metrics_derivatives_wf = init_metrics_derivatives_wf(
            acquisition=acquisition, output_dir=output_dir
        )
        workflow.connect([
            (compute_metrics, metrics_derivatives_wf, [
                ("out_tsv", "inputnode.metrics_tsv"), ("out_json", "inputnode.metrics_json"),
            ]),
        ])  # fmt: skip

    ref = Path(reference).name if reference is not None else reference_input
    workflow.__desc__ = (
        (
            f"The maps of {acquisition.prefix} were compared with {ref} by NRMSE and HFEN "
            "(Langkammer et al., 2018), SSIM (Wang et al., 2004), XSIM (Milovic et al., "
            "2020), PSNR, correlation and the regression slope."
        )
        if ref
        else ""
    )
    workflow.__citations__ = ["challenge2016", "ssim", "xsim"] if ref else []
    return workflow
