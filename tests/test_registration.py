"""End-to-end registrations with known answers, the saved field's conventions and label warping.

Convention under test: the field ``u`` (mm, physical axes, on the fixed grid) satisfies
``warped(p) = moving(p + u(p)) ≈ fixed(p)``. A moving image built as
``moving(p) = fixed(T(p))`` (SimpleITK ``Resample`` through ``T``) is therefore recovered by
``u(p) = T^-1(p) - p``: a shift ``moving(p) = fixed(p - t)`` gives ``u = +t``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import rotation_direction, with_geometry, world_points
from scipy import ndimage

import dipreg
import dipreg.registration
from dipreg.errors import DipregError
from dipreg.outputs import FIELD_DTYPES
from dipreg.registration import OUTPUT_FILES
from dipreg.transforms import Grid, displacement_transform, identity_grid, warp

ITERATIONS = 30
METHODS = ["dip", "classic"]


def interior_mask(image: sitk.Image, erosion: int = 3) -> np.ndarray:
    """Brain voxels (above 30 % of the maximum), eroded so that edge interpolation does not count."""
    array = sitk.GetArrayFromImage(image)
    return ndimage.binary_erosion(array > 0.3 * array.max(), iterations=erosion)


def endpoint_errors(result: dipreg.RegistrationResult, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) between the recovered and the true field at the masked voxels."""
    return np.linalg.norm(result.displacement_array - truth, axis=-1)[mask]


def translated(fixed: sitk.Image, shift: np.ndarray) -> sitk.Image:
    """``moving(p) = fixed(p - shift)``: the fixed content moved by ``+shift`` mm."""
    return sitk.Resample(fixed, fixed, sitk.TranslationTransform(fixed.GetDimension(), (-shift).tolist()),
                         sitk.sitkLinear, 0.0)


def scaled(fixed: sitk.Image, factor: float) -> tuple[sitk.Image, np.ndarray]:
    """``moving(p) = fixed(c + s (p - c))`` about the image centre c, and its true field.

    The content shrinks by ``s``; ``T^-1(p) = c + (p - c) / s`` so ``u(p) = (1/s - 1)(p - c)``.
    """
    ndim = fixed.GetDimension()
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    transform = sitk.ScaleTransform(ndim, [factor] * ndim)
    transform.SetCenter(centre.tolist())
    moving = sitk.Resample(fixed, fixed, transform, sitk.sitkLinear, 0.0)
    return moving, (1.0 / factor - 1.0) * (world_points(fixed) - centre)


# ---------------------------------------------------------------------------------------------
# identity


def test_identity_pair_gives_identity_2d(brain_slice: sitk.Image) -> None:
    """Registering a slice to itself: no motion in the brain, det J ≈ 1 everywhere, SSIM ≈ 1.

    The brain slice has 4 mm voxels: 0.2 mm is 1/20 voxel. The zero background carries no
    image information, so only a looser bound (a quarter voxel) applies to the whole field.
    """
    result = dipreg.register(brain_slice, brain_slice, iterations=ITERATIONS)
    field = result.displacement_array
    assert field.shape == (64, 64, 2)
    assert np.linalg.norm(field, axis=-1)[interior_mask(brain_slice)].max() < 0.2
    assert np.abs(field).max() < 1.0
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.jacobian), 1.0, atol=0.05)
    assert result.metrics["ssim"] > 0.99
    assert result.metrics["folding_percent"] == 0.0


def test_identity_pair_gives_identity_3d(brain_volume: sitk.Image) -> None:
    """The same in 3D on an oblique anisotropic grid."""
    result = dipreg.register(brain_volume, brain_volume, iterations=ITERATIONS)
    field = result.displacement_array
    assert field.shape == (*reversed(brain_volume.GetSize()), 3)
    assert np.linalg.norm(field, axis=-1)[interior_mask(brain_volume, 2)].max() < 0.2
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.jacobian), 1.0, atol=0.05)
    assert result.metrics["ssim"] > 0.99


# ---------------------------------------------------------------------------------------------
# known transformations, in mm, on an anisotropic (1.5 x 0.8 mm) grid rotated by 30 degrees

SHIFT_2D = np.array([2.0, -1.0])


