"""Numerical head phantom.

The anatomy is defined in millimetres in a head frame (x right, y anterior, z superior, origin
at the centre of the field of view) and rasterised on any requested grid, so the same seed gives
the same head at every voxel size. Every structure is an implicit surface (an approximate
signed distance in mm, negative inside) evaluated at coordinates deformed by a smooth, seeded
random displacement; structures are painted in order (scalp, skull, air cavities, CSF, cortex,
white matter, ventricles, deep grey nuclei, veins, lesions) with a partial-volume fraction
``clip(0.5 - d / h, 0, 1)`` (``h`` the mean voxel size), which blends chi, M0 and R2* linearly
at boundaries. The label of a voxel is the last structure that covers at least half of it.
The intracranial boundary alone is sharp (no blending with bone), so that every brain-mask
voxel holds intracranial values and ``chi * brain_mask`` is the exact source of the local
field.

Labels, tissue values (with units and sources) and :class:`HeadPhantom` live in
:mod:`qsmprep.sim.tissues`, the drawing primitives in :mod:`qsmprep.sim.shapes` and the
ground-truth fields (:func:`simulate_fields`, :func:`shim_basis`) in :mod:`qsmprep.sim.fields`;
this module re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qsmprep.recon._checks import check_voxel_size
from qsmprep.sim.fields import shim_basis, simulate_fields
from qsmprep.sim.shapes import (
    Canvas,
    RandomField,
    Scaled,
    capsule_sd,
    ellipsoid_sd,
    paint_tube,
    rot_x,
    rot_z,
    sulcal_distance,
    sulcal_lattice,
    surface_point,
)
from qsmprep.sim.tissues import (
    BRAIN_LABELS,
    CHI_AIR,
    LABEL_NAMES,
    TISSUE_PROPERTIES,
    HeadPhantom,
)

__all__ = [
    "BRAIN_LABELS",
    "CHI_AIR",
    "LABEL_NAMES",
    "TISSUE_PROPERTIES",
    "HeadPhantom",
    "make_head_phantom",
    "shim_basis",
    "simulate_fields",
]

_TEXTURED = (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)
_TEXTURE_STD = 0.004  # ppm, clipped at +-0.01
_TEXTURE_MAX = 0.01


# Head-frame anatomy (mm). The cerebrum is an ellipsoid of 128 x 160 x 104 mm; with the CSF
# layer, ~6.5 mm of skull and ~5.5 mm of scalp the head is about 150 x 185 x 140 mm.
_CEREBRUM = ((0.0, -2.0, 10.0), (64.0, 80.0, 52.0))
_TEMPORAL = [((s * 42.0, 5.0, -20.0), (22.0, 34.0, 18.0)) for s in (-1, 1)]
_CEREBELLUM = ((0.0, -50.0, -32.0), (46.0, 28.0, 18.0))
_BRAINSTEM = ((0.0, -12.0, -2.0), (0.0, -30.0, -58.0), 11.0)
_SKULL_MM = 6.5
_SCALP_MM = 5.5
_WARP_MM = 4.0  # rms magnitude of the smooth random displacement
_MARGIN = 0.0  # structures' own margins; the deformation is inverted in Canvas.box


def _nuclei(sign):
    """Deep grey nuclei of one hemisphere: (label, centre, semi-axes, rotation)."""
    s = float(sign)
    return [
        (1, (s * 13, 27, 1), (5.0, 11.0, 8.0), rot_x(-20)),  # caudate head
        (1, (s * 15, 9, 11), (3.5, 12.0, 4.0), rot_x(-15)),  # caudate body
        (3, (s * 25, 17, -6), (5.0, 15.0, 9.0), rot_z(-s * 8)),  # putamen
        (2, (s * 19, 11, -9), (3.5, 8.0, 4.5), rot_z(-s * 8)),  # globus pallidus
        (7, (s * 11, -4, -1), (7.0, 14.0, 8.0), rot_z(s * 10)),  # thalamus
        (6, (s * 11, -4, -20), (3.5, 8.0, 3.0), rot_z(s * 25) @ rot_x(20)),  # SN
        (4, (s * 5, -6, -17), (3.2, 3.8, 3.5), None),  # red nucleus
        (5, (s * 15, -42, -42), (6.0, 8.0, 5.0), rot_z(s * 20)),  # dentate
    ]


def _ventricles():
    out = []
    for s in (-1.0, 1.0):
        out.append(((s * 7, 6, 12), (4.5, 22.0, 6.0), rot_x(-8)))  # body + frontal horn
        out.append(((s * 14, -24, 10), (4.0, 14.0, 5.5), rot_z(s * 25)))  # atrium/occipital
    out.append(((0.0, -3.0, -4.0), (1.5, 10.0, 7.0), None))  # third ventricle
    out.append(((0.0, -36.0, -34.0), (5.0, 3.5, 5.0), None))  # fourth ventricle
    return out


def _air_cavities():
    """Sinus-like air cavities and airways (centre, semi-axes, rotation)."""
    cav = [
        ((0.0, 80.0, -12.0), (13.0, 4.5, 10.0), None),  # frontal sinus
        ((0.0, 28.0, -54.0), (12.0, 10.0, 9.0), None),  # sphenoid sinus
        ((0.0, 66.0, -56.0), (9.0, 22.0, 15.0), None),  # nasal cavity
    ]
    for s in (-1.0, 1.0):
        cav.append(((s * 10, 58.0, -34.0), (5.5, 14.0, 7.0), None))  # ethmoid cells
        cav.append(((s * 27, 58.0, -62.0), (11.0, 15.0, 13.0), None))  # maxillary sinus
        cav.append(((s * 66, -8.0, -40.0), (9.0, 5.0, 5.0), None))  # ear canal
        cav.append(((s * 54, -24.0, -48.0), (8.0, 9.0, 9.0), None))  # mastoid air cells
    return cav


def make_head_phantom(
    shape=(96, 96, 80),
    voxel_size=(2.0, 2.0, 2.0),
    *,
    seed: int = 0,
    lesions: bool = True,
    b0: float = 3.0,
) -> HeadPhantom:
    """Numerical adult head: chi, M0, R2*, labels and masks on any grid.

    The anatomy (mm, head frame centred in the field of view): scalp and face/neck soft tissue,
    skull, sinus-like air cavities (frontal, ethmoid, sphenoid, maxillary sinuses, nasal cavity,
    ear canals, mastoid cells) that make large background fields near the inferior frontal and
    temporal brain, a CSF layer, a folded cortex (grey-matter ribbon of 2-4 mm lining the
    surface and seeded sulci: thin CSF sheets 8-22 mm deep, roughly perpendicular to the
    surface, about a centimetre apart), white matter,
    cerebellum and brainstem, lateral/third/fourth ventricles, the deep grey nuclei, dural
    sinuses and cortical veins, and optional lesions (one haemorrhage +0.8 ppm, one
    calcification -0.5 ppm). All shapes are deformed by one smooth random displacement field
    (~4 mm) and scaled by a random factor (0.95-1.04 per axis); tissue properties carry a smooth
    texture (chi +-0.01 ppm, R2* +-5 %). Values per label: :data:`TISSUE_PROPERTIES`.

    Parameters
    ----------
    shape : 3 ints
        Matrix. The brain (~130 x 165 x 120 mm) must fit: e.g. (64, 64, 48) at 3 mm,
        (96, 96, 80) at 2 mm, (224, 224, 160) at 1 mm.
    voxel_size : float or 3 floats
        mm.
    seed : int
        Seed of the anatomy and texture (same seed, same arrays).
    lesions : bool
        Add a haemorrhage and a calcification in the white matter.
    b0 : float
        Field strength (T); R2* is scaled by ``b0 / 3``.

    Returns
    -------
    HeadPhantom, with an axial affine (voxel centre of the matrix at world 0, RAS).

    References
    ----------
    Tissue values: Deistung A, Schaefer A, Schweser F, et al. Toward in vivo histology: a
    comparison of quantitative susceptibility mapping (QSM) with magnitude-, phase-, and
    R2*-imaging at ultra-high magnetic field strength. NeuroImage 2013;65:299-314.
    Marques JP, Meineke J, Milovic C, et al. QSM reconstruction challenge 2.0: a realistic in
    silico head phantom for MRI data simulation and evaluation of susceptibility mapping
    procedures. Magn Reson Med 2021;86:526-542.
    """
    shape, vs = _checked_grid(shape, voxel_size)
    if not b0 > 0:
        raise ValueError(f"b0 must be positive (T), got {b0!r}")
    draws = _draw(np.random.default_rng(seed))
    axes, coords, umax = _deformed_grid(shape, vs, draws)
    canvas = Canvas(shape, vs, coords, b0, draws.scale, umax)
    surfaces = _intracranial_surfaces(coords, axes, draws.thick)
    _paint_head(canvas, surfaces.icv)
    _paint_brain(canvas, surfaces, draws)
    d_icv = surfaces.icv
    del surfaces  # the veins need the intracranial volume only
    _paint_veins(canvas, d_icv, draws.veins)
    lesion_list = _paint_lesions(canvas, draws) if lesions else []
    chi, r2 = _textured(canvas, draws.texture_seed)
    labels = canvas.labels
    affine = np.diag([*vs, 1.0])
    affine[:3, 3] = -np.asarray(vs) * (np.asarray(shape) - 1) / 2.0
    return HeadPhantom(
        chi=chi.astype(np.float32, copy=False),
        labels=labels,
        brain_mask=np.isin(labels, BRAIN_LABELS),
        head_mask=labels != 14,
        m0=canvas.m0,
        r2star=r2.astype(np.float32, copy=False),
        voxel_size=vs,
        affine=affine,
        lesions=lesion_list,
        b0=float(b0),
        seed=int(seed),
    )


# ------------------------------------------------------------------------------ phantom stages


def _checked_grid(shape, voxel_size):
    """The matrix as 3 ints (each >= 8) and the voxel size as 3 positive floats (mm)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 ints >= 8, got {shape!r}")
    return shape, check_voxel_size(voxel_size)


