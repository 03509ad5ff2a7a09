"""Preconditioned total field inversion (TFI): susceptibility from the total field, no
background removal.

Background removal takes the part of the field that is harmonic inside the brain as the
background's, and part of it is the field of the brain's own sources near its surface: on
the development data LBV and PDF given the *true* total field recover the local field with a
slope of 0.77-0.94 (docs: "From multi-echo phase to local field"). TFI (Liu Z et al. 2017)
instead fits one susceptibility map to the total field, over the brain and a margin around
it, so the sources outside the brain explain the background and those inside the brain keep
their whole field.

Objective (field ``f`` and ``chi`` in ppm, ``chi = P y``)::

    min_y  ||w_G grad (P y)||_1 + lam ||w (D P y - f)||_2^2

* ``f``: the total field inside the brain mask (unwrapped, so the data term is linear in
  ``chi``: the total field spans many radians, where MEDI's nonlinear term would alias).
* ``w``: data weight ``1 / noise_std`` on the data voxels, normalised to a mean of 1 there
  (MEDI's ``dataterm_mask``), zero elsewhere: outside the brain and where the field is
  unreliable.
* ``w_G``: MEDI's binary edge mask of the magnitude (:func:`~qsmprep.recon.inversion.medi.
  gradient_mask`) on the differences with both ends in the brain mask, and 1 on brain voxels
  without data (their chi comes from the regulariser); 0 on every difference that leaves the
  brain. The sources outside the brain (the margin of the grid) are not regularised: their
  only job is to explain the background field, and total variation there ties them to the
  brain's edge (measured on qsmdev sub-01 with ``lam = 1000 c``: 147 % NRMSE with TV
  outside against 56 % without).
* ``P``: the preconditioner of TFI, 1 in the brain mask and ``p_b`` outside. It makes the
  background sources cheap for conjugate gradients, which, stopped early, leaves the field
  they can explain to them (``p_b = 30``, the paper's value; on qsmdev sub-01 with ``lam =
  1000 c`` 10 and 100 did worse, 67 and 60 % against 56 % NRMSE; on our noisy 2 mm head 10
  did as well, 44.8 against 45.6 %, and 100 worse, 58.1 %).
* ``D``: the unit dipole kernel on the grid: the mask's bounding box zero-padded by ``pad``
  (default 12 mm per axis), so background sources fit around the brain.

Solver: Gauss-Newton with lagged diffusivity for the L1 term (IRLS, ``V = 1 / sqrt(|w_G grad
x|^2 + e)``, as :func:`~qsmprep.recon.inversion.medi.medi`), each step solved by conjugate
gradients in ``y``::

    P (grad^T w_G V w_G grad + 2 lam D^T w^2 D) P dy = -P (grad^T w_G V w_G grad x
                                                           + 2 lam D^T w^2 (D x - f))

with ``x = P y`` in radians over ``delta_te`` (as MEDI, so the IRLS smoothing ``e`` and the
toolbox's ``lambda`` carry over). It stops when ``||dy|| / ||y|| <= tol`` or after
``max_iter`` steps. Cost per CG iteration: 4 real FFTs of the grid, as MEDI.

lam. ``"noise"`` (the default with a noise map): ``NOISE_LAMBDA / sigma``, ``sigma`` the
median noise std of the field in ppm over the data voxels, at most the toolbox's ``1000 c``
(:data:`~qsmprep.recon.inversion.medi.NOISE_LAMBDA`, the rule of MEDI's ``lam="noise"``).
On qsmdev sub-01 it gives ``lam_rad = 268``: of ``lam_rad`` 2000, 1000 and 500 (data on the
LBV mask) 500 was best (59.0, 56.2, 53.3 % NRMSE), and of 250, 125 and 60 (data on the
reliable brain) 250 (51.5, 53.6, 59.2 %).

What it costs. The free sources outside the brain also absorb part of the brain's own field
near its surface: on the noisy true *local* field of our 2 mm head TFI scores 47.7 % against
MEDI's 32.6 %, and 45.6 % from the total field (RESHARP then MEDI: 77.4 %). A shell around
the brain kept free of sources (chi fixed at 0 there) lowered that (45.8, 40.8 and 36.6 % on
that local field for 2, 4 and 6 mm) and helped qsmdev a little (1.5 mm: sub-01 49.6 % against 50.4,
sub-02 51.1 % against 52.0; 3 mm: 51.3 and 53.8 %) but broke the total field of our head, where
tissue of -0.5 ppm and air border the brain (203 % at 2 mm), so it is not offered.

Reference
---------
- Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI)
  method for quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315.
"""

from __future__ import annotations

import math

import numpy as np

from qsmprep.recon._backend import asarray, irfftn, namespace, rfftn
from qsmprep.recon.grid import Grid, pad_voxels
from qsmprep.recon.inversion.medi import (
    _SLICES,
    DEFAULT_DELTA_TE,
    IRLS_EPSILON_RAD,
    LAMBDA_RAD,
    _check_inputs,
    _check_iterations,
    _check_positive,
    _data_weight,
    _irls_weights,
    _noise_lambda,
    _parse_lam,
    _SlabWork,
    _weighted_laplacian,
    gradient_mask,
    rad_per_ppm,
)
from qsmprep.recon.kernels import dipole_kernel
from qsmprep.recon.operators import cg