@pytest.mark.parametrize("method", METHODS)
def test_known_translation_is_recovered_in_mm(method: str, oblique_slice: sitk.Image) -> None:
    """A (2, -1) mm world shift: mean error < 0.3 mm and max < 0.5 mm over the brain (voxels 1.5 x 0.8 mm).

    The moving image is a linearly interpolated copy, and sampling it again blurs it least at
    whole-voxel offsets, which pulls the local-NCC optimum of this 64 x 64 grid off the true
    shift: the affine stage alone ends 0.11 mm from it, the deformable default 0.26 mm (the
    previous default, diffusion and perturbed noise, 0.25 mm)."""
    moving = translated(oblique_slice, SHIFT_2D)
    result = dipreg.register(oblique_slice, moving, iterations=ITERATIONS, method=method)
    errors = endpoint_errors(result, SHIFT_2D, interior_mask(oblique_slice))
    assert errors.mean() < 0.3
    assert errors.max() < 0.5


@pytest.mark.parametrize("method", METHODS)
def test_known_scaling_is_recovered_in_mm(method: str, oblique_slice: sitk.Image) -> None:
    """Content shrunk by 8 % about the centre (up to about 1.7 mm of motion in the brain)."""
    moving, truth = scaled(oblique_slice, 1.08)
    mask = interior_mask(oblique_slice)
    assert np.linalg.norm(truth, axis=-1)[mask].max() > 1.5  # the test asks for real motion
    result = dipreg.register(oblique_slice, moving, iterations=ITERATIONS, method=method)
    errors = endpoint_errors(result, truth, mask)
    assert errors.mean() < 0.25
    assert errors.max() < 0.5


def test_known_translation_is_recovered_in_3d(brain_volume: sitk.Image) -> None:
    """A (1.5, -1, 1.2) mm shift of a small oblique anisotropic volume."""
    shift = np.array([1.5, -1.0, 1.2])
    result = dipreg.register(brain_volume, translated(brain_volume, shift), iterations=ITERATIONS)
    errors = endpoint_errors(result, shift, interior_mask(brain_volume, 2))
    assert errors.mean() < 0.25
    assert errors.max() < 0.5


def test_refinement_recovers_the_shift_the_network_stage_left(oblique_slice: sitk.Image) -> None:
    """Two network iterations leave the (2, -1) mm shift nearly unrecovered; 150 iterations of the
    refinement field on the half-resolution grid then recover it. The refinement is recorded as
    its own loss stage and the saved field lives on its grid."""
    moving = translated(oblique_slice, SHIFT_2D)
    mask = interior_mask(oblique_slice)
    starved = dict(iterations=2, affine=False, pyramid_levels=1, patience=0)
    network_only = dipreg.register(oblique_slice, moving, **starved)
    refined = dipreg.register(oblique_slice, moving, **starved, refine_iterations=150, refine_learning_rate=0.05)
    assert endpoint_errors(network_only, SHIFT_2D, mask).mean() > 1.5
    errors = endpoint_errors(refined, SHIFT_2D, mask)
    assert errors.mean() < 0.3 and errors.max() < 0.6
    stages = refined.metrics["loss_stages"]
    assert stages[-1]["stage"] == "refine 32x32" and len(stages[-1]["losses"]) == 150
    assert stages[-1]["losses"][-1] < stages[-1]["losses"][0]
    assert refined.field_transform.deformable.GetSize() == (32, 32)
    assert refined.metrics["iterations"] == 2 + 150


def test_smoothed_refinement_keeps_the_field_smoother(oblique_slice: sitk.Image) -> None:
    """The same refinement with the field Gaussian-smoothed (sigma 2 voxels) still recovers the
    shift and ends with a smaller spread of log det J than without smoothing."""
    moving = translated(oblique_slice, SHIFT_2D)
    options = dict(iterations=2, affine=False, pyramid_levels=1, patience=0, refine_iterations=150,
                   refine_learning_rate=0.05, regularization=0.0, bending=0.0)
    rough = dipreg.register(oblique_slice, moving, **options)
    smooth = dipreg.register(oblique_slice, moving, **options, refine_smoothing=2.0)
    assert endpoint_errors(smooth, SHIFT_2D, interior_mask(oblique_slice)).mean() < 0.4
    assert smooth.metrics["sdlogj"] < rough.metrics["sdlogj"]


def test_numpy_inputs_use_the_given_spacing(brain_slice: sitk.Image) -> None:
    """Arrays shifted by 2 columns with 1.5 mm columns: u_x = +3 mm, u_y = 0."""
    fixed = sitk.GetArrayFromImage(brain_slice)
    moving = np.zeros_like(fixed)
    moving[:, 2:] = fixed[:, :-2]  # moving(x) = fixed(x - 2 voxels)
    result = dipreg.register(fixed, moving, iterations=ITERATIONS, spacing=(1.5, 0.8))
    assert result.displacement.GetSpacing() == (1.5, 0.8)
    errors = endpoint_errors(result, np.array([3.0, 0.0]), interior_mask(brain_slice))
    assert errors.mean() < 0.25