@dataclass
class _Draws:
    """Every random draw of the anatomy, made in a fixed order independent of the grid."""

    scale: np.ndarray  # per-axis scaling of the head (3 floats in [0.95, 1.04))
    warp: RandomField  # smooth displacement field (3 components)
    sulci: RandomField  # the field whose zero set are the sulcal sheets
    wiggle: RandomField  # displacement that bends the sulcal sheets (3 components)
    thick: RandomField  # CSF, grey-matter and sulcal-depth variations (3 components)
    veins: np.ndarray  # (6, 3) uniform draws of the cortical veins
    lesions: np.ndarray  # (2, 3) uniform draws of the lesions
    texture_seed: int  # seed of the tissue texture


def _draw(rng) -> _Draws:
    """Draw the anatomy's random numbers from ``rng``, in the one order that fixes the head."""
    scale = rng.uniform(0.95, 1.04, size=3)
    warp = RandomField(rng, k0=0.0, sigma_k=1 / 90.0, kmax=1 / 50.0, n_out=3)
    sulci = RandomField(rng, k0=1 / 22.0, sigma_k=1 / 150.0, kmax=1 / 16.0)
    wiggle = RandomField(rng, k0=1 / 30.0, sigma_k=1 / 80.0, kmax=1 / 15.0, n_out=3)
    thick = RandomField(rng, k0=0.0, sigma_k=1 / 40.0, kmax=1 / 25.0, n_out=3)
    veins = rng.uniform(size=(6, 3))
    lesions = rng.uniform(size=(2, 3))
    texture_seed = int(rng.integers(2**31))
    return _Draws(scale, warp, sulci, wiggle, thick, veins, lesions, texture_seed)


