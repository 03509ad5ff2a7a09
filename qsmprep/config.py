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
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep.dl.weights import DL_METHODS as _DL_METHODS
from qsmprep.recon.background import DEFAULT_METHOD as DEFAULT_BG_METHOD

__all__ = [
    "ALL_METHODS",
    "BG_METHODS",
    "CLASSICAL_METHODS",
    "DEFAULT_BG_METHOD",
    "DL_METHODS",
    "PARAM_SECTIONS",
    "Settings",
    "load_method_params",
]

CLASSICAL_METHODS = ("tkd", "tsvd", "l2", "tv", "medi")
DL_METHODS = tuple(_DL_METHODS)
ALL_METHODS = (*CLASSICAL_METHODS, *DL_METHODS)
BG_METHODS = ("resharp", "vsharp", "sharp", "pdf", "lbv")
PARAM_SECTIONS = (*ALL_METHODS, *BG_METHODS, "mask", "unwrap", "reliability", "cosmos", "space")


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
    unknown = sorted(set(data) - set(PARAM_SECTIONS))
    if unknown:
        raise ValueError(
            f"config file {p} has unknown section(s) {unknown}; known: {list(PARAM_SECTIONS)}"
        )
    return data


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
    mem_gb: float | None = None
    device: str = "auto"
    methods: list[str] = field(default_factory=lambda: ["tkd", "l2", "tv", "medi"])
    bg_method: str = DEFAULT_BG_METHOD
    unwrap: str = "quality"
    mask_method: str = "magnitude"
    reference: Path | None = None
    b0: float | None = None
    phase_sign: int = 1
    method_params: dict[str, dict] = field(default_factory=dict)
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    # template space (qsmprep.space): ``Template[:res-n]`` entries, chi reference region
    output_spaces: list[str] = field(default_factory=list)
    reference_region: str = "mask"
    # run the official BIDS validator on the input first (--skip-bids-validation turns it off)
    skip_bids_validation: bool = False
    version: str = __version__

    def __post_init__(self):
        self.bids_dir = Path(self.bids_dir).absolute()
        self.output_dir = Path(self.output_dir).absolute()
        if self.work_dir is None:
            self.work_dir = self.output_dir.parent / "qsmprep_work"
        self.work_dir = Path(self.work_dir).absolute()
        if self.reference is not None:
            self.reference = Path(self.reference).absolute()
        bad = [m for m in self.methods if not m.isalnum()]
        if bad:
            raise ValueError(
                f"method names must be alphanumeric (they become desc- labels): {bad}"
            )
        if self.phase_sign not in (1, -1):
            raise ValueError(f"phase_sign must be 1 or -1, got {self.phase_sign!r}")
        from qsmprep.space.templates import parse_output_spaces

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
        """Whether inversion nodes are GPU work for the scheduler."""
        if self.device == "cuda":
            return True
        if self.device == "auto":
            try:
                import torch

                return bool(torch.cuda.is_available())
            except Exception:  # noqa: BLE001 - no torch, no GPU
                return False
        return False

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

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        # a unique temporary name: parallel array jobs may write into one output folder
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the derivative is shared
        Path(tmp).replace(p)
        return p
