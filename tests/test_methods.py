"""The method registry: records that match their functions, and one record is enough.

A toy inversion (a function in this module plus one :class:`~qsmprep.methods.Method`,
registered at run time) shows up in every place that lists methods: the command line, the
``--config`` sections, the Nipype graph (and runs there), the methods paragraph with its
reference, and the documentation's table of methods. So do a toy brain mask and a toy phase
unwrapping: the command line's choices, the field graph and its boilerplate, the field chain
(where they run), the methods paragraph and the documentation's tables.
"""

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmprep import methods
from qsmprep.methods import Method, Parameter, Reference

ROOT = Path(__file__).resolve().parents[1]


def toy_inversion(
    local_field, mask, voxel_size, *, b0_dir=(0.0, 0.0, 1.0), weight=None, scale=3.0,
    device="cpu", info=None,
):  # fmt: skip
    """Not a dipole inversion: ``scale`` times the field inside the mask (ppm)."""
    return np.where(mask, scale * np.asarray(local_field, dtype=np.float32), 0.0)


TOY = Method(
    "toy", "inversion", f"{__name__}:toy_inversion", "Toy",
    "a scaled copy of the field", "a scaled copy of the local field (Toy; Nobody, 2024)",
    citations=(Reference("toy2024", "Nobody N. A toy inversion. J Toys 2024;1:1-2."),),
    parameters=(Parameter("scale", 3.0, "", "factor applied to the field", key=True),),
    inputs=("weight",),
)  # fmt: skip


@pytest.fixture
def toy():
    """The toy inversion, registered for one test."""
    with methods.registered(TOY) as record:
        yield record
    assert "toy" not in methods.names()


TODAY = {
    ("mask", None): ("magnitude", "phase"),
    ("unwrap", None): ("quality", "laplacian"),
    ("inversion", "classical"): ("tkd", "tsvd", "l2", "tv", "medi"),
    ("inversion", "dl"): ("unet", "adaptive", "dsbn", "dcfinetune", "unsup"),
    ("inversion", "multi-orientation"): ("cosmos",),
    ("background", None): ("resharp", "vsharp", "sharp", "pdf", "lbv"),
    ("r2star", None): ("arlo", "nlls", "loglinear"),
}
"""The methods of each stage in the order of the help, the reports and the error messages."""


@pytest.mark.parametrize(("stage", "kind"), TODAY)
def test_orders_of_today(stage, kind):
    """Registration order is today's; methods added later follow."""
    today = TODAY[stage, kind]
    assert methods.names(stage, kind=kind)[: len(today)] == today


def test_defaults():
    assert methods.defaults("inversion") == ("tkd", "l2", "tv", "medi")
    assert methods.defaults("background") == ("lbv",)
    assert methods.defaults("mask") == ("magnitude",)
    assert methods.defaults("unwrap") == ("quality",)


@pytest.mark.parametrize("name", methods.names())
def test_record_matches_its_function(name):
    """Each parameter is a keyword of the function with the function's default; each extra
    input is a keyword of it too (the callers pass them by name)."""
    record = methods.get(name)
    sig = inspect.signature(methods.resolve(name)).parameters
    for p in record.parameters:
        assert p.name in sig, f"{name}: {p.name} is not a parameter of {record.implementation}"
        default = sig[p.name].default
        default = list(default) if isinstance(default, tuple) else default
        assert p.default == default, f"{name}.{p.name}: record {p.default!r}, code {default!r}"
        assert sig[p.name].kind in (sig[p.name].KEYWORD_ONLY, sig[p.name].POSITIONAL_OR_KEYWORD)
    for i in record.inputs:
        assert i in sig, f"{name}: extra input {i} is not a parameter of {record.implementation}"
    assert record.label and record.description and record.summary
    assert set(record.inputs) <= set(methods.INPUTS)


