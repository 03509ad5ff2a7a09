"""Synthetic training data for the deep-learning inversions, generated on the fly.

Two generators, mixed per sample (``kind="mix"``):

``"shapes"`` (DeepQSM-style; Bollmann S et al. DeepQSM - using deep learning to solve the
    dipole inversion for quantitative susceptibility mapping. NeuroImage 2019;195:373-383)
    random spheres/ellipsoids, cuboids and cylinders/lines with random susceptibility
    (uniform in +-``chi_range`` ppm, a fraction ``large_chi_prob`` up to +-``large_chi``) over a
    smooth random background, inside a random smooth blob mask (or the whole patch).
``"brain"``
    patches cut from a small bank of :func:`qsmprep.sim.phantom.make_head_phantom` heads
    (generated lazily at random seeds and cached), sampled with ``torch.nn.functional.grid_sample``
    at the drawn voxel size, with a small random rotation; the mask is the phantom's brain mask.

Augmentations: elastic deformation (a smooth random displacement of the sampling
coordinates), contrast change (random per-tissue scaling of chi and a QSMnet+-style global
scale that may be negative; Jung W et al. Exploring linearity of deep neural network trained
QSM: QSMnet+. NeuroImage 2020;211:116619), fake lesions (haemorrhages: strongly paramagnetic
blobs; calcifications: diamagnetic blobs) and Gaussian noise of spatially varying level in the
field. For the adaptive model each sample draws its voxel size (anisotropic slices allowed)
and B0 direction (tilted up to ``max_tilt_deg``). Optionally (``flip_prob``) a sample is
mirrored along each voxel axis: chi, mask, noise and weight are flipped and the B0 direction's
component along that axis changes sign (the mirrored acquisition), before the field is made
from the flipped chi with that B0; the mirrored pair obeys the same forward model.

Every chi is referenced (mean 0 over the mask, zero outside; ``docs/deep-learning.md``, the
synthetic data) and the local field is its dipole convolution on the 2x zero-padded grid, with
the sample's own kernel (:func:`qsmprep.recon.kernels.dipole_kernel`): ``f = F^-1{D F{chi}}``
cropped, plus noise, times the mask. So the pairs agree with
:func:`qsmprep.sim.forward.forward_field`.

Reproducibility: every random number is drawn on the CPU from a ``torch.Generator`` seeded by
``(seed, batch index)``, so the same seed gives the same batches on any device, and
:meth:`SyntheticQSMData.state_dict` (the batch index) is all that a resumed run needs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qsmprep.dl.inference import resolve_device
from qsmprep.recon._backend import irfftn, rfftn
from qsmprep.recon.kernels import GAMMA_BAR, dipole_kernel, padded_shape

__all__ = ["KINDS", "SyntheticQSMData", "phase_scale", "synthetic_field"]

KINDS = ("mix", "shapes", "brain")
"""Values of ``SyntheticQSMData(kind=...)``."""

_N_LABELS = 19  # phantom labels are 1..18


def phase_scale(b0, te):
    """Phase per ppm of field, ``s = 2 pi GAMMA_BAR B0 TE 1e-6`` (rad/ppm).

    ``b0`` in T, ``te`` in s (scalars or arrays). At 3 T and 20 ms, 16.05 rad/ppm.
    """
    return 2.0 * math.pi * GAMMA_BAR * 1e-6 * np.asarray(b0, float) * np.asarray(te, float)


def synthetic_field(chi: torch.Tensor, voxel_size, b0_dir) -> torch.Tensor:
    """Local field (ppm) of chi by dipole convolution on the 2x zero-padded grid.

    ``f = crop(F^-1{ D_b F{pad(chi)} })`` on the grid ``padded_shape(shape, shape)`` (each axis
    doubled, then to a fast FFT length, as :func:`qsmprep.sim.forward.forward_field`), with
    ``D_b`` the continuous dipole kernel of :func:`qsmprep.recon.kernels.dipole_kernel` for
    sample ``b``'s voxel size and B0 direction (Salomir R et al. Concepts Magn Reson B
    2003;19B:26-34).

    Parameters
    ----------
    chi : (B, 1, X, Y, Z) tensor
        Susceptibility (ppm).
    voxel_size : (B, 3) tensor or array
        mm.
    b0_dir : (B, 3) tensor or array
        Unit B0 directions in voxel coordinates.

    Returns
    -------
    field : (B, 1, X, Y, Z) tensor, ppm, same dtype and device as chi.
    """
    if chi.ndim != 5 or chi.shape[1] != 1:
        raise ValueError(f"chi must have shape (B, 1, X, Y, Z), got {tuple(chi.shape)}")
    vs = np.asarray(torch.as_tensor(voxel_size).detach().cpu(), float).reshape(-1, 3)
    bd = np.asarray(torch.as_tensor(b0_dir).detach().cpu(), float).reshape(-1, 3)
    if len(vs) != chi.shape[0] or len(bd) != chi.shape[0]:
        raise ValueError(
            f"voxel_size and b0_dir need one row per sample ({chi.shape[0]}), got "
            f"{vs.shape} and {bd.shape}"
        )
    shape = tuple(int(n) for n in chi.shape[-3:])
    grid = padded_shape(shape, shape)  # the grid of qsmprep.sim.forward.forward_field
    # on the CPU scipy.fft (the NumPy backend) is several times faster than torch.fft
    dev = None if chi.device.type == "cpu" else str(chi.device)
    kern = [_kernel(grid, v, b, dev) for v, b in zip(vs, bd, strict=True)]
    if dev is None:
        x = chi.detach().numpy()
        f = irfftn(np.stack(kern)[:, None] * rfftn(x, s=grid), s=grid)
        f = torch.from_numpy(np.ascontiguousarray(f[..., : shape[0], : shape[1], : shape[2]]))
        return f.to(chi.dtype)
    f = irfftn(torch.stack(kern)[:, None].to(chi.dtype) * rfftn(chi, s=grid), s=grid)
    return f[..., : shape[0], : shape[1], : shape[2]].contiguous()


def _kernel(grid, vs, b0, dev):
    """The dipole kernel of one sample, cached by voxel aspect ratio and B0 direction.

    ``D(k) = 1/3 - (k.b)^2/|k|^2`` with ``k_i = n_i / (N_i dx_i)`` is unchanged when every
    ``dx_i`` is scaled by the same factor, so one kernel serves all voxel sizes of one shape
    (every draw of an isotropic range); only the aspect ratios ``dx / min(dx)`` are keyed.
    """
    vs = np.asarray(vs, float)
    return _cached_kernel(grid, tuple(np.round(vs / vs.min(), 9)), tuple(np.round(b0, 12)), dev)


@functools.lru_cache(maxsize=32)
def _cached_kernel(grid, vs, b0, dev):
    return dipole_kernel(grid, vs, b0, device="cpu" if dev is None else dev)


@functools.lru_cache(maxsize=8)
def _phantom(shape, voxel_size, seed):
    """Brain-only chi, brain mask and labels of one head phantom (cached, NumPy)."""
    from qsmprep.sim.phantom import make_head_phantom

    ph = make_head_phantom(shape, voxel_size, seed=seed, lesions=False)
    m = ph.brain_mask
    chi = np.where(m, ph.chi, 0.0).astype(np.float32)
    labels = np.where(m, ph.labels, 0).astype(np.float32)
    return chi, m.astype(np.float32), labels


def _as_range(value, name):
    """(lo, hi) from a number or a pair."""
    v = np.atleast_1d(np.asarray(value, float))
    if v.size == 1:
        v = np.repeat(v, 2)
    if v.shape != (2,) or not np.all(np.isfinite(v)) or v[0] > v[1]:
        raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    return float(v[0]), float(v[1])


def _voxel_ranges(voxel_size):
    """Per-axis (lo, hi) voxel-size ranges from a number, 3 numbers or 3 (lo, hi) pairs."""
    v = np.asarray(voxel_size, float)
    if v.ndim == 0:
        v = np.full((3, 2), float(v))
    elif v.shape == (3,):
        v = np.stack([v, v], axis=1)
    elif v.shape == (2,):
        v = np.tile(v, (3, 1))
    if v.shape != (3, 2) or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(
            "voxel_size must be a positive number, 3 numbers (mm) or 3 (low, high) ranges, got "
            f"{voxel_size!r}"
        )
    if np.any(v[:, 0] > v[:, 1]):
        raise ValueError(f"voxel_size ranges must be (low, high), got {voxel_size!r}")
    return tuple((float(a), float(b)) for a, b in v)


class SyntheticQSMData:
    """Seeded, on-the-fly synthetic (field, chi) patches for training QSM networks.

    Parameters
    ----------
    patch_shape : 3 ints
        Patch size in voxels (each >= 8).
    kind : {"mix", "shapes", "brain"}
        Generator; ``"mix"`` draws ``"brain"`` with probability ``brain_fraction``.
    voxel_size : float, 3 floats or 3 (low, high) pairs
        mm; ranges are drawn uniformly per sample. With ``inplane_isotropic`` and equal x/y
        ranges, y takes x's draw (square in-plane voxels, e.g. ``((0.5, 2.5),) * 2 +
        ((0.5, 3.5),)`` for anisotropic slices).
    isotropic : bool
        One draw for all three axes (cubic voxels of a random size; the three ranges must be
        equal).
    b0_dir : "z", "random" or 3 floats
        B0 direction in voxel coordinates: along the third axis, drawn uniformly over the
        solid angle within ``max_tilt_deg`` of it (random azimuth), or fixed.
    max_tilt_deg : float
        Largest angle (deg) between B0 and the third voxel axis for ``b0_dir="random"``.
    b0_tesla : floats
        Field strengths (T) drawn from, for ``phase_scale``.
    te : float or (low, high)
        Echo time (s) for ``phase_scale``.
    noise_ppm : float or (low, high)
        Standard deviation (ppm) of the Gaussian noise of the field; each sample draws a level
        and modulates it smoothly in space (factor 0.5-2); ``weight`` is the inverse noise
        level over the mask normalised to mean 1 (the mask when the level is 0).
    background_ppm : float or (low, high)
        Residual background field added to the local field: a smooth random field
        (trilinear from 3 x 3 x 3 random control values) of an amplitude drawn in this range,
        as background removal leaves in measured local fields (default off; the recipe's
        conventional networks use 0-0.004 ppm).
    chi_range, large_chi_prob, large_chi : float
        Shape susceptibilities: uniform in +-``chi_range`` ppm, or with probability
        ``large_chi_prob`` in +-``large_chi``.
    n_shapes : (low, high) ints
        Number of shapes per ``"shapes"`` patch.
    shape_size_mm : (low, high)
        Shape radii / half-sizes (mm), capped at 0.3 of the patch extent.
    whole_mask_prob : float
        Probability that a ``"shapes"`` patch's mask is the whole patch (else a smooth blob).
    elastic_prob, elastic_mm : float
        Probability and amplitude (mm, per-axis standard deviation) of elastic deformation.
    contrast_prob, tissue_scale, global_scale, negate_prob : float, (lo, hi), (lo, hi), float
        Contrast change of ``"brain"`` patches (probability): each tissue label's chi is
        multiplied by a factor in ``tissue_scale``; all of chi by a factor in ``global_scale``,
        negated with probability ``negate_prob`` (QSMnet+).
    lesion_prob, max_lesions : float, int
        Probability of fake lesions in a patch, and their most number: haemorrhages (+0.3 to
        +1.5 ppm, radius 1-4 mm) or calcifications (-0.1 to -0.8 ppm, radius 1-3 mm).
    rotate_deg : float
        Largest rotation (deg, about a random axis) of the phantom anatomy in a brain patch.
    flip_prob : float
        Probability of mirroring a sample along each voxel axis, drawn per axis (default 0:
        off, and no random number is drawn, so the batches are those without the option). A
        flip along axis ``i`` flips chi, mask, noise and weight and negates ``b0_dir[i]``: the
        dipole kernel ``1/3 - (k.b)^2/|k|^2`` is unchanged when ``k_i`` and ``b_i`` both change
        sign, so the field of the flipped chi with the flipped B0 is the flipped field.
    brain_fraction : float
        Probability of a brain patch for ``kind="mix"``.
    n_phantoms, phantom_shape, phantom_voxel_size, phantom_seed : int, 3 ints, float, int
        The phantom bank: heads ``phantom_seed + i`` (default ``1000 * (seed + 1)``) for
        ``i < n_phantoms`` on the given grid (mm), generated when first used and cached.
    seed : int
        Seed of everything above.
    device : str or torch.device
        Where the batches are built (``"cpu"``, ``"cuda"``, ``"auto"``).
    """

    def __init__(
        self,
        patch_shape: Sequence[int] = (64, 64, 64),
        *,
        kind: str = "mix",
        voxel_size=(1.0, 1.0, 1.0),
        inplane_isotropic: bool = True,
        isotropic: bool = False,
        b0_dir="z",
        max_tilt_deg: float = 45.0,
        b0_tesla: Sequence[float] = (1.5, 3.0, 7.0),
        te=(0.015, 0.025),
        noise_ppm=(0.0, 0.005),
        background_ppm=(0.0, 0.0),
        chi_range: float = 0.2,
        large_chi_prob: float = 0.1,
        large_chi: float = 1.0,
        n_shapes=(5, 40),
        shape_size_mm=(1.5, 16.0),
        whole_mask_prob: float = 0.3,
        elastic_prob: float = 0.5,
        elastic_mm: float = 2.0,
        contrast_prob: float = 0.5,
        tissue_scale=(0.6, 1.6),
        global_scale=(0.5, 2.5),
        negate_prob: float = 0.1,
        lesion_prob: float = 0.3,
        max_lesions: int = 3,
        rotate_deg: float = 15.0,
        flip_prob: float = 0.0,
        brain_fraction: float = 0.5,
        n_phantoms: int = 4,
        phantom_shape: Sequence[int] = (104, 128, 96),
        phantom_voxel_size: float = 1.5,
        phantom_seed: int | None = None,
        seed: int = 0,
        device="cpu",
    ):
        ps = tuple(int(n) for n in np.atleast_1d(patch_shape))
        if len(ps) == 1:
            ps = ps * 3
        if len(ps) != 3 or min(ps) < 8:
            raise ValueError(f"patch_shape must be 3 ints >= 8, got {patch_shape!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.patch_shape = ps
        self.kind = kind
        self.voxel_ranges = _voxel_ranges(voxel_size)
        self.inplane_isotropic = bool(inplane_isotropic)
        self.isotropic = bool(isotropic)
        if self.isotropic and len({tuple(r) for r in self.voxel_ranges}) != 1:
            raise ValueError(
                "isotropic=True draws one voxel size for all three axes and needs one range, "
                f"got {voxel_size!r}"
            )
        if isinstance(b0_dir, str):
            if b0_dir not in ("z", "random"):
                raise ValueError(f"b0_dir must be 'z', 'random' or 3 numbers, got {b0_dir!r}")
            self.b0_dir = b0_dir
        else:
            b = np.asarray(b0_dir, float).reshape(-1)
            if b.shape != (3,) or not np.all(np.isfinite(b)) or np.linalg.norm(b) < 1e-8:
                raise ValueError(f"b0_dir must be 'z', 'random' or 3 numbers, got {b0_dir!r}")
            self.b0_dir = tuple(float(v) for v in b / np.linalg.norm(b))
        if not 0 <= max_tilt_deg <= 90:
            raise ValueError(f"max_tilt_deg must be in [0, 90], got {max_tilt_deg!r}")
        self.max_tilt_deg = float(max_tilt_deg)
        self.b0_tesla = tuple(float(b) for b in np.atleast_1d(b0_tesla))
        if not self.b0_tesla or min(self.b0_tesla) <= 0:
            raise ValueError(f"b0_tesla must be positive field strengths (T), got {b0_tesla!r}")
        self.te = _as_range(te, "te")
        if self.te[0] <= 0:
            raise ValueError(f"te must be positive (s), got {te!r}")
        self.noise_ppm = _as_range(noise_ppm, "noise_ppm")
        self.background_ppm = _as_range(background_ppm, "background_ppm")
        if self.background_ppm[0] < 0:
            raise ValueError(f"background_ppm must be >= 0, got {background_ppm!r}")
        if self.noise_ppm[0] < 0:
            raise ValueError(f"noise_ppm must be >= 0, got {noise_ppm!r}")
        self.chi_range = float(chi_range)
        self.large_chi_prob = float(large_chi_prob)
        self.large_chi = float(large_chi)
        lo, hi = _as_range(n_shapes, "n_shapes")
        self.n_shapes = (int(lo), int(hi))
        self.shape_size_mm = _as_range(shape_size_mm, "shape_size_mm")
        self.whole_mask_prob = float(whole_mask_prob)
        self.elastic_prob = float(elastic_prob)
        self.elastic_mm = float(elastic_mm)
        self.contrast_prob = float(contrast_prob)
        self.tissue_scale = _as_range(tissue_scale, "tissue_scale")
        self.global_scale = _as_range(global_scale, "global_scale")
        self.negate_prob = float(negate_prob)
        self.lesion_prob = float(lesion_prob)
        self.max_lesions = int(max_lesions)
        self.rotate_deg = float(rotate_deg)
        self.flip_prob = float(flip_prob)
        self.brain_fraction = float(brain_fraction)
        for name in (
            "large_chi_prob",
            "whole_mask_prob",
            "elastic_prob",
            "contrast_prob",
            "negate_prob",
            "lesion_prob",
            "flip_prob",
            "brain_fraction",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        if int(n_phantoms) < 1:
            raise ValueError(f"n_phantoms must be >= 1, got {n_phantoms!r}")
        self.n_phantoms = int(n_phantoms)
        self.phantom_shape = tuple(int(n) for n in phantom_shape)
        self.phantom_voxel_size = float(phantom_voxel_size)
        self.seed = int(seed)
        self.phantom_seed = 1000 * (self.seed + 1) if phantom_seed is None else int(phantom_seed)
        self.device = resolve_device(device)
        self.counter = 0
        self._bank: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}
        # patch coordinates (mm per unit voxel size), centred: index - (N - 1) / 2
        self._idx = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0 for n in ps]

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """What a resumed run needs: the seed and the number of batches drawn."""
        return {"seed": self.seed, "counter": int(self.counter)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after :meth:`state_dict` (the seed must match)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"synthetic data state has seed {state['seed']}, this generator {self.seed}"
            )
        self.counter = int(state["counter"])

    def describe(self) -> dict:
        """JSON-able description of the generator (for checkpoints and model cards)."""
        return {
            "source": "synthetic",
            "patch_shape": list(self.patch_shape),
            "kind": self.kind,
            "voxel_size": [list(r) for r in self.voxel_ranges],
            "inplane_isotropic": self.inplane_isotropic,
            "isotropic": self.isotropic,
            "b0_dir": self.b0_dir if isinstance(self.b0_dir, str) else list(self.b0_dir),
            "max_tilt_deg": self.max_tilt_deg,
            "b0_tesla": list(self.b0_tesla),
            "te": list(self.te),
            "noise_ppm": list(self.noise_ppm),
            "background_ppm": list(self.background_ppm),
            "chi_range": self.chi_range,
            "large_chi_prob": self.large_chi_prob,
            "large_chi": self.large_chi,
            "n_shapes": list(self.n_shapes),
            "shape_size_mm": list(self.shape_size_mm),
            "whole_mask_prob": self.whole_mask_prob,
            "elastic_prob": self.elastic_prob,
            "elastic_mm": self.elastic_mm,
            "contrast_prob": self.contrast_prob,
            "tissue_scale": list(self.tissue_scale),
            "global_scale": list(self.global_scale),
            "negate_prob": self.negate_prob,
            "lesion_prob": self.lesion_prob,
            "max_lesions": self.max_lesions,
            "rotate_deg": self.rotate_deg,
            "brain_fraction": self.brain_fraction,
            "n_phantoms": self.n_phantoms,
            "phantom_shape": list(self.phantom_shape),
            "phantom_voxel_size": self.phantom_voxel_size,
            "phantom_seed": self.phantom_seed,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------------------ batches

    def batch(self, batch_size: int, index: int | None = None) -> dict:
        """The next batch (or batch number ``index``, without advancing).

        Returns
        -------
        dict of tensors on ``device``:
            ``field`` (B, 1, X, Y, Z) local field, ppm (zero outside the mask);
            ``mask`` (B, 1, X, Y, Z) float 0/1; ``chi`` (B, 1, X, Y, Z) ppm, mean 0 in mask;
            ``weight`` (B, 1, X, Y, Z) data-consistency weight (mean 1 in mask);
            ``voxel_size`` (B, 3) mm; ``b0_dir`` (B, 3) unit vectors in voxel axes;
            ``phase_scale`` (B,) rad/ppm; ``b0`` (B,) T; ``te`` (B,) s.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if index is None:
            index = self.counter
            self.counter += 1
        seed = int(np.random.SeedSequence([self.seed, int(index)]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        samples = [self._sample(g) for _ in range(int(batch_size))]
        if self.flip_prob > 0:  # drawn after the samples: they are those without flips
            samples = [self._flip(g, s) for s in samples]
        out = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        chi, mask = out["chi"], out["mask"]
        field = synthetic_field(chi, out["voxel_size"], out["b0_dir"])
        out["field"] = (field + out.pop("noise")) * mask
        return {
            "field": out["field"],
            "mask": mask,
            "chi": chi,
            "weight": out["weight"],
            "voxel_size": out["voxel_size"],
            "b0_dir": out["b0_dir"],
            "phase_scale": out["phase_scale"],
            "b0": out["b0"],
            "te": out["te"],
        }

    # ------------------------------------------------------------------------------ one sample

    def _sample(self, g: torch.Generator) -> dict:
        dev = self.device
        vs = self._draw_voxel_size(g)
        b0_dir = self._draw_b0_dir(g)
        b0 = self.b0_tesla[int(torch.randint(len(self.b0_tesla), (1,), generator=g))]
        te = _uniform(g, *self.te)
        brain = self.kind == "brain" or (
            self.kind == "mix" and _uniform(g, 0, 1) < self.brain_fraction
        )
        coords = self._coords(vs)  # (3, X, Y, Z) mm, on device
        if _uniform(g, 0, 1) < self.elastic_prob and self.elastic_mm > 0:
            coords = coords + self._smooth(g, 3, 4) * self.elastic_mm
        if brain:
            chi, mask = self._brain(g, coords)
        else:
            chi, mask = self._shapes(g, coords, vs)
        if _uniform(g, 0, 1) < self.lesion_prob and self.max_lesions > 0:
            chi = self._lesions(g, chi, mask, coords, float(np.mean(vs)))
        m = mask > 0.5
        chi = torch.where(m, chi - chi[m].mean(), torch.zeros_like(chi))
        level = _uniform(g, *self.noise_ppm)
        modulation = torch.exp(self._smooth(g, 1, 3)[0] * (math.log(2.0) / 2.0)).clamp(0.5, 2.0)
        sigma = level * modulation
        noise = sigma * torch.randn(self.patch_shape, generator=g).to(dev)
        if self.background_ppm[1] > 0:  # residual background field (no draw when off)
            noise = noise + _uniform(g, *self.background_ppm) * self._smooth(g, 1, 3)[0]
        if level > 0:
            w = mask / sigma
            weight = w / w[m].mean()
        else:
            weight = mask.clone()
        return {
            "chi": chi[None].float(),
            "mask": mask[None].float(),
            "noise": noise[None].float(),
            "weight": weight[None].float(),
            "voxel_size": torch.tensor(vs, dtype=torch.float32, device=dev),
            "b0_dir": torch.tensor(b0_dir, dtype=torch.float32, device=dev),
            "phase_scale": torch.tensor(float(phase_scale(b0, te)), device=dev),
            "b0": torch.tensor(b0, device=dev),
            "te": torch.tensor(te, device=dev),
        }

    def _flip(self, g, sample: dict) -> dict:
        """Mirror a sample along each axis with probability ``flip_prob``; negate B0 there."""
        axes = [i for i in range(3) if _uniform(g, 0, 1) < self.flip_prob]
        if not axes:
            return sample
        out = dict(sample)
        for k in ("chi", "mask", "noise", "weight"):  # (1, X, Y, Z)
            out[k] = sample[k].flip([1 + i for i in axes])
        sign = torch.ones(3, dtype=sample["b0_dir"].dtype, device=sample["b0_dir"].device)
        sign[axes] = -1.0
        out["b0_dir"] = sample["b0_dir"] * sign
        return out

    def _draw_voxel_size(self, g) -> tuple[float, float, float]:
        r = self.voxel_ranges
        v = [_uniform(g, *r[i]) for i in range(3)]
        if self.isotropic:
            v[1] = v[2] = v[0]
        elif self.inplane_isotropic and r[0] == r[1]:
            v[1] = v[0]
        return tuple(v)

    def _draw_b0_dir(self, g) -> tuple[float, float, float]:
        if self.b0_dir == "z":
            return (0.0, 0.0, 1.0)
        if self.b0_dir == "random":
            cmin = math.cos(math.radians(self.max_tilt_deg))
            c = _uniform(g, cmin, 1.0)  # uniform over the solid angle of the cap
            phi = _uniform(g, 0.0, 2 * math.pi)
            s = math.sqrt(max(0.0, 1.0 - c * c))
            return (s * math.cos(phi), s * math.sin(phi), c)
        return self.b0_dir

    def _coords(self, vs) -> torch.Tensor:
        axes = [(i * v).to(self.device) for i, v in zip(self._idx, vs, strict=True)]
        grids = torch.meshgrid(*axes, indexing="ij")
        return torch.stack(grids)

    def _smooth(self, g, channels: int, n_ctrl: int) -> torch.Tensor:
        """Smooth random field, unit std at the control points: (channels, X, Y, Z)."""
        c = torch.randn((1, channels, n_ctrl, n_ctrl, n_ctrl), generator=g).to(self.device)
        up = F.interpolate(c, size=self.patch_shape, mode="trilinear", align_corners=True)
        return up[0]

    # --- shapes

    def _shapes(self, g, coords, vs):
        dev = self.device
        extent = [n * v for n, v in zip(self.patch_shape, vs, strict=True)]
        h = float(np.mean(vs))
        chi = (
            _uniform(g, -0.05, 0.05) * torch.ones(self.patch_shape, device=dev)
            + 0.02 * self._smooth(g, 1, 4)[0]
        )
        n = int(torch.randint(self.n_shapes[0], self.n_shapes[1] + 1, (1,), generator=g))
        size_hi = min(self.shape_size_mm[1], 0.3 * min(extent))
        size_lo = min(self.shape_size_mm[0], size_hi)
        margin = 4.0 * self.elastic_mm + 2.0 * h  # the elastic warp moves coords this far
        for _ in range(n):
            kind = int(torch.randint(3, (1,), generator=g))
            centre = [_uniform(g, -e / 2, e / 2) for e in extent]
            rot = _random_rotation(g)
            if kind == 0:  # ellipsoid (sphere when the semi-axes agree)
                semi = [_uniform(g, size_lo, size_hi) for _ in range(3)]
                reach = max(semi)
            elif kind == 1:  # cuboid
                half = [_uniform(g, size_lo, size_hi) for _ in range(3)]
                reach = math.sqrt(sum(a * a for a in half))
            else:  # cylinder or line (thin cylinder), axis along local z
                r = _uniform(g, 0.5 * size_lo, 0.5 * size_hi)
                length = _uniform(g, 2 * size_lo, 2 * size_hi + 1e-6) * 1.5
                reach = math.hypot(r, length / 2)
            if _uniform(g, 0, 1) < self.large_chi_prob:
                value = _uniform(g, -self.large_chi, self.large_chi)
            else:
                value = _uniform(g, -self.chi_range, self.chi_range)
            sl = self._box(centre, reach + margin, vs)
            if sl is None:
                continue
            q = _rotate(coords[(slice(None), *sl)], centre, rot)
            if kind == 0:
                sd = _ellipsoid_sd(q, semi)
            elif kind == 1:
                sd = torch.stack([q[i].abs() - half[i] for i in range(3)]).amax(0)
            else:
                radial = torch.sqrt(q[0] ** 2 + q[1] ** 2)
                sd = torch.maximum(radial - r, q[2].abs() - length / 2)
            f = (0.5 - sd / h).clamp(0.0, 1.0)
            sub = chi[sl]
            chi[sl] = sub + f * (value - sub)
        if _uniform(g, 0, 1) < self.whole_mask_prob:
            mask = torch.ones(self.patch_shape, device=dev)
        else:
            semi = [_uniform(g, 0.3, 0.55) * e for e in extent]
            centre = [_uniform(g, -0.1, 0.1) * e for e in extent]
            sd = _ellipsoid_sd(_rotate(coords, centre, _random_rotation(g)), semi)
            sd = sd + self._smooth(g, 1, 4)[0] * 0.08 * min(extent)
            mask = (sd <= 0).float()
            if mask.mean() < 0.1:
                mask = torch.ones(self.patch_shape, device=dev)
        return chi * mask, mask

    def _box(self, centre, reach: float, vs):
        """Index slices of the voxels within ``reach`` mm of ``centre`` (None when empty)."""
        sl = []
        for c, n, v in zip(centre, self.patch_shape, vs, strict=True):
            i0 = max(0, int(math.floor((c - reach) / v + (n - 1) / 2.0)))
            i1 = min(n, int(math.ceil((c + reach) / v + (n - 1) / 2.0)) + 1)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    # --- brain

    def _bank_entry(self, i: int):
        if i not in self._bank:
            vs = (self.phantom_voxel_size,) * 3
            chi, m, lab = _phantom(self.phantom_shape, vs, self.phantom_seed + i)
            vol = torch.from_numpy(np.stack([chi, m]))[None].to(self.device)  # (1, 2, ...)
            labels = torch.from_numpy(lab)[None, None].to(self.device)
            # candidate patch centres: the brain voxels
            centres = np.argwhere(m > 0)
            self._bank[i] = (vol, labels, centres)
        return self._bank[i]

    def _brain(self, g, coords):
        i = int(torch.randint(self.n_phantoms, (1,), generator=g))
        vol, labels, centres = self._bank_entry(i)
        shape_ph = np.asarray(self.phantom_shape)
        vph = self.phantom_voxel_size
        c = centres[int(torch.randint(len(centres), (1,), generator=g))]
        centre_mm = (c - (shape_ph - 1) / 2.0) * vph
        axis = torch.randn(3, generator=g).numpy()
        angle = math.radians(_uniform(g, -self.rotate_deg, self.rotate_deg))
        rot = _axis_angle(axis, angle)
        r = torch.tensor(rot, dtype=torch.float32, device=self.device)
        p = (r @ coords.reshape(3, -1)).reshape(coords.shape)
        p = (
            p
            + torch.tensor(centre_mm, dtype=torch.float32, device=self.device)[:, None, None, None]
        )
        # normalised grid_sample coordinates, last dim ordered (z, y, x) for (D, H, W) = (X, Y, Z)
        norm = [
            (p[k] / vph + (shape_ph[k] - 1) / 2.0) * (2.0 / (shape_ph[k] - 1)) - 1.0
            for k in range(3)
        ]
        grid = torch.stack(norm[::-1], dim=-1)[None]
        s = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        frac = s[0, 1]
        mask = (frac > 0.5).float()
        chi = torch.where(mask > 0, s[0, 0] / frac.clamp_min(1e-3), torch.zeros_like(frac))
        if _uniform(g, 0, 1) < self.contrast_prob:
            lab = F.grid_sample(labels, grid, mode="nearest", align_corners=True)[0, 0].long()
            scales = torch.empty(_N_LABELS).uniform_(*self.tissue_scale, generator=g)
            chi = chi * scales.to(self.device)[lab.clamp(0, _N_LABELS - 1)]
            factor = _uniform(g, *self.global_scale)
            if _uniform(g, 0, 1) < self.negate_prob:
                factor = -factor
            chi = chi * factor
        if mask.sum() < 1:  # the rotation moved the centre out: use the whole patch
            mask = torch.ones_like(mask)
        return chi * mask, mask

    # --- lesions

    def _lesions(self, g, chi, mask, coords, h: float):
        inside = torch.nonzero(mask.flatten() > 0.5).flatten()
        if inside.numel() == 0:
            return chi
        n = int(torch.randint(1, self.max_lesions + 1, (1,), generator=g))
        flat = coords.reshape(3, -1)
        for _ in range(n):
            j = inside[int(torch.randint(inside.numel(), (1,), generator=g))]
            centre = [float(flat[k, j]) for k in range(3)]
            if _uniform(g, 0, 1) < 0.6:  # haemorrhage / microbleed
                value, radius = _uniform(g, 0.3, 1.5), _uniform(g, 1.0, 4.0)
            else:  # calcification
                value, radius = _uniform(g, -0.8, -0.1), _uniform(g, 1.0, 3.0)
            semi = [radius * _uniform(g, 0.7, 1.3) for _ in range(3)]
            sd = _ellipsoid_sd(_rotate(coords, centre, _random_rotation(g)), semi)
            f = (0.5 - sd / h).clamp(0.0, 1.0) * mask
            chi = chi + f * (value - chi)
        return chi


# ------------------------------------------------------------------------------ helpers


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


def _random_rotation(g) -> np.ndarray:
    """Uniformly random 3D rotation (normalised Gaussian quaternion)."""
    q = torch.randn(4, generator=g, dtype=torch.float64).numpy()
    a, b, c, d = q / np.linalg.norm(q)
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def _axis_angle(axis, angle: float) -> np.ndarray:
    """Rotation by ``angle`` (rad) about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float)
    k = k / max(np.linalg.norm(k), 1e-12)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _rotate(coords, centre, rot) -> torch.Tensor:
    """Coordinates relative to ``centre`` in the frame of ``rot``: ``rot^T (x - centre)``."""
    r = torch.tensor(np.asarray(rot).T, dtype=coords.dtype, device=coords.device)
    c = torch.tensor(centre, dtype=coords.dtype, device=coords.device)[:, None]
    shape = coords.shape
    return (r @ (coords.reshape(3, -1) - c)).reshape(shape)


def _ellipsoid_sd(q, semi) -> torch.Tensor:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid in local coordinates."""
    a, b, c = semi
    q2 = (q[0] / a) ** 2 + (q[1] / b) ** 2 + (q[2] / c) ** 2
    grad = torch.sqrt((q[0] / a**2) ** 2 + (q[1] / b**2) ** 2 + (q[2] / c**2) ** 2)
    qn = torch.sqrt(q2)
    return (qn - 1.0) * qn / grad.clamp_min(1e-6)
