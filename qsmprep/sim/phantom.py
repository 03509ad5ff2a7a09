"""Numerical head phantom and its ground-truth fields.

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

Units: chi in ppm (SI) relative to water (CSF = 0; air +9.4 ppm, bone -2 ppm); R2* in 1/s;
M0 in arbitrary units (CSF = 1); lengths in mm.

Typical values from the literature (susceptibility: Deistung A et al. NeuroImage
2013;65:299-314 and Marques JP et al. MRM 2021;86:526-542; R2*: Peran P et al. Brain
2010;133:3423; Li W et al. NeuroImage 2014;105:229).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qsmprep.recon._checks import check_b0_dir, check_mask, check_voxel_size
from qsmprep.recon.kernels import GAMMA_BAR, b0_dir_from_affine
from qsmprep.sim.forward import forward_field

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

CHI_AIR = 9.4
"""Susceptibility of air relative to water (ppm, SI)."""

LABEL_NAMES: dict[int, str] = {
    1: "Caudate",
    2: "Globus pallidus",
    3: "Putamen",
    4: "Red nucleus",
    5: "Dentate nucleus",
    6: "Substantia nigra",
    7: "Thalamus",
    8: "White matter",
    9: "Grey matter (cortex)",
    10: "CSF",
    11: "Venous blood (veins and dural sinuses)",
    13: "Bone (skull)",
    14: "Air (sinuses, airways, outside head)",
    15: "Soft tissue (scalp, face, neck)",
    16: "Calcification",
    17: "Haemorrhage / microbleed",
    18: "Ventricular CSF",
}
"""Segmentation labels (the ``dseg`` of the ground truth)."""

BRAIN_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18)
"""Labels of the intracranial brain mask (brain tissue, CSF, veins, lesions)."""

TISSUE_PROPERTIES: dict[int, tuple[float, float, float]] = {
    # label: (chi ppm relative to CSF, M0, R2* at 3 T in 1/s)
    1: (0.06, 0.75, 22.0),
    2: (0.18, 0.75, 45.0),
    3: (0.05, 0.75, 30.0),
    4: (0.12, 0.75, 35.0),
    5: (0.12, 0.75, 35.0),
    6: (0.15, 0.75, 40.0),
    7: (0.01, 0.75, 21.0),
    8: (-0.03, 0.70, 20.0),
    9: (0.01, 0.80, 15.0),
    10: (0.0, 1.00, 2.0),
    11: (0.40, 0.80, 45.0),
    13: (-2.0, 0.05, 300.0),
    14: (CHI_AIR, 0.0, 0.0),
    15: (0.0, 0.60, 30.0),
    16: (-0.5, 0.30, 120.0),
    17: (0.8, 0.50, 120.0),
    18: (0.0, 1.00, 2.0),
}
"""Per-label (chi ppm, M0, R2* s^-1 at 3 T); R2* scales linearly with B0 (except air)."""

_TEXTURED = (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)
_TEXTURE_STD = 0.004  # ppm, clipped at +-0.01
_TEXTURE_MAX = 0.01


@dataclass
class HeadPhantom:
    """A rasterised numerical head.

    Attributes
    ----------
    chi : (X, Y, Z) float32
        Susceptibility in ppm relative to water (CSF = 0): air +9.4, bone -2.
    labels : (X, Y, Z) int16
        Segmentation, see :data:`LABEL_NAMES`.
    brain_mask : (X, Y, Z) bool
        Intracranial brain including CSF, veins and lesions (:data:`BRAIN_LABELS`).
    head_mask : (X, Y, Z) bool
        Everything that is not air (label 14).
    m0 : (X, Y, Z) float32
        Proton density / steady-state magnitude (0 in air, 0.05 in bone).
    r2star : (X, Y, Z) float32
        1/s at the phantom's field strength ``b0``.
    voxel_size : 3 floats
        mm.
    affine : (4, 4) float
        NIfTI affine (RAS, mm); axial by default (B0 along array axis 2).
    lesions : list of dict
        ``kind``, ``label``, ``centre_mm`` (mm from the centre of the matrix along the array
        axes, i.e. world coordinates of the default axial affine), ``centre_voxel`` (array
        index), ``radius_mm``, ``chi_ppm``.
    b0 : float
        Field strength (T) the R2* map refers to.
    seed : int
        Seed of the anatomy.
    """

    chi: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    m0: np.ndarray
    r2star: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    lesions: list[dict] = field(default_factory=list)
    b0: float = 3.0
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.chi.shape)

    def label_volume_ml(self, label: int | tuple[int, ...]) -> float:
        """Volume (mL) of the voxels carrying ``label`` (or any of several labels)."""
        labs = (label,) if np.isscalar(label) else tuple(label)
        n = int(np.isin(self.labels, labs).sum())
        return n * float(np.prod(self.voxel_size)) / 1000.0


# ----------------------------------------------------------------------------- geometry helpers


class _RandomField:
    """Smooth, seeded random field on the head frame (mm), evaluated separably.

    ``f(x, y, z) = sum_abc C_abc phi_a(x) phi_b(y) phi_c(z)`` with ``phi`` the cosines and
    sines of period ``extent / m``; Gaussian coefficients weighted by an isotropic spectral
    envelope ``exp(-(|k| - k0)^2 / (2 sigma_k^2))``, normalised to unit root-mean-square.
    Grid-independent: the same seed gives the same values at any sampling.
    """

    def __init__(self, rng, *, k0: float, sigma_k: float, kmax: float, n_out: int = 1):
        extent = 320.0
        n_modes = int(np.ceil(kmax * extent)) + 1
        m = np.arange(n_modes)
        self.freq = np.concatenate([m, m[1:]]) / extent  # cycles/mm, cos then sin
        self.is_sin = np.concatenate([np.zeros(n_modes, bool), np.ones(n_modes - 1, bool)])
        kx, ky, kz = np.meshgrid(self.freq, self.freq, self.freq, indexing="ij")
        kabs = np.sqrt(kx**2 + ky**2 + kz**2)
        w = np.exp(-((kabs - k0) ** 2) / (2 * sigma_k**2))
        w[kabs > kmax] = 0.0
        c = rng.standard_normal((n_out, *kabs.shape)) * w
        # mean square of each basis function over a period: 1 for the constant, else 1/2
        ms = np.where(self.freq == 0, 1.0, 0.5)
        var = np.einsum("oabc,a,b,c->o", c**2, ms, ms, ms)
        self.coef = c / np.sqrt(np.maximum(var, 1e-30))[:, None, None, None]

    def _basis(self, x):
        arg = 2 * np.pi * np.asarray(x, float)[:, None] * self.freq[None, :]
        return np.where(self.is_sin[None, :], np.sin(arg), np.cos(arg))

    def __call__(self, x, y, z) -> np.ndarray:
        """Values on the 1-D coordinate grids x, y, z (mm), shape ``(n_out, X, Y, Z)``."""
        bx, by, bz = self._basis(x), self._basis(y), self._basis(z)
        t = np.tensordot(self.coef, bz, axes=([3], [1]))  # (o, a, b, Z)
        t = np.einsum("oabz,yb->oayz", t, by)  # (o, a, Y, Z)
        o, a, ny, nz = t.shape
        t = t.astype(np.float32).reshape(o, a, ny * nz)
        out = np.matmul(bx.astype(np.float32)[None], t)  # (o, X, Y*Z)
        return out.reshape(o, len(x), ny, nz)


class _Scaled:
    """A random field multiplied by a constant."""

    def __init__(self, field, factor):
        self.field, self.factor = field, np.float32(factor)

    def __call__(self, *axes):
        return self.field(*axes) * self.factor


def _ellipsoid_sd(x, y, z, centre, semi, rot=None):
    """Approximate signed distance (mm) to an ellipsoid: ``(q - 1) q / |grad q^2 / 2|``."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    if rot is not None:
        r = np.asarray(rot, dtype=np.float32)
        dx, dy, dz = (
            r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
        )
    a, b, c = semi
    q2 = (dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2
    g = np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2 + (dz / c**2) ** 2)
    q = np.sqrt(q2)
    return (q - 1.0) * q / np.maximum(g, 1e-6)