def test_the_registry_is_on_the_ground_floor():
    """Standard library only: importing it loads no numerics, Nipype or torch."""
    tree = ast.parse((ROOT / "qsmprep" / "methods.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    code = (
        "import sys, qsmprep.methods; print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'numpy', 'scipy', 'nipype', 'torch', 'nibabel'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_records_are_checked():
    with pytest.raises(ValueError, match="alphanumeric"):
        Method("to-y", "inversion", "m:f", "Toy", "d")
    with pytest.raises(ValueError, match="unknown stage"):
        Method("toy", "unwrapping", "m:f", "Toy", "d")
    with pytest.raises(ValueError, match="unknown inputs"):
        Method("toy", "inversion", "m:f", "Toy", "d", inputs=("phase",))
    with pytest.raises(ValueError, match="module:function"):
        Method("toy", "inversion", "m.f", "Toy", "d")
    with pytest.raises(ValueError, match="arch and weights"):
        Method("toy", "inversion", "m:f", "Toy", "d", kind="dl")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("tkd"))
    with pytest.raises(ValueError, match="choose from resharp, vsharp, sharp, pdf, lbv"):
        methods.get("tkd", "background")


def test_toy_in_the_command_line(toy, tmp_path):
    from qsmprep.cli import run
    from qsmprep.config import param_sections

    help_text = " ".join(run.build_parser().format_help().split())
    assert re.search(r"classical: tkd, tsvd, l2, tv, medi(, \w+)*, toy; deep learning", help_text)
    assert "toy" in param_sections()
    (tmp_path / "bids").mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"toy": {"scale": 2.0}}))
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--methods", "tkd",
            "toy", "--config", str(config)]  # fmt: skip
    settings = run.settings_from_args(run.build_parser().parse_args(argv))
    assert settings.methods == ["tkd", "toy"]
    assert settings.params("toy") == {"scale": 2.0}


def test_toy_in_the_graph_and_it_runs(toy, tmp_path):
    from qsmprep.interfaces import DipoleInversion
    from qsmprep.workflows.inversion import init_inversion_wf

    wf = init_inversion_wf(methods=["tkd", "toy"], method_params={"toy": {"scale": 2.0}})
    node = wf.get_node("inversion_toy")
    assert isinstance(node.interface, DipoleInversion)
    assert node.inputs.method == "toy" and node.inputs.params == {"scale": 2.0}
    inputnode = wf.get_node("inputnode")
    wired = wf._graph.get_edge_data(inputnode, node)["connect"]
    assert ("noise_field", "noise_field") in wired  # its extra input, the data weight
    assert ("magnitude", "magnitude") not in wired
    assert "a scaled copy of the local field (Toy; Nobody, 2024)" in wf.__desc__
    assert "toy2024" in wf.__citations__

    rng = np.random.default_rng(0)
    field = rng.normal(0.0, 5.0, (8, 8, 8)).astype(np.float32)  # Hz
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    for name, data in (("field.nii", field), ("mask.nii", mask)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name)
    res = DipoleInversion(
        local_field=str(tmp_path / "field.nii"), mask=str(tmp_path / "mask.nii"),
        method="toy", params={"scale": 2.0}, b0=3.0,
    ).run(cwd=str(tmp_path))  # fmt: skip
    chi = np.asarray(nib.load(res.outputs.out_file).dataobj)
    ppm = field / (42.577478 * 3.0)
    expected = 2.0 * ppm[mask > 0]
    np.testing.assert_allclose(chi[mask > 0], expected - expected.mean(), atol=1e-5)
    assert res.outputs.meta["Parameters"]["scale"] == 2.0


def test_toy_in_the_methods_text_and_references(toy):
    from qsmprep.reports.methods import CITATIONS, methods_text

    text = methods_text({"methods": ["tkd", "toy"], "bg_method": "resharp"})
    cited = re.search(r"Toy \[(\d+)\] \(a scaled copy of the field; scale 3\)", text.paragraph)
    assert cited, text.paragraph
    assert text.references[int(cited[1]) - 1] == "Nobody N. A toy inversion. J Toys 2024;1:1-2."
    assert CITATIONS["toy2024"].startswith("Nobody N.")


def test_toy_in_the_docs_table(toy):
    page = methods.markdown()
    inversion = page.split("## Dipole inversion")[1].split("## ")[0]
    assert f"| `toy` | Toy: a scaled copy of the field | `{__name__}:toy_inversion` |" in inversion
    assert "`scale` 3: factor applied to the field" in inversion


def test_docs_build_their_table_from_the_registry():
    """The table of methods is generated when the documentation is built: it cannot drift."""
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert "from qsmprep.methods import markdown" in conf and "_write_methods()" in conf
    assert "_generated/methods" in (ROOT / "docs" / "index.md").read_text()


# --------------------------------------------------------------------------------------------
# a toy brain mask and a toy phase unwrapping


def toy_mask(magnitude, voxel_size=None, *, level=0.5):
    """Not a brain mask: the voxels above ``level`` times the largest first-echo magnitude."""
    m = np.asarray(magnitude, dtype=np.float64)
    m = m[..., 0] if m.ndim == 4 else m
    return m > level * m.max()


def toy_unwrap(phase, magnitude, echo_times, *, mask, voxel_size=None, device="cpu", shift=0.0):
    """Not an unwrapping: the wrapped phase plus ``shift`` (rad) inside the mask."""
    inside = np.asarray(mask, bool)[..., None]
    return np.where(inside, np.asarray(phase, np.float32) + np.float32(shift), 0.0)


