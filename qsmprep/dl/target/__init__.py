"""Target-domain scans for network adaptation: local fields of real (or realistic) data.

:class:`TargetScans` serves random patches of local fields from either

* a **qsmprep output directory** (the BIDS derivative dataset of ``qsmprep ... participant``):
  every ``<prefix>_desc-local_fieldmap.nii.gz`` (Hz) with its
  ``<prefix>_desc-local_mask.nii.gz``, the optional ``<prefix>_desc-noise_fieldmap.nii.gz``
  (Hz, field standard deviation) and the sidecar's ``B0`` (T) and ``EchoTime`` (s); or
* a **BIDS raw dataset**: each multi-echo GRE acquisition found by
  :func:`qsmprep.bids.collect_acquisitions` is run through the field chain
  (:func:`qsmprep.recon.chain.compute_local_field`: mask, unwrapping, echo fit, background
  removal) first.

Fields are converted to ppm (``f_Hz / (GAMMA_BAR B0) 1e6``); the voxel size comes from the
header and the B0 direction in voxel axes from the affine
(:func:`qsmprep.recon.kernels.b0_dir_from_affine`). A reference susceptibility map (COSMOS,
``desc-cosmos_Chimap``, by default the one qsmprep writes for multi-orientation data; any
other ``desc``, a file or a glob pattern) turns the scans into labelled data for transfer
learning. Batches have the keys of :meth:`qsmprep.dl.synth.SyntheticQSMData.batch`, plus
``chi`` when a reference exists (referenced to mean 0 over the patch mask, as the synthetic
chi).

The code lives in two modules: :mod:`qsmprep.dl.target.scans` finds the scans and matches
their references (:func:`find_target_scans`), :mod:`qsmprep.dl.target.patches` serves seeded
patches of them (:class:`TargetScans`). :func:`split_by_subject` divides scans into training and
held-out validation scans, all of a subject's on one side.
"""

from __future__ import annotations

from qsmprep.dl.target.patches import TargetScans
from qsmprep.dl.target.scans import (
    TargetScan,
    detect_source,
    find_target_scans,
    split_by_subject,
)

__all__ = ["TargetScan", "TargetScans", "detect_source", "find_target_scans", "split_by_subject"]
