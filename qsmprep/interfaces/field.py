"""Interfaces of the field chain: echoes -> brain mask -> unwrapped phase -> field maps (Hz).

Each interface reads its inputs, calls one stage function of :mod:`qsmprep.recon.chain` (the
numerics of the chain are written there once) and saves the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep import bids, provided
from qsmprep import methods as registry
from qsmprep.devices import DEVICES
from qsmprep.interfaces._nifti import effective_params, load, out_path, save, voxel_size
from qsmprep.interfaces._registry import MethodName
from qsmprep.interfaces._threads import ThreadedInterface, ThreadsInputSpec
from qsmprep.recon import background, chain, mask
from qsmprep.recon._checks import check_echo_times

__all__ = [
    "BrainMask",
    "FieldReliability",
    "FitField",
    "LoadEchoes",
    "ProvidedField",
    "ProvidedMask",
    "RemoveBackground",
    "UnwrapPhase",
]

LOGGER = logging.getLogger("qsmprep")


class _LoadEchoesInputSpec(ThreadsInputSpec):
    magnitude = InputMultiObject(
        File(exists=True), mandatory=True, desc="3D magnitude image of each echo, by echo time"
    )
    phase = InputMultiObject(
        File(exists=True), mandatory=True, desc="3D phase image of each echo, by echo time"
    )
    echo_times = traits.List(
        traits.Float, mandatory=True, desc="echo times (s), one per echo, strictly increasing"
    )
    phase_units = traits.Enum(
        "rad",
        "deg",
        "integer",
        usedefault=True,
        desc="unit of the stored phase: rad, deg or integer",
    )
    phase_sign = traits.Enum(1, -1, usedefault=True, desc="phase sign convention (+1 or -1)")


class _LoadEchoesOutputSpec(TraitedSpec):
    magnitude = File(exists=True, desc="4D magnitude, echoes on the last axis")
    phase = File(exists=True, desc="4D wrapped phase (rad), echoes on the last axis")


class LoadEchoes(ThreadedInterface):
    """Stack per-echo magnitude and phase into 4D images (:func:`qsmprep.bids.load_phase`)."""

    input_spec = _LoadEchoesInputSpec
    output_spec = _LoadEchoesOutputSpec

    def _run_interface(self, runtime):
        mags, phases = list(self.inputs.magnitude), list(self.inputs.phase)
        if len(mags) != len(phases):
            raise ValueError(
                f"got {len(mags)} magnitude and {len(phases)} phase images; give one of each"
                " per echo"
            )
        check_echo_times(self.inputs.echo_times, len(phases))
        units, sign = self.inputs.phase_units, self.inputs.phase_sign
        mag = [bids.load_magnitude(f) for f in mags]
        phase = [bids.load_phase(f, units, sign) for f in phases]
        for fm, fp, m, p in zip(mags, phases, mag, phase, strict=True):
            if m.shape != p.shape or p.shape != phase[0].shape:
                raise ValueError(
                    f"{fm} has shape {m.shape} and {fp} has shape {p.shape} (echo 1:"
                    f" {phase[0].shape}); every echo's magnitude and phase need one grid"
                )
        mimg, pimg = nib.load(mags[0]), nib.load(phases[0])
        self._results["magnitude"] = save(np.stack(mag, -1), mimg, out_path(mags[0], "_4d"))
        self._results["phase"] = save(np.stack(phase, -1), pimg, out_path(phases[0], "_rad4d"))
        return runtime


class _BrainMaskInputSpec(ThreadsInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D (or 3D) magnitude")
    phase = File(
        exists=True, desc="4D wrapped phase (rad); needed by a method that takes it ('phase')"
    )
    echo_times = traits.List(traits.Float, desc="echo times (s), for a method that takes them")
    method = MethodName(
        "mask", "magnitude", usedefault=True, desc="a registered mask method (qsmprep.methods)"
    )
    params = traits.Dict(usedefault=True, desc="keyword arguments of the mask function")


class _MaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain mask (uint8)")


class BrainMask(ThreadedInterface):
    """Brain mask by a registered mask method, e.g. from the magnitude or the phase quality
    (:func:`qsmprep.recon.chain.compute_brain_mask`); the phase and the echo times are loaded
    for a method whose record takes them."""

    input_spec = _BrainMaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        mag, img = load(self.inputs.magnitude)
        vs = voxel_size(img)
        phase = te = None
        needs = registry.get(self.inputs.method, "mask").inputs
        if "phase" in needs:
            if not isdefined(self.inputs.phase):
                raise ValueError(f"mask method {self.inputs.method!r} needs the phase input")
            phase, _ = load(self.inputs.phase)
        if "echo_times" in needs and isdefined(self.inputs.echo_times):
            te = self.inputs.echo_times
        brain = chain.compute_brain_mask(
            mag,
            vs,
            method=self.inputs.method,
            phase=phase,
            echo_times=te,
            **dict(self.inputs.params),
        )
        like = img.slicer[..., 0] if mag.ndim == 4 else img
        self._results["out_file"] = save(
            brain, like, out_path(self.inputs.magnitude, "_brainmask"), np.uint8
        )
        return runtime


class _ProvidedMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the user's brain mask (0 and 1)")
    magnitude = File(exists=True, mandatory=True, desc="4D (or 3D) magnitude: the grid")


class ProvidedMask(SimpleInterface):
    """A brain mask the user provides (:func:`qsmprep.provided.load_provided_mask`): checked
    against the magnitude's grid and saved as uint8 with the magnitude's header."""

    input_spec = _ProvidedMaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.magnitude)
        like = img.slicer[..., 0] if len(img.shape) == 4 else img
        brain = provided.load_provided_mask(
            self.inputs.in_file, provided.Grid.of_image(self.inputs.magnitude)
        )
        self._results["out_file"] = save(
            brain, like, out_path(self.inputs.magnitude, "_brainmask"), np.uint8
        )
        return runtime


class _ProvidedFieldInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the user's total field (Hz)")
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude (noise map weights)")
    mask = File(exists=True, mandatory=True, desc="brain mask; outputs are 0 outside")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")


class _ProvidedFieldOutputSpec(TraitedSpec):
    total_field = File(exists=True, desc="total field (Hz) as given, 0 outside the brain mask")
    noise_field = File(exists=True, desc="std of the field a weighted echo fit would have (Hz)")
    noise_std = traits.Float(desc="complex noise std of the magnitude (NaN if not found)")


class ProvidedField(SimpleInterface):
    """A total field the user provides, in place of unwrapping and the echo fit.

    The field (:func:`qsmprep.provided.load_provided_field`: Hz, on the grid, finite in the
    mask) is kept as given inside the brain mask and set to 0 outside; its noise map is the
    std the weighted echo fit would have had on this magnitude
    (:func:`qsmprep.recon.chain.provided_field_std`).
    """

    input_spec = _ProvidedFieldInputSpec
    output_spec = _ProvidedFieldOutputSpec

    def _run_interface(self, runtime):
        mag, _ = load(self.inputs.magnitude)
        brain, mimg = load(self.inputs.mask, bool)
        total = provided.load_provided_field(
            self.inputs.in_file, provided.Grid.of_image(self.inputs.mask), brain
        )
        std, sigma = chain.provided_field_std(mag, self.inputs.echo_times, brain)
        base = self.inputs.mask
        self._results["total_field"] = save(total, mimg, out_path(base, "_totalfield"))
        # outside the brain the fit has no signal (std infinite where the magnitude is 0):
        # 0 there, so that viewers scale the map by the brain
        self._results["noise_field"] = save(
            np.where(brain, std, 0.0), mimg, out_path(base, "_noisefield")
        )
        self._results["noise_std"] = float(sigma)
        return runtime


class _UnwrapInputSpec(ThreadsInputSpec):
    phase = File(exists=True, mandatory=True, desc="4D wrapped phase (rad)")
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    method = MethodName(
        "unwrap",
        "quality",
        usedefault=True,
        desc="a registered unwrapping method (qsmprep.methods), e.g. quality-guided (ROMEO) or"
        " Laplacian",
    )
    params = traits.Dict(usedefault=True, desc="keyword arguments of unwrap_multi_echo")


class _UnwrapOutputSpec(TraitedSpec):
    out_file = File(
        exists=True, desc="4D unwrapped phase (rad), offset-corrected with two or more echoes"
    )


class UnwrapPhase(ThreadedInterface):
    """Multi-echo unwrapping (:func:`qsmprep.recon.chain.unwrap_phase`)."""

    input_spec = _UnwrapInputSpec
    output_spec = _UnwrapOutputSpec

    def _run_interface(self, runtime):
        phase, img = load(self.inputs.phase)
        mag, _ = load(self.inputs.magnitude)
        brain, _ = load(self.inputs.mask, bool)
        out = chain.unwrap_phase(
            phase,
            mag,
            self.inputs.echo_times,
            brain,
            voxel_size(img),
            method=self.inputs.method,
            **dict(self.inputs.params),
        )
        self._results["out_file"] = save(out, img, out_path(self.inputs.phase, "_unwrapped"))
        return runtime


class _FitFieldInputSpec(ThreadsInputSpec):
    phase = File(exists=True, mandatory=True, desc="4D unwrapped phase (rad)")
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude (fit weights M^2)")
    mask = File(exists=True, mandatory=True, desc="brain mask; outputs are 0 outside")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")


class _FitFieldOutputSpec(TraitedSpec):
    total_field = File(exists=True, desc="total field (Hz)")
    noise_field = File(exists=True, desc="standard deviation of the fitted field (Hz)")
    fit_residual = File(exists=True, desc="RMS phase residual of the multi-echo fit (rad)")
    noise_std = traits.Float(desc="complex noise std of the magnitude (NaN if not found)")


class FitField(ThreadedInterface):
    """Weighted linear multi-echo fit, its noise map and residual
    (:func:`qsmprep.recon.chain.fit_total_field`)."""

    input_spec = _FitFieldInputSpec
    output_spec = _FitFieldOutputSpec

    def _run_interface(self, runtime):
        phase, img = load(self.inputs.phase)
        mag, _ = load(self.inputs.magnitude)
        brain, mimg = load(self.inputs.mask, bool)
        fitted = chain.fit_total_field(phase, mag, self.inputs.echo_times, brain)
        base = self.inputs.mask
        self._results["fit_residual"] = save(fitted.residual, mimg, out_path(base, "_fitresidual"))
        self._results["total_field"] = save(fitted.total_hz, mimg, out_path(base, "_totalfield"))
        # outside the brain the fit has no signal (std infinite where the magnitude is 0):
        # 0 there, so that viewers scale the map by the brain
        self._results["noise_field"] = save(
            np.where(brain, fitted.std_hz, 0.0), mimg, out_path(base, "_noisefield")
        )
        self._results["noise_std"] = fitted.noise_std
        return runtime


class _ReliabilityInputSpec(ThreadsInputSpec):
    mask = File(exists=True, mandatory=True, desc="brain mask")
    fit_residual = File(
        exists=True,
        desc="multi-echo fit residual (rad); without it (a provided total field) nothing is"
        " unreliable",
    )
    total_field = File(
        exists=True,
        desc="fitted total field (Hz); with echo_times, voxels whose field steps by more than"
        " max_step / TE1 to a neighbour are unreliable (mask.steep_voxels)",
    )
    echo_times = traits.List(traits.Float, desc="echo times (s): TE1 sets the steep-voxel rule")
    params = traits.Dict(usedefault=True, desc="threshold, rim, max_step (mask.field_reliability)")


class _ReliabilityOutputSpec(TraitedSpec):
    trimmed_mask = File(exists=True, desc="brain mask without its unreliable rim (uint8)")
    reliable_mask = File(exists=True, desc="brain mask without any unreliable voxel (uint8)")
    meta = traits.Dict(desc="threshold (rad) and voxel counts")


class FieldReliability(ThreadedInterface):
    """Unreliable field voxels: :func:`~qsmprep.recon.mask.field_reliability` of the fit residual
    and the total field's steps between neighbours.

    Outputs the brain mask with its unreliable rim trimmed (for background removal that keeps
    the whole brain) and the brain mask less every unreliable voxel (the data mask).
    """

    input_spec = _ReliabilityInputSpec
    output_spec = _ReliabilityOutputSpec

    def _run_interface(self, runtime):
        brain, img = load(self.inputs.mask, bool)
        residual = (
            load(self.inputs.fit_residual)[0] if isdefined(self.inputs.fit_residual) else None
        )
        extra = {}
        if isdefined(self.inputs.total_field) and isdefined(self.inputs.echo_times):
            extra = {
                "field": load(self.inputs.total_field)[0],
                "echo_time": min(self.inputs.echo_times),
            }
        trimmed, reliable, info = mask.field_reliability(
            brain, residual, voxel_size(img), **extra, **dict(self.inputs.params)
        )
        base = self.inputs.mask
        self._results["trimmed_mask"] = save(trimmed, img, out_path(base, "_trimmed"), np.uint8)
        self._results["reliable_mask"] = save(reliable, img, out_path(base, "_reliable"), np.uint8)
        self._results["meta"] = {"FieldReliability": info}
        return runtime


def _acquisition_of(path) -> str:
    """The acquisition a work file belongs to: its name up to the echo or part entity
    (``sub-01_echo-1_part-mag_MEGRE_4d_..._totalfield.nii`` -> ``sub-01``)."""
    name = Path(path).name
    cut = [name.find(k) for k in ("_echo-", "_part-") if name.find(k) > 0]
    return name[: min(cut)] if cut else name


class _BackgroundInputSpec(ThreadsInputSpec):
    total_field = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    method = MethodName(
        "background",
        background.METHODS[0],
        usedefault=True,
        desc="a registered background removal method (qsmprep.methods)",
    )
    params = traits.Dict(usedefault=True, desc="keyword arguments of the method")
    b0_dir = traits.List(
        traits.Float,
        minlen=3,
        maxlen=3,
        value=[0.0, 0.0, 1.0],
        usedefault=True,
        desc="B0 direction in voxel coordinates (used by PDF)",
    )
    device = traits.Enum(*DEVICES, usedefault=True, desc="cpu, auto, cuda or torch")
    use_gpu = traits.Bool(
        False, usedefault=True, nohash=True, desc="schedule as GPU work (Nipype MultiProc)"
    )
    extra_meta = traits.Dict(desc="sidecar entries of earlier steps to pass on (e.g. reliability)")
    brain_mask = File(
        exists=True,
        desc="brain mask of the cross-check (V-SHARP) and the fallback (RESHARP) of a method"
        " that keeps its mask (background.remove_background_checked); default: mask",
    )
    cross_check = traits.Bool(
        True, usedefault=True, desc="cross-check lbv/pdf against V-SHARP, fall back to RESHARP"
    )
    magnitude = File(exists=True, desc="4D or 3D magnitude (the edge mask of tfibg)")
    noise_field = File(exists=True, desc="field std map (Hz; the data weight of tfibg)")
    reliable_mask = File(exists=True, desc="brain voxels with a reliable field (tfibg's data)")
    echo_times = traits.List(traits.Float, desc="echo times (s); tfibg's echo spacing")
    b0 = traits.Float(desc="field strength (T), for tfibg")


class _BackgroundOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="local field (Hz), 0 outside local_mask")
    local_mask = File(exists=True, desc="mask where the local field is valid (uint8)")
    meta = traits.Dict(desc="sidecar entries: Parameters (effective, JSON-able)")
    mask_meta = traits.Dict(desc="sidecar entries of the local mask: BackgroundMethod used")


class RemoveBackground(ThreadedInterface):
    """Background field removal, cross-checked (:func:`qsmprep.recon.chain.remove_background`)."""

    input_spec = _BackgroundInputSpec
    output_spec = _BackgroundOutputSpec

    def _run_interface(self, runtime):
        total, img = load(self.inputs.total_field)
        brain, _ = load(self.inputs.mask, bool)
        params = dict(self.inputs.params)
        ref = load(self.inputs.brain_mask, bool)[0] if isdefined(self.inputs.brain_mask) else None
        needs = registry.get(self.inputs.method, "background").inputs
        inputs = self._extra_inputs(needs, brain, params)
        local, local_mask, check = chain.remove_background(
            total,
            brain,
            voxel_size(img),
            method=self.inputs.method,
            params=params,
            b0_dir=self.inputs.b0_dir,
            brain_mask=ref,
            cross_check=self.inputs.cross_check,
            device=self.inputs.device,
            inputs=inputs,
        )
        func = getattr(background, check["method"])
        used = effective_params(
            func,
            params if check["method"] == self.inputs.method else {},
            exclude=("b0_dir", "magnitude", "noise_std", "data_mask"),
        )
        self._results["meta"] = {"Method": check["method"], "Parameters": used}
        self._results["mask_meta"] = {"BackgroundMethod": check["method"]}
        if len(check) > 1:
            self._results["meta"]["CrossCheck"] = {k: v for k, v in check.items() if k != "method"}
            if check["fell_back"]:
                LOGGER.warning(
                    "%s: %s disagreed with %s by %.0f %% (limit %.0f %%): the background "
                    "removal fell back to %s",
                    _acquisition_of(self.inputs.total_field), self.inputs.method, check["against"],
                    check["disagreement"], check["max_disagreement"], check["method"],
                )  # fmt: skip
        if isdefined(self.inputs.extra_meta):
            self._results["meta"].update(self.inputs.extra_meta)
        base = self.inputs.total_field
        self._results["local_field"] = save(local, img, out_path(base, "_local"))
        self._results["local_mask"] = save(
            local_mask, img, out_path(self.inputs.mask, "_local"), np.uint8
        )
        return runtime

    def _extra_inputs(self, needs, brain, params: dict) -> dict:
        """The extra inputs a method's record lists (:data:`qsmprep.methods.INPUTS`), from this
        node's inputs; its scalar ones (``delta_te``, ``b0``) go into ``params`` unless given
        there, so the sidecar records them."""
        from qsmprep.recon.inversion.medi import delta_te_of

        inp, out = self.inputs, {}
        given = {
            "magnitude": isdefined(inp.magnitude),
            "noise_std": isdefined(inp.noise_field),
            "data_mask": isdefined(inp.reliable_mask),
            "delta_te": isdefined(inp.echo_times) and bool(inp.echo_times),
            "b0": isdefined(inp.b0),
        }
        missing = [k for k in needs if k in given and not given[k] and k not in params]
        if missing:
            raise ValueError(
                f"background method {inp.method!r} needs the node inputs for {missing}"
                " (magnitude, noise_field, reliable_mask, echo_times, b0)"
            )
        if "magnitude" in needs:
            out["magnitude"] = mask.combine_magnitude(load(inp.magnitude)[0])
        if "noise_std" in needs and given["noise_std"]:
            out["noise_std"] = load(inp.noise_field)[0]
        if "data_mask" in needs and given["data_mask"]:
            out["data_mask"] = load(inp.reliable_mask, bool)[0] & brain
        if "delta_te" in needs and given["delta_te"]:
            params.setdefault("delta_te", delta_te_of(inp.echo_times))
        if "b0" in needs and given["b0"]:
            params.setdefault("b0", float(inp.b0))
        return out
