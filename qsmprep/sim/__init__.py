"""Simulation: forward model, numerical head phantom, multi-echo GRE signal, BIDS writer."""

from qsmprep.sim.forward import forward_field

__all__ = ["forward_field"]
