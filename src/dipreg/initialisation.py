"""Where the rigid/affine stage starts: centres of mass, principal axes, a coarse rotation search.

Everything works in the engine's sampler-normalised coordinates ``x`` (``-1 .. 1`` per axis,
``(x, y[, z])`` order); rotations are rotations in millimetres, ``M = D^-1 R D`` with ``D``
the images' half extent in mm per axis (:func:`half_extent`), so that they stay rotations
on anisotropic grids. A start is ``(M, t)`` with ``moving(M x + t) ≈ fixed(x)``.

* ``none``: the identity.
* ``centers``: the translation that aligns the intensity centres of mass.
* ``moments``: also the principal axes of the intensity distributions; each axis' sign is
  ambiguous, so every proper rotation that maps the fixed axes onto the moving axes is
  tried and the one with the best similarity kept.
* ``search``: the best of the principal-axes candidates and a coarse set of rotations about
  the centres of mass (2D: every 15°; 3D: the 24 rotations that map the axes onto
  themselves, each also turned by ±30° about every axis), scored at low resolution.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from dipreg.transforms import identity_grid

#: Starts of the rigid/affine stage (``init`` option).
INITIALISATIONS = ("none", "centers", "moments", "search")

#: Scores a candidate start ``(M, t)``: lower is better.
CandidateScore = Callable[[torch.Tensor, torch.Tensor], float]


def half_extent(shape: Sequence[int], spacing: Sequence[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """Half the distance in mm between the first and last voxel centres per axis, ``(x, y[, z])``.

    Args:
        shape: array shape ``(y, x)`` or ``(z, y, x)``.
        spacing: voxel spacing in ``(x, y[, z])`` order.
    """
    return torch.tensor([(n - 1) * s / 2.0 for n, s in zip(reversed(shape), spacing)], device=device)


def image_moments(image: torch.Tensor, identity: torch.Tensor, scale: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensity-weighted centre (normalised coordinates) and covariance (mm², ``scale`` = half
    extent; normalised units without it) of a ``[1, 1, *spatial]`` image, over ``mask`` if given."""
    ndim = identity.shape[-1]
    weights = (image if mask is None else image * mask).reshape(-1, 1).clamp_min(0.0)
    total = weights.sum().clamp_min(1e-8)
    points = identity.reshape(-1, ndim)
    centre = (points * weights).sum(0) / total
    offsets = (points - centre) * (1.0 if scale is None else scale)
    covariance = (offsets * weights).T @ offsets / total
    return centre, covariance


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


def candidate_rotations(ndim: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The coarse rotation set of ``search`` (mm space), the identity first."""
    if ndim == 2:
        return [rotation_from_parameters(torch.tensor([math.radians(a)], device=device)) for a in range(0, 360, 15)]
    axis_maps = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = torch.zeros(3, 3, device=device)
            matrix[list(range(3)), list(order)] = torch.tensor(signs, device=device)
            if torch.det(matrix) > 0:
                axis_maps.append(matrix)
    turn = math.radians(30)
    turns = [torch.eye(3, device=device)] + [
        rotation_from_parameters(torch.tensor(sign * turn * torch.eye(3)[axis].tolist(), device=device))
        for axis in range(3) for sign in (1.0, -1.0)]
    return [axis_map @ small for axis_map in axis_maps for small in turns]


def principal_axes_rotations(fixed_covariance: torch.Tensor, moving_covariance: torch.Tensor) -> list[torch.Tensor]:
    """Every proper rotation ``R = V_m S V_f^T`` taking the fixed principal axes onto the moving
    ones (``S`` the sign choices with det R = +1)."""
    ndim = fixed_covariance.shape[0]
    fixed_axes = torch.linalg.eigh(fixed_covariance.double())[1]
    moving_axes = torch.linalg.eigh(moving_covariance.double())[1]
    rotations = []
    for signs in itertools.product((1.0, -1.0), repeat=ndim):
        rotation = moving_axes @ torch.diag(torch.tensor(signs, dtype=torch.float64)) @ fixed_axes.T
        if torch.det(rotation) > 0:
            rotations.append(rotation.float().to(fixed_covariance.device))
    return rotations


def initial_affine(method: str, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float],
                   score: CandidateScore, fixed_mask: torch.Tensor | None = None,
                   moving_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The start ``(M, t)`` of the rigid/affine stage by ``method`` (one of :data:`INITIALISATIONS`).

    Args:
        method: ``none``, ``centers``, ``moments`` or ``search``.
        fixed, moving: ``[1, 1, *spatial]`` images on one grid, intensities about [0, 1].
        spacing: the grid's spacing, ``(x, y[, z])``.
        score: similarity of a candidate (lower is better), evaluated at low resolution.
        fixed_mask, moving_mask: optional weights: the moments are taken inside them.
    """
    ndim = fixed.dim() - 2
    device = fixed.device
    if method == "none":
        return torch.eye(ndim, device=device), torch.zeros(ndim, device=device)
    identity = identity_grid(tuple(fixed.shape[2:]), device)
    scale = half_extent(fixed.shape[2:], spacing, device)
    fixed_centre, fixed_covariance = image_moments(fixed, identity, scale, fixed_mask)
    moving_centre, moving_covariance = image_moments(moving, identity, scale, moving_mask)
    if method == "centers":
        return torch.eye(ndim, device=device), moving_centre - fixed_centre
    rotations = principal_axes_rotations(fixed_covariance, moving_covariance)
    if method == "search":
        rotations = candidate_rotations(ndim, device) + rotations
    best = (math.inf, None, None)
    for rotation in rotations:
        matrix = rotation / scale[:, None] * scale[None, :]  # D^-1 R D
        translation = moving_centre - matrix @ fixed_centre
        value = score(matrix, translation)
        if value < best[0]:
            best = (value, matrix, translation)
    return best[1], best[2]
