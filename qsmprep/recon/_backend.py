"""Array backend shared by every k-space method: NumPy + scipy.fft on the CPU, torch elsewhere.

Numerical functions in :mod:`qsmprep.recon` take a ``device`` argument:

``"cpu"`` (default)
    NumPy arrays, FFTs with all cores (``workers=-1``) unless :func:`set_fft_workers` or
    :func:`fft_workers` say otherwise (a Nipype node sets its own thread count). The engine
    (:func:`set_fft_engine`, or ``QSMPREP_FFT_ENGINE``) is :mod:`scipy.fft` or torch's CPU FFT
    (``torch.fft`` on a zero-copy view of the array). Which is faster with one thread depends
    on the machine and the grid (``qsmprep-bench fft``: torch 1.2-1.5x faster per FFT pair on
    one machine, scipy 1.2-1.5x on another). The default, ``"auto"``, runs scipy for
    multi-threaded FFTs: torch's OpenMP pool, once used with more than one thread, does not
    survive a ``fork``, and a Nipype MultiProc worker forked from such a process (a test
    session, a pipeline embedding qsmprep) spins forever in its first multi-threaded torch
    operation (observed in the test suite), whereas a single thread never starts that pool.
    Single-threaded FFTs of grids of at least :data:`CALIBRATE_MIN_VOXELS` voxels run the
    engine that was faster on that transform in this process (:func:`fft_engine_choices`:
    both timed on the transform's call after its first :data:`CALIBRATE_AFTER`, which run
    torch, :data:`CALIBRATE_ROUNDS` times each, taking turns); smaller ones run torch.
``"torch"``
    torch tensors on the CPU. Same code path as a GPU; used to test that path anywhere.
``"cuda"``, ``"cuda:N"``, ``"mps"``
    torch tensors on that device.
``"auto"``
    ``"cuda"`` when torch sees a GPU, else ``"cpu"``.

(:func:`qsmprep.devices.resolve_device` with ``cpu="numpy"``.)

Inside a function, write the algorithm once against ``xp = namespace(x)`` (the Python array
API, through :mod:`array_api_compat`) and the FFT helpers below; convert inputs with
:func:`asarray` and outputs with :func:`to_numpy`.

Every FFT goes through :func:`rfftn`, :func:`irfftn`, :func:`fftn` or :func:`ifftn`, so that
:func:`count_ffts` can count them: the benchmark reports cost as FFT-equivalents of a grid.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from array_api_compat import array_namespace

from qsmprep.devices import resolve_device

__all__ = [
    "FFTCounter",
    "active_fft_engine",
    "asarray",
    "axpy",
    "count_ffts",
    "CALIBRATE_AFTER",
    "CALIBRATE_MIN_VOXELS",
    "CALIBRATE_ROUNDS",
    "fft_engine",
    "fft_engine_choices",
    "fft_workers",
    "fftn",
    "get_fft_engine",
    "get_fft_workers",
    "ifftn",
    "irfftn",
    "is_torch",
    "namespace",
    "rfftn",
    "set_fft_engine",
    "set_fft_workers",
    "to_numpy",
]

_AXES = (-3, -2, -1)


def is_torch(x) -> bool:
    """True when ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".")[0] == "torch"


def namespace(*arrays):
    """Array-API namespace of ``arrays`` (NumPy or torch)."""
    return array_namespace(*arrays)


def asarray(x, device: str | None = "cpu", dtype=np.float32):
    """``x`` as an array of the backend chosen by ``device`` (see the module docstring)."""
    tdev = resolve_device(device, cpu="numpy")
    if tdev is None:
        return np.asarray(to_numpy(x), dtype=dtype)
    import torch

    tdtype = {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.complex64): torch.complex64,
        np.dtype(np.complex128): torch.complex128,
        np.dtype(bool): torch.bool,
    }[np.dtype(dtype)]
    if is_torch(x):
        return x.to(device=tdev, dtype=tdtype)
    return torch.as_tensor(np.ascontiguousarray(x), dtype=tdtype, device=tdev)


