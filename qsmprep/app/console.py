"""What the BIDS App shows on the console, and the full log it keeps in ``<output_dir>/logs/``.

By default the console (stderr) shows qsmprep's own messages (the start of each subject, a line
per acquisition and stage as the stage finishes) and every other logger's warnings and errors;
``-v`` shows every logger at INFO (Nipype's node-by-node messages), ``-vv`` at DEBUG. The full
log, Nipype's ``workflow``, ``interface`` and ``utils`` loggers and qsmprep's at INFO, goes to
``<output_dir>/logs/qsmprep_<date>-<time>.log`` (:func:`log_file`), beside Nipype's crash
files.

Nipype adds its own stdout handler to the ``nipype`` logger when it is imported, which printed
each of its lines a second time once the root logger had a handler too; :func:`quiet_nipype`
removes it, so that every record reaches the console once, through the handler installed here.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["StageProgress", "console", "log_file", "quiet_nipype"]

LOGGER = logging.getLogger("qsmprep")
PROGRESS = "qsmprep.progress"
_MARK = "_qsmprep_handler"
_VERBOSE_FMT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_FILE_FMT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "qsmprep" or record.name.startswith("qsmprep.")


class _QuietFilter(logging.Filter):
    """qsmprep's messages at INFO and above, the other loggers' warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _ours(record)


