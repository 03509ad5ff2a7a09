"""Drawing primitives of the numerical head (:mod:`qsmprep.sim.phantom`).

Smooth seeded random fields on the head frame (mm), approximate signed distances (mm, negative
inside) to ellipsoids and capsules, rotations, the :class:`Canvas` on which structures are
painted with partial-volume blending, tubes along polylines (veins), points on ellipsoid
surfaces, and the sulcal sheets of the folded cortex (a signed distance on a fixed 2 mm
lattice, the same at any voxel size).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmprep.sim.tissues import TISSUE_PROPERTIES

__all__ = [
    "Canvas",
    "RandomField",
    "Scaled",
    "capsule_sd",
    "ellipsoid_sd",
    "paint_tube",
    "rot_x",
    "rot_z",
    "sulcal_distance",
    "sulcal_lattice",
    "surface_point",
]


class RandomField:
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


class Scaled:
    """A random field multiplied by a constant."""

    def __init__(self, field, factor):
        self.field, self.factor = field, np.float32(factor)

    def __call__(self, *axes):
        return self.field(*axes) * self.factor


def ellipsoid_sd(x, y, z, centre, semi, rot=None):
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


def capsule_sd(x, y, z, p0, p1, radius):
    """Signed distance (mm) to a capsule (segment ``p0``-``p1`` inflated by ``radius``)."""
    p0 = np.asarray(p0, float)
    d = np.asarray(p1, float) - p0
    ll = float(d @ d)
    wx, wy, wz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / ll, 0.0, 1.0)
    ex, ey, ez = wx - t * d[0], wy - t * d[1], wz - t * d[2]
    return np.sqrt(ex**2 + ey**2 + ez**2) - radius


def rot_z(deg):
    """Rotation matrix about z (from +x towards +y) by ``deg`` degrees."""
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def rot_x(deg):
    """Rotation matrix about x (from +y towards +z) by ``deg`` degrees."""
    t = np.deg2rad(deg)
    return np.array([[1.0, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


class Canvas:
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


def paint_tube(canvas, points, radius, label, margin, props=None, within=None):
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
        d = capsule_sd(x, y, z, p0, p1, radius)
        if within is not None:
            d = np.maximum(d, within[sl] + 0.5 * canvas.h)
        canvas.paint(d, label, sl, props)


def surface_point(centre, semi, azim_deg, elev_deg, scale=1.0):
    """Point on an ellipsoid surface at azimuth (from +x towards +y) and elevation (degrees)."""
    a, e = np.deg2rad(azim_deg), np.deg2rad(elev_deg)
    u = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    return np.asarray(centre, float) + scale * np.asarray(semi, float) * u


# ---------------------------------------------------------------------------- sulcal sheets

_FOLD_CENTRE = (0.0, -10.0, 0.0)  # centre of the radial projection of the sulcal pattern
_FOLD_R0 = 70.0  # radius (mm) of the sphere that carries the pattern
_FOLD_STEP = 2.0  # mm, lattice of the pattern (fixed: the same at any voxel size)
_FOLD_BOX = ((-100.0, 100.0), (-115.0, 100.0), (-95.0, 105.0))  # head-frame extent, mm


def sulcal_lattice(field, wiggle):
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


def sulcal_distance(lattice, x, y, z, where):
    """Distance (mm) to the sulcal sheets at the voxels ``where`` (linear interpolation)."""
    axes, q = lattice
    idx = np.stack(
        [
            (np.broadcast_to(c, where.shape)[where] - a[0]) / _FOLD_STEP
            for c, a in zip((x, y, z), axes, strict=True)
        ]
    )
    return np.abs(ndimage.map_coordinates(q, idx, order=1, mode="nearest"))