def axpy(a: float, x, y):
    """``y += a x`` in place in one pass over memory (BLAS ``axpy`` for NumPy); returns ``y``.

    Falls back to ``y += a * x`` (a temporary) for other dtypes or non-contiguous ``y``.
    """
    if is_torch(y):
        return y.add_(x, alpha=a)
    if (
        y.dtype in (np.float32, np.float64)
        and x.dtype == y.dtype
        and y.flags.c_contiguous
        and x.shape == y.shape
    ):
        from scipy.linalg import blas

        f = blas.saxpy if y.dtype == np.float32 else blas.daxpy
        f(np.ascontiguousarray(x).reshape(-1), y.reshape(-1), a=a)
    else:
        y += a * x
    return y


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy array or torch tensor."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class FFTCounter:
    """Record of the FFTs run inside :func:`count_ffts`: one ``(kind, shape)`` per call.

    ``kind`` is ``"r"`` for a real-to-complex (or inverse) transform and ``"c"`` for a
    complex one.
    """

    calls: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def equivalents(self, shape: Sequence[int]) -> float:
        """Cost of the recorded calls in units of one real FFT of ``shape``.

        A transform of n points costs n log2 n; a complex transform costs twice a real one
        of the same size. A forward plus an inverse FFT of ``shape`` is 2 equivalents.
        """

        def cost(s):
            n = math.prod(s)
            return n * math.log2(max(n, 2))

        ref = cost(shape)
        return sum(cost(s) * (2.0 if kind == "c" else 1.0) / ref for kind, s in self.calls)


_ACTIVE: list[FFTCounter] = []

_WORKERS = -1


def _check_workers(n) -> int:
    if n is None:
        return -1
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not (n == -1 or n >= 1):
        raise ValueError(f"FFT workers must be a positive integer or -1 (all cores), got {n!r}")
    return int(n)


def get_fft_workers() -> int:
    """Threads of the NumPy path's FFTs: a positive count, or -1 for all cores (default)."""
    return _WORKERS


def set_fft_workers(n: int | None) -> int:
    """Set the threads of every :mod:`scipy.fft` call in qsmprep (NumPy path); return the old one.

    ``n`` is a positive count, or -1 (or None) for all cores, the default. The setting is
    process-wide (all threads). Use it where several processes share the cores, e.g. a node
    given ``n`` threads. torch devices are not affected (see ``torch.set_num_threads``).
    """
    global _WORKERS
    old, _WORKERS = _WORKERS, _check_workers(n)
    return old


@contextlib.contextmanager
def fft_workers(n: int | None) -> Iterator[None]:
    """Within the ``with`` block, FFTs use ``n`` threads (:func:`set_fft_workers`)."""
    old = set_fft_workers(n)
    try:
        yield
    finally:
        set_fft_workers(old)


@contextlib.contextmanager
def count_ffts() -> Iterator[FFTCounter]:
    """Count the FFTs that qsmprep runs inside the ``with`` block (nesting allowed)."""
    counter = FFTCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def _record(kind: str, shape) -> None:
    for c in _ACTIVE:
        c.calls.append((kind, tuple(int(n) for n in shape)))


def record_dst1(shape: Sequence[int]) -> None:
    """Count one type-I DST of ``shape`` run outside this module (e.g. :mod:`scipy.fft`): a
    real FFT of ``2 (n + 1)`` points along each axis, the transform it is computed by."""
    _record("r", tuple(2 * (int(n) + 1) for n in shape))


FFT_ENGINES = ("torch", "scipy")
"""FFT engines of the NumPy path: :mod:`scipy.fft` (pocketfft) or torch's CPU FFT."""

FFT_ENGINE_CHOICES = ("auto", *FFT_ENGINES)
"""Settings of :func:`set_fft_engine`: an engine, or ``"auto"`` (default: for FFTs with one
thread the faster engine, timed, on large grids and torch on small ones; scipy for FFTs with
more threads; see the module docstring)."""

