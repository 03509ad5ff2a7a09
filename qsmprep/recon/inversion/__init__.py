"""Dipole inversion: local field (ppm) to susceptibility (ppm).

=============  ==========================================================  ==================
function       method                                                      module
=============  ==========================================================  ==================
``tkd``        truncated k-space division (Shmueli 2009), Schweser corr.   ``direct``
``tsvd``       truncated SVD in k-space (zeroed cone)                      ``direct``
``l2``         closed-form Tikhonov / gradient-regularised L2 (Bilgic)     ``direct``
``tv``         total variation by ADMM (FANSI-style; weighted option)      ``tv``
``medi``       morphology-enabled dipole inversion (Liu 2011/2012)         ``medi``
``cosmos``     multi-orientation closed form (Liu 2009)                    ``cosmos``
=============  ==========================================================  ==================

Referencing (``reference``): whole-mask mean or an ROI mean.
"""

from importlib import import_module

_EXPORTS = {
    "tkd": "direct",
    "tsvd": "direct",
    "l2": "direct",
    "tv": "tv",
    "medi": "medi",
    "gradient_mask": "medi",
    "cosmos": "cosmos",
    "reference_mean": "reference",
    "reference_roi": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"qsmprep.recon.inversion.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qsmprep.recon.inversion' has no attribute {name!r}")
