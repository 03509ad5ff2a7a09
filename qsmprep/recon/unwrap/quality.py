"""Quality-guided (exact) spatial unwrapping: region growing and the maximum spanning tree.

The output is the input plus integer multiples of 2 pi (scikit-image's 3D Abdul-Rahman
algorithm, or a ROMEO-type maximum spanning tree that also uses the magnitude).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qsmprep.recon._backend import to_numpy
from qsmprep.recon._checks import (
    check_echo_times,
    check_finite,
    check_same_shape,
    check_volume,
    check_voxel_size,
)
from qsmprep.recon.mask import edge_weights
from qsmprep.recon.unwrap.phase import TWO_PI, as_mask, global_2pi, wrap_phase

__all__ = ["unwrap_quality_guided"]


def _group_reduce(keys: np.ndarray, values: np.ndarray, how: str):
    """Per-key minimum or (lower) median of ``values``; returns (unique keys, results)."""
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order]
    uniq, start, count = np.unique(k, return_index=True, return_counts=True)
    if how == "min":
        return uniq, v[start]
    return uniq, v[start + (count - 1) // 2]


def _fix_islands(u: np.ndarray, labels: np.ndarray, n: int, vs=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Align the 2 pi offsets of disconnected mask islands to the largest one.

    ``labels`` are the 6-connected components of the mask (``n`` of them). Each island is
    shifted by ``2 pi k``, ``k`` the median of ``round((u_island - u_nearest) / 2 pi)`` over
    its voxels closest to the largest component (within ``d_min + 2`` voxel sizes), with
    ``u_nearest`` the value of the nearest voxel of the largest component. Assumes the phase
    changes by less than pi across each gap.
    """
    if n <= 1:
        return u
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    main = int(np.argmax(sizes))
    dist, idx = ndi.distance_transform_edt(labels != main, sampling=vs, return_indices=True)
    others = (labels > 0) & (labels != main)
    lab_o = labels[others]
    dist_o = dist[others]
    ids, dmin = _group_reduce(lab_o, dist_o, "min")
    near_tab = np.zeros(n + 1)
    near_tab[ids] = dmin + 2.0 * max(vs)
    sel = dist_o <= near_tab[lab_o]
    pos = tuple(np.nonzero(others))
    pos = tuple(c[sel] for c in pos)
    nearest = u[tuple(i[pos] for i in idx)]
    kv = np.round((u[pos] - nearest) / TWO_PI)
    ids, kmed = _group_reduce(lab_o[sel], kv, "median")
    k_isl = np.zeros(n + 1)
    k_isl[ids] = kmed
    return u - TWO_PI * k_isl[labels]


