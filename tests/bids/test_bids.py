"""BIDS discovery, validation, phase units, orientation grouping and derivative names."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmprep import __version__
from qsmprep.bids import (
    Acquisition,
    BIDSInputError,
    collect_acquisitions,
    derivative_path,
    detect_phase_units,
    group_orientations,
    load_magnitude,
    load_phase,
    make_layout,
    write_dataset_description,
)
from qsmprep.sim.bids import simulate_bids_dataset

TES = (0.004, 0.008, 0.012)
SHAPE = (24, 24, 20)
TILT = 20.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two subjects on one grid, sub-02 tilted by TILT degrees about x (read-only: copy it)."""
    root = tmp_path_factory.mktemp("bids") / "base"
    return simulate_bids_dataset(
        root,
        n_subjects=2,
        shape=SHAPE,
        voxel_size=3.0,
        echo_times=TES,
        snr=100.0,
        seed=3,
        tilt_deg=(0.0, TILT),
    )


@pytest.fixture
def ds(base, tmp_path):
    """A private copy of ``base`` to edit."""
    return Path(shutil.copytree(base, tmp_path / "ds"))


def _anat(root, sub="01"):
    return root / f"sub-{sub}" / "anat"


def _file(root, sub="01", echo=1, part="phase", ext=".nii.gz", suffix="MEGRE"):
    return _anat(root, sub) / f"sub-{sub}_echo-{echo}_part-{part}_{suffix}{ext}"


def _edit_json(path, drop=(), **set_):
    meta = json.loads(path.read_text())
    for k in drop:
        meta.pop(k, None)
    meta.update(set_)
    path.write_text(json.dumps(meta))


def _move(src_anat: Path, old: str, dst_anat: Path, new: str):
    """Move every file of ``src_anat`` whose name starts with ``old`` to ``dst_anat``, renamed."""
    dst_anat.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_anat.glob(old + "_*")):
        f.rename(dst_anat / (new + f.name[len(old) :]))


def _save_like(path, data, ref_path=None):
    ref = nib.load(str(ref_path or path))
    nib.save(nib.Nifti1Image(data, ref.affine), str(path))


