"""What the BIDS App prints: a short progress display on the console, the full log in logs/."""

import logging
import re
from collections import Counter

import pytest

from qsmprep.app.console import console
from qsmprep.cli import run
from qsmprep.sim.bids import simulate_bids_dataset

STAGES = ("field", "inversion", "outputs", "metrics")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("console") / "bids"
    simulate_bids_dataset(
        root,
        n_subjects=1,
        shape=(32, 32, 24),
        voxel_size=3.0,
        echo_times=(0.004, 0.008, 0.012),
        seed=3,
    )
    return root


def _participant(bids, tmp_path, *extra):
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "-w", str(tmp_path / "work")]
    return out, run.main([*argv, "--methods", "tkd", "--device", "cpu", *extra])


def _lines(captured) -> list[str]:
    return [line for line in (captured.out + captured.err).splitlines() if line.strip()]


@pytest.mark.parametrize("plugin", ["MultiProc", "Linear"])
def test_console_shows_progress_once_and_the_log_file_everything(small, tmp_path, capsys, plugin):
    out, code = _participant(small, tmp_path, "--nprocs", "2", "--nipype-plugin", plugin)
    assert code == 0
    lines = _lines(capsys.readouterr())
    assert len(lines) <= 40, "\n".join(lines)
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, repeated
    for stage in STAGES:  # one progress line per acquisition and stage, with its time
        assert sum(bool(re.match(rf"sub-01\s+{stage}\s+done\s+[\d.]+ s", x)) for x in lines) == 1
    assert not [x for x in lines if "[Node]" in x or "nipype.workflow" in x]
    assert any("2 process(es), 1 thread(s) per CPU-heavy node" in x for x in lines)

    logs = sorted((out / "logs").glob("qsmprep_*.log"))
    assert len(logs) == 1 and any(str(logs[0]) in x for x in lines)
    text = logs[0].read_text()
    # Nipype's node messages, from the worker processes too, and qsmprep's own lines
    assert text.count("[Node] Finished") >= 10 and "nipype.workflow INFO" in text
    assert "sub-01  field" in text and "qsmprep INFO" in text
    # the handlers are gone once the command returns
    assert not [h for h in logging.getLogger().handlers if hasattr(h, "_qsmprep_handler")]


def test_verbose_console_shows_nipype_once(small, tmp_path, capsys):
    _, code = _participant(small, tmp_path, "--nipype-plugin", "Linear", "-v")
    assert code == 0
    lines = _lines(capsys.readouterr())
    assert any("[Node] Finished" in x for x in lines)
    # each record once (the continuation lines of Nipype's scheduler reports do repeat)
    records = [x for x in lines if re.match(r"\d{4}-\d\d-\d\d ", x)]
    repeated = [line for line, n in Counter(records).items() if n > 1]
    assert not repeated, repeated


def test_a_failing_node_is_reported_with_its_crash_file(small, tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"tkd": {"bogus": 1}}')
    out, code = _participant(small, tmp_path, "--nprocs", "2", "--config", str(cfg))
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"sub-01\s+inversion\s+FAILED", err)
    assert "unexpected keyword argument 'bogus'" in err
    crash = sorted((out / "logs").glob("crash-*inversion_tkd*.txt"))
    assert crash and str(crash[0]) in err
    assert (out / "logs" / "sub-01_error.log").is_file()
    assert "Traceback" not in err  # tracebacks are in the crash file and the log file
    assert "bogus" in next((out / "logs").glob("qsmprep_*.log")).read_text()


def test_console_restores_the_enclosing_handlers(capsys):
    root = logging.getLogger()
    plain = logging.StreamHandler()  # what logging.basicConfig installs
    root.addHandler(plain)
    before = list(root.handlers)
    with console(0) as outer:
        assert plain not in root.handlers
        with console(1) as inner:
            assert inner in root.handlers and outer not in root.handlers
            logging.getLogger("qsmprep").info("inner line")
        assert outer in root.handlers and inner not in root.handlers
        logging.getLogger("nipype.workflow").info("hidden at the default verbosity")
        logging.getLogger("qsmprep").info("outer line")
    assert root.handlers == before
    root.removeHandler(plain)
    err = capsys.readouterr().err
    assert err.count("inner line") == 1 and err.count("outer line") == 1
    assert "hidden" not in err


def test_stage_names_of_the_participant_workflow():
    from nipype.pipeline import engine as pe

    from qsmprep.app.console import StageProgress

    progress = StageProgress(pe.Workflow("sub_01_wf"), ["sub-01_acq-ori1", "sub-01"])
    cases = {
        "sub_01_wf.qsm_sub_01_acq_ori1_wf.field_wf.unwrap_phase": ("sub-01_acq-ori1", "field"),
        "sub_01_wf.qsm_sub_01_acq_ori1_wf.qsm_derivatives_wf.ds_x": ("sub-01_acq-ori1", "outputs"),
        "sub_01_wf.qsm_sub_01_acq_ori1_wf.metrics_wf.metrics_derivatives_wf.ds_metrics_tsv": (
            "sub-01_acq-ori1",
            "metrics",
        ),
        "sub_01_wf.metrics_sub_01_acq_ori1_wf.compute_metrics": ("sub-01_acq-ori1", "metrics"),
        "sub_01_wf.space_sub_01_acq_ori1_wf.register_x": ("sub-01_acq-ori1", "space"),
        "sub_01_wf.cosmos_sub_01_wf.cosmos": ("sub-01", "cosmos"),
        "sub_01_wf.merge_fields_sub_01": ("sub-01", "cosmos"),
        "sub_01_wf.merge_masks_sub_01": ("sub-01", "cosmos"),
    }
    assert {name: progress.stage_of(name) for name in cases} == cases
