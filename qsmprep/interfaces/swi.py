"""Interfaces of susceptibility-weighted imaging: SWI + minIP, and SMWI from a Chimap."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from qsmprep.interfaces._nifti import effective_params, load, out_path, save, voxel_size
from qsmprep.interfaces._threads import ThreadedInterface, ThreadsInputSpec
from qsmprep.recon import swi as swi_recon

__all__ = ["ComputeSMWI", "ComputeSWI"]

_SWI_KEYS = ("sigma_mm", "power", "te", "combine", "slab_mm")
_SMWI_KEYS = ("threshold", "power")


def _check_params(params: dict, allowed, what: str) -> dict:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; known: {list(allowed)}")
    return dict(params)


class _SWIInputSpec(ThreadsInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude (echoes last)")
    total_field = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask = File(exists=True, mandatory=True, desc="where the field is valid (brain)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    params = traits.Dict(
        usedefault=True, desc="sigma_mm, power, te, combine (recon.swi.swi) and slab_mm"
    )


class _SWIOutputSpec(TraitedSpec):
    swi = File(exists=True, desc="susceptibility-weighted image (whole head)")
    minip = File(exists=True, desc="sliding minimum intensity projection of the SWI")
    magnitude = File(exists=True, desc="combined magnitude (3D)")
    meta = traits.Dict(desc="sidecar entries of the SWI: Parameters")
    minip_meta = traits.Dict(desc="sidecar entries of the minIP: Parameters, axis, slices")


class ComputeSWI(ThreadedInterface):
    """SWI and its minIP (:func:`qsmprep.recon.swi.swi`, :func:`~.min_intensity_projection`).

    The minIP is written on a grid of its own: ``N - n + 1`` slices along the projection
    axis, its affine moved to the slab centres; its header describes exactly that.
    """

    input_spec = _SWIInputSpec
    output_spec = _SWIOutputSpec

    def _run_interface(self, runtime):
        params = _check_params(dict(self.inputs.params), _SWI_KEYS, "SWI")
        slab_mm = float(params.pop("slab_mm", 16.0))
        mag, _ = load(self.inputs.magnitude)
        field, fimg = load(self.inputs.total_field)
        brain, _ = load(self.inputs.mask, bool)
        te = list(self.inputs.echo_times)
        image, combined = swi_recon.swi(mag, field, brain, voxel_size(fimg), te, **params)
        minip, affine, info = swi_recon.min_intensity_projection(image, fimg.affine, slab_mm)
        used = effective_params(swi_recon.swi, params)
        used["te"] = float(params.get("te") or max(te))
        base = self.inputs.total_field
        self._results["swi"] = save(image, fimg, out_path(base, "_swi"))
        self._results["magnitude"] = save(combined, fimg, out_path(base, "_swimag"))
        self._results["minip"] = save(minip, fimg, out_path(base, "_minip"), affine=affine)
        self._results["meta"] = {"Parameters": used}
        self._results["minip_meta"] = {
            "Parameters": {**used, "slab_mm": slab_mm},
            "ProjectionAxis": int(info["axis"]),
            "SlabSlices": int(info["slices"]),
            "SlabThickness": float(info["slab_mm"]),
        }
        return runtime


class _SMWIInputSpec(ThreadsInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="combined magnitude (3D)")
    chimap = File(exists=True, mandatory=True, desc="susceptibility map (ppm)")
    params = traits.Dict(usedefault=True, desc="threshold (ppm), power (recon.swi.smwi)")


class _SMWIOutputSpec(TraitedSpec):
    para = File(exists=True, desc="magnitude weighted by the paramagnetic mask")
    dia = File(exists=True, desc="magnitude weighted by the diamagnetic mask")
    meta = traits.Dict(desc="sidecar entries: Parameters")


class ComputeSMWI(ThreadedInterface):
    """Susceptibility-map-weighted images (:func:`qsmprep.recon.swi.smwi`)."""

    input_spec = _SMWIInputSpec
    output_spec = _SMWIOutputSpec

    def _run_interface(self, runtime):
        params = _check_params(dict(self.inputs.params), _SMWI_KEYS, "SMWI")
        mag, img = load(self.inputs.magnitude)
        chi, _ = load(self.inputs.chimap)
        chi = np.nan_to_num(chi, nan=0.0, posinf=0.0, neginf=0.0)
        para, dia = swi_recon.smwi(mag, chi, **params)
        base = self.inputs.chimap
        self._results["para"] = save(para, img, out_path(base, "_smwipara"))
        self._results["dia"] = save(dia, img, out_path(base, "_smwidia"))
        self._results["meta"] = {"Parameters": effective_params(swi_recon.smwi, params)}
        return runtime
