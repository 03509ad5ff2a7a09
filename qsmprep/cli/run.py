"""``qsmprep``: the BIDS App command line.

``qsmprep bids_dir output_dir participant [options]`` processes the participants' multi-echo
GRE acquisitions into susceptibility maps (BIDS derivatives plus one HTML report per subject);
``qsmprep bids_dir output_dir group`` gathers their metrics. ``qsmprep demo OUT`` simulates a
small dataset with ground truth and runs both levels on it: the embedded default.
"""

from __future__ import annotations

import argparse
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
from qsmprep.cli.console import StageProgress, console, log_file, quiet_nipype
from qsmprep.config import OUTPUTS, Settings, load_method_params
from qsmprep.methods import defaults, names
from qsmprep.validation import (
    ValidatorUnavailable,
    run_validator,
    split_errors,
    write_bidsignore,
)

__all__ = ["build_parser", "main", "run_group", "run_participant"]

LOGGER = logging.getLogger("qsmprep")
NIPYPE_PLUGINS = (
    "MultiProc",
    "Linear",
    "SLURM",
    "SLURMGraph",
    "SGE",
    "SGEGraph",
    "PBS",
    "PBSGraph",
    "LSF",
    "Condor",
    "DAGMan",
    "OAR",
    "IPython",
)
# Nipype's plugins that submit the whole graph at once take no status callback
GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "DAGMan")


_MAX_LISTED = 10  # validator issues listed in a message


