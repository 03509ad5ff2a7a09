"""Field-chain targets on the development data (``../shared/data``; skipped where absent).

The App runs as a user runs it (``qsmprep.benchmarks.chain``, TKD, TV, MEDI and TFI) on qsmdev
(sub-01 axial, sub-02 tilted) and qsmdev-aniso (1 x 1 x 2.5 mm, tilted), scored over the true
brain mask. The bounds are the targets of the field-chain work, written before measuring; the
ones not reached yet are strict xfails with the measured values.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmprep.nifti import load_data
from qsmprep.recon.swi import combine_swi_magnitude

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """The App's output folder and the scores of every acquisition."""
    if not (SHARED / "qsmdev").is_dir() or not (SHARED / "qsmdev-aniso").is_dir():
        pytest.skip("../shared/data is not available")
    from qsmprep.benchmarks.chain import run_chain

    out = tmp_path_factory.mktemp("chain_shared")
    results = run_chain(
        [SHARED / "qsmdev", SHARED / "qsmdev-aniso"], out, methods=("tkd", "tv", "medi", "tfi"),
        log=lambda *_: None,
    )  # fmt: skip
    return out, {(s.dataset, s.acquisition): s for s in results}


@pytest.fixture(scope="module")
def scores(chain_run):
    return chain_run[1]


def test_whole_brain_kept_and_covered(scores):
    # measured: kept 97.9-98.0 % (qsmdev), 97.1 % (aniso); TV and MEDI cover 99.3-99.9 %;
    # Dice 0.987-0.989
    assert len(scores) == 3
    for s in scores.values():
        assert s.dice >= 0.97, (s.acquisition, s.dice)
        assert s.kept >= 0.97, (s.acquisition, s.kept)
        for method in ("tv", "medi"):
            assert s.methods[method]["covered"] >= 0.99, (s.acquisition, method)


@pytest.mark.xfail(
    strict=True,
    reason="best method end to end: TFI 50.4 / 52.0 % on qsmdev sub-01 / sub-02 and TV 53.1 % on"
    " qsmdev-aniso (TFI 53.8 %); targets 40 % and 45 %",
)
def test_best_method_end_to_end(scores):
    for (ds, acq), s in scores.items():
        best = min(row["end_to_end"]["nrmse"] for row in s.methods.values())
        assert best <= (45.0 if ds == "qsmdev-aniso" else 40.0), (ds, acq, best)


@pytest.mark.xfail(
    strict=True,
    reason="chain penalty (end to end / noise-matched oracle NRMSE): TV 1.88 / 2.05 / 2.30, MEDI"
    " 1.48 / 1.48 / 1.91 (qsmdev sub-01, sub-02, aniso); target 1.3",
)
def test_chain_penalty_of_tv_and_medi(scores):
    for (_, acq), s in scores.items():
        for method in ("tv", "medi"):
            assert s.methods[method]["chain_penalty"] <= 1.3, (acq, method)


def test_chain_penalty_of_tfi(scores):
    """TFI inverts the total field: no background removal stands between it and its oracle
    (measured 0.97 / 0.97 / 1.12 on qsmdev sub-01, sub-02, aniso)."""
    for (_, acq), s in scores.items():
        assert s.methods["tfi"]["covered"] >= 0.99, acq
        assert s.methods["tfi"]["chain_penalty"] <= 1.3, acq


@pytest.mark.xfail(
    strict=True,
    reason="local field slope 0.899 / 0.875 / 0.907 and NRMSE 52.6 / 54.1 / 58.7 % against 1.15"
    " x the noise-matched field's 35.0 / 37.6 / 30.2 % (qsmdev sub-01, sub-02, aniso); LBV of the"
    " true total field in the true mask scores 41.4 / 43.2 / 37.7 %, slope 0.900 / 0.904 / 0.942",
)
def test_local_field_against_the_truth(scores):
    for (_, acq), s in scores.items():
        assert 0.95 <= s.local_slope <= 1.05, (acq, s.local_slope)
        assert s.local_nrmse <= 1.15 * s.oracle_field_nrmse, (acq, s.local_nrmse)


def _swi_contrast(out: Path, dataset: str, prefix: str):
    """Vein/WM ratios of the App's SWI and of the echoes' root-sum-of-squares magnitude.

    Veins and white matter are the generator's labels (11, 8), the white matter within 6 mm
    of a vein, both inside the App's brain mask (as in tests/recon/test_recon_swi.py).
    """
    sub = prefix.split("_")[0]
    anat = out / dataset / "derivatives" / "qsmprep" / sub / "anat"
    swi = load_data(anat / f"{prefix}_desc-swi_T2starw.nii.gz")
    brain = load_data(anat / f"{prefix}_desc-brain_mask.nii.gz") > 0
    gt = SHARED / dataset / "derivatives" / "groundtruth" / sub / "anat"
    labels = np.rint(load_data(gt / f"{prefix}_dseg.nii.gz")).astype(int)
    raw = sorted((SHARED / dataset / sub / "anat").glob(f"{prefix}_echo-*_part-mag_MEGRE.nii.gz"))
    mag = combine_swi_magnitude(np.stack([load_data(f) for f in raw], -1))
    vs = nib.load(raw[0]).header.get_zooms()[:3]
    vein = (labels == 11) & brain
    wm = (labels == 8) & brain & (ndi.distance_transform_edt(~vein, sampling=vs) <= 6.0)
    assert vein.sum() > 500 and wm.sum() > 5000, (prefix, vein.sum(), wm.sum())
    return swi[vein].mean() / swi[wm].mean(), mag[vein].mean() / mag[wm].mean()


def test_swi_darkens_veins(chain_run):
    # Bounds of the SWI targets (tests/recon/test_recon_swi.py, written before measuring):
    # veins >= 20 % darker than the white matter around them, and the phase mask adds >= 10 %
    # to the vein/WM contrast of the combined magnitude. Measured (qsmdev sub-01, sub-02,
    # qsmdev-aniso): SWI 0.591 / 0.572 / 0.509 against the magnitude's 0.692 / 0.658 / 0.655.
    out, scores = chain_run
    for ds, acq in scores:
        swi_ratio, mag_ratio = _swi_contrast(out, ds, acq)
        print(f"{ds} {acq}: vein/WM SWI {swi_ratio:.3f}, magnitude {mag_ratio:.3f}")
        assert swi_ratio <= 0.8, (ds, acq, swi_ratio)
        assert swi_ratio <= 0.9 * mag_ratio, (ds, acq, swi_ratio, mag_ratio)
