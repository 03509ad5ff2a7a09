"""Per-subject HTML report, figures, methods paragraph and group level (qsmprep.reports).

A small fake run is written with nibabel: a raw BIDS dataset (two echoes, magnitude and
phase) and a qsmprep output directory with two subjects; sub-01 has two acquisitions (runs)
and a COSMOS map, its metrics name a reference; sub-02 has one acquisition and metrics
without a reference (``n/a``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmprep.reports import (
    build_group_report,
    build_subject_report,
    collect_metrics,
    methods_paragraph,
)
from qsmprep.reports.collect import find_subject_files, parse_name, read_tsv
from qsmprep.sim import make_head_phantom, simulate_fields

TES = (0.005, 0.010)
METHODS = ("tkd", "l2", "tv", "medi")
REF_COLUMNS = ("nrmse", "hfen", "ssim", "xsim", "psnr", "slope", "corr")


def _save(path: Path, data, affine, sidecar: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    if sidecar is not None:
        name = path.name.replace(".nii.gz", ".json")
        path.with_name(name).write_text(json.dumps(sidecar))


def _write_metrics(path: Path, reference: str | None, rng) -> None:
    cols = ["method", "reference", *REF_COLUMNS, "dc_residual"]
    lines = ["\t".join(cols)]
    for m in METHODS:
        if reference is None:
            vals = ["none", *["n/a"] * len(REF_COLUMNS)]
        else:
            vals = [reference, *[f"{v:.4f}" for v in rng.uniform(0.2, 90, len(REF_COLUMNS))]]
        lines.append("\t".join([m, *vals, f"{rng.uniform(1, 20):.3f}"]))
    path.write_text("\n".join(lines) + "\n")


def _write_acquisition(bids: Path, out: Path, sub: str, prefix: str, ph, fields, rng, ref):
    aff = ph.affine
    raw = bids / f"sub-{sub}" / "anat"
    sources = []
    for e, te in enumerate(TES, start=1):
        stem = f"{prefix}_echo-{e}_part-"
        mag = ph.m0 * np.exp(-te * ph.r2star) * ph.head_mask
        phase = np.angle(np.exp(2j * np.pi * te * fields["total_hz"])) * ph.head_mask
        side = {"EchoTime": te, "MagneticFieldStrength": 3.0}
        _save(raw / f"{stem}mag_MEGRE.nii.gz", mag.astype(np.float32), aff, side)
        _save(raw / f"{stem}phase_MEGRE.nii.gz", phase.astype(np.float32), aff, side)
        # BIDS URIs for sub-01, bare file names for sub-02: both must lead to the raw files
        where = f"bids:raw:sub-{sub}/anat/" if sub == "01" else ""
        sources += [f"{where}{stem}mag_MEGRE.nii.gz", f"{where}{stem}phase_MEGRE.nii.gz"]
    anat = out / f"sub-{sub}" / "anat"
    common = {"Sources": sources, "GeneratedBy": [{"Name": "qsmprep"}]}
    brain = ph.brain_mask.astype(np.uint8)
    local = ndi_erode(ph.brain_mask).astype(np.uint8)
    _save(anat / f"{prefix}_desc-brain_mask.nii.gz", brain, aff, common)
    _save(anat / f"{prefix}_desc-local_mask.nii.gz", local, aff, common)
    hz = {"Units": "Hz", **common}
    _save(
        anat / f"{prefix}_desc-total_fieldmap.nii.gz",
        fields["total_hz"] * brain,
        aff,
        {**hz, "EchoTime": list(TES), "PhaseUnits": "rad"},
    )
    _save(
        anat / f"{prefix}_desc-local_fieldmap.nii.gz",
        fields["local_hz"] * local,
        aff,
        {**hz, "Method": "resharp", "Parameters": {"radius": 4.0, "alpha": 1e-4, "tol": 3e-3}},
    )
    noise = (0.2 + 0.05 * rng.random(brain.shape)) * brain
    _save(anat / f"{prefix}_desc-noise_fieldmap.nii.gz", noise.astype(np.float32), aff, hz)
    scale = {"tkd": 0.8, "l2": 0.6, "tv": 0.9, "medi": 0.95}
    for m in METHODS:
        chi = (scale[m] * ph.chi + 0.01 * rng.standard_normal(ph.shape)) * local
        side = {
            "Units": "ppm",
            "B0": 3.0,
            "B0Direction": [0.0, 0.0, 1.0],
            "EchoTime": list(TES),
            "BackgroundMethod": "resharp",
            "method": m,
            "parameters": {"lam": 0.002} if m == "tv" else {},
            **common,
        }
        _save(anat / f"{prefix}_desc-{m}_Chimap.nii.gz", chi.astype(np.float32), aff, side)
    _write_metrics(anat / f"{prefix}_metrics.tsv", ref, rng)


def ndi_erode(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``(bids_dir, output_dir)`` of a fake run (see the module docstring)."""
    root = tmp_path_factory.mktemp("reports")
    bids, out = root / "bids", root / "out"
    rng = np.random.default_rng(0)
    ph = make_head_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=1)
    fields = simulate_fields(ph)
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "fake", "BIDSVersion": "1.9.0"}')
    out.mkdir()
    desc = {
        "Name": "qsmprep",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmprep"}],
        "DatasetLinks": {"raw": str(bids)},
    }
    (out / "dataset_description.json").write_text(json.dumps(desc))
    settings = {
        "bids_dir": str(bids),
        "output_dir": str(out),
        "methods": list(METHODS),
        "bg_method": "resharp",
        "unwrap": "quality",
        "mask_method": "magnitude",
        "method_params": {"tv": {"lam": 0.002}},
    }
    (out / "qsmprep_settings.json").write_text(json.dumps(settings))
    cosmos = "sub-01_desc-cosmos_Chimap.nii.gz"
    for run in ("1", "2"):
        _write_acquisition(bids, out, "01", f"sub-01_run-{run}", ph, fields, rng, cosmos)
    cos = (ph.chi + 0.005 * rng.standard_normal(ph.shape)) * ph.brain_mask
    _save(out / "sub-01" / "anat" / cosmos, cos.astype(np.float32), ph.affine, {"Units": "ppm"})
    _write_acquisition(bids, out, "02", "sub-02", ph, fields, rng, None)
    return bids, out


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.srcs.append(a["src"])
        if tag == "object" and a.get("data"):
            self.srcs.append(a["data"])