def _deformed_grid(shape, vs, draws: _Draws):
    """Head-frame coordinates of the voxels: ``grid / scale + u(grid)``.

    Returns the grid's axes (mm from the centre of the matrix), the deformed coordinates
    (three float32 arrays broadcasting to ``shape``) and the largest ``|u_i|`` per axis.
    """
    axes = [(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, vs, strict=True)]
    u = draws.warp(*axes) * np.float32(_WARP_MM / np.sqrt(3.0))  # ~4 mm rms displacement
    grid = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)
    coords = tuple(
        (grid[i] / np.float32(draws.scale[i]) + u[i]).astype(np.float32, copy=False)
        for i in range(3)
    )
    umax = [float(np.abs(u[i]).max()) for i in range(3)]
    return axes, coords, umax


@dataclass
class _Surfaces:
    """Signed distances (mm, negative inside) of the intracranial structures, and the
    cortex's seeded thicknesses (mm, per voxel)."""

    cortex: np.ndarray  # smooth outer surface of cerebrum, temporal lobes and cerebellum
    stem: np.ndarray  # brainstem
    icv: np.ndarray  # intracranial volume: the brain plus its CSF layer
    gm_mm: np.ndarray  # grey-matter thickness
    sulc_depth: np.ndarray  # depth of the sulci below the outer surface


