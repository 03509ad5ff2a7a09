"""One typed settings object: built by the CLI, passed down explicitly, saved with the outputs.

Method parameters come from a JSON (or TOML) config file keyed by stage or method name, for
example::

    {"resharp": {"radius": 5.0}, "tv": {"lam": 5e-4}, "medi": {"max_iter": 8}}

Every key must name a known stage/method and its values are passed as keyword arguments to the
corresponding function in :mod:`qsmprep.recon`; unknown names are rejected so that a typo does
not silently fall back to a default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qsmprep import methods as _methods
from qsmprep.__about__ import __version__

LOGGER = logging.getLogger("qsmprep")

__all__ = [
    "ALL_METHODS",
    "BG_METHODS",
    "CLASSICAL_METHODS",
    "DEFAULT_BG_METHOD",
    "DL_METHODS",
    "OUTPUTS",
    "PARAM_SECTIONS",
    "STAGE_SECTIONS",
    "Settings",
    "load_method_params",
    "param_sections",
]

STAGE_SECTIONS = (
    *_methods.SECTIONS.values(),
    *("reliability", "cosmos", "space", "r2star", "swi", "smwi"),
)
"""``--config`` sections of stages: those of the mask and unwrapping methods
(:data:`qsmprep.methods.SECTIONS`) and of the other stages; the sections of the background and
inversion methods are their names."""


def param_sections() -> tuple[str, ...]:
    """The sections a ``--config`` file may have: every selectable inversion method, every
    background method (as registered now, :mod:`qsmprep.methods`) and the stages."""
    selectable = _methods.names("inversion", kind=("classical", "dl"))
    return (*selectable, *_methods.names("background"), *STAGE_SECTIONS)


# The method tables, read from the registry (qsmprep.methods) when this module is imported;
# code that must see methods registered later calls qsmprep.methods itself.
CLASSICAL_METHODS = _methods.names("inversion", kind="classical")
DL_METHODS = _methods.names("inversion", kind="dl")
ALL_METHODS = _methods.names("inversion", kind=("classical", "dl"))
"""Choices of ``--methods``: the classical and deep-learning inversions."""
BG_METHODS = _methods.names("background")
"""Choices of ``--bg-method``."""
DEFAULT_BG_METHOD = _methods.defaults("background")[0]
PARAM_SECTIONS = param_sections()

OUTPUTS = ("chi", "r2star", "swi")
"""Choices of ``--outputs``: susceptibility maps (always made), R2*/T2*/S0 maps (two or more
echoes), susceptibility-weighted images (SWI and its minIP; with ``chi``, SMWI)."""


def load_method_params(path: str | Path) -> dict[str, dict]:
    """Read per-method parameters from a JSON or TOML file and validate the section names."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist; give a JSON or TOML file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear message
        raise ValueError(f"config file {p} could not be parsed: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"config file {p} must map section names to parameter tables, e.g."
            ' {"tv": {"lam": 0.0005}}'
        )
    sections = param_sections()
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ValueError(
            f"config file {p} has unknown section(s) {unknown}; known: {list(sections)}"
        )
    return data


DEFAULT_ADAPT_STEPS = 300
"""Optimiser steps of each ``--dl-adapt`` adaptation (:mod:`qsmprep.app.adapt`)."""