TOY_MASK = Method(
    "toymask", "mask", f"{__name__}:toy_mask", "toy mask",
    "the voxels above a fraction of the brightest", "by a toy threshold (Nobody, 2025)",
    citations=(Reference("toymask2025", "Nobody N. A toy mask. J Toys 2025;2:3-4."),),
    parameters=(Parameter("level", 0.5, "", "fraction of the largest magnitude"),),
)  # fmt: skip
TOY_UNWRAP = Method(
    "toyunwrap", "unwrap", f"{__name__}:toy_unwrap", "Toy",
    "the wrapped phase shifted by a constant", "by a toy shift of every echo (Nobody, 2025)",
    one_echo_summary="by a toy shift of its echo (Nobody, 2025)",
    citations=(Reference("toyunwrap2025", "Nobody N. A toy unwrapping. J Toys 2025;2:5-6."),),
    parameters=(Parameter("shift", 0.0, "rad", "constant added to the phase"),),
)  # fmt: skip


@pytest.fixture
def toys():
    """The toy mask and unwrapping, registered for one test."""
    with methods.registered(TOY_MASK), methods.registered(TOY_UNWRAP):
        yield
    assert not {"toymask", "toyunwrap"} & set(methods.names())


def test_toy_mask_and_unwrap_records_match_their_functions():
    for record in (TOY_MASK, TOY_UNWRAP):
        module, _, func = record.implementation.partition(":")
        sig = inspect.signature(getattr(sys.modules[module], func)).parameters
        assert all(sig[p.name].default == p.default for p in record.parameters)


def test_toy_mask_and_unwrap_in_the_command_line(toys, tmp_path):
    from qsmprep.cli import bench, run

    parser = run.build_parser()
    help_text = " ".join(parser.format_help().split())
    assert "toymask: the voxels above a fraction of the brightest" in help_text
    assert "toyunwrap: the wrapped phase shifted by a constant" in help_text
    (tmp_path / "bids").mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mask": {"level": 0.3}, "unwrap": {"shift": 0.5}}))
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--mask-method",
            "toymask", "--unwrap", "toyunwrap", "--config", str(config)]  # fmt: skip
    settings = run.settings_from_args(parser.parse_args(argv))
    assert (settings.mask_method, settings.unwrap) == ("toymask", "toyunwrap")
    assert settings.params("mask") == {"level": 0.3}
    assert settings.params("unwrap") == {"shift": 0.5}
    args = bench.build_parser().parse_args(["field", "--unwrap", "toyunwrap"])
    assert args.unwrap == "toyunwrap"


def test_toy_mask_and_unwrap_in_the_docs_table(toys):
    page = methods.markdown()
    mask = page.split("## Brain mask")[1].split("## ")[0]
    assert "the `--config` section `mask`" in mask
    assert (
        f"| `toymask` | toy mask: the voxels above a fraction of the brightest "
        f"| `{__name__}:toy_mask` |" in mask
    )
    assert "`level` 0.5: fraction of the largest magnitude" in mask
    unwrap = page.split("## Phase unwrapping")[1].split("## ")[0]
    assert "the `--config` section `unwrap`" in unwrap
    assert f"| `toyunwrap` | Toy: the wrapped phase shifted by a constant | `{__name__}:" in unwrap
    assert "`shift` 0 rad: constant added to the phase" in unwrap


def test_toy_mask_and_unwrap_in_the_field_graph(toys):
    from qsmprep.interfaces import BrainMask, UnwrapPhase
    from qsmprep.workflows.field import init_field_wf
    from qsmprep.workflows.qsm import resolve_unwrap

    params = {"mask": {"level": 0.3}, "unwrap": {"shift": 0.5}}
    wf = init_field_wf(mask_method="toymask", unwrap_method="toyunwrap", method_params=params)
    mask_node, unwrap_node = wf.get_node("brain_mask"), wf.get_node("unwrap_phase")
    assert isinstance(mask_node.interface, BrainMask) and mask_node.inputs.method == "toymask"
    assert mask_node.inputs.params == {"level": 0.3}
    assert isinstance(unwrap_node.interface, UnwrapPhase)
    assert unwrap_node.inputs.method == "toyunwrap"
    assert unwrap_node.inputs.params == {"shift": 0.5}
    assert "A brain mask was computed by a toy threshold (Nobody, 2025)." in wf.__desc__
    assert "unwrapped by a toy shift of every echo (Nobody, 2025)" in wf.__desc__
    assert {"toymask2025", "toyunwrap2025", "mcpc3ds"} <= set(wf.__citations__)
    one = init_field_wf(mask_method="toymask", unwrap_method="toyunwrap", n_echoes=1)
    assert "the phase was unwrapped by a toy shift of its echo (Nobody, 2025)." in one.__desc__
    assert resolve_unwrap("toyunwrap", 1) == "toyunwrap"
    with pytest.raises(ValueError, match="unwrapping method 'toy'"):
        init_field_wf(unwrap_method="toy")