def _raises(fn, *needles):
    """Call ``fn``; it must raise BIDSInputError whose message holds every needle."""
    with pytest.raises(BIDSInputError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"
    return info.value


# --------------------------------------------------------------------------------------------
# discovery


def test_discovers_the_simulated_dataset(base):
    acqs = collect_acquisitions(base)
    assert [a.id for a in acqs] == ["sub-01", "sub-02"]
    for a in acqs:
        assert a.suffix == "MEGRE" and a.session is None and a.acq is None and a.run is None
        assert a.echo_times == list(TES)
        assert a.b0 == 3.0 and a.b0_source == "MagneticFieldStrength"
        assert (a.phase_units, a.phase_units_source) == ("rad", "sidecar")
        assert a.shape == SHAPE and a.voxel_size == (3.0, 3.0, 3.0)
        assert [p.name for p in a.phase] == [
            f"{a.prefix}_echo-{n}_part-phase_MEGRE.nii.gz" for n in (1, 2, 3)
        ]
        assert [p.name for p in a.magnitude] == [
            f"{a.prefix}_echo-{n}_part-mag_MEGRE.nii.gz" for n in (1, 2, 3)
        ]
        assert all(p.is_absolute() and p.is_file() for p in a.phase + a.magnitude)
        assert a.sources[0] == f"{a.prefix}/anat/{a.prefix}_echo-1_part-mag_MEGRE.nii.gz"
        assert a.metadata["EchoNumber"] == 1
    # B0 direction from the affine: (0, -sin t, cos t) for the slab tilted about x
    t = np.deg2rad(TILT)
    np.testing.assert_allclose(acqs[0].b0_dir, (0, 0, 1), atol=1e-12)
    np.testing.assert_allclose(acqs[1].b0_dir, (0, -np.sin(t), np.cos(t)), atol=1e-6)
    # JSON round trip of the acquisition record (passed between workflow nodes)
    back = Acquisition.from_dict(json.loads(json.dumps(acqs[1].to_dict())))
    assert back.to_dict() == acqs[1].to_dict() and back.id == "sub-02"


def test_participant_labels_with_or_without_prefix(base):
    assert [a.id for a in collect_acquisitions(base, participant_label="02")] == ["sub-02"]
    assert [a.id for a in collect_acquisitions(base, participant_label=["sub-02"])] == ["sub-02"]
    both = collect_acquisitions(base, participant_label=["sub-01", "02"])
    assert [a.id for a in both] == ["sub-01", "sub-02"]
    # a layout restricted to sub-02 does not index sub-01
    layout = make_layout(base, participant_label=["02"])
    assert layout.get_subjects() == ["02"]


def test_empty_participant_selection_lists_the_labels(base):
    _raises(
        lambda: collect_acquisitions(base, participant_label=["03"]),
        "03",
        "available: 01, 02",
        "--participant-label",
    )
    _raises(
        lambda: collect_acquisitions(base, session_label="pre"),
        "pre",
        "no sessions",
        "--session-label",
    )
    _raises(lambda: collect_acquisitions(base, participant_label="sub-0_1"), "alphanumeric")


def test_not_a_bids_dataset(ds, tmp_path):
    (ds / "dataset_description.json").unlink()
    _raises(lambda: collect_acquisitions(ds), "dataset_description.json", "BIDSVersion")
    _raises(lambda: collect_acquisitions(tmp_path / "nope"), "does not exist", "root")


def test_grouping_by_session_acq_rec_run(ds):
    """Entities split acquisitions; the prefix and derivative folders follow them."""
    # sub-01: ses-pre (plain) and ses-post (two runs of acq-fast rec-mc); sub-02: acq-ori2
    a1 = _anat(ds)
    post = ds / "sub-01" / "ses-post" / "anat"
    post.mkdir(parents=True)
    for f in a1.glob("sub-01_*"):
        shutil.copy(f, post / f.name.replace("sub-01_", "sub-01_ses-post_acq-fast_rec-mc_run-01_"))
        shutil.copy(f, post / f.name.replace("sub-01_", "sub-01_ses-post_acq-fast_rec-mc_run-02_"))
    _move(a1, "sub-01", ds / "sub-01" / "ses-pre" / "anat", "sub-01_ses-pre")
    a1.rmdir()
    _move(_anat(ds, "02"), "sub-02", _anat(ds, "02"), "sub-02_acq-ori2")
    # a non-anat folder is not indexed
    func = ds / "sub-01" / "ses-pre" / "func"
    func.mkdir()
    (func / "sub-01_ses-pre_task-rest_bold.nii.gz").write_bytes(b"not a nifti")

    acqs = collect_acquisitions(ds)
    ids = [a.id for a in acqs]
    assert ids == [
        "sub-01_ses-post_acq-fast_rec-mc_run-01",
        "sub-01_ses-post_acq-fast_rec-mc_run-02",
        "sub-01_ses-pre",
        "sub-02_acq-ori2",
    ]
    a = acqs[0]
    assert (a.subject, a.session, a.acq, a.rec, a.run) == ("01", "post", "fast", "mc", "01")
    assert all(len(x.phase) == 3 and x.echo_times == list(TES) for x in acqs)
    assert all(p.parent == post for p in a.phase + a.magnitude)
    assert make_layout(ds).get(datatype="func") == []

    # session selection, with or without the prefix
    pre = collect_acquisitions(ds, session_label=["ses-pre"])
    assert [x.id for x in pre] == ["sub-01_ses-pre"]
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01", session_label="mid"),
        "mid",
        "available: post, pre",
    )

    out = Path("/out")
    assert derivative_path(out, a, desc="tkd", suffix="Chimap") == (
        out / "sub-01/ses-post/anat/sub-01_ses-post_acq-fast_rec-mc_run-01_desc-tkd_Chimap.nii.gz"
    )
    assert derivative_path(out, acqs[3], suffix="metrics", extension=".tsv") == (
        out / "sub-02/anat/sub-02_acq-ori2_metrics.tsv"
    )


def test_bids_filters_flat_and_per_suffix(ds):
    _move(_anat(ds, "02"), "sub-02", _anat(ds, "02"), "sub-02_acq-ori2")
    ori2 = _anat(ds, "02")
    for f in list(ori2.glob("*")):
        shutil.copy(f, ori2 / f.name.replace("acq-ori2", "acq-ori3"))
    every = [a.id for a in collect_acquisitions(ds)]
    assert every == ["sub-01", "sub-02_acq-ori2", "sub-02_acq-ori3"]
    # flat: applies to every suffix
    flat = collect_acquisitions(ds, bids_filters={"acquisition": "ori3"})
    assert [a.id for a in flat] == ["sub-02_acq-ori3"]
    # per suffix (fMRIPrep style, case-insensitive keys); a list of values
    per = collect_acquisitions(ds, bids_filters={"MEGRE": {"acquisition": ["ori2", "ori3"]}})
    assert [a.id for a in per] == ["sub-02_acq-ori2", "sub-02_acq-ori3"]
    # null: the entity must be absent
    none = collect_acquisitions(ds, bids_filters={"megre": {"acquisition": None}})
    assert [a.id for a in none] == ["sub-01"]
    _raises(
        lambda: collect_acquisitions(ds, bids_filters={"acqusition": "ori2"}),
        "acqusition",
        "entity names",
    )
    _raises(lambda: collect_acquisitions(ds, bids_filters={"part": "mag"}), "'part'", "remove")
    _raises(
        lambda: collect_acquisitions(ds, bids_filters={"acquisition": "ori9"}),
        "no MEGRE or T2starw images",
        "ori9",
        "participants present: 01, 02",
    )


