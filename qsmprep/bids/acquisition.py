"""The acquisition record, the input error and the BIDS entity labels of qsmprep.

An :class:`Acquisition` is what discovery (:func:`qsmprep.bids.discovery.collect_acquisitions`)
returns and every workflow reads: the per-echo magnitude and phase files with their echo times,
field strength, phase units, grid and B0 direction. Bad input ends in :class:`BIDSInputError`
(a ``ValueError``) whose message names the file and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["LABEL", "SUFFIXES", "Acquisition", "BIDSInputError", "entity_prefix"]

SUFFIXES = ("MEGRE", "T2starw")
"""BIDS suffixes qsmprep reads (``anat`` datatype, ``part-mag`` / ``part-phase``)."""

LABEL = re.compile(r"[A-Za-z0-9]+")
"""A BIDS label (the value of ``sub-``, ``ses-``, ``acq-``, ``desc-``, ...): alphanumeric."""


class BIDSInputError(ValueError):
    """Invalid BIDS input; the message names the file (or label) and the fix.

    Attributes
    ----------
    path : Path or None
        The offending file, when there is one.
    acquisition : str or None
        :attr:`Acquisition.id` of the acquisition the error belongs to, when known.
    """

    def __init__(self, message: str, *, path=None, acquisition: str | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.acquisition = acquisition


@dataclass(eq=False)
class Acquisition:
    """One gradient-echo acquisition: magnitude + phase per echo, with what the chain needs.

    Attributes
    ----------
    subject, session, acq, run, rec : str or None
        BIDS labels (without the ``sub-`` / ``ses-`` / ... prefixes); ``session``, ``acq``,
        ``run``, ``rec`` are None when absent. ``run`` keeps its zero padding.
    suffix : str
        ``"MEGRE"`` or ``"T2starw"``.
    magnitude, phase : list of Path
        One image per echo, sorted by echo time (absolute paths).
    echo_times : list of float
        s, strictly increasing.
    b0 : float
        Field strength, T (sidecar ``MagneticFieldStrength`` or the override).
    phase_units : str
        ``"rad"``, ``"deg"`` or ``"integer"`` (:func:`detect_phase_units`; pass to
        :func:`load_phase`).
    shape : tuple of int
        3D grid.
    voxel_size : tuple of float
        mm.
    affine : ndarray
        4x4 voxel-to-world affine of the first phase echo.
    b0_dir : tuple of float
        Unit B0 direction in voxel coordinates, from the affine.
    root : Path or None
        BIDS dataset root (for :attr:`sources`).
    metadata : dict
        Sidecar metadata of the first phase echo (inheritance applied).
    b0_source : str
        ``"MagneticFieldStrength"`` or ``"override"``.
    phase_units_source : str
        ``"sidecar"`` (``Units``) or ``"detected"`` (value range).
    notes : list of str
        What discovery recovered or converted on the way (an ``EchoTime`` taken from the
        magnitude's sidecar, phase in degrees, non-finite or negative values set to 0); logged
        at discovery and written to every output sidecar as ``InputNotes``.
    provided_mask, provided_field : Path or None
        A brain mask and a total field (Hz) the user provides (``--mask-dir``,
        ``--field-dir``; found and checked by :func:`qsmprep.provided.attach_provided`):
        the chain uses them instead of computing them.
    """

    subject: str
    session: str | None
    acq: str | None
    run: str | None
    rec: str | None
    suffix: str
    magnitude: list[Path]
    phase: list[Path]
    echo_times: list[float]
    b0: float
    phase_units: str
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    b0_dir: tuple[float, float, float]
    root: Path | None = None
    metadata: dict = field(default_factory=dict, repr=False)
    b0_source: str = "MagneticFieldStrength"
    phase_units_source: str = "sidecar"
    notes: list[str] = field(default_factory=list)
    provided_mask: Path | None = None
    provided_field: Path | None = None

    @property
    def prefix(self) -> str:
        """``sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]``."""
        return entity_prefix(self.subject, self.session, self.acq, self.rec, self.run)

    @property
    def id(self) -> str:
        """Unique key of the acquisition (same as :attr:`prefix`)."""
        return self.prefix

    @property
    def n_echoes(self) -> int:
        """Number of echoes."""
        return len(self.echo_times)

    @property
    def sources(self) -> list[str]:
        """Input files as BIDS-relative POSIX paths (absolute when :attr:`root` is unknown)."""
        out = []
        for p in [*self.magnitude, *self.phase]:
            try:
                out.append(p.relative_to(self.root).as_posix() if self.root else str(p))
            except ValueError:
                out.append(str(p))
        return out

    def entities(self) -> dict:
        """BIDS entities (pybids names) of the acquisition, None where absent."""
        return {
            "subject": self.subject,
            "session": self.session,
            "acquisition": self.acq,
            "reconstruction": self.rec,
            "run": self.run,
        }

    def to_dict(self) -> dict:
        """JSON-able form (paths as strings, affine as nested lists); see :meth:`from_dict`."""
        return {
            "subject": self.subject,
            "session": self.session,
            "acq": self.acq,
            "run": self.run,
            "rec": self.rec,
            "suffix": self.suffix,
            "magnitude": [str(p) for p in self.magnitude],
            "phase": [str(p) for p in self.phase],
            "echo_times": [float(t) for t in self.echo_times],
            "b0": float(self.b0),
            "phase_units": self.phase_units,
            "shape": [int(n) for n in self.shape],
            "voxel_size": [float(v) for v in self.voxel_size],
            "affine": np.asarray(self.affine, float).tolist(),
            "b0_dir": [float(v) for v in self.b0_dir],
            "root": str(self.root) if self.root is not None else None,
            "metadata": self.metadata,
            "b0_source": self.b0_source,
            "phase_units_source": self.phase_units_source,
            "notes": list(self.notes),
            "provided_mask": str(self.provided_mask) if self.provided_mask else None,
            "provided_field": str(self.provided_field) if self.provided_field else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Acquisition:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["magnitude"] = [Path(p) for p in d["magnitude"]]
        d["phase"] = [Path(p) for p in d["phase"]]
        d["echo_times"] = [float(t) for t in d["echo_times"]]
        d["shape"] = tuple(int(n) for n in d["shape"])
        d["voxel_size"] = tuple(float(v) for v in d["voxel_size"])
        d["affine"] = np.asarray(d["affine"], dtype=float)
        d["b0_dir"] = tuple(float(v) for v in d["b0_dir"])
        d["root"] = Path(d["root"]) if d.get("root") is not None else None
        for key in ("provided_mask", "provided_field"):
            d[key] = Path(d[key]) if d.get(key) is not None else None
        return cls(**d)


def entity_prefix(subject, session=None, acq=None, rec=None, run=None) -> str:
    """``sub-<label>[_ses-<label>][_acq-<label>][_rec-<label>][_run-<index>]`` (labels
    without their prefixes; None where absent)."""
    parts = [f"sub-{subject}"]
    for key, val in (("ses", session), ("acq", acq), ("rec", rec), ("run", run)):
        if val is not None:
            parts.append(f"{key}-{val}")
    return "_".join(parts)
