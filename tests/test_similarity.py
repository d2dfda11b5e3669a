"""Multi-modal, masked and misaligned registration: mutual information recovers a known warp
across a contrast change, a mask keeps a lesion out of the similarity, ``--init search``
recovers large rotations, ``--transform rigid|affine`` writes the usual outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import dipreg
from dipreg.cli import main
from dipreg.registration import OUTPUT_FILES
from dipreg.synthetic import displacement_endpoint_error, known_warp_pair

FAST = dict(preset="fast", threads=1)


def remapped(image: sitk.Image) -> sitk.Image:
    """A non-monotonic intensity remapping plus a bias field: sin(3x) of the image scaled to
    [0, 1] (background stays dark, grey matter becomes brighter than white matter), times a
    linear ramp from 0.7 to 1.3 across the image."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    x = (array - array.min()) / (array.max() - array.min())
    ramp = np.linspace(0.7, 1.3, array.shape[1])[None, :]
    out = sitk.GetImageFromArray((np.sin(3.0 * x) * ramp).astype(np.float32))
    out.CopyInformation(image)
    return out


def test_mutual_information_recovers_a_warp_across_a_contrast_change(brain_slice: sitk.Image,
                                                                      record_property) -> None:
    """Known warp of a real slice registered onto an intensity-remapped copy of itself: MI brings
    the endpoint error below half the identity's; MAE, which compares intensities, does not."""
    pair = known_warp_pair(brain_slice, max_displacement=8.0, smoothness=16.0, seed=3)
    fixed = remapped(pair.fixed)
    truth = sitk.GetArrayFromImage(pair.truth)[sitk.GetArrayViewFromImage(pair.mask) != 0]
    identity = float(np.sqrt((truth**2).sum(axis=-1)).mean())
    errors = {}
    for loss in ("mi", "mae", "lncc"):
        result = dipreg.register(fixed, pair.moving, loss=loss, affine=False, **FAST)
        errors[loss] = displacement_endpoint_error(result.displacement, pair.truth, pair.mask)
    record_property("epe_mm", {"identity": identity, **errors})
    assert errors["mi"] < 0.5 * identity, (identity, errors)
    assert errors["mae"] > 0.5 * identity, (identity, errors)


