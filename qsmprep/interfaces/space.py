"""Nipype interfaces of the template-space steps (thin wrappers over :mod:`qsmprep.space`)."""

from __future__ import annotations

import json
import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep.interfaces._nifti import load, out_path, save

__all__ = [
    "ApplyTemplateTransform",
    "AtlasToNative",
    "ROIStatistics",
    "ReferenceToRegion",
    "RegisterToTemplate",
    "RegistrationFigure",
]


class _RegisterInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="3D or 4D (multi-echo) magnitude")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the magnitude grid")
    template = traits.Str(mandatory=True, desc="template identifier (for names and sidecars)")
    template_t1w = traits.List(traits.Str, mandatory=True, desc="brain T1w per resolution")
    template_mask = traits.List(traits.Str, mandatory=True, desc="brain mask per resolution")
    params = traits.Dict(usedefault=True, desc="keyword arguments of register_to_template")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _RegisterOutputSpec(TraitedSpec):
    forward_xfm = File(exists=True, desc="composite transform native -> template (ITK .h5)")
    inverse_xfm = File(exists=True, desc="composite transform template -> native (ITK .h5)")
    warped = File(exists=True, desc="magnitude resampled onto the registration grid")
    fixed = File(exists=True, desc="template on the registration grid")
    fixed_mask = File(exists=True, desc="template brain mask on the registration grid")
    dice = traits.Float(desc="Dice of the warped brain mask and the template brain mask")
    meta = traits.Dict(desc="sidecar entries of the transforms")


class RegisterToTemplate(SimpleInterface):
    """Rigid + affine + SyN registration of the magnitude to a template (antspyx)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.space.registration import register_to_template

        inp = self.inputs
        res = register_to_template(
            inp.magnitude,
            inp.brain_mask,
            list(inp.template_t1w),
            list(inp.template_mask),
            os.getcwd(),
            threads=inp.num_threads,
            **dict(inp.params),
        )
        self._results.update(
            forward_xfm=str(res.forward),
            inverse_xfm=str(res.inverse),
            warped=str(res.warped),
            fixed=str(res.fixed),
            fixed_mask=str(res.fixed_mask),
            dice=res.dice,
            meta={"Template": inp.template, "Dice": round(res.dice, 4), **res.parameters},
        )
        return runtime


class _FigureInputSpec(BaseInterfaceInputSpec):
    warped = File(exists=True, mandatory=True, desc="magnitude warped into template space")
    fixed = File(exists=True, mandatory=True, desc="template image")
    fixed_mask = File(exists=True, mandatory=True, desc="template brain mask")
    title = traits.Str("", usedefault=True, desc="figure title")


class _FigureOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="PNG: template edges over the warped magnitude")


class RegistrationFigure(SimpleInterface):
    """The report's registration figure (:func:`qsmprep.reports.space.registration_figure`)."""

    input_spec = _FigureInputSpec
    output_spec = _FigureOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.reports.space import registration_figure

        path = os.path.abspath("registration_overlay.png")
        registration_figure(
            self.inputs.warped, self.inputs.fixed, self.inputs.fixed_mask, path,
            title=self.inputs.title,
        )  # fmt: skip
        self._results["out_file"] = path
        return runtime


class _AtlasInputSpec(BaseInterfaceInputSpec):
    atlases = traits.List(traits.Dict, mandatory=True, desc="{spec, dseg, table} per atlas")
    inverse_xfm = File(exists=True, mandatory=True, desc="template -> native transform")
    brain_mask = File(exists=True, mandatory=True, desc="native grid (labels kept inside)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _AtlasOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="canonical ROI labels on the native grid (int16)")
    template_labels = File(exists=True, desc="canonical ROI labels in the template")
    out_tsv = File(exists=True, desc="label table (index, name)")
    rois = traits.Dict(desc="{label: name} of the regions present")
    meta = traits.Dict(desc="sidecar entries: atlases and the source of each region")


class AtlasToNative(SimpleInterface):
    """Merge atlases into canonical regions and warp them to native space (generic label)."""

    input_spec = _AtlasInputSpec
    output_spec = _AtlasOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        from nibabel.processing import resample_from_to

        from qsmprep.space.atlas import ROIS, canonical_labels
        from qsmprep.space.registration import apply_transforms

        atlases = list(self.inputs.atlases)
        first = nib.load(atlases[0]["dseg"])
        arrays = []
        for a in atlases:
            img = nib.load(a["dseg"])
            if img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine):
                img = resample_from_to(img, first, order=0)
            table = {int(k): v for k, v in a["table"].items()}
            arrays.append((np.asarray(img.dataobj), table))
        labels, sources = canonical_labels(arrays)
        tpl_path = os.path.abspath("atlas_template_dseg.nii.gz")
        img = nib.Nifti1Image(labels.astype(np.int16), first.affine)
        img.header.set_qform(first.affine, code=1)
        img.header.set_sform(first.affine, code=1)
        nib.save(img, tpl_path)
        native = apply_transforms(
            tpl_path,
            self.inputs.brain_mask,
            [self.inputs.inverse_xfm],
            os.path.abspath("atlas_native_tmp.nii.gz"),
            interpolation="genericLabel",
            threads=self.inputs.num_threads,
        )
        data, _ = load(native, np.int16)
        mask, mimg = load(self.inputs.brain_mask, bool)
        data = np.where(mask, data, 0)
        out = save(data, mimg, os.path.abspath("atlas_native_dseg.nii.gz"), np.int16)
        os.remove(native)
        rois = {int(k): ROIS[k] for k in ROIS if k in sources}
        tsv = os.path.abspath("atlas_native_dseg.tsv")
        with open(tsv, "w") as fh:
            fh.write("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in rois.items()))
        self._results.update(
            out_file=out,
            template_labels=tpl_path,
            out_tsv=tsv,
            rois={str(k): v for k, v in rois.items()},
            meta={
                "Atlases": [a["spec"] for a in atlases],
                "RegionSources": {
                    ROIS[k]: atlases[pos]["spec"] for k, pos in sorted(sources.items())
                },
                "Interpolation": "genericLabel (ANTs)",
            },
        )
        return runtime


class _ReferenceInputSpec(BaseInterfaceInputSpec):
    chimap = File(exists=True, mandatory=True, desc="chi (ppm)")
    labels = File(exists=True, mandatory=True, desc="canonical ROI labels (native grid)")
    mask = File(exists=True, mandatory=True, desc="local-field mask")
    label = traits.Int(18, usedefault=True, desc="reference region label (18: ventricles)")
    meta = traits.Dict(desc="sidecar entries to pass on (merged under the reference ones)")


class _ReferenceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="chi referenced to the region's mean (ppm)")
    offset = traits.Float(desc="subtracted mean (ppm)")
    meta = traits.Dict(desc="sidecar entries: Reference, ReferenceOffset, ReferenceVoxels")