def _sources(page: Path) -> list[str]:
    p = _Refs()
    p.feed(page.read_text())
    return p.srcs


@pytest.fixture(scope="module")
def report01(run_dir):
    _, out = run_dir
    return build_subject_report(out, "sub-01")


def test_parse_name_and_discovery(run_dir):
    _, out = run_dir
    assert parse_name("sub-01_ses-A_run-2_desc-tkd_Chimap.nii.gz") == (
        {"sub": "01", "ses": "A", "run": "2", "desc": "tkd"},
        "Chimap",
    )
    files = find_subject_files(out, "01")
    assert [a.prefix for a in files.acquisitions] == ["sub-01_run-1", "sub-01_run-2"]
    assert sorted(files.acquisitions[0].chimaps) == sorted(METHODS)
    assert set(files.acquisitions[0].fields) == {"total", "local", "noise"}
    assert list(files.cosmos) == [None]


def test_subject_report_complete(run_dir, report01):
    _, out = run_dir
    assert report01 == out / "sub-01.html"
    text = report01.read_text()
    for method in METHODS:
        assert method in text
    srcs = _sources(report01)
    # per acquisition: inputs, mask, fields, 4 mosaics + reference, 4 comparisons = 12;
    # plus the COSMOS section
    assert len(srcs) == 2 * 12 + 1, srcs
    for src in srcs:
        assert not src.startswith(("/", "file:", "http")), src  # relative: movable output
        assert (out / src).is_file(), src
        assert (out / src).stat().st_size < 400_000, src  # small figures
    assert "sub-01_run-2_desc-medi_comparison.png" in text
    assert "sub-01_desc-cosmos_Chimap.nii.gz" in text
    assert "No errors were recorded" in text
    assert not (out / "logs" / "report-sub-01.log").exists()
    # methods paragraph with the citations of the options used
    assert "RESHARP" in text and "Sun H, Wilman AH" in text
    assert "COSMOS" in text and "Liu T, Spincemaille P" in text
    # parameters recorded in the sidecars reach the paragraph
    assert "radius 4 mm" in text and "lam 0.002" in text
    assert "tol 0.003" not in text  # recorded, but not a key parameter of RESHARP
    # the metrics table and the inputs summary
    assert "dc_residual (%)" in text
    assert "5.00, 10.00 (2 echoes)" in text


