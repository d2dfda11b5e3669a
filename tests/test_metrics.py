"""Metric code against analytic values: SSIM, NCC, MSE, Dice, det J statistics, EPE."""

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.metrics import structural_similarity

from dipreg.images import intensity_range, normalise
from dipreg.metrics import dice, endpoint_error, image_metrics, jacobian_statistics, mse, ncc, ssim
from dipreg.registration import result_from_displacement
from dipreg.transforms import Grid, displacement_image, jacobian_determinant


@pytest.fixture
def scaled(brain_slice):
    return normalise(sitk.GetArrayFromImage(brain_slice), intensity_range(brain_slice))


def test_ssim_of_an_image_with_itself_is_one(scaled):
    assert ssim(scaled, scaled) == pytest.approx(1.0)
    assert image_metrics(scaled, scaled) == {"ssim": pytest.approx(1.0), "ncc": pytest.approx(1.0), "mse": 0.0}


def test_ssim_uses_data_range_one_not_the_inflating_two(scaled, rng):
    noisy = np.clip(scaled + rng.normal(0, 0.1, scaled.shape), 0, 1).astype(np.float32)
    assert ssim(scaled, noisy) == pytest.approx(structural_similarity(scaled, noisy, data_range=1.0))
    assert ssim(scaled, noisy) < structural_similarity(scaled, noisy, data_range=2.0)


def test_ncc_is_invariant_to_linear_intensity_changes(scaled):
    assert ncc(scaled, 2 * scaled + 3) == pytest.approx(1.0)
    assert ncc(scaled, -scaled) == pytest.approx(-1.0)
    assert ncc(scaled, np.ones_like(scaled)) == 0.0


def test_mse_of_a_constant_offset():
    assert mse(np.zeros((4, 4)), np.full((4, 4), 0.5)) == pytest.approx(0.25)


def test_dice_of_known_overlaps():
    a = np.zeros((20, 20), dtype=int)
    b = np.zeros((20, 20), dtype=int)
    a[0:10, 0:10] = 1  # 100 voxels
    b[0:10, 5:15] = 1  # 100 voxels, 50 shared
    a[15:20, 15:20] = 2
    b[15:20, 15:20] = 2
    scores = dice(a, b)
    assert scores == {1: pytest.approx(0.5), 2: pytest.approx(1.0)}
    assert dice(a, np.zeros_like(b), [1]) == {1: 0.0}
    assert np.isnan(dice(a, b, [7])[7])  # absent from both maps


@pytest.mark.parametrize("matrix", [
    [[1.2, 0.1], [0.0, 0.9]],
    [[0.8, -0.3], [0.2, 1.1]],
    [[1.1, 0.05, 0.0], [-0.1, 0.95, 0.2], [0.0, 0.1, 1.05]],
])
def test_det_j_of_an_affine_field_is_the_determinant(matrix):
    matrix = np.array(matrix)
    ndim = len(matrix)
    shape = (7, 8, 9)[:ndim]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1])  # x first
    voxel = np.einsum("ij,j...->i...", matrix - np.eye(ndim), index.astype(float))
    det = jacobian_determinant(voxel)
    assert np.allclose(det, np.linalg.det(matrix))
    stats = jacobian_statistics(det)
    assert stats["jacobian_mean"] == pytest.approx(np.linalg.det(matrix))
    assert stats["jacobian_std"] == pytest.approx(0.0, abs=1e-12)
    assert stats["folding_percent"] == 0.0
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-12)


def test_det_j_of_an_affine_world_field_on_an_anisotropic_grid():
    grid = Grid((24, 20), (2.0, 0.5), (3.0, -1.0), (1.0, 0.0, 0.0, 1.0))
    fixed = grid.to_image(np.random.default_rng(0).random(grid.shape).astype(np.float32))
    matrix = np.array([[1.1, 0.2], [-0.1, 0.9]])
    world = np.stack(np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(grid.origin, grid.spacing, grid.size)],
                                 indexing="xy"))
    field = np.einsum("ij,j...->i...", matrix - np.eye(2), world)
    result = result_from_displacement(fixed, fixed, displacement_image(field, grid), {})
    assert np.allclose(sitk.GetArrayFromImage(result.jacobian), np.linalg.det(matrix), atol=1e-5)
    assert result.metrics["jacobian_mean"] == pytest.approx(np.linalg.det(matrix), abs=1e-5)


def test_sdlogj_and_folding_of_the_identity_are_zero():
    stats = jacobian_statistics(jacobian_determinant(np.zeros((3, 5, 6, 7))))
    assert stats == {"jacobian_mean": 1.0, "jacobian_std": 0.0, "jacobian_min": 1.0,
                     "folding_percent": 0.0, "sdlogj": 0.0}


def test_folding_percent_of_a_known_field():
    # phi_x = x + c(y) x: det J = 1 + c(y), -1 on the 16 rows where c = -2, 1 on the 48 others
    x = np.arange(32, dtype=float)[None, :].repeat(64, axis=0)
    c = np.where(np.arange(64) < 16, -2.0, 0.0)[:, None]
    voxel = np.stack([c * x, np.zeros_like(x)])
    det = jacobian_determinant(voxel)
    assert np.allclose(det[:16], -1.0) and np.allclose(det[16:], 1.0)
    stats = jacobian_statistics(det)
    assert stats["folding_percent"] == pytest.approx(25.0)
    assert stats["jacobian_min"] == pytest.approx(-1.0)
    assert stats["sdlogj"] == pytest.approx(0.0)  # log det J over the unfolded voxels only


def test_jacobian_statistics_of_given_values():
    stats = jacobian_statistics(np.array([[-1.0, 0.5], [2.0, 1.0]]))
    assert stats["jacobian_mean"] == pytest.approx(0.625)
    assert stats["folding_percent"] == pytest.approx(25.0)
    assert stats["sdlogj"] == pytest.approx(np.std(np.log([0.5, 2.0, 1.0])))


def test_endpoint_error_of_a_known_offset():
    truth = np.random.default_rng(0).normal(size=(2, 6, 5))
    estimated = truth + np.array([3.0, 4.0]).reshape(2, 1, 1)
    assert endpoint_error(estimated, truth) == pytest.approx(5.0)
    mask = np.zeros((6, 5), dtype=bool)
    mask[0, 0] = True
    estimated[:, 1:, :] = truth[:, 1:, :]
    assert endpoint_error(estimated, truth, mask) == pytest.approx(5.0)
    assert endpoint_error(estimated, truth) == pytest.approx(5.0 * 5 / 30)
