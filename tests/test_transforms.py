"""Grid conversions, torch warping against SimpleITK, Jacobians and velocity integration."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import rotation_direction, smooth_noise, with_geometry, world_points
from scipy import ndimage

from dipreg.transforms import (
    Grid,
    displacement_image,
    displacement_transform,
    gaussian_smooth,
    identity_grid,
    integrate_velocity,
    jacobian_determinant,
    resize_field,
    voxel_displacement_from_image,
    warp,
)

#: (array shape, spacing, origin, direction) of oblique anisotropic test grids.
OBLIQUE = {
    2: ((40, 48), (1.5, 0.8), (10.0, -5.0), rotation_direction(2, 30)),
    3: ((14, 16, 18), (1.2, 0.7, 1.6), (-4.0, 7.0, 3.0), rotation_direction(3, 30)),
}


def oblique_image(ndim: int, array: np.ndarray | None = None) -> sitk.Image:
    """An image on the oblique grid of :data:`OBLIQUE` (zeros unless ``array`` is given)."""
    shape, spacing, origin, direction = OBLIQUE[ndim]
    return with_geometry(np.zeros(shape) if array is None else array, spacing, origin, direction)


def to_tensor(field: np.ndarray) -> torch.Tensor:
    """``[ndim, *spatial]`` array to a ``[1, ndim, *spatial]`` float64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(field, dtype=np.float64))[None]


@pytest.mark.parametrize("ndim", [2, 3])
def test_world_and_normalized_conversions_invert_each_other(ndim: int, rng: np.random.Generator) -> None:
    """normalized_to_world(world_to_normalized(u)) == u on an oblique anisotropic grid."""
    grid = Grid.from_image(oblique_image(ndim))
    field = torch.from_numpy(rng.standard_normal((2, ndim, *grid.shape)))
    there_and_back = grid.normalized_to_world(grid.world_to_normalized(field))
    assert torch.allclose(there_and_back, field, atol=1e-12)
    back_and_there = grid.world_to_normalized(grid.normalized_to_world(field))
    assert torch.allclose(back_and_there, field, atol=1e-12)


