"""Phase unwrapping: Laplacian, quality-guided, phase-offset removal, multi-echo."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmprep.recon import ppm_to_hz
from qsmprep.recon._backend import count_ffts, irfftn, rfftn
from qsmprep.recon.kernels import padded_shape, smv_kernel
from qsmprep.recon.mask import largest_component
from qsmprep.recon.unwrap import (
    remove_phase_offset,
    unwrap_laplacian,
    unwrap_multi_echo,
    unwrap_quality_guided,
    wrap_phase,
)
from qsmprep.sim import simulate_gre

TWO_PI = 2 * np.pi
ECHO_TIMES = (0.004, 0.008, 0.012, 0.016, 0.020)


def _edges(ax):
    hi = [slice(None)] * 3
    lo = [slice(None)] * 3
    hi[ax] = slice(1, None)
    lo[ax] = slice(None, -1)
    return tuple(hi), tuple(lo)


def _safe_mask(phi, mask, limit):
    """Largest component of ``mask`` minus every voxel on an edge with |dphi| >= limit."""
    bad = np.zeros(mask.shape, bool)
    for ax in range(3):
        hi, lo = _edges(ax)
        d = np.abs(phi[hi] - phi[lo]) >= limit
        bad[hi] |= d
        bad[lo] |= d
    return largest_component(mask & ~bad)


def _laplacian(x, vs):
    """7-point Laplacian (periodic; only used away from the array border)."""
    vs = np.broadcast_to(np.asarray(vs, dtype=float), (3,))
    return sum((np.roll(x, 1, a) + np.roll(x, -1, a) - 2 * x) / vs[a] ** 2 for a in range(3))


def _smv_highpass(x, mask, vs, radius):
    """``x - SMV_r * x`` and the mask eroded by ``radius`` mm where it is valid."""
    d = np.where(mask, x, 0.0)
    grid = padded_shape(d.shape, 8)
    s = smv_kernel(grid, vs, radius)
    hp = d - irfftn(s * rfftn(d, s=grid), s=grid)[: d.shape[0], : d.shape[1], : d.shape[2]]
    inner = ndi.distance_transform_edt(np.pad(mask, 1), sampling=vs)[1:-1, 1:-1, 1:-1] > radius
    return hp, inner


def _remove_global_2pi(d):
    return d - TWO_PI * np.round(np.median(d) / TWO_PI)


@pytest.fixture(scope="module")
def smooth_phase(phantom, phantom_fields):
    """Total-field phase at TE 20 ms (+1 rad) of the 3 mm phantom and a mask where it is
    smooth (all neighbour differences < pi/2): it spans ~16 rad, i.e. wraps several times."""
    f_hz = ppm_to_hz(np.asarray(phantom_fields["total_ppm"], np.float64), 3.0)
    truth = TWO_PI * f_hz * 0.020 + 1.0
    mask = _safe_mask(truth, phantom.brain_mask, np.pi / 2)
    assert np.ptp(truth[mask]) > 4 * np.pi
    return truth, mask


@pytest.fixture(scope="module")
def gre2mm_clean(phantom2mm, phantom2mm_fields):
    """Noiseless 5-echo GRE of ``phantom2mm`` with a phase offset."""
    return simulate_gre(phantom2mm, ECHO_TIMES, snr=None, seed=0, fields=phantom2mm_fields)


# ------------------------------------------------------------------------------------------


def test_wrap_phase_range_and_congruence():
    x = np.linspace(-40, 40, 10001)
    w = wrap_phase(x)
    assert w.min() >= -np.pi and w.max() < np.pi
    k = (x - w) / TWO_PI
    assert np.abs(k - np.round(k)).max() < 1e-12
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(wrap_phase(torch.as_tensor(x)).numpy(), w, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Laplacian


@pytest.mark.parametrize("method", ["wrapped", "schofield"])
def test_laplacian_unwrap_matches_truth_up_to_harmonic(smooth_phase, method):
    truth, mask = smooth_phase
    vs = 3.0
    u = unwrap_laplacian(wrap_phase(truth), vs, mask=mask, method=method).astype(np.float64)
    assert np.all(u[~mask] == 0)
    interior = ndi.binary_erosion(mask)
    lap_u, lap_t = _laplacian(u, vs), _laplacian(truth, vs)
    rel = np.abs(lap_u - lap_t)[interior].max() / np.abs(lap_t[interior]).max()
    diff = u - truth
    hp, inner = _smv_highpass(diff, mask, vs, 6.0)
    raw_rms = np.std(diff[mask])
    hp_rms = np.sqrt(np.mean(hp[inner] ** 2))
    # the output is not congruent: the raw difference is a harmonic field of ~0.9 rad rms
    assert raw_rms > 0.3
    if method == "wrapped":
        # exact discrete Laplacian of wrapped differences: measured 6e-7 (float32 round-off)
        assert rel < 1e-5
        # the harmonic difference survives an SMV (r = 6 mm) high-pass only as the
        # discretisation error of the mean-value property: measured max 0.011, rms 8.6e-4 rad
        assert np.abs(hp[inner]).max() < 0.03
        assert hp_rms < 2e-3
    else:
        # sin(dphi) instead of dphi underestimates steep phase: measured 0.24 relative
        assert rel < 0.35
        # measured max 0.145, rms 4.3e-3 rad
        assert np.abs(hp[inner]).max() < 0.25
        assert hp_rms < 8e-3


@pytest.mark.parametrize(("method", "n_fft"), [("wrapped", 2), ("schofield", 6)])
def test_laplacian_unwrap_fft_count_and_torch(smooth_phase, method, n_fft):
    truth, mask = smooth_phase
    w = wrap_phase(truth)
    with count_ffts() as c:
        u = unwrap_laplacian(w, (3.0, 3.0, 3.0), mask=mask, method=method, pad=8)
    assert len(c) == n_fft
    assert all(shape == padded_shape(truth.shape, 8) for _, shape in c.calls)
    pytest.importorskip("torch")
    ut = unwrap_laplacian(w, 3.0, mask=mask, method=method, pad=8, device="torch")
    # float32 on both backends: measured 7e-7 rad apart
    assert np.abs(ut - u).max() < 1e-4


def test_laplacian_unwrap_honours_voxel_size():
    # phi = a z^2 along an anisotropic axis: Laplacian 2a per mm^2 everywhere
    vs = (1.0, 1.0, 2.5)
    shape = (24, 24, 40)
    z = (np.arange(shape[2]) - shape[2] / 2) * vs[2]
    truth = np.broadcast_to(0.01 * z**2, shape).copy()  # 25 rad, steps up to 2.5 rad
    u = unwrap_laplacian(wrap_phase(truth), vs).astype(np.float64)
    lap = _laplacian(u, vs)[(slice(1, -1),) * 3]
    # exact inside the array (Neumann boundary): measured error ~1e-5 (float32)
    np.testing.assert_allclose(lap, 0.02, atol=2e-4)
    # with the voxel size ignored the Laplacian would be 0.02 * 2.5**2 = 0.125
    assert np.abs(_remove_global_2pi(np.median(u - truth))) < np.pi


# ------------------------------------------------------------------------------------------
# Quality-guided


@pytest.mark.parametrize("method", ["skimage", "romeo"])
def test_quality_guided_exact_on_phantom(phantom, phantom_fields, method):
    f_hz = ppm_to_hz(np.asarray(phantom_fields["total_ppm"], np.float64), 3.0)
    truth = TWO_PI * f_hz * 0.010 + 0.7  # spans 42 rad in the brain
    mask = _safe_mask(truth, phantom.brain_mask, np.pi)
    kw = {"magnitude": phantom.m0} if method == "romeo" else {}
    u = unwrap_quality_guided(wrap_phase(truth), mask=mask, method=method, **kw)
    d = _remove_global_2pi((u - truth)[mask])
    # exact up to one global 2 pi k where all neighbour differences are < pi
    assert np.abs(d).max() < 1e-4
    assert np.all(u[~mask] == 0)
    # the full brain mask includes CSF voxels next to air where the field is undersampled
    # at 3 mm; at TE 4 ms 764 voxels touch an edge with a step >= pi and measured 14
    # (skimage) and 11 (ROMEO) voxels of 50316 get a wrong 2 pi; the rest stays exact
    truth = TWO_PI * f_hz * 0.004 + 0.7
    u = unwrap_quality_guided(wrap_phase(truth), mask=phantom.brain_mask, method=method, **kw)
    d = _remove_global_2pi((u - truth)[phantom.brain_mask])
    assert np.count_nonzero(np.abs(d) > 1e-4) < 40


@pytest.mark.parametrize("method", ["skimage", "romeo"])
def test_quality_guided_congruent_with_noise_and_islands(smooth_phase, method):
    truth, mask = smooth_phase
    rng = np.random.default_rng(3)
    noisy = wrap_phase(truth + rng.normal(0.0, 0.4, truth.shape))
    # cut the mask into separate islands with a 2-voxel gap
    cut = mask.copy()
    cut[:, 30:32, :] = False
    assert ndi.label(cut)[1] >= 2
    kw = {"magnitude": np.ones(truth.shape)} if method == "romeo" else {}
    u = unwrap_quality_guided(noisy, mask=cut, method=method, **kw)
    k = (u - noisy)[cut] / TWO_PI
    # congruence: an integer number of turns everywhere (float64 round-off)
    assert np.abs(k - np.round(k)).max() < 1e-9
    # islands are aligned to the largest one and the result follows the truth: with 0.4 rad
    # noise, measured 0 voxels off by 2 pi
    d = _remove_global_2pi((u - truth)[cut])
    assert np.mean(np.abs(d) > np.pi) < 1e-3
    # noiseless: exact on every island
    u0 = unwrap_quality_guided(wrap_phase(truth), mask=cut, method=method, **kw)
    assert np.abs(_remove_global_2pi((u0 - truth)[cut])).max() < 1e-4


def test_quality_guided_global_offset_rule():
    # a ramp from -3 to +12 rad: the median of round(u / 2 pi) over the mask is set to 0
    ramp = np.broadcast_to(np.linspace(-3, 12, 40)[:, None, None], (40, 8, 8)).copy()
    u = unwrap_quality_guided(wrap_phase(ramp))
    assert np.median(np.round(u / TWO_PI)) == 0
    assert np.abs(_remove_global_2pi(u - ramp)).max() < 1e-9


# ------------------------------------------------------------------------------------------
# Multi-echo


def test_remove_phase_offset_recovers_offset(phantom2mm, gre2mm):
    brain = phantom2mm.brain_mask
    corrected, phi0 = remove_phase_offset(
        gre2mm.phase, gre2mm.magnitude, gre2mm.echo_times, voxel_size=2.0
    )
    err = wrap_phase(phi0 - gre2mm.phase_offset)[brain]
    # SNR 100: measured max 0.035 rad (edge bias of the smoothing), rms 0.0045 rad
    assert np.abs(err).max() < 0.08
    assert np.sqrt(np.mean(err**2)) < 0.01
    # the corrected echoes are 2 pi f TE: echo 1 agrees with the true field phase
    true1 = wrap_phase(TWO_PI * gre2mm.total_field_hz * gre2mm.echo_times[0])
    e1 = wrap_phase(corrected[..., 0] - true1)[brain]
    assert np.percentile(np.abs(e1), 99) < 0.08  # measured 0.038 rad (noise + offset error)
    assert corrected.shape == gre2mm.phase.shape


def _field_errors(u, gre, mask):
    return (u / (TWO_PI * gre.echo_times) - gre.total_field_hz[..., None])[mask]


def test_unwrap_multi_echo_quality_exact_without_offset(phantom2mm, phantom2mm_fields):
    gre = simulate_gre(
        phantom2mm, ECHO_TIMES, snr=None, phase_offset=False, fields=phantom2mm_fields
    )
    brain = phantom2mm.brain_mask
    u = unwrap_multi_echo(
        gre.phase, gre.magnitude, gre.echo_times, mask=brain, remove_offset=False
    )
    err = np.abs(_field_errors(u, gre, brain))
    # essentially exact (float32 phase: < 1e-3 Hz) except where the field is undersampled
    # next to air (~1800 voxels touch an edge with a step > pi at TE 4 ms): measured 17
    # voxels of ~158000 off by one turn of echo 1 (250 Hz); the count depends on how those
    # steps happen to wrap, hence the margin
    bad = np.any(err > 1e-3, axis=1)
    assert bad.sum() < 60
    assert np.all(u[~brain] == 0)


@pytest.mark.parametrize("noisy", [False, True])
def test_unwrap_multi_echo_quality_field(phantom2mm, gre2mm, gre2mm_clean, noisy):
    gre = gre2mm if noisy else gre2mm_clean
    brain = phantom2mm.brain_mask
    u = unwrap_multi_echo(gre.phase, gre.magnitude, gre.echo_times, mask=brain, voxel_size=2.0)
    err = np.abs(_field_errors(u, gre, brain))
    # measured 17 voxels off by a turn (undersampled field next to air, see above)
    assert np.count_nonzero(np.any(err > 10, axis=1)) < 60
    p99 = np.percentile(err, 99, axis=0)
    if noisy:
        # SNR 100: measured p99 [1.49 0.81 0.58 0.46 0.40] Hz, median 0.38 Hz at echo 1
        assert np.all(p99 < [3.0, 1.6, 1.2, 1.0, 0.8])
    else:
        # offset-estimate residual only: measured p99 [0.71 0.35 0.24 0.18 0.14] Hz
        assert np.all(p99 < [1.4, 0.7, 0.5, 0.35, 0.3])
    # every echo is congruent with the offset-corrected input: one field at every TE
    # (late echoes more precise), so echo-to-echo agreement is within the echo-1 error
    assert np.median(err[:, -1]) < np.median(err[:, 0])


def test_unwrap_multi_echo_laplacian_field(phantom2mm, gre2mm):
    brain = phantom2mm.brain_mask
    u = unwrap_multi_echo(
        gre2mm.phase,
        gre2mm.magnitude,
        gre2mm.echo_times,
        mask=brain,
        method="laplacian",
        voxel_size=2.0,
    )
    err = u / (TWO_PI * gre2mm.echo_times) - gre2mm.total_field_hz[..., None]
    for n in range(len(ECHO_TIMES)):
        raw_rms = np.std(err[..., n][brain])
        hp, inner = _smv_highpass(err[..., n], brain, 2.0, 6.0)
        hp_rms = np.sqrt(np.mean(hp[inner] ** 2))
        # not congruent: ~11-14 Hz rms harmonic difference; after an SMV (6 mm) high-pass
        # measured 0.34-0.60 Hz rms (noise, and steep fields next to air)
        assert raw_rms > 5.0
        assert hp_rms < 1.2


# ------------------------------------------------------------------------------------------
# Input validation


def test_validation_errors(gre2mm, phantom2mm):
    brain = phantom2mm.brain_mask
    p, m, te = gre2mm.phase, gre2mm.magnitude, gre2mm.echo_times
    p1 = p[..., 0]
    with pytest.raises(ValueError, match="3D"):
        unwrap_laplacian(p, 2.0)
    with pytest.raises(ValueError, match="3D"):
        unwrap_quality_guided(p)
    with pytest.raises(ValueError, match="voxel_size"):
        unwrap_laplacian(p1, (2.0, -1.0, 2.0))
    with pytest.raises(ValueError, match="mask has shape"):
        unwrap_laplacian(p1, 2.0, mask=brain[:-1])
    with pytest.raises(ValueError, match="all zero"):
        unwrap_quality_guided(p1, mask=np.zeros_like(brain))
    bad = p1.copy()
    bad[48, 48, 40] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        unwrap_quality_guided(bad, mask=brain)
    with pytest.raises(ValueError, match="non-finite"):
        unwrap_laplacian(bad, 2.0, mask=brain)
    with pytest.raises(ValueError, match="magnitude has shape"):
        unwrap_quality_guided(p1, magnitude=m[:-1, ..., 0])
    with pytest.raises(ValueError, match="method"):
        unwrap_quality_guided(p1, method="bogus")
    with pytest.raises(ValueError, match="romeo"):
        unwrap_quality_guided(p1, magnitude=m[..., 0], method="skimage")
    with pytest.raises(ValueError, match="increasing"):
        unwrap_multi_echo(p, m, te[::-1], mask=brain)
    with pytest.raises(ValueError, match="echo times"):
        unwrap_multi_echo(p, m, te[:3], mask=brain)
    with pytest.raises(ValueError, match="4D"):
        unwrap_multi_echo(p1, m, te, mask=brain)
    with pytest.raises(ValueError, match="magnitude has shape"):
        unwrap_multi_echo(p, m[..., :3], te, mask=brain)
    with pytest.raises(ValueError, match="all zero"):
        unwrap_multi_echo(p, m, te, mask=np.zeros_like(brain))
    with pytest.raises(ValueError, match="voxel_size"):
        unwrap_multi_echo(p, m, te, mask=brain, method="laplacian")
    with pytest.raises(ValueError, match="2 echoes"):
        remove_phase_offset(p[..., :1], m[..., :1], te[:1])
    with pytest.raises(ValueError, match="milliseconds"):
        remove_phase_offset(p, m, np.asarray(te) * 1e3)