def test_moving_on_another_grid_is_compared_in_physical_space(brain_slice: sitk.Image) -> None:
    """The same physical image sampled on a rotated, finer, shifted grid needs no deformation."""
    reference = with_geometry(np.zeros((70, 75)), (3.5, 3.6), (-6.0, 4.0), rotation_direction(2, 10))
    moving = sitk.Resample(brain_slice, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    result = dipreg.register(brain_slice, moving, iterations=ITERATIONS)
    assert result.warped.GetSize() == brain_slice.GetSize()
    assert result.warped.GetSpacing() == brain_slice.GetSpacing()
    motion = np.linalg.norm(result.displacement_array, axis=-1)[interior_mask(brain_slice)]
    assert motion.mean() < 0.25 * min(brain_slice.GetSpacing())


def test_moving_smaller_than_fixed_is_padded_with_its_background(brain_slice: sitk.Image) -> None:
    """Outside the moving image's field of view the optimiser sees background, not 0 HU-like values.

    With a CT-like offset (background -500) a zero padding would be brighter than the brain and
    draw the field towards the edge of the field of view.
    """
    offset = sitk.Cast(brain_slice, sitk.sitkFloat32) - 500.0
    moving = offset[8:56, 8:56]  # same physical content, smaller field of view
    seen = {}
    original = dipreg.registration.optimise

    def recording_optimise(fixed, moving_tensor, grid, config, **kwargs):
        seen["moving"] = moving_tensor
        return original(fixed, moving_tensor, grid, config, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dipreg.registration, "optimise", recording_optimise)
        dipreg.register(offset, moving, iterations=2)
    outside = np.ones((64, 64), dtype=bool)
    outside[8:56, 8:56] = False
    assert np.abs(seen["moving"][0, 0].numpy()[outside]).max() < 1e-6  # the normalised background is 0


# ---------------------------------------------------------------------------------------------
# the saved field: SimpleITK round trip and agreement with the optimiser's own warp


@pytest.fixture(scope="module")
def shift_run(oblique_slice: sitk.Image) -> dict:
    """One default registration of the shifted oblique slice, with the optimiser's raw output."""
    captured = {}
    original = dipreg.registration.optimise

    def recording_optimise(fixed, moving, grid, config, **kwargs):
        captured["moving_tensor"] = moving.clone()
        captured["outcome"] = original(fixed, moving, grid, config, **kwargs)
        return captured["outcome"]

    moving = translated(oblique_slice, SHIFT_2D)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dipreg.registration, "optimise", recording_optimise)
        result = dipreg.register(oblique_slice, moving, iterations=ITERATIONS)
    return {"result": result, "moving": moving, **captured}