def test_single_echo_t2starw(ds):
    """T2starw without an echo entity is one single-echo acquisition."""
    anat = _anat(ds)
    for part in ("mag", "phase"):
        for ext in (".nii.gz", ".json"):
            src = _file(ds, echo=2, part=part, ext=ext)
            shutil.copy(src, anat / f"sub-01_acq-swi_part-{part}_T2starw{ext}")
    acqs = collect_acquisitions(ds, participant_label="01")
    assert [(a.id, a.suffix) for a in acqs] == [("sub-01", "MEGRE"), ("sub-01_acq-swi", "T2starw")]
    t2 = acqs[1]
    assert t2.echo_times == [TES[1]] and t2.phase_units == "rad"
    assert [p.name for p in t2.phase] == ["sub-01_acq-swi_part-phase_T2starw.nii.gz"]
    only = collect_acquisitions(ds, participant_label="01", bids_filters={"suffix": "T2starw"})
    assert [a.id for a in only] == ["sub-01_acq-swi"]

    # same entities as the MEGRE: names would clash -> error for the T2starw
    for f in anat.glob("*_T2starw.*"):
        f.rename(anat / f.name.replace("_acq-swi", ""))
    err = _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_part-phase_T2starw.nii.gz",
        "different acq- labels",
    )
    assert err.acquisition == "sub-01"
    errors: list = []
    kept = collect_acquisitions(ds, participant_label="01", errors=errors)
    assert [(a.id, a.suffix) for a in kept] == [("sub-01", "MEGRE")] and len(errors) == 1


# --------------------------------------------------------------------------------------------
# validation: every message names the file and the fix


def test_missing_echo_time(ds):
    for part in ("mag", "phase"):
        _edit_json(_file(ds, echo=2, part=part, ext=".json"), drop=["EchoTime"])
    err = _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz",
        "EchoTime is missing",
        "sub-01_echo-2_part-phase_MEGRE.json",
        'add "EchoTime" (in seconds',
    )
    assert err.path.name == "sub-01_echo-2_part-phase_MEGRE.nii.gz" and err.acquisition == "sub-01"
    # milliseconds instead of seconds
    _edit_json(_file(ds, echo=2, part="phase", ext=".json"), EchoTime=8.0)
    _raises(lambda: collect_acquisitions(ds), "echo-2_part-phase", "in seconds (e.g. 0.005")
    # magnitude and phase of one echo disagree
    _edit_json(_file(ds, echo=2, part="phase", ext=".json"), EchoTime=0.008)
    _edit_json(_file(ds, echo=2, part="mag", ext=".json"), EchoTime=0.009)
    _raises(lambda: collect_acquisitions(ds), "sub-01_echo-2_part-mag_MEGRE.nii.gz", "agree")


def test_one_bad_acquisition_does_not_stop_the_others(ds):
    for part in ("mag", "phase"):
        _edit_json(_file(ds, "02", echo=3, part=part, ext=".json"), drop=["EchoTime"])
    errors: list = []
    acqs = collect_acquisitions(ds, errors=errors)
    assert [a.id for a in acqs] == ["sub-01"]
    assert len(errors) == 1 and isinstance(errors[0], BIDSInputError)
    assert errors[0].acquisition == "sub-02" and "sub-02_echo-3_part-phase" in str(errors[0])


def test_requested_participant_without_images(ds):
    shutil.rmtree(_anat(ds, "02"))
    (ds / "sub-02" / "func").mkdir()
    _raises(
        lambda: collect_acquisitions(ds, participant_label=["01", "02"]),
        "sub-02: no MEGRE or T2starw images",
        "drop the label from --participant-label",
    )
    errors: list = []
    acqs = collect_acquisitions(ds, participant_label=["01", "02"], errors=errors)
    assert [a.id for a in acqs] == ["sub-01"] and [e.acquisition for e in errors] == ["sub-02"]
    # without an explicit selection, participants without GRE images are simply not listed
    assert [a.id for a in collect_acquisitions(ds)] == ["sub-01"]