def _capsule_sd(x, y, z, p0, p1, radius):
    """Signed distance (mm) to a capsule (segment ``p0``-``p1`` inflated by ``radius``)."""
    p0 = np.asarray(p0, float)
    d = np.asarray(p1, float) - p0
    ll = float(d @ d)
    wx, wy, wz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / ll, 0.0, 1.0)
    ex, ey, ez = wx - t * d[0], wy - t * d[1], wz - t * d[2]
    return np.sqrt(ex**2 + ey**2 + ez**2) - radius


def _rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _rot_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1.0, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


class _Canvas:
    """Property volumes painted structure by structure with partial-volume blending."""

    def __init__(self, shape, voxel_size, coords, b0, scale, umax):
        self.shape = shape
        self.scale = np.asarray(scale, float)  # head frame = grid / scale + u(grid)
        self.umax = np.asarray(umax, float)  # max |u_i| over the grid
        self.vs = np.asarray(voxel_size, float)
        self.h = float(np.mean(self.vs))
        self.x, self.y, self.z = coords  # deformed head-frame coordinates, (X, Y, Z) float32
        self.axes = [
            (np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, self.vs, strict=True)
        ]
        self.b0 = b0
        chi, m0, r2 = TISSUE_PROPERTIES[14]
        self.chi = np.full(shape, chi, np.float32)
        self.m0 = np.full(shape, m0, np.float32)
        self.r2 = np.full(shape, r2, np.float32)
        self.labels = np.full(shape, 14, np.int16)

    def box(self, lo, hi, margin=0.0):
        """Index slices of the voxels whose head-frame position may fall in ``[lo, hi]``.

        ``lo``/``hi`` are grown by ``margin`` mm plus one voxel; the deformation
        ``r' = r / scale + u(r)`` is inverted with the bound ``|u_i| <= umax_i``.
        """
        sl = []
        for i, ax in enumerate(self.axes):
            a = (lo[i] - margin - self.h - self.umax[i]) * self.scale[i]
            b = (hi[i] + margin + self.h + self.umax[i]) * self.scale[i]
            i0 = int(np.searchsorted(ax, a, side="left"))
            i1 = int(np.searchsorted(ax, b, side="right"))
            sl.append(slice(i0, max(i0, i1)))
        return tuple(sl)

    def coords(self, sl=(slice(None),) * 3):
        return self.x[sl], self.y[sl], self.z[sl]

    def paint(self, d, label, sl=(slice(None),) * 3, props=None, hard=False):
        """Blend ``label``'s properties where the signed distance ``d`` (mm) is <= h / 2.

        ``hard``: no partial volume (fraction 0 or 1), for the intracranial boundary, so that
        brain-mask voxels hold intracranial values only.
        """
        if d.size == 0:
            return
        if hard:
            f = (d <= 0).astype(np.float32)
        else:
            f = np.clip(0.5 - d / self.h, 0.0, 1.0).astype(np.float32)
        if not f.any():
            return
        chi, m0, r2 = TISSUE_PROPERTIES[label] if props is None else props
        if label != 14:
            r2 = r2 * self.b0 / 3.0
        for arr, v in ((self.chi, chi), (self.m0, m0), (self.r2, r2)):
            sub = arr[sl]
            sub += f * (np.float32(v) - sub)
        lab = self.labels[sl]
        lab[f >= 0.5] = label


