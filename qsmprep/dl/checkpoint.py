"""Checkpoints of dipole-inversion networks: atomic save, verified load, model card.

A checkpoint is a :func:`torch.save` file of plain data (loadable with ``weights_only=True``)::

    {"format": "qsmprep-dl-checkpoint", "format_version": 1,
     "config": model.config, "state_dict": ..., "half": bool, "step": int,
     "optimizer": state or None, "scheduler": state or None,
     "data": description of the training data, "metrics": {...}, "extra": {...},
     "versions": {"qsmprep", "torch", "numpy", "python"}, "created": ISO 8601 UTC time}

Its SHA-256 (returned by :func:`save_checkpoint`) identifies it; :func:`load_checkpoint` can
check it before reading the file.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from qsmprep.dl.weights import file_sha256

__all__ = ["file_sha256", "load_checkpoint", "save_checkpoint", "write_model_card"]

FORMAT = "qsmprep-dl-checkpoint"
FORMAT_VERSION = 1


def _plain(obj, where: str = "extra"):
    """``obj`` as plain data (dict/list/tuple/str/number/bool/None/tensor) for safe loading."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise ValueError(
        f"{where} holds a {type(obj).__name__}; checkpoints store plain data only (dict, "
        "list, str, numbers, tensors): convert it first"
    )


