"""Where the rigid/affine stage starts: centres of mass, principal axes, a coarse rotation search.

``init`` option:

* ``none``: the identity.
* ``centers``: the translation that aligns the intensity centres of mass (found by the
  engine's affine stage itself, on the moving image resampled onto the fixed grid).
* ``moments``: a rotation about the centres of mass that maps the principal axes of the fixed
  image's intensity distribution onto the moving image's. Each axis' sign is ambiguous, so
  every proper rotation that does so is tried and the one with the best similarity kept.
* ``search``: the best of the principal-axes candidates and a coarse set of rotations about
  the centres of mass (2D: every 15°; 3D: the 24 rotations that map the axes onto each other,
  each also turned by ±30° about every axis).

``moments`` and ``search`` work in world space (mm) on the images as given, before the moving
image is resampled onto the fixed grid: a moving image whose axes are stored in another order
than the fixed image's may reach outside the fixed grid until it is turned. Candidates are
scored at low resolution (at most :data:`SEARCH_SIZE` voxels per axis) with the rigid/affine
stage's similarity; the winner becomes a world transform applied before the affine stage
(composed with a user's initial transform).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from dipreg.images import intensity_range, normalise, resample_to_reference

#: Starts of the rigid/affine stage (``init`` option).
INITIALISATIONS = ("none", "centers", "moments", "search")

#: Largest size per axis of the grid on which search candidates are scored.
SEARCH_SIZE = 48

#: Best rotations closer than this to the identity are left to the affine stage.
IDENTITY_DEGREES = 1.0

#: A similarity loss ``(fixed, warped, mask) -> tensor`` (see :mod:`dipreg.losses`).
Similarity = Callable[..., torch.Tensor]


def rotation_from_parameters(parameters: torch.Tensor) -> torch.Tensor:
    """The rotation ``exp(K)`` of the skew-symmetric matrix ``K`` of 1 (2D angle) or 3 (3D axis
    times angle, radians) parameters; differentiable."""
    zero = 0 * parameters[0]
    if parameters.numel() == 1:
        angle = parameters[0]
        skew = torch.stack([torch.stack([zero, -angle]), torch.stack([angle, zero])])
    else:
        a, b, c = parameters
        skew = torch.stack([torch.stack([zero, -c, b]), torch.stack([c, zero, -a]), torch.stack([-b, a, zero])])
    return torch.linalg.matrix_exp(skew)


def world_moments(image: sitk.Image, mask: sitk.Image | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centre (mm) and covariance (mm²) of an image (intensities scaled to
    [0, 1] robustly), weighted by ``mask`` (same grid, weights in [0, 1]) if given."""
    weights = normalise(sitk.GetArrayViewFromImage(image), intensity_range(image)).astype(np.float64)
    if mask is not None:
        weights = weights * sitk.GetArrayViewFromImage(mask)
    ndim = image.GetDimension()
    index = np.indices(weights.shape).reshape(ndim, -1)[::-1]  # (x, y[, z]) order
    matrix = np.reshape(image.GetDirection(), (ndim, ndim)) @ np.diag(image.GetSpacing())
    points = matrix @ index + np.asarray(image.GetOrigin())[:, None]
    w = weights.reshape(-1)
    total = max(w.sum(), 1e-8)
    centre = points @ w / total
    offsets = points - centre[:, None]
    return centre, (offsets * w) @ offsets.T / total


def principal_axes_rotations(fixed_covariance: np.ndarray, moving_covariance: np.ndarray) -> list[np.ndarray]:
    """Every proper rotation ``R = V_m S V_f^T`` taking the fixed principal axes onto the moving
    ones (``S`` the sign choices with det R = +1)."""
    fixed_axes = np.linalg.eigh(fixed_covariance)[1]
    moving_axes = np.linalg.eigh(moving_covariance)[1]
    rotations = [moving_axes @ np.diag(signs) @ fixed_axes.T
                 for signs in itertools.product((1.0, -1.0), repeat=len(fixed_covariance))]
    return [rotation for rotation in rotations if np.linalg.det(rotation) > 0]


