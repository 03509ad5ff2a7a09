"""Canonical atlas regions, ROI statistics and referencing to the ventricles (no registration)."""

import numpy as np
import pytest

from qsmprep.space.atlas import (
    HOSPA_LABELS,
    ROIS,
    canonical_labels,
    parse_atlas,
    reference_region,
    roi_members,
    roi_statistics,
)


def test_region_names_of_the_supported_atlases():
    hcpex = {
        382: "Putamen_L", 383: "Caudate_L", 385: "Globus_pallidus_externalis_L",
        386: "Globus_pallidus_internalis_L", 388: "Substantia_nigra_pars_compacta_L",
        361: "Thal_AnteroventralNucleus_L", 387: "Amygdala_L", 1: "V1_L",
    }  # fmt: skip
    assert roi_members(hcpex) == {1: [383], 2: [385, 386], 3: [382], 6: [388], 7: [361]}
    ho = roi_members(HOSPA_LABELS)
    assert ho == {1: [5, 16], 2: [7, 18], 3: [6, 17], 7: [4, 15], 18: [3, 14]}
    aal3 = {165: "Red_N_L", 161: "SN_pc_L", 163: "SN_pr_L", 75: "Caudate_L"}
    assert roi_members(aal3) == {1: [75], 4: [165], 6: [161, 163]}
    # the hippocampal dentate gyrus is not the cerebellar dentate nucleus
    assert roi_members({20: "GM_Hippocampus_dentate_gyrus_L", 7: "Dentate"}) == {5: [7]}
    assert parse_atlas("HOSPA:desc-th50") == ("HOSPA", "th50")
    with pytest.raises(ValueError, match="is not of the form"):
        parse_atlas("HOSPA:th50")


def test_canonical_labels_take_each_region_from_the_first_atlas_that_has_it():
    a = np.zeros((4, 4, 4), int)
    a[0] = 383  # caudate in the first atlas
    b = np.zeros((4, 4, 4), int)
    b[0:2] = 5  # caudate in the second atlas too (ignored: the first one has it)
    b[3] = 3  # lateral ventricle (only in the second)
    labels, sources = canonical_labels([(a, {383: "Caudate_L"}), (b, HOSPA_LABELS)])
    assert labels.dtype == np.uint8
    assert (labels[0] == 1).all() and (labels[1] == 0).all() and (labels[3] == 18).all()
    assert sources == {1: 0, 18: 1}
    with pytest.raises(ValueError, match="different grids"):
        canonical_labels([(a, {}), (np.zeros((2, 2, 2)), {})])


def test_roi_statistics_match_numpy():
    rng = np.random.default_rng(0)
    chi = rng.normal(0.05, 0.02, (10, 10, 10))
    labels = np.zeros((10, 10, 10), int)
    labels[2:5, 2:5, 2:5] = 1
    labels[6:9, 6:9, 6:9] = 18
    mask = np.ones_like(labels, bool)
    mask[2, 2, 2] = False
    rows = {r["roi"]: r for r in roi_statistics(chi, labels, mask)}
    assert list(rows) == list(ROIS.values())
    sel = (labels == 1) & mask
    assert rows["caudate"]["voxels"] == 26
    assert rows["caudate"]["mean"] == pytest.approx(chi[sel].mean(), rel=1e-12)
    assert rows["caudate"]["median"] == pytest.approx(np.median(chi[sel]), rel=1e-12)
    assert rows["caudate"]["std"] == pytest.approx(chi[sel].std(), rel=1e-12)
    assert rows["putamen"]["voxels"] == 0 and np.isnan(rows["putamen"]["mean"])


def test_reference_region_gives_zero_mean_in_the_ventricles():
    rng = np.random.default_rng(1)
    chi = rng.normal(0.02, 0.03, (12, 12, 12)).astype(np.float32)
    mask = np.zeros(chi.shape, bool)
    mask[1:11, 1:11, 1:11] = True
    labels = np.zeros(chi.shape, int)
    labels[4:8, 4:8, 4:8] = 18
    labels[0] = 18  # outside the mask: not part of the reference
    ref, offset, n = reference_region(chi * mask, labels, mask)
    assert n == 64
    assert offset == pytest.approx(chi[4:8, 4:8, 4:8].mean(), rel=1e-6)
    # float32 output: the mean over the region is 0 to rounding (~1e-9 ppm)
    assert abs(ref[labels == 18][mask[labels == 18]].mean()) < 1e-7
    assert (ref[~mask] == 0).all()
    np.testing.assert_allclose(ref[mask], (chi - offset)[mask], atol=1e-7)
    with pytest.raises(ValueError, match="no voxel inside the mask"):
        reference_region(chi, np.zeros(chi.shape, int), mask)
