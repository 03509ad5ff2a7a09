"""``qsmprep`` command line.

``qsmprep demo OUT`` is the embedded default a newcomer runs first: it simulates a small BIDS
dataset of multi-echo GRE magnitude + phase (with ground truth), discovers it with pybids,
computes the total and local field maps with the field chain, writes them as a BIDS
derivative dataset and prints their error against the ground truth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qsmprep.__about__ import __version__

__all__ = ["main"]


def _load_megre(bids_dir: Path, subject: str):
    """Magnitude and phase (X, Y, Z, E), echo times (s), B0 (T) and affine of one subject."""
    import nibabel as nib
    from bids import BIDSLayout

    layout = BIDSLayout(str(bids_dir), validate=False)
    common = {"subject": subject, "suffix": "MEGRE", "extension": [".nii", ".nii.gz"]}
    phases = sorted(layout.get(part="phase", **common), key=lambda f: f.get_entities()["echo"])
    mags = sorted(layout.get(part="mag", **common), key=lambda f: f.get_entities()["echo"])
    if not phases or len(phases) != len(mags):
        raise ValueError(
            f"sub-{subject}: found {len(mags)} magnitude and {len(phases)} phase MEGRE images in"
            f" {bids_dir}; each echo needs *_part-mag_MEGRE and *_part-phase_MEGRE"
        )
    te = [float(f.get_metadata()["EchoTime"]) for f in phases]
    b0 = float(phases[0].get_metadata()["MagneticFieldStrength"])
    imgs = [nib.load(f.path) for f in phases]
    phase = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs], axis=-1)
    mag = np.stack([np.asarray(nib.load(f.path).dataobj, np.float32) for f in mags], axis=-1)
    return mag, phase, te, b0, imgs[0].affine, imgs[0].header.get_zooms()[:3]


def _write_derivatives(out: Path, subject: str, affine, maps, sources, settings) -> list[Path]:
    """Write field maps and mask atomically: a staging folder renamed into place."""
    import nibabel as nib

    deriv = out / "derivatives" / "qsmprep"
    deriv.mkdir(parents=True, exist_ok=True)
    desc = deriv / "dataset_description.json"
    if not desc.exists():
        desc.write_text(
            json.dumps(
                {
                    "Name": "qsmprep derivatives",
                    "BIDSVersion": "1.9.0",
                    "DatasetType": "derivative",
                    "GeneratedBy": [{"Name": "qsmprep", "Version": __version__}],
                },
                indent=2,
            )
        )
    final = deriv / f"sub-{subject}" / "anat"
    staging = deriv / f".sub-{subject}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    items = [
        ("desc-brain_mask", maps.mask.astype(np.uint8), {"Type": "Brain"}),
        ("desc-total_fieldmap", maps.total_hz, {"Units": "Hz"}),
        ("desc-local_fieldmap", maps.local_hz, {"Units": "Hz"}),
        ("desc-local_mask", maps.local_mask.astype(np.uint8), {"Type": "Brain"}),
    ]
    written = []
    for suffix, data, meta in items:
        name = f"sub-{subject}_{suffix}"
        nib.save(nib.Nifti1Image(data, affine), staging / f"{name}.nii.gz")
        meta = {
            **meta,
            "Sources": sources,
            "Settings": settings,
            "GeneratedBy": {"Name": "qsmprep", "Version": __version__},
        }
        (staging / f"{name}.json").write_text(json.dumps(meta, indent=2))
        written.append(final / f"{name}.nii.gz")
    final.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():
        f.replace(final / f.name)
    staging.rmdir()
    return written


def run_demo(args) -> int:
    import nibabel as nib

    from qsmprep.recon.chain import compute_local_field
    from qsmprep.recon.kernels import b0_dir_from_affine
    from qsmprep.sim.bids import simulate_bids_dataset

    out = Path(args.output_dir).resolve()
    bids_dir = out / "bids"
    t0 = time.perf_counter()
    print(f"qsmprep {__version__} demo: simulating a BIDS dataset in {bids_dir}", flush=True)
    simulate_bids_dataset(
        bids_dir,
        n_subjects=1,
        shape=tuple(args.shape),
        voxel_size=(args.voxel_size,) * 3,
        seed=args.seed,
    )
    mag, phase, te, b0, affine, zooms = _load_megre(bids_dir, "01")
    print(
        f"  sub-01: {mag.shape[-1]} echoes, TE {[round(t * 1e3, 2) for t in te]} ms,"
        f" {b0:g} T, {mag.shape[:3]} voxels of {tuple(round(float(z), 2) for z in zooms)} mm",
        flush=True,
    )
    profile: dict = {}
    maps = compute_local_field(
        mag,
        phase,
        te,
        zooms,
        b0_dir=b0_dir_from_affine(affine),
        bg_method=args.bg_method,
        device=args.device,
        profile=profile,
    )
    for name, rec in profile.items():
        print(f"  {name:<22s} {rec['seconds']:6.2f} s", flush=True)
    sources = sorted(str(p.relative_to(bids_dir)) for p in bids_dir.rglob("sub-01_*MEGRE.nii.gz"))
    written = _write_derivatives(out, "01", affine, maps, sources, maps.settings)
    truth = bids_dir / "derivatives" / "groundtruth" / "sub-01" / "anat"
    true_local = np.asarray(nib.load(truth / "sub-01_desc-local_fieldmap.nii.gz").dataobj)
    true_mask = np.asarray(nib.load(truth / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    m = maps.local_mask & true_mask
    est = maps.local_hz[m] - maps.local_hz[m].mean()
    ref = true_local[m] - true_local[m].mean()
    nrmse = 100 * np.linalg.norm(est - ref) / np.linalg.norm(ref)
    dice = 2 * (maps.mask & true_mask).sum() / (maps.mask.sum() + true_mask.sum())
    print(f"  brain mask Dice vs truth: {dice:.3f}")
    print(
        f"  local field ({args.bg_method}) vs truth: NRMSE {nrmse:.1f} %,"
        f" mean |error| {np.abs(est - ref).mean():.2f} Hz over {int(m.sum())} voxels"
    )
    print(f"wrote {len(written)} maps to {written[0].parent} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmprep", description="Quantitative susceptibility mapping for BIDS datasets."
    )
    p.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="simulate a small dataset and run the field chain on it")
    d.add_argument("output_dir", help="folder for the simulated BIDS data and the derivatives")
    d.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80])
    d.add_argument("--voxel-size", type=float, default=2.0, help="isotropic voxel size (mm)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--bg-method", default="resharp", choices=["resharp", "vsharp", "sharp", "pdf"])
    d.add_argument("--device", default="cpu", help="cpu, torch (CPU) or cuda")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args)
    except ValueError as exc:
        print(f"qsmprep: error: {exc}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse restricts the commands


if __name__ == "__main__":
    sys.exit(main())
