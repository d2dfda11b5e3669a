"""The transform a registration produces, in world space, with its inverse.

Every method's answer is one :class:`FieldTransform`: fixed-space points ``p`` (mm, LPS)
map to moving-space points

    phi(p) = initial(affine(p + u(p)))

where ``u`` is the deformable part as it was optimised — ``exp(v)`` of a stationary velocity
field ``v`` (scaling and squaring) or a plain displacement field — on its own grid spanning
the fixed image, ``affine`` is the affine stage and ``initial`` an optional user transform.
This is ITK's ``CompositeTransform`` order (``[initial, affine, field]``, the last applied
first) and ANTs' (``[Warp, GenericAffine]`` in ``apply_transforms``). The inverse is exact
in construction for a velocity field (``exp(-v)``, then the inverse affine) and found by
fixed-point iteration for a displacement field (with its residual).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk
import torch

from dipreg.errors import DipregError
from dipreg.transforms import (
    Grid,
    compose_displacements,
    displacement_image,
    displacement_transform,
    identity_grid,
    integrate_velocity,
    invert_displacement,
)

FieldKind = Literal["velocity", "displacement"]


def exponentiate(velocity: sitk.Image, steps: int) -> sitk.Image:
    """Displacement ``exp(v) - id`` of a stationary velocity field (ITK vector image, mm)."""
    grid = Grid.from_image(velocity)
    world = torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(velocity).astype(np.float64), -1, 0)[None])
    normalized = integrate_velocity(grid.world_to_normalized(world), identity_grid(grid.shape, dtype=torch.float64), steps)
    return displacement_image(grid.normalized_to_world(normalized)[0].numpy(), grid)


def negated(field_image: sitk.Image) -> sitk.Image:
    """``-v`` of a vector image, same grid."""
    grid = Grid.from_image(field_image)
    return grid.to_image(-sitk.GetArrayFromImage(field_image).astype(np.float64), is_vector=True)


def affine_transform(matrix: np.ndarray, translation: np.ndarray) -> sitk.AffineTransform:
    """``p -> A p + b`` as a SimpleITK affine transform (centre at the origin)."""
    ndim = len(translation)
    transform = sitk.AffineTransform(ndim)
    transform.SetMatrix([float(v) for v in np.asarray(matrix).ravel()])
    transform.SetTranslation([float(v) for v in translation])
    return transform


def linear_part(transform: sitk.Transform, ndim: int, extent: float = 100.0) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A, b)`` when ``transform`` is affine (checked on random points), else None."""
    origin = np.asarray(transform.TransformPoint([0.0] * ndim))
    columns = [np.asarray(transform.TransformPoint(list(extent * e))) - origin for e in np.eye(ndim)]
    matrix = np.stack(columns, axis=1) / extent
    points = np.random.default_rng(0).uniform(-extent, extent, (8, ndim))
    for point in points:
        if np.abs(np.asarray(transform.TransformPoint(point.tolist())) - (matrix @ point + origin)).max() > 1e-6 * extent:
            return None
    return matrix, origin


