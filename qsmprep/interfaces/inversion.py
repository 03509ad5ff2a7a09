"""Interfaces of the dipole inversion: local field (Hz) -> referenced chi map (ppm)."""

from __future__ import annotations

import inspect

import numpy as np
from nipype.interfaces.base import (
    File,
    InputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep import methods as registry
from qsmprep.devices import DEVICES
from qsmprep.interfaces._nifti import effective_params, load, out_path, save, voxel_size
from qsmprep.interfaces._registry import MethodName
from qsmprep.interfaces._threads import ThreadedInterface, ThreadsInputSpec
from qsmprep.recon.inversion.consistency import data_consistency
from qsmprep.recon.inversion.cosmos import cosmos
from qsmprep.recon.inversion.medi import delta_te_of
from qsmprep.recon.inversion.reference import reference_mean
from qsmprep.recon.kernels import hz_to_ppm
from qsmprep.recon.mask import combine_magnitude

__all__ = [
    "DL_METHODS",
    "INVERSION_METHODS",
    "WHOLE_BRAIN_METHODS",
    "Cosmos",
    "DeepInversion",
    "DipoleInversion",
]

INVERSION_METHODS = registry.names("inversion", kind="classical")
"""Single-orientation classical inversions run by DipoleInversion (the registry's, at import;
the interface accepts any registered later too)."""

DL_METHODS = registry.names("inversion", kind="dl")
"""Deep-learning inversions run by DeepInversion (the registry's, at import)."""

WHOLE_BRAIN_METHODS = tuple(
    m.name for m in registry.records("inversion", kind="classical") if m.whole_brain
)
"""Inversions with a per-voxel data weight (``Method.whole_brain``): given the brain mask they
cover all of it, with zero data weight where the local field is unknown or unreliable (the
regulariser carries chi there). The others cover the local-field mask only."""


_B0_DIR = {"minlen": 3, "maxlen": 3, "value": [0.0, 0.0, 1.0], "usedefault": True}
_USE_GPU_DESC = "schedule as GPU work: Nipype's MultiProc counts nodes with use_gpu set"


class _InversionInputSpec(ThreadsInputSpec):
    local_field = File(exists=True, mandatory=True, desc="local field (Hz)")
    mask = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    total_field = File(exists=True, desc="total field (Hz): the input of a total field inversion")
    method = MethodName("inversion", kind="classical", mandatory=True, desc="inversion method")
    params = traits.Dict(usedefault=True, desc="keyword arguments of the method")
    b0 = traits.Float(mandatory=True, desc="field strength (T)")
    b0_dir = traits.List(traits.Float, desc="B0 direction in voxel coordinates", **_B0_DIR)
    echo_times = traits.List(traits.Float, desc="echo times (s); MEDI's echo spacing")
    magnitude = File(exists=True, desc="4D or 3D magnitude (MEDI edge mask)")
    noise_field = File(exists=True, desc="field std map (Hz; data weight of MEDI and TV)")
    brain_mask = File(
        exists=True,
        desc="brain mask: the map of a whole-brain method (WHOLE_BRAIN_METHODS) covers it",
    )
    reliable_mask = File(
        exists=True, desc="brain voxels with a reliable field (0: zero data weight)"
    )
    bg_meta = traits.Dict(desc="sidecar entries of the background removal (its Method)")
    device = traits.Enum(*DEVICES, usedefault=True, desc="cpu, auto (GPU if any), cuda, torch")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True, desc=_USE_GPU_DESC)


def _tv_weight(data: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """TV's data weight: 1 / noise std where the field is known and reliable, else 0."""
    w = data.astype(np.float64)
    if noise is not None:
        ok = data & np.isfinite(noise) & (noise > 0)
        w = np.zeros(data.shape)
        w[ok] = 1.0 / noise[ok]
    return w


class _InversionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="chi (ppm), mean 0 over the mask, 0 outside")
    dc_residual = traits.Float(desc="data-consistency residual (%), reference-free")
    parameters = traits.Dict(desc="effective parameters of the method (JSON-able)")
    meta = traits.Dict(desc="sidecar entries: Parameters, DataConsistencyResidual (%)")


