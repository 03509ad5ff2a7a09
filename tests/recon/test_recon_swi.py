"""SWI, minIP and SMWI (qsmprep.recon.swi): closed forms, geometry, and vein contrast.

The contrast bounds were written before any measurement, from the targets of the issue:
on the simulated 2 mm head, veins are at least 20 % darker than the white matter around them
in the SWI, and the phase mask adds at least 10 % to the vein/WM contrast of the plain
combined magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmprep.recon import swi as S
from qsmprep.sim.phantom import TISSUE_PROPERTIES

VEIN, WM, GP = 11, 8, 2


# --------------------------------------------------------------------------------------------
# closed forms


def test_phase_mask_closed_form():
    phi = np.array([-3.0, -1.0, 0.0, np.pi / 4, np.pi / 2, np.pi, 4.0], np.float32)
    expected = [1.0, 1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    np.testing.assert_allclose(S.phase_mask(phi), expected, atol=1e-6)


def test_smwi_mask_closed_form():
    chi = np.array([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0], np.float32)
    np.testing.assert_allclose(S.smwi_mask(chi, 1.0, 1), [1, 1, 1, 1, 0.75, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(S.smwi_mask(chi, 0.5, -1), [0, 0, 0.5, 1, 1, 1, 1, 1], atol=1e-6)
    mag = np.full((2, 2, 2), 2.0, np.float32)
    c = np.zeros((2, 2, 2), np.float32)
    c[0, 0, 0], c[1, 1, 1] = 0.5, -0.5
    para, dia = S.smwi(mag, c, threshold=1.0, power=4)
    assert para[0, 0, 0] == pytest.approx(2 * 0.5**4) and para[1, 1, 1] == 2.0
    assert dia[1, 1, 1] == pytest.approx(2 * 0.5**4) and dia[0, 0, 0] == 2.0
    with pytest.raises(ValueError, match="threshold must be positive"):
        S.smwi_mask(chi, 0.0)


def test_magnitude_combinations():
    m = np.stack([np.full((3, 3, 3), v, np.float32) for v in (3.0, 4.0)], -1)
    np.testing.assert_allclose(S.combine_swi_magnitude(m), 5.0)
    np.testing.assert_allclose(S.combine_swi_magnitude(m, [0.01, 0.03], "te"), 3.75)
    with pytest.raises(ValueError, match="combination"):
        S.combine_swi_magnitude(m, method="mean")


def test_high_pass_removes_constants_and_honours_voxel_size():
    shape = (40, 30, 20)
    mask = np.zeros(shape, bool)
    mask[5:35, 4:26, 3:17] = True
    hp = S.high_pass_field(np.full(shape, 7.0, np.float32), mask, (1.0, 1.5, 2.0), 4.0)
    assert np.abs(hp).max() < 1e-4  # normalised smoothing keeps a constant, to its edge
    assert np.all(hp[~mask] == 0)
    # a point source: its high-pass spreads over sigma_mm, the same in mm along every axis
    f = np.zeros(shape, np.float32)
    f[20, 15, 10] = 1.0
    hp = S.high_pass_field(f, np.ones(shape, bool), (1.0, 1.5, 2.0), 3.0)
    profile = [hp[20 + 6, 15, 10], hp[20, 15 + 4, 10], hp[20, 15, 10 + 3]]  # 6 mm away
    np.testing.assert_allclose(profile, profile[0], rtol=1e-3)
    assert profile[0] < 0 and hp[20, 15, 10] > 0.9


# --------------------------------------------------------------------------------------------
# minIP geometry


def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


@pytest.mark.parametrize("oblique", [False, True])
def test_minip_matches_brute_force_and_places_slab_centres(oblique):
    rng = np.random.default_rng(0)
    vol = rng.random((12, 10, 9)).astype(np.float32)
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    affine[:3, 3] = (-6.0, -5.0, -9.0)
    if oblique:  # rotate 20 degrees about x: array axis 2 is still the one closest to z
        c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
        affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ affine[:3, :3]
    out, new, info = S.min_intensity_projection(vol, affine, slab_mm=8.0)
    assert info == {"axis": 2, "slices": 4, "slab_mm": 8.0}
    assert out.shape == (12, 10, 6)
    brute = np.stack([vol[:, :, j : j + 4].min(-1) for j in range(6)], -1)
    np.testing.assert_array_equal(out, brute)
    for j in range(6):  # output voxel j sits at the centre of input slices j .. j + 3
        centre = np.mean([_world(affine, (3, 4, j + k)) for k in range(4)], 0)
        np.testing.assert_allclose(_world(new, (3, 4, j)), centre, atol=1e-9)
    np.testing.assert_allclose(new[:3, :3], affine[:3, :3])


def test_minip_axis_follows_world_z_and_clips_the_slab():
    # sagittal slices: world z runs along array axis 0
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1]])
    vol = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    assert S.slab_axis(affine) == 0
    out, new, info = S.min_intensity_projection(vol, affine, slab_mm=3.0)
    assert info["axis"] == 0 and info["slices"] == 2 and out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out, vol[:4])
    assert new[2, 3] == pytest.approx(0.75)
    out, new, info = S.min_intensity_projection(vol, affine, slab_mm=100.0)
    assert info["slices"] == 5 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0], vol.min(0))
    assert new[2, 3] == pytest.approx(3.0)  # centre of slices 0..4 at 1.5 mm


# --------------------------------------------------------------------------------------------
# contrast on the simulated head


@pytest.fixture(scope="module")
def swi2mm(phantom2mm, gre2mm):
    # the total field as the field chain gives it: in the brain mask, 0 elsewhere
    brain = phantom2mm.brain_mask
    field = np.where(brain, gre2mm.total_field_hz, 0.0)
    return S.swi(gre2mm.magnitude, field, brain, phantom2mm.voxel_size, gre2mm.echo_times)


def _vein_and_wm(labels, voxel_size, brain, near_mm=6.0):
    vein = (labels == VEIN) & brain
    dist = ndi.distance_transform_edt(~vein, sampling=voxel_size)
    wm = (labels == WM) & (dist <= near_mm)
    return vein, wm


def _ratios(phantom, image, mag):
    vein, wm = _vein_and_wm(phantom.labels, phantom.voxel_size, phantom.brain_mask)
    assert vein.sum() > 100 and wm.sum() > 1000
    swi_ratio = image[vein].mean() / image[wm].mean()
    mag_ratio = mag[vein].mean() / mag[wm].mean()
    print(f"vein/WM: SWI {swi_ratio:.3f}, combined magnitude {mag_ratio:.3f}")
    return swi_ratio, mag_ratio


# Why our phantom misses these bounds (the SWI itself meets them on the outside forward model's
# data: tests/recon/test_chain_shared.py, vein/WM 0.509-0.591 and 0.78-0.87 x the magnitude's):
# - its magnitude is proton-density weighted: venous blood (M0 0.80) starts brighter than white
#   matter (0.70), where a spoiled GRE saturates blood's long T1 (the outside data: vein/WM
#   S0 0.92, CSF/WM 0.65 at 5 ms). With the vein M0 at 0.92 x WM's, the SWI ratio measured
#   0.755 and the magnitude's 0.791 (scratch run, same fixture);
# - most of its veins (sinuses, internal cerebral veins) run across B0, where the field inside
#   is negative and the positive-phase mask leaves them alone (76 % of vein voxels have a
#   negative local field): the phase mask's gain stayed 0.954 x in either case;
# - intravoxel dephasing, absent from the simulator, is a small part: a 1 mm simulation
#   averaged to 2 mm gave 0.870 (SWI) and 0.963 x.
_PHANTOM_CAUSE = (
    "the phantom's magnitude is proton-density weighted (veins start brighter than white "
    "matter) and most of its veins lie across B0, where the positive-phase mask leaves them "
    "alone (76 % of vein voxels have a negative local field)"
)


@pytest.mark.xfail(
    strict=True, reason=f"measured vein/WM SWI ratio 0.896 (bound 0.8): {_PHANTOM_CAUSE}"
)
def test_swi_veins_darker_than_white_matter(phantom2mm, swi2mm):
    swi_ratio, _ = _ratios(phantom2mm, *swi2mm)
    assert swi_ratio <= 0.8


@pytest.mark.xfail(
    strict=True,
    reason="measured vein/WM ratio 0.896 in the SWI against 0.939 in the combined magnitude "
    f"(0.954 x, bound 0.9 x): {_PHANTOM_CAUSE}",
)
def test_phase_mask_adds_vein_contrast(phantom2mm, swi2mm):
    swi_ratio, mag_ratio = _ratios(phantom2mm, *swi2mm)
    assert swi_ratio <= 0.9 * mag_ratio


def test_swi_is_the_magnitude_outside_the_brain(phantom2mm, swi2mm):
    image, mag = swi2mm
    outside = ~phantom2mm.brain_mask
    np.testing.assert_array_equal(image[outside], mag[outside])
    assert np.all(image <= mag + 1e-6)


def test_smwi_darkens_veins_and_iron(phantom2mm, swi2mm):
    _, mag = swi2mm
    brain = phantom2mm.brain_mask
    chi = np.where(brain, phantom2mm.chi, 0.0)
    para, dia = S.smwi(mag, chi, threshold=1.0, power=4)
    labels = phantom2mm.labels
    for label, bound in ((VEIN, 0.3), (GP, 0.6)):
        sel = (labels == label) & brain
        ratio = para[sel].mean() / mag[sel].mean()
        closed = (1 - TISSUE_PROPERTIES[label][0]) ** 4
        print(f"label {label}: SMWI para/magnitude {ratio:.3f} (pure tissue {closed:.3f})")
        assert ratio <= bound
    wm = (labels == WM) & brain
    assert para[wm].mean() / mag[wm].mean() >= 0.97  # WM is diamagnetic: hardly touched
    assert dia[wm].mean() / mag[wm].mean() < 0.97
