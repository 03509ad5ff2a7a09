"""The official BIDS validator (``bids-validator-deno``) as qsmprep's first step.

:func:`run_validator` runs the validator's command line on a dataset and parses its JSON
report; :func:`split_errors` sorts the errors into those of the whole dataset and those of
each participant, so that the App can refuse a broken dataset, skip a broken participant and
process the others. Warnings never stop a run; they are counted and kept with the report.

:func:`write_bidsignore` writes the ``.bidsignore`` of qsmprep's derivative dataset: the files
that the BIDS specification has no name for yet (reports, figures, metrics tables, field maps
in ``anat``, logs, settings), so that the validator checks everything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qsmprep import _atomic as atomic

__all__ = [
    "VALIDATOR",
    "ValidationIssue",
    "ValidationReport",
    "ValidatorUnavailable",
    "find_validator",
    "run_validator",
    "split_errors",
    "write_bidsignore",
]

VALIDATOR = "bids-validator-deno"
"""Command of the official BIDS validator (PyPI package ``bids-validator-deno``)."""

_SUBJECT = re.compile(r"^/?sub-([A-Za-z0-9]+)(/|$)")


class ValidatorUnavailable(RuntimeError):
    """The validator is not installed, or did not produce a report."""


@dataclass(frozen=True)
class ValidationIssue:
    """One issue of the validator's report.

    Attributes
    ----------
    severity : str
        ``"error"`` or ``"warning"``.
    code : str
        Validator code, e.g. ``"SIDECAR_KEY_REQUIRED"`` (``subCode`` appended after a colon).
    location : str or None
        Dataset-relative path (``/sub-01/anat/...``), None for the dataset as a whole.
    message : str
        What is wrong, first line of the validator's explanation.
    """

    severity: str
    code: str
    location: str | None
    message: str

    @property
    def subject(self) -> str | None:
        """Participant label the issue belongs to, None when it is dataset-wide."""
        m = _SUBJECT.match(self.location or "")
        return m.group(1) if m else None

    def __str__(self) -> str:
        where = (self.location or "dataset").lstrip("/")
        return f"{where}: {self.code}" + (f" ({self.message})" if self.message else "")


@dataclass
class ValidationReport:
    """The parsed report of one validator run."""

    dataset: Path
    issues: list[ValidationIssue] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def errors(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ValidationIssue]:
        return [i for i in self.issues if i.severity == "warning"]


def find_validator() -> str | None:
    """Path of the validator: next to this Python (its virtual environment), else on PATH."""
    here = Path(sys.executable).parent / VALIDATOR
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(VALIDATOR)


def _first_line(text) -> str:
    """First sentence of the first line of ``text`` ("" for none)."""
    text = str(text or "").strip()
    if not text:
        return ""
    line = text.splitlines()[0].strip()
    return line.split(". ")[0].rstrip(".")


def run_validator(dataset, *, executable: str | None = None, timeout: float = 600.0):
    """Validate ``dataset`` with the official BIDS validator.

    Parameters
    ----------
    dataset : path
        Root of a BIDS dataset (raw or derivative).
    executable : str, optional
        Validator command (default :func:`find_validator`).
    timeout : float
        Seconds before giving up.

    Returns
    -------
    ValidationReport

    Raises
    ------
    ValidatorUnavailable
        When the validator is missing, times out or writes no JSON report.
    """
    exe = executable or find_validator()
    if exe is None:
        raise ValidatorUnavailable(f"{VALIDATOR} is not installed (pip install {VALIDATOR})")
    dataset = Path(dataset)
    cmd = [exe, str(dataset), "--format", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValidatorUnavailable(f"{VALIDATOR} could not run: {exc}") from exc
    try:
        raw = json.loads(proc.stdout)
        found = raw["issues"]["issues"]
        messages = raw["issues"].get("codeMessages", {})
    except (ValueError, KeyError, TypeError) as exc:
        tail = _first_line(proc.stderr) or _first_line(proc.stdout) or f"exit {proc.returncode}"
        raise ValidatorUnavailable(f"{VALIDATOR} wrote no report: {tail}") from exc
    issues = []
    for i in found:
        code = str(i.get("code", "UNKNOWN"))
        if i.get("subCode"):
            code += f":{i['subCode']}"
        text = i.get("issueMessage") or messages.get(i.get("code"), "")
        issues.append(
            ValidationIssue(
                severity=str(i.get("severity", "error")),
                code=code,
                location=i.get("location"),
                message=_first_line(text),
            )
        )
    return ValidationReport(dataset=dataset, issues=issues, raw=raw)


def split_errors(
    report: ValidationReport, participants=None
) -> tuple[list[ValidationIssue], dict[str, list[ValidationIssue]]]:
    """Errors of the dataset as a whole, and per selected participant.

    Parameters
    ----------
    report : ValidationReport
    participants : list of str, optional
        Labels (without ``sub-``) being processed; errors of the other participants are
        left out. Default: every participant.

    Returns
    -------
    (dataset_errors, {label: errors})
    """
    wanted = set(participants) if participants else None
    dataset: list[ValidationIssue] = []
    per: dict[str, list[ValidationIssue]] = {}
    for issue in report.errors:
        sub = issue.subject
        if sub is None:
            dataset.append(issue)
        elif wanted is None or sub in wanted:
            per.setdefault(sub, []).append(issue)
    return dataset, per


BIDSIGNORE = """\
# Written by qsmprep: outputs that the BIDS specification has no name for yet.
logs
models
*.html
qsmprep_settings.json
group_*
figures
*_metrics.tsv
*_metrics.json
*_fieldmap.nii.gz
*_fieldmap.json
"""


def write_bidsignore(output_dir) -> Path:
    """Write (atomically) the derivative dataset's ``.bidsignore``; see the module doc."""
    path = Path(output_dir) / ".bidsignore"
    if path.is_file() and path.read_text() == BIDSIGNORE:
        return path
    return atomic.write_text(path, BIDSIGNORE)
