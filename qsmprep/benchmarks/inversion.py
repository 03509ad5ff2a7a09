"""``qsmprep-bench inversion``: time, FFTs and accuracy of each dipole inversion.

Times each dipole inversion on a simulated head (noisy local field) and scores it against the
true susceptibility (NRMSE, HFEN, SSIM, XSIM); COSMOS gets several head orientations.
"""

from __future__ import annotations

import time

import numpy as np

from qsmprep.__about__ import __version__
from qsmprep.benchmarks.timing import fft_pair_seconds, sync
from qsmprep.methods import get, names, resolve

__all__ = ["INVERSION_METHODS", "bench_inversion"]


INVERSION_METHODS = names("inversion", kind=("classical", "multi-orientation"))
"""Choices of ``qsmprep-bench inversion --methods``: the inversions of one or several
orientations that run on arrays (the networks run in ``accuracy``)."""


def bench_inversion(
    *,
    shape=(224, 224, 160),
    voxel_size=(1.0,),
    b0: float = 3.0,
    noise_hz: float = 0.38,
    snr: float = 100.0,
    orientations: int = 3,
    seed: int = 0,
    methods=INVERSION_METHODS,
    device: str = "cpu",
) -> dict:
    """Time and score each dipole inversion on one simulated head (noisy local field).

    Parameters
    ----------
    shape : 3 ints
        Grid of the simulated head.
    voxel_size : 1 or 3 floats
        Voxel size (mm); one value is isotropic.
    b0 : float
        Field strength (T).
    noise_hz : float
        Standard deviation of the noise added to the local field (Hz).
    snr : float
        SNR of the magnitude (MEDI's edge weights).
    orientations : int
        Head orientations of COSMOS.
    seed : int
        Seed of the phantom and the noise.
    methods : iterable of str
        From :data:`INVERSION_METHODS`.
    device : str
        ``"cpu"`` (NumPy/scipy), ``"torch"`` (CPU) or ``"cuda"``.

    Returns
    -------
    dict
        ``rows``: per method the wall time, iterations, FFT-equivalents, time per
        FFT-equivalent, ratio to the FFT time, NRMSE, HFEN, SSIM and XSIM against the truth;
        the FFT pair time and the settings.
    """
    import inspect

    from qsmprep import metrics
    from qsmprep.recon._backend import count_ffts
    from qsmprep.recon.kernels import b0_dir_from_affine, hz_to_ppm
    from qsmprep.sim import make_head_phantom, simulate_fields, simulate_gre

    shape = tuple(shape)
    vs = tuple(voxel_size) * 3 if len(voxel_size) == 1 else tuple(voxel_size)
    t0 = time.perf_counter()
    ph = make_head_phantom(shape, vs, seed=seed)
    b0_dir = b0_dir_from_affine(ph.affine)
    fields = simulate_fields(ph, b0=b0)
    mask = ph.brain_mask
    rng = np.random.default_rng(seed)
    noise_ppm = noise_hz * float(hz_to_ppm(1.0, b0))
    local = (fields["local_ppm"] + rng.normal(0.0, noise_ppm, shape) * mask).astype(np.float32)
    truth = np.where(mask, ph.chi, 0.0).astype(np.float32)
    te = (0.004, 0.008, 0.012, 0.016, 0.020)
    magnitude = simulate_gre(ph, te, b0=b0, snr=snr, seed=seed).magnitude[..., 0]
    cosmos_inputs = None
    if any(get(m).kind == "multi-orientation" for m in methods):
        dirs = [np.array(b0_dir)]
        for ax, ang in ((0, 25.0), (1, -25.0), (0, -20.0))[: orientations - 1]:
            t = np.deg2rad(ang)
            c, s_ = np.cos(t), np.sin(t)
            rot = np.eye(3)
            i, j = [a for a in range(3) if a != ax][:2]
            rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s_, s_, c
            dirs.append(rot @ np.array(b0_dir))
        cosmos_inputs = (
            [
                simulate_fields(ph, b0_dir=tuple(d), b0=b0)["local_ppm"]
                + rng.normal(0.0, noise_ppm, shape) * mask
                for d in dirs
            ],
            [tuple(d) for d in dirs],
        )
    t_sim = time.perf_counter() - t0
    print(
        f"# qsmprep {__version__} inversion benchmark: {shape} at {vs} mm, {b0} T, "
        f"local-field noise {noise_hz} Hz ({noise_ppm:.4f} ppm), device {device}; "
        f"simulation {t_sim:.1f} s (not counted)",
        flush=True,
    )
    pair = fft_pair_seconds(shape, device)
    print(f"# one rfftn + irfftn pair of {shape} (float32): {1e3 * pair:.1f} ms", flush=True)

    rows = []
    for name in methods:
        info: dict = {}
        record, func = get(name), resolve(name)
        kw = {"b0_dir": b0_dir, "device": device}
        if "info" in inspect.signature(func).parameters:
            kw["info"] = info
        extra = {"magnitude": magnitude, "b0": b0}  # the record's inputs that we have
        kw.update({k: v for k, v in extra.items() if k in record.inputs})
        sync(device)
        t1 = time.perf_counter()
        with count_ffts() as counter:
            if record.kind == "multi-orientation":
                fs, dirs = cosmos_inputs
                chi = func(fs, mask, vs, dirs, device=device)
            else:
                chi = func(local, mask, vs, **kw)
            sync(device)
        sec = time.perf_counter() - t1
        eq = counter.equivalents(shape)
        scores = metrics.evaluate(chi, truth, mask)
        row = {
            "method": name,
            "seconds": sec,
            "iterations": info.get("iterations"),
            "fft_equivalents": eq,
            "seconds_per_fft_equivalent": sec / eq if eq else float("nan"),
            "ratio_to_fft_time": sec / (eq / 2 * pair) if eq else float("nan"),
            **{k: scores[k] for k in ("nrmse", "hfen", "ssim", "xsim")},
        }
        rows.append(row)
        print(f"  {name}: {sec:.2f} s", flush=True)

    print()
    print(
        "| method | wall (s) | iterations | FFT-equivalents | ms per FFT-equivalent "
        "| time / FFT time | NRMSE (%) | HFEN (%) | SSIM | XSIM |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        it = "" if r["iterations"] is None else str(r["iterations"])
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {it} | {r['fft_equivalents']:.0f} "
            f"| {1e3 * r['seconds_per_fft_equivalent']:.1f} | {r['ratio_to_fft_time']:.2f} "
            f"| {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['ssim']:.3f} | {r['xsim']:.3f} |"
        )
    return {
        "version": __version__,
        "shape": shape,
        "voxel_size": vs,
        "device": device,
        "noise_hz": noise_hz,
        "fft_pair_seconds": pair,
        "rows": rows,
    }
