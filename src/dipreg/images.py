"""Image input/output, validation, physical-space resampling and intensity scaling.

SimpleITK images are the single carrier of pixel data plus geometry (size, spacing,
origin, direction) throughout dipreg. Arrays taken from them are in SimpleITK's
reversed axis order: ``(z, y, x)`` for 3D and ``(y, x)`` for 2D.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Sequence, Union

import nibabel
import numpy as np
import SimpleITK as sitk

from dipreg.errors import DipregError
from dipreg.options import INTERPOLATORS

ImageLike = Union[str, os.PathLike, sitk.Image, np.ndarray]

#: Percentiles mapped to 0 and 1 by :func:`intensity_range`.
INTENSITY_PERCENTILES = (0.5, 99.5)

#: File names whose voxels :func:`check_nifti_voxels` reads with nibabel before SimpleITK does.
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Pixel types refused: a complex image has no one intensity to match.
COMPLEX_PIXEL_TYPES = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)

#: :func:`check_moving_on_fixed`: the fixed image's foreground (above this fraction of its robust
#: intensity range) that the moving image must cover on the fixed grid, and the smallest
#: intensity range (a fraction of its own robust range) the moving image must keep there.
FOREGROUND_LEVEL = 0.1
MIN_FOREGROUND_COVERAGE = 0.25
MIN_RESAMPLED_CONTRAST = 0.01
#: Fewest moving voxels the fixed field of view must span along every moving axis.
MIN_MOVING_VOXELS_ACROSS = 4


def read_image(path: str | os.PathLike, channel: int | None = None) -> sitk.Image:
    """Read a scalar image from a file or a DICOM series directory.

    Args:
        path: NIfTI, NRRD, MHA/MHD, PNG/JPEG/TIFF file, or a directory holding one DICOM series.
        channel: which component to take from a multi-channel (e.g. RGB) image.

    Returns:
        A 2D or 3D scalar float32 image with the file's geometry.

    Raises:
        DipregError: if the file is missing or unreadable, or the image cannot be registered.
    """
    path = Path(path)
    read_image_information(path, channel)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        check_nifti_voxels(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _read_error(path, exc) from None
    return prepare_image(image, name=str(path), channel=channel)


def _dicom_series(path: Path) -> tuple[str, ...]:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
    if not files:
        raise DipregError(f"{path}: directory holds no DICOM series")
    return files


def _read_error(path: Path, exc: RuntimeError) -> DipregError:
    reason = _itk_error_reason(exc)
    dimension = re.search(r"unsupported image dimension of (\d+)", reason)
    if dimension:
        return DipregError(f"{path}: {dimension.group(1)}D images are not supported (2D or 3D only)")
    return DipregError(f"{path}: cannot read image ({reason})")


def read_image_information(path: str | os.PathLike, channel: int | None = None) -> tuple[int, ...]:
    """Check an image file from its header alone, before any voxel is read.

    Returns:
        The array shape ``(y, x)`` or ``(z, y, x)`` of the image :func:`read_image` would return.

    Raises:
        DipregError: if the file is missing or unreadable, or its pixel type, dimension or
            channels (with ``channel``) cannot be registered.
    """
    path = Path(path)
    if not path.exists():
        raise DipregError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    try:
        files = _dicom_series(path) if path.is_dir() else (str(path),)
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _read_error(path, exc) from None
    size = list(reader.GetSize())
    if len(files) > 1:
        size = size[:2] + [len(files)]
    check_layout(str(path), size, reader.GetNumberOfComponents(), reader.GetPixelID(), channel)
    return tuple(reversed(size[:2] if len(size) == 3 and size[2] == 1 else size))


def check_nifti_voxels(path: str | os.PathLike) -> None:
    """Read a NIfTI file's stored voxels with nibabel and refuse a truncated file or NaN/Inf
    values, which SimpleITK would silently read as zeros."""
    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DipregError(f"{path}: file is truncated or damaged ({reason})") from None
    if data.dtype.kind in "fc":
        validate_intensities(data, str(path))


def _itk_error_reason(exc: RuntimeError) -> str:
    """The message of a SimpleITK exception on one line, without its source-location preamble."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if "sitk::ERROR:" in text:
        text = text.split("sitk::ERROR:", 1)[1].strip()
    return text or "unknown error"


