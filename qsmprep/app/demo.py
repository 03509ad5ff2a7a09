"""``qsmprep demo``: a simulated dataset with ground truth, both levels of the App run on it.

The embedded default a newcomer runs first: :func:`run_demo` simulates a small BIDS dataset
(:func:`qsmprep.sim.bids.simulate_bids_dataset`), runs the participant and group levels on it
as ``qsmprep`` would, and scores every Chimap against the simulator's true susceptibility.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qsmprep.__about__ import __version__
from qsmprep.app.console import console
from qsmprep.app.levels import run
from qsmprep.app.settings import make_settings

__all__ = ["run_demo"]

ROTATIONS = [0.0, (20.0, 0.0), (0.0, -20.0), (-15.0, 15.0), (15.0, 15.0)]
"""Head rotations of the first subject's orientations (the first one axial)."""


def _level(bids_dir: Path, output_dir: Path, level: str, verbose: int = 0, **options) -> int:
    """One level as ``qsmprep bids_dir output_dir level ...`` runs it: its exit code."""
    with console(verbose):
        try:
            settings = make_settings(bids_dir, output_dir, level, **options)
        except ValueError as exc:  # UsageError and invalid parameters
            print(f"qsmprep: error: {exc}", file=sys.stderr)
            return 1
        return run(settings, verbose=verbose)


def run_demo(
    output_dir,
    *,
    shape=(96, 96, 80),
    voxel_size: float = 2.0,
    subjects: int = 1,
    orientations: int = 1,
    seed: int = 0,
    methods=None,
    nprocs: int | None = None,
    device: str = "auto",
    verbose: int = 0,
) -> int:
    """Simulate a dataset with ground truth, run the participant and group levels on it.

    Parameters
    ----------
    output_dir : path
        Folder for the dataset (``bids/``), the outputs (``derivatives/qsmprep/``) and the
        Nipype work directory (``work/``).
    shape : 3 ints
        Grid of the simulated heads.
    voxel_size : float
        Isotropic voxel size (mm).
    subjects : int
        Simulated subjects.
    orientations : int
        Head orientations of the first subject (2 to 5; two or more also give COSMOS).
    seed : int
        Seed of the phantoms and the noise.
    methods : list of str, optional
        Dipole inversions (``--methods``); default the App's.
    nprocs : int, optional
        Parallel processes; default every CPU this process may run on.
    device : {"auto", "cpu", "cuda"}
    verbose : int
        Console verbosity of the runs (``-v`` counts).

    Returns
    -------
    int
        The larger exit code of the two levels (0: every acquisition succeeded).
    """
    import numpy as np

    from qsmprep.sim.bids import simulate_bids_dataset

    out = Path(output_dir).absolute()
    bids_dir = out / "bids"
    t0 = time.perf_counter()
    rots = ROTATIONS[:orientations]
    print(
        f"qsmprep {__version__} demo: simulating {subjects} subject(s) in {bids_dir}", flush=True
    )
    simulate_bids_dataset(
        bids_dir,
        n_subjects=subjects,
        shape=tuple(shape),
        voxel_size=(voxel_size,) * 3,
        seed=seed,
        orientations={0: rots} if orientations > 1 else None,
    )
    deriv = out / "derivatives" / "qsmprep"
    code = _level(
        bids_dir, deriv, "participant", verbose, methods=methods, nprocs=nprocs or None,
        device=device, work_dir=out / "work",
    )  # fmt: skip
    # the group level at the default verbosity, as ``qsmprep bids_dir output_dir group``
    code = max(code, _level(bids_dir, deriv, "group"))
    # score against the simulator's ground truth
    import nibabel as nib

    for chimap in sorted(deriv.rglob("*_desc-*_Chimap.nii.gz")):
        sub = chimap.name.split("_")[0]
        gt = bids_dir / "derivatives" / "groundtruth" / sub / "anat"
        truth = nib.load(gt / f"{sub}_Chimap.nii.gz").get_fdata()
        # scored as the QSM challenges do: over the whole true brain, a voxel at zero counts
        mask = nib.load(gt / f"{sub}_desc-brain_mask.nii.gz").get_fdata() > 0
        from qsmprep.metrics import nrmse, xsim

        chi = nib.load(chimap).get_fdata()
        covered = 100.0 * np.count_nonzero(mask & (chi != 0)) / max(np.count_nonzero(mask), 1)
        print(
            f"  {chimap.name}: NRMSE {nrmse(chi, truth, mask):.1f} %, "
            f"XSIM {xsim(chi, truth, mask):.3f} vs ground truth over the true brain "
            f"({int(np.count_nonzero(mask))} voxels; the map covers {covered:.1f} %)"
        )
    print(f"reports: {sorted(str(p) for p in deriv.glob('*.html'))}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s (exit code {code})")
    return code