CALIBRATE_MIN_VOXELS = 1 << 20
"""``auto``: single-threaded transforms of at least this many voxels (a 1 mm head's grids) run
the engine measured faster on them; smaller ones (a 2 mm head, training patches) run torch,
the same engine in every process, so batches made in a worker equal those made inline."""

CALIBRATE_ROUNDS = 3
"""``auto``: calls of each engine timed (taking turns) when a transform is calibrated; the
fastest call of each counts."""

CALIBRATE_AFTER = 20
"""``auto``: calls of a transform that run torch before it is calibrated. The timing costs
``2 * CALIBRATE_ROUNDS`` transforms and the faster engine saves 10-30 % of one per call, so
it pays from about 20 calls on: an iterative solver's transforms (hundreds to thousands of
calls), not the few of V-SHARP's kernels or the data-consistency check."""


def _check_engine(name) -> str:
    if name not in FFT_ENGINE_CHOICES:
        raise ValueError(
            f"FFT engine must be one of {', '.join(FFT_ENGINE_CHOICES)}, got {name!r}"
        )
    return name


_ENGINE = _check_engine(os.environ.get("QSMPREP_FFT_ENGINE", "auto") or "auto")
_TORCH_DTYPES = frozenset(
    np.dtype(t) for t in (np.float32, np.float64, np.complex64, np.complex128)
)


def get_fft_engine() -> str:
    """The FFT engine setting of NumPy arrays: ``"auto"`` (default), ``"scipy"`` or
    ``"torch"``."""
    return _ENGINE


def set_fft_engine(name: str) -> str:
    """Select the FFT engine of NumPy arrays (process-wide); return the old one.

    ``"torch"`` runs ``torch.fft`` on a zero-copy view of the array and returns a NumPy
    array (not fork-safe with more than one thread: see the module docstring); ``"scipy"``
    runs :mod:`scipy.fft`; ``"auto"`` (default) runs scipy when the FFTs have more than one
    thread (:func:`set_fft_workers`); with one thread, the engine timed faster on each large
    transform (:func:`fft_engine_choices`) and torch on small ones. Both give the same
    transform to floating-point rounding (float32: relative 1e-6), so under ``"auto"`` a
    result can differ in its last bits from run to run where the timing picks another
    engine; a fixed engine gives bit-identical results. The environment variable
    ``QSMPREP_FFT_ENGINE`` sets the default of a new process.
    """
    global _ENGINE
    old, _ENGINE = _ENGINE, _check_engine(name)
    return old


def active_fft_engine() -> str:
    """The engine (``"torch"`` or ``"scipy"``) that an FFT of a float array below
    :data:`CALIBRATE_MIN_VOXELS` runs now: the setting, with ``"auto"`` resolved by the
    current thread count. Larger single-threaded ones under ``"auto"``: see
    :func:`fft_engine_choices`."""
    if _ENGINE == "auto":
        return "torch" if _WORKERS == 1 else "scipy"
    return _ENGINE


_CHOICES: dict[tuple, dict] = {}
_SEEN: dict[tuple, int] = {}


def fft_engine_choices() -> dict[tuple, dict]:
    """The ``auto`` engine's choices in this process: ``(kind, input shape, dtype, output
    shape)`` -> ``{"engine": ..., "torch_ms": ..., "scipy_ms": ...}`` (fastest timed call of
    each engine when the transform was calibrated, see :data:`CALIBRATE_AFTER`). A copy."""
    return {k: dict(v) for k, v in _CHOICES.items()}


