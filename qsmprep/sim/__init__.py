"""Simulation: forward model, numerical head phantom, multi-echo GRE signal, BIDS writer."""

from qsmprep.sim.bids import simulate_bids_dataset, tilt_affine, write_bids_dataset
from qsmprep.sim.fields import shim_basis, simulate_fields
from qsmprep.sim.forward import forward_field
from qsmprep.sim.phantom import make_head_phantom
from qsmprep.sim.signal import GRESignal, phase_offset_map, simulate_gre, wrap_phase
from qsmprep.sim.tissues import BRAIN_LABELS, CHI_AIR, LABEL_NAMES, TISSUE_PROPERTIES, HeadPhantom

__all__ = [
    "BRAIN_LABELS",
    "CHI_AIR",
    "LABEL_NAMES",
    "TISSUE_PROPERTIES",
    "GRESignal",
    "HeadPhantom",
    "forward_field",
    "make_head_phantom",
    "phase_offset_map",
    "shim_basis",
    "simulate_bids_dataset",
    "simulate_fields",
    "simulate_gre",
    "tilt_affine",
    "wrap_phase",
    "write_bids_dataset",
]