@dataclass
class Settings:
    """Everything a run needs; :meth:`to_dict` is written to ``qsmprep_settings.json``."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    work_dir: Path | None = None
    participant_label: list[str] | None = None
    session_label: list[str] | None = None
    bids_filters: dict | None = None
    nprocs: int = 1
    omp_nthreads: int = 1
    # threads of each long-running inversion node (Method.long_running); None: the cores
    # shared among those of a participant (qsmprep.threads.share_cores); --omp-nthreads sets it
    long_nthreads: int | None = None
    mem_gb: float | None = None
    device: str = "auto"
    methods: list[str] = field(default_factory=lambda: list(_methods.defaults("inversion")))
    bg_method: str = field(default_factory=lambda: _methods.defaults("background")[0])
    unwrap: str = "auto"
    mask_method: str = field(default_factory=lambda: _methods.defaults("mask")[0])
    reference: Path | None = None
    b0: float | None = None
    phase_sign: int = 1
    method_params: dict[str, dict] = field(default_factory=dict)
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    # template space (qsmprep.space): ``Template[:res-n]`` entries, chi reference region
    output_spaces: list[str] = field(default_factory=list)
    reference_region: str = "mask"
    # maps to make besides chi (OUTPUTS); R2* needs two or more echoes
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    # run the official BIDS validator on the input first (--skip-bids-validation turns it off)
    skip_bids_validation: bool = False
    # Nipype's resource monitor: peak memory and CPU use of every node in its result file
    resource_monitor: bool = False
    # precomputed inputs (qsmprep.provided): brain masks and total fields (Hz) of derivative
    # datasets, used instead of computing them
    mask_dir: Path | None = None
    field_dir: Path | None = None
    # adapt the adaptable networks (qsmprep.app.adapt) to the selected acquisitions first
    dl_adapt: bool = False
    dl_adapt_steps: int = DEFAULT_ADAPT_STEPS
    version: str = __version__

    def __post_init__(self):
        self.bids_dir = Path(self.bids_dir).absolute()
        self.output_dir = Path(self.output_dir).absolute()
        if self.work_dir is None:
            self.work_dir = self.output_dir.parent / "qsmprep_work"
        self.work_dir = Path(self.work_dir).absolute()
        if self.reference is not None:
            self.reference = Path(self.reference).absolute()
        for key in ("mask_dir", "field_dir"):
            if getattr(self, key) is not None:
                setattr(self, key, Path(getattr(self, key)).absolute())
        bad = [m for m in self.methods if not m.isalnum()]
        if bad:
            raise ValueError(
                f"method names must be alphanumeric (they become desc- labels): {bad}"
            )
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"unknown output(s) {unknown}; choose from {list(OUTPUTS)}")
        if "chi" not in self.outputs:
            raise ValueError(
                "the susceptibility maps (chi) are always computed: the other outputs build on"
                f" the same chain; give 'chi' among the outputs, e.g. chi {' '.join(self.outputs)}"
            )
        self.outputs = [o for o in OUTPUTS if o in self.outputs]
        if int(self.dl_adapt_steps) < 1:
            raise ValueError(f"dl_adapt_steps must be at least 1, got {self.dl_adapt_steps!r}")
        if self.phase_sign not in (1, -1):
            raise ValueError(f"phase_sign must be 1 or -1, got {self.phase_sign!r}")
        from qsmprep.output_spaces import parse_output_spaces

        self.output_spaces = [s.spec for s in parse_output_spaces(self.output_spaces)]
        if self.reference_region not in ("mask", "csf"):
            raise ValueError(
                f"reference_region must be 'mask' or 'csf', got {self.reference_region!r}"
            )

    def params(self, section: str) -> dict:
        """Keyword arguments of a stage or method from the config file (a copy)."""
        return dict(self.method_params.get(section, {}))

    @property
    def use_gpu(self) -> bool:
        """Whether inversion nodes are GPU work for the scheduler
        (:func:`qsmprep.devices.gpu_work`)."""
        from qsmprep.devices import gpu_work

        return gpu_work(self.device)

    @property
    def compute_device(self) -> str:
        """The device string handed to the numerics (``"cpu"`` or ``"cuda"``)."""
        return "cuda" if self.use_gpu else "cpu"

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in fields(self):
            v = d[f.name]
            if isinstance(v, Path):
                d[f.name] = str(v)
        return d

    def write(self, path: str | Path, *, merge: bool = True) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (temporary file + rename).

        With ``merge`` (the default) an existing file is updated under an exclusive lock
        (``.<name>.lock`` next to it), so array jobs that each process some participants into
        one output folder leave one valid record of all of them: ``participant_label`` and
        ``session_label`` become the union of the file's and this run's (``null``, all
        participants, absorbs any list). Other differences from the file (methods,
        parameters; not how the run executed, e.g. its work folder or process count) are
        logged as a warning, and this run's values are kept.
        """
        from qsmprep._atomic import locked, write_text

        p = Path(path)
        data = json.loads(json.dumps(self.to_dict()))
        if not merge:
            write_text(p, json.dumps(data, indent=2, sort_keys=True))
            return p
        with locked(p.with_name(f".{p.name}.lock")):
            old = _read_record(p)
            if old is not None:
                for key in _SELECTION_FIELDS:
                    data[key] = _union(old.get(key), data[key])
                skip = (*_SELECTION_FIELDS, *_EXECUTION_FIELDS)
                changed = sorted(
                    k for k in data if k not in skip and k in old and old[k] != data[k]
                )
                if changed:
                    LOGGER.warning(
                        "%s: this run's settings differ from those recorded by an earlier run "
                        "into the same output folder (%s); the file now holds this run's",
                        p,
                        ", ".join(changed),
                    )
            write_text(p, json.dumps(data, indent=2, sort_keys=True))
        return p


_SELECTION_FIELDS = ("participant_label", "session_label")
"""Settings that select data: merged (union) in ``qsmprep_settings.json``."""
_EXECUTION_FIELDS = (
    "work_dir",
    "nprocs",
    "omp_nthreads",
    "long_nthreads",
    "mem_gb",
    "plugin",
    "plugin_args",
    "version",
)
"""Settings that say how a run executed: may differ between array tasks without a warning."""


def _read_record(path: Path) -> dict | None:
    """The JSON object in ``path``; None when missing or unreadable (then it is rewritten)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        LOGGER.warning("%s is not valid JSON (%s); it is rewritten", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _union(a, b):
    """Union of two label selections; None (everything) absorbs."""
    if a is None or b is None:
        return None
    return sorted({*a, *b})
