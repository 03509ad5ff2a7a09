"""NIfTI saving shared by the interfaces, and the loader of :mod:`qsmprep.nifti` (no numerics).

Outputs are written into the node's working directory (the current directory while an
interface runs) under names derived from an input file with
:func:`nipype.utils.filemanip.fname_presuffix`, so a rerun with the same inputs writes the same
files. nibabel writes gzip streams without a time stamp, so equal data give equal bytes.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.utils.filemanip import fname_presuffix

from qsmprep.nifti import load, voxel_size

__all__ = ["effective_params", "load", "out_path", "save", "voxel_size"]


def out_path(in_file, suffix: str) -> str:
    """``<in_file stem><suffix>.nii`` in the current directory.

    Intermediate results are stored uncompressed: gzip is most of the cost of writing a
    float volume (a 160 x 186 x 149 x 4 float32 image: 2.1 s as ``.nii.gz`` at nibabel's
    level 1, 0.2 s as ``.nii``; 63 against 71 MB, since noisy floats barely compress). The
    derivatives are compressed once, when published
    (:class:`~qsmprep.interfaces.derivatives.WriteDerivative`).
    """
    stem = fname_presuffix(os.fspath(in_file), suffix=suffix, newpath=os.getcwd())
    for ext in (".nii.gz", ".nii"):
        if stem.endswith(ext):
            return stem[: -len(ext)] + ".nii"
    return stem + ".nii"


def save(data, like, path, dtype=np.float32, affine=None) -> str:
    """Save ``data`` with the affine and header of the image ``like``; return the path.

    ``affine`` replaces ``like``'s (e.g. a projection on a grid of its own); the header's
    dimensions always follow ``data``.
    """
    arr = np.asarray(data).astype(dtype)
    aff = like.affine if affine is None else np.asarray(affine, dtype=float)
    header = like.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(arr, aff, header)
    img.header.set_qform(aff, code=int(like.header["qform_code"]) or 1)
    img.header.set_sform(aff, code=int(like.header["sform_code"]) or 1)
    nib.save(img, os.fspath(path))
    return os.fspath(Path(path).resolve())


def _jsonable(v) -> bool:
    if v is None or isinstance(v, bool | int | str):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list | tuple):
        return all(_jsonable(x) for x in v)
    return False


def effective_params(func, params: dict, exclude=()) -> dict:
    """Keyword parameters of ``func`` as they apply: its scalar defaults updated by ``params``.

    Only JSON-able defaults are listed (arrays, masks and ``device``/``info`` are not
    parameters of a method); the result goes into the sidecars for provenance.
    """
    out = {}
    skip = {"device", "info", *exclude}
    for name, p in inspect.signature(func).parameters.items():
        if p.kind is p.KEYWORD_ONLY and name not in skip and _jsonable(p.default):
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    out.update({k: v for k, v in params.items() if k not in skip})
    return out