def _echoes(shape=(12, 12, 10), te=(0.004, 0.008, 0.012)):
    """A bright box in noise with a smooth field: magnitude and wrapped phase of each echo."""
    rng = np.random.default_rng(0)
    mag = np.full((*shape, len(te)), 0.05, np.float32)
    mag[2:-2, 2:-2, 2:-2] = 1.0
    mag += rng.uniform(0, 0.01, mag.shape).astype(np.float32)
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    field = 20.0 * x + np.zeros(shape)  # Hz
    phase = np.angle(np.exp(2j * np.pi * field[..., None] * np.asarray(te)))
    return mag, phase.astype(np.float32), np.asarray(te)


def test_toy_mask_and_unwrap_run_through_the_chain(toys):
    from qsmprep.recon import chain
    from qsmprep.recon.unwrap import wrap_phase

    mag, phase, te = _echoes()
    vs = (2.0, 2.0, 2.0)
    brain = chain.compute_brain_mask(mag, vs, method="toymask", phase=phase, echo_times=te)
    np.testing.assert_array_equal(brain, toy_mask(mag))
    brain = chain.compute_brain_mask(mag, vs, method="toymask", level=0.3)
    np.testing.assert_array_equal(brain, toy_mask(mag, level=0.3))
    out = chain.unwrap_phase(
        phase, mag, te, brain, vs, method="toyunwrap", remove_offset=False, shift=0.5
    )
    assert out.dtype == np.float32 and out.shape == phase.shape
    np.testing.assert_allclose(out[brain], wrap_phase(phase)[brain] + 0.5, atol=1e-6)
    assert not out[~brain].any()
    offset_free = chain.unwrap_phase(phase, mag, te, brain, vs, method="toyunwrap")
    assert np.isfinite(offset_free).all() and not offset_free[~brain].any()
    with pytest.raises(TypeError, match="shift"):
        chain.unwrap_phase(phase, mag, te, brain, vs, method="quality", shift=0.5)
    with pytest.raises(ValueError, match="unknown mask method 'toy'"):
        chain.compute_brain_mask(mag, vs, method="toy")


def test_toy_mask_and_unwrap_run_in_their_interfaces(toys, tmp_path):
    from qsmprep.interfaces import BrainMask, UnwrapPhase

    mag, phase, te = _echoes()
    for name, data in (("mag.nii", mag), ("phase.nii", phase)):
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / name)
    res = BrainMask(
        magnitude=str(tmp_path / "mag.nii"), method="toymask", params={"level": 0.3}
    ).run(cwd=str(tmp_path))
    brain = np.asarray(nib.load(res.outputs.out_file).dataobj) > 0
    np.testing.assert_array_equal(brain, toy_mask(mag, level=0.3))
    res = UnwrapPhase(
        phase=str(tmp_path / "phase.nii"), magnitude=str(tmp_path / "mag.nii"),
        mask=res.outputs.out_file, echo_times=list(te), method="toyunwrap",
        params={"remove_offset": False, "shift": 0.5},
    ).run(cwd=str(tmp_path))  # fmt: skip
    out = np.asarray(nib.load(res.outputs.out_file).dataobj)
    np.testing.assert_allclose(out[brain], phase[brain] + 0.5, atol=1e-6)


def test_toy_mask_and_unwrap_in_the_methods_text_and_references(toys):
    from qsmprep.reports.methods import CITATIONS, methods_text

    text = methods_text(
        {"mask_method": "toymask", "unwrap": "toyunwrap", "methods": ["tkd"],
         "method_params": {"mask": {"level": 0.3}, "unwrap": {"shift": 0.5}}}
    )  # fmt: skip
    mask = re.search(r"toy mask \[(\d+)\] \(the voxels above [^;]*; level 0\.3\)", text.paragraph)
    assert mask, text.paragraph
    assert text.references[int(mask[1]) - 1] == "Nobody N. A toy mask. J Toys 2025;2:3-4."
    unwrap = re.search(
        r"the Toy method \[(\d+)\] \(the wrapped [^;]*; shift 0\.5 rad\)", text.paragraph
    )
    assert unwrap, text.paragraph
    assert text.references[int(unwrap[1]) - 1].startswith("Nobody N. A toy unwrapping.")
    assert CITATIONS["toymask2025"].startswith("Nobody N.")