def test_missing_field_strength_needs_b0(ds):
    for f in ds.rglob("sub-*_MEGRE.json"):
        _edit_json(f, drop=["MagneticFieldStrength"])
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz",
        "MagneticFieldStrength is missing",
        "--b0",
    )
    acqs = collect_acquisitions(ds, b0=7.0)
    assert [(a.b0, a.b0_source) for a in acqs] == [(7.0, "override")] * 2
    # an inherited top-level sidecar is honoured (BIDS inheritance through pybids)
    (ds / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 1.5}))
    assert [a.b0 for a in collect_acquisitions(ds)] == [1.5, 1.5]
    _raises(lambda: collect_acquisitions(ds, b0=-3), "positive field strength")


def test_magnitude_phase_shape_mismatch(ds):
    p = _file(ds, echo=2, part="phase")
    data = np.asarray(nib.load(str(p)).dataobj)[:, :, :-2]
    _save_like(p, data)
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz",
        "shape (24, 24, 20)",
        "(24, 24, 18)",
        "share one voxel grid",
    )


def test_missing_partner(ds):
    for ext in (".nii.gz", ".json"):
        _file(ds, echo=2, part="mag", ext=ext).unlink()
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz",
        "without a magnitude",
        "add sub-01_echo-2_part-mag_MEGRE.nii.gz",
    )
    shutil.rmtree(ds / "sub-01")
    for ext in (".nii.gz", ".json"):
        _file(ds, "02", echo=3, part="phase", ext=ext).unlink()
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-02/anat/sub-02_echo-3_part-mag_MEGRE.nii.gz",
        "without a phase",
        "add sub-02_echo-3_part-phase_MEGRE.nii.gz",
    )


@pytest.mark.parametrize(
    ("extra", "needles"),
    [((2,), ("4D", "2 volumes", "split echoes")), ((1, 8), ("uncombined coil", "combine"))],
)
def test_4d_or_uncombined_phase(ds, extra, needles):
    p = _file(ds, echo=1, part="phase")
    data = np.asarray(nib.load(str(p)).dataobj)
    _save_like(
        p, np.broadcast_to(data.reshape(data.shape + (1,) * len(extra)), data.shape + extra)
    )
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz",
        *needles,
    )
    with pytest.raises(BIDSInputError, match="3D"):
        load_phase(p, "rad")


def test_2d_image_is_refused(ds):
    for part in ("mag", "phase"):
        p = _file(ds, echo=1, part=part)
        _save_like(p, np.asarray(nib.load(str(p)).dataobj)[:, :, 10])
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz",
        "phase image has shape (24, 24); qsmprep needs 3D volumes",
    )


def test_single_volume_4d_is_accepted(ds):
    p = _file(ds, echo=1, part="phase")
    data = np.asarray(nib.load(str(p)).dataobj)
    _save_like(p, data[..., None])
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert a.shape == SHAPE
    np.testing.assert_array_equal(load_phase(p, "rad"), data)


def test_echoes_out_of_order_or_duplicate(ds):
    for part in ("mag", "phase"):
        _edit_json(_file(ds, echo=1, part=part, ext=".json"), EchoTime=TES[1])
        _edit_json(_file(ds, echo=2, part=part, ext=".json"), EchoTime=TES[0])
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz",
        "out of order",
        "increasing EchoTime",
    )
    for part in ("mag", "phase"):
        _edit_json(_file(ds, echo=2, part=part, ext=".json"), EchoTime=TES[1])
    _raises(
        lambda: collect_acquisitions(ds),
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz",
        "duplicate echo time 0.008",
        "own EchoTime",
    )


def test_duplicate_images_of_one_echo(ds):
    # two magnitude images of one echo that differ only in an entity qsmprep does not group by
    for ext in (".nii.gz", ".json"):
        src = _file(ds, echo=1, part="mag", ext=ext)
        shutil.copy(src, src.with_name(src.name.replace("_echo-1", "_ce-gd_echo-1")))
    _raises(lambda: collect_acquisitions(ds), "two mag images for echo-1", "--bids-filter-file")


# --------------------------------------------------------------------------------------------
# phase units


def _wrapped_error(a, b) -> float:
    return float(np.abs(np.angle(np.exp(1j * (a.astype(float) - b.astype(float))))).max())


