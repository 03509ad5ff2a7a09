"""Workflow builders: graph construction over option combinations, one small executed run.

Graph tests build workflows only (no files needed) and check node names, options and the
connections as Nipype runs them (identity nodes resolved). The executed test runs one
simulated acquisition end to end with the Linear plugin, then again with the same work
directory, and checks that no finished node ran twice.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.base import isdefined
from nipype.interfaces.utility import IdentityInterface

from qsmprep.bids import Acquisition, collect_acquisitions
from qsmprep.config import Settings
from qsmprep.workflows import (
    _util,
    init_cosmos_wf,
    init_field_wf,
    init_inversion_wf,
    init_participant_wf,
    init_qsm_wf,
    methods_description,
)

# --------------------------------------------------------------------------------------------
# helpers


def _acq(subject="01", acq=None, run=None, session=None, b0_dir=(0.0, 0.0, 1.0), shape=None):
    prefix = f"sub-{subject}" + (f"_acq-{acq}" if acq else "") + (f"_run-{run}" if run else "")
    anat = Path("/data") / f"sub-{subject}" / "anat"
    return Acquisition(
        subject=subject, session=session, acq=acq, run=run, rec=None, suffix="MEGRE",
        magnitude=[anat / f"{prefix}_echo-{e}_part-mag_MEGRE.nii.gz" for e in (1, 2, 3)],
        phase=[anat / f"{prefix}_echo-{e}_part-phase_MEGRE.nii.gz" for e in (1, 2, 3)],
        echo_times=[0.004, 0.008, 0.012], b0=3.0, phase_units="rad",
        shape=shape or (32, 32, 24), voxel_size=(4.0, 4.0, 4.0), affine=np.diag([4, 4, 4, 1.0]),
        b0_dir=b0_dir, root=Path("/data"),
    )  # fmt: skip


def _settings(tmp_path, **kw):
    return Settings(bids_dir="/data", output_dir=tmp_path / "out", **kw)


def _links(wf) -> set[tuple[str, str, str, str]]:
    """``(source node, output, destination node, input)`` as run: identity nodes resolved."""
    flat = wf._create_flat_graph()
    incoming = {}
    for u, v, d in flat.edges(data=True):
        for out, inp in d["connect"]:
            incoming[(v, inp)] = (u, out)

    def resolve(node, field):
        while isinstance(node.interface, IdentityInterface) and (node, field) in incoming:
            node, field = incoming[(node, field)]
        return node.fullname, field

    return {
        (*resolve(u, out), v.fullname, inp)
        for (v, inp), (u, out) in incoming.items()
        if not isinstance(v.interface, IdentityInterface)
    }


def _nodes(wf) -> dict:
    return {n.fullname: n for n in wf._create_flat_graph().nodes()}


# --------------------------------------------------------------------------------------------
# field workflow


@pytest.mark.parametrize(
    ("mask_method", "unwrap_method", "bg_method"),
    list(itertools.product(("magnitude", "phase"), ("quality", "laplacian"),
                           ("resharp", "vsharp", "sharp", "pdf", "lbv", "tfibg"))),
)  # fmt: skip
def test_field_wf_graph(mask_method, unwrap_method, bg_method):
    params = {bg_method: {"tol": 1e-3}, "mask": {"factor": 0.9}}
    wf = init_field_wf(
        mask_method=mask_method, unwrap_method=unwrap_method, bg_method=bg_method,
        method_params=params, device="cpu", omp_nthreads=2,
    )  # fmt: skip
    nodes = _nodes(wf)
    names = {"load_echoes", "brain_mask", "unwrap_phase", "fit_field", "remove_background"}
    assert {f"field_wf.{n}" for n in names} <= set(nodes)
    assert nodes["field_wf.brain_mask"].inputs.method == mask_method
    assert nodes["field_wf.brain_mask"].inputs.params == {"factor": 0.9}
    assert nodes["field_wf.unwrap_phase"].inputs.method == unwrap_method
    bg = nodes["field_wf.remove_background"]
    assert (bg.inputs.method, bg.inputs.params, bg.inputs.use_gpu) == (
        bg_method,
        {"tol": 1e-3},
        False,
    )
    assert bg.n_procs == 2 and nodes["field_wf.unwrap_phase"].n_procs == 2
    links = _links(wf)
    p = "field_wf."
    for link in [
        (p + "load_echoes", "magnitude", p + "brain_mask", "magnitude"),
        (p + "brain_mask", "out_file", p + "unwrap_phase", "mask"),
        (p + "load_echoes", "phase", p + "unwrap_phase", "phase"),
        (p + "unwrap_phase", "out_file", p + "fit_field", "phase"),
        (p + "fit_field", "total_field", p + "remove_background", "total_field"),
        (p + "fit_field", "fit_residual", p + "field_reliability", "fit_residual"),
        (p + "brain_mask", "out_file", p + "field_reliability", "mask"),
    ]:
        assert link in links, link
    # a method that keeps its mask gets the brain mask less its unreliable rim, and the brain
    # mask for its cross-check (V-SHARP) and fallback (RESHARP); the eroding methods get the
    # brain mask
    if bg_method in ("lbv", "pdf"):
        assert (p + "field_reliability", "trimmed_mask", p + "remove_background", "mask") in links
        assert (p + "brain_mask", "out_file", p + "remove_background", "brain_mask") in links
    else:
        assert (p + "brain_mask", "out_file", p + "remove_background", "mask") in links
    # TFI's background inverts the field: it gets the magnitude, the noise map, the reliable
    # voxels, the echo times and B0; the others none of them
    extra = {
        (p + "load_echoes", "magnitude", p + "remove_background", "magnitude"),
        (p + "fit_field", "noise_field", p + "remove_background", "noise_field"),
        (p + "field_reliability", "reliable_mask", p + "remove_background", "reliable_mask"),
        (p + "inputnode", "echo_times", p + "remove_background", "echo_times"),
        (p + "inputnode", "b0", p + "remove_background", "b0"),
    }
    assert {link for link in extra if link in links} == (extra if bg_method == "tfibg" else set())
    desc = wf.__desc__
    labels = {
        "resharp": "RESHARP",
        "vsharp": "V-SHARP",
        "sharp": "SHARP",
        "pdf": "PDF",
        "tfibg": "total field inversion",
    }
    assert {**labels, "lbv": "LBV"}[bg_method] in desc
    assert ("ROMEO" if unwrap_method == "quality" else "Laplacian") in desc
    assert {"tfibg": "tfi"}.get(bg_method, bg_method) in wf.__citations__


def test_field_wf_rejects_unknown_options():
    with pytest.raises(ValueError, match="background removal method 'ismv'"):
        init_field_wf(bg_method="ismv")
    with pytest.raises(ValueError, match="unwrapping method"):
        init_field_wf(unwrap_method="romeo")


# --------------------------------------------------------------------------------------------
# inversion workflow and GPU flags

METHOD_SETS = [
    ["tkd"],
    ["medi"],
    ["tkd", "l2"],
    ["tv", "medi", "tsvd"],
    ["tkd", "l2", "tv", "medi"],
    ["tv", "tfi"],
]


@pytest.mark.parametrize("methods", METHOD_SETS, ids="-".join)
def test_inversion_wf_graph(methods):
    params = {"tv": {"lam": 5e-4}}
    wf = init_inversion_wf(methods=methods, method_params=params, omp_nthreads=2)
    nodes, links = _nodes(wf), _links(wf)
    inv = {n.split(".")[-1] for n in nodes if ".inversion_" in n}
    assert inv == {f"inversion_{m}" for m in methods}
    for i, m in enumerate(methods, start=1):
        node = nodes[f"inversion_wf.inversion_{m}"]
        assert node.inputs.method == m and node.n_procs == 2
        assert node.inputs.params == params.get(m, {})
        assert (f"inversion_wf.inversion_{m}", "out_file", "inversion_wf.merge_chimaps",
                f"in{i}") in links  # fmt: skip
    # only a total field inversion reads the total field
    total_to = {d for (_, o, d, i) in links if i == "total_field" and ".inversion_" in d}
    assert total_to == {f"inversion_wf.inversion_{m}" for m in methods if m == "tfi"}
    medi_inputs = {(d, i) for (_, _, d, i) in links if d.endswith("inversion_medi")}
    assert ("medi" in methods) == (("inversion_wf.inversion_medi", "magnitude") in medi_inputs)
    for m in methods:
        assert m.upper() in wf.__desc__


def test_long_inversions_come_first_in_the_order_nodes_are_submitted():
    """MultiProc submits ready nodes in the flat graph's topological order: TV and MEDI (long
    running) before TKD and L2, whatever order the user named them in; the maps keep the
    user's order."""
    from nipype.pipeline.engine.utils import topological_sort

    methods = ["tkd", "tv", "l2", "medi"]
    wf = init_inversion_wf(methods=methods)
    order, _ = topological_sort(wf._create_flat_graph())
    names = [n.name.removeprefix("inversion_") for n in order if n.name.startswith("inversion_")]
    assert names == ["tv", "medi", "tkd", "l2"]
    links = _links(wf)
    for i, m in enumerate(methods, start=1):
        assert (f"inversion_wf.inversion_{m}", "out_file", "inversion_wf.merge_chimaps",
                f"in{i}") in links  # fmt: skip


