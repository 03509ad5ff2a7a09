"""Small helpers of the workflow builders (option checks, parameter sections, GPU flag)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from qsmprep.devices import gpu_work

__all__ = ["check_choice", "gpu_work", "mem_gb", "node_label", "params_of"]

# Peak memory of a node above its worker's baseline, bytes per voxel (per voxel and echo for the
# nodes that hold every echo), measured with the resource monitor of ``qsmprep-bench
# participant`` on a 160 x 186 x 149 head, 4 echoes: load 61, unwrap 145, fit 65, background
# 110, TV 135, MEDI 92, TKD 63 bytes per voxel over a 0.13 GB baseline (the largest per kind).
_BYTES_PER_VOXEL = {
    "load": 16.0,  # per echo
    "unwrap": 37.0,  # per echo
    "fit": 17.0,  # per echo
    "background": 110.0,
    "inversion": 135.0,
}
_BASELINE_GB = 0.25  # a worker with NumPy, SciPy, nibabel and Nipype loaded, with slack
_SLACK = 1.5


def mem_gb(kind: str, n_voxels: int | None, n_echoes: int = 1) -> float:
    """Memory (GB) to announce to Nipype's scheduler for a node of ``kind`` on ``n_voxels``
    (the grid of the acquisition) and ``n_echoes``: the measured bytes per voxel with 50 %
    slack, plus a worker's baseline. Nipype's default, 0.2 GB, when the grid is unknown."""
    if not n_voxels:
        return 0.2
    per = _BYTES_PER_VOXEL[kind] * (n_echoes if kind in ("load", "unwrap", "fit") else 1)
    return round(_BASELINE_GB + _SLACK * per * float(n_voxels) / 1e9, 3)


def params_of(method_params: Mapping[str, Mapping] | None, section: str) -> dict:
    """Keyword arguments of one stage or method (a plain-dict copy; ``{}`` when absent)."""
    if not method_params:
        return {}
    value = method_params.get(section) or {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"parameters of {section!r} must be a table of keyword arguments, got {value!r}"
        )
    return {str(k): v for k, v in value.items()}


def check_choice(value, choices: Iterable, what: str):
    """``value`` if it is one of ``choices``; else a ValueError naming the option."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(map(str, choices))}")
    return value


def node_label(text: str) -> str:
    """``text`` as a Nipype node/workflow name fragment (letters, digits, underscores)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_")
