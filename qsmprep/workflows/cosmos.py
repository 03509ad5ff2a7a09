"""COSMOS workflow: one susceptibility map from several head orientations on one grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep.interfaces import Cosmos
from qsmprep.workflows._util import gpu_work, params_of
from qsmprep.workflows.outputs import init_cosmos_derivatives_wf

__all__ = ["init_cosmos_wf"]


def init_cosmos_wf(
    *,
    acquisitions: Sequence,
    output_dir: str | Path | None,
    method_params: Mapping[str, Mapping] | None = None,
    device: str = "cpu",
    omp_nthreads: int = 1,
    name: str = "cosmos_wf",
) -> pe.Workflow:
    """COSMOS of an orientation group, from the local fields of its acquisitions.

    Workflow graph::

        inputnode (local_fields, local_masks) -> cosmos -> outputnode
                                                        \\-> cosmos_derivatives_wf

    Parameters
    ----------
    acquisitions : sequence of :class:`qsmprep.bids.Acquisition`
        The orientations, on one voxel grid (e.g. a value of
        :func:`qsmprep.bids.group_orientations`); their ``b0_dir`` and ``b0`` are used, and
        the first one's subject and session name the output.
    output_dir : path or None
        Root of the derivative dataset (None: no sink).
    method_params : dict, optional
        ``method_params["cosmos"]``: keyword arguments of
        :func:`qsmprep.recon.inversion.cosmos`.
    device : {"cpu", "auto", "cuda"}
        Device of the numerics; GPU work is flagged with ``use_gpu``.
    omp_nthreads : int
        Threads of the node on the CPU.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    local_fields, local_masks
        Lists of local fields (Hz) and their masks, in the order of ``acquisitions``.

    Outputs (``outputnode``)
    ------------------------
    chimap
        COSMOS chi (ppm), mean 0 over the common mask.
    mask
        Common mask of the orientations (uint8).
    """
    acquisitions = list(acquisitions)
    if len(acquisitions) < 2:
        raise ValueError(f"COSMOS needs at least 2 orientations, got {len(acquisitions)}")
    shapes = {tuple(a.shape) for a in acquisitions}
    if len(shapes) != 1:
        raise ValueError(
            "COSMOS needs the orientations on one grid; got shapes "
            + ", ".join(f"{a.prefix}: {tuple(a.shape)}" for a in acquisitions)
        )
    use_gpu = gpu_work(device)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["local_fields", "local_masks"]), name="inputnode"
    )
    outputnode = pe.Node(IdentityInterface(fields=["chimap", "mask"]), name="outputnode")
    cosmos = pe.Node(
        Cosmos(
            b0_dirs=[[float(v) for v in a.b0_dir] for a in acquisitions],
            b0=[float(a.b0) for a in acquisitions],
            params=params_of(method_params, "cosmos"),
            device=device,
            use_gpu=use_gpu,
            num_threads=omp_nthreads,
        ),
        name="cosmos",
        n_procs=1 if use_gpu else omp_nthreads,
    )
    workflow.connect([
        (inputnode, cosmos, [("local_fields", "local_fields"), ("local_masks", "masks")]),
        (cosmos, outputnode, [("out_file", "chimap"), ("mask", "mask")]),
    ])  # fmt: skip
    if output_dir is not None:
        cosmos_derivatives_wf = init_cosmos_derivatives_wf(
            acquisitions=acquisitions, output_dir=output_dir
        )
        workflow.connect([
            (cosmos, cosmos_derivatives_wf, [
                ("out_file", "inputnode.chimap"), ("meta", "inputnode.meta"),
            ]),
        ])  # fmt: skip

    workflow.__desc__ = (
        f"The local fields of {len(acquisitions)} head orientations "
        f"({', '.join(a.prefix for a in acquisitions)}) on one grid were combined by COSMOS "
        "(Liu et al., 2009): the closed-form multi-orientation solution refined by conjugate "
        "gradients on the common mask, referenced to its mean there."
    )
    workflow.__citations__ = ["cosmos"]
    return workflow
