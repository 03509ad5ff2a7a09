"""Inversion workflow: one inversion node per method, outputs per method and as lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from qsmprep import methods as registry
from qsmprep.interfaces import DeepInversion, DipoleInversion
from qsmprep.workflows._util import check_choice, mem_gb, params_of

__all__ = ["init_inversion_wf"]

_NODE_INPUTS = {"noise_field": ("noise_std", "weight"), "magnitude": ("magnitude",),
                "echo_times": ("delta_te",)}  # fmt: skip
"""Fields of ``inputnode`` connected to an inversion node, by the extra inputs
(:data:`qsmprep.methods.INPUTS`) the interface makes from them."""

_SELECTABLE = ("classical", "dl")
"""Kinds of inversion that ``methods`` may name (COSMOS runs by itself)."""


def init_inversion_wf(
    *,
    methods: Sequence[str],
    method_params: Mapping[str, Mapping] | None = None,
    device: str = "cpu",
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    long_nthreads: int | None = None,
    dl_inputs: bool = False,
    n_voxels: int | None = None,
    name: str = "inversion_wf",
) -> pe.Workflow:
    """Dipole inversion of one local field by several methods, each in its own node.

    Nodes are named ``inversion_<method>``; each is a
    :class:`~qsmprep.interfaces.DipoleInversion` with ``use_gpu`` set when the inversion is GPU
    work, so that Nipype's MultiProc counts it against its GPU slots (such nodes ask for one
    slot: MultiProc refuses a GPU node whose ``n_procs`` exceeds ``n_gpu_procs``).

    Parameters
    ----------
    methods : sequence of str
        Inversion methods, in output order: classical (``tkd``, ``tsvd``, ``l2``, ``tv``,
        ``medi``; :class:`~qsmprep.interfaces.DipoleInversion`) and deep-learning (``unet``,
        ``adaptive``, ``dsbn``, ``dcfinetune``, ``unsup``;
        :class:`~qsmprep.interfaces.DeepInversion`).
    method_params : dict, optional
        Keyword arguments by method name.
    device : {"cpu", "auto", "cuda"}
        Device of the numerics (``"auto"``: a GPU when one is visible at run time).
    use_gpu : bool
        Mark the inversion nodes as GPU work (see :func:`qsmprep.workflows.gpu_work`).
    omp_nthreads : int
        Threads of a CPU inversion node (its ``n_procs``).
    long_nthreads : int, optional
        Threads of a long-running one (:attr:`qsmprep.methods.Method.long_running`: TV, MEDI,
        TFI); default ``omp_nthreads``.
    n_voxels : int, optional
        Voxels of the grid: each inversion node announces its memory to the scheduler from it
        (:func:`~qsmprep.workflows._util.mem_gb`; Nipype's 0.2 GB without it).
    dl_inputs : bool
        Feed the networks ``dl_local_field``, ``dl_local_mask`` and ``dl_bg_meta`` instead of
        the classical methods' inputs (a local field made as their training data was).
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    local_field, local_mask
        Local field (Hz) and its mask.
    total_field
        Total field (Hz), the input of a total field inversion (``Method.field == "total"``).
    brain_mask, reliable_mask
        Brain mask (what TV and MEDI cover) and the brain voxels with a reliable field.
    bg_meta
        Sidecar entries of the background removal (the method used goes into each sidecar).
    magnitude, noise_field
        4D magnitude and field std map (Hz), for MEDI.
    b0, b0_dir, echo_times
        Field strength (T), B0 direction in voxel coordinates, echo times (s).

    Outputs (``outputnode``)
    ------------------------
    chimap_<method>, dc_residual_<method>, meta_<method>
        Per method: chi (ppm, mean 0 over the local mask), data-consistency residual (%),
        sidecar entries.
    chimaps, dc_residuals
        The same as lists in the order of ``methods``.
    """
    methods = list(methods)
    selectable = registry.names("inversion", kind=_SELECTABLE)
    if not methods:
        raise ValueError("no inversion method given; choose from " + ", ".join(selectable))
    if len(set(methods)) != len(methods):
        raise ValueError(f"inversion methods repeat: {methods}")
    for m in methods:
        check_choice(m, selectable, "inversion method")
    records = [registry.get(m) for m in methods]

    workflow = pe.Workflow(name=name)
    inputs = ["local_field", "local_mask", "total_field", "magnitude", "noise_field", "b0",
              "b0_dir",
              "brain_mask", "reliable_mask", "bg_meta",
              "dl_local_field", "dl_local_mask", "dl_bg_meta"]  # fmt: skip
    inputnode = pe.Node(IdentityInterface(fields=[*inputs, "echo_times"]), name="inputnode")
    per_method = [f"{k}_{m}" for m in methods for k in ("chimap", "dc_residual", "meta")]
    outputnode = pe.Node(
        IdentityInterface(fields=[*per_method, "chimaps", "dc_residuals"]), name="outputnode"
    )
    merge_chimaps = pe.Node(Merge(len(methods)), name="merge_chimaps")
    merge_residuals = pe.Node(Merge(len(methods)), name="merge_residuals")

    # long-running inversions first: MultiProc submits ready nodes in graph order, and a long
    # node that waits for a short one's slot delays the end of the run by the short one's time
    order = sorted(range(1, len(records) + 1), key=lambda i: not records[i - 1].long_running)
    for i in order:
        record = records[i - 1]
        method, deep = record.name, record.kind == "dl"
        interface = DeepInversion if deep else DipoleInversion
        params = params_of(method_params, method)
        threads = long_nthreads if record.long_running and long_nthreads else omp_nthreads
        node = pe.Node(
            interface(
                method=method,
                params=params,
                device=device,
                use_gpu=use_gpu,
                num_threads=threads,
            ),
            name=f"inversion_{method}",
            n_procs=1 if use_gpu else threads,
            mem_gb=mem_gb("inversion", n_voxels),
        )
        if deep:  # new weights must not be answered from the cache
            from qsmprep.dl.weights import weights_sha256

            sha = weights_sha256(method, model=params.get("model"), weights=params.get("weights"))
            if sha:
                node.inputs.weights_sha256 = sha
        src = "dl_" if dl_inputs and deep else ""
        workflow.connect([
            (inputnode, node, [
                (f"{src}local_field", "local_field"), (f"{src}local_mask", "mask"),
                ("b0", "b0"), ("b0_dir", "b0_dir"), (f"{src}bg_meta", "bg_meta"),
            ]),
            (node, outputnode, [
                ("out_file", f"chimap_{method}"), ("dc_residual", f"dc_residual_{method}"),
                ("meta", f"meta_{method}"),
            ]),
            (node, merge_chimaps, [("out_file", f"in{i}")]),
            (node, merge_residuals, [("dc_residual", f"in{i}")]),
        ])  # fmt: skip
        if not deep:
            workflow.connect([
                (inputnode, node, [
                    ("brain_mask", "brain_mask"), ("reliable_mask", "reliable_mask"),
                ]),
            ])  # fmt: skip
        if record.field == "total":
            workflow.connect(inputnode, "total_field", node, "total_field")
        for field, made in _NODE_INPUTS.items():
            if set(made) & set(record.inputs):
                workflow.connect(inputnode, field, node, field)

    workflow.connect([
        (merge_chimaps, outputnode, [("out", "chimaps")]),
        (merge_residuals, outputnode, [("out", "dc_residuals")]),
    ])  # fmt: skip

    described = [r.summary for r in records]
    listed = described[0] if len(described) == 1 else ", ".join(described[:-1])
    if len(described) > 1:
        listed += f" and {described[-1]}"
    whole = [r.summary for r in records if r.whole_brain]
    covered = (
        f" {' and '.join(whole)} estimated susceptibility over the whole brain mask, with the "
        "data term weighted by the inverse field noise and set to zero outside the local-field "
        "mask and in voxels marked unreliable, where the regulariser alone determined it; the "
        "other maps cover the local-field mask."
        if whole
        else ""
    )
    workflow.__desc__ = (
        f"Susceptibility (ppm) was computed from the local field converted to ppm of B0 by "
        f"{listed}.{covered} Each map was referenced to its mean over the mask it covers, and "
        "its agreement with the measured field was reported as the data-consistency residual "
        "100 ||M (D chi - f)|| / ||M f|| (fields de-meaned over the mask M of reliable "
        "local-field voxels)."
    )
    workflow.__citations__ = [c.key for r in records for c in r.citations]
    return workflow