class UsageError(ValueError):
    """A problem with the command line or the inputs, reported without a traceback."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except ``None`` (an option whose default the help text explains)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def default_nprocs() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, cpusets, SLURM's
    binding), else every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return os.cpu_count() or 1


def default_omp_nthreads(nprocs: int) -> int:
    """Threads of a CPU-heavy node: ``nprocs - 1``, at most 8, at least 1 (fMRIPrep's rule).

    A node with ``n_procs = omp_nthreads`` takes that many of MultiProc's ``nprocs`` slots, so
    it never exceeds them, and one slot stays for the light nodes (loading, writing outputs).
    """
    return max(1, min(nprocs - 1, 8))


def _labels(values):
    if not values:
        return None
    return [v[4:] if v.startswith("sub-") else v for v in values]


def build_parser() -> argparse.ArgumentParser:
    """The BIDS App parser (its help text is the CLI reference of the documentation)."""
    p = argparse.ArgumentParser(
        prog="qsmprep",
        description="qsmprep: quantitative susceptibility mapping of multi-echo GRE BIDS data."
        " Run 'qsmprep demo OUT' for a simulated example.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the root folder of a BIDS dataset")
    p.add_argument("output_dir", type=Path, help="the output folder (a BIDS derivative dataset)")
    p.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="console: -v shows every logger's messages (Nipype's node by node), -vv debug"
        " messages too; the full log is in <output_dir>/logs/ either way",
    )

    g = p.add_argument_group("Selecting data")
    g.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        action="store_true",
        help="do not run the official BIDS validator (bids-validator-deno) on the input first;"
        " qsmprep still checks every file it reads",
    )
    g.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="subjects to process (with or without 'sub-'); default all",
    )
    g.add_argument(
        "--session-label",
        nargs="+",
        metavar="LABEL",
        help="sessions to process (with or without 'ses-'); default all",
    )
    g.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help="JSON file of pybids entity filters applied to the MEGRE/T2starw query",
    )
    g.add_argument(
        "--b0",
        type=float,
        metavar="TESLA",
        help="field strength, overriding the sidecars' MagneticFieldStrength",
    )
    g.add_argument(
        "--phase-sign",
        type=int,
        choices=[1, -1],
        default=1,
        help="multiply the phase by this sign (-1 for scanners of the opposite "
        "handedness: veins and deep grey nuclei must come out positive)",
    )

    g = p.add_argument_group("Methods")
    g.add_argument(
        "--methods",
        nargs="+",
        default=list(defaults("inversion")),
        metavar="METHOD",
        help=f"dipole inversions, each also the desc- label of its Chimap; classical: "
        f"{', '.join(names('inversion', kind='classical'))}; deep learning (trained "
        f"networks shipped with qsmprep or in $QSMPREP_WEIGHTS_DIR): "
        f"{', '.join(names('inversion', kind='dl'))}",
    )
    g.add_argument(
        "--outputs",
        nargs="+",
        choices=OUTPUTS,
        default=list(OUTPUTS),
        metavar="OUTPUT",
        help=f"maps to write, from {', '.join(OUTPUTS)}: chi the susceptibility maps (always"
        " made); r2star the R2* (1/s), T2* (s) and S0 maps of the magnitude decay (two or more"
        " echoes; single-echo acquisitions skip it); swi the susceptibility-weighted image and"
        " its minimum intensity projection (with chi, also the susceptibility-map-weighted"
        " images)",
    )
    g.add_argument(
        "--bg-method",
        choices=names("background"),
        default=defaults("background")[0],
        help="background field removal (lbv: Laplacian boundary value on the brain mask less its"
        " unreliable rim; resharp, vsharp and sharp erode the mask by their kernel)",
    )
    g.add_argument(
        "--unwrap",
        choices=["auto", "quality", "laplacian"],
        default="auto",
        help="phase unwrapping: quality-guided region growing with temporal unwrapping of"
        " later echoes, or Laplacian; auto uses region growing for two or more echoes and the"
        " Laplacian method for one echo",
    )
    g.add_argument(
        "--mask-method",
        choices=["magnitude", "phase"],
        default=None,
        help="brain mask from the magnitude (default) or from the phase quality; not used with"
        " --mask-dir",
    )
    g.add_argument(
        "--reference",
        type=Path,
        metavar="CHIMAP",
        help="reference susceptibility map (ppm, same space) for metric reports;"
        " default: COSMOS when a subject has several head orientations",
    )
    g.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help='JSON/TOML file of method parameters, e.g. {"tv": {"lam": 5e-4}}',
    )

    g = p.add_argument_group(
        "Precomputed inputs (derivative datasets: sub-<label>[/ses-<label>]/anat/)"
    )
    g.add_argument(
        "--mask-dir",
        type=Path,
        metavar="DIR",
        help="use these brain masks instead of computing them: <prefix>_desc-brain_mask.nii[.gz]"
        " (or <prefix>_mask) per acquisition, as qsmprep writes them (an earlier output folder"
        " works), or of fewer entities (sub-<label>_desc-brain_mask serves every run); on the"
        " acquisition's grid, values 0 and 1 only. An acquisition without one is refused",
    )
    g.add_argument(
        "--field-dir",
        type=Path,
        metavar="DIR",
        help="use these total fields instead of unwrapping and fitting the phase:"
        ' <prefix>_desc-total_fieldmap.nii[.gz] with a sidecar giving "Units": "Hz", on the'
        " acquisition's grid; background removal starts from them. An acquisition without"
        " one is refused",
    )

    g = p.add_argument_group("Template space (TemplateFlow, read offline from TEMPLATEFLOW_HOME)")
    g.add_argument(
        "--output-spaces",
        nargs="+",
        default=[],
        metavar="SPACE",
        help="also write the Chimaps in these template spaces, e.g. MNI152NLin2009cAsym:res-1"
        " (registration of the magnitude with ANTs; atlas ROI statistics in native space);"
        " default: native only",
    )
    g.add_argument(
        "--reference-region",
        choices=["mask", "csf"],
        default="mask",
        help="reference chi to the mean of the local-field mask, or of the atlas ventricles"
        " (CSF; registers to MNI152NLin2009cAsym when no output space is given)",
    )

    g = p.add_argument_group("Performance and execution")
    g.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        help="Nipype work directory (a rerun with the same one resumes); default "
        "<output_dir>/../qsmprep_work",
    )
    g.add_argument(
        "--nprocs",
        "--nthreads",
        type=int,
        metavar="N",
        help="parallel processes (MultiProc slots); default: every CPU this process may run on"
        " (its affinity mask); 1 runs the nodes one at a time",
    )
    g.add_argument(
        "--omp-nthreads",
        type=int,
        metavar="N",
        help="threads a CPU-heavy node may use (it takes that many of the --nprocs slots);"
        " default: nprocs - 1, at most 8, at least 1",
    )
    g.add_argument(
        "--resource-monitor",
        action="store_true",
        help="record each node's peak memory and CPU use (Nipype's resource monitor, in the"
        " work directory's result files; qsmprep-bench participant reads them)",
    )
    g.add_argument("--mem-gb", type=float, help="memory limit for the scheduler (GB)")
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where FFT-heavy inversions run; auto uses a GPU when torch sees one",
    )
    g.add_argument(
        "--nipype-plugin",
        choices=NIPYPE_PLUGINS,
        default="MultiProc",
        help="Nipype execution plugin (cluster plugins submit one job per node)",
    )
    g.add_argument(
        "--plugin-config",
        type=Path,
        metavar="FILE",
        help='JSON/YAML file: {"plugin": ..., "plugin_args": {...}}',
    )
    return p


def build_demo_parser() -> argparse.ArgumentParser:
    d = argparse.ArgumentParser(
        prog="qsmprep demo",
        description="Simulate a small BIDS dataset with ground truth and run qsmprep on it.",
        formatter_class=_HelpFormatter,
    )
    d.add_argument("output_dir", type=Path, help="folder for the dataset, outputs and work")
    d.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80])
    d.add_argument("--voxel-size", type=float, default=2.0, help="isotropic voxel size (mm)")
    d.add_argument("--subjects", type=int, default=1, help="simulated subjects")
    d.add_argument(
        "--orientations",
        type=int,
        default=1,
        help="head orientations of the first subject (>= 2 also gives COSMOS)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--methods", nargs="+", default=list(defaults("inversion")))
    d.add_argument(
        "--nprocs",
        type=int,
        metavar="N",
        help="parallel processes; default: every CPU this process may run on",
    )
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument("-v", "--verbose", action="count", default=0, help="as for qsmprep")
    return d


def _read_json_or_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yml", ".yaml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{what} {path} could not be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must hold a JSON object")
    return data


def _check_weights(methods, params) -> None:
    """Fail before any work when a deep-learning method has no trained model to run."""
    from qsmprep.dl.weights import resolve_model

    for m in methods:
        if m in names("inversion", kind="dl"):
            p = params.get(m, {})
            try:
                resolve_model(m, model=p.get("model"), weights=p.get("weights"))
            except ValueError as err:
                raise UsageError(str(err)) from err


def _mask_method(args) -> str:
    """``--mask-method``, which ``--mask-dir`` makes moot (said, when both are given)."""
    method = getattr(args, "mask_method", None)
    if method is not None and getattr(args, "mask_dir", None) is not None:
        LOGGER.warning(
            "--mask-method %s is not used: the brain masks come from --mask-dir %s",
            method,
            args.mask_dir,
        )
    return method or "magnitude"


def settings_from_args(args) -> Settings:
    """Validate the command line and turn it into :class:`Settings`."""
    bids_dir = args.bids_dir.absolute()
    out = args.output_dir.absolute()
    if not bids_dir.is_dir():
        raise UsageError(f"bids_dir {bids_dir} is not a folder; give the root of a BIDS dataset")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UsageError(
                f"output_dir {out} cannot be created: {p} is a file, not a folder; give a folder"
                " path (it is created if missing)"
            )
    if args.analysis_level == "participant":
        inside = out == bids_dir or bids_dir in out.parents
        if inside and (bids_dir / "derivatives") not in [out, *out.parents]:
            raise UsageError(
                f"output_dir {out} is inside the input dataset {bids_dir}; write outputs outside"
                f" it or under {bids_dir / 'derivatives'}"
            )
    if "chi" not in (getattr(args, "outputs", None) or OUTPUTS):
        raise UsageError(
            "--outputs must include chi: the susceptibility maps are always computed, the other"
            " outputs come from the same chain (e.g. --outputs chi r2star)"
        )
    available = list(names("inversion", kind=("classical", "dl")))
    unknown = [m for m in args.methods if m not in available]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; available: {available}")
    params = load_method_params(args.config) if args.config else {}
    _check_weights(args.methods, params)
    filters = (
        _read_json_or_yaml(args.bids_filter_file, "--bids-filter-file")
        if (args.bids_filter_file)
        else None
    )
    plugin, plugin_args = args.nipype_plugin, {}
    if args.plugin_config:
        cfg = _read_json_or_yaml(args.plugin_config, "--plugin-config")
        plugin = cfg.get("plugin", plugin)
        plugin_args = dict(cfg.get("plugin_args", {}))
    nprocs = args.nprocs
    if nprocs is None:
        nprocs = int(plugin_args.get("n_procs", 0)) if plugin == "MultiProc" else 0
        nprocs = nprocs or default_nprocs()
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", nprocs)
        nprocs = int(plugin_args["n_procs"])  # the plugin configuration file has the last word
        if args.mem_gb:
            plugin_args.setdefault("memory_gb", args.mem_gb)
    omp_nthreads = args.omp_nthreads
    if omp_nthreads is None:
        omp_nthreads = default_omp_nthreads(nprocs)
    if nprocs < 1 or omp_nthreads < 1:
        raise UsageError(
            f"--nprocs and --omp-nthreads must be at least 1 ({nprocs}, {omp_nthreads})"
        )
    if plugin == "MultiProc" and omp_nthreads > nprocs:
        # MultiProc refuses a node that asks for more slots than it has
        LOGGER.warning(
            "--omp-nthreads %d is more than the %d processes; using %d",
            omp_nthreads,
            nprocs,
            nprocs,
        )
        omp_nthreads = nprocs
    return Settings(
        bids_dir=bids_dir,
        output_dir=out,
        analysis_level=args.analysis_level,
        work_dir=args.work_dir,
        participant_label=_labels(args.participant_label),
        session_label=[s[4:] if s.startswith("ses-") else s for s in args.session_label]
        if args.session_label
        else None,
        bids_filters=filters,
        nprocs=nprocs,
        omp_nthreads=omp_nthreads,
        mem_gb=args.mem_gb,
        device=args.device,
        methods=list(dict.fromkeys(args.methods)),
        outputs=list(dict.fromkeys(getattr(args, "outputs", None) or OUTPUTS)),
        bg_method=args.bg_method,
        unwrap=args.unwrap,
        mask_method=_mask_method(args),
        reference=args.reference,
        b0=args.b0,
        phase_sign=args.phase_sign,
        method_params=params,
        plugin=plugin,
        plugin_args=plugin_args,
        output_spaces=list(getattr(args, "output_spaces", None) or []),
        reference_region=getattr(args, "reference_region", "mask"),
        skip_bids_validation=bool(getattr(args, "skip_bids_validation", False)),
        resource_monitor=bool(getattr(args, "resource_monitor", False)),
        mask_dir=_existing_dir(getattr(args, "mask_dir", None), "--mask-dir"),
        field_dir=_existing_dir(getattr(args, "field_dir", None), "--field-dir"),
    )


def _existing_dir(path, option: str):
    """An option's folder, absolute; a missing one is a usage error before any work."""
    if path is None:
        return None
    p = Path(path).absolute()
    if not p.is_dir():
        raise UsageError(
            f"{option} {p} is not a folder; give the root of a derivative dataset (the folder"
            " holding sub-<label>/), e.g. an earlier qsmprep output folder"
        )
    return p


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
                # MultiProc polls its workers every 2 s by default, which dominates small runs
                "poll_sleep_duration": 0.2,
            },
            # peak memory and CPU use per node (result files), as fMRIPrep --resource-monitor
            "monitoring": {"enabled": bool(settings.resource_monitor), "sample_frequency": 0.5},
        }
    )
    ncfg.resource_monitor = bool(settings.resource_monitor)  # the property caches its value
    nlogging.update_logging(ncfg)
    quiet_nipype()


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
    if failed:
        print("qsmprep: these acquisitions failed:", file=sys.stderr)
        for name, why in failed.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    return 0


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
    from qsmprep.workflows import init_participant_wf

    groups = bids.group_orientations(acqs)
    failed: dict[str, str] = {str(e): "invalid input" for e in errors}
    logs = settings.output_dir / "logs"
    for sub in sorted({a.subject for a in acqs}):
        sub_acqs = [a for a in acqs if a.subject == sub]
        sub_groups = {k: v for k, v in groups.items() if k[0] == sub}
        LOGGER.info(
            "sub-%s: %d acquisition(s), %d COSMOS group(s)", sub, len(sub_acqs), len(sub_groups)
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
                wf.run(plugin=settings.plugin, plugin_args=plugin_args)
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
    from qsmprep.reports.group import build_group_report

    if not settings.output_dir.is_dir():
        raise UsageError(
            f"output_dir {settings.output_dir} does not exist; run the participant level first"
        )
    tsv, html = build_group_report(settings.output_dir)
    print(f"group metrics: {tsv}\ngroup report: {html}")
    return 0


def run_demo(argv) -> int:
    """Simulate a dataset with ground truth, run the participant and group levels on it."""
    import numpy as np

    from qsmprep.sim.bids import simulate_bids_dataset

    a = build_demo_parser().parse_args(argv)
    out = a.output_dir.absolute()
    bids_dir = out / "bids"
    t0 = time.perf_counter()
    rots = [0.0, (20.0, 0.0), (0.0, -20.0), (-15.0, 15.0), (15.0, 15.0)][: a.orientations]
    print(
        f"qsmprep {__version__} demo: simulating {a.subjects} subject(s) in {bids_dir}", flush=True
    )
    simulate_bids_dataset(
        bids_dir,
        n_subjects=a.subjects,
        shape=tuple(a.shape),
        voxel_size=(a.voxel_size,) * 3,
        seed=a.seed,
        orientations={0: rots} if a.orientations > 1 else None,
    )
    common = [str(bids_dir), str(out / "derivatives" / "qsmprep")]
    opts = [
        "--methods",
        *a.methods,
        *(["--nprocs", str(a.nprocs)] if a.nprocs else []),
        *(["-" + "v" * a.verbose] if a.verbose else []),
        "--device",
        a.device,
        "-w",
        str(out / "work"),
    ]
    code = main([*common, "participant", *opts])
    code = max(code, main([*common, "group"]))
    # score against the simulator's ground truth
    import nibabel as nib

    deriv = out / "derivatives" / "qsmprep"
    for chimap in sorted(deriv.rglob("*_desc-*_Chimap.nii.gz")):
        sub = chimap.name.split("_")[0]
        gt = bids_dir / "derivatives" / "groundtruth" / sub / "anat"
        truth = nib.load(gt / f"{sub}_Chimap.nii.gz").get_fdata()
        # scored as the QSM challenges do: over the whole true brain, a voxel at zero counts
        mask = nib.load(gt / f"{sub}_desc-brain_mask.nii.gz").get_fdata() > 0
        from qsmprep.metrics import nrmse, xsim

        chi = nib.load(chimap).get_fdata()
        covered = 100.0 * np.count_nonzero(mask & (chi != 0)) / max(np.count_nonzero(mask), 1)
        print(
            f"  {chimap.name}: NRMSE {nrmse(chi, truth, mask):.1f} %, "
            f"XSIM {xsim(chi, truth, mask):.3f} vs ground truth over the true brain "
            f"({int(np.count_nonzero(mask))} voxels; the map covers {covered:.1f} %)"
        )
    print(f"reports: {sorted(str(p) for p in deriv.glob('*.html'))}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s (exit code {code})")
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        verbose = build_demo_parser().parse_args(argv[1:]).verbose
        with console(verbose):
            return run_demo(argv[1:])
    args = build_parser().parse_args(argv)
    with console(args.verbose):
        try:
            settings = settings_from_args(args)
            if settings.analysis_level == "participant":
                return run_participant(settings)
            return run_group(settings)
        except ValueError as exc:  # UsageError, BIDSInputError and invalid parameters
            print(f"qsmprep: error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
