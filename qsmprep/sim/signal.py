"""Multi-echo gradient-echo (GRE) signal of a head phantom: magnitude and wrapped phase."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsmprep.recon._checks import check_echo_times
from qsmprep.recon.kernels import ppm_to_hz
from qsmprep.sim.fields import simulate_fields
from qsmprep.sim.tissues import HeadPhantom

__all__ = ["GRESignal", "phase_offset_map", "simulate_gre", "wrap_phase"]


@dataclass
class GRESignal:
    """Simulated multi-echo GRE data with its ground truth.

    Attributes
    ----------
    magnitude : (X, Y, Z, E) float32
        ``|S|``, same units as the phantom's M0.
    phase : (X, Y, Z, E) float32
        ``angle(S)`` wrapped to [-pi, pi) (rad).
    echo_times : (E,) float
        s.
    b0 : float
        T.
    phase_offset : (X, Y, Z) float32
        The echo-independent offset phi0 (rad, unwrapped) that was added.
    noise_std : float
        Standard deviation of each of the real and imaginary parts of the complex noise
        (magnitude units); 0 when noiseless.
    total_field_hz, local_field_hz : (X, Y, Z) float32
        Ground-truth total field (over the head) and local field (over the brain), Hz.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    echo_times: np.ndarray
    b0: float
    phase_offset: np.ndarray
    noise_std: float
    total_field_hz: np.ndarray
    local_field_hz: np.ndarray

    @property
    def complex(self) -> np.ndarray:
        """``magnitude * exp(i phase)`` as complex64 (X, Y, Z, E)."""
        return (self.magnitude * np.exp(1j * self.phase)).astype(np.complex64)


def wrap_phase(phase):
    """Phase wrapped to [-pi, pi): ``phase - 2 pi floor((phase + pi) / (2 pi))``."""
    p = np.asarray(phase)
    two_pi = np.asarray(2 * np.pi, dtype=p.dtype if p.dtype.kind == "f" else float)
    return p - two_pi * np.floor((p + np.pi) / two_pi)


def phase_offset_map(shape, voxel_size, *, seed: int = 0, span: float = 3.0) -> np.ndarray:
    """Smooth echo-independent phase offset phi0 (rad): a constant plus a random polynomial.

    ``phi0 = c + sum_j a_j p_j(r)`` with ``c ~ U(-pi, pi)`` and ``p_j`` the linear and
    quadratic monomials of the position (mm from the centre of the matrix, divided by 100 mm);
    the coefficients are Gaussian, scaled so that the polynomial spans ``span`` rad over the
    cube of +-100 mm (the same map at any voxel size). Models the transmit/receive phase of a
    combined coil image.
    """
    rng = np.random.default_rng(seed)
    c = rng.uniform(-np.pi, np.pi)
    a = rng.standard_normal(9)

    def poly(x, y, z):
        terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
        return sum(coef * t for coef, t in zip(a, terms, strict=True))

    # scale so that the polynomial spans ``span`` rad over the reference cube of +-100 mm
    ref = np.linspace(-1.0, 1.0, 9)
    a *= span / np.ptp(poly(ref[:, None, None], ref[None, :, None], ref[None, None, :]))
    axes = [
        ((np.arange(n) - (n - 1) / 2.0) * v / 100.0).reshape(
            [-1 if i == k else 1 for k in range(3)]
        )
        for i, (n, v) in enumerate(zip(shape, np.broadcast_to(voxel_size, 3), strict=True))
    ]
    phi = c + poly(*axes) + np.zeros(tuple(shape))
    return phi.astype(np.float32)


