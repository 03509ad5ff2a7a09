"""Serving seeded random patches of target scans (:class:`TargetScans`)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from qsmprep.dl.inference import resolve_device
from qsmprep.dl.synth import phase_scale
from qsmprep.dl.target.scans import TargetScan, find_target_scans

__all__ = ["TargetScans"]


class TargetScans:
    """Random patches of target-domain local fields (unlabelled, or labelled by a reference).

    Parameters
    ----------
    source : path or list of :class:`TargetScan`
        A qsmprep output directory or a BIDS dataset (see :func:`detect_source`), or scans.
    patch_shape : 3 ints
        Patch size in voxels (volumes smaller than it are zero-padded).
    reference : str or path, optional
        Reference chi for transfer learning: a ``desc`` label (``"cosmos"``: the
        ``*_desc-cosmos_Chimap.nii.gz`` of a qsmprep output, or COSMOS computed from the
        orientations of a BIDS dataset), a NIfTI file (for all scans of its shape) or a glob
        pattern (matched to scans by ``sub``/``ses``). Scans without one are left out.
    b0 : float, optional
        Field strength override (T).
    te : float, optional
        Echo time (s) of the phase scale; default the scan's longest echo.
    min_mask_fraction : float
        A patch is redrawn (up to 10 times) while less of it than this lies in the mask.
    seed : int
        Seed of the patch positions (batch ``k`` depends only on ``(seed, k)``).
    device : str or torch.device
        Where batches are returned (``"cpu"``, ``"cuda"``, ``"auto"``).
    participant_label, bg_method
        BIDS datasets: subjects to use, background removal of the field chain.
    """

    def __init__(
        self,
        source,
        patch_shape=(64, 64, 64),
        *,
        reference=None,
        b0: float | None = None,
        te: float | None = None,
        min_mask_fraction: float = 0.3,
        seed: int = 0,
        device="cpu",
        participant_label=None,
        bg_method: str = "resharp",
    ):
        ps = tuple(int(n) for n in np.atleast_1d(patch_shape))
        if len(ps) == 1:
            ps = ps * 3
        if len(ps) != 3 or min(ps) < 1:
            raise ValueError(f"patch_shape must be 3 positive ints, got {patch_shape!r}")
        self.patch_shape = ps
        self.seed = int(seed)
        self.counter = 0
        self.min_mask_fraction = float(min_mask_fraction)
        self.device = resolve_device(device)
        self.reference = None if reference is None else str(reference)
        if isinstance(source, (list, tuple)):
            if not source or not all(isinstance(s, TargetScan) for s in source):
                raise ValueError("source must be a directory or a non-empty list of TargetScan")
            self.scans = list(source)
            self.kind, self.root, self.skipped = "scans", None, []
        else:
            dev = "cpu" if self.device.type == "cpu" else str(self.device)
            self.scans, self.kind, self.root, self.skipped = find_target_scans(
                source,
                reference=reference,
                b0=b0,
                te=te,
                participant_label=participant_label,
                bg_method=bg_method,
                device=dev,
            )
        self.labelled = all(s.chi is not None for s in self.scans)
        if reference is not None and not self.labelled:
            raise ValueError("every scan needs a reference chi when a reference is given")
        self._padded = [self._pad(s) for s in self.scans]
        self._centres = [np.flatnonzero(p["mask"].reshape(-1)) for p in self._padded]

    def __len__(self) -> int:
        return len(self.scans)

    def _pad(self, s: TargetScan) -> dict:
        pad = [(0, max(0, p - n)) for p, n in zip(self.patch_shape, s.shape, strict=True)]
        out = {
            "field": np.pad(s.field_ppm, pad),
            "mask": np.pad(s.mask, pad),
            "noise": None if s.noise is None else np.pad(s.noise, pad, constant_values=np.inf),
            "chi": None if s.chi is None else np.pad(s.chi, pad),
        }
        return out

    def subset(self, scans, *, seed: int) -> TargetScans:
        """These patches restricted to ``scans`` (some of :attr:`scans`), with their own
        ``seed``: the source, reference and patch settings stay, nothing is loaded again."""
        idx = [next(i for i, s in enumerate(self.scans) if s is x) for x in scans]
        if not idx:
            raise ValueError("a subset of target scans needs at least one scan")
        new = copy.copy(self)
        new.scans = [self.scans[i] for i in idx]
        new._padded = [self._padded[i] for i in idx]
        new._centres = [self._centres[i] for i in idx]
        new.labelled = all(s.chi is not None for s in new.scans)
        new.seed, new.counter = int(seed), 0
        return new

    @property
    def subjects(self) -> list[str]:
        """Subject labels of the scans, each once, in scan order."""
        return list(dict.fromkeys(s.subject for s in self.scans))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "counter": int(self.counter)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"target data state has seed {state['seed']}, this one {self.seed}")
        self.counter = int(state["counter"])

    def describe(self) -> dict:
        """JSON-able description (for checkpoints and model cards)."""
        return {
            "source": self.kind,
            "path": None if self.root is None else str(self.root),
            "scans": [s.name for s in self.scans],
            "subjects": self.subjects,
            "reference": self.reference,
            "references": sorted({s.reference for s in self.scans if s.reference}),
            "voxel_sizes": sorted({tuple(round(v, 3) for v in s.voxel_size) for s in self.scans}),
            "b0": sorted({s.b0 for s in self.scans}),
            "patch_shape": list(self.patch_shape),
            "seed": self.seed,
        }

    def batch(self, batch_size: int, index: int | None = None) -> dict:
        """The next batch of random patches (or batch number ``index``, without advancing).

        Returns the keys of :meth:`qsmprep.dl.synth.SyntheticQSMData.batch` (``field`` ppm,
        ``mask``, ``weight`` from the noise map (the mask when there is none), ``voxel_size``,
        ``b0_dir``, ``phase_scale``, ``b0``, ``te``) plus ``chi`` when the scans have a
        reference.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if index is None:
            index = self.counter
            self.counter += 1
        seed = int(np.random.SeedSequence([self.seed, 7, int(index)]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        items = [self._patch(rng) for _ in range(int(batch_size))]
        out = {}
        for k in items[0]:
            out[k] = torch.as_tensor(np.stack([it[k] for it in items])).to(self.device)
        return out

    def _patch(self, rng) -> dict:
        i = int(rng.integers(len(self.scans)))
        s, p, centres = self.scans[i], self._padded[i], self._centres[i]
        shape = p["mask"].shape
        best = None
        for _ in range(10):
            c = np.unravel_index(int(centres[rng.integers(len(centres))]), shape)
            start = [
                int(np.clip(ci - ps // 2, 0, n - ps))
                for ci, ps, n in zip(c, self.patch_shape, shape, strict=True)
            ]
            sl = tuple(slice(a, a + n) for a, n in zip(start, self.patch_shape, strict=True))
            frac = float(p["mask"][sl].mean())
            if best is None or frac > best[0]:
                best = (frac, sl)
            if frac >= self.min_mask_fraction:
                break
        sl = best[1]
        mask = p["mask"][sl].astype(np.float32)
        m = mask > 0
        if p["noise"] is not None:
            sigma = p["noise"][sl]
            floor = 1e-3 * np.median(sigma[m]) if m.any() else 1.0
            w = np.where(m, 1.0 / np.maximum(sigma, floor), 0.0)
            weight = (w / w[m].mean()) if m.any() and w[m].mean() > 0 else mask
        else:
            weight = mask
        out = {
            "field": (p["field"][sl] * mask)[None].astype(np.float32),
            "mask": mask[None],
            "weight": np.asarray(weight, np.float32)[None],
            "voxel_size": np.asarray(s.voxel_size, np.float32),
            "b0_dir": np.asarray(s.b0_dir, np.float32),
            "phase_scale": np.float32(phase_scale(s.b0, s.te)),
            "b0": np.float32(s.b0),
            "te": np.float32(s.te),
        }
        if p["chi"] is not None:
            chi = p["chi"][sl]
            ref = chi[m].mean() if m.any() else 0.0
            out["chi"] = (np.where(m, chi - ref, 0.0))[None].astype(np.float32)
        return out
