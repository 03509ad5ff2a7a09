"""Interface of the relaxation maps: 4D magnitude + brain mask -> R2* (1/s), T2* (s), S0."""

from __future__ import annotations

from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from qsmprep.interfaces._nifti import load, out_path, save
from qsmprep.interfaces._registry import MethodName
from qsmprep.interfaces._threads import ThreadedInterface, ThreadsInputSpec
from qsmprep.recon import r2star

__all__ = ["R2StarMap"]


class _R2StarInputSpec(ThreadsInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude, echoes on the last axis")
    mask = File(exists=True, mandatory=True, desc="brain mask; the maps are 0 outside")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s), two or more")
    method = MethodName(
        "r2star",
        "auto",
        extra=("auto",),
        usedefault=True,
        desc="R2* estimator: auto or a registered one (qsmprep.methods)",
    )
    params = traits.Dict(usedefault=True, desc="keyword arguments of recon.r2star.fit_r2star")


class _R2StarOutputSpec(TraitedSpec):
    r2star = File(exists=True, desc="R2* (1/s), clipped to the physical range")
    t2star = File(exists=True, desc="T2* (s) = 1 / R2*")
    s0 = File(exists=True, desc="S0 (units of the magnitude)")
    meta = traits.Dict(desc="sidecar entries: method used, clipping range and counts")


class R2StarMap(ThreadedInterface):
    """R2*, T2* and S0 maps by :func:`qsmprep.recon.r2star.fit_r2star` in the brain mask."""

    input_spec = _R2StarInputSpec
    output_spec = _R2StarOutputSpec

    def _run_interface(self, runtime):
        mag, _ = load(self.inputs.magnitude)
        brain, mimg = load(self.inputs.mask, bool)
        r2, t2, s0, info = r2star.fit_r2star(
            mag,
            self.inputs.echo_times,
            mask=brain,
            method=self.inputs.method,
            **dict(self.inputs.params),
        )
        method = info["method"]
        meta = {
            "Method": method,
            "MethodRequested": self.inputs.method,
            "R2starRange": info["r2star_range"],
            "T2starMax": info["t2star_max"],
            "FittedVoxels": info["voxels"],
            "NotFittedVoxels": info["not_fitted"],
            "ClippedLowVoxels": info["clipped_low"],
            "ClippedHighVoxels": info["clipped_high"],
            "T2starCappedVoxels": info["t2star_capped"],
        }
        if "iterations" in info:  # an iterative estimator (NLLS)
            meta["Iterations"] = info["iterations"]
            meta["NotConvergedVoxels"] = info["not_converged"]
        self._results["meta"] = meta
        base = self.inputs.mask
        self._results["r2star"] = save(r2, mimg, out_path(base, "_r2star"))
        self._results["t2star"] = save(t2, mimg, out_path(base, "_t2star"))
        self._results["s0"] = save(s0, mimg, out_path(base, "_s0"))
        return runtime