def _intracranial_surfaces(coords, axes, thick) -> _Surfaces:
    """The brain's outer surfaces and the CSF layer around them, with seeded thicknesses."""
    x, y, z = coords
    d_cortex = ellipsoid_sd(x, y, z, *_CEREBRUM)
    for c, s in _TEMPORAL:
        d_cortex = np.minimum(d_cortex, ellipsoid_sd(x, y, z, c, s))
    d_cortex = np.minimum(d_cortex, ellipsoid_sd(x, y, z, *_CEREBELLUM))
    d_stem = capsule_sd(x, y, z, *_BRAINSTEM)
    t = thick(*axes)
    csf_mm = np.clip(2.0 + 0.8 * t[0], 1.0, 3.5)
    gm_mm = np.clip(2.9 + 0.5 * t[1], 2.0, 4.0)
    sulc_depth = np.clip(15.0 + 3.0 * t[2], 8.0, 22.0)
    del t
    d_icv = np.minimum(d_cortex, d_stem) - csf_mm
    return _Surfaces(d_cortex, d_stem, d_icv, gm_mm, sulc_depth)


def _paint_head(canvas: Canvas, d_icv) -> None:
    """Scalp around the skull, face and neck below, the skull and the air cavities."""
    x, y, z = canvas.coords()
    d_face = ellipsoid_sd(x, y, z, (0.0, 12.0, -58.0), (62.0, 84.0, 42.0))
    d_neck = np.maximum(
        ellipsoid_sd(x, y, z * 0.0, (0.0, -12.0, 0.0), (50.0, 55.0, 1e3)), z + 40.0
    )
    d_head = np.minimum(np.minimum(d_icv - (_SKULL_MM + _SCALP_MM), d_face), d_neck)
    canvas.paint(d_head, 15)
    del d_face, d_neck
    canvas.paint(np.maximum(d_icv - _SKULL_MM, d_head + 1.5), 13)  # skull (inside the scalp)
    for c, s, r in _air_cavities():
        sl = canvas.box(np.subtract(c, max(s)), np.add(c, max(s)), _MARGIN)
        xs, ys, zs = canvas.coords(sl)
        d = np.maximum(ellipsoid_sd(xs, ys, zs, c, s, r), 1.5 - d_icv[sl])  # >= 1.5 mm bone
        canvas.paint(d, 14, sl)


