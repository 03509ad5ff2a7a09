"""The two analysis levels of the BIDS App, as library functions.

:func:`run_participant` processes every selected acquisition (one Nipype workflow per
participant, under a lock of the work directory) and writes the derivatives and one HTML report
per subject; :func:`run_group` gathers their metrics. Both take a
:class:`~qsmprep.config.Settings` (see :func:`qsmprep.app.make_settings`) and raise
:class:`~qsmprep.app.UsageError` for inputs they cannot process. :func:`run` runs the level of
its settings as the ``qsmprep`` command does: the console display of :mod:`qsmprep.app.console`
and such an error printed as one line, its exit code returned.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from qsmprep import _atomic as atomic
from qsmprep.__about__ import __version__
from qsmprep.app.console import StageProgress, console, log_file, quiet_nipype
from qsmprep.app.settings import UsageError
from qsmprep.config import Settings
from qsmprep.validation import (
    ValidatorUnavailable,
    run_validator,
    split_errors,
    write_bidsignore,
)

__all__ = ["GRAPH_PLUGINS", "run", "run_group", "run_participant"]

LOGGER = logging.getLogger("qsmprep")
# Nipype's plugins that submit the whole graph at once take no status callback
GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "DAGMan")

_MAX_LISTED = 10  # validator issues listed in a message


def _configure_nipype(settings: Settings) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    logs = settings.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ncfg.update_config(
        {
            "execution": {
                "crashdump_dir": str(logs),
                "crashfile_format": "txt",
                "stop_on_first_crash": False,
                "remove_unnecessary_outputs": False,
                "parameterize_dirs": False,
                # MultiProc polls its workers every 2 s by default, which dominates small runs;
                # ours also wakes when a node finishes (qsmprep.app.scheduler), so this is only
                # the longest wait
                "poll_sleep_duration": 0.2,
            },
            # peak memory and CPU use per node (result files), as fMRIPrep --resource-monitor
            "monitoring": {"enabled": bool(settings.resource_monitor), "sample_frequency": 0.5},
        }
    )
    ncfg.resource_monitor = bool(settings.resource_monitor)  # the property caches its value
    nlogging.update_logging(ncfg)
    quiet_nipype()


def _plugin(name: str, plugin_args: dict):
    """What ``Workflow.run`` takes as its plugin: MultiProc woken by finished nodes
    (:mod:`qsmprep.app.scheduler`), any other plugin by its Nipype name."""
    if name == "MultiProc":
        from qsmprep.app.scheduler import WakingMultiProcPlugin

        return WakingMultiProcPlugin(plugin_args=plugin_args)
    return name


def _validate_input(settings: Settings):
    """Run the BIDS validator on the input; refuse a broken dataset, flag broken participants.

    Returns the report (None when the validator could not run) and, per selected participant
    with errors, a :class:`~qsmprep.bids.BIDSInputError` that skips it.
    """
    from qsmprep.bids import BIDSInputError

    try:
        report = run_validator(settings.bids_dir)
    except ValidatorUnavailable as exc:
        LOGGER.warning(
            "BIDS validation skipped: %s. qsmprep still checks every file it reads"
            " (--skip-bids-validation skips the validator on purpose)",
            exc,
        )
        return None, {}
    dataset_errors, per_subject = split_errors(report, settings.participant_label)
    LOGGER.info(
        "BIDS validator: %d error(s), %d warning(s) in %s",
        len(report.errors),
        len(report.warnings),
        settings.bids_dir,
    )

    def listing(issues):
        shown = "\n  ".join(str(i) for i in issues[:_MAX_LISTED])
        more = len(issues) - _MAX_LISTED
        return shown + (f"\n  ... and {more} more" if more > 0 else "")

    fix = (
        "Fix them (https://bids-specification.readthedocs.io), or run with"
        " --skip-bids-validation: qsmprep then checks only the files it reads"
    )
    if dataset_errors:
        raise UsageError(
            f"the BIDS validator found {len(dataset_errors)} error(s) in the dataset "
            f"{settings.bids_dir} as a whole:\n  {listing(dataset_errors)}\n{fix}"
        )
    return report, {
        sub: BIDSInputError(
            f"sub-{sub}: the BIDS validator found {len(issues)} error(s):\n  "
            f"{listing(issues)}\n{fix}",
            acquisition=f"sub-{sub}",
        )
        for sub, issues in sorted(per_subject.items())
    }


@contextlib.contextmanager
def _monitor_traces(settings: Settings):
    """Keep Nipype's resource-monitor traces out of the user's working directory.

    With ``--resource-monitor`` every interface run writes a ``.proc-<pid>_time-..`` trace into
    the current directory of its process and never removes it (its samples are kept in the
    node's result file). The workflow runs from ``<work>/resource_monitor`` (worker processes
    start there too), and the traces are removed afterwards.
    """
    if not settings.resource_monitor:
        yield
        return
    folder = Path(settings.work_dir) / "resource_monitor"
    folder.mkdir(parents=True, exist_ok=True)
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
        for trace in folder.glob(".proc-*"):
            trace.unlink(missing_ok=True)


def run_participant(settings: Settings) -> int:
    """Process every selected acquisition; 0 when all succeeded, 1 otherwise.

    The full log of the run goes to ``<output_dir>/logs/qsmprep_<date>-<time>.log``; the
    ``qsmprep.progress`` logger gets a line per acquisition and stage as it finishes.
    """
    quiet_nipype()  # before the workflows import Nipype's loggers
    from qsmprep import bids
    from qsmprep.reports.html import build_subject_report
    from qsmprep.space.plan import plan_from_settings

    # templates and atlases are checked before any work (TemplateNotFoundError: exit 1)
    plan = plan_from_settings(settings)
    for warning in plan.warnings:
        LOGGER.warning("template space: %s", warning)
    report, invalid = (None, {}) if settings.skip_bids_validation else _validate_input(settings)
    errors: list = list(invalid.values())
    acqs = bids.collect_acquisitions(
        settings.bids_dir,
        participant_label=settings.participant_label,
        session_label=settings.session_label,
        bids_filters=settings.bids_filters,
        b0=settings.b0,
        errors=errors,
    )
    acqs = [a for a in acqs if a.subject not in invalid]
    if settings.mask_dir is not None or settings.field_dir is not None:
        from qsmprep.provided import attach_provided

        # a missing or invalid mask/field skips its acquisition (errors); a folder that is
        # not a derivative dataset stops the run
        acqs = attach_provided(
            acqs, mask_dir=settings.mask_dir, field_dir=settings.field_dir, errors=errors
        )
    for err in errors:
        LOGGER.error("skipped: %s", err)
    if not acqs:
        raise UsageError(
            "no valid acquisition to process" + (" (see the errors above)" if errors else "")
        )
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    adapt_failure = _adapt(settings, acqs) if settings.dl_adapt else None
    bids.write_dataset_description(settings.output_dir)
    write_bidsignore(settings.output_dir)
    settings.write(settings.output_dir / "qsmprep_settings.json")
    _configure_nipype(settings)
    if report is not None:
        atomic.write_text(
            settings.output_dir / "logs" / "bids_validator.json", json.dumps(report.raw, indent=1)
        )
    logs = settings.output_dir / "logs"
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    with log_file(logs, logging.DEBUG if debug else logging.INFO) as log_path:
        subjects = sorted({a.subject for a in acqs})
        LOGGER.info(
            "qsmprep %s: %d acquisition(s) of %d subject(s); %d process(es), %d thread(s) per"
            " CPU-heavy node (plugin %s); full log: %s",
            __version__,
            len(acqs),
            len(subjects),
            settings.nprocs,
            settings.omp_nthreads,
            settings.plugin,
            log_path,
        )
        failed = _process_subjects(settings, acqs, errors, log_path, build_subject_report)
    if adapt_failure:
        failed = {"--dl-adapt": adapt_failure, **failed}
    if failed:
        print("qsmprep: these acquisitions failed:", file=sys.stderr)
        for name, why in failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    return 0


def _adapt(settings: Settings, acqs) -> str | None:
    """``--dl-adapt``: adapt the networks to ``acqs`` and point their methods at the adapted
    weights. When the adaptation fails, the adaptable methods are dropped from this run (their
    maps would not be what was asked for), the other methods still run, and the reason is
    returned (the run then exits with 1)."""
    from qsmprep.app.adapt import ADAPTABLE, adapt_networks

    try:
        adapted = adapt_networks(settings, sorted({a.subject for a in acqs}), run_participant)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the other methods still run
        dropped = [m for m in settings.methods if m in ADAPTABLE]
        settings.methods = [m for m in settings.methods if m not in ADAPTABLE]
        why = (
            f"the adaptation of {', '.join(dropped)} failed ({_last_line(exc)}); their maps were"
            " not made. Run again (a finished adaptation is reused), or without --dl-adapt"
        )
        LOGGER.error("--dl-adapt: %s", why, exc_info=LOGGER.isEnabledFor(logging.DEBUG))
        if not settings.methods:
            raise UsageError(f"--dl-adapt: {why}") from exc
        return why
    for method, weights in adapted.items():
        settings.method_params.setdefault(method, {})["weights"] = str(weights)
    return None


def _check_memory(wf, settings: Settings) -> None:
    """Refuse a --mem-gb below what the largest node announces (MultiProc would only say
    "Insufficient resources available for job")."""
    if not settings.mem_gb or settings.plugin != "MultiProc":
        return
    nodes = [(name, wf.get_node(name)) for name in wf.list_node_names()]
    name, node = max(nodes, key=lambda item: item[1].mem_gb)
    if node.mem_gb > settings.mem_gb:
        raise RuntimeError(
            f"--mem-gb {settings.mem_gb:g} is below the memory node {name} needs on this grid "
            f"({node.mem_gb:.2f} GB, measured peak with 50 % slack); give --mem-gb "
            f"{math.ceil(node.mem_gb * 10) / 10:g} or more"
        )


def _last_line(exc: BaseException) -> str:
    """The gist of an exception: Nipype's carry the node's traceback, whose last line is it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _process_subjects(settings: Settings, acqs, errors, log_path: Path, report) -> dict[str, str]:
    """Run each subject's workflow and build its report; the failed acquisitions and why."""
    from qsmprep import bids
    from qsmprep._atomic import remove_stale_temporaries
    from qsmprep.workflows import init_participant_wf, long_node_threads

    groups = bids.group_orientations(acqs)
    failed: dict[str, str] = {str(e): "invalid input" for e in errors}
    logs = settings.output_dir / "logs"
    for sub in sorted({a.subject for a in acqs}):
        sub_acqs = [a for a in acqs if a.subject == sub]
        sub_groups = {k: v for k, v in groups.items() if k[0] == sub}
        LOGGER.info(
            "sub-%s: %d acquisition(s), %d COSMOS group(s); %d thread(s) per long-running"
            " inversion node",
            sub,
            len(sub_acqs),
            len(sub_groups),
            long_node_threads(settings, len(sub_acqs)),
        )
        t0 = time.perf_counter()
        crashes_before = set(logs.glob("crash-*"))
        progress = None
        held = contextlib.ExitStack()
        try:
            # one run per participant and work directory: two would overwrite each other's
            # nodes and temporary files
            lock = settings.work_dir / f".sub-{sub}.lock"
            held.enter_context(atomic.exclusive(lock, f"sub-{sub} in {settings.work_dir}"))
            # temporary files of a killed earlier run (final names are only ever complete)
            remove_stale_temporaries(settings.output_dir / f"sub-{sub}")
            wf = init_participant_wf(sub_acqs, settings, sub_groups)
            wf.base_dir = str(settings.work_dir)
            _check_memory(wf, settings)
            plugin_args = dict(settings.plugin_args)
            if settings.plugin not in GRAPH_PLUGINS:
                names = [a.prefix for a in sub_acqs] + [
                    f"sub-{s}" + (f"_ses-{ses}" if ses else "") for s, ses in sub_groups
                ]
                progress = StageProgress(wf, names, linear=settings.plugin == "Linear")
                plugin_args["status_callback"] = progress
            # MultiProc runs gc.collect() before every job it submits; with torch, SciPy and
            # matplotlib loaded each pass walks the whole heap (0.3-0.4 s). Frozen objects
            # (everything alive now: modules, the graph) are skipped by those passes.
            gc.freeze()
            try:
                with _monitor_traces(settings):
                    wf.run(plugin=_plugin(settings.plugin, plugin_args), plugin_args=plugin_args)
            finally:
                gc.unfreeze()
                if progress is not None:
                    progress.finish()
        except atomic.AlreadyRunning as exc:
            # the other run owns this participant's outputs and report: leave them alone
            for a in sub_acqs:
                failed[a.prefix] = str(exc)
            LOGGER.error("sub-%s skipped: %s", sub, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one failing subject never sinks the others
            new = sorted(set(logs.glob("crash-*")) - crashes_before)
            names = [
                a.prefix
                for a in sub_acqs
                if any(a.prefix.replace("-", "_") in c.name.replace("-", "_") for c in new)
            ]
            why = _last_line(exc)
            for a in names or [a.prefix for a in sub_acqs]:
                failed[a] = f"{why}; crash logs: " + (
                    ", ".join(str(c) for c in new) if new else f"see {log_path}"
                )
            log = logs / f"sub-{sub}_error.log"
            log.write_text(traceback.format_exc())
            LOGGER.error("sub-%s failed: %s; details in %s", sub, why, log)
        finally:
            held.close()
        LOGGER.info("sub-%s done in %.1f s", sub, time.perf_counter() - t0)
        report(
            settings.output_dir,
            sub,
            settings=settings.to_dict(),
            log={k: v for k, v in failed.items() if f"sub-{sub}" in k} or None,
        )
    return failed


def run_group(settings: Settings) -> int:
    """Gather the metrics of every participant in ``settings.output_dir``: a TSV and an HTML
    report (:func:`qsmprep.reports.group.build_group_report`); 0, or a :class:`UsageError`
    when the participant level has not run there."""
    from qsmprep.reports.group import build_group_report

    if not settings.output_dir.is_dir():
        raise UsageError(
            f"output_dir {settings.output_dir} does not exist; run the participant level first"
        )
    tsv, html = build_group_report(settings.output_dir)
    print(f"group metrics: {tsv}\ngroup report: {html}")
    return 0


def run(settings: Settings, *, verbose: int = 0) -> int:
    """Run the level of ``settings.analysis_level`` as the ``qsmprep`` command does.

    The console shows qsmprep's messages meanwhile (``verbose`` as ``-v``/``-vv``: see
    :func:`qsmprep.app.console.console`); a :class:`ValueError` (:class:`UsageError`, an input
    or parameter the run refuses) is printed as ``qsmprep: error: ...`` and gives exit code 1.

    Returns
    -------
    int
        The exit code: 0 when every acquisition succeeded, 1 otherwise.
    """
    with console(verbose):
        try:
            if settings.analysis_level == "participant":
                return run_participant(settings)
            return run_group(settings)
        except ValueError as exc:  # UsageError, BIDSInputError and invalid parameters
            print(f"qsmprep: error: {exc}", file=sys.stderr)
            return 1
