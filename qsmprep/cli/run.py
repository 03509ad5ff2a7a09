"""``qsmprep``: the BIDS App command line.

``qsmprep bids_dir output_dir participant [options]`` processes the participants' multi-echo
GRE acquisitions into susceptibility maps (BIDS derivatives plus one HTML report per subject);
``qsmprep bids_dir output_dir group`` gathers their metrics. ``qsmprep demo OUT`` simulates a
small dataset with ground truth and runs both levels on it: the embedded default.

This module parses the command line and builds the run's settings; :mod:`qsmprep.app` runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep.app import (
    UsageError,
    default_nprocs,
    default_omp_nthreads,
    make_settings,
    run,
    run_demo,
)
from qsmprep.app.adapt import MODELS_DIR
from qsmprep.app.console import console
from qsmprep.config import DEFAULT_ADAPT_STEPS, OUTPUTS, Settings
from qsmprep.methods import defaults, names, records
from qsmprep.recon.unwrap import AUTO_ONE_ECHO

__all__ = [
    "UsageError",
    "build_demo_parser",
    "build_parser",
    "default_nprocs",
    "default_omp_nthreads",
    "main",
    "settings_from_args",
]

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except ``None`` (an option whose default the help text explains)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _described(stage: str, *, mark_default: bool = True) -> str:
    """``"name (default): description; ..."``: the registered methods of a stage, for a help."""
    return "; ".join(
        f"{m.name}{' (default)' if m.default and mark_default else ''}: {m.description}"
        for m in records(stage)
    )


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
        choices=["auto", *names("unwrap")],
        default="auto",
        help=f"phase unwrapping: {_described('unwrap', mark_default=False)}; auto uses"
        f" {defaults('unwrap')[0]} for two or more echoes and {AUTO_ONE_ECHO} for one echo",
    )
    g.add_argument(
        "--mask-method",
        choices=names("mask"),
        default=None,
        help=f"brain mask: {_described('mask')}; not used with --mask-dir",
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

    g.add_argument(
        "--dl-adapt",
        action="store_true",
        help="adapt the networks of dsbn (QSMInvNet+) and dcfinetune (QSMInvNet) to the selected"
        " acquisitions before running them, without labels: their local fields train the"
        " target batch norms with the data-consistency loss (dsbn) or fine-tune the network by"
        " data consistency (dcfinetune). The adapted weights, with model card and sha256, go"
        f" to OUTPUT_DIR/{MODELS_DIR.as_posix()}/<selection>/ (e.g. sub-01+sub-02); a rerun"
        " on the same acquisitions reuses them",
    )
    g.add_argument(
        "--dl-adapt-steps",
        type=int,
        default=DEFAULT_ADAPT_STEPS,
        metavar="N",
        help=f"optimiser steps of each --dl-adapt adaptation (default {DEFAULT_ADAPT_STEPS})",
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
        " default: nprocs - 1, at most 8, at least 1, and the long-running inversions (TV,"
        " MEDI, TFI) share the cores: a lone one gets them all",
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


def settings_from_args(args) -> Settings:
    """Validate the command line and turn it into :class:`Settings` (see
    :func:`qsmprep.app.make_settings`)."""
    return make_settings(
        args.bids_dir,
        args.output_dir,
        args.analysis_level,
        work_dir=args.work_dir,
        participant_label=args.participant_label,
        session_label=args.session_label,
        bids_filter_file=args.bids_filter_file,
        b0=args.b0,
        phase_sign=args.phase_sign,
        methods=args.methods,
        outputs=getattr(args, "outputs", None),
        bg_method=args.bg_method,
        unwrap=args.unwrap,
        mask_method=getattr(args, "mask_method", None),
        reference=args.reference,
        config=args.config,
        mask_dir=getattr(args, "mask_dir", None),
        field_dir=getattr(args, "field_dir", None),
        output_spaces=getattr(args, "output_spaces", None),
        reference_region=getattr(args, "reference_region", "mask"),
        nprocs=args.nprocs,
        omp_nthreads=args.omp_nthreads,
        resource_monitor=getattr(args, "resource_monitor", False),
        mem_gb=args.mem_gb,
        device=args.device,
        plugin=args.nipype_plugin,
        plugin_config=args.plugin_config,
        skip_bids_validation=getattr(args, "skip_bids_validation", False),
        dl_adapt=getattr(args, "dl_adapt", False),
        dl_adapt_steps=getattr(args, "dl_adapt_steps", DEFAULT_ADAPT_STEPS),
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        a = build_demo_parser().parse_args(argv[1:])
        with console(a.verbose):
            return run_demo(
                a.output_dir, shape=a.shape, voxel_size=a.voxel_size, subjects=a.subjects,
                orientations=a.orientations, seed=a.seed, methods=a.methods, nprocs=a.nprocs,
                device=a.device, verbose=a.verbose,
            )  # fmt: skip
    args = build_parser().parse_args(argv)
    with console(args.verbose):
        try:
            settings = settings_from_args(args)
        except ValueError as exc:  # UsageError and invalid parameters
            print(f"qsmprep: error: {exc}", file=sys.stderr)
            return 1
        return run(settings, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