def _paint_brain(canvas: Canvas, surfaces: _Surfaces, draws: _Draws) -> None:
    """CSF, the folded cortex, white matter, ventricles and deep grey nuclei."""
    canvas.paint(surfaces.icv, 10, hard=True)
    _paint_cortex(canvas, surfaces, draws)
    for c, s, r in _ventricles():
        sl = canvas.box(np.subtract(c, max(s)), np.add(c, max(s)), _MARGIN)
        canvas.paint(ellipsoid_sd(*canvas.coords(sl), c, s, r), 18, sl)
    for sign in (-1, 1):
        for lab, c, s, r in _nuclei(sign):
            sl = canvas.box(np.subtract(c, max(s)), np.add(c, max(s)), _MARGIN)
            canvas.paint(ellipsoid_sd(*canvas.coords(sl), c, s, r), lab, sl)


def _paint_cortex(canvas: Canvas, surfaces: _Surfaces, draws: _Draws) -> None:
    """Grey matter and white matter, with sulci and the interhemispheric fissure.

    Sulci are thin CSF sheets (zero set of a random field on the sphere, projected radially so
    they run perpendicular to the surface) reaching ``sulc_depth`` below the smooth outer
    surface; grey matter lines the surface and both walls of every sulcus.
    """
    x, y, z = canvas.coords()
    d_cortex, gm_mm, sulc_depth = surfaces.cortex, surfaces.gm_mm, surfaces.sulc_depth
    depth_in = -d_cortex  # mm below the smooth outer surface
    shell = depth_in < float(sulc_depth.max() + gm_mm.max()) + 2 * canvas.h
    dist = np.full(canvas.shape, 1e3, np.float32)
    lattice = sulcal_lattice(draws.sulci, Scaled(draws.wiggle, 3.0))
    dist[shell] = sulcal_distance(lattice, x, y, z, shell)
    w_csf = 0.6  # half-width of the CSF in a sulcus, mm
    sd_sulc = np.maximum(dist - w_csf, depth_in - sulc_depth)  # < 0 inside a sulcus
    sd_gm = np.minimum(
        depth_in - gm_mm, np.maximum(sd_sulc - gm_mm, depth_in - sulc_depth - gm_mm)
    )  # < 0 within gm_mm of the surface or of a sulcus
    del dist, shell, depth_in
    fiss_w = 1.5
    z_cc = 24.0  # corpus callosum roof: the interhemispheric fissure lies above it
    sd_fiss = np.maximum(np.abs(x) - fiss_w, z_cc - z)  # negative inside the fissure
    d_pial = np.minimum(np.maximum(np.maximum(d_cortex, -sd_sulc), -sd_fiss), surfaces.stem)
    canvas.paint(d_pial, 9)
    del d_pial
    d_wm = np.minimum(np.maximum(np.maximum(d_cortex, -sd_gm), gm_mm - sd_fiss), surfaces.stem)
    canvas.paint(d_wm, 8)


