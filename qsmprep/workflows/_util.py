"""Small helpers of the workflow builders (option checks, parameter sections, GPU flag)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["check_choice", "gpu_work", "node_label", "params_of"]


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


def gpu_work(device: str) -> bool:
    """Whether nodes running on ``device`` are GPU work for Nipype's MultiProc scheduler.

    ``"cuda"`` always; ``"auto"`` when torch sees a CUDA device now (the same test the
    numerics make at run time). MultiProc refuses to start a graph with GPU nodes when it
    counts no GPU slot (``n_gpu_procs``, by default the GPUs that ``nvidia-smi`` lists).
    """
    if str(device).startswith("cuda"):
        return True
    if device == "auto":
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return False
        return bool(torch.cuda.is_available())
    return False


def node_label(text: str) -> str:
    """``text`` as a Nipype node/workflow name fragment (letters, digits, underscores)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_")
