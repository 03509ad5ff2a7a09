"""The run's :class:`~qsmprep.config.Settings` as the command line builds them.

:func:`make_settings` takes the options of ``qsmprep bids_dir output_dir level`` as keyword
arguments (paths, lists, numbers; files such as ``config`` are read here), checks them before
any work and fills in the defaults that depend on the machine (processes, threads per node).
A problem is a :class:`UsageError` whose message names the command-line option, so that the
command line prints it as it is.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

from qsmprep.config import (
    DEFAULT_ADAPT_STEPS,
    DEFAULT_BG_METHOD,
    OUTPUTS,
    Settings,
    load_method_params,
)
from qsmprep.methods import names
from qsmprep.threads import MAX_NODE_THREADS

__all__ = ["UsageError", "default_nprocs", "default_omp_nthreads", "make_settings"]

LOGGER = logging.getLogger("qsmprep")


class UsageError(ValueError):
    """A problem with the command line or the inputs, reported without a traceback."""


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
    return max(1, min(nprocs - 1, MAX_NODE_THREADS))


def _labels(values):
    if not values:
        return None
    return [v[4:] if v.startswith("sub-") else v for v in values]


def _read_json_or_yaml(path: Path, what: str) -> dict:
    path = Path(path)
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


def _mask_method(method, mask_dir) -> str:
    """``--mask-method``, which ``--mask-dir`` makes moot (said, when both are given)."""
    if method is not None and mask_dir is not None:
        LOGGER.warning(
            "--mask-method %s is not used: the brain masks come from --mask-dir %s",
            method,
            mask_dir,
        )
    return method or _default("mask_method")


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


def _default(name: str):
    """The default of a :class:`Settings` field."""
    (f,) = [f for f in fields(Settings) if f.name == name]
    return f.default_factory()


def make_settings(
    bids_dir,
    output_dir,
    analysis_level: str = "participant",
    *,
    work_dir=None,
    participant_label=None,
    session_label=None,
    bids_filter_file=None,
    b0: float | None = None,
    phase_sign: int = 1,
    methods=None,
    outputs=None,
    bg_method: str = DEFAULT_BG_METHOD,
    unwrap: str = "auto",
    mask_method: str | None = None,
    reference=None,
    config=None,
    mask_dir=None,
    field_dir=None,
    output_spaces=(),
    reference_region: str = "mask",
    nprocs: int | None = None,
    omp_nthreads: int | None = None,
    resource_monitor: bool = False,
    mem_gb: float | None = None,
    device: str = "auto",
    plugin: str = "MultiProc",
    plugin_config=None,
    skip_bids_validation: bool = False,
    dl_adapt: bool = False,
    dl_adapt_steps: int = DEFAULT_ADAPT_STEPS,
) -> Settings:
    """Check the options of a run and turn them into :class:`~qsmprep.config.Settings`.

    The keywords are the options of ``qsmprep`` (``--bids-filter-file`` is
    ``bids_filter_file``, ``--nipype-plugin`` is ``plugin``, ...), with the same defaults and
    meaning: ``config``, ``bids_filter_file`` and ``plugin_config`` are files, read here;
    labels may carry their ``sub-``/``ses-`` prefix; ``methods`` defaults to the App's
    (``None``), ``outputs`` to all of :data:`~qsmprep.config.OUTPUTS`. ``nprocs`` defaults
    to the plugin configuration's ``n_procs`` or else to :func:`default_nprocs`,
    ``omp_nthreads`` to :func:`default_omp_nthreads`; without ``omp_nthreads`` the
    long-running inversions share the cores (``long_nthreads`` None,
    :func:`qsmprep.threads.share_cores`), with it they run that many threads too.

    Raises
    ------
    UsageError
        A folder that is missing or misplaced, an unknown method, a deep-learning method
        without a trained model, an unreadable file, fewer than one process or thread;
        :class:`ValueError` from :class:`~qsmprep.config.Settings` for invalid values.
    """
    bids_dir = Path(bids_dir).absolute()
    out = Path(output_dir).absolute()
    methods = list(_default("methods") if methods is None else methods)
    if not bids_dir.is_dir():
        raise UsageError(f"bids_dir {bids_dir} is not a folder; give the root of a BIDS dataset")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UsageError(
                f"output_dir {out} cannot be created: {p} is a file, not a folder; give a folder"
                " path (it is created if missing)"
            )
    if analysis_level == "participant":
        inside = out == bids_dir or bids_dir in out.parents
        if inside and (bids_dir / "derivatives") not in [out, *out.parents]:
            raise UsageError(
                f"output_dir {out} is inside the input dataset {bids_dir}; write outputs outside"
                f" it or under {bids_dir / 'derivatives'}"
            )
    if "chi" not in (outputs or OUTPUTS):
        raise UsageError(
            "--outputs must include chi: the susceptibility maps are always computed, the other"
            " outputs come from the same chain (e.g. --outputs chi r2star)"
        )
    available = list(names("inversion", kind=("classical", "dl")))
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; available: {available}")
    params = load_method_params(config) if config else {}
    _check_weights(methods, params)
    filters = (
        _read_json_or_yaml(bids_filter_file, "--bids-filter-file") if bids_filter_file else None
    )
    plugin_args = {}
    if plugin_config:
        cfg = _read_json_or_yaml(plugin_config, "--plugin-config")
        plugin = cfg.get("plugin", plugin)
        plugin_args = dict(cfg.get("plugin_args", {}))
    if nprocs is None:
        nprocs = int(plugin_args.get("n_procs", 0)) if plugin == "MultiProc" else 0
        nprocs = nprocs or default_nprocs()
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", nprocs)
        nprocs = int(plugin_args["n_procs"])  # the plugin configuration file has the last word
        if mem_gb:
            plugin_args.setdefault("memory_gb", mem_gb)
    # --omp-nthreads given: every CPU-heavy node runs that many threads, the long ones too
    threads_given = omp_nthreads is not None
    if omp_nthreads is None:
        omp_nthreads = default_omp_nthreads(nprocs)
    if int(dl_adapt_steps) < 1:
        raise UsageError(f"--dl-adapt-steps must be at least 1, got {dl_adapt_steps}")
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
        analysis_level=analysis_level,
        work_dir=work_dir,
        participant_label=_labels(participant_label),
        session_label=[s[4:] if s.startswith("ses-") else s for s in session_label]
        if session_label
        else None,
        bids_filters=filters,
        nprocs=nprocs,
        omp_nthreads=omp_nthreads,
        long_nthreads=omp_nthreads if threads_given else None,
        mem_gb=mem_gb,
        device=device,
        methods=list(dict.fromkeys(methods)),
        outputs=list(dict.fromkeys(outputs or OUTPUTS)),
        bg_method=bg_method,
        unwrap=unwrap,
        mask_method=_mask_method(mask_method, mask_dir),
        reference=reference,
        b0=b0,
        phase_sign=phase_sign,
        method_params=params,
        plugin=plugin,
        plugin_args=plugin_args,
        output_spaces=list(output_spaces or []),
        reference_region=reference_region,
        skip_bids_validation=bool(skip_bids_validation),
        resource_monitor=bool(resource_monitor),
        mask_dir=_existing_dir(mask_dir, "--mask-dir"),
        field_dir=_existing_dir(field_dir, "--field-dir"),
        dl_adapt=bool(dl_adapt),
        dl_adapt_steps=int(dl_adapt_steps),
    )
