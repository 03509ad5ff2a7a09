"""Participant workflow: every acquisition of one subject, plus COSMOS of orientation groups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from nipype.interfaces.utility import Merge
from nipype.pipeline import engine as pe

from qsmprep import methods as registry
from qsmprep.space.plan import plan_from_settings
from qsmprep.threads import share_cores
from qsmprep.workflows._util import gpu_work, node_label
from qsmprep.workflows.cosmos import init_cosmos_wf
from qsmprep.workflows.metrics import init_metrics_wf
from qsmprep.workflows.outputs import cosmos_path
from qsmprep.workflows.qsm import init_qsm_wf
from qsmprep.workflows.space import add_space_wf

__all__ = ["init_participant_wf", "long_node_threads", "methods_description"]


def _groups(cosmos_groups) -> list[list]:
    if not cosmos_groups:
        return []
    values = cosmos_groups.values() if isinstance(cosmos_groups, Mapping) else cosmos_groups
    return [list(g) for g in values]


def long_node_threads(settings, n_acquisitions: int) -> int:
    """Threads of each long-running inversion node (TV, MEDI, TFI on the CPU) of a participant
    with ``n_acquisitions`` acquisitions.

    ``settings.long_nthreads`` when set (``--omp-nthreads`` given). Else the run's cores are
    shared among the long nodes that run side by side, one per long method and acquisition
    (:func:`qsmprep.threads.share_cores`): ``--methods medi`` on one acquisition gets every
    core, the default TV and MEDI one core each on 2 cores, two each on 4 (where the other
    CPU-heavy nodes' ``nprocs - 1`` threads would run them one after the other). With the
    Linear plugin nodes run one at a time, each with every core; on a GPU the inversions take
    one slot, so ``omp_nthreads``.
    """
    given = getattr(settings, "long_nthreads", None)
    if given:
        return int(given)
    long = [m for m in settings.methods if registry.get(m).long_running]
    if not long or gpu_work(settings.device):
        return settings.omp_nthreads
    linear = getattr(settings, "plugin", "MultiProc") == "Linear"
    return share_cores(settings.nprocs, 1 if linear else len(long) * max(1, n_acquisitions))


def init_participant_wf(
    acquisitions: Sequence,
    settings,
    cosmos_groups: Mapping[tuple, Sequence] | Iterable[Sequence] | None = None,
    *,
    name: str | None = None,
) -> pe.Workflow:
    """All QSM processing of one participant: one workflow per acquisition, COSMOS per group.

    Parameters
    ----------
    acquisitions : sequence of :class:`qsmprep.bids.Acquisition`
        The participant's acquisitions (unique :attr:`~qsmprep.bids.Acquisition.id`).
    settings : :class:`qsmprep.config.Settings`
        Uses ``output_dir``, ``methods``, ``bg_method``, ``unwrap``, ``mask_method``,
        ``method_params``, ``device``, ``phase_sign``, ``reference``, ``omp_nthreads``,
        ``long_nthreads``, ``nprocs`` and ``plugin`` (:func:`long_node_threads`) and
        ``outputs`` when it has one (``"swi"``: SWI and minIP; with ``"chi"`` too, SMWI;
        default all).
    cosmos_groups : dict or iterable, optional
        Orientation groups, e.g. :func:`qsmprep.bids.group_orientations` (``{(subject,
        session): [Acquisition, ...]}``) or a list of lists; each group's members must be in
        ``acquisitions``. Each group gets a COSMOS workflow; without ``settings.reference``
        its map is the metric reference of the group's acquisitions.
    name : str, optional
        Workflow name; default ``sub_<label>_wf``.

    Returns
    -------
    Workflow holding ``qsm_<prefix>_wf`` per acquisition (prefix with ``_`` for ``-``) and
    ``cosmos_<sub>[_<ses>]_wf`` per group, fed by the ``merge_fields_*``/``merge_masks_*``
    nodes; the acquisitions scored against their group's COSMOS map get their
    ``metrics_<prefix>_wf`` here, beside ``qsm_<prefix>_wf``. Set ``base_dir`` (the work
    directory) and run it.
    """
    acquisitions = list(acquisitions)
    if not acquisitions:
        raise ValueError("no acquisition to process")
    ids = [a.id for a in acquisitions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"acquisitions are not unique: {sorted(ids)}")
    subjects = sorted({a.subject for a in acquisitions})
    if name is None:
        name = f"sub_{node_label(subjects[0])}_wf" if len(subjects) == 1 else "participant_wf"

    groups = _groups(cosmos_groups)
    reference_of: dict[str, str] = {}
    for group in groups:
        missing = [a.id for a in group if a.id not in ids]
        if missing:
            raise ValueError(f"COSMOS group members {missing} are not among the acquisitions")
        if settings.reference is None:
            for a in group:
                reference_of[a.id] = cosmos_path(settings.output_dir, group).name

    # ``outputs`` (chi, r2star, swi) selects the derivatives; settings without it make all
    outputs = tuple(getattr(settings, "outputs", None) or ("chi", "r2star", "swi"))
    plan = plan_from_settings(settings)
    workflow = pe.Workflow(name=name)
    common = {
        "output_dir": settings.output_dir,
        "method_params": settings.method_params,
        "device": settings.device,
        "omp_nthreads": settings.omp_nthreads,
    }
    long_nthreads = long_node_threads(settings, len(acquisitions))
    qsm_wfs = {}
    for a in acquisitions:
        qsm_wf = init_qsm_wf(
            acquisition=a,
            methods=settings.methods,
            bg_method=settings.bg_method,
            unwrap_method=settings.unwrap,
            mask_method=settings.mask_method,
            phase_sign=settings.phase_sign,
            reference=settings.reference,
            metrics=a.id not in reference_of,
            outputs=outputs,
            reference_region=plan.reference_region if plan.enabled else "mask",
            long_nthreads=long_nthreads,
            name=f"qsm_{node_label(a.prefix)}_wf",
            **common,
        )
        workflow.add_nodes([qsm_wf])
        qsm_wfs[a.id] = qsm_wf
        if plan.enabled:  # template space: registration, atlas ROIs, template-space maps
            add_space_wf(workflow, qsm_wf, a, settings, plan)

    for group in groups:
        first = group[0]
        label = node_label(
            f"sub-{first.subject}" + (f"_ses-{first.session}" if first.session else "")
        )
        cosmos_wf = init_cosmos_wf(acquisitions=group, name=f"cosmos_{label}_wf", **common)
        merge_fields = pe.Node(Merge(len(group)), name=f"merge_fields_{label}")
        merge_masks = pe.Node(Merge(len(group)), name=f"merge_masks_{label}")
        for i, a in enumerate(group, start=1):
            workflow.connect([
                (qsm_wfs[a.id], merge_fields, [("outputnode.local_field", f"in{i}")]),
                (qsm_wfs[a.id], merge_masks, [("outputnode.local_mask", f"in{i}")]),
            ])  # fmt: skip
            if a.id in reference_of:  # COSMOS is the reference: metrics beside qsm_wf
                metrics_wf = init_metrics_wf(
                    acquisition=a,
                    methods=settings.methods,
                    output_dir=settings.output_dir,
                    reference_input=reference_of[a.id],
                    name=f"metrics_{node_label(a.prefix)}_wf",
                )
                workflow.connect([
                    (qsm_wfs[a.id], metrics_wf, [
                        ("outputnode.chimaps", "inputnode.chimaps"),
                        ("outputnode.local_field", "inputnode.local_field"),
                        ("outputnode.local_mask", "inputnode.local_mask"),
                    ]),
                    (cosmos_wf, metrics_wf, [
                        ("outputnode.chimap", "inputnode.reference"),
                        ("outputnode.mask", "inputnode.reference_mask"),
                    ]),
                ])  # fmt: skip
        workflow.connect([
            (merge_fields, cosmos_wf, [("out", "inputnode.local_fields")]),
            (merge_masks, cosmos_wf, [("out", "inputnode.local_masks")]),
        ])  # fmt: skip

    workflow.__desc__ = (
        f"Results were produced with qsmprep for {len(acquisitions)} acquisition(s) of "
        f"subject {', '.join(subjects)}, a workflow executed by Nipype (Gorgolewski et al., "
        "2011) on data found with PyBIDS (Yarkoni et al., 2019)."
    )
    workflow.__citations__ = ["nipype", "pybids"]
    return workflow


def _children(workflow: pe.Workflow) -> list[pe.Workflow]:
    """Sub-workflows of a workflow in the order they were added."""
    return [n for n in workflow._graph.nodes() if isinstance(n, pe.Workflow)]


def methods_description(workflow: pe.Workflow) -> tuple[str, list[str]]:
    """The methods paragraphs of a workflow and its sub-workflows, and their citation keys.

    Paragraphs (each workflow's ``__desc__``) are visited depth first, each distinct text
    once, so that a participant with several acquisitions describes the shared chain once.
    Citation keys (``__citations__``) refer to :data:`qsmprep.reports.methods.CITATIONS`.
    """
    texts: list[str] = []
    keys: list[str] = []

    def visit(wf):
        desc = getattr(wf, "__desc__", None)
        if desc and desc not in texts:
            texts.append(desc)
        for key in getattr(wf, "__citations__", []):
            if key not in keys:
                keys.append(key)
        for child in _children(wf):
            visit(child)

    visit(workflow)
    return "\n\n".join(texts), keys
