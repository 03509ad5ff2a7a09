"""Safe writes into the output dataset: atomic files, clear disk-full errors, a shared lock.

Every file qsmprep publishes is first written in full under a hidden temporary name in its
target folder (``.<name>.<random>.tmp``), flushed to disk, and then renamed onto its final
name with :func:`os.replace`. Readers, a rerun after a crash and concurrent array jobs see
either the previous file or the complete new one, never a part of it. A failed write removes
its temporary file; one left behind by a killed process is removed by
:func:`remove_stale_temporaries` when that participant is processed again.

A full disk or an exceeded quota (``ENOSPC``, ``EDQUOT``; on network filesystems often only
reported when the file is flushed or closed) raises :class:`DiskFullError` naming the file.

Files shared by several participants (``qsmprep_settings.json``) are read, merged and
rewritten under :func:`locked`, an exclusive ``fcntl.flock`` on a lock file next to them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "AlreadyRunning",
    "DiskFullError",
    "exclusive",
    "copy_file",
    "locked",
    "remove_stale_temporaries",
    "write_bytes",
    "write_text",
]

LOGGER = logging.getLogger("qsmprep")
TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20
_FULL = {errno.ENOSPC, errno.EDQUOT}
# the one place file contents are written (the tests replace it to simulate a full disk)
_write = os.write


class DiskFullError(OSError):
    """The disk (or the user's quota) is full; the message names the file that failed."""


def _fail(exc: OSError, target: Path) -> OSError:
    if exc.errno in _FULL:
        return DiskFullError(
            exc.errno,
            f"cannot write {target}: the disk is full ({os.strerror(exc.errno)}); nothing was "
            f"written under that name. Free space or raise the quota on {target.parent}, then "
            "run the same command again (finished steps are reused)",
        )
    why = exc.strerror or str(exc)
    return OSError(exc.errno, f"cannot write {target}: {why}")


def _stage(target: Path, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to a new temporary file next to ``target``; return its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[_write(fd, view) :]
            os.fsync(fd)  # network filesystems report a full quota here or at close
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; derivatives are shared
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, DiskFullError):
            raise _fail(exc, target) from exc
        raise
    return tmp


def _read_chunks(src) -> Iterator[bytes]:
    with open(src, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def _gzip_chunks(src, level: int = 1) -> Iterator[bytes]:
    """``src`` as a gzip stream without a time stamp or name (equal data, equal bytes)."""
    z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container, mtime 0
    for chunk in _read_chunks(src):
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def _commit(tmp: str, target: Path) -> Path:
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return target


def stage_copy(src, target) -> str:
    """Copy ``src`` to a temporary file next to ``target`` (commit it with :func:`commit`)."""
    return _stage(Path(target), _read_chunks(src))


def stage_gzip(src, target) -> str:
    """Stage a gzip-compressed copy of ``src`` (e.g. ``.nii`` to ``.nii.gz``) for ``target``."""
    target = Path(target)
    return _stage(target, _gzip_chunks(src))


def stage_text(text: str, target) -> str:
    """Write ``text`` (UTF-8) to a temporary file next to ``target``."""
    return _stage(Path(target), [text.encode("utf-8")])


def commit(tmp: str, target) -> Path:
    """Rename a staged temporary file onto ``target`` (atomic within one filesystem)."""
    return _commit(tmp, Path(target))


def discard(*tmps) -> None:
    """Remove staged temporary files (missing ones are ignored)."""
    for tmp in tmps:
        if tmp:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_bytes(target, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (temporary file in its folder, then rename)."""
    target = Path(target)
    return _commit(_stage(target, [data]), target)


def write_text(target, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return write_bytes(target, text.encode("utf-8"))


def copy_file(src, target) -> Path:
    """Copy ``src`` to ``target`` atomically."""
    target = Path(target)
    return _commit(stage_copy(src, target), target)


class AlreadyRunning(RuntimeError):
    """Another process holds the lock of the work this one was about to do."""


@contextlib.contextmanager
def exclusive(lock_path, what: str) -> Iterator[None]:
    """Hold ``lock_path`` for ``what`` without waiting: :class:`AlreadyRunning` when another
    process holds it. Where the filesystem has no locks, a warning is logged and the block runs.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(
                f"another qsmprep run is processing {what} (it holds {lock_path}); wait for it"
                " to finish, or give this run a work directory of its own (-w)"
            ) from None
        except OSError as exc:
            LOGGER.warning("cannot lock %s (%s); running without a lock", lock_path, exc)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(lock_path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (created if missing).

    Serialises read-merge-write updates of a shared file between processes (array jobs
    writing into one output folder). Where the filesystem does not support locks (some
    cluster filesystems mounted without ``flock``) a warning is logged and the block runs
    unlocked: the write itself stays atomic, only a concurrent merge could lose an entry.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            LOGGER.warning("cannot lock %s (%s); updating it without a lock", lock_path, exc)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files (``.<name>.<random>.tmp``) a killed run left in ``folder``.

    Call it only on a folder no other running process writes into (one participant's
    outputs). Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(f".*{TMP_SUFFIX}"):
        if path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
