"""The method registry: records that match their functions, and one record is enough.

A toy inversion (a function in this module plus one :class:`~qsmprep.methods.Method`,
registered at run time) shows up in every place that lists methods: the command line, the
``--config`` sections, the Nipype graph (and runs there), the methods paragraph with its
reference, and the documentation's table of methods.
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
