"""Input checks shared by every numerical function: one clear ``ValueError`` per problem.

Each check names the argument it rejects and says what a valid value looks like, so the
message is useful to a user who only sees it in a log.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmprep.recon._backend import is_torch, to_numpy

__all__ = [
    "check_b0_dir",
    "check_echo_times",
    "check_field",
    "check_finite",
    "check_mask",
    "check_same_shape",
    "check_volume",
    "check_voxel_size",
]


def check_volume(x, name: str, ndim: int = 3) -> None:
    """Reject anything that is not an ``ndim``-dimensional array."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if len(shape) != ndim:
        raise ValueError(
            f"{name} must be a {ndim}D array, got shape {tuple(shape)}"
            + (
                "; pass one echo at a time or stack echoes on the last axis"
                if ndim == 3 and len(shape) == 4
                else ""
            )
        )
    if 0 in tuple(shape):
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")


def check_finite(x, name: str, where=None) -> None:
    """Reject NaN or infinite values (inside ``where`` if given)."""
    a = to_numpy(x)
    bad = ~np.isfinite(a)
    if where is not None:
        w = to_numpy(where).astype(bool)
        bad = bad & (w if w.shape == bad.shape else w[..., None])
    n = int(bad.sum())
    if n:
        raise ValueError(
            f"{name} has {n} non-finite (NaN/Inf) values"
            + (" inside the mask" if where is not None else "")
            + "; fix the input or exclude those voxels from the mask"
        )


def check_same_shape(ref_name: str, ref, **others) -> None:
    """Reject arrays whose 3D shape differs from ``ref``'s."""
    shape = tuple(ref.shape[:3])
    for name, x in others.items():
        if x is None:
            continue
        if tuple(x.shape[:3]) != shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)};"
                " they must be on the same voxel grid"
            )


def check_mask(mask, name: str = "mask", shape=None):
    """Return ``mask`` as a boolean array; reject a wrong shape or an all-zero mask."""
    check_volume(mask, name)
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the data have shape {tuple(shape)};"
            " they must be on the same voxel grid"
        )
    m = mask.bool() if is_torch(mask) else np.asarray(mask) != 0
    if not bool(m.any()):
        raise ValueError(f"{name} is all zero: no voxel to process; check the brain mask")
    return m


def check_voxel_size(voxel_size, ndim: int = 3) -> tuple[float, ...]:
    """Voxel size as a tuple of positive floats (mm)."""
    vs = np.atleast_1d(np.asarray(voxel_size, dtype=float))
    if vs.size == 1:
        vs = np.repeat(vs, ndim)
    if vs.shape != (ndim,):
        raise ValueError(f"voxel_size must have {ndim} values (mm), got {voxel_size!r}")
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be finite and positive (mm), got {tuple(vs)}")
    return tuple(float(v) for v in vs)


def check_b0_dir(b0_dir) -> tuple[float, float, float]:
    """B0 direction as a unit 3-vector (voxel coordinates)."""
    b = np.asarray(b0_dir, dtype=float).reshape(-1)
    if b.shape != (3,) or not np.all(np.isfinite(b)):
        raise ValueError(f"b0_dir must be 3 finite numbers, got {b0_dir!r}")
    n = float(np.linalg.norm(b))
    if n < 1e-8:
        raise ValueError(
            f"b0_dir has zero length: {b0_dir!r}; give the B0 direction, e.g. (0, 0, 1)"
        )
    return tuple(float(v) for v in b / n)


def check_echo_times(echo_times: Sequence[float], n_echoes: int | None = None) -> np.ndarray:
    """Echo times (s) as a float array: positive and strictly increasing."""
    te = np.asarray(echo_times, dtype=float).reshape(-1)
    if te.size == 0:
        raise ValueError("echo_times is empty: give one echo time (s) per echo")
    if n_echoes is not None and te.size != n_echoes:
        raise ValueError(f"got {te.size} echo times for {n_echoes} echoes; give one per echo")
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo_times must be positive and finite (s), got {te.tolist()}")
    if np.any(np.diff(te) <= 0):
        raise ValueError(
            f"echo_times must be strictly increasing, got {te.tolist()}; sort the echoes by TE"
        )
    if te.max() > 1.0:
        raise ValueError(
            f"echo_times look like milliseconds ({te.tolist()}); give them in seconds"
        )
    return te


def check_field(field, mask, voxel_size, name: str = "field", unit: str = "Hz or ppm"):
    """Validate a field map (a real array), its mask and the voxel size.

    Returns the field as float32 NumPy (0 outside the mask), the mask as bool NumPy and the
    voxel size. The field must be finite inside the mask; ``unit`` goes into the message.
    """
    check_volume(field, name)
    m = to_numpy(check_mask(mask, "mask", shape=field.shape)).astype(bool)
    vs = check_voxel_size(voxel_size)
    f = to_numpy(field)
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"{name} must be a real array ({unit}), got dtype {f.dtype}")
    check_finite(f, name, where=m)
    return np.where(m, f, 0.0).astype(np.float32), m, vs