def read_labels(path: str | os.PathLike) -> sitk.Image:
    """Read a label map as it is stored (integer type kept), 2D or 3D, one channel.

    Unlike :func:`read_image` it keeps the pixel type and accepts constant maps.

    Raises:
        DipregError: if the file is missing or unreadable, or is not a 2D/3D scalar image.
    """
    path = Path(path)
    if not path.exists():
        raise DipregError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DipregError(f"{path}: cannot read label image ({_itk_error_reason(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DipregError(f"{path}: a label image needs one channel, not {image.GetNumberOfComponentsPerPixel()}")
    image = _drop_singleton_third_axis(image)
    if image.GetDimension() not in (2, 3):
        raise DipregError(f"{path}: {image.GetDimension()}D images are not supported (2D or 3D only)")
    return image


def _drop_singleton_third_axis(image: sitk.Image) -> sitk.Image:
    """A 3D image one voxel thick becomes 2D (a slice stored as a volume)."""
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        return sitk.Extract(image, [image.GetSize()[0], image.GetSize()[1], 0], [0, 0, 0])
    return image


def check_layout(name: str, size: Sequence[int], components: int, pixel_id: int, channel: int | None) -> None:
    """Refuse what cannot be registered, from an image's size, channels and pixel type alone:
    complex pixels, several channels without a valid ``channel``, not 2D/3D, under 2 voxels an axis."""
    if pixel_id in COMPLEX_PIXEL_TYPES:
        raise DipregError(f"{name}: complex pixel type ({sitk.GetPixelIDValueAsString(pixel_id)}) is not supported; "
                          "register the magnitude image")
    if components > 1:
        if channel is None:
            raise DipregError(
                f"{name}: image has {components} channels; choose one with --channel 0..{components - 1}"
            )
        if not 0 <= channel < components:
            raise DipregError(f"{name}: --channel {channel} out of range 0..{components - 1}")
    elif channel not in (None, 0):
        raise DipregError(f"{name}: image has one channel, --channel {channel} does not exist")
    size = list(size)[:2] if len(size) == 3 and size[2] == 1 else list(size)
    if len(size) not in (2, 3):
        raise DipregError(f"{name}: {len(size)}D images are not supported (2D or 3D only)")
    if min(size) < 2:
        raise DipregError(f"{name}: image size {tuple(size)} is too small (need 2 voxels per axis)")


def prepare_image(image: sitk.Image, name: str, channel: int | None = None) -> sitk.Image:
    """Select a channel, drop a singleton third axis, cast to float32 and validate.

    Args:
        image: any SimpleITK image.
        name: how to name the image in error messages (usually its path).
        channel: component to select when the image has several.
    """
    check_layout(name, image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelID(), channel)
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, channel)
    image = _drop_singleton_third_axis(image)
    image = sitk.Cast(image, sitk.sitkFloat32)
    validate_intensities(sitk.GetArrayViewFromImage(image), name)
    return image


def validate_intensities(array: np.ndarray, name: str) -> None:
    """Raise a DipregError if the array has NaN/Inf values or is constant."""
    if not np.isfinite(array).all():
        raise DipregError(f"{name}: image contains NaN or Inf voxels")
    if float(array.max()) == float(array.min()):
        raise DipregError(f"{name}: image is constant (every voxel is {float(array.min())})")


