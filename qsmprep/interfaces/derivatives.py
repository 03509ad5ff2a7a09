"""Write one derivative file (and its JSON sidecar) into the output dataset, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

__all__ = ["WriteDerivative", "atomic_write_text", "atomic_copy"]

_EXTS = (".nii.gz", ".nii", ".tsv", ".json", ".svg", ".png", ".html")


def _ext(path: str) -> str:
    for e in _EXTS:
        if path.endswith(e):
            return e
    return os.path.splitext(path)[1]


def _temporary(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return tmp


def atomic_copy(src, target) -> str:
    """Copy ``src`` to ``target`` through a temporary file in the target folder + rename."""
    target = Path(target)
    tmp = _temporary(target)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(target)


def atomic_write_text(text: str, target) -> str:
    """Write ``text`` to ``target`` through a temporary file in the target folder + rename."""
    target = Path(target)
    tmp = _temporary(target)
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(target)


def _sidecar_path(out_file: str) -> str:
    return out_file[: -len(_ext(out_file))] + ".json"


class _WriteDerivativeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to publish")
    out_file = traits.Str(mandatory=True, desc="absolute target path in the output dataset")
    sidecar = traits.Dict(desc="JSON sidecar written next to the target")
    meta = traits.Dict(desc="run-time values merged over the sidecar (e.g. residuals)")


class _WriteDerivativeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the written derivative")
    out_sidecar = File(desc="the written JSON sidecar, if any")


class WriteDerivative(SimpleInterface):
    """Copy a result to its BIDS-derivative path, sidecar first; always runs (cheap).

    Each file is written under a temporary name in the target folder and renamed into place
    (``os.replace``), so readers see either the old file or the complete new one.
    """

    input_spec = _WriteDerivativeInputSpec
    output_spec = _WriteDerivativeOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        src, out = self.inputs.in_file, os.path.abspath(self.inputs.out_file)
        if _ext(src) != _ext(out):
            raise ValueError(f"cannot write {src} as {out}: the file types differ")
        sidecar = dict(self.inputs.sidecar) if isdefined(self.inputs.sidecar) else {}
        if isdefined(self.inputs.meta):
            sidecar.update(self.inputs.meta)
        if sidecar:
            if _ext(out) == ".json":
                raise ValueError(f"{out} is a JSON file itself; it takes no sidecar")
            text = json.dumps(sidecar, indent=2) + "\n"
            self._results["out_sidecar"] = atomic_write_text(text, _sidecar_path(out))
        self._results["out_file"] = atomic_copy(src, out)
        return runtime
