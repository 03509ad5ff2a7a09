"""Wrapped-phase conventions shared by the unwrapping modules.

``TWO_PI``, :func:`wrap_phase` (radians to ``[-pi, pi)``), :func:`as_mask` (the mask argument
of the unwrapping functions) and :func:`global_2pi` (ROMEO's global 2 pi offset rule).
"""

from __future__ import annotations

import numpy as np

from qsmprep.recon._backend import is_torch, to_numpy
from qsmprep.recon._checks import check_mask

__all__ = ["TWO_PI", "as_mask", "global_2pi", "wrap_phase"]

TWO_PI = 2.0 * np.pi


def wrap_phase(phase):
    """Wrap radians to ``[-pi, pi)``: ``phi - 2 pi floor((phi + pi) / 2 pi)`` (NumPy or torch)."""
    if is_torch(phase):
        import torch

        return phase - TWO_PI * torch.floor((phase + np.pi) / TWO_PI)
    p = np.asarray(phase)
    return p - TWO_PI * np.floor((p + np.pi) / TWO_PI)


def as_mask(mask, shape) -> np.ndarray:
    """``mask`` as a bool NumPy array of ``shape`` (checked); all True when None."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    return np.asarray(to_numpy(check_mask(mask, "mask", shape)), dtype=bool)


def global_2pi(u: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Subtract ``2 pi median(round(u / 2 pi))`` over the mask (ROMEO ``correctglobal``)."""
    k = np.round(np.median(np.round(u[mask] / TWO_PI)))
    return u - TWO_PI * k if k else u
