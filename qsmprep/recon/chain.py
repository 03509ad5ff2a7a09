"""The field chain on arrays: multi-echo magnitude + phase to total and local field maps.

``mask -> phase-offset removal + unwrapping -> multi-echo fit (Hz) -> field reliability ->
background removal``.
Each stage is a function of its own module; the stage functions here
(:func:`compute_brain_mask`, :func:`unwrap_phase`, :func:`fit_total_field`,
:func:`provided_field_std`, :func:`remove_background`) call them with the chain's choices and
are the only place the chain's numerics are written: :func:`compute_local_field` runs them in
the default order for the demo's training targets and the benchmarks, and the Nipype
interfaces of the App (:mod:`qsmprep.interfaces.field`) run each of them in a node of its own.
The field reliability stage is :func:`qsmprep.recon.mask.field_reliability` itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qsmprep import methods as registry
from qsmprep.recon import background, echo, mask, unwrap
from qsmprep.recon._backend import count_ffts
from qsmprep.recon._checks import check_echo_times, check_volume, check_voxel_size
from qsmprep.recon.inversion.medi import delta_te_of

__all__ = [
    "FITS",
    "MASK_METHODS",
    "FieldMaps",
    "TotalField",
    "compute_brain_mask",
    "compute_local_field",
    "fit_total_field",
    "provided_field_std",
    "remove_background",
    "stage",
    "unwrap_phase",
]

MASK_METHODS = registry.names("mask")
"""Brain mask methods of :func:`compute_brain_mask`: the registry's (:mod:`qsmprep.methods`,
stage ``mask``) at import; those registered later are accepted too."""

FITS = ("linear", "complex")
"""Multi-echo fits of :func:`fit_total_field`."""


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


# --------------------------------------------------------------------------------------------
# stages


def compute_brain_mask(
    magnitude, voxel_size, *, method: str = "magnitude", phase=None, echo_times=None, **params
) -> np.ndarray:
    """Brain mask of one acquisition (stage ``mask``).

    ``method`` is a record of stage ``mask`` in :mod:`qsmprep.methods`; its function is
    called as ``f(magnitude=magnitude, voxel_size=voxel_size, **inputs, **params)``, with
    ``phase`` and ``echo_times`` among the inputs when its record lists them.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) or (X, Y, Z) array
        Magnitude of the echoes.
    voxel_size : 3 floats
        mm.
    method : str
        A registered mask method: ``"magnitude"``
        (:func:`~qsmprep.recon.mask.mask_from_magnitude`) or ``"phase"``
        (:func:`~qsmprep.recon.mask.mask_from_phase_quality`, which needs ``phase``, and
        ``echo_times`` for more than one echo).
    phase : (X, Y, Z, E) array, optional
        Wrapped phase (rad).
    echo_times : E floats, optional
        Seconds.
    **params
        Keyword arguments of the mask function.

    Returns
    -------
    (X, Y, Z) bool array.
    """
    record = registry.get(method, "mask")
    given = {"phase": phase, "echo_times": echo_times}
    if "phase" in record.inputs and phase is None:
        raise ValueError(f"mask method {method!r} needs the phase input")
    inputs = {k: given[k] for k in record.inputs if k in given}
    return registry.resolve(method)(magnitude=magnitude, voxel_size=voxel_size, **inputs, **params)


def unwrap_phase(
    phase, magnitude, echo_times, brain_mask, voxel_size, *, method: str = "quality", **params
) -> np.ndarray:
    """Phase-offset removal and unwrapping of all echoes (stage ``unwrap``):
    :func:`qsmprep.recon.unwrap.unwrap_multi_echo` with ``method`` (a registered unwrapping
    method, :mod:`qsmprep.methods`) and ``params``."""
    return unwrap.unwrap_multi_echo(
        phase,
        magnitude,
        echo_times,
        mask=brain_mask,
        method=method,
        voxel_size=voxel_size,
        **params,
    )


@dataclass
class TotalField:
    """Outputs of :func:`fit_total_field` (all ``(X, Y, Z)`` float32).

    ``total_hz``: the field; ``std_hz``: its std (infinite where the magnitude is zero);
    ``phase_offset`` (rad); ``residual``: RMS phase residual of the linear fit (rad);
    ``noise_std``: complex noise std of the magnitude (NaN when none was found; the std is
    then for ``sigma = 1``).
    """

    total_hz: np.ndarray
    std_hz: np.ndarray
    phase_offset: np.ndarray
    residual: np.ndarray
    noise_std: float


def fit_total_field(
    unwrapped, magnitude, echo_times, brain_mask, *, fit: str = "linear", phase=None
) -> TotalField:
    """Multi-echo fit of the total field (Hz), its std and its residual (stage ``echo_fit``).

    The weighted linear fit (:func:`~qsmprep.recon.echo.fit_field_linear`, weights ``M^2``)
    with the noise std of the magnitude (:func:`~qsmprep.recon.echo.estimate_noise_std`) and
    its residual (:func:`~qsmprep.recon.echo.fit_residual`); with ``fit="complex"`` the field,
    std and offset then come from the nonlinear complex fit started from it
    (:func:`~qsmprep.recon.echo.fit_field_complex`, which needs the wrapped ``phase``). The
    residual is always the linear fit's.

    Parameters
    ----------
    unwrapped : (X, Y, Z, E) array
        Unwrapped phase (rad), from :func:`unwrap_phase`.
    magnitude : (X, Y, Z, E) array
        Magnitude (fit weights ``M^2``).
    echo_times : E floats
        Seconds.
    brain_mask : (X, Y, Z) bool array
        Voxels to fit; the outputs are 0 outside (the std infinite).
    fit : {"linear", "complex"}
        See above.
    phase : (X, Y, Z, E) array, optional
        Wrapped phase (rad), for ``fit="complex"``.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be 'linear' or 'complex', got {fit!r}")
    if fit == "complex" and phase is None:
        raise ValueError("fit 'complex' needs the wrapped phase")
    sigma = echo.estimate_noise_std(magnitude, brain_mask)
    noise = sigma if np.isfinite(sigma) else None
    total, std, offset = echo.fit_field_linear(
        unwrapped, magnitude, echo_times, mask=brain_mask, noise_std=noise
    )
    residual = echo.fit_residual(unwrapped, magnitude, echo_times, total, offset, mask=brain_mask)
    if fit == "complex":
        total, std, offset, _ = echo.fit_field_complex(
            magnitude, phase, echo_times, mask=brain_mask, init=(total, offset)
        )
        if noise is not None:
            std = std * noise
    return TotalField(total, std, offset, residual, float(sigma))