class DipoleInversion(ThreadedInterface):
    """One dipole inversion by name; the result is referenced to the mean over the mask."""

    input_spec = _InversionInputSpec
    output_spec = _InversionOutputSpec

    def _run_interface(self, runtime):
        method, inp = self.inputs.method, self.inputs
        field_hz, img = load(inp.local_field)
        local, _ = load(inp.mask, bool)
        field, vs, b0_dir = hz_to_ppm(field_hz, inp.b0), voxel_size(img), tuple(inp.b0_dir)
        record = registry.get(method, "inversion")
        func = registry.resolve(method)
        params = dict(inp.params)
        total = record.field == "total"
        if total and not (isdefined(inp.total_field) and isdefined(inp.brain_mask)):
            raise ValueError(
                f"{record.label} inverts the total field: give the total_field and brain_mask"
                " inputs"
            )
        reliable = load(inp.reliable_mask, bool)[0] if isdefined(inp.reliable_mask) else None
        data = local
        if reliable is not None:
            data = local & reliable
            if not data.any():
                data = local  # nothing judged reliable: fall back to the local mask
        noise = load(inp.noise_field)[0] if isdefined(inp.noise_field) else None
        whole = record.whole_brain and isdefined(inp.brain_mask)
        m = (load(inp.brain_mask, bool)[0] | local) if whole else local
        data_in = data
        if total:  # the total field is known on the whole brain mask, less unreliable voxels
            data_in = m & reliable if reliable is not None and (m & reliable).any() else m
            field = hz_to_ppm(load(inp.total_field)[0], inp.b0)
        weighted = whole or reliable is not None
        extra = self._extra_inputs(record, params, data_in, noise, weighted)
        if "info" in inspect.signature(func).parameters:  # a lambda from the noise: record it
            extra["info"] = solver_info = {}
        chi = func(field, m, vs, b0_dir=b0_dir, device=inp.device, **extra, **params)
        if total:  # the data consistency below is against the local field, as for the others
            field = hz_to_ppm(field_hz, inp.b0)
        chi = reference_mean(chi, m)
        self._results["out_file"] = save(chi, img, out_path(inp.local_field, f"_{method}_chi"))
        dc = data_consistency(chi, field, data, vs, b0_dir=b0_dir, device=inp.device)
        used = effective_params(func, params, exclude=("b0_dir",))
        self._results.update(dc_residual=dc, parameters=used)
        self._results["meta"] = {
            "Parameters": used,
            "DataConsistencyResidual": round(dc, 4),
            "Mask": "desc-brain_mask" if whole else "desc-local_mask",
            "Reference": "mean of brain mask" if whole else "mean of local mask",
        }
        if "info" in extra and extra["info"].get("lam_noise_ppm") is not None:
            self._results["meta"]["NoiseLambda"] = {
                "Lambda": solver_info["lam"],
                "NoiseStd": solver_info["lam_noise_ppm"],
                "Units": "lambda for ppm fields; noise std in ppm",
            }
        if total:
            self._results["meta"]["FieldInput"] = "desc-total_fieldmap"
            self._results["meta"]["BackgroundMethod"] = "none (total field inversion)"
            self._results["meta"]["DataWeight"] = (
                "zero outside desc-brain_mask and where the multi-echo fit residual marks the"
                " field unreliable"
                + ("; 1 / desc-noise_fieldmap elsewhere" if noise is not None else "")
            )
            return runtime
        if isdefined(inp.bg_meta) and "Method" in inp.bg_meta:
            self._results["meta"]["BackgroundMethod"] = inp.bg_meta["Method"]
        if whole or isdefined(inp.reliable_mask):
            weighted = "; 1 / desc-noise_fieldmap elsewhere" if noise is not None else ""
            self._results["meta"]["DataWeight"] = (
                "zero outside desc-local_mask and where the multi-echo fit residual marks the"
                " field unreliable" + weighted
            )
        return runtime

    def _extra_inputs(self, record, params: dict, data, noise, weighted: bool) -> dict:
        """The arrays among the record's extra inputs (:data:`qsmprep.methods.INPUTS`); its
        scalar ones (``delta_te``, ``b0``) go into ``params`` unless given there."""
        inp, needs, extra = self.inputs, record.inputs, {}
        if "magnitude" in needs and not isdefined(inp.magnitude):
            raise ValueError(f"{record.label} needs the magnitude input (its edge mask)")
        te = list(inp.echo_times) if isdefined(inp.echo_times) else []
        if "delta_te" in needs and te:
            params.setdefault("delta_te", delta_te_of(te))
        if "b0" in needs:
            params.setdefault("b0", inp.b0)
        if "magnitude" in needs:
            extra["magnitude"] = combine_magnitude(load(inp.magnitude)[0])
        if "noise_std" in needs and noise is not None:
            # in ppm, as the field (MEDI's lam="noise" reads its level); outside the data
            # mask the weight is zero and any positive value serves there
            ok = data & np.isfinite(noise) & (noise > 0)
            extra["noise_std"] = hz_to_ppm(np.where(ok, noise, 1.0), inp.b0)
        if "data_mask" in needs and weighted:
            extra["data_mask"] = data
        if "weight" in needs and weighted and "weight" not in params:
            extra["weight"] = _tv_weight(data, noise)
        return extra


