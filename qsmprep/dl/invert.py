"""Deep-learning dipole inversion by method name, as the BIDS App runs it.

:func:`dl_invert` resolves a method's trained model (:mod:`qsmprep.dl.weights`), checks it
(architecture and sha256), and runs :func:`qsmprep.dl.inference.predict` on a local field in
ppm. Loaded models are kept for the life of the process, so several maps in one worker do not
reload the weights.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from qsmprep import methods as _registry
from qsmprep.dl.weights import resolve_model

__all__ = ["DL_ARCH", "dl_invert", "load_method_model", "training_voxel_range"]

LOGGER = logging.getLogger("qsmprep")

VOXEL_SLACK = 0.1
"""Relative slack around the trained voxel sizes before a map is flagged (a 2.2 mm scan is
within 10 % of a network trained at up to 2 mm)."""

DL_ARCH = {m.name: m.arch for m in _registry.records(kind="dl")}
"""The architecture each method's checkpoint must have (its record's ``arch``; the functions
here read the registry, so methods registered later work too)."""


def _arch(method: str) -> str:
    return _registry.get(method, kind="dl").arch


@lru_cache(maxsize=8)
def _load(path: str, sha256: str | None, arch: str, device: str, mtime: float):
    from qsmprep.dl.checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, arch=arch, sha256=sha256)


def load_method_model(method: str, *, model: str | None = None, weights=None, device="cpu"):
    """``(network, meta, entry)`` for a deep-learning method (see :func:`dl_invert`)."""
    from qsmprep.dl.inference import resolve_device

    entry = resolve_model(method, model=model, weights=weights)
    dev = str(resolve_device(device))
    path = Path(entry.path).resolve()
    net, meta = _load(str(path), entry.sha256, _arch(method), dev, path.stat().st_mtime)
    return net, meta, entry


def _axis_ranges(spec) -> list[tuple[float, float]] | None:
    """Per-axis (low, high) mm of a synthetic ``voxel_size`` setting (a number, 3 numbers or 3
    ranges); None when it is not one of those."""
    try:
        if isinstance(spec, (int, float)):
            return [(float(spec), float(spec))] * 3
        out = []
        for a in spec:
            lo, hi = (a, a) if isinstance(a, (int, float)) else (a[0], a[-1])
            out.append((float(lo), float(hi)))
        return out if len(out) == 3 else None
    except (TypeError, IndexError, ValueError):
        return None


def training_voxel_range(meta: dict) -> list[tuple[float, float]] | None:
    """Per-axis (low, high) voxel size (mm) of the data a checkpoint was trained on.

    The union of its synthetic data's ``voxel_size`` setting and its target scans' voxel
    sizes, from the checkpoint's ``data`` record; None when the record does not say (a
    checkpoint from before it existed, or a synthetic default of 1 mm).
    """
    data = meta.get("data") or {}
    ranges = []
    synth = data.get("synthetic") or {}
    if "voxel_size" in synth:
        r = _axis_ranges(synth["voxel_size"])
        if r:
            ranges.append(r)
    for vs in (data.get("target") or {}).get("voxel_sizes") or []:
        r = _axis_ranges(list(vs))
        if r:
            ranges.append(r)
    if not ranges:
        return None
    return [(min(r[i][0] for r in ranges), max(r[i][1] for r in ranges)) for i in range(3)]


def _voxel_check(method: str, voxel_size, meta: dict) -> bool | None:
    """Whether ``voxel_size`` lies within the trained range (with :data:`VOXEL_SLACK`); a
    warning when it does not; None when the checkpoint does not say."""
    rng = training_voxel_range(meta)
    if rng is None:
        return None
    vs = [float(v) for v in voxel_size]
    inside = all(lo * (1 - VOXEL_SLACK) <= v <= hi * (1 + VOXEL_SLACK) for v, (lo, hi) in
                 zip(vs, rng, strict=True))  # fmt: skip
    data = meta.get("data") or {}
    targets = (data.get("target") or {}).get("voxel_sizes") or []
    cubic = bool((data.get("synthetic") or {}).get("isotropic")) and all(
        max(t) <= min(t) * (1 + VOXEL_SLACK) for t in targets
    )
    if cubic and max(vs) > min(vs) * (1 + VOXEL_SLACK):
        inside = False  # trained on cubic voxels only: another aspect ratio is new to it
    if not inside:
        trained = " x ".join(f"{lo:g}-{hi:g}" if lo != hi else f"{lo:g}" for lo, hi in rng)
        trained += " (cubic)" if cubic else ""
        LOGGER.warning(
            "%s: the voxel size %s mm is outside the %s mm its network was trained on; its map"
            " may be unreliable there (see docs: deep-learning)",
            method,
            " x ".join(f"{v:g}" for v in vs),
            trained,
        )
    return inside


def dl_invert(
    method: str,
    field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size,
    b0_dir=(0.0, 0.0, 1.0),
    *,
    model: str | None = None,
    weights=None,
    device: str = "auto",
    tile_shape=None,
    overlap: int = 16,
) -> tuple[np.ndarray, dict]:
    """Susceptibility (ppm) of a local field (ppm) by a trained network.

    Parameters
    ----------
    method : {"unet", "adaptive", "dsbn", "dcfinetune", "unsup"}
        A deep-learning method of the registry (:mod:`qsmprep.methods`).
    field_ppm, mask : (X, Y, Z) arrays
        Local field in ppm of B0 and the mask where it is valid.
    voxel_size : 3 floats
        mm.
    b0_dir : 3 floats
        B0 direction in voxel axes (side information of the adaptive network).
    model : str, optional
        Registered model name instead of the method's default.
    weights : path, optional
        Checkpoint file instead of the registry.
    device : {"auto", "cpu", "cuda"}
        Where the network runs.
    tile_shape : int or 3 ints, optional
        Tile size for volumes that do not fit in memory at once (None: one pass; a CUDA
        out-of-memory error falls back to tiles by itself).
    overlap : int
        Tile overlap (voxels).

    Returns
    -------
    chi : (X, Y, Z) float32 array
        ppm, 0 outside the mask (not referenced: see
        :func:`qsmprep.recon.inversion.reference.reference_mean`).
    info : dict
        JSON-able provenance: model name, file, sha256, architecture, domain, training step.
    """
    from qsmprep.dl.inference import predict

    deep = _registry.names(kind="dl")
    if method not in deep:
        raise ValueError(f"unknown deep-learning method {method!r}; choose from {list(deep)}")
    net, meta, entry = load_method_model(method, model=model, weights=weights, device=device)
    # QSMInvNet+ runs measured scans through the target-domain batch-norm statistics
    domain = "target" if _arch(method) == "dsbn" else None
    chi = predict(
        net,
        field_ppm,
        mask,
        voxel_size,
        b0_dir,
        device=next(net.parameters()).device,
        tile_shape=tile_shape,
        overlap=overlap,
        domain=domain,
    )
    info = {
        "Model": entry.name,
        "WeightsFile": Path(entry.path).name,
        "WeightsSha256": meta.get("sha256"),
        "Architecture": _arch(method),
        "TrainingSteps": meta.get("step"),
        "Domain": domain,
    }
    in_range = _voxel_check(method, voxel_size, meta)
    if in_range is not None:
        info["VoxelSizeInTrainingRange"] = in_range
        info["TrainingVoxelSize"] = [list(r) for r in training_voxel_range(meta)]
    if tile_shape is not None:
        info["TileShape"] = tile_shape
    return chi.astype(np.float32, copy=False), info
