"""Registration of an acquisition's magnitude to a template with ANTs (antspyx).

One registration per acquisition and template: the echo-combined magnitude (root sum of
squares over echoes), bias-corrected (N4) and masked by the brain mask, is aligned to the
template's brain-extracted T1w by ``antsRegistration`` with a rigid, an affine and a
symmetric-normalisation (SyN) stage (Avants et al., 2008), all driven by Mattes mutual
information (the contrasts differ). The fixed image is the template at ``resolution_mm``
(2 mm by default: the template's own 2 mm file when the TemplateFlow home has one, else the
finest resampled in memory), which keeps SyN to ~10 s on two cores at QSM resolutions; the
transforms are physical, so they apply to any grid of the template.

The composite transforms are written as ITK HDF5 files, the names of which the workflow turns
into BIDS derivatives (``from-<native>_to-<template>_mode-image_xfm.h5`` and the inverse).

antspyx is imported on use: the rest of qsmprep runs without it.

Reference: Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image
registration with cross-correlation: evaluating automated labeling of elderly and
neurodegenerative brain. Med Image Anal. 2008;12(1):26-41.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "REGISTRATION_DEFAULTS",
    "RegistrationResult",
    "apply_transforms",
    "dice",
    "import_ants",
    "register_to_template",
    "registration_target",
]

REGISTRATION_DEFAULTS = {
    "resolution_mm": 2.0,
    "syn_iterations": (40, 20, 0),
    "n4": True,
    "seed": 1,
}
"""Default parameters of :func:`register_to_template` (measured in docs/template-space.md)."""


def import_ants(threads: int | None = None):
    """Import antspyx (``ants``), with a clear error when it is not installed.

    ``threads`` sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` before ITK starts in this
    process (ITK reads it once).
    """
    if threads:
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(int(threads)))
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - antspyx is a dependency
        raise ImportError(
            "template-space outputs need ANTs through antspyx: pip install antspyx"
        ) from exc
    return ants


@dataclass
class RegistrationResult:
    """Files and measures of one registration (paths absolute)."""

    forward: Path  # composite transform native -> template (maps template points to native)
    inverse: Path  # composite transform template -> native
    warped: Path  # the magnitude resampled onto the registration grid
    fixed: Path  # the template image the magnitude was registered to (registration grid)
    fixed_mask: Path  # the template brain mask on the registration grid
    dice: float  # Dice of the warped brain mask and the template brain mask
    parameters: dict = field(default_factory=dict)


def dice(a, b) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of two boolean arrays (NaN when both empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")


def _zoom(img) -> float:
    return float(max(img.header.get_zooms()[:3]))


def registration_target(t1w_files, mask_files, resolution_mm: float):
    """Pick the template file closest to ``resolution_mm`` without being coarser.

    ``t1w_files``/``mask_files``: the template's brain T1w and mask at each available
    resolution (lists in the same order). Returns ``(t1w, mask, resample)`` where ``resample``
    tells whether the chosen file is finer than ``resolution_mm`` (then it is resampled).
    """
    best = None
    for t1w, mask in zip(t1w_files, mask_files, strict=True):
        z = _zoom(nib.load(str(t1w)))
        key = (z <= resolution_mm + 1e-3, z if z <= resolution_mm + 1e-3 else -z)
        if best is None or key > best[0]:
            best = (key, t1w, mask, z)
    if best is None:
        raise ValueError("no template image to register to")
    _, t1w, mask, z = best
    return Path(t1w), Path(mask), z < resolution_mm - 1e-3


def _first(value):
    return value[0] if isinstance(value, list | tuple) else value


def _to_ants(ants, data, img):
    out = nib.Nifti1Image(np.asarray(data, np.float32), img.affine)
    out.header.set_xyzt_units("mm")
    out.header.set_qform(img.affine, code=1)
    out.header.set_sform(img.affine, code=1)
    return ants.from_nibabel_nifti(out)


def register_to_template(
    magnitude,
    brain_mask,
    template_t1w,
    template_mask,
    out_dir,
    *,
    resolution_mm: float = REGISTRATION_DEFAULTS["resolution_mm"],
    syn_iterations=REGISTRATION_DEFAULTS["syn_iterations"],
    n4: bool = REGISTRATION_DEFAULTS["n4"],
    seed: int | None = REGISTRATION_DEFAULTS["seed"],
    threads: int | None = None,
    prefix: str = "reg_",
) -> RegistrationResult:
    """Register a (multi-echo) magnitude to a template: rigid + affine + SyN (antspyx).

    Parameters
    ----------
    magnitude : path or nibabel image
        3D magnitude or 4D multi-echo magnitude (echoes last; combined by root sum of squares).
    brain_mask : path or nibabel image
        Brain mask on the magnitude's grid (the magnitude is masked by it).
    template_t1w, template_mask : path or list of paths
        The template's brain-extracted T1w and brain mask; a list gives one file per
        resolution and the one for ``resolution_mm`` is chosen (:func:`registration_target`).
    out_dir : path
        Folder of the transforms and the warped magnitude.
    resolution_mm : float
        Grid spacing (mm) of the registration's fixed image.
    syn_iterations : sequence of int
        SyN iterations per level (shrink factors 4, 2, 1); ``(40, 20, 0)`` skips the finest.
        The rigid and affine stages use antspyx's ``SyNRA`` schedule (up to 2100, 1200, 1200
        iterations at shrink 4, 2, 2, stopping on convergence).
    n4 : bool
        N4 bias-field correction of the magnitude inside the mask first.
    seed : int or None
        Seed of the metric's random sampling (reproducible runs).
    threads : int, optional
        ITK threads (set before ITK starts in this process).
    prefix : str
        Prefix of the output names in ``out_dir``.

    Returns
    -------
    :class:`RegistrationResult`
        ``forward`` maps the magnitude into the template (ANTs order: to resample a native
        image onto the template, apply ``forward``; labels from the template to native:
        ``inverse``), ``dice`` scores the warped brain mask against the template mask.
    """
    ants = import_ants(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mag_img = magnitude if isinstance(magnitude, nib.Nifti1Image) else nib.load(str(magnitude))
    mask_img = brain_mask if isinstance(brain_mask, nib.Nifti1Image) else nib.load(str(brain_mask))
    mag = np.asarray(mag_img.dataobj, dtype=np.float32)
    if mag.ndim == 4:
        mag = np.sqrt(np.sum(np.square(mag, dtype=np.float64), axis=-1)).astype(np.float32)
    if mag.ndim != 3:
        raise ValueError(f"magnitude must be 3D or 4D, got shape {mag.shape}")
    mask = np.asarray(mask_img.dataobj) > 0
    if mask.shape != mag.shape:
        raise ValueError(f"brain mask {mask.shape} and magnitude {mag.shape} differ in shape")
    if not mask.any():
        raise ValueError("the brain mask is empty: nothing to register")
    mag = np.where(mask, np.nan_to_num(mag), 0.0).astype(np.float32)

    moving = _to_ants(ants, mag, mag_img)
    moving_mask = _to_ants(ants, mask.astype(np.float32), mag_img)
    if n4:
        # a bias field is smooth: 4x shrink and a short schedule (~3 s instead of ~90 s)
        moving = ants.n4_bias_field_correction(
            moving,
            mask=moving_mask,
            shrink_factor=4,
            convergence={"iters": [20, 20, 10], "tol": 1e-6},
        )
        moving = moving * moving_mask

    t1ws = template_t1w if isinstance(template_t1w, list | tuple) else [template_t1w]
    masks = template_mask if isinstance(template_mask, list | tuple) else [template_mask]
    t1w_path, tmask_path, resample = registration_target(t1ws, masks, resolution_mm)
    fixed = ants.image_read(str(t1w_path))
    fixed_mask = ants.image_read(str(tmask_path))
    if resample:
        spacing = (float(resolution_mm),) * 3
        fixed = ants.resample_image(fixed, spacing, use_voxels=False, interp_type=0)
        fixed_mask = ants.resample_image(fixed_mask, spacing, use_voxels=False, interp_type=1)

    syn = tuple(int(i) for i in syn_iterations)
    try:
        from ants import config as ants_config
    except ImportError:  # pragma: no cover - older antspyx
        ants_config = None
    old_seed = getattr(ants_config, "_random_seed", None)
    if ants_config is not None and seed is not None:
        ants_config._random_seed = int(seed)
    try:
        reg = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="SyNRA",
            aff_metric="mattes",
            syn_metric="mattes",
            reg_iterations=syn,
            write_composite_transform=True,
            outprefix=str(out_dir / f"{prefix}ants_"),
        )
    finally:
        if ants_config is not None:
            ants_config._random_seed = old_seed
    forward = out_dir / f"{prefix}forward_xfm.h5"
    inverse = out_dir / f"{prefix}inverse_xfm.h5"
    shutil.move(_first(reg["fwdtransforms"]), forward)
    shutil.move(_first(reg["invtransforms"]), inverse)

    warped_path = out_dir / f"{prefix}warped_magnitude.nii.gz"
    fixed_path = out_dir / f"{prefix}template.nii.gz"
    fixed_mask_path = out_dir / f"{prefix}template_mask.nii.gz"
    ants.image_write(reg["warpedmovout"], str(warped_path))
    ants.image_write(fixed, str(fixed_path))
    ants.image_write(fixed_mask, str(fixed_mask_path))
    warped_mask = ants.apply_transforms(
        fixed=fixed, moving=moving_mask, transformlist=[str(forward)], interpolator="genericLabel"
    )
    score = dice(warped_mask.numpy() > 0.5, fixed_mask.numpy() > 0.5)
    params = {
        "Software": f"ANTs (antspyx {getattr(ants, '__version__', 'unknown')})",
        "Transforms": "Rigid + Affine + SyN (composite)",
        "Metric": "Mattes mutual information",
        "ResolutionMM": float(resolution_mm),
        "SyNIterations": list(syn),
        "RigidAffineSchedule": "2100x1200x1200x0 at shrink 4x2x2x1 (antspyx SyNRA)",
        "N4BiasCorrection": "shrink 4, 20x20x10 iterations" if n4 else False,
        "RandomSeed": seed,
        "FixedImage": Path(t1w_path).name,
    }
    return RegistrationResult(
        forward=forward.absolute(),
        inverse=inverse.absolute(),
        warped=warped_path.absolute(),
        fixed=fixed_path.absolute(),
        fixed_mask=fixed_mask_path.absolute(),
        dice=score,
        parameters=params,
    )


def apply_transforms(
    moving,
    reference,
    transforms,
    out_file,
    *,
    interpolation: str = "linear",
    threads: int | None = None,
) -> Path:
    """Resample ``moving`` onto the grid of ``reference`` through ANTs transforms.

    Parameters
    ----------
    moving, reference : path
        NIfTI images (3D).
    transforms : path or list of paths
        Composite ``.h5`` (or ANTs transform files, applied last-first as in ANTs).
    out_file : path
        Output NIfTI; it gets the reference's grid (affine and shape).
    interpolation : str
        ``linear`` (maps), ``genericLabel`` (label images: a Gaussian-weighted vote per label,
        smoother than nearest neighbour), ``nearestNeighbor``, ``bSpline``.
    """
    ants = import_ants(threads)
    transforms = [
        str(t) for t in (transforms if isinstance(transforms, list | tuple) else [transforms])
    ]
    mov = ants.image_read(str(moving))
    ref = ants.image_read(str(reference))
    out = ants.apply_transforms(
        fixed=ref, moving=mov, transformlist=transforms, interpolator=interpolation
    )
    ref_img = nib.load(str(reference))
    data = out.numpy()
    if interpolation in ("genericLabel", "nearestNeighbor"):
        data = np.rint(data).astype(np.int16)
    else:
        data = data.astype(np.float32)
    img = nib.Nifti1Image(data, ref_img.affine)
    img.header.set_qform(ref_img.affine, code=1)
    img.header.set_sform(ref_img.affine, code=1)
    nib.save(img, str(out_file))
    return Path(out_file).absolute()
