"""The official BIDS validator as the App's first step, and our derivatives checked by it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qsmprep.cli import run
from qsmprep.sim.bids import simulate_bids_dataset
from qsmprep.validation import (
    BIDSIGNORE,
    ValidatorUnavailable,
    find_validator,
    run_validator,
    split_errors,
    write_bidsignore,
)

pytestmark = pytest.mark.skipif(
    find_validator() is None, reason="bids-validator-deno is not installed"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation") / "bids"
    return simulate_bids_dataset(
        root, n_subjects=2, shape=(32, 32, 24), voxel_size=3.0,
        echo_times=(0.004, 0.008, 0.012), seed=3,
    )  # fmt: skip


@pytest.fixture
def ds(base, tmp_path):
    return Path(shutil.copytree(base, tmp_path / "bids"))


def _break_subject(ds, sub="02"):
    """A file the specification has no name for, in one participant's anat folder."""
    (ds / f"sub-{sub}" / "anat" / f"sub-{sub}_notes.txt").write_text("scanner notes")


def test_simulated_dataset_is_valid(base):
    report = run_validator(base)
    assert report.errors == [], [str(e) for e in report.errors]
    assert report.warnings  # recommended sidecar keys: reported, never blocking


def test_errors_are_split_by_participant(ds):
    _break_subject(ds, "02")
    report = run_validator(ds)
    dataset, per = split_errors(report)
    assert dataset == [] and list(per) == ["02"]
    assert per["02"][0].location == "/sub-02/anat/sub-02_notes.txt"
    assert per["02"][0].code == "NOT_INCLUDED" and per["02"][0].subject == "02"
    assert str(per["02"][0]).startswith("sub-02/anat/sub-02_notes.txt: NOT_INCLUDED (")
    # errors of participants not selected are left out
    assert split_errors(report, ["01"]) == ([], {})
    # a dataset-wide error
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "no version"}))
    dataset, _ = split_errors(run_validator(ds))
    assert dataset and all(e.subject is None for e in dataset)
    assert any("BIDSVersion" in str(e) for e in dataset)


def test_validator_unavailable(tmp_path):
    with pytest.raises(ValidatorUnavailable, match="could not run"):
        run_validator(tmp_path, executable=str(tmp_path / "missing-validator"))
    fake = tmp_path / "fake-validator"
    fake.write_text("#!/bin/sh\necho 'no JSON here' >&2\nexit 2\n")
    fake.chmod(0o755)
    with pytest.raises(ValidatorUnavailable, match="wrote no report: no JSON here"):
        run_validator(tmp_path, executable=str(fake))


def test_bidsignore_is_written_once(tmp_path):
    path = write_bidsignore(tmp_path)
    assert path.read_text() == BIDSIGNORE
    mtime = path.stat().st_mtime_ns
    assert write_bidsignore(tmp_path).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bidsignore"]


def _run(ds, out, *extra):
    return run.main(
        [str(ds), str(out), "participant", "-w", str(out.parent / "work"),
         "--methods", "tkd", "--nprocs", "1", *extra]
    )  # fmt: skip


def test_app_skips_a_participant_the_validator_rejects(ds, tmp_path, capsys):
    _break_subject(ds, "02")
    out = tmp_path / "out"
    assert _run(ds, out) == 1
    err = capsys.readouterr().err
    assert "sub-02: the BIDS validator found 1 error(s)" in err
    assert "sub-02/anat/sub-02_notes.txt: NOT_INCLUDED" in err
    assert "--skip-bids-validation" in err
    assert (out / "sub-01/anat/sub-01_desc-tkd_Chimap.nii.gz").is_file()
    assert not (out / "sub-02").exists()
    assert json.loads((out / "logs/bids_validator.json").read_text())["issues"]["issues"]
    # our own derivatives pass the validator
    report = run_validator(out)
    assert report.errors == [], [str(e) for e in report.errors]
    # skipping the validator processes sub-02 too (qsmprep's own checks pass)
    assert _run(ds, out, "--skip-bids-validation") == 0
    assert (out / "sub-02/anat/sub-02_desc-tkd_Chimap.nii.gz").is_file()


def test_app_refuses_a_dataset_the_validator_rejects(ds, tmp_path, capsys):
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "no version"}))
    out = tmp_path / "out"
    assert _run(ds, out) == 1
    err = capsys.readouterr().err
    assert "the BIDS validator found" in err and "in the dataset" in err
    assert "dataset_description.json" in err and "--skip-bids-validation" in err
    assert not out.exists()