def test_phase_units_radians(ds):
    p = _file(ds, echo=3, part="phase")
    meta = json.loads(_file(ds, echo=3, part="phase", ext=".json").read_text())
    img = nib.load(str(p))
    assert detect_phase_units(img, meta) == "rad"  # sidecar "Units": "rad"
    assert detect_phase_units(img, {}) == "rad"  # values within [-pi, pi]
    assert detect_phase_units(p, {"Units": "radians"}) == "rad"
    phi = np.asarray(img.dataobj)
    np.testing.assert_array_equal(load_phase(p, "rad"), phi)
    np.testing.assert_array_equal(load_phase(p, "rad", phase_sign=-1), -phi)
    # [0, 2 pi) radians are radians too, and come back in [-pi, pi]
    shifted = np.mod(phi, 2 * np.pi).astype(np.float32)
    _save_like(p, shifted)
    assert detect_phase_units(nib.load(str(p)), {}) == "rad"
    back = load_phase(p, "rad")
    assert back.min() >= -np.pi and back.max() <= np.pi
    assert _wrapped_error(back, phi) < 1e-5  # float32 rounding of 2 pi shifts
    # no sidecar Units: detected from the values
    for f in _anat(ds).glob("*part-phase*.json"):
        _edit_json(f, drop=["Units"])
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert (a.phase_units, a.phase_units_source) == ("rad", "detected")


@pytest.mark.parametrize(("lo", "levels"), [(-4096, 8192), (0, 4096)])
def test_phase_units_scanner_integers(ds, lo, levels):
    """Siemens integers (-4096..4095 or 0..4095) are detected and mapped back to radians."""
    phis = {}
    for echo in (1, 2, 3):
        p = _file(ds, echo=echo, part="phase")
        phi = np.asarray(nib.load(str(p)).dataobj, dtype=np.float64)
        phis[echo] = phi
        v = np.round((phi + np.pi) / (2 * np.pi) * levels) % levels + lo
        _save_like(p, v.astype(np.int16))
        _edit_json(_file(ds, echo=echo, part="phase", ext=".json"), drop=["Units"])
    p = _file(ds, echo=2, part="phase")
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.int16 and np.asarray(img.dataobj).min() >= lo
    assert detect_phase_units(img, {"Units": "arbitrary"}) == "integer"
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert (a.phase_units, a.phase_units_source) == ("integer", "detected")
    for echo, path in zip((1, 2, 3), a.phase, strict=True):
        back = load_phase(path, a.phase_units)
        assert back.dtype == np.float32 and back.shape == SHAPE
        assert back.min() >= -np.pi and back.max() < np.pi
        # quantisation: half a level, pi / levels (3.8e-4 or 7.7e-4 rad), plus float32 rounding
        assert _wrapped_error(back, phis[echo]) <= np.pi / levels + 1e-5
    np.testing.assert_array_equal(
        load_phase(a.phase[0], "integer", phase_sign=-1), -load_phase(a.phase[0], "integer")
    )


def test_phase_units_data_range_fallback(tmp_path):
    """Integers outside the 12-bit ranges use the data's own min/max (hi - lo + 1 levels)."""
    v = np.random.default_rng(0).integers(-10000, 10000, SHAPE, dtype=np.int32)
    v.flat[:2] = (-10000, 9999)
    p = tmp_path / "phase.nii.gz"
    nib.save(nib.Nifti1Image(v, np.eye(4)), str(p))
    assert detect_phase_units(p) == "integer"
    back = load_phase(p, "integer")
    # closed form: (v - min) / (max - min + 1) * 2 pi - pi with min -10000, max 9999
    np.testing.assert_allclose(back, (v + 10000) / 20000 * 2 * np.pi - np.pi, atol=1e-6)


def test_phase_units_degrees(ds):
    """Degrees (sidecar "deg", or values spanning +-180 / 0..360) become radians, with a note."""
    phis = {}
    for echo in (1, 2, 3):
        p = _file(ds, echo=echo, part="phase")
        phis[echo] = np.asarray(nib.load(str(p)).dataobj, dtype=np.float64)
        _save_like(p, np.rad2deg(phis[echo]).astype(np.float32))
        _edit_json(_file(ds, echo=echo, part="phase", ext=".json"), drop=["Units"])
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert (a.phase_units, a.phase_units_source) == ("deg", "detected")
    assert a.notes == ["phase in degrees (values span +-180): converted to radians"]
    for echo, path in zip((1, 2, 3), a.phase, strict=True):
        assert _wrapped_error(load_phase(path, "deg"), phis[echo]) < 1e-5
    for echo in (1, 2, 3):
        _edit_json(_file(ds, echo=echo, part="phase", ext=".json"), Units="degrees")
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert (a.phase_units, a.phase_units_source) == ("deg", "sidecar")
    assert 'sidecar "Units"' in a.notes[0]
    # 0..360 degrees come back in [-pi, pi]
    p = _file(ds, echo=2, part="phase")
    _save_like(p, np.mod(np.rad2deg(phis[2]), 360).astype(np.float32))
    assert detect_phase_units(p) == "deg"
    back = load_phase(p, "deg")
    assert back.min() >= -np.pi and back.max() <= np.pi and _wrapped_error(back, phis[2]) < 1e-5