def test_subject_report_without_reference(run_dir):
    _, out = run_dir
    page = build_subject_report(
        out, "02", settings=json.loads((out / "qsmprep_settings.json").read_text())
    )
    text = page.read_text()
    assert "No reference map" in text
    assert "_comparison.png" not in text
    srcs = _sources(page)
    assert len(srcs) == 3 + len(METHODS)  # inputs, mask, fields, mosaics
    assert "sub-02_desc-inputs_summary.png" in text  # raw inputs found from bare names
    assert all((out / s).is_file() for s in srcs)


def test_subject_report_swi_section(run_dir, tmp_path):
    from qsmprep.recon.swi import min_intensity_projection

    _, src = run_dir
    out = Path(shutil.copytree(src, tmp_path / "out"))
    anat = out / "sub-02" / "anat"
    img = nib.load(anat / "sub-02_desc-brain_mask.nii.gz")
    ph = make_head_phantom((48, 48, 40), (4.0, 4.0, 4.0), seed=1)
    swi = (ph.m0 * (1 - 0.5 * (ph.labels == 11))).astype(np.float32)
    minip, affine, _ = min_intensity_projection(swi, img.affine, 16.0)
    side = {"Parameters": {"power": 4.0, "sigma_mm": 4.0}, "SkullStripped": False}
    _save(anat / "sub-02_desc-swi_T2starw.nii.gz", swi, img.affine, side)
    _save(anat / "sub-02_desc-minip_T2starw.nii.gz", minip, affine, side)
    smwi = {"Parameters": {"threshold": 1.0}, "SusceptibilityMethod": "tkd"}
    for d in ("smwipara", "smwidia"):
        _save(anat / f"sub-02_desc-{d}_T2starw.nii.gz", swi, img.affine, smwi)
    page = build_subject_report(out, "02")
    text = page.read_text()
    assert "Susceptibility-weighted images" in text and "No errors were recorded" in text
    for d in ("swi", "minip", "smwipara", "smwidia"):
        assert f"sub-02_desc-{d}_mosaic.png" in text
        assert (out / "sub-02" / "figures" / f"sub-02_desc-{d}_mosaic.png").is_file()
    assert "from the tkd map" in text and "sigma_mm 4" in text
    assert "CLEAR-SWI" in text and "Eckstein K, Bachrata B" in text  # methods paragraph


def test_broken_input_still_gives_page_and_log(run_dir, tmp_path):
    _, out = run_dir
    broken = tmp_path / "out"
    shutil.copytree(out, broken)
    anat = broken / "sub-01" / "anat"
    (anat / "sub-01_run-1_desc-tv_Chimap.nii.gz").write_bytes(b"not a nifti at all")
    (anat / "sub-01_run-2_desc-brain_mask.nii.gz").write_bytes(b"\x1f\x8b garbage")
    logs = broken / "logs"
    logs.mkdir()
    crash = logs / "crash-sub-01_run-2-20240101.txt"
    crash.write_text("Traceback (most recent call last):\nValueError: echo times out of order\n")
    shutil.rmtree(broken / "sub-01" / "figures", ignore_errors=True)
    page = build_subject_report(broken, "01", log={"sub-01_run-2": str(crash)})
    assert page.is_file()
    text = page.read_text()
    log = broken / "logs" / "report-sub-01.log"
    assert log.is_file()
    assert "sub-01_run-1: read tv Chimap" in log.read_text()
    assert "read tv Chimap" in text and "report-sub-01.log" in text
    assert "logs/crash-sub-01_run-2-20240101.txt" in text and "echo times out of order" in text
    assert "brain mask of this acquisition could not be read" in text
    # the other methods and the other acquisition are still rendered
    assert "sub-01_run-1_desc-tkd_mosaic.png" in text
    assert "sub-01_run-2_desc-tkd_mosaic.png" in text
    assert all((broken / s).is_file() for s in _sources(page))


