"""qsmprep: quantitative susceptibility mapping as a BIDS App.

Subpackages
-----------
recon     pure array numerics (kernels, unwrap, echo fit, mask, background removal, inversion)
sim       forward model, numerical head phantom, multi-echo GRE signal, BIDS writer
metrics   NRMSE, HFEN, SSIM, XSIM, PSNR, correlation, slope, ROI statistics
"""

from qsmprep.__about__ import __version__

__all__ = ["__version__"]
