"""Nipype interfaces over :mod:`qsmprep.recon` and :mod:`qsmprep.metrics`: load, call, save.

==========================  ==========================================================  ===========
interface                   does                                                        module
==========================  ==========================================================  ===========
``LoadEchoes``              per-echo magnitude + phase -> 4D magnitude, 4D phase (rad)  field
``BrainMask``               brain mask from magnitude or phase quality                  field
``UnwrapPhase``             multi-echo unwrapping                                       field
``FitField``                multi-echo fit: total field and its std (Hz), fit residual  field
``FieldReliability``        unreliable field voxels (fit residual); trimmed brain mask  field
``ProvidedMask``            the user's brain mask, checked against the magnitude grid   field
``ProvidedField``           the user's total field (Hz) and its noise map (no fit)      field
``RemoveBackground``        background removal: local field (Hz) and its mask           field
``DipoleInversion``         one inversion method -> referenced chi (ppm), DC residual   inversion
``DeepInversion``           one trained network -> referenced chi (ppm), DC residual    inversion
``Cosmos``                  multi-orientation COSMOS -> referenced chi (ppm)            inversion
``R2StarMap``               4D magnitude -> R2* (1/s), T2* (s), S0 in the brain mask    r2star
``ComputeMetrics``          metrics per method -> TSV + JSON                            metrics
``ComputeSWI``              magnitude + total field -> SWI, minIP, combined magnitude   swi
``ComputeSMWI``             combined magnitude + Chimap -> para-/diamagnetic SMWI       swi
``WriteDerivative``         atomic copy into the derivative dataset + JSON sidecar      derivatives
``RegisterToTemplate``      magnitude -> template: ANTs rigid + affine + SyN            space
``AtlasToNative``           template atlas labels warped to the acquisition             space
``ROIStatistics``           chi statistics per atlas region -> TSV                      space
``ReferenceToRegion``       chi referenced to a region (atlas ventricles: CSF)          space
``ApplyTemplateTransform``  chi map resampled into template space                       space
``RegistrationFigure``      template edges over the warped magnitude (report)           space
==========================  ==========================================================  ===========

Interfaces hold no algorithm: each loads NIfTI with nibabel, calls one numerical function and
saves its results into the node's working directory with deterministic names and contents,
so that Nipype's hash-based cache lets a rerun reuse finished nodes.
"""

from qsmprep.interfaces.derivatives import WriteDerivative
from qsmprep.interfaces.field import (
    BrainMask,
    FieldReliability,
    FitField,
    LoadEchoes,
    ProvidedField,
    ProvidedMask,
    RemoveBackground,
    UnwrapPhase,
)
from qsmprep.interfaces.inversion import (
    DL_METHODS,
    INVERSION_METHODS,
    Cosmos,
    DeepInversion,
    DipoleInversion,
)
from qsmprep.interfaces.metrics import METRIC_COLUMNS, ComputeMetrics
from qsmprep.interfaces.r2star import R2StarMap
from qsmprep.interfaces.space import (
    ApplyTemplateTransform,
    AtlasToNative,
    ReferenceToRegion,
    RegisterToTemplate,
    RegistrationFigure,
    ROIStatistics,
)
from qsmprep.interfaces.swi import ComputeSMWI, ComputeSWI

__all__ = [
    "ApplyTemplateTransform",
    "AtlasToNative",
    "ReferenceToRegion",
    "RegisterToTemplate",
    "RegistrationFigure",
    "ROIStatistics",
    "DL_METHODS",
    "INVERSION_METHODS",
    "METRIC_COLUMNS",
    "BrainMask",
    "ComputeMetrics",
    "ComputeSMWI",
    "ComputeSWI",
    "Cosmos",
    "DeepInversion",
    "DipoleInversion",
    "FieldReliability",
    "FitField",
    "LoadEchoes",
    "ProvidedField",
    "ProvidedMask",
    "R2StarMap",
    "RemoveBackground",
    "UnwrapPhase",
    "WriteDerivative",
]
