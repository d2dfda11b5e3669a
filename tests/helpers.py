"""Small helpers shared by the tests: oblique image geometry."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def rotation_direction(ndim: int, degrees: float) -> tuple[float, ...]:
    """Row-major direction cosines of a rotation: about z in 2D, about z then x in 3D."""
    a = np.deg2rad(degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    if ndim == 2:
        return tuple(rz[:2, :2].ravel())
    b = np.deg2rad(degrees / 2)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def with_geometry(array: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...],
                  direction: tuple[float, ...]) -> sitk.Image:
    """A float32 image of ``array`` (SimpleITK axis order) with the given geometry."""
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def world_points(image: sitk.Image) -> np.ndarray:
    """Physical coordinates of every voxel centre, ``[*spatial, ndim]`` in array axis order."""
    ndim = image.GetDimension()
    shape = tuple(reversed(image.GetSize()))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1], axis=-1)
    matrix = np.reshape(image.GetDirection(), (ndim, ndim)) @ np.diag(image.GetSpacing())
    return np.asarray(image.GetOrigin()) + index.astype(np.float64) @ matrix.T


def smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to [0, 1]: a textured test image without flat areas."""
    from scipy.ndimage import gaussian_filter

    array = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (array - array.min()) / (array.max() - array.min())