def _paint_veins(canvas: Canvas, d_icv, vein_draws) -> None:
    """Dural sinuses, internal cerebral veins and seeded cortical veins (inside the skull)."""
    cc, cs = _CEREBRUM
    th = np.deg2rad(np.linspace(25.0, 200.0, 36))
    sss = [(0.0, cc[1] + cs[1] * np.cos(a), cc[2] + cs[2] * np.sin(a)) for a in th]
    paint_tube(canvas, sss, 3.0, 11, _MARGIN, within=d_icv)
    conf = np.asarray(sss[-1])
    for s in (-1.0, 1.0):
        trans = [
            conf,
            (s * 25.0, conf[1] + 4.0, conf[2] - 4.0),
            (s * 45.0, -62.0, -24.0),
            (s * 55.0, -40.0, -34.0),
        ]
        paint_tube(canvas, trans, 2.8, 11, _MARGIN, within=d_icv)
    galen = (0.0, -22.0, 8.0)
    paint_tube(
        canvas, [galen, (0.0, -48.0, 2.0), conf], 2.2, 11, _MARGIN, within=d_icv
    )  # straight sinus
    for s in (-1.0, 1.0):  # internal cerebral veins
        paint_tube(
            canvas,
            [(s * 2.5, 12.0, 8.0), (s * 1.5, -8.0, 9.0), galen],
            1.2,
            11,
            _MARGIN,
            within=d_icv,
        )
    for k in range(vein_draws.shape[0]):  # cortical veins draining up to the sagittal sinus
        side = -1.0 if k % 2 else 1.0
        azim = 90.0 + side * (40.0 + 60.0 * vein_draws[k, 0]) * (1 if k < 4 else -1)
        elev0 = 5.0 + 25.0 * vein_draws[k, 1]
        dazim = (vein_draws[k, 2] - 0.5) * 30.0
        elevs = np.linspace(elev0, 78.0, 14)
        pts = [
            surface_point(cc, cs, azim + dazim * (e - elev0) / 78.0, e, scale=1.02) for e in elevs
        ]
        paint_tube(canvas, pts, 1.3, 11, _MARGIN, within=d_icv)


def _paint_lesions(canvas: Canvas, draws: _Draws) -> list[dict]:
    """A haemorrhage and a calcification in the centrum semiovale (inside the white matter).

    Returns their descriptions (:attr:`HeadPhantom.lesions`), with the grid position of each
    centre found by inverting the deformation.
    """
    scale, shape, vs = draws.scale, canvas.shape, canvas.vs
    out: list[dict] = []
    specs = [("haemorrhage", 17, 3.5), ("calcification", 16, 2.5)]
    for (kind, lab, rad), dr in zip(specs, draws.lesions, strict=True):
        side = -1.0 if dr[0] < 0.5 else 1.0
        c = np.array([side * (18.0 + 10.0 * dr[1]), -30.0 + 50.0 * dr[2], 28.0 + 8.0 * dr[0]])
        sl = canvas.box(c - rad, c + rad, _MARGIN)
        xs, ys, zs = canvas.coords(sl)
        canvas.paint(ellipsoid_sd(xs, ys, zs, c, (rad, rad, rad)), lab, sl)
        # grid position of the centre: solve r / scale + u(r) = c by fixed-point iteration
        pos = c * scale
        for _ in range(20):
            uu = draws.warp(*[[v] for v in pos]).reshape(3) * (_WARP_MM / np.sqrt(3.0))
            pos = scale * (c - uu)
        out.append(
            {
                "kind": kind,
                "label": lab,
                "centre_mm": [round(float(v), 3) for v in pos],
                "centre_voxel": [
                    round(float(v / h + (n - 1) / 2.0), 3)
                    for v, h, n in zip(pos, vs, shape, strict=True)
                ],
                "radius_mm": rad,
                "chi_ppm": TISSUE_PROPERTIES[lab][0],
            }
        )
    return out


def _textured(canvas: Canvas, texture_seed: int):
    """chi and R2* with a smooth seeded texture inside the tissues (grid-dependent).

    Returns ``(chi, r2)``: chi + texture (ppm, clipped to +-0.01) and R2* times (1 + 5 x the
    texture).
    """
    shape, vs = canvas.shape, canvas.vs
    trng = np.random.default_rng(texture_seed)
    tex = trng.standard_normal(shape, dtype=np.float32)
    tex = ndimage.gaussian_filter(tex, sigma=[max(1.5 / v, 0.5) for v in vs], mode="wrap")
    tex *= np.float32(_TEXTURE_STD / max(float(tex.std()), 1e-12))
    np.clip(tex, -_TEXTURE_MAX, _TEXTURE_MAX, out=tex)
    tex *= np.isin(canvas.labels, _TEXTURED)
    chi = canvas.chi + tex
    r2 = canvas.r2 * (1.0 + np.float32(5.0) * tex)
    return chi, r2