def rotation_degrees(rotation: np.ndarray) -> float:
    """The angle of a 2D or 3D rotation matrix, in degrees."""
    cos = (np.trace(rotation) - (len(rotation) - 2)) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def axis_rotation(axis: int, angle: float) -> np.ndarray:
    """The 3D rotation by ``angle`` (radians) about coordinate axis ``axis``."""
    a, b = [i for i in range(3) if i != axis]
    rotation = np.eye(3)
    rotation[[a, a, b, b], [a, b, a, b]] = [math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)]
    return rotation


def candidate_rotations(ndim: int) -> list[np.ndarray]:
    """The coarse rotation set of ``search``, the identity first."""
    if ndim == 2:
        return [np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
                for a in np.radians(np.arange(0, 360, 15))]
    axis_maps = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), order] = signs
            if np.linalg.det(matrix) > 0:
                axis_maps.append(matrix)
    axis_maps.sort(key=lambda m: -np.trace(m))  # the identity first
    turns = [np.eye(3)] + [axis_rotation(axis, sign * math.radians(30)) for axis in range(3) for sign in (1, -1)]
    return [axis_map @ turn for axis_map in axis_maps for turn in turns]


def rotation_about(rotation: np.ndarray, fixed_centre: np.ndarray, moving_centre: np.ndarray) -> sitk.AffineTransform:
    """``p -> R (p - c_f) + c_m``: fixed-space points to moving-space points."""
    transform = sitk.AffineTransform(len(fixed_centre))
    transform.SetMatrix(rotation.ravel().tolist())
    transform.SetCenter(fixed_centre.tolist())
    transform.SetTranslation((moving_centre - fixed_centre).tolist())
    return transform


def _coarse(image: sitk.Image | None) -> sitk.Image | None:
    """The image (float) block-averaged to at most :data:`SEARCH_SIZE` voxels per axis."""
    if image is None:
        return None
    factors = [max(1, math.ceil(n / SEARCH_SIZE)) for n in image.GetSize()]
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)


def initial_rotation(method: str, fixed: sitk.Image, moving: sitk.Image, similarity: Similarity,
                     fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None
                     ) -> sitk.AffineTransform | None:
    """The world transform (fixed-space points to moving-space points) that ``moments`` or
    ``search`` start from; None for ``none`` and ``centers``, and when the best rotation is
    within :data:`IDENTITY_DEGREES` of the identity (the engine's own centres-of-mass start then
    serves as well, without resampling the moving image; the affine stage refines the rest).

    Args:
        method: one of :data:`INITIALISATIONS`.
        fixed, moving: the images, each on its own grid.
        similarity: the rigid/affine stage's loss; candidates are scored with it (lower is better).
        fixed_mask, moving_mask: 0/1 masks on their images' grids: the moments are taken and
            the similarity computed inside them.
    """
    if method in ("none", "centers"):
        return None
    coarse_fixed, coarse_moving = _coarse(fixed), _coarse(moving)
    fixed_mask, moving_mask = _coarse(fixed_mask), _coarse(moving_mask)
    fixed_centre, fixed_covariance = world_moments(coarse_fixed, fixed_mask)
    moving_centre, moving_covariance = world_moments(coarse_moving, moving_mask)
    rotations = principal_axes_rotations(fixed_covariance, moving_covariance)
    if method == "search":
        rotations = candidate_rotations(fixed.GetDimension()) + rotations

    background = float(sitk.GetArrayViewFromImage(moving).min())

    def tensor(image: sitk.Image, value_range: tuple[float, float]) -> torch.Tensor:
        return torch.from_numpy(normalise(sitk.GetArrayViewFromImage(image), value_range))[None, None]

    fixed_tensor = tensor(coarse_fixed, intensity_range(fixed))
    fixed_weight = None if fixed_mask is None else tensor(fixed_mask, (0.0, 1.0))
    moving_range = intensity_range(moving)
    best = (math.inf, None, None)
    for rotation in rotations:
        transform = rotation_about(rotation, fixed_centre, moving_centre)
        warped = tensor(resample_to_reference(coarse_moving, coarse_fixed, transform, default_value=background),
                        moving_range)
        weight = fixed_weight
        if moving_mask is not None:
            warped_mask = tensor(resample_to_reference(moving_mask, coarse_fixed, transform), (0.0, 1.0))
            weight = warped_mask if weight is None else weight * warped_mask
        value = float(similarity(fixed_tensor, warped, weight))
        if value < best[0]:
            best = (value, transform, rotation)
    return None if rotation_degrees(best[2]) < IDENTITY_DEGREES else best[1]