class _DeepInputSpec(ThreadsInputSpec):
    local_field = File(exists=True, mandatory=True, desc="local field (Hz)")
    mask = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    method = MethodName(
        "inversion", kind="dl", mandatory=True, desc="deep-learning inversion method"
    )
    params = traits.Dict(
        usedefault=True,
        desc="model (registered name), weights (checkpoint file), tile_shape, overlap",
    )
    b0 = traits.Float(mandatory=True, desc="field strength (T)")
    b0_dir = traits.List(traits.Float, desc="B0 direction in voxel coordinates", **_B0_DIR)
    device = traits.Enum(*DEVICES, usedefault=True, desc="cpu, auto (GPU if any), cuda, torch")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True, desc=_USE_GPU_DESC)
    bg_meta = traits.Dict(desc="sidecar entries of the background removal (its Method)")
    weights_sha256 = traits.Str(
        desc="SHA-256 of the weights the node must run (qsmprep.dl.weights.weights_sha256): "
        "part of the node's hash, so new weights are not answered from Nipype's cache; a "
        "mismatch at run time is an error"
    )


class DeepInversion(ThreadedInterface):
    """Dipole inversion by a trained network (:func:`qsmprep.dl.invert.dl_invert`).

    The result is referenced to the mean over the mask, as the classical methods are; the
    sidecar records the model, its weights file and sha256.
    """

    input_spec = _DeepInputSpec
    output_spec = _InversionOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.dl.invert import dl_invert

        inp = self.inputs
        field_hz, img = load(inp.local_field)
        m, _ = load(inp.mask, bool)
        field, vs, b0_dir = hz_to_ppm(field_hz, inp.b0), voxel_size(img), tuple(inp.b0_dir)
        params = dict(inp.params)
        known = [p.name for p in registry.get(inp.method).parameters]
        unknown = set(params) - set(known)
        if unknown:
            raise ValueError(
                f"unknown parameters {sorted(unknown)} for {inp.method!r}; "
                f"use {', '.join(known[:-1])} or {known[-1]}"
            )
        device = "cpu" if inp.device == "torch" else inp.device
        chi, info = dl_invert(inp.method, field, m, vs, b0_dir, device=device, **params)
        expected = inp.weights_sha256 if isdefined(inp.weights_sha256) else None
        if expected and info.get("WeightsSha256") and info["WeightsSha256"] != expected:
            raise ValueError(
                f"the weights of {inp.method!r} ({info['WeightsFile']}, sha256 "
                f"{info['WeightsSha256']}) are not those the workflow was built with "
                f"(sha256 {expected}); they changed during the run: run qsmprep again"
            )
        chi = reference_mean(chi, m)
        name = out_path(inp.local_field, f"_{inp.method}_chi")
        self._results["out_file"] = save(chi, img, name)
        dc = data_consistency(chi, field, m, vs, b0_dir=b0_dir)
        used = {**params, **info}
        self._results.update(dc_residual=dc, parameters=used)
        self._results["meta"] = {"Parameters": used, "DataConsistencyResidual": round(dc, 4)}
        if isdefined(inp.bg_meta) and "Method" in inp.bg_meta:
            self._results["meta"]["BackgroundMethod"] = inp.bg_meta["Method"]
            self._results["meta"]["Mask"] = (
                f"the local-field mask of {inp.bg_meta['Method']} (the map's non-zero voxels)"
            )
        return runtime