class ReferenceToRegion(SimpleInterface):
    """``chi - mean(chi[region])`` in the mask (:func:`~qsmprep.space.atlas.reference_region`)."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.space.atlas import ROIS, reference_region

        chi, img = load(self.inputs.chimap)
        labels, _ = load(self.inputs.labels, np.int16)
        mask, _ = load(self.inputs.mask, bool)
        ref, offset, n = reference_region(chi, labels, mask, label=self.inputs.label)
        self._results["out_file"] = save(ref, img, out_path(self.inputs.chimap, "_ref"))
        meta = dict(self.inputs.meta) if isdefined(self.inputs.meta) else {}
        name = ROIS.get(self.inputs.label, str(self.inputs.label))
        meta.update(
            Reference=f"mean of the atlas {name} (CSF) in the local mask",
            ReferenceRegion="csf",
            ReferenceOffset=round(offset, 6),
            ReferenceVoxels=n,
        )
        self._results.update(offset=offset, meta=meta)
        return runtime


class _ROIInputSpec(BaseInterfaceInputSpec):
    chimap = File(exists=True, mandatory=True, desc="the map: chi (ppm) or R2* (1/s)")
    labels = File(exists=True, mandatory=True, desc="canonical ROI labels (native grid)")
    mask = File(exists=True, mandatory=True, desc="local-field mask")
    rois = traits.Dict(mandatory=True, desc="{label: name} of the regions to report")


class _ROIOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="TSV: roi, label, mean, median, std, voxels")
    rows = traits.List(traits.Dict, desc="the table rows")


class ROIStatistics(SimpleInterface):
    """ROI table of one map, chi or R2* (:func:`qsmprep.space.atlas.roi_statistics`)."""

    input_spec = _ROIInputSpec
    output_spec = _ROIOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.space.atlas import roi_statistics, write_roi_table

        chi, _ = load(self.inputs.chimap)
        labels, _ = load(self.inputs.labels, np.int16)
        mask, _ = load(self.inputs.mask, bool)
        rois = {int(k): v for k, v in self.inputs.rois.items()}
        rows = roi_statistics(chi, labels, mask, rois)
        path = os.path.abspath("roistats.tsv")
        write_roi_table(rows, path)
        self._results.update(out_file=path, rows=json.loads(json.dumps(rows, default=str)))
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="native image (chi, ppm)")
    reference = File(exists=True, mandatory=True, desc="an image on the output grid")
    transforms = traits.List(File(exists=True), mandatory=True, desc="ANTs transforms")
    interpolation = traits.Str("linear", usedefault=True, desc="ANTs interpolation")
    suffix = traits.Str("_space", usedefault=True, desc="output name suffix")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="ITK threads")


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image resampled onto the reference grid")


class ApplyTemplateTransform(SimpleInterface):
    """Resample through ANTs transforms (:func:`~qsmprep.space.registration.apply_transforms`)."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.space.registration import apply_transforms

        out = out_path(self.inputs.in_file, self.inputs.suffix)
        self._results["out_file"] = str(
            apply_transforms(
                self.inputs.in_file,
                self.inputs.reference,
                list(self.inputs.transforms),
                out,
                interpolation=self.inputs.interpolation,
                threads=self.inputs.num_threads,
            )
        )
        return runtime
