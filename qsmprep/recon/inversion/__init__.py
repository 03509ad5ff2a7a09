"""Dipole inversion: local field (ppm) to susceptibility (ppm); ``tfi`` takes the total field.

=============  ==========================================================  ==================
function       method                                                      module
=============  ==========================================================  ==================
``tkd``        truncated k-space division (Shmueli 2009), Schweser corr.   ``direct``
``tsvd``       truncated SVD in k-space (zeroed cone)                      ``direct``
``l2``         closed-form Tikhonov / gradient-regularised L2 (Bilgic)     ``direct``
``tv``         total variation by ADMM (FANSI-style; weighted option)      ``tv``
``medi``       morphology-enabled dipole inversion (Liu 2011/2012)         ``medi``
``tfi``        preconditioned total field inversion (Liu Z 2017)           ``tfi``
``cosmos``     multi-orientation closed form (Liu 2009)                    ``cosmos``
=============  ==========================================================  ==================

Referencing (``reference``): whole-mask mean or an ROI mean. Reference-free quality
(``consistency``): the data-consistency residual of a map against its local field.
"""

from qsmprep.recon.inversion.consistency import data_consistency
from qsmprep.recon.inversion.cosmos import cosmos
from qsmprep.recon.inversion.direct import l2, tkd, tsvd
from qsmprep.recon.inversion.medi import gradient_mask, medi
from qsmprep.recon.inversion.reference import reference_mean, reference_roi
from qsmprep.recon.inversion.tfi import tfi
from qsmprep.recon.inversion.tv import tv

# Eager imports: a lazy ``__getattr__`` would be shadowed by the submodules of the same name
# (``cosmos``, ``medi``, ``tfi``, ``tv``) once they are imported.
__all__ = [
    "cosmos",
    "data_consistency",
    "gradient_mask",
    "l2",
    "medi",
    "reference_mean",
    "reference_roi",
    "tfi",
    "tkd",
    "tsvd",
    "tv",
]