def _tube_segments(points):
    pts = np.asarray(points, float)
    return list(zip(pts[:-1], pts[1:], strict=True))


def _paint_tube(canvas, points, radius, label, margin, props=None, within=None):
    """Paint a tube of ``radius`` mm along a polyline (head-frame mm), segment by segment.

    ``within``: signed distance volume (mm) that clips the tube (painted only where < 0).
    """
    segs = _tube_segments(points)
    for p0, p1 in segs:
        lo, hi = np.minimum(p0, p1), np.maximum(p0, p1)
        sl = canvas.box(lo, hi, radius + margin)
        if any(s.stop <= s.start for s in sl):
            continue
        x, y, z = canvas.coords(sl)
        d = _capsule_sd(x, y, z, p0, p1, radius)
        if within is not None:
            d = np.maximum(d, within[sl] + 0.5 * canvas.h)
        canvas.paint(d, label, sl, props)


def _surface_point(centre, semi, azim_deg, elev_deg, scale=1.0):
    """Point on an ellipsoid surface at azimuth (from +x towards +y) and elevation (degrees)."""
    a, e = np.deg2rad(azim_deg), np.deg2rad(elev_deg)
    u = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    return np.asarray(centre, float) + scale * np.asarray(semi, float) * u


# ------------------------------------------------------------------------------------- phantom

_FOLD_CENTRE = (0.0, -10.0, 0.0)  # centre of the radial projection of the sulcal pattern
_FOLD_R0 = 70.0  # radius (mm) of the sphere that carries the pattern
_FOLD_STEP = 2.0  # mm, lattice of the pattern (fixed: the same at any voxel size)
_FOLD_BOX = ((-100.0, 100.0), (-115.0, 100.0), (-95.0, 105.0))  # head-frame extent, mm