def provided_field_std(magnitude, echo_times, brain_mask) -> tuple[np.ndarray, float]:
    """The noise map of a total field given in place of :func:`fit_total_field`.

    The std the weighted fit would have had on this magnitude
    (:func:`~qsmprep.recon.echo.field_std`, scaled by
    :func:`~qsmprep.recon.echo.estimate_noise_std`). Returns ``(std_hz, noise_std)``.
    """
    sigma = echo.estimate_noise_std(magnitude, brain_mask)
    std = echo.field_std(
        magnitude,
        echo_times,
        mask=brain_mask,
        noise_std=sigma if np.isfinite(sigma) else None,
    )
    return std, float(sigma)


def remove_background(
    total,
    mask,
    voxel_size,
    *,
    method: str = background.DEFAULT_METHOD,
    params: dict | None = None,
    b0_dir=(0.0, 0.0, 1.0),
    brain_mask=None,
    cross_check: bool = True,
    device: str | None = "cpu",
    inputs: dict | None = None,
):
    """Background removal of the chain (stage ``background_<method>``).

    :func:`~qsmprep.recon.background.remove_background_checked`: a method of
    :data:`~qsmprep.recon.background.KEEPS_MASK` (given the brain mask less its unreliable
    rim) is cross-checked against V-SHARP on ``brain_mask`` and falls back to RESHARP there
    when they disagree by more than :data:`~qsmprep.recon.background.MAX_DISAGREEMENT` %.

    Parameters
    ----------
    total : (X, Y, Z) array
        Total field (Hz).
    mask : (X, Y, Z) bool array
        The method's mask.
    voxel_size : 3 floats
        mm.
    method : str
        Background method (:data:`~qsmprep.recon.background.METHODS`).
    params : dict, optional
        Keyword arguments of the method.
    b0_dir : 3 floats
        B0 direction in voxel coordinates (PDF's, unless ``params`` gives one).
    brain_mask : (X, Y, Z) bool array, optional
        Mask of the cross-check (default ``mask``).
    cross_check : bool
        False runs the method unchecked.
    device : str
        ``"cpu"``, ``"torch"``, ``"cuda"`` or ``"auto"``.
    inputs : dict, optional
        Extra inputs (:data:`qsmprep.methods.INPUTS`: ``magnitude``, ``noise_std`` in Hz,
        ``data_mask``, ``delta_te``, ``b0``) for a method whose record lists them (TFI's
        background); a value in ``params`` wins over a scalar here.

    Returns
    -------
    local_field, local_mask, check
        As :func:`~qsmprep.recon.background.remove_background_checked`.
    """
    params = dict(params or {})
    needs = registry.get(method, "background").inputs
    if "b0_dir" in needs:  # PDF and TFI fit dipoles along B0
        params.setdefault("b0_dir", tuple(b0_dir))
    for k in needs:
        if k in (inputs or {}):
            params.setdefault(k, inputs[k])
    return background.remove_background_checked(
        total,
        mask,
        voxel_size,
        method=method,
        brain_mask=brain_mask,
        max_disagreement=background.MAX_DISAGREEMENT if cross_check else None,
        device=device,
        **params,
    )


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
    b0: float = 3.0,
    device: str | None = "cpu",
    profile: dict | None = None,
) -> FieldMaps:
    """Total and local field (Hz) from multi-echo GRE magnitude and wrapped phase.

    A method of :data:`~qsmprep.recon.background.KEEPS_MASK` is cross-checked against V-SHARP
    and falls back to RESHARP
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
    mask_method : str
        A registered mask method (:func:`compute_brain_mask`), e.g. ``"magnitude"``
        (:func:`~qsmprep.recon.mask.mask_from_magnitude`) or ``"phase"``
        (:func:`~qsmprep.recon.mask.mask_from_phase_quality`).
    unwrap_method : str
        A registered unwrapping method, e.g. ``"quality"`` or ``"laplacian"``; see
        :func:`qsmprep.recon.unwrap.unwrap_multi_echo`.
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
    b0 : float
        Field strength (T), for a background method that inverts the field (``tfibg``).
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
        else:
            brain = compute_brain_mask(
                magnitude, vs, method=mask_method, phase=phase, echo_times=te
            )

    with stage(profile, "unwrap"):
        unwrapped = unwrap_phase(phase, magnitude, te, brain, vs, method=unwrap_method)

    with stage(profile, "echo_fit"):
        fitted = fit_total_field(unwrapped, magnitude, te, brain, fit=fit, phase=phase)
        total, std, offset = fitted.total_hz, fitted.std_hz, fitted.phase_offset

    with stage(profile, "reliability"):
        trimmed, reliable, _ = mask.field_reliability(
            brain, fitted.residual, vs, field=total, echo_time=te[0],
            **dict(reliability_params or {}),
        )  # fmt: skip

    with stage(profile, f"background_{bg_method}"):
        bg_mask = trimmed if bg_method in background.KEEPS_MASK else brain
        local, local_mask, check = remove_background(
            total,
            bg_mask,
            vs,
            method=bg_method,
            params=bg_params,
            b0_dir=b0_dir,
            brain_mask=brain,
            device=device,
            inputs={
                "magnitude": mask.combine_magnitude(magnitude),
                "noise_std": std,
                "data_mask": reliable & brain,
                "delta_te": delta_te_of(te),
                "b0": float(b0),
            },
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