__all__ = ["DEFAULT_P_B", "DEFAULT_PAD_MM", "source_fields", "tfi"]

DEFAULT_P_B = 30.0
"""TFI's preconditioner outside the brain mask (Liu Z et al. 2017)."""

DEFAULT_PAD_MM = 12.0
"""Margin of background sources around the mask's bounding box (mm per axis)."""


def _on_grid(grid: Grid, x: np.ndarray) -> np.ndarray:
    """A full-size NumPy volume cropped to the box and zero-padded to the grid (NumPy)."""
    out = np.zeros(grid.grid, dtype=x.dtype)
    n = grid.n
    out[: n[0], : n[1], : n[2]] = x[grid.box]
    return out


def _solve(
    total_field,
    mask,
    voxel_size,
    *,
    magnitude,
    b0_dir=(0.0, 0.0, 1.0),
    noise_std=None,
    data_mask=None,
    lam: float | str | None = None,
    delta_te: float = DEFAULT_DELTA_TE,
    b0: float = 3.0,
    percentage: float = 0.9,
    p_b: float = DEFAULT_P_B,
    pad=None,
    max_iter: int = 10,
    tol: float = 0.1,
    cg_tol: float = 0.01,
    cg_max_iter: int = 100,
    device: str | None = "cpu",
    info: dict | None = None,
    background: bool = False,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The solver of :func:`tfi`; with ``background``, also the fields of its sources.

    Returns ``(chi, None)``, or with ``background`` ``(chi, (outside, inside))``: the field,
    in the mask (ppm, 0 outside it), of the sources outside the mask (the background) and of
    those inside it (the model of the local field).
    """
    f, m, vs, b = _check_inputs(
        "TFI", "total_field", total_field, mask, voxel_size, b0_dir,
        magnitude=magnitude, noise_std=noise_std, data_mask=data_mask,
    )  # fmt: skip
    c = rad_per_ppm(delta_te, b0)
    if lam is None:
        lam = "noise" if noise_std is not None else LAMBDA_RAD * c
    lam_ppm = _parse_lam(lam, noise_std, c)
    p_b = _check_positive(p_b, "p_b")
    max_iter, tol, cg_max_iter, cg_tol = _check_iterations(max_iter, tol, cg_max_iter, cg_tol)
    pads = pad_voxels(pad, vs, DEFAULT_PAD_MM)

    w_data = _data_weight(noise_std, m, data_mask)
    sigma = None
    if lam_ppm is None:
        lam_ppm, sigma = _noise_lambda(noise_std, w_data, c)
    lam_rad = lam_ppm / c
    w_grad = gradient_mask(magnitude, m, vs, percentage)
    w_grad |= (w_data == 0)[None] & m[None]

    # ---- grid: the box of the mask plus a margin of background sources
    grid = Grid.around(m, pads, device)
    shape = grid.grid
    inside = _on_grid(grid, m)
    wg = []
    for axis in range(3):
        hi, lo = _SLICES[axis]
        both = inside[hi] & inside[lo]  # TV on the brain's differences only
        wg.append(
            asarray(_on_grid(grid, w_grad[axis])[lo] & both, device=device, dtype=np.float32)
        )
    del w_grad
    precond = asarray(np.where(inside, 1.0, p_b), device=device, dtype=np.float32)
    f_rad = grid.embed(np.where(m, f, 0.0).astype(np.float64) * c)
    xp = namespace(f_rad)
    w2 = grid.embed(w_data.astype(np.float64) ** 2)
    dk = dipole_kernel(shape, vs, b, device=device)
    dk2 = dk * (2.0 * lam_rad)

    def conv(x, k):
        xk = rfftn(x)
        xk *= k
        return irfftn(xk, s=shape)

    work = _SlabWork(shape, f_rad.dtype) if isinstance(f_rad, np.ndarray) else None
    y = xp.zeros_like(f_rad)
    hist = {"rel": [], "cg_it": []}
    ratio = math.inf
    it = 0
    while it < max_iter and ratio > tol:
        x = precond * y
        weights, _ = _irls_weights(x, wg, vs, IRLS_EPSILON_RAD, xp)
        r = conv(x, dk) - f_rad
        r *= w2
        grad_y = _weighted_laplacian(x, weights, xp, work) + conv(r, dk2)
        grad_y *= precond
        del r, x

        def apply_a(p, weights=weights):
            q = precond * p
            out = _weighted_laplacian(q, weights, xp, work)
            q = conv(q, dk)
            q *= w2
            out += conv(q, dk2)
            out *= precond
            return out

        dy, cg_info = cg(apply_a, -grad_y, tol=cg_tol, max_iter=cg_max_iter)
        del grad_y
        ynorm = float(xp.sum(y * y)) ** 0.5
        ratio = float(xp.sum(dy * dy)) ** 0.5 / ynorm if ynorm > 0 else math.inf
        y = y + dy
        it += 1
        hist["rel"].append(ratio)
        hist["cg_it"].append(int(cg_info["iterations"]))

    x = precond * y
    chi = grid.extract(x * (1.0 / c)) * m
    fields = None
    if background:  # the fields of the sources outside and inside the mask, in the mask (ppm)
        inner = asarray(inside, device=device, dtype=np.float32)
        own = grid.extract(conv(x * inner, dk) * (1.0 / c)) * m
        x *= 1.0 - inner
        fields = grid.extract(conv(x, dk) * (1.0 / c)) * m, own
    if info is not None:
        info.update(
            iterations=it,
            converged=bool(ratio <= tol),
            rel_change_history=hist["rel"],
            cg_iterations=hist["cg_it"],
            lam=lam_ppm,
            lam_rad=lam_rad,
            lam_noise_ppm=sigma,
            p_b=p_b,
            pad=pads,
            grid=tuple(shape),
        )
    return chi.astype(np.float32), fields


def tfi(
    total_field,
    mask,
    voxel_size,
    *,
    magnitude,
    b0_dir=(0.0, 0.0, 1.0),
    noise_std=None,
    data_mask=None,
    lam: float | str | None = None,
    delta_te: float = DEFAULT_DELTA_TE,
    b0: float = 3.0,
    percentage: float = 0.9,
    p_b: float = DEFAULT_P_B,
    pad=None,
    max_iter: int = 10,
    tol: float = 0.1,
    cg_tol: float = 0.01,
    cg_max_iter: int = 100,
    device: str | None = "cpu",
    info: dict | None = None,
) -> np.ndarray:
    """Preconditioned total field inversion (L1, MEDI's edge mask; module docstring).

    Parameters
    ----------
    total_field : (X, Y, Z) array
        Total field in ppm (unwrapped, before background removal); finite inside the mask.
    mask : (X, Y, Z) array
        Brain mask (nonzero inside): the map covers it.
    voxel_size : float or 3 floats
        mm.
    magnitude : (X, Y, Z) array
        Magnitude image for the edge mask (e.g. the root sum of squares over echoes).
    b0_dir : 3 floats
        B0 direction in voxel coordinates (default the third axis).
    noise_std : (X, Y, Z) array, optional
        Noise std of the field in ppm, positive on the data voxels: the data weight, and the
        level of ``lam="noise"``. Default: uniform weight.
    data_mask : (X, Y, Z) array, optional
        Where the field is reliable (e.g. the brain less voxels whose phase does not evolve
        linearly over the echoes); zero data weight elsewhere in ``mask``. Default: ``mask``.
    lam : float or "noise", optional
        Data-term weight for ppm fields, as MEDI's. Default: ``"noise"`` with a noise map,
        else ``1000 c`` (the toolbox's ``lambda = 1000``).
    delta_te : float
        Echo spacing in s: sets ``c`` (radians per ppm), the unit of the solver and of the
        default ``lam`` (default 5 ms).
    b0 : float
        Field strength in T (default 3).
    percentage : float
        Edge fraction of the gradient mask (default 0.9, MEDI's).
    p_b : float
        Preconditioner outside the mask (default 30).
    pad : int or 3 ints, optional
        Margin of background sources in voxels per axis (default 12 mm rounded up).
    max_iter, tol : int, float
        Gauss-Newton iteration limit (default 10) and stop at ``||dy|| / ||y|| <= tol``
        (default 0.1).
    cg_tol, cg_max_iter : float, int
        Inner CG relative residual (default 0.01) and iteration limit (default 100).
    device : str
        ``"cpu"`` (NumPy), ``"torch"`` or ``"cuda"``.
    info : dict, optional
        Filled with ``iterations``, ``converged``, ``rel_change_history``,
        ``cg_iterations``, ``lam``, ``lam_rad``, ``lam_noise_ppm`` (``sigma`` of
        ``lam="noise"``, else None), ``p_b``, ``pad`` and ``grid``.

    Returns
    -------
    chi : (X, Y, Z) float32 NumPy array, ppm, 0 outside the mask.

    Reference: Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field
    inversion (TFI) method for quantitative susceptibility mapping. Magn Reson Med
    2017;78:303-315.
    """
    return _solve(**locals())[0]


def source_fields(total_field, mask, voxel_size, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The two parts of the field that TFI fits, in ``mask`` (ppm; 0 outside the mask):
    ``(background, own)``, the field of the sources it places outside ``mask`` and that of
    those inside it. ``total_field - background`` is the field of the sources inside the mask,
    with the part that is harmonic there (which a background removal takes away) kept;
    ``own`` is TFI's model of it, defined where the total field is not (outside
    ``data_mask``). Arguments as :func:`tfi`."""
    return _solve(total_field, mask, voxel_size, background=True, **kwargs)[1]