def _torch_fft(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import torch

    if not x.flags.writeable or any(st < 0 for st in x.strides):
        x = np.array(x)  # torch views need writeable memory with non-negative strides
    threads = None
    if _WORKERS != -1 and torch.get_num_threads() != _WORKERS:
        threads = torch.get_num_threads()
        torch.set_num_threads(_WORKERS)
    try:
        with torch.no_grad():
            out = getattr(torch.fft, kind)(torch.from_numpy(x), s=shape, dim=_AXES)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
    return out.numpy()


def _scipy_fft(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return getattr(sfft, kind)(x, s=shape, axes=_AXES, workers=_WORKERS)


_RUN = {"torch": _torch_fft, "scipy": _scipy_fft}


def _calibrated(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``auto`` with one thread on a large grid: the engine timed faster on this transform."""
    key = (kind, tuple(x.shape), x.dtype.str, shape)
    choice = _CHOICES.get(key)
    if choice is not None:
        return _RUN[choice["engine"]](kind, x, shape)
    seen = _SEEN.get(key, 0)
    if seen < CALIBRATE_AFTER:
        _SEEN[key] = seen + 1
        return _RUN["torch"](kind, x, shape)
    best = {"torch": math.inf, "scipy": math.inf}
    out = {}
    for _ in range(CALIBRATE_ROUNDS):
        for engine in FFT_ENGINES:
            t = time.perf_counter()
            out[engine] = _RUN[engine](kind, x, shape)
            best[engine] = min(best[engine], time.perf_counter() - t)
    engine = min(FFT_ENGINES, key=lambda e: best[e])
    _CHOICES[key] = {
        "engine": engine,
        "torch_ms": round(best["torch"] * 1e3, 3),
        "scipy_ms": round(best["scipy"] * 1e3, 3),
    }
    return out[engine]


@contextlib.contextmanager
def fft_engine(name: str) -> Iterator[None]:
    """Within the ``with`` block, NumPy FFTs use the engine ``name`` (:func:`set_fft_engine`)."""
    old = set_fft_engine(name)
    try:
        yield
    finally:
        set_fft_engine(old)


def _numpy_fft(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One FFT of a NumPy array by the selected engine (``kind``: rfftn, irfftn, fftn, ifftn)."""
    x = np.asarray(x)
    if x.dtype not in _TORCH_DTYPES:
        return _scipy_fft(kind, x, shape)
    if (
        _ENGINE == "auto"
        and _WORKERS == 1
        and max(x.size, math.prod(shape)) >= CALIBRATE_MIN_VOXELS
    ):
        return _calibrated(kind, x, shape)
    return _RUN[active_fft_engine()](kind, x, shape)


def rfftn(x, s: Sequence[int] | None = None):
    """Real-to-complex FFT over the last three axes (zero-padded to ``s`` if given)."""
    shape = tuple(s) if s is not None else tuple(x.shape[-3:])
    _record("r", shape)
    if is_torch(x):
        import torch

        return torch.fft.rfftn(x, s=shape, dim=_AXES)
    return _numpy_fft("rfftn", x, shape)


def irfftn(X, s: Sequence[int]):
    """Inverse of :func:`rfftn`; ``s`` is the real-space shape of the last three axes."""
    shape = tuple(s)
    _record("r", shape)
    if is_torch(X):
        import torch

        return torch.fft.irfftn(X, s=shape, dim=_AXES)
    return _numpy_fft("irfftn", X, shape)


def fftn(x, s: Sequence[int] | None = None):
    """Complex FFT over the last three axes."""
    shape = tuple(s) if s is not None else tuple(x.shape[-3:])
    _record("c", shape)
    if is_torch(x):
        import torch

        return torch.fft.fftn(x, s=shape, dim=_AXES)
    return _numpy_fft("fftn", x, shape)


def ifftn(X, s: Sequence[int] | None = None):
    """Inverse complex FFT over the last three axes."""
    shape = tuple(s) if s is not None else tuple(X.shape[-3:])
    _record("c", shape)
    if is_torch(X):
        import torch

        return torch.fft.ifftn(X, s=shape, dim=_AXES)
    return _numpy_fft("ifftn", X, shape)
