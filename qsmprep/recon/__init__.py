"""Pure array numerics of the QSM chain (no file I/O, no Nipype).

Modules: ``kernels`` (dipole, SMV, Laplacian, unit conversion, B0 direction), ``mask``,
``unwrap``, ``echo`` (multi-echo field fit), ``background`` (SHARP, V-SHARP, RESHARP, PDF).
Heavy functions take ``device="cpu" | "torch" | "cuda"`` (see ``qsmprep.recon._backend``).
"""

from qsmprep.recon.kernels import (
    GAMMA_BAR,
    b0_dir_from_affine,
    dipole_kernel,
    hz_to_ppm,
    laplace_kernel,
    ppm_to_hz,
    smv_kernel,
)

__all__ = [
    "GAMMA_BAR",
    "b0_dir_from_affine",
    "dipole_kernel",
    "hz_to_ppm",
    "laplace_kernel",
    "ppm_to_hz",
    "smv_kernel",
]
