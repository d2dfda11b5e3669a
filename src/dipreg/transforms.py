"""Grids, displacement-field conventions, warping and Jacobians.

Conventions:

* A displacement ``u`` at the API is in world units (mm) with components in SimpleITK's
  physical axes (LPS, ``x, y[, z]``), sampled on the fixed image grid; the deformation is
  ``phi(p) = p + u(p)`` and the warped moving image is ``moving(phi(p))``, exactly as in
  ITK's ``DisplacementFieldTransform``.
* Inside the optimiser fields are tensors ``[N, ndim, *spatial]`` whose channels are in
  the sampler's *normalised* coordinates (``grid_sample`` with ``align_corners=True``,
  channel 0 along the last array axis). :class:`Grid` converts between the two, and is the
  only place that does.
* Spatial tensor axes follow the array order of SimpleITK (``z, y, x``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dipreg.errors import DipregError


@dataclass(frozen=True)
class Grid:
    """Geometry of a voxel grid: size and spacing in ``(x, y[, z])`` order, origin, direction."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Grid":
        """The grid of a SimpleITK image."""
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape (reversed size), as used by numpy and torch tensors."""
        return tuple(reversed(self.size))

    def index_to_world_matrix(self) -> np.ndarray:
        """Matrix ``A`` with ``world = origin + A @ index``."""
        return np.reshape(self.direction, (self.ndim, self.ndim)) @ np.diag(self.spacing)

    def world_to_normalized_matrix(self) -> np.ndarray:
        """Matrix taking a world displacement (mm) to sampler-normalised displacement units."""
        voxel_to_normalized = np.diag([2.0 / (n - 1) for n in self.size])
        return voxel_to_normalized @ np.linalg.inv(self.index_to_world_matrix())

    def world_to_normalized(self, field: torch.Tensor) -> torch.Tensor:
        """Convert a ``[N, ndim, *spatial]`` world displacement to normalised units."""
        return _apply_channel_matrix(self.world_to_normalized_matrix(), field)

    def normalized_to_world(self, field: torch.Tensor) -> torch.Tensor:
        """Convert a ``[N, ndim, *spatial]`` normalised displacement to world units (mm)."""
        return _apply_channel_matrix(np.linalg.inv(self.world_to_normalized_matrix()), field)

    def normalized_affine_to_world(self, matrix: np.ndarray, translation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The world-space form ``p -> A p + b`` of the map ``x -> M x + t`` in sampler-normalised coordinates.

        Normalised coordinates are ``x = N (p - origin) - 1`` with ``N`` the world-to-normalised
        matrix (``-1`` at the first voxel centre, ``+1`` at the last, per axis).
        """
        n = self.world_to_normalized_matrix()
        n_inv = np.linalg.inv(n)
        origin = np.asarray(self.origin)
        ones = np.ones(self.ndim)
        world_matrix = n_inv @ np.asarray(matrix, dtype=np.float64) @ n
        world_translation = origin - world_matrix @ origin + n_inv @ (np.asarray(translation, dtype=np.float64) + ones - matrix @ ones)
        return world_matrix, world_translation

    def coarser(self, shape: tuple[int, ...]) -> "Grid":
        """A grid of array shape ``shape`` spanning the same physical extent (first and last voxel centres)."""
        size = tuple(reversed(shape))
        spacing = tuple(s * (n - 1) / (m - 1) for s, n, m in zip(self.spacing, self.size, size))
        return Grid(size, spacing, self.origin, self.direction)

    def normalized_to_voxel(self, field: torch.Tensor) -> torch.Tensor:
        """Convert a normalised displacement to voxel units of this grid (index order x, y, z)."""
        scale = torch.tensor([(n - 1) / 2.0 for n in self.size], dtype=field.dtype, device=field.device)
        return field * scale.view(1, -1, *([1] * self.ndim))

    def to_image(self, array: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """Wrap an array (array axis order, vector components last) in a SimpleITK image."""
        image = sitk.GetImageFromArray(array, isVector=is_vector)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _apply_channel_matrix(matrix: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(matrix, dtype=field.dtype, device=field.device)
    return torch.einsum("ij,bj...->bi...", m, field)


def identity_grid(shape: tuple[int, ...], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised sampling grid of the identity map, ``[1, *shape, ndim]`` for ``grid_sample``."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(list(reversed(mesh)), dim=-1).unsqueeze(0)


def warp(image: torch.Tensor, displacement: torch.Tensor, identity: torch.Tensor,
         mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image`` at ``identity + displacement`` (normalised units).

    Args:
        image: ``[N, C, *spatial]`` tensor.
        displacement: ``[N, ndim, *spatial]`` normalised displacement.
        identity: grid from :func:`identity_grid` for the displacement's spatial shape.
        mode: ``bilinear`` (linear in 3D too) or ``nearest``.
    """
    ndim = displacement.shape[1]
    order = (0, *range(2, ndim + 2), 1)
    grid = identity + displacement.permute(order)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def integrate_velocity(velocity: torch.Tensor, identity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponentiate a stationary velocity field by scaling and squaring (normalised units)."""
    displacement = velocity / (2**steps)
    for _ in range(steps):
        displacement = displacement + warp(displacement, displacement, identity)
    return displacement


def resize_field(field: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample a normalised field to another grid shape (normalised units are resolution-free)."""
    if tuple(field.shape[2:]) == tuple(shape):
        return field
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(field, size=shape, mode=mode, align_corners=True)


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``[B, C, *spatial]`` along each spatial axis, ``sigma``
    in voxels, the kernel truncated at 3 sigma and normalised to sum 1 (so constants are kept;
    borders replicate the edge value). ``sigma <= 0`` returns the field unchanged."""
    if sigma <= 0:
        return field
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim, channels = field.dim() - 2, field.shape[1]
    conv = F.conv2d if ndim == 2 else F.conv3d
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = kernel.numel()
        padding = [0, 0] * ndim
        # F.pad lists the last axis first
        padding[2 * (ndim - 1 - axis)] = padding[2 * (ndim - 1 - axis) + 1] = radius
        padded = F.pad(field, padding, mode="replicate")
        field = conv(padded, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return field


def jacobian_determinant(voxel_displacement: np.ndarray) -> np.ndarray:
    """det(J_phi) of ``phi(i) = i + v(i)`` by central differences.

    Args:
        voxel_displacement: ``[ndim, *spatial]`` displacement in voxel units, component 0
            along the last array axis (x), as produced by :meth:`Grid.normalized_to_voxel`.

    The determinant in voxel index space equals the one in world space because the
    index-to-world map is affine.
    """
    ndim = voxel_displacement.shape[0]
    # jac[i][j] = d phi_i / d index_j, with index_j the j-th sitk axis (array axis ndim-1-j)
    jac = np.empty((ndim, ndim, *voxel_displacement.shape[1:]), dtype=np.float64)
    for i in range(ndim):
        gradients = np.gradient(voxel_displacement[i].astype(np.float64))
        for j in range(ndim):
            jac[i, j] = gradients[ndim - 1 - j] + (1.0 if i == j else 0.0)
    if ndim == 2:
        return jac[0, 0] * jac[1, 1] - jac[0, 1] * jac[1, 0]
    return (
        jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
        - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
        + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0])
    )


def displacement_image(world_field: np.ndarray, grid: Grid) -> sitk.Image:
    """ITK displacement field image (float64 vectors, mm, physical axes) from ``[ndim, *spatial]``."""
    vectors = np.moveaxis(np.asarray(world_field, dtype=np.float64), 0, -1)
    return grid.to_image(vectors, is_vector=True)


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """An ITK transform that applies a displacement field image (the image is not modified)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read an ITK transform file (.tfm, .txt, .mat, .h5), with clear errors."""
    if not Path(path).exists():
        raise DipregError(f"{path}: transform file not found")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise DipregError(f"{path}: cannot read an ITK transform from this file") from None


def voxel_displacement_from_image(field: sitk.Image) -> np.ndarray:
    """``[ndim, *spatial]`` voxel-unit displacement of an ITK displacement field image."""
    grid = Grid.from_image(field)
    world = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
    matrix = np.linalg.inv(grid.index_to_world_matrix())
    return np.einsum("ij,j...->i...", matrix, world)


def _sample_at_displaced(field: sitk.Image, displacement: sitk.Image) -> np.ndarray:
    """``field(p + displacement(p))`` on ``displacement``'s grid, array ``[*spatial, ndim]``.

    Linear interpolation, continued outside the grid by the edge values (the field is
    padded by replication far enough that the interpolant stays continuous).
    """
    shift = np.sqrt((sitk.GetArrayViewFromImage(displacement) ** 2).sum(axis=-1)).max()
    pad = [int(np.ceil(shift / s)) + 2 for s in field.GetSpacing()]
    padded = sitk.ZeroFluxNeumannPad(sitk.Cast(field, sitk.sitkVectorFloat64), pad, pad)
    sampled = sitk.Resample(padded, displacement, displacement_transform(displacement), sitk.sitkLinear, 0.0,
                            sitk.sitkVectorFloat64, True)
    return sitk.GetArrayFromImage(sampled)


def compose_displacements(outer: sitk.Image, inner: sitk.Image) -> sitk.Image:
    """Displacement of ``p -> q + outer(q)`` with ``q = p + inner(p)``, on ``inner``'s grid.

    ``outer`` is interpolated linearly and continued outside its grid by its edge values.
    """
    composed = sitk.GetArrayViewFromImage(inner) + _sample_at_displaced(outer, inner)
    return Grid.from_image(inner).to_image(composed, is_vector=True)


def invert_displacement(field: sitk.Image, iterations: int = 100, tolerance: float = 1e-4,
                        reference: Grid | None = None, strict: bool = True) -> tuple[sitk.Image, float]:
    """Inverse of a displacement field by fixed-point iteration ``u(y) = -d(y + u(y))``.

    Args:
        field: the displacement ``d`` (ITK displacement image, mm).
        iterations: maximum number of iterations.
        tolerance: stop when the largest update is below this many mm.
        reference: grid of the inverse (default: the field's own grid), e.g. the moving
            image's grid for the inverse of a registration's field.
        strict: raise if the residual stays above ``max(10 tolerance, 1e-3)`` mm; otherwise
            return the best effort with its residual (a folding field has no inverse).

    Returns:
        The inverse field ``u`` on the reference grid, and the residual
        ``max |u(y) + d(y + u(y))|`` in mm.

    Raises:
        DipregError: with ``strict``, if the iteration does not converge (the field is not invertible).
    """
    grid = reference or Grid.from_image(field)
    inverse = grid.to_image(np.zeros((*grid.shape, grid.ndim)), is_vector=True)
    for _ in range(iterations):
        updated = -_sample_at_displaced(field, inverse)
        change = float(np.sqrt(((updated - sitk.GetArrayViewFromImage(inverse)) ** 2).sum(axis=-1)).max())
        inverse = grid.to_image(updated, is_vector=True)
        if change < tolerance:
            break
    # A copy, not a view: the composed image is a temporary that is freed at once.
    residual = float(np.sqrt((sitk.GetArrayFromImage(compose_displacements(field, inverse)) ** 2).sum(axis=-1)).max())
    if strict and residual > max(10 * tolerance, 1e-3):
        raise DipregError(f"displacement inverse did not converge (residual {residual:.3g} mm after {iterations} iterations)")
    return inverse, residual