def _sulcal_lattice(field, wiggle):
    """Signed distance estimate to the sulcal sheets on a fixed 2 mm lattice.

    The sheets are the zero set of ``m(r) = n(P(r + w(r)))``: ``n`` a smooth random field,
    ``P`` the radial projection onto a sphere of radius R0 about ``_FOLD_CENTRE`` (so the
    sheets run roughly perpendicular to the brain surface) and ``w`` a smooth displacement
    (bends the sheets). Returns the lattice axes and ``m / |grad m|`` (mm, first-order distance
    to the zero set), clipped to +-30 mm.
    """
    step, r0 = _FOLD_STEP, _FOLD_R0
    axes = [np.arange(lo, hi + step / 2, step) for lo, hi in _FOLD_BOX]
    w = wiggle(*axes)
    pts = np.meshgrid(*axes, indexing="ij", sparse=True)
    v = [pts[i] - _FOLD_CENTRE[i] + w[i] for i in range(3)]
    del w
    rv = np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2) + 1e-6
    ax = np.arange(-r0 - 8 * step, r0 + 8 * step + step / 2, step)
    n = field(ax, ax, ax)[0]
    idx = np.stack([(vi * (r0 / rv) - ax[0]) / step for vi in v])
    m = ndimage.map_coordinates(n, idx, order=1, mode="nearest").astype(np.float64)
    g = np.gradient(m, step)
    gn = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + 1e-9
    return axes, np.clip(m / gn, -30.0, 30.0).astype(np.float32)


def _sulcal_distance(lattice, x, y, z, where):
    """Distance (mm) to the sulcal sheets at the voxels ``where`` (linear interpolation)."""
    axes, q = lattice
    idx = np.stack(
        [
            (np.broadcast_to(c, where.shape)[where] - a[0]) / _FOLD_STEP
            for c, a in zip((x, y, z), axes, strict=True)
        ]
    )
    return np.abs(ndimage.map_coordinates(q, idx, order=1, mode="nearest"))


# Head-frame anatomy (mm). The cerebrum is an ellipsoid of 128 x 160 x 104 mm; with the CSF
# layer, ~6.5 mm of skull and ~5.5 mm of scalp the head is about 150 x 185 x 140 mm.
_CEREBRUM = ((0.0, -2.0, 10.0), (64.0, 80.0, 52.0))
_TEMPORAL = [((s * 42.0, 5.0, -20.0), (22.0, 34.0, 18.0)) for s in (-1, 1)]
_CEREBELLUM = ((0.0, -50.0, -32.0), (46.0, 28.0, 18.0))
_BRAINSTEM = ((0.0, -12.0, -2.0), (0.0, -30.0, -58.0), 11.0)
_SKULL_MM = 6.5
_SCALP_MM = 5.5
_WARP_MM = 4.0  # rms magnitude of the smooth random displacement
_MARGIN = 0.0  # structures' own margins; the deformation is inverted in _Canvas.box


def _nuclei(sign):
    """Deep grey nuclei of one hemisphere: (label, centre, semi-axes, rotation)."""
    s = float(sign)
    return [
        (1, (s * 13, 27, 1), (5.0, 11.0, 8.0), _rot_x(-20)),  # caudate head
        (1, (s * 15, 9, 11), (3.5, 12.0, 4.0), _rot_x(-15)),  # caudate body
        (3, (s * 25, 17, -6), (5.0, 15.0, 9.0), _rot_z(-s * 8)),  # putamen
        (2, (s * 19, 11, -9), (3.5, 8.0, 4.5), _rot_z(-s * 8)),  # globus pallidus
        (7, (s * 11, -4, -1), (7.0, 14.0, 8.0), _rot_z(s * 10)),  # thalamus
        (6, (s * 11, -4, -20), (3.5, 8.0, 3.0), _rot_z(s * 25) @ _rot_x(20)),  # SN
        (4, (s * 5, -6, -17), (3.2, 3.8, 3.5), None),  # red nucleus
        (5, (s * 15, -42, -42), (6.0, 8.0, 5.0), _rot_z(s * 20)),  # dentate
    ]


