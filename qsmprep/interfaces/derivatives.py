"""Write one derivative file (and its JSON sidecar) into the output dataset, atomically."""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep import _atomic

__all__ = ["WriteDerivative", "atomic_write_text", "atomic_copy"]

_EXTS = (".nii.gz", ".nii", ".tsv", ".json", ".svg", ".png", ".html")


def _ext(path: str) -> str:
    for e in _EXTS:
        if path.endswith(e):
            return e
    return os.path.splitext(path)[1]


def atomic_copy(src, target) -> str:
    """Copy ``src`` to ``target`` through a temporary file in the target folder + rename.

    Raises :class:`~qsmprep._atomic.DiskFullError` (an ``OSError`` naming ``target``) when
    the disk is full; nothing is left under either name then.
    """
    return str(_atomic.copy_file(src, target))


def atomic_write_text(text: str, target) -> str:
    """Write ``text`` to ``target`` through a temporary file in the target folder + rename."""
    return str(_atomic.write_text(target, text))


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

    Each file is written in full under a temporary name in the target folder and renamed
    into place (``os.replace``), so readers see either the old file or the complete new one;
    a full disk raises :class:`~qsmprep._atomic.DiskFullError` naming the file, before
    either name is touched.
    """

    input_spec = _WriteDerivativeInputSpec
    output_spec = _WriteDerivativeOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        src, out = self.inputs.in_file, os.path.abspath(self.inputs.out_file)
        compress = _ext(src) == ".nii" and _ext(out) == ".nii.gz"  # intermediates: .nii
        if _ext(src) != _ext(out) and not compress:
            raise ValueError(f"cannot write {src} as {out}: the file types differ")
        sidecar = dict(self.inputs.sidecar) if isdefined(self.inputs.sidecar) else {}
        if isdefined(self.inputs.meta):
            sidecar.update(self.inputs.meta)
        if sidecar and _ext(out) == ".json":
            raise ValueError(f"{out} is a JSON file itself; it takes no sidecar")
        # both files are written in full under temporary names first (where a full disk
        # fails), then renamed: the sidecar, then the data
        side_tmp = data_tmp = None
        try:
            if sidecar:
                side = _sidecar_path(out)
                side_tmp = _atomic.stage_text(json.dumps(sidecar, indent=2) + "\n", side)
            data_tmp = (_atomic.stage_gzip if compress else _atomic.stage_copy)(src, out)
            if side_tmp:
                self._results["out_sidecar"] = str(_atomic.commit(side_tmp, side))
                side_tmp = None
            self._results["out_file"] = str(_atomic.commit(data_tmp, out))
            data_tmp = None
        finally:
            _atomic.discard(side_tmp, data_tmp)
        return runtime