def as_image(
    image: ImageLike,
    name: str,
    spacing: tuple[float, ...] | None = None,
    channel: int | None = None,
) -> sitk.Image:
    """Turn a path, SimpleITK image or numpy array into a validated scalar float32 image.

    A numpy array is taken in SimpleITK's axis order (``(z, y, x)`` or ``(y, x)``); ``spacing``
    is then given in ``(x, y[, z])`` order and defaults to 1 mm.
    """
    if isinstance(image, sitk.Image):
        return prepare_image(image, name=name, channel=channel)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise DipregError(f"{name}: {image.ndim}D arrays are not supported (2D or 3D only)")
        result = sitk.GetImageFromArray(np.asarray(image, dtype=np.float32))
        if spacing is not None:
            if len(spacing) != image.ndim:
                raise DipregError(f"{name}: spacing {spacing} does not match a {image.ndim}D array")
            result.SetSpacing([float(s) for s in spacing])
        return prepare_image(result, name=name)
    return read_image(image, channel=channel)


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write an image with its geometry (format from the file extension)."""
    sitk.WriteImage(image, str(path), useCompression=True)


def image_shape(image: ImageLike, channel: int | None = None) -> tuple[int, ...]:
    """Array shape ``(y, x)`` or ``(z, y, x)`` of an input; for a file read from its header alone."""
    if isinstance(image, np.ndarray):
        return tuple(image.shape)
    if isinstance(image, sitk.Image):
        size = image.GetSize()
        return tuple(reversed(size[:2] if len(size) == 3 and size[2] == 1 else size))
    return read_image_information(image, channel)


def describe_grid(image: sitk.Image) -> str:
    """Spacing, extent and origin of an image in mm, for messages."""
    spacing = np.array(image.GetSpacing())
    extent = spacing * np.array(image.GetSize())
    return (f"spacing {'x'.join(f'{v:g}' for v in spacing)} mm, extent {'x'.join(f'{v:g}' for v in extent)} mm, "
            f"origin ({', '.join(f'{v:g}' for v in image.GetOrigin())})")


def check_moving_on_fixed(moving: sitk.Image, fixed: sitk.Image, moving_on_fixed: sitk.Image,
                          transform: sitk.Transform | None, moving_name: str, fixed_name: str) -> None:
    """Refuse a moving image that, resampled onto the fixed grid (through ``transform``), covers
    less than :data:`MIN_FOREGROUND_COVERAGE` of the fixed image's foreground or is constant
    there (e.g. a wrong spacing in a header), naming both images' spacings and extents."""
    geometry = f"moving: {describe_grid(moving)}; fixed {fixed_name}: {describe_grid(fixed)}"
    # How many moving voxels the fixed field of view spans along each moving axis: a wrong
    # spacing (e.g. 100x) leaves the whole fixed image inside one or two moving voxels, which a
    # start search could still shift into view.
    transform = transform or sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
    size = np.array(fixed.GetSize())
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing="ij")).reshape(len(size), -1).T
    spans = np.ptp([moving.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(
        fixed.TransformContinuousIndexToPhysicalPoint(c.tolist()))) for c in corners.astype(float)], axis=0)
    if spans.min() < MIN_MOVING_VOXELS_ACROSS:
        raise DipregError(f"{moving_name}: the fixed image's field of view spans only {spans.min():.2g} moving voxels "
                          f"along one axis (at least {MIN_MOVING_VOXELS_ACROSS} needed; a wrong spacing?); {geometry}")
    foreground = normalise(sitk.GetArrayViewFromImage(fixed), intensity_range(fixed)) > FOREGROUND_LEVEL
    support = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    support.CopyInformation(moving)
    covered = sitk.GetArrayViewFromImage(resample_to_reference(support, fixed, transform, labels=True)) > 0
    coverage = float(covered[foreground].mean()) if foreground.any() else float(covered.mean())
    if coverage < MIN_FOREGROUND_COVERAGE:
        raise DipregError(f"{moving_name}: on the fixed grid the moving image covers {coverage:.0%} of the fixed "
                          f"image's foreground (at least {MIN_FOREGROUND_COVERAGE:.0%} needed); {geometry}")
    values = normalise(sitk.GetArrayViewFromImage(moving_on_fixed)[covered], intensity_range(moving))
    if values.size == 0 or float(values.max() - values.min()) < MIN_RESAMPLED_CONTRAST:
        raise DipregError(f"{moving_name}: resampled onto the fixed grid the moving image is constant; {geometry}")


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (lower, upper corners) of the image's voxel centres."""
    size = np.array(image.GetSize())
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing="ij")).reshape(len(size), -1).T
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners.astype(float)])
    return points.min(axis=0), points.max(axis=0)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-5) -> bool:
    """True when two images share size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def check_compatible(fixed: sitk.Image, moving: sitk.Image, fixed_name: str, moving_name: str) -> None:
    """Raise a DipregError unless both images have one dimensionality and overlap in space."""
    if fixed.GetDimension() != moving.GetDimension():
        raise DipregError(
            f"{moving_name}: moving image is {moving.GetDimension()}D but fixed image "
            f"{fixed_name} is {fixed.GetDimension()}D"
        )
    low_f, high_f = physical_bounds(fixed)
    low_m, high_m = physical_bounds(moving)
    half_voxel = 0.5 * np.maximum(np.array(fixed.GetSpacing()), np.array(moving.GetSpacing()))
    if np.any(np.minimum(high_f, high_m) + half_voxel < np.maximum(low_f, low_m) - half_voxel):
        raise DipregError(
            f"{moving_name}: moving image does not overlap fixed image {fixed_name} in physical space"
        )


#: Interpolation choices of the API, ``apply`` and ``evaluate``. ``label`` is SimpleITK's
#: label-linear interpolation (ANTs' ``genericLabel``): each label's indicator is interpolated
#: linearly and the most likely label wins, so borders stay smooth and no new labels appear.


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform | None = None,
    labels: bool = False,
    default_value: float = 0.0,
    interpolation: str | None = None,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (identity if None).

    ``interpolation`` is one of :data:`INTERPOLATORS`; by default linear for intensities and
    nearest neighbour for label maps (``labels``). The pixel type is kept.
    """
    interpolation = interpolation or ("nearest" if labels else "linear")
    if interpolation not in INTERPOLATORS:
        raise DipregError(f"interpolation {interpolation!r}: choose from {', '.join(INTERPOLATORS)}")
    transform = transform or sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(image, reference, transform, getattr(sitk, INTERPOLATORS[interpolation]), default_value,
                         image.GetPixelID())


