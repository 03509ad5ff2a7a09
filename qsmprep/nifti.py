"""Reading NIfTI images: the one loader of the package (file I/O; no numerics).

The numerics (:mod:`qsmprep.recon`) never touch files; the interfaces, the training data
(:mod:`qsmprep.dl.target`) and the benchmarks read their images here.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

__all__ = ["load", "load_data", "voxel_size"]


def load(path, dtype=np.float32, *, ndim: int | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Data (scaled by the header, as ``dtype``) and image of a NIfTI file.

    With ``ndim``, an image with one more axis of length 1 (a 4D file holding one volume) is
    squeezed to ``ndim`` axes, and any other number of axes is a ValueError.
    """
    img = nib.load(os.fspath(path))
    data = np.asarray(img.dataobj, dtype=dtype)
    if ndim is not None:
        if data.ndim == ndim + 1 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != ndim:
            raise ValueError(f"{path} has shape {data.shape}; a {ndim}D map was expected")
    return data, img


def load_data(path, dtype=np.float32, *, ndim: int | None = None) -> np.ndarray:
    """The data of :func:`load` alone."""
    return load(path, dtype, ndim=ndim)[0]


def voxel_size(img) -> tuple[float, float, float]:
    """Voxel size (mm) of the first three axes."""
    return tuple(float(z) for z in img.header.get_zooms()[:3])
