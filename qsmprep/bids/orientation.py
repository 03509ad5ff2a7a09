"""Head orientations of one subject for COSMOS: which acquisitions go together.

The B0 direction of an acquisition is ``R^T [0, 0, 1]`` with ``R`` the rotation part of its
affine (world z is B0; :func:`qsmprep.recon.kernels.b0_dir_from_affine`). Several
orientations of one head are combined (:func:`group_orientations`) when they share one voxel
grid in the head frame -- the same array index addresses the same tissue in every
orientation -- and each image's affine carries its own scanner-frame rotation: ``A_n = T_n A``
with ``A`` the common grid's affine and ``T_n`` the rigid head-to-scanner transform of
orientation ``n``. This is how the development data (``qsmdev-multi``) are stored, and how
registered data should be written: after resampling orientation ``n`` onto the reference grid,
store it with the affine ``R_n A_ref`` where ``R_n`` is the registration rotation, not with
``A_ref`` (which would hide its B0 direction). qsmprep cannot tell from headers alone whether
the voxel arrays are aligned; it checks equal shapes and voxel sizes and that the affines differ
by a rigid transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmprep.bids.acquisition import Acquisition

__all__ = ["COSMOS_MIN_ANGLE_DEG", "group_orientations"]

COSMOS_MIN_ANGLE_DEG = 5.0
"""Smallest angle between two B0 directions for them to count as different orientations."""

# Grid comparison tolerances: voxel sizes (relative), orthogonality of the rotation between
# two affines.
_ZOOM_RTOL = 1e-3
_ROT_ATOL = 1e-3


def _same_grid(a: Acquisition, b: Acquisition) -> bool:
    """Same shape and voxel size, and affines related by a rigid transform (A_b = T A_a)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    if not np.allclose(a.voxel_size, b.voxel_size, rtol=_ZOOM_RTOL, atol=0):
        return False
    la, lb = np.asarray(a.affine)[:3, :3], np.asarray(b.affine)[:3, :3]
    r = lb @ np.linalg.inv(la)
    return bool(np.allclose(r @ r.T, np.eye(3), atol=_ROT_ATOL) and np.linalg.det(r) > 0)


def _angle_deg(u, v) -> float:
    """Angle between two B0 directions (sign-free: b and -b give the same dipole kernel)."""
    c = abs(float(np.dot(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(c, 0.0, 1.0))))


def group_orientations(
    acquisitions: Sequence[Acquisition], min_angle_deg: float = COSMOS_MIN_ANGLE_DEG
) -> dict[tuple[str, str | None], list[Acquisition]]:
    """COSMOS candidates: acquisitions of one subject/session on one grid at several orientations.

    Within each (subject, session), acquisitions are clustered by grid (equal shape and voxel
    size, affines related by a rigid transform; see the module doc for how orientations must
    be stored). A cluster qualifies when it holds at least two B0 directions more than
    ``min_angle_deg`` apart (angle between directions up to sign); all its acquisitions are
    returned (a repeated orientation adds data). When several clusters of one
    (subject, session) qualify, the largest one is kept (the first one on ties).

    Returns
    -------
    dict
        ``{(subject, session): [Acquisition, ...]}`` (session None when absent), acquisitions in
        input order; only qualifying subjects/sessions appear.
    """
    by_key: dict[tuple, list[list[Acquisition]]] = {}
    for acq in acquisitions:
        clusters = by_key.setdefault((acq.subject, acq.session), [])
        for c in clusters:
            if _same_grid(c[0], acq):
                c.append(acq)
                break
        else:
            clusters.append([acq])
    out = {}
    for key, clusters in by_key.items():
        good = [
            c
            for c in clusters
            if len(c) >= 2
            and any(
                _angle_deg(x.b0_dir, y.b0_dir) > min_angle_deg
                for i, x in enumerate(c)
                for y in c[i + 1 :]
            )
        ]
        if good:
            out[key] = max(good, key=len)
    return out


# --------------------------------------------------------------------------------------------
# derivatives