def _versions() -> dict:
    from qsmprep.__about__ import __version__

    return {
        "qsmprep": __version__,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(
    path,
    model,
    *,
    step: int = 0,
    optimizer=None,
    scheduler=None,
    extra: dict | None = None,
    data: dict | None = None,
    metrics: dict | None = None,
    half: bool = False,
) -> str:
    """Write a checkpoint atomically and return its SHA-256.

    The file is written to a temporary file in the same directory, flushed to disk and moved
    over ``path`` with :func:`os.replace`, so a crash never leaves a truncated checkpoint.

    Parameters
    ----------
    path : str or Path
        Destination (parent directories are created).
    model : network with a ``config`` dict (see :func:`qsmprep.dl.nets.build_model`)
    step : int
        Training steps done.
    optimizer, scheduler : optional
        Their ``state_dict()`` is stored (to resume training).
    extra, data, metrics : dict, optional
        Free-form plain data: ``data`` describes the training data, ``metrics`` holds
        validation figures, ``extra`` anything else (e.g. the training config).
    half : bool
        Store floating-point weights as float16 (half the size; loaded back as float32).

    Returns
    -------
    sha256 : str
        Hex digest of the written file.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError("model has no config dict with an 'arch'; build it with build_model")
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.clone()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _plain(dict(config), "config"),
        "state_dict": state,
        "half": bool(half),
        "step": int(step),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "data": _plain(data, "data"),
        "metrics": _plain(metrics, "metrics"),
        "extra": _plain(extra, "extra"),
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp files are private; weights are read by any user id
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def load_checkpoint(path, *, device="cpu", arch: str | None = None, sha256: str | None = None):
    """Load a checkpoint written by :func:`save_checkpoint`: ``(model, meta)``.

    The model is rebuilt from the stored config, its weights are loaded (float16 ones cast back
    to float32) and it is moved to ``device`` in eval mode. ``meta`` holds every stored field
    but the weights (config, step, optimizer/scheduler state, data, metrics, extra, versions,
    created) plus ``path`` and ``sha256``.

    Parameters
    ----------
    path : str or Path
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"auto"`` (see :func:`qsmprep.dl.inference.resolve_device`).
    arch : str, optional
        Expected architecture; a checkpoint of another one raises ValueError.
    sha256 : str, optional
        Expected hex digest; checked before the file is read.

    Raises
    ------
    ValueError
        Missing or unreadable file, not a qsmprep checkpoint, wrong architecture, hash
        mismatch, or weights that do not fit the stored config.
    """
    from qsmprep.dl.inference import resolve_device
    from qsmprep.dl.nets import build_model

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; check the path")
    digest = file_sha256(path)
    if sha256 is not None and digest.lower() != str(sha256).strip().lower():
        raise ValueError(
            f"checkpoint {path} has SHA-256 {digest} but {sha256} was expected; the file is "
            "corrupt or a different version: download or copy it again"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}; the file is not a "
            "qsmprep checkpoint or is damaged"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a qsmprep checkpoint (no format {FORMAT!r}); give a file written "
            "by qsmprep-train or qsmprep.dl.checkpoint.save_checkpoint"
        )
    config = dict(payload["config"])
    found = config.get("arch")
    if arch is not None and found != arch:
        raise ValueError(
            f"checkpoint {path} holds a {found!r} model but arch {arch!r} was expected; "
            f"give a {arch!r} checkpoint or select the method matching {found!r}"
        )
    try:
        model = build_model(config)
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()
        }
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint {path} does not match its config: {exc}") from exc
    model.to(resolve_device(device)).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["config"] = dict(model.config)
    meta["path"] = str(path)
    meta["sha256"] = digest
    return model, meta


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|")


def _table(d: dict) -> list[str]:
    lines = ["| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in d.items()]
    return lines


def _validation_note(v: dict) -> str:
    """What the Validation section of a model card means."""
    text = (
        "What the metrics below were computed on: the synthetic validation data's seed and, for "
        "target scans, the subjects trained on and those validated on (`target_validation` "
        "says whether these were held out of training)."
    )
    if v.get("batch_norms"):
        text += (
            f" Every metric went through the `{v['batch_norms']}` batch norms, the ones the "
            "network infers with; `*_source_bn` metrics through the `source` ones."
        )
    return text


def _listed(v):
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    return v


def write_model_card(path_md, meta: dict) -> Path:
    """Write a markdown model card (architecture, training data, validation, metrics,
    provenance).

    ``meta`` is the dict returned by :func:`load_checkpoint` (or any dict with the same keys;
    missing ones are left out). Returns the path written.
    """
    path_md = Path(path_md)
    config = dict(meta.get("config") or {})
    arch = config.get("arch", "unknown")
    names = {
        "unet": "conventional 3D U-Net (batch norm)",
        "dsbn": "3D U-Net with domain-specific batch norm (QSMInvNet+)",
        "adaptive": "3D U-Net with an adaptive first convolution (filter-manifold network)",
    }
    lines = [f"# Model card: {arch}", "", f"{names.get(arch, arch)} for dipole inversion.", ""]
    ckpt = meta.get("path")
    if ckpt:
        lines.append(f"- checkpoint: `{Path(ckpt).name}`")
    if meta.get("sha256"):
        lines.append(f"- SHA-256: `{meta['sha256']}`")
    for key in ("step", "created", "half"):
        if key in meta:
            lines.append(f"- {key}: {_fmt(meta[key])}")
    lines += [
        "",
        "## Use",
        "",
        "Input: local (background-removed) field in ppm and a brain mask, any voxel grid;",
        f"the network sees `[field * {_fmt(config.get('field_scale', 10.0))} * mask, mask]` and",
        f"its output divided by {_fmt(config.get('chi_scale', 10.0))} is chi in ppm.",
    ]
    if arch == "adaptive":
        lines.append("Side information: voxel size (mm) and B0 direction in voxel axes.")
    if arch == "dsbn" or config.get("norm") == "dsbn":
        lines.append(f"Inference uses the `{config.get('default_domain', 'source')}` domain.")
    lines += ["", "## Configuration", "", *_table(config), ""]
    data = meta.get("data")
    validation = data.get("validation") if isinstance(data, dict) else None
    if validation:
        data = {k: v for k, v in data.items() if k != "validation"}
    sections = (
        ("data", "Training data", data),
        ("validation", "Validation", validation),
        ("metrics", "Metrics", meta.get("metrics")),
        ("extra", "Training", meta.get("extra")),
    )
    for key, title, value in sections:
        if value:
            lines += [f"## {title}", ""]
            if key == "validation":
                lines += [_validation_note(value), ""]
                value = {k: _listed(v) for k, v in value.items()}
            lines += _table(value) if isinstance(value, dict) else [_fmt(value)]
            lines.append("")
    if meta.get("versions"):
        lines += ["## Software", "", *_table(meta["versions"]), ""]
    lines += [
        "## Limitations",
        "",
        "Trained on the data described above; fields far outside its range of susceptibility,",
        "resolution or B0 orientation (for the non-adaptive models) may be underestimated.",
        "",
    ]
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text("\n".join(lines), encoding="utf-8")
    return path_md
