"""Image reading, writing, validation, physical-space checks and intensity scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA
from helpers import rotation_direction, with_geometry

from dipreg.errors import DipregError
from dipreg.images import (
    FOREGROUND_LEVEL,
    INTENSITY_PERCENTILES,
    MIN_FOREGROUND_COVERAGE,
    as_image,
    check_compatible,
    check_moving_on_fixed,
    intensity_range,
    normalise,
    physical_bounds,
    read_image,
    resample_to_fixed,
    resample_to_reference,
    write_image,
)

LGG_SLICE = SHARED_DATA / "lgg2d" / "slices" / "TCGA_CS_5395_19981004_10.tif"


def oblique(ndim: int, rng: np.random.Generator) -> sitk.Image:
    """A random image on an anisotropic, rotated grid away from the origin."""
    shape = (5, 6, 7)[-ndim:]
    spacing = (1.5, 0.8, 2.25)[:ndim]
    origin = (10.0, -5.0, 3.5)[:ndim]
    return with_geometry(rng.random(shape), spacing, origin, rotation_direction(ndim, 30))


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("extension", ["nii.gz", "nrrd", "mha"])
def test_write_read_round_trip_keeps_geometry_and_values(extension: str, ndim: int, tmp_path: Path,
                                                         rng: np.random.Generator) -> None:
    """Spacing, origin and direction survive NIfTI (float32 header: 1e-5), NRRD and MHA."""
    image = oblique(ndim, rng)
    path = tmp_path / f"image.{extension}"
    write_image(image, path)
    back = read_image(path)
    assert back.GetDimension() == ndim
    assert back.GetPixelID() == sitk.sitkFloat32
    assert_same_geometry(back, image, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


@pytest.mark.skipif(not LGG_SLICE.exists(), reason="shared LGG data not available")
def test_rgb_tiff_needs_a_channel() -> None:
    """The TCGA-LGG slices are 3-channel: without --channel the error lists the valid range."""
    message = r"TCGA_CS_5395_19981004_10\.tif: image has 3 channels; choose one with --channel 0\.\.2"
    with pytest.raises(DipregError, match=message):
        read_image(LGG_SLICE)


@pytest.mark.skipif(not LGG_SLICE.exists(), reason="shared LGG data not available")
@pytest.mark.parametrize("channel", [0, 1, 2])
def test_rgb_tiff_channel_selects_that_component(channel: int) -> None:
    """--channel c gives the c-th component as a scalar float32 image."""
    import tifffile

    image = read_image(LGG_SLICE, channel=channel)
    assert image.GetNumberOfComponentsPerPixel() == 1
    assert image.GetSize() == (256, 256)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), tifffile.imread(LGG_SLICE)[..., channel])


@pytest.mark.skipif(not LGG_SLICE.exists(), reason="shared LGG data not available")
def test_rgb_tiff_channel_out_of_range() -> None:
    with pytest.raises(DipregError, match=r"--channel 3 out of range 0\.\.2"):
        read_image(LGG_SLICE, channel=3)


def test_channel_of_scalar_image_is_rejected(tmp_path: Path, rng: np.random.Generator) -> None:
    """Asking for channel 1 of a one-channel image is an error, channel 0 is the image itself."""
    path = tmp_path / "scalar.nrrd"
    write_image(oblique(2, rng), path)
    assert read_image(path, channel=0).GetSize() == (7, 6)
    with pytest.raises(DipregError, match="one channel"):
        read_image(path, channel=1)


def write_dicom_series(volume: sitk.Image, directory: Path) -> None:
    """Write ``volume`` as one DICOM file per slice with the tags a series reader needs."""
    directory.mkdir()
    series_uid = "1.2.826.0.1.3680043.2.1125.7.1"
    d = volume.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": orientation,
            "0018|0050": str(volume.GetSpacing()[2]),
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


@pytest.mark.parametrize("degrees", [0, 30])
def test_dicom_series_directory_is_read_as_a_volume(degrees: float, tmp_path: Path, rng: np.random.Generator) -> None:
    """A directory of slices becomes one 3D image with the series' spacing, origin and direction."""
    volume = with_geometry((rng.random((4, 6, 5)) * 1000).astype(np.int16), (0.7, 0.9, 2.5), (-3.0, 4.0, 12.0),
                           rotation_direction(3, degrees))
    volume = sitk.Cast(volume, sitk.sitkInt16)
    write_dicom_series(volume, tmp_path / "series")
    image = read_image(tmp_path / "series")
    assert_same_geometry(image, volume, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume))