def _ventricles():
    out = []
    for s in (-1.0, 1.0):
        out.append(((s * 7, 6, 12), (4.5, 22.0, 6.0), _rot_x(-8)))  # body + frontal horn
        out.append(((s * 14, -24, 10), (4.0, 14.0, 5.5), _rot_z(s * 25)))  # atrium/occipital
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
    canvas = _Canvas(shape, vs, coords, b0, draws.scale, umax)
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
    warp: _RandomField  # smooth displacement field (3 components)
    sulci: _RandomField  # the field whose zero set are the sulcal sheets
    wiggle: _RandomField  # displacement that bends the sulcal sheets (3 components)
    thick: _RandomField  # CSF, grey-matter and sulcal-depth variations (3 components)
    veins: np.ndarray  # (6, 3) uniform draws of the cortical veins
    lesions: np.ndarray  # (2, 3) uniform draws of the lesions
    texture_seed: int  # seed of the tissue texture


def _draw(rng) -> _Draws:
    """Draw the anatomy's random numbers from ``rng``, in the one order that fixes the head."""
    scale = rng.uniform(0.95, 1.04, size=3)
    warp = _RandomField(rng, k0=0.0, sigma_k=1 / 90.0, kmax=1 / 50.0, n_out=3)
    sulci = _RandomField(rng, k0=1 / 22.0, sigma_k=1 / 150.0, kmax=1 / 16.0)
    wiggle = _RandomField(rng, k0=1 / 30.0, sigma_k=1 / 80.0, kmax=1 / 15.0, n_out=3)
    thick = _RandomField(rng, k0=0.0, sigma_k=1 / 40.0, kmax=1 / 25.0, n_out=3)
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
    d_cortex = _ellipsoid_sd(x, y, z, *_CEREBRUM)
    for c, s in _TEMPORAL:
        d_cortex = np.minimum(d_cortex, _ellipsoid_sd(x, y, z, c, s))
    d_cortex = np.minimum(d_cortex, _ellipsoid_sd(x, y, z, *_CEREBELLUM))
    d_stem = _capsule_sd(x, y, z, *_BRAINSTEM)
    t = thick(*axes)
    csf_mm = np.clip(2.0 + 0.8 * t[0], 1.0, 3.5)
    gm_mm = np.clip(2.9 + 0.5 * t[1], 2.0, 4.0)
    sulc_depth = np.clip(15.0 + 3.0 * t[2], 8.0, 22.0)
    del t
    d_icv = np.minimum(d_cortex, d_stem) - csf_mm
    return _Surfaces(d_cortex, d_stem, d_icv, gm_mm, sulc_depth)


def _paint_head(canvas: _Canvas, d_icv) -> None:
    """Scalp around the skull, face and neck below, the skull and the air cavities."""
    x, y, z = canvas.coords()
    d_face = _ellipsoid_sd(x, y, z, (0.0, 12.0, -58.0), (62.0, 84.0, 42.0))
    d_neck = np.maximum(
        _ellipsoid_sd(x, y, z * 0.0, (0.0, -12.0, 0.0), (50.0, 55.0, 1e3)), z + 40.0
    )
    d_head = np.minimum(np.minimum(d_icv - (_SKULL_MM + _SCALP_MM), d_face), d_neck)
    canvas.paint(d_head, 15)
    del d_face, d_neck
    canvas.paint(np.maximum(d_icv - _SKULL_MM, d_head + 1.5), 13)  # skull (inside the scalp)
    for c, s, r in _air_cavities():
        sl = canvas.box(np.subtract(c, max(s)), np.add(c, max(s)), _MARGIN)
        xs, ys, zs = canvas.coords(sl)
        d = np.maximum(_ellipsoid_sd(xs, ys, zs, c, s, r), 1.5 - d_icv[sl])  # >= 1.5 mm bone
        canvas.paint(d, 14, sl)


def _paint_brain(canvas: _Canvas, surfaces: _Surfaces, draws: _Draws) -> None:
    """CSF, the folded cortex, white matter, ventricles and deep grey nuclei."""
    canvas.paint(surfaces.icv, 10, hard=True)
    _paint_cortex(canvas, surfaces, draws)
    for c, s, r in _ventricles():
        sl = canvas.box(np.subtract(c, max(s)), np.add(c, max(s)), _MARGIN)
        canvas.paint(_ellipsoid_sd(*canvas.coords(sl), c, s, r), 18, sl)
    for sign in (-1, 1):
        for lab, c, s, r in _nuclei(sign):
            sl = canvas.box(np.subtract(c, max(s)), np.add(c, max(s)), _MARGIN)
            canvas.paint(_ellipsoid_sd(*canvas.coords(sl), c, s, r), lab, sl)