@pytest.mark.parametrize(
    "direction, world, expected",
    [
        # identity direction: 2 mm along x = 1 voxel of 2 mm = 2/(5-1) normalised units
        ((1.0, 0.0, 0.0, 1.0), (2.0, 0.0), (0.5, 0.0)),
        # 0.5 mm along y = 1 voxel of 0.5 mm = 2/(9-1) normalised units
        ((1.0, 0.0, 0.0, 1.0), (0.0, 0.5), (0.0, 0.25)),
        # index axis x points along world +y: 2 mm along world y is one x voxel
        ((0.0, -1.0, 1.0, 0.0), (0.0, 2.0), (0.5, 0.0)),
        # index axis y points along world -x: 0.5 mm along world -x is one y voxel
        ((0.0, -1.0, 1.0, 0.0), (-0.5, 0.0), (0.0, 0.25)),
    ],
)
def test_world_to_normalized_hand_values(direction: tuple[float, ...], world: tuple[float, float],
                                         expected: tuple[float, float]) -> None:
    """Known mm displacements on a 5 x 9 grid with 2 x 0.5 mm spacing, plain and rotated by 90 degrees."""
    grid = Grid(size=(5, 9), spacing=(2.0, 0.5), origin=(3.0, -1.0), direction=direction)
    field = torch.tensor(world, dtype=torch.float64).view(1, 2, 1, 1)
    assert grid.world_to_normalized(field).flatten().tolist() == pytest.approx(expected, abs=1e-12)
    voxels = grid.normalized_to_voxel(grid.world_to_normalized(field)).flatten().tolist()
    assert voxels == pytest.approx([e * (n - 1) / 2 for e, n in zip(expected, grid.size)], abs=1e-12)
    assert sorted(voxels) == pytest.approx([0.0, 1.0])  # every case is exactly one voxel


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_grid_matches_voxel_positions(ndim: int) -> None:
    """Channel 0 of the identity grid runs along the last array axis from -1 to 1."""
    shape = (3, 4, 5)[-ndim:]
    grid = identity_grid(shape)
    assert grid.shape == (1, *shape, ndim)
    index = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1]
    for c in range(ndim):
        expected = 2.0 * index[c] / (shape[ndim - 1 - c] - 1) - 1.0
        assert np.allclose(grid[0, ..., c].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_torch_warp_of_mm_field_equals_simpleitk_resample(ndim: int, rng: np.random.Generator) -> None:
    """warp(image, Grid.world_to_normalized(u)) == sitk.Resample with DisplacementFieldTransform(u).

    The grid is anisotropic, oblique and off the origin, so a wrong axis order, spacing or
    direction in the conversion moves the samples. Voxels whose sample point lies near the
    image border are skipped (torch pads with the border value, SimpleITK with 0).
    """
    shape = OBLIQUE[ndim][0]
    image = oblique_image(ndim, smooth_noise(shape, 2.0, rng))
    # smooth world field with up to about 2.5 mm per component
    world = np.stack([2.5 * (2 * smooth_noise(shape, 3.0, rng) - 1) for _ in range(ndim)])
    grid = Grid.from_image(image)

    field_image = displacement_image(world, grid)
    expected = sitk.GetArrayFromImage(
        sitk.Resample(image, image, displacement_transform(field_image), sitk.sitkLinear, 0.0, sitk.sitkFloat64))

    moving = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float64))[None, None]
    normalized = grid.world_to_normalized(to_tensor(world))
    actual = warp(moving, normalized, identity_grid(grid.shape, dtype=torch.float64))[0, 0].numpy()

    points = world_points(image) + np.moveaxis(world, 0, -1)
    index = (points - np.asarray(grid.origin)) @ np.linalg.inv(grid.index_to_world_matrix()).T
    inside = np.all((index > 0.5) & (index < np.asarray(grid.size) - 1.5), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(actual[inside], expected[inside], atol=1e-6)
    assert np.abs(world).max() > 1.0  # the check is not trivially an identity warp


@pytest.mark.parametrize("ndim", [2, 3])
def test_voxel_displacement_from_image_undoes_spacing_and_direction(ndim: int, rng: np.random.Generator) -> None:
    """A field of exactly one voxel step along each index axis in turn reads back as that voxel step."""
    image = oblique_image(ndim)
    grid = Grid.from_image(image)
    matrix = grid.index_to_world_matrix()
    for axis in range(ndim):
        world = np.broadcast_to(matrix[:, axis].reshape(ndim, *[1] * ndim), (ndim, *grid.shape))
        voxels = voxel_displacement_from_image(displacement_image(world, grid))
        expected = np.zeros(ndim)
        expected[axis] = 1.0
        assert np.allclose(np.moveaxis(voxels, 0, -1), expected, atol=1e-12)


AFFINE_MATRICES = {
    2: [np.array([[1.2, 0.3], [-0.1, 0.9]]), np.array([[0.7, 0.0], [0.0, 1.5]])],
    3: [np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.05, 0.0, 1.3]]), np.diag([0.5, 1.0, 2.0])],
}


@pytest.mark.parametrize("ndim, case", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_jacobian_of_affine_field_in_voxel_units(ndim: int, case: int) -> None:
    """u(i) = (A - I) i in voxel index space has det(J) = det(A) everywhere, borders included."""
    a = AFFINE_MATRICES[ndim][case]
    shape = (6, 7, 8)[-ndim:]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1])  # [ndim(x,y,z), *shape]
    voxel_field = np.einsum("ij,j...->i...", a - np.eye(ndim), index.astype(float))
    det = jacobian_determinant(voxel_field)
    assert det.shape == shape
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-10)