def test_phase_units_undetectable(ds):
    p = _file(ds, echo=1, part="phase")
    scaled = (10 * np.asarray(nib.load(str(p)).dataobj)).astype(np.float32)
    _save_like(p, scaled)
    for f in _anat(ds).glob("*part-phase*.json"):
        _edit_json(f, drop=["Units"])
    err = _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-1_part-phase_MEGRE.nii.gz",
        "cannot tell the units",
        '"Units": "rad"',
    )
    assert err.acquisition == "sub-01" and err.path == _file(ds, echo=1, part="phase")


def test_phase_units_sidecar_must_agree_with_the_values(ds):
    p = _file(ds, echo=1, part="phase")
    phi = np.asarray(nib.load(str(p)).dataobj)
    # "rad" on degrees: refused, with the likely fix
    _save_like(p, np.rad2deg(phi).astype(np.float32))
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-1_part-phase_MEGRE.nii.gz",
        '"Units": "rad" but the values span',
        'they look like degrees: set "Units": "deg"',
    )
    # "deg" on radians: refused
    _save_like(p, phi)
    for f in _anat(ds).glob("*part-phase*.json"):
        _edit_json(f, Units="deg")
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        '"Units": "deg" but the values span',
        "fix the sidecar's Units",
    )


@pytest.mark.parametrize(
    ("units", "needles"),
    [
        ("Hz", ["'Hz', the units of a field map", "not a field map"]),
        ("ppm", ["'ppm', the units of a field map"]),
        ("furlongs", ["'furlongs', which qsmprep does not know", '"rad" or "arbitrary"']),
    ],
)
def test_phase_units_of_a_field_or_unknown_are_refused(ds, units, needles):
    for f in _anat(ds).glob("*part-phase*.json"):
        _edit_json(f, Units=units)
    err = _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-1_part-phase_MEGRE.nii.gz",
        *needles,
    )
    assert err.acquisition == "sub-01"


def test_phase_units_must_be_the_same_for_every_echo(ds):
    _edit_json(_file(ds, echo=2, part="phase", ext=".json"), Units="arbitrary")
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-2_part-phase_MEGRE.nii.gz",
        "phase Units 'arbitrary' in sub-01_echo-2_part-phase_MEGRE.json differ from 'rad'",
    )


def test_echo_time_from_the_magnitude_is_noted(ds):
    _edit_json(_file(ds, echo=2, part="phase", ext=".json"), drop=["EchoTime"])
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert a.echo_times == list(TES)
    assert a.notes == [
        "EchoTime missing from sub-01_echo-2_part-phase_MEGRE.json: took 0.008 s from the "
        "magnitude's sidecar sub-01_echo-2_part-mag_MEGRE.json"
    ]
    assert Acquisition.from_dict(a.to_dict()).notes == a.notes


def test_field_strength_must_agree_between_echoes(ds):
    for part in ("mag", "phase"):
        _edit_json(_file(ds, echo=3, part=part, ext=".json"), MagneticFieldStrength=1.5)
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-3_part-phase_MEGRE.nii.gz",
        "MagneticFieldStrength 1.5 in sub-01_echo-3_part-phase_MEGRE.json differs from 3 T",
        "--b0",
    )
    (a,) = collect_acquisitions(ds, participant_label="01", b0=3.0)  # the override decides
    assert (a.b0, a.b0_source) == (3.0, "override")


def _strip_geometry(path, zero_pixdim: bool):
    """Rewrite ``path`` with qform_code = sform_code = 0 (and pixdim 0), bypassing nibabel."""
    img = nib.load(str(path))
    raw = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    nii = path.with_name(path.name[: -len(".gz")])
    nib.save(raw, str(nii))
    b = bytearray(nii.read_bytes())
    if zero_pixdim:
        b[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1:4]
    b[252:256] = struct.pack("<2h", 0, 0)  # qform_code, sform_code
    path.write_bytes(gzip.compress(bytes(b)))
    nii.unlink()