def test_directory_without_dicom_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DipregError, match="holds no DICOM series"):
        read_image(tmp_path)


def test_singleton_third_axis_becomes_2d(tmp_path: Path, rng: np.random.Generator) -> None:
    """A 2D slice stored as an x-y-1 volume is registered as 2D, keeping its in-plane geometry."""
    volume = with_geometry(rng.random((1, 5, 6)), (1.5, 0.8, 3.0), (10.0, -5.0, 2.0), rotation_direction(3, 0))
    path = tmp_path / "slab.nii.gz"
    write_image(volume, path)
    image = read_image(path)
    assert image.GetDimension() == 2
    assert image.GetSize() == (6, 5)
    np.testing.assert_allclose(image.GetSpacing(), (1.5, 0.8), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (10.0, -5.0), atol=1e-6)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DipregError, match=r"nothere\.nii\.gz: file not found"):
        read_image(tmp_path / "nothere.nii.gz")


def test_garbage_file_gives_one_line_error(tmp_path: Path) -> None:
    """Random bytes behind a NIfTI name: a one-line message naming the file."""
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DipregError, match=r"garbage\.nii\.gz: cannot read image") as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_4d_image_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkFloat32), str(path))
    with pytest.raises(DipregError, match=r"series\.nii\.gz: 4D images are not supported"):
        read_image(path)


def test_1d_image_is_rejected(tmp_path: Path) -> None:
    """SimpleITK cannot hold 1D images; the message says so instead of quoting ITK internals."""
    nibabel = pytest.importorskip("nibabel")
    path = tmp_path / "line.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.arange(10, dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(DipregError, match=r"line\.nii\.gz: 1D images are not supported"):
        read_image(path)


def test_1d_array_is_rejected() -> None:
    with pytest.raises(DipregError, match="1D arrays are not supported"):
        as_image(np.arange(5.0), "fixed image")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_rejected(bad: float) -> None:
    array = np.ones((4, 5))
    array[0, 1] = 0.0
    array[2, 3] = bad
    with pytest.raises(DipregError, match="moving image: image contains NaN or Inf voxels"):
        as_image(array, "moving image")


def test_constant_image_is_rejected() -> None:
    with pytest.raises(DipregError, match=r"fixed image: image is constant \(every voxel is 3\.0\)"):
        as_image(np.full((4, 5), 3.0), "fixed image")


def test_image_with_one_voxel_along_an_axis_is_rejected() -> None:
    with pytest.raises(DipregError, match="too small"):
        as_image(np.arange(10.0).reshape(1, 10), "thin")


def test_numpy_array_takes_spacing_in_xyz_order() -> None:
    """Array axes are (y, x); spacing is (x, y)."""
    image = as_image(np.arange(12.0).reshape(3, 4), "array", spacing=(2.0, 0.5))
    assert image.GetSize() == (4, 3)
    assert image.GetSpacing() == (2.0, 0.5)


def test_numpy_spacing_of_wrong_length_is_rejected() -> None:
    with pytest.raises(DipregError, match="does not match a 2D array"):
        as_image(np.arange(12.0).reshape(3, 4), "array", spacing=(1.0, 1.0, 1.0))


def test_physical_bounds_of_rotated_grid() -> None:
    """A 90-degree direction maps index x to world +y and index y to world -x."""
    image = with_geometry(np.zeros((3, 5)), (2.0, 1.0), (1.0, 1.0), (0.0, -1.0, 1.0, 0.0))
    low, high = physical_bounds(image)
    # x index 0..4 (2 mm) -> world y 1..9; y index 0..2 (1 mm) -> world x 1..-1
    np.testing.assert_allclose(low, (-1.0, 1.0))
    np.testing.assert_allclose(high, (1.0, 9.0))