def _unwrap_mst(
    phase: np.ndarray,
    labels: np.ndarray,
    magnitude=None,
    phase2=None,
    te_ratio=None,
) -> np.ndarray:
    """ROMEO-type unwrapping along the maximum-quality spanning tree of the mask graph.

    Edges between face neighbours carry the ROMEO weight of
    :func:`~qsmprep.recon.mask.edge_weights`; the spanning tree maximising the total weight
    (equal to ROMEO's region growing, which is Prim's algorithm on the same weights, up to
    ties) is found with ``scipy.sparse.csgraph``.
    Each tree component is rooted at its highest-quality voxel and unwrapped by summing
    wrapped differences along the tree (pointer jumping, vectorised).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

    shape = phase.shape
    mask = labels > 0
    n_vox = int(mask.sum())
    index = np.full(shape, -1, dtype=np.int64)
    index[mask] = np.arange(n_vox)
    ws = edge_weights(phase, magnitude, phase2, te_ratio, mask)
    rows, cols, cost = [], [], []
    qual = np.zeros(n_vox)
    for ax, w in enumerate(ws):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[ax] = slice(1, None)
        lo[ax] = slice(None, -1)
        ok = mask[tuple(hi)] & mask[tuple(lo)]
        a = index[tuple(lo)][ok]
        b = index[tuple(hi)][ok]
        we = w[ok].astype(np.float64)
        rows.append(a)
        cols.append(b)
        # strictly positive cost: csgraph drops explicit zeros
        cost.append(1.001 - we)
        qual += np.bincount(a, we, minlength=n_vox) + np.bincount(b, we, minlength=n_vox)
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    cost = np.concatenate(cost)
    g = coo_matrix((cost, (rows, cols)), shape=(n_vox, n_vox)).tocsr()
    tree = minimum_spanning_tree(g).tocoo()

    # one seed per component (its best voxel), all hung on a virtual root node
    if labels.max() == 1:
        seeds = np.array([int(np.argmax(qual))])
    else:
        # each component's best voxel (the first of equals), in component order: O(n), where
        # a sort of all voxels by (component, quality) took 0.8 s at 1 mm
        comp = labels[mask]
        best = np.full(int(labels.max()) + 1, -np.inf)
        np.maximum.at(best, comp, qual)
        cand = np.flatnonzero(qual == best[comp])
        first = np.full(best.size, n_vox, dtype=np.int64)
        np.minimum.at(first, comp[cand], cand)
        seeds = first[first < n_vox]
    root = n_vox
    r2 = np.concatenate([tree.row, np.full(seeds.size, root)])
    c2 = np.concatenate([tree.col, seeds])
    full = coo_matrix((np.ones(r2.size), (r2, c2)), shape=(n_vox + 1, n_vox + 1)).tocsr()
    _, pred = breadth_first_order(full, root, directed=False, return_predecessors=True)

    ph = np.zeros(n_vox + 1)
    ph[:n_vox] = phase[mask]
    parent = pred.astype(np.int64)
    parent[root] = root
    val = wrap_phase(ph - ph[parent])
    val[seeds] = ph[seeds]
    val[root] = 0.0
    # pointer jumping: val[i] = sum of the increments from i up to (excluding) parent[i]
    while not np.all(parent == root):
        val = val + val[parent]
        parent = parent[parent]
    out = np.zeros(shape)
    out[mask] = val[:n_vox]
    return out


def unwrap_quality_guided(
    phase,
    *,
    mask=None,
    magnitude=None,
    seed: int | None = None,
    method: str = "auto",
    phase2=None,
    echo_times=None,
    voxel_size=None,
) -> np.ndarray:
    """Exact quality-guided spatial unwrapping: output = input + 2 pi k, k integer per voxel.

    Two reliability-sorted path-following algorithms:

    ``method="skimage"``: :func:`skimage.restoration.unwrap_phase`, the 3D algorithm of
    Abdul-Rahman et al. 2007 (edges sorted by the reliability ``1/D`` of second differences,
    grouped by union-find; C code). Masked voxels are passed as a masked array. It does not
    use the magnitude.

    ``method="romeo"``: the ROMEO scheme: edge weights = phase coherence x magnitude
    coherence (x phase-gradient coherence with ``phase2``), see
    :func:`~qsmprep.recon.mask.phase_quality`; unwrapping along the maximum-weight spanning
    tree grown from the best voxel, ``phi_j <- phi_i + wrap(phi_j - phi_i)``.

    ``method="auto"`` (default): ``"romeo"`` when ``magnitude`` is given, else ``"skimage"``.

    After unwrapping, disconnected mask islands (6-connectivity) get their 2 pi offset
    aligned with the largest component through their nearest voxels (assumes a phase change
    below pi across each gap), and the global offset is set so that the median of
    ``round(u / 2 pi)`` over the mask is 0 (ROMEO ``correctglobal``).
    On noiseless phase whose neighbour differences are all below pi, both methods return the
    true phase up to this global 2 pi k.

    Parameters
    ----------
    phase : (X, Y, Z) array
        Wrapped phase (rad), any range (it is wrapped to ``[-pi, pi)`` first).
    mask : (X, Y, Z) bool array, optional
        Voxels to unwrap (default all); output is 0 outside.
    magnitude : (X, Y, Z) array, optional
        Magnitude for the ROMEO magnitude coherence.
    seed : int, optional
        Random seed of scikit-image's tie breaking (``rng``).
    method : {"auto", "skimage", "romeo"}
    phase2 : (X, Y, Z) array, optional
        Wrapped phase of a second echo for the ROMEO phase-gradient coherence.
    echo_times : 2 floats, optional
        (TE of ``phase``, TE of ``phase2``) in s; required with ``phase2``.
    voxel_size : float or 3 floats, optional
        mm, used for island distances only (default 1 mm).

    Returns
    -------
    (X, Y, Z) float64 NumPy array, unwrapped phase (rad), congruent with the input.

    References
    ----------
    Abdul-Rahman HS, Gdeisat MA, Burton DR, Lalor MJ, Lilley F, Moore CJ. Fast and robust
    three-dimensional best path phase unwrapping algorithm. Appl Opt 2007;46:6623-6635.
    Dymerska B, Eckstein K, Bachrata B, Siow B, Trattnig S, Shmueli K, Robinson SD. Phase
    unwrapping with a rapid opensource minimum spanning tree algorithm (ROMEO). Magn Reson
    Med 2021;85:2294-2308.
    """
    check_volume(phase, "phase")
    shape = tuple(phase.shape)
    m = as_mask(mask, shape)
    check_finite(phase, "phase", where=m)
    vs = check_voxel_size(1.0 if voxel_size is None else voxel_size)
    if method == "auto":
        method = "romeo" if magnitude is not None else "skimage"
    if method not in ("skimage", "romeo"):
        raise ValueError(f"method must be 'auto', 'skimage' or 'romeo', got {method!r}")
    if method == "skimage" and (magnitude is not None or phase2 is not None):
        raise ValueError("method='skimage' uses neither magnitude nor phase2; use method='romeo'")
    if magnitude is not None:
        check_volume(magnitude, "magnitude")
        check_same_shape("phase", phase, magnitude=magnitude)
        check_finite(magnitude, "magnitude", where=m)
    ratio = None
    if phase2 is not None:
        check_volume(phase2, "phase2")
        check_same_shape("phase", phase, phase2=phase2)
        check_finite(phase2, "phase2", where=m)
        if echo_times is None:
            raise ValueError("phase2 needs echo_times=(TE1, TE2) in s")
        te = check_echo_times(echo_times, 2)
        ratio = te[0] / te[1]

    # work on the bounding box of the mask
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in np.nonzero(m))
    mb = m[box]
    p = wrap_phase(np.where(mb, np.asarray(to_numpy(phase)[box], dtype=np.float64), 0.0))
    labels, n_lab = ndi.label(mb)

    if method == "skimage":
        from skimage.restoration import unwrap_phase

        img = np.ma.array(p, mask=~mb) if not mb.all() else p
        u = np.asarray(np.ma.getdata(unwrap_phase(img, rng=seed)), dtype=np.float64)
    else:
        mag = None
        if magnitude is not None:
            mag = np.asarray(to_numpy(magnitude)[box], dtype=np.float64)
        p2 = None
        if phase2 is not None:
            p2 = wrap_phase(np.asarray(to_numpy(phase2)[box], dtype=np.float64))
        u = _unwrap_mst(p, labels, mag, p2, ratio)

    # exact congruence (removes round-off of the path sums), islands, global offset
    u = np.where(mb, p + TWO_PI * np.round((u - p) / TWO_PI), 0.0)
    u = _fix_islands(u, labels, n_lab, vs)
    u = global_2pi(u, mb)
    out = np.zeros(shape)
    out[box] = np.where(mb, u, 0.0)
    return out