@pytest.mark.parametrize(
    ("zero_pixdim", "needle"),
    [(True, "voxel size (pixdim) (0.0, 0.0, 0.0)"), (False, "qform_code and sform_code are 0")],
)
def test_header_without_geometry_is_refused(ds, zero_pixdim, needle):
    for part in ("mag", "phase"):
        _strip_geometry(_file(ds, echo=1, part=part), zero_pixdim)
    # nibabel alone would read 1 mm voxels on an axis-aligned grid
    assert nib.load(str(_file(ds, echo=1))).header.get_zooms() == (
        (1.0, 1.0, 1.0) if zero_pixdim else (3.0, 3.0, 3.0)
    )
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-1_part-phase_MEGRE.nii.gz",
        needle,
        "dcm2niix",
    )


def test_magnitude_values_checked(ds):
    p = _file(ds, echo=1, part="mag")
    ref = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    # a few non-finite or negative voxels: set to 0, noted
    data = ref.copy()
    data[0, 0, 0], data[0, 0, 1], data[1, 0, 0] = np.nan, np.inf, -2.0
    _save_like(p, data)
    (a,) = collect_acquisitions(ds, participant_label="01")
    assert a.notes == [
        "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz: 2 non-finite (NaN or inf) values set "
        "to 0",
        "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz: 1 negative values set to 0",
    ]
    mag = load_magnitude(p)
    assert mag[0, 0, 0] == mag[0, 0, 1] == mag[1, 0, 0] == 0 and mag.min() >= 0
    # a real part passed as magnitude: refused
    _save_like(p, ref * np.cos(np.linspace(0, 40, ref.size)).reshape(ref.shape).astype(np.float32))
    _raises(
        lambda: collect_acquisitions(ds, participant_label="01"),
        "sub-01_echo-1_part-mag_MEGRE.nii.gz",
        "looks like a real or imaginary part",
    )
    _save_like(p, np.zeros_like(ref))
    _raises(lambda: collect_acquisitions(ds, participant_label="01"), "zero everywhere")


def test_load_magnitude(ds):
    p = _file(ds, echo=1, part="mag")
    ref = np.asarray(nib.load(str(p)).dataobj)
    data = ref.copy()
    data[0, 0, 0] = np.nan
    _save_like(p, data)
    mag = load_magnitude(p)
    assert mag.dtype == np.float32 and mag.shape == SHAPE and mag[0, 0, 0] == 0
    np.testing.assert_array_equal(mag.ravel()[1:], ref.ravel()[1:])


# --------------------------------------------------------------------------------------------
# orientations


def _two_orientations(ds):
    """sub-01 at 0 and TILT degrees on one grid (acq-ori1, acq-ori2); sub-02 removed."""
    a1 = _anat(ds)
    _move(a1, "sub-01", a1, "sub-01_acq-ori1")
    _move(_anat(ds, "02"), "sub-02", a1, "sub-01_acq-ori2")
    shutil.rmtree(ds / "sub-02")
    return ds


def test_cosmos_grouping_two_tilts_on_one_grid(ds):
    _two_orientations(ds)
    acqs = collect_acquisitions(ds)
    assert [a.id for a in acqs] == ["sub-01_acq-ori1", "sub-01_acq-ori2"]
    groups = group_orientations(acqs)
    assert list(groups) == [("01", None)]
    assert [a.id for a in groups[("01", None)]] == ["sub-01_acq-ori1", "sub-01_acq-ori2"]
    b = [np.asarray(a.b0_dir) for a in acqs]
    assert np.degrees(np.arccos(b[0] @ b[1])) == pytest.approx(TILT, abs=1e-4)
    assert derivative_path("/o", ("01", None), desc="cosmos", suffix="Chimap") == Path(
        "/o/sub-01/anat/sub-01_desc-cosmos_Chimap.nii.gz"
    )
    # one orientation only, or orientations closer than the threshold: no group
    assert group_orientations(acqs[:1]) == {}
    assert group_orientations(acqs, min_angle_deg=TILT + 1) == {}
    assert group_orientations([acqs[0], acqs[0]]) == {}

    # an acquisition on another grid (shape) of the same subject joins no group
    ori3 = _anat(ds)
    for f in ori3.glob("sub-01_acq-ori2_*"):
        shutil.copy(f, ori3 / f.name.replace("acq-ori2", "acq-ori3"))
    for p in ori3.glob("sub-01_acq-ori3_*.nii.gz"):
        _save_like(p, np.asarray(nib.load(str(p)).dataobj)[:, :, 1:])
    acqs = collect_acquisitions(ds)
    assert [a.shape for a in acqs] == [SHAPE, SHAPE, (24, 24, 19)]
    assert [a.id for a in group_orientations(acqs)[("01", None)]] == [
        "sub-01_acq-ori1",
        "sub-01_acq-ori2",
    ]
    # different subjects never group
    assert group_orientations(collect_acquisitions(ds, participant_label="01")[:1]) == {}