def test_compatible_images_overlapping_partly(rng: np.random.Generator) -> None:
    """Different grids that share some physical space are accepted."""
    fixed = with_geometry(rng.random((10, 10)), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    moving = with_geometry(rng.random((8, 12)), (0.5, 2.0), (4.0, 5.0), rotation_direction(2, 20))
    check_compatible(fixed, moving, "f.nii", "m.nii")


def test_dimension_mismatch_is_rejected(rng: np.random.Generator) -> None:
    with pytest.raises(DipregError, match="m.nii: moving image is 3D but fixed image f.nii is 2D"):
        check_compatible(oblique(2, rng), oblique(3, rng), "f.nii", "m.nii")


def test_disjoint_images_are_rejected(rng: np.random.Generator) -> None:
    """A moving image 100 mm away from the fixed one does not overlap it."""
    fixed = oblique(2, rng)
    moving = oblique(2, rng)
    moving.SetOrigin((110.0, -5.0))
    with pytest.raises(DipregError, match="does not overlap"):
        check_compatible(fixed, moving, "f.nii", "m.nii")


def test_intensity_range_is_robust_percentiles() -> None:
    """0..999: the 0.5th and 99.5th percentiles interpolate to 4.995 and 994.005."""
    image = sitk.GetImageFromArray(np.arange(1000, dtype=np.float32).reshape(20, 50))
    assert intensity_range(image) == pytest.approx((4.995, 994.005), rel=1e-6)


def test_intensity_range_falls_back_to_min_max() -> None:
    """Mostly-zero images whose percentiles coincide use min and max instead."""
    array = np.zeros((20, 20), dtype=np.float32)
    array[0, 0] = 7.0
    assert intensity_range(sitk.GetImageFromArray(array)) == (0.0, 7.0)


def test_normalise_maps_range_to_unit_interval_and_clips() -> None:
    out = normalise(np.array([0.0, 2.0, 4.0, 6.0, 10.0]), (2.0, 6.0))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


def test_label_resampling_keeps_type_and_values(rng: np.random.Generator) -> None:
    """Nearest neighbour onto another grid introduces no new labels and keeps the integer type."""
    labels = sitk.GetImageFromArray(rng.choice([0, 3, 17], size=(12, 14)).astype(np.uint8))
    reference = with_geometry(np.zeros((9, 11)), (1.3, 1.1), (0.4, 0.3), rotation_direction(2, 15))
    out = resample_to_reference(labels, reference, labels=True)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 3, 17}


@pytest.mark.parametrize("columns", [12, 40])
def test_moving_covering_too_little_of_the_fixed_foreground_is_refused(columns: int, brain_slice: sitk.Image) -> None:
    """A moving image holding the first ``columns`` columns of the fixed slice (same physical
    place) covers exactly those columns' share of the fixed foreground."""
    fixed = brain_slice
    moving = fixed[:columns, :]
    array = sitk.GetArrayFromImage(fixed)
    low, high = np.percentile(array, INTENSITY_PERCENTILES)
    foreground = (array - low) / (high - low) > FOREGROUND_LEVEL
    share = foreground[:, :columns].sum() / foreground.sum()
    on_fixed = resample_to_fixed(moving, fixed)
    if share < MIN_FOREGROUND_COVERAGE:
        with pytest.raises(DipregError, match=f"m.nii: on the fixed grid the moving image covers {share:.0%} of"):
            check_moving_on_fixed(moving, fixed, on_fixed, None, "m.nii", "f.nii")
    else:
        check_moving_on_fixed(moving, fixed, on_fixed, None, "m.nii", "f.nii")
    assert (share < MIN_FOREGROUND_COVERAGE) == (columns == 12)  # the two cases are the two branches