def lesion_pair(brain_slice: sitk.Image):
    """A known warp of the slice and, in the moving image only, a bright disc (a lesion) of
    radius 4 voxels; the mask (1 = use) leaves out the disc and a 1-voxel margin. Also the
    regions scored on the fixed grid (the warp moves the lesion by at most 2 voxels): the
    lesion (radius 5), the lesion and around it (radius 9) and the rest of the foreground."""
    pair = known_warp_pair(brain_slice, max_displacement=8.0, smoothness=16.0, seed=5)
    moving = sitk.GetArrayFromImage(pair.moving)
    yy, xx = np.mgrid[: moving.shape[0], : moving.shape[1]]
    distance = np.hypot(yy - 30, xx - 24)
    foreground = sitk.GetArrayFromImage(pair.mask) != 0

    def image(array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(pair.moving)
        return out

    lesioned = image(np.where(distance <= 4, moving.max() * 1.5, moving).astype(np.float32))
    mask = image((distance > 5).astype(np.uint8))
    regions = {"near": image(((distance <= 9) & foreground).astype(np.uint8)),
               "far": image(((distance > 9) & foreground).astype(np.uint8))}
    return pair, lesioned, mask, regions, distance <= 5


def test_moving_mask_keeps_the_field_smooth_at_a_lesion(brain_slice: sitk.Image, record_property) -> None:
    """Without the mask the lesion pulls the field: the error near it grows and det J varies in
    it. With the lesion masked the field in it is as smooth as without a lesion, the error
    outside matches the lesion-free registration and the error near it is less than half as
    far from it as the unmasked one's."""
    pair, lesioned, mask, regions, lesion = lesion_pair(brain_slice)
    runs = {"clean": dipreg.register(pair.fixed, pair.moving, **FAST),
            "lesion": dipreg.register(pair.fixed, lesioned, **FAST),
            "masked": dipreg.register(pair.fixed, lesioned, moving_mask=mask, **FAST)}
    error = {name: {region: displacement_endpoint_error(run.displacement, pair.truth, where)
                    for region, where in regions.items()} for name, run in runs.items()}
    det_std = {name: float(sitk.GetArrayFromImage(run.jacobian)[lesion].std()) for name, run in runs.items()}
    record_property("epe_mm", error)
    record_property("det_j_std_in_lesion", det_std)
    clean, lesioned_error, masked = error["clean"], error["lesion"], error["masked"]
    assert lesioned_error["near"] > clean["near"] + 0.5 and det_std["lesion"] > 2 * det_std["clean"], (error, det_std)
    assert masked["far"] < clean["far"] + 0.15, error
    assert masked["near"] - clean["near"] < 0.5 * (lesioned_error["near"] - clean["near"]), error
    assert det_std["masked"] < det_std["clean"] + 0.05, det_std


def index_map_matrix(fixed: sitk.Image, moving_array_of, ndim: int) -> np.ndarray:
    """The world-space linear map fixed point -> moving point of a moving image made by an array
    operation (``moving_array_of``) on the fixed array, with the fixed header: where each
    fixed voxel's index ends up, fitted by least squares."""
    shape = tuple(reversed(fixed.GetSize()))
    indices = np.indices(shape).reshape(ndim, -1)
    labels = np.arange(indices.shape[1]).reshape(shape)
    moved = moving_array_of(labels)
    moving_index = np.argwhere(np.ones(shape, bool))  # array order, same order as moved.ravel()
    fixed_index = indices[:, moved.ravel()].T
    def world(index_array_order: np.ndarray) -> np.ndarray:
        return np.array([fixed.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in index_array_order])
    sample = slice(None, None, max(1, len(moving_index) // 400))
    p, q = world(fixed_index[sample]), world(moving_index[sample])
    design = np.hstack([p, np.ones((len(p), 1))])
    solution = np.linalg.lstsq(design, q, rcond=None)[0]
    return solution[:ndim].T


def rotation_error_degrees(estimated: np.ndarray, truth: np.ndarray) -> float:
    """Angle of the rotation between the estimated linear map's rotation part and the true one."""
    u, _, vt = np.linalg.svd(estimated)
    relative = (u @ vt).T @ truth
    ndim = len(truth)
    cos = (np.trace(relative) - (ndim - 2)) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


@pytest.mark.parametrize("quarter_turns", [1, 2])
def test_search_recovers_a_rotated_slice(brain_slice: sitk.Image, quarter_turns: int) -> None:
    turn = lambda array: np.rot90(array, quarter_turns).copy()  # noqa: E731
    moving = sitk.GetImageFromArray(turn(sitk.GetArrayFromImage(brain_slice)))
    moving.CopyInformation(brain_slice)
    truth = index_map_matrix(brain_slice, turn, 2)
    result = dipreg.register(brain_slice, moving, transform="rigid", init="search", threads=1)
    estimated = np.reshape(result.field_transform.linear_transform().GetMatrix(), (2, 2))
    assert rotation_error_degrees(estimated, truth) < 5.0
    centers = dipreg.register(brain_slice, moving, transform="rigid", init="centers", threads=1)
    assert rotation_error_degrees(np.reshape(centers.field_transform.linear_transform().GetMatrix(), (2, 2)), truth) > 45.0


def test_search_recovers_an_axis_flipped_volume(brain_volume: sitk.Image) -> None:
    """The volume's array flipped along two axes (a half turn, on an oblique grid) with its header kept."""
    flip = lambda array: np.flip(array, (0, 1)).copy()  # noqa: E731
    moving = sitk.GetImageFromArray(flip(sitk.GetArrayFromImage(brain_volume)))
    moving.CopyInformation(brain_volume)
    truth = index_map_matrix(brain_volume, flip, 3)
    result = dipreg.register(brain_volume, moving, transform="affine", init="search", threads=1)
    estimated = np.reshape(result.field_transform.linear_transform().GetMatrix(), (3, 3))
    assert rotation_error_degrees(estimated, truth) < 5.0


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_linear_transform_writes_the_usual_outputs(tmp_path: Path, brain_slice: sitk.Image, transform: str) -> None:
    """A rigid or affine run writes every output; its field is the affine map (constant
    Jacobian: 1 for rigid), and affine.mat holds that map."""
    fixed = tmp_path / "fixed.nii.gz"
    moving = tmp_path / "moving.nii.gz"
    sitk.WriteImage(brain_slice, str(fixed))
    rotated = sitk.Resample(brain_slice, brain_slice, sitk.Euler2DTransform(
        brain_slice.TransformContinuousIndexToPhysicalPoint([31.5, 31.5]), 0.2), sitk.sitkLinear, 0.0)
    sitk.WriteImage(rotated, str(moving))
    out = tmp_path / "out"
    assert main(["register", str(fixed), str(moving), "-o", str(out), "--quiet", "--threads", "1",
                 "--transform", transform]) == 0
    assert all((out / name).exists() for name in OUTPUT_FILES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["transform"] == transform
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert det.std() < 1e-3
    if transform == "rigid":
        assert det.mean() == pytest.approx(1.0, abs=1e-4)
    matrix = np.reshape(sitk.ReadTransform(str(out / "affine.mat")).GetParameters()[:4], (2, 2))
    # moving(q) = fixed(T q) with T the 0.2 rad rotation: fixed points map to moving points by T^-1
    assert np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])) == pytest.approx(-np.degrees(0.2), abs=2.0)
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    affine = sitk.ReadTransform(str(out / "affine.mat"))
    point = np.array(brain_slice.TransformIndexToPhysicalPoint([10, 50]))
    moved = point + np.array(field[10, 50])
    np.testing.assert_allclose(moved, affine.TransformPoint(point.tolist()), atol=1e-6)


def test_cli_masks_are_used_and_recorded(tmp_path: Path, brain_slice: sitk.Image) -> None:
    """--fixed-mask/--moving-mask files on another grid (twice as fine, same extent) are
    resampled onto their images, named in metrics.json, and change the optimisation."""
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(brain_slice, str(path))
    fine = sitk.Resample(brain_slice > 60, [128, 128], sitk.Transform(), sitk.sitkNearestNeighbor,
                         brain_slice.TransformContinuousIndexToPhysicalPoint([-0.25, -0.25]), [2.0, 2.0],
                         brain_slice.GetDirection(), 0, sitk.sitkUInt8)
    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(fine, str(mask))
    base = ["register", str(path), str(path), "--quiet", "--threads", "1", "--preset", "fast", "--iterations", "20"]
    assert main([*base, "-o", str(tmp_path / "masked"), "--fixed-mask", str(mask), "--moving-mask", str(mask)]) == 0
    assert main([*base, "-o", str(tmp_path / "plain")]) == 0
    masked = json.loads((tmp_path / "masked" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert masked["fixed_mask"] == str(mask) and masked["moving_mask"] == str(mask)
    assert masked["loss_history"] != plain["loss_history"]