@pytest.mark.parametrize("ndim, case", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_jacobian_of_affine_field_in_world_units(ndim: int, case: int) -> None:
    """u(p) = (B - I)(p - c) in mm on an oblique anisotropic grid has det(J) = det(B).

    B is not diagonal in the grid's index axes, so treating mm as voxels, or ignoring the
    direction, gives another determinant.
    """
    b = AFFINE_MATRICES[ndim][case]
    image = oblique_image(ndim)
    centre = np.full(ndim, 2.0)
    world = np.einsum("ij,...j->i...", b - np.eye(ndim), world_points(image) - centre)
    det = jacobian_determinant(voxel_displacement_from_image(displacement_image(world, Grid.from_image(image))))
    np.testing.assert_allclose(det, np.linalg.det(b), rtol=1e-9)


def test_jacobian_of_zero_field_is_one() -> None:
    """No displacement, no volume change."""
    assert np.array_equal(jacobian_determinant(np.zeros((3, 4, 5, 6))), np.ones((4, 5, 6)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrate_zero_velocity_is_zero(ndim: int) -> None:
    """exp(0) is the identity."""
    shape = (9, 10, 11)[-ndim:]
    out = integrate_velocity(torch.zeros(1, ndim, *shape), identity_grid(shape))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrate_constant_velocity_is_the_translation(ndim: int) -> None:
    """A constant velocity integrates to the same constant displacement (a translation)."""
    shape = (9, 10, 11)[-ndim:]
    constant = torch.tensor([0.3, -0.2, 0.1][:ndim]).view(1, ndim, *[1] * ndim)
    velocity = constant.expand(1, ndim, *shape).contiguous()
    out = integrate_velocity(velocity, identity_grid(shape), steps=7)
    assert torch.allclose(out, velocity, atol=1e-6)


def test_scaling_and_squaring_keeps_a_large_smooth_field_invertible(rng: np.random.Generator) -> None:
    """exp(v) of a smooth velocity of several voxels has det(J) > 0 where v itself as a displacement folds."""
    shape = (64, 64)
    voxel_velocity = np.stack([smooth_noise(shape, 5.0, rng) - 0.5 for _ in range(2)])
    voxel_velocity *= 8.0 / np.abs(voxel_velocity).max()  # up to 8 voxels
    assert jacobian_determinant(voxel_velocity).min() < 0  # as a plain displacement it folds

    to_normalized = np.array([2.0 / (shape[1] - 1), 2.0 / (shape[0] - 1)]).reshape(2, 1, 1)
    velocity = torch.from_numpy(voxel_velocity * to_normalized).float()[None]
    displacement = integrate_velocity(velocity, identity_grid(shape), steps=7)[0].numpy()
    det = jacobian_determinant(displacement / to_normalized)
    assert det.min() > 0


def test_resize_field_keeps_normalised_values() -> None:
    """A linear normalised field resampled to another grid shape is the same function."""
    coarse = identity_grid((5, 7))[0].permute(2, 0, 1)[None] * 0.1  # u = 0.1 x
    fine = resize_field(coarse, (9, 13))
    expected = identity_grid((9, 13))[0].permute(2, 0, 1)[None] * 0.1
    assert fine.shape == (1, 2, 9, 13)
    assert torch.allclose(fine, expected, atol=1e-6)


def test_displacement_transform_leaves_the_field_image_intact() -> None:
    """Building a transform does not consume the image (SimpleITK's constructor empties its argument)."""
    field = sitk.GetImageFromArray(np.ones((5, 6, 2)), isVector=True)
    transform = displacement_transform(field)
    assert field.GetSize() == (6, 5)
    assert np.array_equal(sitk.GetArrayFromImage(field), np.ones((5, 6, 2)))
    assert transform.TransformPoint((1.0, 2.0)) == pytest.approx((2.0, 3.0))


@pytest.mark.parametrize("shape, sigma", [((23, 31), 1.0), ((23, 31), 2.5), ((9, 14, 11), 1.5)])
def test_gaussian_smooth_matches_scipy(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> None:
    """The separable smoothing equals scipy's gaussian_filter with the same truncation (3 sigma)
    and edge handling (``nearest`` = replicate), channel by channel."""
    field = rng.standard_normal((1, 2, *shape))
    smoothed = gaussian_smooth(torch.as_tensor(field, dtype=torch.float64), sigma).numpy()
    for channel in range(2):
        expected = ndimage.gaussian_filter(field[0, channel], sigma, mode="nearest", truncate=3.0)
        np.testing.assert_allclose(smoothed[0, channel], expected, atol=1e-10)


def test_gaussian_smooth_keeps_constants_and_zero_sigma_is_the_identity() -> None:
    field = torch.full((1, 3, 6, 7, 8), 2.5)
    torch.testing.assert_close(gaussian_smooth(field, 1.7), field)
    varying = torch.arange(24.0).reshape(1, 1, 4, 6)
    assert gaussian_smooth(varying, 0.0) is varying
