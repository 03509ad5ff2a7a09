"""``qsmprep-bench field``: the field chain stage by stage, in units of its FFTs.

Simulates a multi-echo head (default 224 x 224 x 160 at 1 mm, 5 echoes) and runs the field
chain stage by stage. For each stage it prints the wall time, the number of FFTs it ran in
units of one real FFT of the image grid (FFT-equivalents, counted by
:func:`qsmprep.recon._backend.count_ffts`, padding included) and the ratio of its time to
``FFT-equivalents / 2`` forward+inverse pairs of that grid, timed in the same run. A ratio near
1 means the stage costs no more than its FFTs.
"""

from __future__ import annotations

import time

from qsmprep.__about__ import __version__
from qsmprep.benchmarks.timing import fft_pair_seconds, sync
from qsmprep.config import BG_METHODS, DEFAULT_BG_METHOD
from qsmprep.methods import get

__all__ = ["bench_field"]


def bench_field(
    *,
    shape=(224, 224, 160),
    voxel_size=(1.0,),
    echoes: int = 5,
    te1: float = 0.004,
    dte: float = 0.004,
    b0: float = 3.0,
    snr: float = 100.0,
    seed: int = 0,
    unwrap: str = "quality",
    bg_methods=BG_METHODS,
    device: str = "cpu",
) -> dict:
    """Run the field chain stage by stage on a simulated head; print and return the table.

    Parameters
    ----------
    shape : 3 ints
        Grid of the simulated head.
    voxel_size : 1 or 3 floats
        Voxel size (mm); one value is isotropic.
    echoes, te1, dte : int, float, float
        Number of echoes, first echo time and echo spacing (s).
    b0 : float
        Field strength (T).
    snr : float
        SNR of the simulated magnitude.
    seed : int
        Seed of the phantom and the noise.
    unwrap : str
        Phase unwrapping of the chain: a registered unwrapping method (:mod:`qsmprep.methods`),
        e.g. ``"quality"`` or ``"laplacian"``.
    bg_methods : iterable of str
        Background removals timed after the chain (which runs the default one).
    device : str
        ``"cpu"`` (NumPy/scipy), ``"torch"`` (CPU) or ``"cuda"``.

    Returns
    -------
    dict
        ``rows`` (stage, seconds, FFT-equivalents, ratio to the FFT time), the local-field
        NRMSE (%) of each background method, the FFT pair time and the settings.
    """
    from qsmprep.metrics import nrmse
    from qsmprep.recon.chain import compute_local_field, remove_background, stage
    from qsmprep.recon.kernels import b0_dir_from_affine
    from qsmprep.recon.mask import combine_magnitude
    from qsmprep.sim import make_head_phantom, simulate_gre

    shape = tuple(shape)
    vs = tuple(voxel_size) * 3 if len(voxel_size) == 1 else tuple(voxel_size)
    te = tuple(te1 + i * dte for i in range(echoes))
    t0 = time.perf_counter()
    ph = make_head_phantom(shape, vs, seed=seed)
    gre = simulate_gre(ph, te, b0=b0, snr=snr, seed=seed)
    t_sim = time.perf_counter() - t0
    print(
        f"# qsmprep {__version__} field benchmark: {shape} at {vs} mm, {len(te)} echoes "
        f"({', '.join(f'{1e3 * t:g}' for t in te)} ms), {b0} T, SNR {snr}, "
        f"device {device}; simulation {t_sim:.1f} s (not counted)",
        flush=True,
    )
    pair = fft_pair_seconds(shape, device)
    print(f"# one rfftn + irfftn pair of {shape} (float32): {1e3 * pair:.1f} ms", flush=True)

    profile: dict = {}
    b0_dir = b0_dir_from_affine(ph.affine)
    t0 = time.perf_counter()
    maps = compute_local_field(
        gre.magnitude,
        gre.phase,
        te,
        vs,
        b0_dir=b0_dir,
        unwrap_method=unwrap,
        b0=b0,
        bg_method=DEFAULT_BG_METHOD,
        device=device,
        profile=profile,
    )
    chain_total = time.perf_counter() - t0
    rows = []
    for name, rec in profile.items():
        rows.append((name, rec["seconds"], rec["ffts"].equivalents(shape)))
    rows.append((f"chain total (with {DEFAULT_BG_METHOD})", chain_total, sum(r[2] for r in rows)))
    errors = {DEFAULT_BG_METHOD: nrmse(maps.local_hz, gre.local_field_hz, maps.local_mask)}

    methods = [m for m in bg_methods if m != DEFAULT_BG_METHOD]
    inputs = {  # what a method that inverts the field needs (tfibg), as the chain gives it
        "magnitude": combine_magnitude(gre.magnitude),
        "noise_std": maps.field_std_hz,
        "data_mask": maps.reliable & maps.mask,
        "delta_te": dte,
        "b0": b0,
    }
    for m in methods:
        prof: dict = {}
        with stage(prof, m):
            local, lmask, _ = remove_background(
                maps.total_hz,
                maps.trimmed if get(m).keeps_mask else maps.mask,
                vs,
                method=m,
                b0_dir=b0_dir,
                cross_check=False,
                device=device,
                inputs=inputs,
            )
            sync(device)
        rows.append((f"background_{m}", prof[m]["seconds"], prof[m]["ffts"].equivalents(shape)))
        errors[m] = nrmse(local, gre.local_field_hz, lmask)

    print()
    print("| stage | wall (s) | FFT-equivalents | time / (FFT pairs x pair time) |")
    print("|---|---:|---:|---:|")
    out_rows = []
    for name, sec, eq in rows:
        # the ratio says how close an FFT-bound stage is to its FFT cost; for stages without
        # FFTs and for the whole chain (mostly non-FFT work) it is not meaningful
        fft_bound = eq > 0 and not name.startswith("chain")
        ratio = sec / (eq / 2 * pair) if fft_bound else float("nan")
        shown = f"{ratio:.2f}" if fft_bound else "-"
        print(f"| {name} | {sec:.2f} | {eq:.1f} | {shown} |")
        out_rows.append({"stage": name, "seconds": sec, "fft_equivalents": eq, "ratio": ratio})
    print()
    print("| background method | local-field NRMSE vs truth (%) |")
    print("|---|---:|")
    for m, e in errors.items():
        print(f"| {m} | {e:.1f} |")
    return {
        "version": __version__,
        "shape": shape,
        "voxel_size": vs,
        "echo_times": te,
        "device": device,
        "fft_pair_seconds": pair,
        "rows": out_rows,
        "local_field_nrmse": errors,
    }
