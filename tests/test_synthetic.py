"""Known-warp pairs: the numeric inverse, the endpoint error and the warped-back image."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import dipreg
from dipreg.errors import DipregError
from dipreg.images import resample_to_reference
from dipreg.synthetic import displacement_endpoint_error, foreground_mask, known_warp_pair, random_displacement
from dipreg.transforms import (
    Grid,
    compose_displacements,
    displacement_image,
    displacement_transform,
    invert_displacement,
)

BUNDLED_DATA = Path(dipreg.__file__).parent / "data"


@pytest.fixture(scope="module")
def pair(brain_slice):
    return known_warp_pair(brain_slice, max_displacement=8.0, smoothness=16.0, seed=3)


def _norm(field: sitk.Image) -> np.ndarray:
    return np.sqrt((sitk.GetArrayFromImage(field) ** 2).sum(axis=-1))


def test_random_displacement_is_seeded_and_scaled(brain_slice):
    a = random_displacement(brain_slice, 6.0, 16.0, seed=1)
    b = random_displacement(brain_slice, 6.0, 16.0, seed=1)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert _norm(a).max() == pytest.approx(6.0)
    assert a.GetSpacing() == brain_slice.GetSpacing() and a.GetSize() == brain_slice.GetSize()


def test_folding_random_field_is_refused(brain_slice):
    with pytest.raises(DipregError, match="folding"):
        random_displacement(brain_slice, 40.0, 4.0)


def test_inverse_of_constant_shift_is_the_opposite_shift(brain_slice):
    grid = Grid.from_image(brain_slice)
    shift = np.array([3.0, -2.0]).reshape(2, 1, 1) * np.ones((2, *grid.shape))
    inverse, residual = invert_displacement(displacement_image(shift, grid))
    assert residual < 1e-6
    assert np.allclose(sitk.GetArrayFromImage(inverse), [-3.0, 2.0])


def test_inverse_composed_with_forward_is_identity(pair):
    assert pair.inverse_residual < 1e-3
    # right inverse: y -> y + u(y) -> (y + u) + d(y + u) is the identity
    assert _norm(compose_displacements(pair.forward, pair.truth)).max() < 1e-3
    # checked again with SimpleITK's own transforms at points inside the image
    forward, inverse = displacement_transform(pair.forward), displacement_transform(pair.truth)
    rng = np.random.default_rng(0)
    for index in rng.integers(8, 56, size=(50, 2)):
        point = pair.fixed.TransformIndexToPhysicalPoint(index.tolist())
        assert np.allclose(forward.TransformPoint(inverse.TransformPoint(point)), point, atol=1e-3)
    # left inverse (approximately, through interpolation) in the interior
    left = _norm(compose_displacements(pair.truth, pair.forward))[8:-8, 8:-8]
    assert left.max() < 0.05 * _norm(pair.forward).max()


def test_truth_is_not_minus_forward(pair):
    minus_forward = displacement_image(-np.moveaxis(sitk.GetArrayFromImage(pair.forward), -1, 0),
                                       Grid.from_image(pair.forward))
    assert displacement_endpoint_error(minus_forward, pair.truth, pair.mask) > 0.01


def test_endpoint_error_of_the_truth_is_zero(pair):
    assert displacement_endpoint_error(pair.truth, pair.truth, pair.mask) == 0.0


def test_endpoint_error_of_a_known_offset(pair):
    grid = Grid.from_image(pair.truth)
    offset = np.moveaxis(sitk.GetArrayFromImage(pair.truth), -1, 0) + np.array([3.0, 4.0]).reshape(2, 1, 1)
    assert displacement_endpoint_error(displacement_image(offset, grid), pair.truth) == pytest.approx(5.0)
    zero = displacement_image(np.zeros((2, *grid.shape)), grid)
    mask = sitk.GetArrayFromImage(pair.mask).astype(bool)
    assert displacement_endpoint_error(zero, pair.truth, pair.mask) == pytest.approx(_norm(pair.truth)[mask].mean())


def test_endpoint_error_checks_grids(pair):
    with pytest.raises(DipregError, match="does not match"):
        displacement_endpoint_error(pair.truth, pair.truth, sitk.Shrink(pair.mask, [2, 2]))
    with pytest.raises(DipregError, match="empty"):
        displacement_endpoint_error(pair.truth, pair.truth, pair.mask * 0)


def test_moving_warped_back_by_the_truth_matches_fixed():
    # full resolution (1 mm): at 4 mm the double linear interpolation alone blurs too much
    fixed_image = sitk.Cast(sitk.ReadImage(str(BUNDLED_DATA / "r16slice.jpg")), sitk.sitkFloat32)
    full = known_warp_pair(fixed_image, max_displacement=8.0, smoothness=16.0, seed=1)
    minus_forward = displacement_image(-np.moveaxis(sitk.GetArrayFromImage(full.forward), -1, 0),
                                       Grid.from_image(full.forward))
    fixed = sitk.GetArrayFromImage(full.fixed)
    interior = sitk.GetArrayFromImage(sitk.BinaryErode(full.mask, [2, 2])).astype(bool)

    def error_after(field: sitk.Image) -> float:
        back = resample_to_reference(full.moving, full.fixed, displacement_transform(field))
        return float(np.abs(fixed - sitk.GetArrayFromImage(back))[interior].mean())

    before = np.abs(fixed - sitk.GetArrayFromImage(full.moving))[interior].mean()
    after = error_after(full.truth)
    assert after < 0.2 * before
    assert after < 0.015 * (fixed.max() - fixed.min())
    assert after < 0.8 * error_after(minus_forward)  # -d is only an approximation of the inverse


def test_foreground_mask_covers_the_head(brain_slice):
    mask = sitk.GetArrayFromImage(foreground_mask(brain_slice))
    assert set(np.unique(mask)) == {0, 1}
    assert 0.1 < mask.mean() < 0.9


def test_pair_saves_its_images(pair, tmp_path):
    paths = pair.save(tmp_path / "pair")
    assert sorted(paths) == ["fixed", "forward", "mask", "moving", "true_displacement"]
    truth = sitk.ReadImage(str(paths["true_displacement"]))
    assert np.allclose(sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(pair.truth))
    assert truth.GetSpacing() == pair.fixed.GetSpacing()


def test_inverse_of_a_3d_field_reports_its_residual():
    """In 3D the inverse converges and the reported residual is the largest vector of the
    composition of the field with its inverse."""
    volume = sitk.Image([48, 48, 48], sitk.sitkFloat32)
    volume.SetSpacing([2.0, 2.0, 2.0])
    forward = random_displacement(volume, max_displacement=6.0, smoothness=16.0, seed=1)
    inverse, residual = invert_displacement(forward)
    assert residual < 1e-3
    composed = compose_displacements(forward, inverse)
    assert np.sqrt((sitk.GetArrayFromImage(composed) ** 2).sum(axis=-1)).max() == pytest.approx(residual, rel=1e-6)