def test_cosmos_needs_one_grid_per_subject(base):
    # sub-01 and sub-02 are on one grid at two tilts but are different subjects
    assert group_orientations(collect_acquisitions(base)) == {}


# --------------------------------------------------------------------------------------------
# derivatives


def test_derivative_names():
    out = Path("/data/out")
    ent = {"subject": "sub-01", "session": "ses-1", "acquisition": "ori1", "run": "2"}
    assert derivative_path(out, ent, desc="brain", suffix="mask") == (
        out / "sub-01/ses-1/anat/sub-01_ses-1_acq-ori1_run-2_desc-brain_mask.nii.gz"
    )
    assert derivative_path(
        out, {"sub": "01"}, desc="local", suffix="fieldmap", extension="json"
    ) == (out / "sub-01/anat/sub-01_desc-local_fieldmap.json")
    assert derivative_path(out, ("01", "2"), desc="cosmos", suffix="Chimap") == (
        out / "sub-01/ses-2/anat/sub-01_ses-2_desc-cosmos_Chimap.nii.gz"
    )
    assert derivative_path(
        out, ("01", None), suffix="report", datatype="figures", extension=".svg"
    ) == (out / "sub-01/figures/sub-01_report.svg")
    with pytest.raises(ValueError, match="desc must be alphanumeric"):
        derivative_path(out, ("01", None), desc="t-v", suffix="Chimap")
    with pytest.raises(TypeError):
        derivative_path(out, "sub-01", suffix="Chimap")


def test_write_dataset_description(tmp_path, base):
    path = write_dataset_description(tmp_path / "out", bids_dir=base)
    desc = json.loads(path.read_text())
    assert path == tmp_path / "out" / "dataset_description.json"
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] == "1.9.0"
    assert desc["GeneratedBy"][0]["Name"] == "qsmprep"
    assert desc["GeneratedBy"][0]["Version"] == __version__
    assert desc["SourceDatasets"] == [{"URL": base.resolve().as_uri()}]
    write_dataset_description(tmp_path / "out")  # idempotent, no temporary left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset_description.json"]


# --------------------------------------------------------------------------------------------
# development data (../shared/data)


@pytest.mark.shared
def test_shared_qsmdev(shared_data):
    acqs = collect_acquisitions(shared_data / "qsmdev")
    assert [a.id for a in acqs] == ["sub-01", "sub-02"]
    for a in acqs:
        assert a.echo_times == [0.005, 0.012, 0.019, 0.026] and a.b0 == 3.0
        assert a.phase_units == "rad" and a.voxel_size == (1.5, 1.5, 1.5)
        truth = json.loads(
            (
                shared_data
                / f"qsmdev/derivatives/groundtruth/sub-{a.subject}/anat"
                / f"sub-{a.subject}_groundtruth.json"
            ).read_text()
        )
        np.testing.assert_allclose(a.b0_dir, truth["B0_dir_voxel"], atol=1e-5)
        assert list(a.shape) == truth["Shape"]
    assert group_orientations(acqs) == {}
    # int16 with a scale factor: radians after scaling
    phi = load_phase(acqs[0].phase[0], acqs[0].phase_units)
    assert phi.dtype == np.float32 and np.abs(phi).max() <= np.pi * (1 + 1e-3)


@pytest.mark.shared
def test_shared_qsmdev_multi_orientations(shared_data):
    root = shared_data / "qsmdev-multi"
    acqs = collect_acquisitions(root)
    assert [a.id for a in acqs] == ["sub-01_acq-ori1", "sub-01_acq-ori2", "sub-01_acq-ori3"]
    gt = root / "derivatives/groundtruth/sub-01/anat"
    for a in acqs:
        assert a.echo_times == [0.005, 0.012, 0.019]
        truth = json.loads((gt / f"{a.prefix}_groundtruth.json").read_text())
        np.testing.assert_allclose(a.b0_dir, truth["B0_dir_voxel"], atol=1e-5)
    groups = group_orientations(acqs)
    assert list(groups) == [("01", None)]
    assert [a.id for a in groups[("01", None)]] == [a.id for a in acqs]
    assert collect_acquisitions(root, bids_filters={"megre": {"acquisition": "ori2"}})[0].acq == (
        "ori2"
    )