def test_saved_displacement_reproduces_warped_in_simpleitk(shift_run: dict, tmp_path: Path) -> None:
    """displacement.nii.gz + sitk DisplacementFieldTransform + Resample == warped.nii.gz."""
    result = shift_run["result"]
    outdir = result.save(tmp_path / "out")
    field = sitk.ReadImage(str(outdir / "displacement.nii.gz"))
    fixed = result.fixed
    assert field.GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_allclose(field.GetSpacing(), fixed.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-6)

    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    rewarped = sitk.Resample(shift_run["moving"], fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    saved = sitk.ReadImage(str(outdir / "warped.nii.gz"))
    scale = float(np.abs(sitk.GetArrayFromImage(saved)).max())
    np.testing.assert_allclose(sitk.GetArrayFromImage(rewarped), sitk.GetArrayFromImage(saved), atol=1e-4 * scale)


def test_saved_displacement_equals_the_optimised_warp(shift_run: dict) -> None:
    """The field written for ITK warps like the normalised field the optimiser scored.

    The moving image warped by the optimiser's own displacement (torch, normalised units) must
    equal the moving image resampled by the exported field (SimpleITK, mm) wherever the sample
    points stay inside the image. (Intensities are compared unclipped: the optimiser's copy is
    clipped at the 99.5th percentile before interpolation, the exported image is not.)
    """
    result, outcome = shift_run["result"], shift_run["outcome"]
    grid = Grid.from_image(result.fixed)
    # The optimiser starts from the initial transform (the start search's rotation and shift).
    initial = result.field_transform.initial
    start = shift_run["moving"] if initial is None else sitk.Resample(shift_run["moving"], result.fixed, initial,
                                                                        sitk.sitkLinear, 0.0)
    moving = torch.from_numpy(sitk.GetArrayFromImage(start).astype(np.float64))[None, None]
    torch_warped = warp(moving, outcome.displacement.double(), identity_grid(grid.shape, dtype=torch.float64))
    # ITK's side: the exported transform without the initial one, applied to the same start image.
    optimised = dataclasses.replace(result.field_transform, initial=None).displacement_image()
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(start, result.fixed, displacement_transform(optimised),
                                                      sitk.sitkLinear, 0.0))

    index = (world_points(result.fixed) + sitk.GetArrayFromImage(optimised) - np.asarray(grid.origin)) \
        @ np.linalg.inv(grid.index_to_world_matrix()).T
    inside = np.all((index > 0.5) & (index < np.asarray(grid.size) - 1.5), axis=-1)
    assert inside.mean() > 0.8
    scale = float(itk_warped.max())
    np.testing.assert_allclose(torch_warped[0, 0].numpy()[inside], itk_warped[inside], atol=1e-4 * scale)
    assert shift_run["moving_tensor"].shape == moving.shape  # the optimiser saw the moving image on this grid


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saved_field_is_rounded_as_documented(dtype: str, shift_run: dict, tmp_path: Path) -> None:
    """float32 rounds each component to nearest: by at most 2^-24 of its magnitude; float64 is exact."""
    result = shift_run["result"]
    field = sitk.ReadImage(str(result.save(tmp_path / "out", field_dtype=dtype) / "displacement.nii.gz"))
    assert field.GetPixelID() == getattr(sitk, FIELD_DTYPES[dtype])
    exact = result.displacement_array
    assert exact.dtype == np.float64
    error = np.abs(sitk.GetArrayFromImage(field).astype(np.float64) - exact)
    assert np.all(error <= (2.0**-24 if dtype == "float32" else 0.0) * np.abs(exact))


def test_save_writes_the_five_files_and_no_staging_leftovers(shift_run: dict, tmp_path: Path) -> None:
    """Saving twice into the same directory replaces the files and leaves nothing else behind."""
    result = shift_run["result"]
    outdir = tmp_path / "out"
    result.save(outdir)
    result.save(outdir)
    assert sorted(p.name for p in outdir.iterdir()) == sorted(OUTPUT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert metrics["loss_history"] == pytest.approx(result.loss_history)


def test_jacobian_image_matches_metrics(shift_run: dict) -> None:
    """The reported det J statistics are those of the saved Jacobian image."""
    result = shift_run["result"]
    det = sitk.GetArrayFromImage(result.jacobian).astype(np.float64)
    assert result.metrics["jacobian_mean"] == pytest.approx(det.mean(), rel=1e-6)
    assert result.metrics["jacobian_min"] == pytest.approx(det.min(), rel=1e-6)
    assert result.metrics["folding_percent"] == pytest.approx(100.0 * np.mean(det <= 0))


def test_metrics_have_documented_keys(shift_run: dict) -> None:
    metrics = shift_run["result"].metrics
    for key in ("ssim", "ncc", "mse", "jacobian_mean", "jacobian_std", "jacobian_min", "folding_percent",
                "sdlogj", "iterations", "seconds", "device", "options", "dipreg_version"):
        assert key in metrics
    assert metrics["dipreg_version"] == dipreg.__version__
    assert metrics["options"]["iterations"] == ITERATIONS


# ---------------------------------------------------------------------------------------------
# applying the field to other images of the moving subject


def test_apply_to_the_moving_image_reproduces_warped(shift_run: dict) -> None:
    result = shift_run["result"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.apply(shift_run["moving"])),
                                  sitk.GetArrayFromImage(result.warped))


def test_apply_labels_keeps_the_label_set(shift_run: dict) -> None:
    """Nearest-neighbour label warping: same pixel type, no new (interpolated) label values."""
    result = shift_run["result"]
    array = sitk.GetArrayFromImage(shift_run["moving"])
    labels_array = np.digitize(array, np.percentile(array[array > 0], [40, 80])).astype(np.uint8) * 7
    labels_array[array == 0] = 0
    labels = sitk.GetImageFromArray(labels_array)
    labels.CopyInformation(shift_run["moving"])
    warped = result.apply(labels, labels=True)
    assert warped.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayFromImage(warped)).tolist())
    assert values == {0, 7, 14}
    linear = result.apply(sitk.Cast(labels, sitk.sitkFloat32))  # linear interpolation would blend labels
    assert set(np.unique(sitk.GetArrayFromImage(linear)).tolist()) - {0, 7, 14}