def test_report_never_raises(tmp_path):
    # no derivatives at all, a bad label, an unwritable settings object
    page = build_subject_report(tmp_path, "01", settings={"methods": ["tkd"]})
    assert page.is_file() and "No derivatives were found" in page.read_text()
    page = build_subject_report(tmp_path, "sub-0_1!")
    assert page.name == "sub-invalid.html" and "alphanumeric" in page.read_text()
    assert (tmp_path / "logs" / "report-sub-invalid.log").is_file()

    class Bad:
        def to_dict(self):
            raise RuntimeError("settings are broken")

    page = build_subject_report(tmp_path, "01", settings=Bad())
    assert "settings are broken" in page.read_text()


def test_subject_report_r2star_section(run_dir, tmp_path):
    _, out0 = run_dir
    out = Path(shutil.copytree(out0, tmp_path / "out"))
    anat = out / "sub-02" / "anat"
    brain = nib.load(anat / "sub-02_desc-brain_mask.nii.gz")
    r2 = np.where(np.asarray(brain.dataobj) > 0, 25.0, 0.0).astype(np.float32)
    side = {
        "Units": "1/s", "Method": "arlo", "R2starRange": [0.0, 1000.0],
        "ClippedLowVoxels": 3, "ClippedHighVoxels": 0, "SkullStripped": True,
    }  # fmt: skip
    _save(anat / "sub-02_R2starmap.nii.gz", r2, brain.affine, side)
    page = build_subject_report(out, "sub-02").read_text()
    assert "<h3>R2* map</h3>" in page and "sub-02_R2starmap.nii.gz" in page
    assert (out / "figures" / "sub-02_desc-r2star_mosaic.png").is_file() or any(
        p.name == "sub-02_desc-r2star_mosaic.png" for p in out.rglob("*.png")
    )
    assert "25.0" in page and "3 voxel(s) below" in page
    assert "auto-regression on linear operations (ARLO)" in page and "Pei M" in page
    assert not (out / "logs" / "report-sub-02.log").exists()


def test_methods_paragraph_follows_options():
    base = {"methods": ["tkd", "medi"], "bg_method": "resharp", "unwrap": "quality"}
    text = methods_paragraph(base)
    assert "RESHARP" in text and "Sun H, Wilman AH" in text
    assert "ROMEO" in text and "Dymerska B" in text
    assert "TKD" in text and "Shmueli K" in text and "MEDI" in text and "Liu J, Liu T" in text
    assert "Bilgic B, Chatnuntawech" not in text  # l2 not run
    assert "reference map" not in text and "COSMOS map" not in text
    other = methods_paragraph(
        {
            **base,
            "methods": ["l2", "tv", "newnet"],
            "bg_method": "pdf",
            "unwrap": "laplacian",
            "mask_method": "phase",
            "phase_sign": -1,
            "phase_units": ["integer"],
            "b0": 7.0,
            "reference": "/data/ref/sub-01_Chimap.nii.gz",
            "method_params": {"pdf": {"max_iter": 77}, "tkd": {"correct": True}},
        },
        cosmos=True,
    )
    assert "PDF" in other and "Liu T, Khalidov I" in other and "max_iter 77" in other
    # PDF keeps its mask, so it is cross-checked against V-SHARP and falls back to RESHARP,
    # both cited for it
    assert "checked against V-SHARP" in other and "Sun H, Wilman AH" in other
    assert "Wu B, Li W" in other
    assert "Shmueli K, de Zwart" not in other
    assert "TV estimated susceptibility over the whole brain mask" in other
    lbv = methods_paragraph({**base, "bg_method": "lbv", "methods": ["tkd", "medi", "unet"]})
    assert "LBV" in lbv and "Zhou D" in lbv and "checked against V-SHARP" in lbv
    assert "MEDI estimated susceptibility over the whole brain mask" in lbv
    assert "networks were given a local field made with RESHARP" in lbv
    assert "networks were given" not in text and "checked against" not in text
    assert "Laplacian" in other and "Schofield MA" in other
    assert "QSMxT" in other and "phase sign was inverted" in other and "7 T" in other
    assert "scanner integers were rescaled" in other and "scanner integers" not in text
    assert "sub-01_Chimap.nii.gz" in other and "Milovic C, Tejos C" in other
    assert "COSMOS map" in other and "Liu T, Spincemaille P" in other and "newnet" in other
    tfibg = methods_paragraph({**base, "bg_method": "tfibg"})
    assert "Liu Z, Kee Y" in tfibg and "checked against" not in tfibg
    assert "the local-field mask was the brain mask" in tfibg
    unfilled = methods_paragraph({**base, "bg_method": "tfibg",
                                  "method_params": {"tfibg": {"fill": False}}})  # fmt: skip
    assert "left out of the local-field mask" in unfilled
    assert "the local-field mask was the brain mask" not in unfilled
    # every cited number has its reference, in order
    for body, refs in (t.split("\n\nReferences\n") for t in (text, other, lbv, tfibg)):
        cited = {int(n) for grp in re.findall(r"\[([\d, ]+)\]", body) for n in grp.split(",")}
        assert cited == set(range(1, len(refs.splitlines()) + 1))