def test_inversion_wf_rejects_unknown_and_repeated_methods():
    with pytest.raises(ValueError, match="unknown inversion method 'qsmnet'"):
        init_inversion_wf(methods=["tkd", "qsmnet"])
    with pytest.raises(ValueError, match="repeat"):
        init_inversion_wf(methods=["tkd", "tkd"])
    with pytest.raises(ValueError, match="no inversion method"):
        init_inversion_wf(methods=[])


@pytest.mark.parametrize(
    ("device", "cuda_available", "expected"),
    [("cpu", True, False), ("cuda", False, True), ("auto", True, True), ("auto", False, False)],
)
def test_use_gpu_flags(monkeypatch, tmp_path, device, cuda_available, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    assert _util.gpu_work(device) is expected
    a, b = _acq(acq="ori1"), _acq(acq="ori2", b0_dir=(0.0, 0.34, 0.94))
    # --omp-nthreads 4: every CPU-heavy node, the long-running inversions too
    s = _settings(
        tmp_path, device=device, methods=["tkd", "tv", "medi"], nprocs=4, omp_nthreads=4,
        long_nthreads=4,
    )  # fmt: skip
    wf = init_participant_wf([a, b], s, {("01", None): [a, b]})
    heavy = {"inversion_tkd", "inversion_tv", "inversion_medi", "cosmos", "remove_background"}
    nodes = _nodes(wf)
    gpu_nodes = [n for name, n in nodes.items() if name.split(".")[-1] in heavy]
    assert len(gpu_nodes) == 2 * 3 + 1 + 2
    for node in gpu_nodes:
        # the spelling Nipype's MultiProc reads, and one GPU slot per node (MultiProc refuses
        # to start a GPU node whose n_procs exceeds n_gpu_procs)
        assert node.is_gpu_node() is expected
        assert node.inputs.device == device
        assert node.n_procs == (1 if expected else 4)
    others = [n for name, n in nodes.items() if name.split(".")[-1] not in heavy]
    assert not any(n.is_gpu_node() for n in others)


# --------------------------------------------------------------------------------------------
# one acquisition, COSMOS, participant


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "refs" / "sub-01_Chimap.nii.gz"
    path.parent.mkdir()
    path.write_bytes(b"")  # only its existence matters when building
    return str(path)


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("methods", [["tkd"], ["l2", "medi"]], ids="-".join)
def test_qsm_wf_graph(tmp_path, methods, with_reference, reference_file):
    reference = reference_file if with_reference else None
    a = _acq(run="2")
    wf = init_qsm_wf(acquisition=a, output_dir=tmp_path, methods=methods, reference=reference)
    nodes, links = _nodes(wf), _links(wf)
    metrics = nodes["qsm_wf.metrics_wf.compute_metrics"]
    assert metrics.inputs.methods == methods
    if reference is None:
        assert not isdefined(metrics.inputs.reference)
    else:
        assert metrics.inputs.reference == reference
        assert metrics.inputs.reference_name == "sub-01_Chimap.nii.gz"
    assert ("qsm_wf.field_wf.remove_background", "local_field",
            "qsm_wf.inversion_wf.inversion_" + methods[0], "local_field") in links  # fmt: skip
    assert ("qsm_wf.inversion_wf.merge_chimaps", "out", "qsm_wf.metrics_wf.compute_metrics",
            "in_files") in links  # fmt: skip
    # sinks: one per map, named after the derivative it writes
    anat = tmp_path / "sub-01" / "anat"
    expected = {
        "ds_brain_mask": "sub-01_run-2_desc-brain_mask.nii.gz",
        "ds_local_mask": "sub-01_run-2_desc-local_mask.nii.gz",
        "ds_reliable_mask": "sub-01_run-2_desc-reliable_mask.nii.gz",
        "ds_total_field": "sub-01_run-2_desc-total_fieldmap.nii.gz",
        "ds_noise_field": "sub-01_run-2_desc-noise_fieldmap.nii.gz",
        "ds_local_field": "sub-01_run-2_desc-local_fieldmap.nii.gz",
        "ds_metrics_tsv": "sub-01_run-2_metrics.tsv",
        "ds_metrics_json": "sub-01_run-2_metrics.json",
        **{f"ds_chimap_{m}": f"sub-01_run-2_desc-{m}_Chimap.nii.gz" for m in methods},
        "ds_r2star": "sub-01_run-2_R2starmap.nii.gz",
        "ds_t2star": "sub-01_run-2_T2starmap.nii.gz",
        "ds_s0": "sub-01_run-2_S0map.nii.gz",
        **{f"ds_{k}": f"sub-01_run-2_desc-{d}_T2starw.nii.gz" for k, d in
           (("swi", "swi"), ("minip", "minip"), ("smwi_para", "smwipara"),
            ("smwi_dia", "smwidia"))},
    }  # fmt: skip
    sinks = {name.split(".")[-1]: n for name, n in nodes.items() if ".ds_" in name}
    assert set(sinks) == set(expected)
    for key, fname in expected.items():
        assert sinks[key].inputs.out_file == str(anat / fname)
    side = sinks[f"ds_chimap_{methods[0]}"].inputs.sidecar
    assert side["Units"] == "ppm" and side["Reference"] == "mean of local mask"
    assert side["Sources"][0] == "sub-01/anat/sub-01_run-2_echo-1_part-mag_MEGRE.nii.gz"
    assert side["GeneratedBy"]["Name"] == "qsmprep"
    assert (
        "qsm_wf.inversion_wf.inversion_" + methods[0], "meta",
        f"qsm_wf.qsm_derivatives_wf.ds_chimap_{methods[0]}", "meta",
    ) in links  # fmt: skip
    assert sinks["ds_total_field"].inputs.sidecar["Units"] == "Hz"


@pytest.mark.parametrize("methods", [["tkd"], ["l2", "medi"]], ids="-".join)
def test_qsm_wf_csf_reference_leaves_chimaps_to_the_space_wf(tmp_path, methods):
    # the space workflow references the native Chimaps to the ventricles and writes them: the
    # QSM workflow has no Chimap sinks then, and gives the inversion sidecars on its outputnode
    a = _acq(run="2")
    mask = init_qsm_wf(acquisition=a, output_dir=tmp_path, methods=methods)
    csf = init_qsm_wf(acquisition=a, output_dir=tmp_path, methods=methods, reference_region="csf")
    sinks = {name.split(".")[-1] for name in _nodes(csf) if ".ds_" in name}
    chimap_sinks = {f"ds_chimap_{m}" for m in methods}
    mask_sinks = {name.split(".")[-1] for name in _nodes(mask) if ".ds_" in name}
    assert chimap_sinks <= mask_sinks and sinks == mask_sinks - chimap_sinks
    assert set(_nodes(csf)) == set(_nodes(mask)) - {
        f"qsm_wf.qsm_derivatives_wf.{s}" for s in chimap_sinks
    }
    for wf in (mask, csf):
        out = wf.get_node("outputnode")
        assert all(f"meta_{m}" in out.inputs.copyable_trait_names() for m in methods)
        edges = wf._graph.get_edge_data(wf.get_node("inversion_wf"), out)["connect"]
        assert {(f"outputnode.meta_{m}", f"meta_{m}") for m in methods} <= set(edges)
    # metrics and the outputnode's Chimaps are unchanged (mean-referenced)
    assert ("qsm_wf.inversion_wf.merge_chimaps", "out", "qsm_wf.metrics_wf.compute_metrics",
            "in_files") in _links(csf)  # fmt: skip
    with pytest.raises(ValueError, match="reference_region"):
        init_qsm_wf(acquisition=a, output_dir=None, reference_region="ventricles")


def test_qsm_wf_outputs(tmp_path):
    # r2star (default): fed by the loaded magnitude and the brain mask, written with units
    wf = init_qsm_wf(acquisition=_acq(), output_dir=tmp_path, methods=["tkd"])
    nodes, links = _nodes(wf), _links(wf)
    assert ("qsm_wf.field_wf.load_echoes", "magnitude", "qsm_wf.r2star_map", "magnitude") in links
    assert ("qsm_wf.field_wf.brain_mask", "out_file", "qsm_wf.r2star_map", "mask") in links
    assert ("qsm_wf.r2star_map", "meta", "qsm_wf.qsm_derivatives_wf.ds_r2star", "meta") in links
    side = nodes["qsm_wf.qsm_derivatives_wf.ds_r2star"].inputs.sidecar
    assert side["Units"] == "1/s" and side["SkullStripped"] is True
    assert nodes["qsm_wf.qsm_derivatives_wf.ds_t2star"].inputs.sidecar["Units"] == "s"
    assert "ARLO" in wf.__desc__ and "arlo" in wf.__citations__
    params = {"r2star": {"method": "nlls", "max_iter": 10}}
    wf = init_qsm_wf(acquisition=_acq(), output_dir=None, methods=["tkd"], method_params=params)
    node = _nodes(wf)["qsm_wf.r2star_map"]
    assert node.inputs.method == "nlls" and node.inputs.params == {"max_iter": 10}
    # chi only, or one echo: no R2*
    one = _acq()
    one.magnitude, one.phase, one.echo_times = one.magnitude[:1], one.phase[:1], [0.01]
    for a, outputs in ((_acq(), ["chi"]), (one, ["chi", "r2star", "swi"])):
        wf = init_qsm_wf(acquisition=a, output_dir=tmp_path, methods=["tkd"], outputs=outputs)
        assert not [n for n in _nodes(wf) if "r2star" in n or "t2star" in n or "ds_s0" in n]
    with pytest.raises(ValueError, match="unknown output"):
        init_qsm_wf(acquisition=_acq(), output_dir=None, outputs=["chi", "t1"])
    with pytest.raises(ValueError, match="always computed"):
        _settings(tmp_path, outputs=["r2star"])
    assert _settings(tmp_path, outputs=["swi", "chi"]).outputs == ["chi", "swi"]


def test_qsm_wf_r2star_citations_from_the_registry():
    """The R2* references are those of the method's registry record ("auto": ARLO's)."""
    from qsmprep import methods as registry

    def cites(method):
        params = {"r2star": {"method": method}}
        wf = init_qsm_wf(acquisition=_acq(), output_dir=None, method_params=params)
        return wf.__citations__

    assert cites("auto") == cites("arlo") == ["arlo"]
    assert cites("nlls") == cites("loglinear") == []
    ref = registry.Reference("r2fit2099", "Doe J. An R2* fit. J Test 2099;1:1-2.")
    plugin = registry.Method(
        "r2plugin", "r2star", "qsmprep.recon.r2star:r2star_nlls", "plug-in",
        "by a plug-in fit", "by a plug-in fit (Doe, 2099)", citations=(ref,),
    )  # fmt: skip
    with registry.registered(plugin):
        assert cites("r2plugin") == ["r2fit2099"]


@pytest.mark.parametrize(
    ("methods", "outputs", "smwi_from"),
    [(["unet", "l2", "tkd"], ["chi", "swi"], "l2"), (["unet"], ["chi", "swi"], "unet"),
     (["tkd"], ["r2star", "swi"], None), (["tkd"], ["chi", "r2star"], None)],
)  # fmt: skip
def test_qsm_wf_swi_graph(tmp_path, methods, outputs, smwi_from):
    swi = "swi" in outputs
    wf = init_qsm_wf(
        acquisition=_acq(), output_dir=tmp_path, methods=methods, outputs=outputs,
        method_params={"swi": {"sigma_mm": 3.0}},
    )  # fmt: skip
    nodes, links = _nodes(wf), _links(wf)
    sinks = {n.split(".")[-1] for n in nodes if ".ds_" in n}
    assert ({"ds_swi", "ds_minip"} <= sinks) == swi
    assert ({"ds_smwi_para", "ds_smwi_dia"} <= sinks) == (smwi_from is not None)
    if not swi:
        assert not [n for n in nodes if "swi" in n]
        return
    swi_node = nodes["qsm_wf.swi_wf.compute_swi"]
    assert swi_node.inputs.params["sigma_mm"] == 3.0 and swi_node.inputs.params["power"] == 4.0
    assert ("qsm_wf.field_wf.fit_field", "total_field", "qsm_wf.swi_wf.compute_swi",
            "total_field") in links  # fmt: skip
    assert ("qsm_wf.field_wf.load_echoes", "magnitude", "qsm_wf.swi_wf.compute_swi",
            "magnitude") in links  # fmt: skip
    assert ("qsm_wf.field_wf.field_reliability", "reliable_mask", "qsm_wf.swi_wf.compute_swi",
            "mask") in links  # fmt: skip
    ds = nodes["qsm_wf.swi_derivatives_wf.ds_swi"]
    side = ds.inputs.sidecar
    assert ds.inputs.out_file.endswith("sub-01_desc-swi_T2starw.nii.gz")
    assert side["SkullStripped"] is False and side["GeneratedBy"]["Name"] == "qsmprep"
    assert side["Sources"][0].endswith("sub-01_echo-1_part-mag_MEGRE.nii.gz")
    text, keys = methods_description(wf)
    assert "CLEAR-SWI" in text and "clearswi" in keys
    if smwi_from:
        assert (f"qsm_wf.inversion_wf.inversion_{smwi_from}", "out_file",
                "qsm_wf.swi_wf.compute_smwi", "chimap") in links  # fmt: skip
        para = nodes["qsm_wf.swi_derivatives_wf.ds_smwi_para"].inputs.sidecar
        assert para["SusceptibilityMap"] == f"sub-01_desc-{smwi_from}_Chimap.nii.gz"
        assert "SMWI" in text and "smwi2014" in keys


def test_participant_wf_reads_outputs(tmp_path):
    s = _settings(tmp_path, methods=["tkd"])
    assert "swi_wf" in {n.split(".")[2] for n in _nodes(init_participant_wf([_acq()], s))}
    s.outputs = ["chi"]  # the --outputs selection, when the settings carry one
    assert "swi_wf" not in {n.split(".")[2] for n in _nodes(init_participant_wf([_acq()], s))}
    s.outputs = ["swi"]
    nodes = _nodes(init_participant_wf([_acq()], s))
    assert any(n.endswith("swi_wf.compute_swi") for n in nodes)
    assert not any(n.endswith("compute_smwi") for n in nodes)


def test_qsm_wf_without_sinks():
    wf = init_qsm_wf(acquisition=_acq(), output_dir=None, methods=["tkd"])
    assert not [n for n in _nodes(wf) if ".ds_" in n]
    with pytest.raises(ValueError, match="reference map /nowhere.nii.gz does not exist"):
        init_qsm_wf(acquisition=_acq(), output_dir=None, reference="/nowhere.nii.gz")


def test_cosmos_wf_graph(tmp_path):
    group = [_acq(acq="ori1"), _acq(acq="ori2", b0_dir=(0.0, 0.34, 0.94))]
    wf = init_cosmos_wf(
        acquisitions=group, output_dir=tmp_path, method_params={"cosmos": {"max_iter": 5}}
    )
    nodes = _nodes(wf)
    cosmos = nodes["cosmos_wf.cosmos"]
    assert cosmos.inputs.b0_dirs == [[0.0, 0.0, 1.0], [0.0, 0.34, 0.94]]
    assert cosmos.inputs.params == {"max_iter": 5}
    ds = nodes["cosmos_wf.cosmos_derivatives_wf.ds_cosmos"]
    assert ds.inputs.out_file == str(tmp_path / "sub-01/anat/sub-01_desc-cosmos_Chimap.nii.gz")
    assert ds.inputs.sidecar["Orientations"] == ["sub-01_acq-ori1", "sub-01_acq-ori2"]
    with pytest.raises(ValueError, match="at least 2"):
        init_cosmos_wf(acquisitions=group[:1], output_dir=None)
    with pytest.raises(ValueError, match="one grid"):
        init_cosmos_wf(acquisitions=[group[0], _acq(acq="x", shape=(8, 8, 8))], output_dir=None)


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("with_group", [False, True])
def test_participant_wf_graph(tmp_path, with_group, with_reference, reference_file):
    reference = reference_file if with_reference else None
    a = _acq(acq="ori1")
    b = _acq(acq="ori2", b0_dir=(0.0, 0.34, 0.94))
    c = _acq(acq="single", shape=(40, 40, 30))
    s = _settings(tmp_path, methods=["tkd", "l2"], reference=reference, bg_method="pdf")
    groups = {("01", None): [a, b]} if with_group else None
    wf = init_participant_wf([a, b, c], s, groups)
    assert wf.name == "sub_01_wf"
    nodes, links = _nodes(wf), _links(wf)
    tops = {n.split(".")[1] for n in nodes}
    qsm = {"qsm_sub_01_acq_ori1_wf", "qsm_sub_01_acq_ori2_wf", "qsm_sub_01_acq_single_wf"}
    assert qsm <= tops
    assert ("cosmos_sub_01_wf" in tops) == with_group
    cosmos_is_reference = with_group and reference is None
    # COSMOS-referenced acquisitions get their metrics beside qsm_wf (no workflow cycle)
    for x in ("ori1", "ori2"):
        beside = f"metrics_sub_01_acq_{x}_wf" in tops
        assert beside == cosmos_is_reference
        if beside:
            m = f"sub_01_wf.metrics_sub_01_acq_{x}_wf.compute_metrics"
            assert ("sub_01_wf.cosmos_sub_01_wf.cosmos", "out_file", m, "reference") in links
            assert ("sub_01_wf.cosmos_sub_01_wf.cosmos", "mask", m, "reference_mask") in links
            assert nodes[m].inputs.reference_name == "sub-01_desc-cosmos_Chimap.nii.gz"
    single = nodes["sub_01_wf.qsm_sub_01_acq_single_wf.metrics_wf.compute_metrics"]
    if reference is not None:
        assert single.inputs.reference == reference
    if with_group:
        for i, x in enumerate(("ori1", "ori2"), start=1):
            assert (f"sub_01_wf.qsm_sub_01_acq_{x}_wf.field_wf.remove_background", "local_field",
                    "sub_01_wf.merge_fields_sub_01", f"in{i}") in links  # fmt: skip
    text, keys = methods_description(wf)
    assert "PDF" in text and "TKD" in text and "Nipype" in text
    assert ("COSMOS" in text) == with_group and ("cosmos" in keys) == with_group
    assert text.count("A brain mask was computed") == 1  # shared paragraphs appear once


def test_participant_wf_checks_groups(tmp_path):
    a, b = _acq(acq="ori1"), _acq(acq="ori2")
    with pytest.raises(ValueError, match="not among the acquisitions"):
        init_participant_wf([a], _settings(tmp_path), [[a, b]])
    with pytest.raises(ValueError, match="not unique"):
        init_participant_wf([a, a], _settings(tmp_path))


# --------------------------------------------------------------------------------------------
# executed end to end, then resumed


def test_qsm_wf_runs_and_resumes(tmp_path):
    from qsmprep.sim.bids import simulate_bids_dataset

    bids_dir = simulate_bids_dataset(
        tmp_path / "bids", shape=(32, 32, 24), voxel_size=(4.0, 4.0, 4.0),
        echo_times=(0.004, 0.008, 0.012), seed=1,
    )  # fmt: skip
    (acq,) = collect_acquisitions(bids_dir)
    out, work = tmp_path / "out", tmp_path / "work"

    def run():
        wf = init_qsm_wf(acquisition=acq, output_dir=out, methods=["tkd", "l2", "tfi"])
        wf.base_dir = str(work)
        wf.config["execution"] = {
            "crashdump_dir": str(tmp_path / "crash"),
            "remove_unnecessary_outputs": False,
        }
        wf.run(plugin="Linear")

    run()
    anat = out / "sub-01" / "anat"
    expected = [
        f"sub-01_desc-{d}.nii.gz"
        for d in ("brain_mask", "local_mask", "total_fieldmap", "noise_fieldmap",
                  "local_fieldmap", "tkd_Chimap", "l2_Chimap", "swi_T2starw", "minip_T2starw",
                  "smwipara_T2starw", "smwidia_T2starw")
    ]  # fmt: skip
    for name in expected:
        assert (anat / name).is_file(), name
        assert (anat / name.replace(".nii.gz", ".json")).is_file(), name
    assert (anat / "sub-01_metrics.tsv").is_file() and (anat / "sub-01_metrics.json").is_file()
    for suffix in ("R2starmap", "T2starmap", "S0map"):
        assert (anat / f"sub-01_{suffix}.nii.gz").is_file(), suffix
    r2side = json.loads((anat / "sub-01_R2starmap.json").read_text())
    assert r2side["Method"] == "arlo" and r2side["R2starRange"] == [0.0, 1000.0]
    assert r2side["EchoTime"] == [0.004, 0.008, 0.012] and "ClippedHighVoxels" in r2side
    r2 = nib.load(anat / "sub-01_R2starmap.nii.gz").get_fdata()
    brain = nib.load(anat / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    assert np.all(r2[~brain] == 0) and r2.min() >= 0 and r2.max() <= 1000
    assert not [p for p in anat.iterdir() if p.name.startswith(".")]  # no temporary files

    side = json.loads((anat / "sub-01_desc-tkd_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["Method"] == "tkd"
    assert side["Parameters"]["threshold"] == 0.19 and side["DataConsistencyResidual"] > 0
    assert side["Sources"][0] == "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"

    # chi against the simulator's truth in the local mask: measured correlation 0.62 for TKD
    # and L2 (4 mm voxels, three echoes, brain cut by the field of view), where the local
    # field after RESHARP already has 85 % NRMSE against its truth
    truth_dir = bids_dir / "derivatives" / "groundtruth" / "sub-01" / "anat"
    truth = nib.load(truth_dir / "sub-01_Chimap.nii.gz").get_fdata()
    mask = nib.load(anat / "sub-01_desc-local_mask.nii.gz").get_fdata() > 0
    for m in ("tkd", "l2"):
        chi = nib.load(anat / f"sub-01_desc-{m}_Chimap.nii.gz").get_fdata()
        assert abs(chi[mask].mean()) < 1e-5
        assert np.corrcoef(chi[mask], truth[mask])[0, 1] > 0.5, m
    rows = (anat / "sub-01_metrics.tsv").read_text().splitlines()
    assert rows[1].split("\t")[:3] == ["tkd", "none", "n/a"]
    # TFI inverts the total field over the brain mask, with no background removal
    side = json.loads((anat / "sub-01_desc-tfi_Chimap.json").read_text())
    assert side["FieldInput"] == "desc-total_fieldmap" and side["Mask"] == "desc-brain_mask"
    assert side["BackgroundMethod"] == "none (total field inversion)"
    assert side["NoiseLambda"]["NoiseStd"] > 0
    chi = nib.load(anat / "sub-01_desc-tfi_Chimap.nii.gz").get_fdata()
    brain = nib.load(anat / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    assert np.count_nonzero(chi[brain]) >= 0.99 * brain.sum() and not chi[~brain].any()
    assert np.corrcoef(chi[mask], truth[mask])[0, 1] > 0.5

    # SWI, minIP (a grid of its own: full 16 mm slabs of 4 mm slices) and SMWI from TKD
    swi = nib.load(anat / "sub-01_desc-swi_T2starw.nii.gz")
    minip = nib.load(anat / "sub-01_desc-minip_T2starw.nii.gz")
    assert swi.shape == (32, 32, 24) and minip.shape == (32, 32, 21)
    assert tuple(minip.header.get_data_shape()) == minip.dataobj.shape == (32, 32, 21)
    np.testing.assert_allclose(minip.affine, minip.header.get_sform())
    np.testing.assert_allclose(minip.affine, minip.header.get_qform(), atol=1e-4)
    # voxel (i, j, k) of the minIP sits at the centre of SWI slices k .. k + 3
    centre = swi.affine @ np.array([5.0, 7.0, 2 + 1.5, 1.0])
    np.testing.assert_allclose(minip.affine @ np.array([5.0, 7.0, 2.0, 1.0]), centre)
    np.testing.assert_allclose(
        minip.get_fdata()[..., 2], swi.get_fdata()[..., 2:6].min(-1), rtol=1e-6
    )
    side = json.loads((anat / "sub-01_desc-minip_T2starw.json").read_text())
    assert side["SlabSlices"] == 4 and side["Parameters"]["slab_mm"] == 16.0
    side = json.loads((anat / "sub-01_desc-swi_T2starw.json").read_text())
    assert side["Parameters"]["power"] == 4.0 and side["Parameters"]["sigma_mm"] == 4.0
    assert side["Parameters"]["te"] == 0.012 and side["SkullStripped"] is False
    para = json.loads((anat / "sub-01_desc-smwipara_T2starw.json").read_text())
    assert para["SusceptibilityMap"] == "sub-01_desc-tkd_Chimap.nii.gz"
    assert para["Parameters"] == {"threshold": 1.0, "power": 4.0}

    # rerun with the same work directory: compute nodes are reused, sinks rewrite
    results = {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz") if "ds_" not in p.name}
    assert len(results) >= 10
    before = {p: p.stat().st_mtime_ns for p in anat.iterdir()}
    run()
    assert {p: p.stat().st_mtime_ns for p in results} == results
    assert set(anat.iterdir()) == set(before)


@pytest.mark.parametrize("bg_method", ["lbv", "resharp"])
def test_networks_get_the_background_of_their_training_data(bg_method):
    # the shipped networks were trained on RESHARP-made local fields: with another background
    # method the field workflow makes one for them too, and only they read it
    wf = init_qsm_wf(acquisition=_acq(), output_dir=None, methods=["tv", "unet"],
                     bg_method=bg_method)  # fmt: skip
    links, nodes = _links(wf), _nodes(wf)
    f, i = "qsm_wf.field_wf.", "qsm_wf.inversion_wf."
    dl_node = f + "remove_background_dl"
    if bg_method == "lbv":
        assert nodes[dl_node].inputs.method == "resharp"
        assert (f + "brain_mask", "out_file", dl_node, "mask") in links
        for field in ("local_field", "local_mask", "meta"):
            to = {"local_mask": "mask", "meta": "bg_meta"}.get(field, field)
            assert (dl_node, field, i + "inversion_unet", to) in links
            assert (f + "remove_background", field, i + "inversion_tv", to) in links
    else:
        assert dl_node not in nodes
        assert (
            f + "remove_background",
            "local_field",
            i + "inversion_unet",
            "local_field",
        ) in links


def test_nodes_announce_their_memory_from_the_grid(tmp_path):
    """The scheduler (MultiProc, --mem-gb) sees each heavy node's memory, scaled to the grid:
    a 160 x 186 x 149 head at 4 echoes announces the measured peaks with 50 % slack."""
    a = _acq(shape=(160, 186, 149))
    a.magnitude, a.phase = a.magnitude + a.magnitude[:1], a.phase + a.phase[:1]
    a.echo_times = [0.004, 0.008, 0.012, 0.016]
    nodes = _nodes(init_qsm_wf(acquisition=a, output_dir=None, methods=["tkd", "tv"]))
    gb = {k.split(".")[-1]: n.mem_gb for k, n in nodes.items()}
    # measured peaks (qsmprep-bench participant, resource monitor): TV 0.73, unwrap 0.77 GB
    assert 0.73 < gb["inversion_tv"] < 2.0 and 0.77 < gb["unwrap_phase"] < 2.0
    assert gb["remove_background"] > 0.6 and gb["load_echoes"] > 0.4
    small = {k.split(".")[-1]: n.mem_gb for k, n in _nodes(init_qsm_wf(
        acquisition=_acq(), output_dir=None, methods=["tv"])).items()}  # fmt: skip
    assert small["inversion_tv"] < gb["inversion_tv"]