@pytest.mark.parametrize("shape", [(6, 64), (5, 30, 30)])
def test_images_thinner_than_the_windows_register(shape: tuple[int, ...], rng: np.random.Generator) -> None:
    """Axes shorter than the 9-voxel LNCC window and the 7-voxel SSIM window are handled."""
    array = ndimage.gaussian_filter(rng.random(shape), 2.0)
    result = dipreg.register(array, array, iterations=3)
    assert result.displacement_array.shape == (*shape, len(shape))
    assert 0.9 < result.metrics["ssim"] <= 1.0


# ---------------------------------------------------------------------------------------------
# options


def test_unknown_option_is_rejected(brain_slice: sitk.Image) -> None:
    with pytest.raises(DipregError, match="unknown option"):
        dipreg.register(brain_slice, brain_slice, iteratons=5)


def test_invalid_option_value_is_rejected(brain_slice: sitk.Image) -> None:
    with pytest.raises(DipregError, match="iterations"):
        dipreg.register(brain_slice, brain_slice, iterations=0)


def test_progress_callback_sees_every_iteration(brain_slice: sitk.Image) -> None:
    """The callback is called once per reported iteration with a finite loss."""
    seen: list[tuple[int, float]] = []
    result = dipreg.register(brain_slice, brain_slice, iterations=4, callback=lambda i, loss: seen.append((i, loss)))
    assert len(seen) == result.metrics["iterations"] == 4
    assert all(np.isfinite(loss) for _, loss in seen)


def test_callback_sees_each_iteration_in_order_across_loss_reads(brain_slice: sitk.Image) -> None:
    """Losses are read from the device in batches; the callback still gets 1, 2, ... N, and the
    history recorded in the result is the same sequence."""
    seen: list[tuple[int, float]] = []
    result = dipreg.register(brain_slice, brain_slice, iterations=23, patience=0, pyramid_levels=1,
                             affine=False, callback=lambda i, loss: seen.append((i, loss)))
    assert [i for i, _ in seen] == list(range(1, 24))
    assert [loss for _, loss in seen] == result.loss_history[-23:]


def test_early_stopping_ends_a_flat_optimisation(brain_slice: sitk.Image) -> None:
    """A pair that is already aligned has nothing to gain: with a patience the loop stops well
    before the maximum and says why."""
    result = dipreg.register(brain_slice, brain_slice, iterations=400, patience=20, pyramid_levels=1,
                             affine=False, z_mode="fixed")
    assert result.metrics["iterations"] < 400
    assert "stopped improving" in result.metrics["stop_reason"]


def test_threads_option_applies_during_the_optimisation_and_is_restored(brain_slice: sitk.Image) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    dipreg.register(brain_slice, brain_slice, iterations=3, threads=2,
                    callback=lambda i, loss: seen.append(torch.get_num_threads()))
    assert seen == [2, 2, 2]
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------
# initial transform


def _shifted_copy(image: sitk.Image, shift_mm: tuple[float, ...]) -> sitk.Image:
    """``moving(p) = image(p - shift)``: the fixed-to-moving map is the translation by ``shift``."""
    return sitk.Resample(image, image, sitk.TranslationTransform(image.GetDimension(), [-s for s in shift_mm]),
                         sitk.sitkLinear, 0.0)


def test_initial_transform_is_applied_first_and_included_in_the_field(brain_slice: sitk.Image) -> None:
    """With the exact translation as the initial transform there is nothing left to register:
    the written field is that translation and the warped image matches the fixed one."""
    shift = (10.0, -6.0)
    moving = _shifted_copy(brain_slice, shift)
    result = dipreg.register(brain_slice, moving, iterations=20, affine=False,
                             initial_transform=sitk.TranslationTransform(2, shift))
    interior = interior_mask(brain_slice)
    np.testing.assert_allclose(result.displacement_array[interior].mean(axis=0), shift, atol=0.3)
    assert np.linalg.norm(result.displacement_array - shift, axis=-1)[interior].max() < 1.0
    assert result.metrics["ssim"] > 0.9
    assert result.metrics["initial_transform"] == "given"


def test_initial_transform_of_the_wrong_dimension_is_rejected(brain_slice: sitk.Image) -> None:
    with pytest.raises(DipregError, match="3D for 2D"):
        dipreg.register(brain_slice, brain_slice, iterations=2, initial_transform=sitk.TranslationTransform(3))