def test_group_report(run_dir, report01):
    _, out = run_dir
    build_subject_report(out, "02")
    tsv, page = build_group_report(out)
    assert tsv == out / "group_metrics.tsv" and page == out / "group.html"
    columns, rows = read_tsv(tsv)
    assert columns[:5] == ["subject", "session", "acq", "rec", "run"]
    assert {"method", "reference", "nrmse", "xsim", "dc_residual"} <= set(columns)
    assert len(rows) == 3 * len(METHODS)  # three acquisitions
    assert [r["run"] for r in rows].count("1") == len(METHODS)
    sub02 = [r for r in rows if r["subject"] == "02"]
    assert {r["nrmse"] for r in sub02} == {"n/a"} and {r["session"] for r in sub02} == {"n/a"}
    assert collect_metrics(out) == (columns, rows)
    text = page.read_text()
    srcs = _sources(page)
    names = {Path(s).name for s in srcs}
    assert {"group_desc-nrmse_boxplot.png", "group_desc-dc_residual_boxplot.png"} <= names
    assert all((out / s).is_file() for s in srcs)
    assert 'href="sub-01.html"' in text and "Errors" not in text


def test_group_report_without_reference_columns(tmp_path):
    anat = tmp_path / "sub-07" / "ses-B" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-07_ses-B_acq-fast_metrics.tsv").write_text(
        "method\tdc_residual\ntkd\t12.5\nmedi\t3.25\n"
    )
    tsv, page = build_group_report(tmp_path)
    columns, rows = read_tsv(tsv)
    assert columns == ["subject", "session", "acq", "rec", "run", "method", "dc_residual"]
    assert rows[0] == {
        "subject": "07",
        "session": "B",
        "acq": "fast",
        "rec": "n/a",
        "run": "n/a",
        "method": "tkd",
        "dc_residual": "12.5",
    }
    assert "group_desc-dc_residual_boxplot.png" in page.read_text()
    assert "nrmse" not in page.read_text()


# --------------------------------------------------------------------------------------------
# headless Chromium: the page and its figures load


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = "loaded " + ok + "/" + imgs.length;
});
</script>"""


def _chromium_args(exe: str, profile: Path) -> list[str]:
    return [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
    ]


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, report01, tmp_path):
    _, out = run_dir
    # a copy of the page next to it (same relative figure paths) with a load probe
    probe = out / "probe-sub-01.html"
    probe.write_text(report01.read_text().replace("</body>", _PROBE + "</body>"))
    n_img = len(_sources(report01))
    args = _chromium_args(_chromium(), tmp_path / "profile")
    try:
        res = subprocess.run(
            [*args, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
        )
        shot = tmp_path / "sub-01.png"
        subprocess.run(
            [*args, "--window-size=1200,2400", f"--screenshot={shot}", report01.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        probe.unlink()
    title = re.search(r"<title>(.*?)</title>", res.stdout)
    assert title is not None, res.stderr[-2000:]
    assert title.group(1) == f"loaded {n_img}/{n_img}", title.group(1)
    assert "Susceptibility maps" in res.stdout
    # the screenshot is a real rendering: a PNG of the window size, not a blank page
    img = _read_png(shot)
    assert img.shape[:2] == (2400, 1200)
    assert img.std() > 20  # measured ~70 for the rendered page; a blank page gives 0


def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return (imread(str(path))[..., :3] * 255).astype(np.float32)