def _paint_cortex(canvas: _Canvas, surfaces: _Surfaces, draws: _Draws) -> None:
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
    lattice = _sulcal_lattice(draws.sulci, _Scaled(draws.wiggle, 3.0))
    dist[shell] = _sulcal_distance(lattice, x, y, z, shell)
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


def _paint_veins(canvas: _Canvas, d_icv, vein_draws) -> None:
    """Dural sinuses, internal cerebral veins and seeded cortical veins (inside the skull)."""
    cc, cs = _CEREBRUM
    th = np.deg2rad(np.linspace(25.0, 200.0, 36))
    sss = [(0.0, cc[1] + cs[1] * np.cos(a), cc[2] + cs[2] * np.sin(a)) for a in th]
    _paint_tube(canvas, sss, 3.0, 11, _MARGIN, within=d_icv)
    conf = np.asarray(sss[-1])
    for s in (-1.0, 1.0):
        trans = [
            conf,
            (s * 25.0, conf[1] + 4.0, conf[2] - 4.0),
            (s * 45.0, -62.0, -24.0),
            (s * 55.0, -40.0, -34.0),
        ]
        _paint_tube(canvas, trans, 2.8, 11, _MARGIN, within=d_icv)
    galen = (0.0, -22.0, 8.0)
    _paint_tube(
        canvas, [galen, (0.0, -48.0, 2.0), conf], 2.2, 11, _MARGIN, within=d_icv
    )  # straight sinus
    for s in (-1.0, 1.0):  # internal cerebral veins
        _paint_tube(
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
            _surface_point(cc, cs, azim + dazim * (e - elev0) / 78.0, e, scale=1.02) for e in elevs
        ]
        _paint_tube(canvas, pts, 1.3, 11, _MARGIN, within=d_icv)


def _paint_lesions(canvas: _Canvas, draws: _Draws) -> list[dict]:
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
        canvas.paint(_ellipsoid_sd(xs, ys, zs, c, (rad, rad, rad)), lab, sl)
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


def _textured(canvas: _Canvas, texture_seed: int):
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


# -------------------------------------------------------------------------------------- fields


def _harmonics(x, y, z, order: int) -> list:
    """Solid spherical harmonics (unnormalised) up to ``order`` at coordinates x, y, z."""
    terms = [np.ones_like(x + y + z)]
    if order >= 1:
        terms += [x + 0 * (y + z), y + 0 * (x + z), z + 0 * (x + y)]
    if order >= 2:
        terms += [x * y + 0 * z, x * z + 0 * y, y * z + 0 * x]
        terms += [x**2 - y**2 + 0 * z, 2 * z**2 - x**2 - y**2]
    return terms


def shim_basis(mask, voxel_size, order: int = 2, centre=None) -> np.ndarray:
    """Solid spherical-harmonic shim terms up to ``order`` (0, 1 or 2) at the voxels of ``mask``.

    Order 0: 1; order 1: x, y, z; order 2: xy, xz, yz, x^2 - y^2, 2z^2 - x^2 - y^2, with
    (x, y, z) in units of 100 mm from ``centre`` (voxel indices; default the mask centroid).
    The terms are harmonic, so shimming keeps a harmonic background harmonic, and the span of
    each order is rotation invariant, so the voxel frame serves as well as the scanner frame.

    Returns
    -------
    (n_voxels, n_terms) float64 array (1, 4 or 9 terms).
    """
    if order not in (0, 1, 2):
        raise ValueError(f"shim_order must be 0, 1 or 2, got {order!r}")
    m = np.asarray(mask, bool)
    vs = np.asarray(check_voxel_size(voxel_size))
    idx = np.stack(np.nonzero(m), axis=1).astype(float)
    c = idx.mean(axis=0) if centre is None else np.asarray(centre, float)
    pos = (idx - c) * vs / 100.0
    return np.stack(_harmonics(*pos.T, order), axis=1)