def resample_to_fixed(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """The moving image on the fixed grid for optimisation and display, through ``transform``
    (fixed-space points to moving-space points; the identity in physical space if None).

    Outside the moving image's field of view it is padded with its minimum (its background),
    not with 0, which for CT-like intensities would be brighter than the anatomy.
    """
    background = float(sitk.GetArrayViewFromImage(moving).min())
    return resample_to_reference(moving, fixed, transform, default_value=background)


def intensity_range(image: sitk.Image) -> tuple[float, float]:
    """Robust intensity range: the 0.5th and 99.5th percentiles (min/max if they coincide)."""
    array = sitk.GetArrayViewFromImage(image)
    low, high = np.percentile(array, INTENSITY_PERCENTILES)
    if high <= low:
        low, high = float(array.min()), float(array.max())
    return float(low), float(high)


def normalise(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Map ``value_range`` linearly onto [0, 1] and clip; returns float32."""
    low, high = value_range
    return np.clip((np.asarray(array, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def label_map_on(path: str | os.PathLike, image: sitk.Image) -> tuple[sitk.Image, str | None]:
    """A label or mask file as an Int32 map on ``image``'s grid, and a note if it was resampled.

    A map on another grid is resampled in physical space (nearest neighbour): its header is
    trusted, as for every image. (OASIS image A's label map has a slightly different spacing
    and origin than the image; honouring them aligns it better with the tissue contrast than
    copying the image's header does.)
    """
    path = Path(path)
    labels = read_labels(path)
    if labels.GetDimension() != image.GetDimension():
        raise DipregError(f"{path}: label map is {labels.GetDimension()}D but its image is {image.GetDimension()}D")
    labels = sitk.Cast(labels, sitk.sitkInt32)
    if same_grid(labels, image):
        return labels, None
    note = f"{path.name}: resampled onto its image's grid in physical space (nearest neighbour)"
    return resample_to_reference(labels, image, interpolation="nearest"), note


def read_displacement(path: str | os.PathLike) -> sitk.Image:
    """Read an ITK displacement field, with a clear error if the file is not one."""
    path = Path(path)
    if not path.exists():
        raise DipregError(f"{path}: file not found")
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DipregError(f"{path}: cannot read displacement field") from None
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise DipregError(f"{path}: not a displacement field ({field.GetNumberOfComponentsPerPixel()} components "
                          f"in a {field.GetDimension()}D image)")
    return field
