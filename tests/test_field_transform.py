"""FieldTransform: composition order, exact inverse, affine file, label interpolation, landmarks.

Independent references: SimpleITK's CompositeTransform / TransformToDisplacementField and
ReadTransform, ANTsPy's apply_transforms and apply_transforms_to_points, analytic affine maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import rotation_direction, smooth_noise, with_geometry, world_points
from scipy import ndimage

import dipreg
from dipreg.engine import affine_displacement
from dipreg.field_transform import FieldTransform, affine_transform, exponentiate
from dipreg.landmarks import landmark_errors, read_landmarks
from dipreg.metrics import dice
from dipreg.registration import result_from_transform
from dipreg.synthetic import random_displacement
from dipreg.transforms import Grid, displacement_image, displacement_transform, identity_grid

#: A rotation by 12 degrees with anisotropic scaling and a shear-free translation, per dimension.
AFFINES = {
    2: (np.array([[1.08, -0.2], [0.2, 0.93]]), np.array([4.0, -3.0])),
    3: (np.array([[1.05, -0.15, 0.02], [0.15, 0.95, 0.0], [0.0, 0.03, 1.1]]), np.array([3.0, -2.0, 1.5])),
}


def random_velocity(grid: Grid, magnitude_mm: float, rng: np.random.Generator) -> sitk.Image:
    """A smooth random velocity field (mm) on ``grid`` (white noise smoothed by 3 voxels)."""
    components = [ndimage.gaussian_filter(rng.standard_normal(grid.shape), 3.0) for _ in range(grid.ndim)]
    field = np.stack(components)
    field *= magnitude_mm / np.abs(field).max()
    return displacement_image(field, grid)


def oblique_grid(ndim: int) -> Grid:
    if ndim == 2:
        return Grid((40, 36), (1.5, 0.8), (10.0, -5.0), rotation_direction(2, 30))
    return Grid((18, 20, 16), (1.2, 1.0, 0.9), (5.0, -3.0, 2.0), rotation_direction(3, 20))


@pytest.mark.parametrize("ndim", [2, 3])
def test_velocity_inverse_composed_with_forward_is_the_identity(ndim: int, rng: np.random.Generator) -> None:
    """exp(-v) then the inverse affine undoes affine o exp(v): |phi^-1(phi(p)) - p| < 0.05 mm."""
    grid = oblique_grid(ndim)
    coarse = grid.coarser(tuple(max(4, n // 2) for n in grid.shape))
    transform = FieldTransform(grid, affine_transform(*AFFINES[ndim]), random_velocity(coarse, 3.0, rng))
    interior = np.zeros(grid.shape, dtype=bool)
    interior[tuple(slice(3, n - 3) for n in grid.shape)] = True
    error = transform.inverse_consistency(interior)
    assert error["inverse_consistency_p95_mm"] < 0.05
    forward = transform.deformable_displacement
    assert np.abs(sitk.GetArrayFromImage(forward)).max() > 1.0  # a real deformation was inverted


def test_fixed_point_inverse_of_a_smooth_displacement(oblique_slice: sitk.Image) -> None:
    field = random_displacement(oblique_slice, max_displacement=4.0, smoothness=8.0, seed=3)
    transform = FieldTransform.from_displacement(field)
    interior = np.zeros(Grid.from_image(field).shape, dtype=bool)
    interior[6:-6, 6:-6] = True
    assert transform.inverse_consistency(interior)["inverse_consistency_p95_mm"] < 0.05


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_map_is_the_itk_composite_of_affine_and_field(ndim: int, rng: np.random.Generator) -> None:
    """phi(p) = A (p + u(p)) + b, with u read by SimpleITK's own DisplacementFieldTransform."""
    grid = oblique_grid(ndim)
    velocity = random_velocity(grid, 2.0, rng)
    matrix, translation = AFFINES[ndim]
    transform = FieldTransform(grid, affine_transform(matrix, translation), velocity)
    u = displacement_transform(exponentiate(velocity, 7))
    points = world_points(grid.to_image(np.zeros(grid.shape))).reshape(-1, ndim)[::7]
    expected = np.array([matrix @ np.asarray(u.TransformPoint(p.tolist())) + translation for p in points])
    np.testing.assert_allclose(transform.transform_points(points), expected, atol=1e-9)
    dense = sitk.GetArrayFromImage(transform.displacement_image()).reshape(-1, ndim)[:: 7]
    np.testing.assert_allclose(points + dense, expected, atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_normalised_affine_in_world_space(ndim: int, rng: np.random.Generator) -> None:
    """The engine's normalised affine (grid_sample units) and its world form move voxel centres alike."""
    grid = oblique_grid(ndim)
    matrix = np.eye(ndim) + 0.05 * rng.standard_normal((ndim, ndim))
    translation = 0.1 * rng.standard_normal(ndim)
    identity = identity_grid(grid.shape, dtype=torch.float64)
    moved_normalised = identity + affine_displacement(torch.from_numpy(matrix), torch.from_numpy(translation),
                                                      identity).movedim(1, -1)
    # normalised -> voxel index -> world, independently of Grid's matrices
    index = (moved_normalised[0].numpy() + 1) / 2 * (np.asarray(grid.size) - 1)
    expected = np.asarray(grid.origin) + index @ grid.index_to_world_matrix().T
    world_matrix, world_translation = grid.normalized_affine_to_world(matrix, translation)
    points = world_points(grid.to_image(np.zeros(grid.shape)))
    np.testing.assert_allclose(points @ world_matrix.T + world_translation, expected, atol=1e-9)


def affine_only_result(fixed: sitk.Image, matrix: np.ndarray, translation: np.ndarray) -> dipreg.RegistrationResult:
    """The result of an exactly known affine registration (``moving = fixed`` through its inverse)."""
    transform = FieldTransform(Grid.from_image(fixed), affine_transform(matrix, translation))
    moving = sitk.Resample(fixed, fixed, transform.inverse_sitk(), sitk.sitkLinear, 0.0)
    return result_from_transform(fixed, moving, transform, {})


def test_affine_file_is_read_back_by_simpleitk_and_ants(oblique_slice: sitk.Image, tmp_path: Path) -> None:
    """affine.mat holds the affine stage: SimpleITK's ReadTransform and ANTs' apply_transforms reproduce it."""
    ants = pytest.importorskip("ants")
    matrix, translation = AFFINES[2]
    result = affine_only_result(oblique_slice, matrix, translation)
    outdir = result.save(tmp_path / "out")
    read = sitk.ReadTransform(str(outdir / "affine.mat"))
    points = world_points(oblique_slice).reshape(-1, 2)[::37]
    np.testing.assert_allclose([read.TransformPoint(p.tolist()) for p in points], points @ matrix.T + translation,
                               atol=1e-6)
    sitk.WriteImage(result.moving, str(tmp_path / "moving.nii.gz"))
    sitk.WriteImage(result.fixed, str(tmp_path / "fixed.nii.gz"))
    by_ants = ants.apply_transforms(ants.image_read(str(tmp_path / "fixed.nii.gz")),
                                    ants.image_read(str(tmp_path / "moving.nii.gz")), [str(outdir / "affine.mat")])
    by_itk = sitk.Resample(result.moving, result.fixed, read, sitk.sitkLinear, 0.0)
    inside = ndimage.binary_erosion(sitk.GetArrayFromImage(by_itk) > 0, iterations=2)
    scale = float(sitk.GetArrayFromImage(by_itk).max())
    np.testing.assert_allclose(by_ants.numpy().T[inside], sitk.GetArrayFromImage(by_itk)[inside], atol=1e-3 * scale)


def test_inverse_displacement_maps_the_fixed_image_onto_the_moving_grid(oblique_slice: sitk.Image) -> None:
    """sitk.Resample(fixed, moving, DisplacementFieldTransform(inverse)) reproduces the moving image."""
    matrix, translation = AFFINES[2]
    result = affine_only_result(oblique_slice, matrix, translation)
    back = sitk.Resample(result.fixed, result.moving, result.inverse_transform, sitk.sitkLinear, 0.0)
    inside = ndimage.binary_erosion(sitk.GetArrayFromImage(result.moving) > 0, iterations=3)
    scale = float(sitk.GetArrayFromImage(result.moving).max())
    np.testing.assert_allclose(sitk.GetArrayFromImage(back)[inside], sitk.GetArrayFromImage(result.moving)[inside],
                               atol=1e-3 * scale)
    assert result.metrics["inverse_consistency_p95_mm"] < 1e-6


def test_align_affine_recovers_a_known_affine(oblique_slice: sitk.Image) -> None:
    """Only the affine stage moves a slice deformed by a known affine map back (matrix and offset)."""
    matrix = np.array([[1.06, -0.08], [0.08, 0.97]])
    centre = np.asarray(oblique_slice.TransformContinuousIndexToPhysicalPoint([31.5, 31.5]))
    translation = centre - matrix @ centre + np.array([2.0, -1.5])
    known = affine_only_result(oblique_slice, matrix, translation)
    result = dipreg.register(known.fixed, known.moving, iterations=1, learning_rate=1e-12, affine_iterations=400)
    found = result.field_transform.linear_transform()  # the start search and the affine stage together
    np.testing.assert_allclose(np.reshape(found.GetMatrix(), (2, 2)), matrix, atol=0.03)
    points = world_points(oblique_slice).reshape(-1, 2)[::50]
    mapped = np.array([found.TransformPoint(p.tolist()) for p in points])
    assert np.linalg.norm(mapped - (points @ matrix.T + translation), axis=1).mean() < 0.5


def test_label_interpolation_keeps_labels_and_beats_nearest_on_a_smooth_warp(rng: np.random.Generator) -> None:
    """A label map on a grid 2x coarser, warped by the known inverse of a smooth field: label-linear
    keeps the label set and its Dice against the truth is at least nearest neighbour's."""
    texture = smooth_noise((96, 96), 6.0, rng)
    fine = with_geometry(texture, (1.0, 1.0), (0.0, 0.0), rotation_direction(2, 0))
    truth = np.digitize(texture, [0.35, 0.5, 0.65]).astype(np.uint8) * 2  # labels 0, 2, 4, 6
    forward = random_displacement(fine, max_displacement=4.0, smoothness=10.0, seed=1)
    transform = FieldTransform.from_displacement(forward)
    fixed_labels = sitk.GetImageFromArray(truth)
    fixed_labels.CopyInformation(fine)
    # the moving labels: the truth carried by the inverse map, sampled on a 2x coarser grid
    coarse = sitk.Image([48, 48], sitk.sitkUInt8)
    coarse.SetSpacing((2.0, 2.0)), coarse.SetOrigin((0.5, 0.5))
    moving_labels = sitk.Resample(fixed_labels, coarse, transform.inverse_sitk(), sitk.sitkNearestNeighbor, 0)
    result = result_from_transform(fine, sitk.Cast(moving_labels, sitk.sitkFloat32), transform, {})
    scores = {}
    for interpolation in ("nearest", "label"):
        warped = result.apply(moving_labels, interpolation=interpolation)
        assert warped.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(warped)).tolist()) <= {0, 2, 4, 6}
        per_label = dice(truth, sitk.GetArrayFromImage(warped))
        scores[interpolation] = np.mean(list(per_label.values()))
    assert scores["label"] >= scores["nearest"]
    assert 0.8 < scores["nearest"] < 1.0