def simulate_gre(
    phantom: HeadPhantom,
    echo_times=(0.004, 0.008, 0.012, 0.016, 0.020),
    *,
    b0: float = 3.0,
    b0_dir=None,
    snr: float | None = 100.0,
    phase_offset: bool = True,
    seed: int = 0,
    fields: dict | None = None,
) -> GRESignal:
    """Multi-echo GRE signal of a phantom with R2* decay, phase offset, field and noise.

    ``S_n = M0 exp(-R2* TE_n) exp(i (phi0 + 2 pi f TE_n)) + sigma (e1 + i e2)``, e1, e2 ~
    N(0, 1), with f the total field (Hz) from :func:`simulate_fields` (positive chi -> positive
    field along B0 -> phase increasing with TE), phi0 from :func:`phase_offset_map` (or 0) and
    ``sigma = max_brain(M0 exp(-R2* TE_1)) / snr`` (peak signal of echo 1 in the brain over the
    noise std of each channel). Air has M0 = 0: noise only.

    Parameters
    ----------
    phantom : HeadPhantom
    echo_times : sequence of float
        s, positive and strictly increasing.
    b0 : float
        T. R2* is scaled from the phantom's field strength by ``b0 / phantom.b0``.
    b0_dir : 3 floats, optional
        B0 direction in voxel coordinates; default from the phantom affine. Used only to
        compute the fields when ``fields`` is not given.
    snr : float or None
        Peak SNR of echo 1 in the brain; None or inf for noiseless data.
    phase_offset : bool
        Add a smooth phi0 (a few rad span); else phi0 = 0.
    seed : int
        Seed of phi0 and of the noise.
    fields : dict, optional
        Output of :func:`simulate_fields` to reuse (its ppm maps are converted at ``b0``).

    Returns
    -------
    GRESignal
    """
    te = check_echo_times(echo_times)
    if not b0 > 0:
        raise ValueError(f"b0 must be positive (T), got {b0!r}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive (or None for noiseless data), got {snr!r}")
    if fields is None:
        fields = simulate_fields(phantom, b0_dir=b0_dir, b0=b0)
    total_hz = ppm_to_hz(np.asarray(fields["total_ppm"], np.float32), b0).astype(np.float32)
    local_hz = ppm_to_hz(np.asarray(fields["local_ppm"], np.float32), b0).astype(np.float32)
    shape = phantom.shape
    if total_hz.shape != shape:
        raise ValueError(
            f"fields have shape {total_hz.shape} but the phantom has shape {shape};"
            " pass the fields of this phantom"
        )
    rng = np.random.default_rng(seed)
    offset_seed = int(rng.integers(2**31))
    if phase_offset:
        phi0 = phase_offset_map(shape, phantom.voxel_size, seed=offset_seed)
    else:
        phi0 = np.zeros(shape, np.float32)

    m0 = np.asarray(phantom.m0, np.float32)
    r2 = np.asarray(phantom.r2star, np.float32) * np.float32(b0 / phantom.b0)
    peak = float((m0 * np.exp(-r2 * np.float32(te[0])))[phantom.brain_mask].max())
    sigma = 0.0 if snr is None or not np.isfinite(snr) else peak / float(snr)

    mag = np.empty((*shape, te.size), np.float32)
    pha = np.empty((*shape, te.size), np.float32)
    for n, t in enumerate(te):
        t32 = np.float32(t)
        ang = phi0 + (2 * np.pi * t) * total_hz.astype(np.float64)  # float64: exact phase
        s = (m0 * np.exp(-r2 * t32)) * np.exp(1j * ang).astype(np.complex64)
        if sigma > 0:
            s.real += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
            s.imag += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
            mag[..., n] = np.abs(s)
            pha[..., n] = wrap_phase(np.angle(s))
        else:
            # noiseless: the phase is exact even where M0 = 0
            mag[..., n] = np.abs(s)
            pha[..., n] = wrap_phase(ang)
    return GRESignal(
        magnitude=mag,
        phase=pha,
        echo_times=te,
        b0=float(b0),
        phase_offset=phi0,
        noise_std=float(sigma),
        total_field_hz=total_hz,
        local_field_hz=local_hz,
    )