class _QuietFormatter(logging.Formatter):
    """qsmprep's informative and progress lines as they are; the others prefixed by level and
    logger. Nipype's messages keep their first line: its tracebacks are in the crash files and
    in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name.startswith("nipype"):
            first, _, rest = message.partition("\n")
            return f"{record.name}: {record.levelname.lower()}: {first}" + (
                " (traceback in the crash file and the log)" if rest.strip() else ""
            )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if _ours(record) and (record.levelno < logging.WARNING or record.name == PROGRESS):
            return message
        who = "qsmprep" if _ours(record) else record.name
        return f"{who}: {record.levelname.lower()}: {message}"


@contextmanager
def console(verbose: int = 0) -> Iterator[logging.Handler]:
    """Route log records to stderr for one command; restore the previous handlers after it.

    The root logger's console handlers, those of an enclosing call (``qsmprep demo`` runs the
    participant level inside itself) and plain stream handlers (``logging.basicConfig``'s, as
    ``qsmprep-train`` installs), are set aside meanwhile, so that no record is printed twice;
    other handlers (files, pytest's capture) stay.
    """
    root = logging.getLogger()
    outer = [
        h for h in root.handlers if getattr(h, _MARK, False) or type(h) is logging.StreamHandler
    ]
    for h in outer:
        root.removeHandler(h)
    old_level = root.level
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _MARK, True)
    handler.setLevel(level)
    if verbose:
        handler.setFormatter(logging.Formatter(_VERBOSE_FMT))
    else:
        handler.addFilter(_QuietFilter())
        handler.setFormatter(_QuietFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for h in outer:
            root.addHandler(h)
        root.setLevel(old_level)


@contextmanager
def log_file(logs_dir: Path, level: int = logging.INFO) -> Iterator[Path]:
    """Write every record at ``level`` and above to a new file of ``logs_dir`` meanwhile.

    Nipype's MultiProc workers are forked from this process and inherit the handler: their
    node messages land in the same file (appended line by line).
    """
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / f"qsmprep_{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(_FILE_FMT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


def quiet_nipype() -> None:
    """Remove the stdout handler Nipype gives its logger, so that its records reach the console
    once, through the root logger's handlers (its file handler, if configured, stays)."""
    import nipype  # noqa: F401 - importing it installs the handler

    logger = logging.getLogger("nipype")
    for h in list(logger.handlers):
        if type(h) is logging.StreamHandler and not getattr(h, _MARK, False):
            logger.removeHandler(h)


# --- progress ---------------------------------------------------------------------------------

_STAGE_NAMES = {"qsm_derivatives": "outputs", "merge": "cosmos"}


def _leaf_nodes(workflow, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(full name, node) of every node that Nipype will run: Identity nodes are dropped when it
    flattens the graph."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    prefix = f"{prefix}{workflow.name}."
    for node in workflow._graph.nodes():
        if isinstance(node, pe.Workflow):
            yield from _leaf_nodes(node, prefix)
        elif not (isinstance(node.interface, IdentityInterface) and not node.iterables):
            yield prefix + node.name, node


class StageProgress:
    """Nipype status callback: one console line per acquisition and stage as the stage ends.

    Pass it as ``plugin_args={"status_callback": progress}``; Nipype calls it with
    ``(node, "start" | "end" | "exception")`` from its scheduler (Linear, MultiProc and the
    batch plugins; not the ``*Graph`` ones). A stage is a sub-workflow of an acquisition's
    workflow (``field``, ``inversion``, ``metrics``, ``outputs``) or one of the participant's
    (``cosmos``, ``space``); it is reported when its last node ends, or as failed when a node
    of it raises. :meth:`finish` reports what is left (stages cut short by a failure).

    Parameters
    ----------
    workflow : nipype Workflow
        The participant workflow, before it runs.
    names : iterable of str
        Display names (acquisition prefixes, ``sub-X[_ses-Y]``); Nipype's node labels of them
        (``-`` turned into ``_``) are recognised in the sub-workflow names.
    linear : bool
        The Linear plugin: it starts every node it runs, and ends without a start the nodes it
        skips after a failure (MultiProc ends cached and in-process nodes without a start).
    """

    def __init__(
        self,
        workflow,
        names: Iterable[str],
        *,
        linear: bool = False,
        logger: logging.Logger | None = None,
    ):
        self.linear = linear
        self.logger = logger or logging.getLogger(PROGRESS)
        self._names = {re.sub(r"[^A-Za-z0-9_]", "_", n): n for n in names}
        self._total: Counter = Counter()
        for fullname, _ in _leaf_nodes(workflow):
            self._total[self.stage_of(fullname)] += 1
        self._ended: Counter = Counter()
        self._skipped: Counter = Counter()
        self._first: dict = {}
        self._started: dict = {}
        self._times: dict = {}
        self._failed: dict = {}
        self._reported: set = set()
        self.width = max((len(w) for w, _ in self._total), default=0)

    def stage_of(self, fullname: str) -> tuple[str, str]:
        """(who, stage) of a node's full name ``participant_wf.sub_wf[.stage_wf...].node``."""
        parts = fullname.split(".")
        if len(parts) < 2:
            return "", parts[-1]
        sub = parts[1]
        if sub.startswith("qsm_") and len(parts) > 3:
            stage = parts[2].removesuffix("_wf")
        else:
            stage = sub.split("_")[0]
        label = sub.removesuffix("_wf")
        for p in ("qsm_", "space_", "metrics_", "cosmos_", "merge_fields_", "merge_masks_"):
            if label.startswith(p):
                label = label[len(p) :]
                break
        return self._names.get(label, label), _STAGE_NAMES.get(stage, stage)

    def __call__(self, node, status: str) -> None:
        try:
            self._update(node, status)
        except Exception:  # noqa: BLE001 - a display problem never stops the run
            self.logger.debug("progress display failed", exc_info=True)

    def _update(self, node, status: str) -> None:
        now = time.perf_counter()
        key = self.stage_of(node.fullname)
        self._first.setdefault(key, now)
        if status == "start":
            self._started[node.fullname] = now
            return
        self._ended[key] += 1
        if node.fullname in self._started:
            self._times.setdefault(key, []).append(
                (node.name, now - self._started.pop(node.fullname))
            )
        elif self.linear and status == "end":
            self._skipped[key] += 1
        if status == "exception":
            self._failed.setdefault(key, []).append(node.name)
            self._report(key, now)
        elif self._ended[key] >= self._total.get(key, 0):
            self._report(key, now)

    def _report(self, key, now: float) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        who, stage = key
        elapsed = now - self._first[key]
        head = f"{who:<{self.width}}  {stage:<10}"
        if key in self._failed:
            self.logger.error("%s FAILED  %.1f s  (node %s)", head, elapsed, self._failed[key][0])
            return
        ran = self._ended[key] - self._skipped[key]
        if ran < self._total.get(key, 0):
            self.logger.info(
                "%s stopped  %.1f s  (%d of %d nodes ran)", head, elapsed, ran, self._total[key]
            )
            return
        detail = ""
        methods = [
            (n.removeprefix("inversion_"), t)
            for n, t in self._times.get(key, [])
            if n.startswith("inversion_")
        ]
        if stage == "inversion" and methods:
            detail = "  (" + ", ".join(f"{m} {t:.1f} s" for m, t in methods) + ")"
        self.logger.info("%s done  %6.1f s%s", head, elapsed, detail)

    def finish(self) -> None:
        """Report the stages that began but did not end (a failure elsewhere stopped them)."""
        now = time.perf_counter()
        for key in list(self._first):
            self._report(key, now)