def simulate_fields(
    phantom: HeadPhantom,
    *,
    b0_dir=None,
    b0: float | None = None,
    shim_order: int = 2,
    neck_mm: float = 60.0,
    kernel: str = "auto",
) -> dict[str, np.ndarray]:
    """Ground-truth total, local and background fields of a head phantom.

    * local field: ``F^-1 D F{chi * M}`` with M the brain mask (sources inside the brain
      only), de-meaned over M and zero outside it;
    * total field: ``F^-1 D F{chi - chi_air}`` of the whole head (the exterior is air), with
      the neck continued ``neck_mm`` below the field of view (edge slices replicated) so that
      the cut through the neck does not act as an air interface; then shimmed: the
      least-squares fit of the solid harmonics up to ``shim_order`` (:func:`shim_basis`) over
      M is subtracted (order 0 = de-meaning only). Defined over the head mask, zero in air;
    * background field: ``total - local`` (harmonic inside the brain).

    The dipole convolution is :func:`qsmprep.sim.forward_field` on a 2N zero-padded grid.

    Parameters
    ----------
    phantom : HeadPhantom
    b0_dir : 3 floats, optional
        B0 direction in voxel coordinates; default from the phantom affine
        (:func:`qsmprep.recon.kernels.b0_dir_from_affine`).
    b0 : float, optional
        Field strength (T) for the conversion to Hz; default ``phantom.b0``.
    shim_order : int
        0, 1 or 2.
    neck_mm : float
        Continuation of the neck below the matrix for the total field (mm; 0 disables).
    kernel : {"auto", "continuous", "fd"}
        Dipole kernel of the forward model (:func:`qsmprep.sim.forward_field`). ``"auto"``
        uses the continuous kernel when B0 lies along an array axis and the finite-difference
        kernel otherwise, for the background sources only (the local field always uses the
        continuous kernel, the model the inversions invert): with an oblique B0 the continuous
        kernel's jump at the edge of k-space rings at the 9.4 ppm air/tissue edges and leaves
        a non-harmonic background in the brain (RESHARP on the true total field of a 2 mm head
        tilted 20 degrees: 132 % NRMSE with the continuous kernel, 35 % with the
        finite-difference one, 36 % axial).

    Returns
    -------
    dict of float32 arrays: ``total_ppm``, ``local_ppm``, ``background_ppm`` (ppm of B0),
    ``total_hz``, ``local_hz`` (Hz, ``ppm * GAMMA_BAR * b0 * 1e-6``).
    """
    b0 = phantom.b0 if b0 is None else float(b0)
    if not b0 > 0:
        raise ValueError(f"b0 must be positive (T), got {b0!r}")
    if b0_dir is None:
        b0_dir = b0_dir_from_affine(phantom.affine)
    b = check_b0_dir(b0_dir)
    vs = phantom.voxel_size
    brain = check_mask(phantom.brain_mask, "phantom.brain_mask", phantom.chi.shape)
    head = np.asarray(phantom.head_mask, bool)
    chi = np.asarray(phantom.chi, np.float64)

    if kernel == "auto":
        kernel = "continuous" if max(abs(c) for c in b) > 1 - 1e-6 else "fd"
    # local field: always the continuous kernel (the model every inversion inverts)
    local_raw = forward_field(chi * brain, vs, b)
    local = (local_raw - local_raw[brain].mean()) * brain

    # background: sources outside the brain (exterior air at 0, tissue at chi - 9.4, the brain
    # region at -9.4 so that it adds up to the whole head), with ``kernel``
    rel = chi - CHI_AIR - chi * brain
    n_neck = int(round(max(neck_mm, 0.0) / vs[2]))
    if n_neck:
        rel = np.pad(rel, ((0, 0), (0, 0), (n_neck, 0)), mode="edge")
    total = local_raw + forward_field(rel, vs, b, kernel=kernel)[:, :, n_neck:]
    del rel, local_raw
    centre = np.stack(np.nonzero(brain), axis=1).mean(axis=0)
    coef, *_ = np.linalg.lstsq(shim_basis(brain, vs, shim_order, centre), total[brain], rcond=None)
    grid = [
        ((np.arange(n) - c) * v / 100.0).reshape([-1 if i == k else 1 for k in range(3)])
        for i, (n, c, v) in enumerate(zip(brain.shape, centre, vs, strict=True))
    ]
    for cf, term in zip(coef, _harmonics(*grid, shim_order), strict=True):
        total -= cf * term
    total *= head
    background = (total - local) * head
    hz = GAMMA_BAR * b0 * 1e-6
    return {
        "total_ppm": total.astype(np.float32),
        "local_ppm": local.astype(np.float32),
        "background_ppm": background.astype(np.float32),
        "total_hz": (total * hz).astype(np.float32),
        "local_hz": (local * hz).astype(np.float32),
    }
