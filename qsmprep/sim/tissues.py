"""Tissue labels and values of the numerical head, and the container of a rasterised head.

Units: chi in ppm (SI) relative to water (CSF = 0; air +9.4 ppm, bone -2 ppm); R2* in 1/s;
M0 in arbitrary units (CSF = 1); lengths in mm.

Typical values from the literature (susceptibility: Deistung A et al. NeuroImage
2013;65:299-314 and Marques JP et al. MRM 2021;86:526-542; R2*: Peran P et al. Brain
2010;133:3423; Li W et al. NeuroImage 2014;105:229).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BRAIN_LABELS", "CHI_AIR", "LABEL_NAMES", "TISSUE_PROPERTIES", "HeadPhantom"]

CHI_AIR = 9.4
"""Susceptibility of air relative to water (ppm, SI)."""

LABEL_NAMES: dict[int, str] = {
    1: "Caudate",
    2: "Globus pallidus",
    3: "Putamen",
    4: "Red nucleus",
    5: "Dentate nucleus",
    6: "Substantia nigra",
    7: "Thalamus",
    8: "White matter",
    9: "Grey matter (cortex)",
    10: "CSF",
    11: "Venous blood (veins and dural sinuses)",
    13: "Bone (skull)",
    14: "Air (sinuses, airways, outside head)",
    15: "Soft tissue (scalp, face, neck)",
    16: "Calcification",
    17: "Haemorrhage / microbleed",
    18: "Ventricular CSF",
}
"""Segmentation labels (the ``dseg`` of the ground truth)."""

BRAIN_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18)
"""Labels of the intracranial brain mask (brain tissue, CSF, veins, lesions)."""

TISSUE_PROPERTIES: dict[int, tuple[float, float, float]] = {
    # label: (chi ppm relative to CSF, M0, R2* at 3 T in 1/s)
    1: (0.06, 0.75, 22.0),
    2: (0.18, 0.75, 45.0),
    3: (0.05, 0.75, 30.0),
    4: (0.12, 0.75, 35.0),
    5: (0.12, 0.75, 35.0),
    6: (0.15, 0.75, 40.0),
    7: (0.01, 0.75, 21.0),
    8: (-0.03, 0.70, 20.0),
    9: (0.01, 0.80, 15.0),
    10: (0.0, 1.00, 2.0),
    11: (0.40, 0.80, 45.0),
    13: (-2.0, 0.05, 300.0),
    14: (CHI_AIR, 0.0, 0.0),
    15: (0.0, 0.60, 30.0),
    16: (-0.5, 0.30, 120.0),
    17: (0.8, 0.50, 120.0),
    18: (0.0, 1.00, 2.0),
}
"""Per-label (chi ppm, M0, R2* s^-1 at 3 T); R2* scales linearly with B0 (except air)."""


@dataclass
class HeadPhantom:
    """A rasterised numerical head.

    Attributes
    ----------
    chi : (X, Y, Z) float32
        Susceptibility in ppm relative to water (CSF = 0): air +9.4, bone -2.
    labels : (X, Y, Z) int16
        Segmentation, see :data:`LABEL_NAMES`.
    brain_mask : (X, Y, Z) bool
        Intracranial brain including CSF, veins and lesions (:data:`BRAIN_LABELS`).
    head_mask : (X, Y, Z) bool
        Everything that is not air (label 14).
    m0 : (X, Y, Z) float32
        Proton density / steady-state magnitude (0 in air, 0.05 in bone).
    r2star : (X, Y, Z) float32
        1/s at the phantom's field strength ``b0``.
    voxel_size : 3 floats
        mm.
    affine : (4, 4) float
        NIfTI affine (RAS, mm); axial by default (B0 along array axis 2).
    lesions : list of dict
        ``kind``, ``label``, ``centre_mm`` (mm from the centre of the matrix along the array
        axes, i.e. world coordinates of the default axial affine), ``centre_voxel`` (array
        index), ``radius_mm``, ``chi_ppm``.
    b0 : float
        Field strength (T) the R2* map refers to.
    seed : int
        Seed of the anatomy.
    """

    chi: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    m0: np.ndarray
    r2star: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    lesions: list[dict] = field(default_factory=list)
    b0: float = 3.0
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.chi.shape)

    def label_volume_ml(self, label: int | tuple[int, ...]) -> float:
        """Volume (mL) of the voxels carrying ``label`` (or any of several labels)."""
        labs = (label,) if np.isscalar(label) else tuple(label)
        n = int(np.isin(self.labels, labs).sum())
        return n * float(np.prod(self.voxel_size)) / 1000.0