def as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Any affine SimpleITK transform (composite, Euler, similarity...) as one ``AffineTransform``."""
    linear = linear_part(transform, transform.GetDimension())
    if linear is None:
        raise DipregError(f"{transform.GetName()} is not an affine transform")
    return affine_transform(*linear)


@dataclass
class FieldTransform:
    """``phi(p) = initial(affine(p + u(p)))``: fixed-space points to moving-space points (mm).

    Attributes:
        fixed: the fixed image grid (where the dense forward field is sampled).
        affine: the affine stage (identity when there was none).
        deformable: the deformable part as optimised, an ITK vector image in mm (world axes)
            on a grid covering the fixed image: a stationary velocity field (``kind``
            ``velocity``) or a displacement field (``displacement``); None for affine-only.
        kind: how ``deformable`` is read.
        integration_steps: scaling-and-squaring steps of a velocity field.
        initial: a transform applied after the affine stage (a user's starting transform).
        deformable_inverse: the inverse of ``p -> p + u(p)`` when a method provides it (ANTs'
            InverseWarp); otherwise it is computed.
    """

    fixed: Grid
    affine: sitk.AffineTransform
    deformable: sitk.Image | None = None
    kind: FieldKind = "velocity"
    integration_steps: int = 7
    initial: sitk.Transform | None = None
    deformable_inverse: sitk.Image | None = field(default=None, repr=False)

    @classmethod
    def identity(cls, fixed: Grid) -> "FieldTransform":
        """The identity map on ``fixed``."""
        return cls(fixed, affine_transform(np.eye(fixed.ndim), np.zeros(fixed.ndim)), None, "displacement")

    @classmethod
    def from_displacement(cls, displacement: sitk.Image, inverse: sitk.Image | None = None) -> "FieldTransform":
        """A dense displacement field on the fixed grid (``phi(p) = p + u(p)``), with its inverse if known."""
        grid = Grid.from_image(displacement)
        return cls(grid, affine_transform(np.eye(grid.ndim), np.zeros(grid.ndim)), displacement, "displacement",
                   deformable_inverse=inverse)

    @property
    def ndim(self) -> int:
        return self.fixed.ndim

    # -- the deformable part ----------------------------------------------------------------

    @functools.cached_property
    def deformable_displacement(self) -> sitk.Image | None:
        """``u`` of ``p -> p + u(p)`` on the deformable part's own grid (None without one)."""
        if self.deformable is None or self.kind == "displacement":
            return self.deformable
        return exponentiate(self.deformable, self.integration_steps)

    @functools.cached_property
    def _deformable_inverse_and_residual(self) -> tuple[sitk.Image | None, float]:
        forward = self.deformable_displacement
        if forward is None:
            return None, 0.0
        if self.deformable_inverse is not None:
            inverse = self.deformable_inverse
        elif self.kind == "velocity":
            inverse = exponentiate(negated(self.deformable), self.integration_steps)
        else:
            inverse, _ = invert_displacement(forward, tolerance=1e-3, strict=False)
        composed = sitk.GetArrayFromImage(compose_displacements(inverse, forward))
        return inverse, float(np.percentile(np.sqrt((composed**2).sum(axis=-1)), 95))

    @property
    def deformable_inverse_displacement(self) -> sitk.Image | None:
        """The inverse of ``p -> p + u(p)`` as a displacement on ``u``'s grid."""
        return self._deformable_inverse_and_residual[0]

    @property
    def inverse_residual_p95_mm(self) -> float:
        """95th percentile of ``|u(q) + u_inv(q + u(q))|`` in mm over the deformable part's grid
        (0 without one); its edge, where fields are continued outside their grid, is included."""
        return self._deformable_inverse_and_residual[1]

    # -- composed maps ----------------------------------------------------------------------

    def to_sitk(self) -> sitk.CompositeTransform:
        """The forward map as a SimpleITK transform (what ``sitk.Resample`` of the moving image takes)."""
        composite = sitk.CompositeTransform(self.ndim)
        if self.initial is not None:
            composite.AddTransform(self.initial)
        composite.AddTransform(self.affine)
        if self.deformable_displacement is not None:
            composite.AddTransform(displacement_transform(self.deformable_displacement))
        return composite

    def inverse_sitk(self) -> sitk.CompositeTransform:
        """The inverse map (moving-space points to fixed-space points) as a SimpleITK transform."""
        composite = sitk.CompositeTransform(self.ndim)
        if self.deformable_inverse_displacement is not None:
            composite.AddTransform(displacement_transform(self.deformable_inverse_displacement))
        composite.AddTransform(self.affine.GetInverse())
        if self.initial is not None:
            try:
                composite.AddTransform(self.initial.GetInverse())
            except RuntimeError:
                raise DipregError(f"the initial transform ({self.initial.GetName()}) has no inverse") from None
        return composite

    def displacement_image(self, grid: Grid | None = None) -> sitk.Image:
        """The dense forward displacement ``phi(p) - p`` (mm) on ``grid`` (default: the fixed grid)."""
        return _sample_displacement(self.to_sitk(), grid or self.fixed)

    def inverse_displacement_image(self, grid: Grid) -> sitk.Image:
        """The dense inverse displacement ``phi^-1(q) - q`` (mm) on ``grid`` (usually the moving image's)."""
        return _sample_displacement(self.inverse_sitk(), grid)

    def transform_points(self, points: np.ndarray) -> np.ndarray:
        """``phi`` of fixed-space points ``[n, ndim]`` (mm): where each lies in the moving image."""
        return _map_points(self.to_sitk(), points)

    def inverse_transform_points(self, points: np.ndarray) -> np.ndarray:
        """``phi^-1`` of moving-space points ``[n, ndim]`` (mm): where each lies in the fixed image."""
        return _map_points(self.inverse_sitk(), points)

    def linear_transform(self) -> sitk.AffineTransform:
        """The linear part applied before the deformable field: ``initial o affine`` when the
        initial transform is affine, else the affine stage alone (what ``affine.mat`` holds)."""
        if self.initial is None:
            return self.affine
        linear = linear_part(sitk.CompositeTransform([self.initial, self.affine]), self.ndim)
        return self.affine if linear is None else affine_transform(*linear)

    def inverse_consistency(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """``|phi^-1(phi(p)) - p|`` over the fixed grid (or its ``mask``): mean and 95th percentile, mm."""
        round_trip = sitk.CompositeTransform(self.ndim)
        round_trip.AddTransform(self.inverse_sitk())
        round_trip.AddTransform(self.to_sitk())
        error = np.sqrt((sitk.GetArrayFromImage(_sample_displacement(round_trip, self.fixed)) ** 2).sum(axis=-1))
        values = error[mask] if mask is not None and mask.any() else error.ravel()
        return {"inverse_consistency_mean_mm": float(values.mean()),
                "inverse_consistency_p95_mm": float(np.percentile(values, 95))}


def _sample_displacement(transform: sitk.Transform, grid: Grid) -> sitk.Image:
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.size, grid.origin,
                                             grid.spacing, grid.direction)


def _map_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != transform.GetDimension():
        raise DipregError(f"points must be an array [n, {transform.GetDimension()}] in mm; got shape {points.shape}")
    return np.array([transform.TransformPoint(point.tolist()) for point in points]).reshape(points.shape)