class _CosmosInputSpec(ThreadsInputSpec):
    local_fields = InputMultiObject(
        File(exists=True), mandatory=True, desc="local field (Hz) of each orientation"
    )
    masks = InputMultiObject(
        File(exists=True), mandatory=True, desc="local-field mask of each orientation"
    )
    b0_dirs = traits.List(
        traits.List(traits.Float, minlen=3, maxlen=3),
        mandatory=True,
        desc="B0 direction of each orientation in the voxel coordinates of the common grid",
    )
    b0 = traits.List(traits.Float, mandatory=True, desc="field strength (T) of each orientation")
    params = traits.Dict(usedefault=True, desc="keyword arguments of recon.inversion.cosmos")
    device = traits.Enum(*DEVICES, usedefault=True, desc="cpu, auto (GPU if any), cuda, torch")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True, desc=_USE_GPU_DESC)


class _CosmosOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="COSMOS chi (ppm), mean 0 over the common mask")
    mask = File(exists=True, desc="common mask of the orientations (uint8)")
    parameters = traits.Dict(desc="effective parameters of COSMOS (JSON-able)")
    meta = traits.Dict(desc="sidecar entries: Parameters")


class Cosmos(ThreadedInterface):
    """Multi-orientation COSMOS (:func:`qsmprep.recon.inversion.cosmos`), mean-referenced."""

    input_spec = _CosmosInputSpec
    output_spec = _CosmosOutputSpec

    def _run_interface(self, runtime):
        inp = self.inputs
        n = len(inp.local_fields)
        if not (len(inp.masks) == len(inp.b0_dirs) == len(inp.b0) == n):
            raise ValueError(
                f"COSMOS got {n} fields, {len(inp.masks)} masks, {len(inp.b0_dirs)} B0"
                f" directions and {len(inp.b0)} field strengths; give one of each per orientation"
            )
        fields, masks = [], []
        for f, mf, b0 in zip(inp.local_fields, inp.masks, inp.b0, strict=True):
            data, img = load(f)
            fields.append(hz_to_ppm(data, b0))
            masks.append(load(mf, bool)[0])
        params = dict(inp.params)
        chi = cosmos(
            fields,
            masks,
            voxel_size(img),
            [tuple(b) for b in inp.b0_dirs],
            device=inp.device,
            **params,
        )
        common = np.logical_and.reduce(masks)
        chi = reference_mean(chi, common)
        self._results["out_file"] = save(chi, img, out_path(inp.local_fields[0], "_cosmos_chi"))
        self._results["mask"] = save(common, img, out_path(inp.masks[0], "_cosmos"), np.uint8)
        used = effective_params(cosmos, params)
        self._results.update(parameters=used, meta={"Parameters": used})
        return runtime
