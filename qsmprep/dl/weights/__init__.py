"""Trained networks shipped with qsmprep, and where to find them.

The weights live in this package directory (``registry.json`` lists each model's file, sha256,
architecture and model card). ``QSMPREP_WEIGHTS_DIR`` points qsmprep at another directory with
the same layout (for example weights trained at a site with ``qsmprep-train``); nothing is ever
downloaded. A file named in a registry is checked against its sha256 when it is loaded.

Each deep-learning method of the BIDS App (``--methods``) runs one model by default: the
``weights`` of its record in the method registry (:mod:`qsmprep.methods`, which also names its
architecture ``arch``; the documentation's table of methods lists them all).

A method's ``model`` parameter selects another registered model (for example
``adaptive-pretrained``) and its ``weights`` parameter any checkpoint file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qsmprep import methods as _registry

__all__ = [
    "DL_METHODS",
    "TRAINED_BACKGROUND",
    "WEIGHTS_ENV",
    "ModelEntry",
    "available_models",
    "file_sha256",
    "register_model",
    "registry_path",
    "resolve_model",
    "weights_dir",
    "weights_sha256",
]

WEIGHTS_ENV = "QSMPREP_WEIGHTS_DIR"
"""Environment variable naming a directory of weights that replaces the shipped ones."""

TRAINED_BACKGROUND = "resharp"
"""Background removal of the local fields the shipped networks were trained and adapted on
(their target domain, ``qsmprep.app.recipe.make_target_data``). The App feeds the networks a
local field made by it, whatever ``--bg-method``: on qsmdev (sub-01 / sub-02, NRMSE %) QSMInvNet+
scored 78.8 / 81.2 with RESHARP fields and 82.4 / 88.7 with LBV fields, QSMInvNet 71.6 / 75.6
against 72.8 / 76.7 (``qsmprep-bench chain``)."""

DL_METHODS = {m.name: (m.weights, m.label) for m in _registry.records(kind="dl")}
"""BIDS App method name -> (default model name, label), from the method registry at import
(:func:`resolve_model` reads the registry itself, so methods registered later work too)."""

REGISTRY = "registry.json"


@dataclass(frozen=True)
class ModelEntry:
    """A checkpoint file and what the registry says about it."""

    name: str
    path: Path
    arch: str | None
    sha256: str | None
    card: Path | None
    description: str = ""


def weights_dir() -> Path:
    """The directory searched for weights: ``$QSMPREP_WEIGHTS_DIR`` or this package's."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path(__file__).parent


def registry_path(directory: Path | None = None) -> Path:
    """The ``registry.json`` of a weights directory (default :func:`weights_dir`)."""
    return Path(directory or weights_dir()) / REGISTRY


def _read_registry(directory: Path) -> dict:
    path = registry_path(directory)
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["models"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a qsmprep weights registry ({err}); it must be JSON with a "
            '"models" object mapping names to {"file", "sha256", "arch"}'
        ) from err


def available_models(directory: Path | None = None) -> dict[str, ModelEntry]:
    """Models listed in the registry of ``directory`` (default :func:`weights_dir`)."""
    directory = Path(directory or weights_dir())
    out = {}
    for name, e in _read_registry(directory).items():
        card = e.get("card")
        out[name] = ModelEntry(
            name=name,
            path=directory / e["file"],
            arch=e.get("arch"),
            sha256=e.get("sha256"),
            card=directory / card if card else None,
            description=e.get("description", ""),
        )
    return out


def resolve_model(method: str, *, model: str | None = None, weights=None) -> ModelEntry:
    """The checkpoint that a deep-learning ``method`` runs.

    Parameters
    ----------
    method : str
        A deep-learning method of the registry (:data:`DL_METHODS`).
    model : str, optional
        A model name of the registry instead of the method's default.
    weights : path, optional
        A checkpoint file; it wins over the registry (no sha256 to check against).

    Raises
    ------
    ValueError
        Unknown method, or no such model / file, with what to do about it.
    """
    deep = _registry.names(kind="dl")
    if method not in deep:
        raise ValueError(f"unknown deep-learning method {method!r}; choose from {', '.join(deep)}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(f"weights file {path} for {method!r} does not exist")
        return ModelEntry(name=path.stem, path=path, arch=None, sha256=None, card=None)
    name = model or _registry.get(method).weights
    directory = weights_dir()
    models = available_models(directory)
    if name not in models:
        where = f"${WEIGHTS_ENV}={directory}" if os.environ.get(WEIGHTS_ENV) else f"{directory}"
        have = ", ".join(sorted(models)) or "none"
        raise ValueError(
            f"no trained model {name!r} for method {method!r} in {where} (registered: {have}). "
            f"Train one with `qsmprep-train` and register it in {REGISTRY} there, point "
            f"{WEIGHTS_ENV} at a directory that has it, or give the method a checkpoint file "
            f"with --method-params ({method}: {{weights: FILE}})"
        )
    entry = models[name]
    if not entry.path.is_file():
        raise ValueError(
            f"{entry.path} (model {name!r}, listed in {registry_path(directory)}) is missing; "
            "reinstall qsmprep or fix the registry"
        )
    return entry


def register_model(
    directory, name: str, checkpoint, *, arch: str, sha256: str, card=None, description=""
) -> Path:
    """Add or replace ``name`` in the ``registry.json`` of ``directory`` (written atomically).

    ``checkpoint`` and ``card`` are files inside ``directory`` (stored by their relative path),
    so a weights directory can be moved or baked into an image as a whole.
    """
    import fcntl

    directory = Path(directory)
    rel = Path(checkpoint).resolve().relative_to(directory.resolve())
    entry = {"file": rel.as_posix(), "sha256": sha256, "arch": arch, "description": description}
    if card is not None:
        entry["card"] = Path(card).resolve().relative_to(directory.resolve()).as_posix()
    path = registry_path(directory)
    # several training jobs may register into one directory: read-modify-write under a lock
    with open(directory / ".registry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        models = _read_registry(directory)
        models[name] = entry
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"models": dict(sorted(models.items()))}, indent=2) + "\n")
        os.replace(tmp, path)
    return path


def weights_sha256(method: str, *, model: str | None = None, weights=None) -> str | None:
    """SHA-256 of the checkpoint that ``method`` would run now, or None when there is none.

    The registry's value for a registered model; the file's own hash for a ``weights`` file.
    Workflows put it into the inference node's inputs, so that new weights (a retrained
    model, another ``QSMPREP_WEIGHTS_DIR``) make Nipype run the node again instead of reusing
    a cached result of the old ones.
    """
    try:
        entry = resolve_model(method, model=model, weights=weights)
    except ValueError:
        return None
    return entry.sha256 or file_sha256(entry.path)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
