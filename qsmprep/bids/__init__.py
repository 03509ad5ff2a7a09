"""BIDS input and output: discovery, input checks, phase units, orientations, derivative names.

==========================  ===================================================================
module                      job
==========================  ===================================================================
:mod:`~.acquisition`        :class:`Acquisition` (what the workflows read), :class:`BIDSInputError`
:mod:`~.discovery`          pybids queries: :func:`make_layout`, :func:`collect_acquisitions`
:mod:`~.checks`             validation of one acquisition's files (echoes, sidecars, headers)
:mod:`~.images`             phase units (:func:`detect_phase_units`), :func:`load_phase`,
                            :func:`load_magnitude`
:mod:`~.orientation`        COSMOS orientation groups (:func:`group_orientations`)
:mod:`~.derivatives`        derivative names (:func:`derivative_path`),
                            :func:`write_dataset_description`
==========================  ===================================================================

The names below are importable from ``qsmprep.bids``. Bad input ends in
:class:`BIDSInputError` (a ``ValueError``) whose message names the file and the fix.
"""

from qsmprep.bids.acquisition import SUFFIXES, Acquisition, BIDSInputError
from qsmprep.bids.derivatives import BIDS_VERSION, derivative_path, write_dataset_description
from qsmprep.bids.discovery import collect_acquisitions, make_layout
from qsmprep.bids.images import detect_phase_units, load_magnitude, load_phase
from qsmprep.bids.orientation import COSMOS_MIN_ANGLE_DEG, group_orientations

__all__ = [
    "BIDS_VERSION",
    "COSMOS_MIN_ANGLE_DEG",
    "SUFFIXES",
    "Acquisition",
    "BIDSInputError",
    "collect_acquisitions",
    "derivative_path",
    "detect_phase_units",
    "group_orientations",
    "load_magnitude",
    "load_phase",
    "make_layout",
    "write_dataset_description",
]
