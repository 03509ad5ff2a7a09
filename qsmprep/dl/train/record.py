"""What a run writes down: the CSV log, TensorBoard events, hardware, peak memory, RNG state."""

from __future__ import annotations

import csv
import math
import os
import platform
import resource
from pathlib import Path

import torch

_CSV_FIELDS = [
    "step",
    "loss",
    "loss_source",
    "loss_target",
    "lambda",
    "lr",
    "val_loss",
    "val_nrmse",
    "val_loss_source_bn",
    "val_nrmse_source_bn",
    "val_target_dc",
    "val_target_nrmse",
    "patches_per_s",
    "elapsed_s",
]


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _Csv:
    """CSV log that, on resume, drops the rows after the resumed step."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        rows = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start_step]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
            w.writerow({k: _fmt(row.get(k)) for k in _CSV_FIELDS})


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))


def _rng_state(device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device) -> None:
    if st.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(st["torch"], dtype=torch.uint8))
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(torch.as_tensor(st["cuda"], dtype=torch.uint8), device)
