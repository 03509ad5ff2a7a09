"""The field chain on arrays: multi-echo magnitude + phase to total and local field maps.

``mask -> phase-offset removal + unwrapping -> multi-echo fit (Hz) -> field reliability ->
background removal``.
Each stage is a function of its own module; this one only wires them in the default order so
that the demo, the benchmark and the Nipype workflows share one definition of "the chain".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qsmprep.recon import background, echo, mask, unwrap
from qsmprep.recon._backend import count_ffts
from qsmprep.recon._checks import check_echo_times, check_volume, check_voxel_size

__all__ = ["FieldMaps", "compute_local_field", "stage"]


@dataclass
class FieldMaps:
    """Outputs of :func:`compute_local_field` (all ``(X, Y, Z)``, fields in Hz).

    ``reliable``: brain voxels whose field is reliable; ``trimmed``: the brain mask less its
    unreliable rim, which methods of :data:`~qsmprep.recon.background.KEEPS_MASK` are given.
    """

    total_hz: np.ndarray
    local_hz: np.ndarray
    field_std_hz: np.ndarray
    mask: np.ndarray
    local_mask: np.ndarray
    phase_offset: np.ndarray
    reliable: np.ndarray | None = None
    trimmed: np.ndarray | None = None
    settings: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)


@contextlib.contextmanager
def stage(profile: dict | None, name: str) -> Iterator[None]:
    """Record the wall time (s) and the FFTs (a :class:`FFTCounter`) of a block in ``profile``."""
    if profile is None:
        yield
        return
    t0 = time.perf_counter()
    with count_ffts() as counter:
        yield
    profile[name] = {"seconds": time.perf_counter() - t0, "ffts": counter}


def compute_local_field(
    magnitude,
    phase,
    echo_times,
    voxel_size,
    *,
    b0_dir=(0.0, 0.0, 1.0),
    brain_mask=None,
    mask_method: str = "magnitude",
    unwrap_method: str = "quality",
    fit: str = "linear",
    bg_method: str = "lbv",
    bg_params: dict | None = None,
    reliability_params: dict | None = None,
    device: str | None = "cpu",
    profile: dict | None = None,
) -> FieldMaps:
    """Total and local field (Hz) from multi-echo GRE magnitude and wrapped phase.

    A method of :data:`~qsmprep.recon.background.KEEPS_MASK` is cross-checked against RESHARP
    (:func:`~qsmprep.recon.background.remove_background_checked`); ``settings["bg_method"]``
    names the method whose result is returned and ``settings["bg_check"]`` the check.

    Parameters
    ----------
    magnitude, phase : (X, Y, Z, E) arrays
        Magnitude and phase (rad, wrapped or not) of E echoes, echoes on the last axis.
    echo_times : E floats
        Seconds, strictly increasing.
    voxel_size : 3 floats
        mm.
    b0_dir : 3 floats
        B0 direction in voxel coordinates (for PDF), e.g. from
        :func:`qsmprep.recon.kernels.b0_dir_from_affine`.
    brain_mask : (X, Y, Z) bool, optional
        Use this mask instead of computing one.
    mask_method : {"magnitude", "phase"}
        :func:`~qsmprep.recon.mask.mask_from_magnitude` or
        :func:`~qsmprep.recon.mask.mask_from_phase_quality`.
    unwrap_method : {"quality", "laplacian"}
        See :func:`qsmprep.recon.unwrap.unwrap_multi_echo`.
    fit : {"linear", "complex"}
        :func:`~qsmprep.recon.echo.fit_field_linear` (weights M^2) or the nonlinear complex
        fit started from it.
    bg_method : {"lbv", "sharp", "vsharp", "resharp", "pdf"}
        See :mod:`qsmprep.recon.background` (default LBV, the App's default).
    bg_params : dict, optional
        Keyword arguments of the background method.
    reliability_params : dict, optional
        Keyword arguments of :func:`qsmprep.recon.mask.field_reliability` (unreliable voxels
        from the fit residual; a background method of
        :data:`~qsmprep.recon.background.KEEPS_MASK` gets the mask less its unreliable rim).
    device : str
        ``"cpu"``, ``"torch"`` or ``"cuda"`` for the FFT-based stages.
    profile : dict, optional
        Filled with ``{stage: {"seconds": ..., "ffts": FFTCounter}}``.
    """
    check_volume(phase, "phase", ndim=4)
    te = check_echo_times(echo_times, phase.shape[-1])
    vs = check_voxel_size(voxel_size)
    bg_params = dict(bg_params or {})

    with stage(profile, "mask"):
        if brain_mask is not None:
            brain = np.asarray(brain_mask) != 0
        elif mask_method == "magnitude":
            brain = mask.mask_from_magnitude(magnitude, vs)
        elif mask_method == "phase":
            brain = mask.mask_from_phase_quality(phase, magnitude, vs)
        else:
            raise ValueError(f"mask_method must be 'magnitude' or 'phase', got {mask_method!r}")

    with stage(profile, "unwrap"):
        unwrapped = unwrap.unwrap_multi_echo(
            phase, magnitude, te, mask=brain, method=unwrap_method, voxel_size=vs
        )

    with stage(profile, "echo_fit"):
        total, std, offset = echo.fit_field_linear(unwrapped, magnitude, te, mask=brain)
        residual = echo.fit_residual(unwrapped, magnitude, te, total, offset, mask=brain)
        if fit == "complex":
            total, std, offset, _ = echo.fit_field_complex(
                magnitude, phase, te, mask=brain, init=(total, offset)
            )
        elif fit != "linear":
            raise ValueError(f"fit must be 'linear' or 'complex', got {fit!r}")
        noise = echo.estimate_noise_std(magnitude, brain)
        if np.isfinite(noise):
            std = std * noise

    with stage(profile, "reliability"):
        trimmed, reliable, _ = mask.field_reliability(
            brain, residual, vs, **dict(reliability_params or {})
        )

    with stage(profile, f"background_{bg_method}"):
        if bg_method == "pdf":
            bg_params.setdefault("b0_dir", b0_dir)
        bg_mask = trimmed if bg_method in background.KEEPS_MASK else brain
        local, local_mask, check = background.remove_background_checked(
            total, bg_mask, vs, method=bg_method, brain_mask=brain, device=device, **bg_params
        )

    return FieldMaps(
        total_hz=np.asarray(total, np.float32),
        local_hz=np.asarray(local, np.float32),
        field_std_hz=np.asarray(std, np.float32),
        mask=brain,
        local_mask=np.asarray(local_mask, bool),
        phase_offset=np.asarray(offset, np.float32),
        reliable=reliable,
        trimmed=trimmed,
        settings={
            "mask_method": "given" if brain_mask is not None else mask_method,
            "unwrap_method": unwrap_method,
            "fit": fit,
            "bg_method": check["method"],
            "bg_check": check,
            "bg_params": {k: v for k, v in bg_params.items() if k != "b0_dir"},
            "device": device,
        },
        profile=profile if profile is not None else {},
    )