def test_landmark_tre_of_a_known_affine_on_an_oblique_slice(oblique_slice: sitk.Image) -> None:
    """Fixed landmarks p, moving landmarks q = A p + b + e: TRE after = |e|, before = |p - q|."""
    matrix, translation = AFFINES[2]
    result = affine_only_result(oblique_slice, matrix, translation)
    points = world_points(oblique_slice).reshape(-1, 2)[::211][:6]
    offsets = np.array([[0.5, 0.0], [0.0, -1.0], [0.3, 0.4], [0.0, 0.0], [-2.0, 0.0], [1.0, 1.0]])
    moving_points = points @ matrix.T + translation + offsets
    summary = result.score_landmarks(points, moving_points)
    assert summary["tre_after_mean_mm"] == pytest.approx(np.linalg.norm(offsets, axis=1).mean(), abs=1e-6)
    assert summary["tre_after_max_mm"] == pytest.approx(2.0, abs=1e-6)
    assert summary["tre_before_mean_mm"] == pytest.approx(np.linalg.norm(points - moving_points, axis=1).mean())
    assert len(result.landmarks) == 6 and result.landmarks[4]["tre_after_mm"] == pytest.approx(2.0, abs=1e-6)


def test_landmark_files_csv_fcsv_and_markups_json(tmp_path: Path) -> None:
    """CSV is LPS as written; Slicer files in RAS are converted (x and y change sign)."""
    (tmp_path / "p.csv").write_text("x,y,z\n1,2,3\n-4.5,5,6\n")
    (tmp_path / "bare.csv").write_text("1,2,3\n-4.5,5,6\n")
    (tmp_path / "p.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
                                     "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                     "vtkMRMLMarkupsFiducialNode_0,-1,-2,3,0,0,0,1,1,1,0,F-1,,\n"
                                     "vtkMRMLMarkupsFiducialNode_1,4.5,-5,6,0,0,0,1,1,1,0,F-2,,\n")
    markups = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                            "controlPoints": [{"position": [-1, -2, 3]}, {"position": [4.5, -5, 6]}]}]}
    (tmp_path / "p.mrk.json").write_text(json.dumps(markups))
    expected = np.array([[1, 2, 3], [-4.5, 5, 6]], dtype=float)
    for name in ("p.csv", "bare.csv", "p.fcsv", "p.mrk.json"):
        np.testing.assert_allclose(read_landmarks(tmp_path / name, 3), expected, err_msg=name)
    np.testing.assert_allclose(read_landmarks(tmp_path / "p.csv", 2), expected[:, :2])


def test_landmark_counts_must_match() -> None:
    with pytest.raises(dipreg.DipregError, match="correspond"):
        landmark_errors(np.zeros((3, 2)), np.zeros((2, 2)), np.zeros((3, 2)))
