"""Field workflow: per-echo magnitude + phase -> brain mask, total and local field maps (Hz)."""

from __future__ import annotations

from collections.abc import Mapping

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep import methods as registry
from qsmprep.interfaces import (
    BrainMask,
    FieldReliability,
    FitField,
    LoadEchoes,
    ProvidedField,
    ProvidedMask,
    RemoveBackground,
    UnwrapPhase,
)
from qsmprep.recon.background import DEFAULT_METHOD
from qsmprep.workflows._util import check_choice, mem_gb, params_of

__all__ = ["init_field_wf"]

_MASK = registry.view("mask")
_UNWRAP = registry.view("unwrap")
_BG = registry.view("background")
"""Mask, unwrapping and background removal methods (live views of :mod:`qsmprep.methods`):
``summary`` is their boilerplate (``one_echo_summary`` an unwrapping's for one echo) and
``citations`` their references."""


def _keys(record) -> list[str]:
    """The citation keys of a method's record."""
    return [c.key for c in record.citations]


def init_field_wf(
    *,
    mask_method: str = "magnitude",
    unwrap_method: str = "quality",
    bg_method: str = DEFAULT_METHOD,
    method_params: Mapping[str, Mapping] | None = None,
    device: str = "cpu",
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    dl_bg_method: str | None = None,
    n_echoes: int | None = None,
    provided_mask: bool = False,
    provided_field: bool = False,
    n_voxels: int | None = None,
    name: str = "field_wf",
) -> pe.Workflow:
    """Brain mask, unwrapping, multi-echo field fit and background removal of one acquisition.

    Workflow graph::

        inputnode -> load_echoes -> brain_mask -> unwrap_phase -> fit_field
                  -> field_reliability -> remove_background -> outputnode

    ``field_reliability`` marks the voxels whose phase does not evolve linearly over the echoes
    (:func:`qsmprep.recon.mask.field_reliability`); a background method that keeps its whole
    mask (``lbv``, ``pdf``) gets the brain mask less its unreliable rim.

    One echo runs the same graph: the phase offset cannot be separated from the field and is
    left in (:func:`~qsmprep.recon.unwrap.unwrap_multi_echo`), the field is the unwrapped
    phase over ``2 pi TE`` with the std ``sigma / (2 pi M TE)``
    (:func:`~qsmprep.recon.echo.fit_field_linear`), and with no fit residual no voxel is
    marked unreliable.

    A brain mask the user provides (``provided_mask``) replaces the computed one: the node
    ``brain_mask`` is then :class:`~qsmprep.interfaces.ProvidedMask` (checked, saved as
    uint8). A total field the user provides (``provided_field``) replaces unwrapping and the
    echo fit: no ``unwrap_phase`` and no ``fit_field``; the node ``provided_field``
    (:class:`~qsmprep.interfaces.ProvidedField`) passes the field on inside the brain mask
    with the noise map the weighted fit would have had on this magnitude
    (:func:`qsmprep.recon.echo.field_std`), and ``field_reliability`` gets no residual, so no
    voxel is marked unreliable.

    Parameters
    ----------
    mask_method : str
        A registered mask method (:mod:`qsmprep.methods`): ``"magnitude"`` (the default) or
        ``"phase"`` (the phase quality).
    unwrap_method : str
        A registered unwrapping method: ``"quality"`` (the default) or ``"laplacian"``.
    bg_method : str
        A registered background removal method: ``"lbv"``, ``"resharp"``, ``"vsharp"``,
        ``"sharp"`` or ``"pdf"`` (default :data:`~qsmprep.recon.background.DEFAULT_METHOD`).
    method_params : dict, optional
        Keyword arguments by section: ``"mask"``, ``"unwrap"``, ``"reliability"`` and the
        background method name.
    device : {"cpu", "auto", "cuda"}
        Device of the background removal (``"auto"``: a GPU when one is visible at run time).
    use_gpu : bool
        Mark the background removal as GPU work for Nipype's MultiProc.
    omp_nthreads : int
        Threads of the CPU-heavy nodes (their ``n_procs``).
    n_voxels : int, optional
        Voxels of the acquisition's grid: the nodes announce their memory to the scheduler
        from it (:func:`~qsmprep.workflows._util.mem_gb`; Nipype's 0.2 GB without it).
    dl_bg_method : str, optional
        A second background removal (node ``remove_background_dl``, on the brain mask) for the
        networks, when it differs from ``bg_method``: the method of their training data
        (:data:`qsmprep.dl.weights.TRAINED_BACKGROUND`).
    n_echoes : int, optional
        Number of echoes, when known; only the methods paragraph (``__desc__``) depends on it
        (1: the single-echo text). The nodes handle any number of echoes.
    provided_mask, provided_field : bool
        Take the brain mask / the total field (Hz) from ``inputnode.brain_mask`` /
        ``inputnode.total_field`` (see above).
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    magnitude, phase
        Lists of per-echo 3D NIfTI files, sorted by echo time.
    echo_times
        List of echo times (s).
    phase_units, phase_sign
        ``"rad"`` or ``"integer"``; +1 or -1.
    b0_dir
        B0 direction in voxel coordinates (3 floats).
    b0
        Field strength (T), for a background method that inverts the field (``tfibg``).
    brain_mask, total_field
        The provided brain mask and total field (Hz) files, with ``provided_mask`` /
        ``provided_field``.

    Outputs (``outputnode``)
    ------------------------
    magnitude, phase
        4D magnitude, 4D wrapped phase (rad).
    brain_mask
        Brain mask (uint8).
    total_field, noise_field, local_field
        Total field, its standard deviation and the local field (Hz).
    local_mask
        Where the local field is valid (uint8).
    reliable_mask
        Brain voxels whose field is reliable (uint8): the inversions' data weight is zero
        elsewhere.
    bg_meta, local_mask_meta
        Sidecar entries of the background removal (the method used, its effective
        parameters) and of the local mask.
    dl_local_field, dl_local_mask, dl_bg_meta
        The same from ``remove_background_dl`` (only with ``dl_bg_method``).
    """
    check_choice(mask_method, _MASK, "mask method")
    check_choice(unwrap_method, _UNWRAP, "unwrapping method")
    check_choice(bg_method, _BG, "background removal method")
    bg_text, keeps_mask = _BG[bg_method].summary, _BG[bg_method].keeps_mask
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=[
                "magnitude",
                "phase",
                "echo_times",
                "phase_units",
                "phase_sign",
                "b0_dir",
                "b0",
                "brain_mask",
                "total_field",
            ]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=[
                "magnitude", "phase", "brain_mask", "total_field", "noise_field",
                "local_field", "local_mask", "reliable_mask", "bg_meta", "local_mask_meta",
                "dl_local_field", "dl_local_mask", "dl_bg_meta",
            ]
        ),
        name="outputnode",
    )  # fmt: skip

    echoes = int(n_echoes or 1)
    # the field chain runs node after node: each gets the threads of a CPU-heavy node
    threads = {"n_procs": omp_nthreads}
    load_echoes = pe.Node(
        LoadEchoes(num_threads=omp_nthreads),
        name="load_echoes",
        mem_gb=mem_gb("load", n_voxels, echoes),
        **threads,
    )
    if provided_mask:
        brain_mask = pe.Node(ProvidedMask(), name="brain_mask")
        workflow.connect([
            (inputnode, brain_mask, [("brain_mask", "in_file")]),
            (load_echoes, brain_mask, [("magnitude", "magnitude")]),
        ])  # fmt: skip
    else:
        brain_mask = pe.Node(
            BrainMask(
                method=mask_method,
                params=params_of(method_params, "mask"),
                num_threads=omp_nthreads,
            ),
            name="brain_mask",
            **threads,
        )
        workflow.connect([
            (inputnode, brain_mask, [("echo_times", "echo_times")]),
            (load_echoes, brain_mask, [("magnitude", "magnitude"), ("phase", "phase")]),
        ])  # fmt: skip
    if provided_field:
        # the total field enters here: no unwrapping, no echo fit, no fit residual
        fit_field = pe.Node(ProvidedField(), name="provided_field")
        workflow.connect(inputnode, "total_field", fit_field, "in_file")
    else:
        unwrap_phase = pe.Node(
            UnwrapPhase(
                method=unwrap_method,
                params=params_of(method_params, "unwrap"),
                num_threads=omp_nthreads,
            ),
            name="unwrap_phase",
            n_procs=omp_nthreads,
            mem_gb=mem_gb("unwrap", n_voxels, echoes),
        )
        fit_field = pe.Node(
            FitField(num_threads=omp_nthreads),
            name="fit_field",
            mem_gb=mem_gb("fit", n_voxels, echoes),
            **threads,
        )
        workflow.connect([
            (inputnode, unwrap_phase, [("echo_times", "echo_times")]),
            (load_echoes, unwrap_phase, [("magnitude", "magnitude"), ("phase", "phase")]),
            (brain_mask, unwrap_phase, [("out_file", "mask")]),
            (unwrap_phase, fit_field, [("out_file", "phase")]),
        ])  # fmt: skip
    field_reliability = pe.Node(
        FieldReliability(params=params_of(method_params, "reliability"), num_threads=omp_nthreads),
        name="field_reliability",
        **threads,
    )

    def background_node(method: str, name: str) -> pe.Node:
        """A RemoveBackground node fed the B0 direction and the total field."""
        node = pe.Node(
            RemoveBackground(
                method=method,
                params=params_of(method_params, method),
                device=device,
                use_gpu=use_gpu,
                num_threads=omp_nthreads,
            ),
            name=name,
            # MultiProc refuses a GPU node that asks for more slots than n_gpu_procs
            n_procs=1 if use_gpu else omp_nthreads,
            mem_gb=mem_gb("background", n_voxels),
        )
        workflow.connect([
            (inputnode, node, [("b0_dir", "b0_dir")]),
            (fit_field, node, [("total_field", "total_field")]),
        ])  # fmt: skip
        needs = _BG[method].inputs
        if "magnitude" in needs:
            workflow.connect(load_echoes, "magnitude", node, "magnitude")
        if "noise_std" in needs:
            workflow.connect(fit_field, "noise_field", node, "noise_field")
        if "data_mask" in needs:
            workflow.connect(field_reliability, "reliable_mask", node, "reliable_mask")
        if "delta_te" in needs:
            workflow.connect(inputnode, "echo_times", node, "echo_times")
        if "b0" in needs:
            workflow.connect(inputnode, "b0", node, "b0")
        return node

    remove_background = background_node(bg_method, "remove_background")

    workflow.connect([
        (inputnode, load_echoes, [
            ("magnitude", "magnitude"), ("phase", "phase"), ("echo_times", "echo_times"),
            ("phase_units", "phase_units"), ("phase_sign", "phase_sign"),
        ]),
        (inputnode, fit_field, [("echo_times", "echo_times")]),
        (load_echoes, fit_field, [("magnitude", "magnitude")]),
        (brain_mask, fit_field, [("out_file", "mask")]),
        (brain_mask, field_reliability, [("out_file", "mask")]),
        (field_reliability, remove_background, [("meta", "extra_meta")]),
        (load_echoes, outputnode, [("magnitude", "magnitude"), ("phase", "phase")]),
        (brain_mask, outputnode, [("out_file", "brain_mask")]),
        (fit_field, outputnode, [
            ("total_field", "total_field"), ("noise_field", "noise_field"),
        ]),
        (remove_background, outputnode, [
            ("local_field", "local_field"), ("local_mask", "local_mask"),
            ("meta", "bg_meta"), ("mask_meta", "local_mask_meta"),
        ]),
        (field_reliability, outputnode, [("reliable_mask", "reliable_mask")]),
    ])  # fmt: skip
    workflow.connect([
        (fit_field, field_reliability, [("total_field", "total_field")]),
        (inputnode, field_reliability, [("echo_times", "echo_times")]),
    ])  # fmt: skip
    if not provided_field:
        workflow.connect(fit_field, "fit_residual", field_reliability, "fit_residual")
    if dl_bg_method is not None and dl_bg_method != bg_method:
        check_choice(dl_bg_method, _BG, "background removal method")
        remove_background_dl = background_node(dl_bg_method, "remove_background_dl")
        workflow.connect([
            (brain_mask, remove_background_dl, [("out_file", "mask")]),
            (remove_background_dl, outputnode, [
                ("local_field", "dl_local_field"), ("local_mask", "dl_local_mask"),
                ("meta", "dl_bg_meta"),
            ]),
        ])  # fmt: skip
    if keeps_mask:
        workflow.connect([
            (field_reliability, remove_background, [("trimmed_mask", "mask")]),
            (brain_mask, remove_background, [("out_file", "brain_mask")]),
        ])  # fmt: skip
    else:
        workflow.connect(brain_mask, "out_file", remove_background, "mask")

    if provided_mask:
        mask_text, mask_cites = "The brain mask was provided by the user and used as given.", []
    else:
        mask_text = f"A brain mask was computed {_MASK[mask_method].summary}."
        mask_cites = _keys(_MASK[mask_method])
    unwrap = _UNWRAP[unwrap_method]
    if provided_field:
        workflow.__desc__ = (
            f"{mask_text} The total field (Hz) was provided by the user, so the phase was "
            "neither unwrapped nor fitted over the echoes; the field was used as given inside "
            "the brain mask, with as its standard deviation that of a magnitude-weighted fit of "
            "these echoes (Kressler et al., 2010). With no fit residual, no voxel was marked "
            f"unreliable. The background field was removed with {bg_text}, giving "
            "the local field and the mask where it is valid."
        )
        workflow.__citations__ = [*mask_cites, "kressler", *_keys(_BG[bg_method])]
        return workflow
    if n_echoes == 1:
        workflow.__desc__ = (
            f"{mask_text} The acquisition had a single echo, so the echo-independent phase "
            "offset could not be separated from the field and was not removed; the phase was "
            f"unwrapped {unwrap.one_echo_summary or unwrap.summary}. The total "
            "field (Hz) was the unwrapped phase divided by 2 pi TE, with its standard deviation "
            "the phase noise (noise standard deviation over magnitude) divided by 2 pi TE "
            "(the one-echo case of the weighted fit; Kressler et al., 2010). With one echo "
            "there was no multi-echo fit residual, so no voxel was marked unreliable. The "
            f"background field was removed with {bg_text}, giving the local field "
            "and the mask where it is valid."
        )
        workflow.__citations__ = [*mask_cites, *_keys(unwrap), "kressler", *_keys(_BG[bg_method])]
        return workflow
    workflow.__desc__ = (
        f"{mask_text} The phase offset of the echoes was removed (MCPC-3D-S; Eckstein et al., "
        f"2018) and the phase was unwrapped {unwrap.summary}. The total field (Hz) was "
        "fitted to the unwrapped phase of all echoes by weighted linear least squares "
        "(weights: squared magnitude), "
        "with a map of its standard deviation (Kressler et al., 2010). Voxels whose phase "
        "departed from a linear evolution over the echoes (a weighted RMS fit residual more "
        "than a robust z-score above that of the deep brain) were marked unreliable"
        + (
            ", and those near the mask's edge were trimmed from the mask before background removal"
            if keeps_mask
            else ""
        )
        + f". The background field was removed with {bg_text}, giving the local "
        "field and the mask where it is valid."
    )
    workflow.__citations__ = [
        *mask_cites,
        "mcpc3ds",
        *_keys(unwrap),
        "kressler",
        *_keys(_BG[bg_method]),
    ]
    return workflow
