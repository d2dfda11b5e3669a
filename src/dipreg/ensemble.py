"""Ensembles of deep image priors: the members' transforms and how much they disagree.

An ensemble of K networks with different random seeds (``--ensemble K``) is optimised in
one grouped network (see :class:`dipreg.networks.SkipGenerator`); the registration's field
is the members' mean (for velocity fields the log-Euclidean mean: the mean velocity, then
exp). Where the members disagree the images do not pin the correspondence down. This
module turns the members' fields into world-space transforms and measures their spread
on the fixed grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
import torch

from dipreg.field_transform import FieldTransform
from dipreg.transforms import (
    Grid,
    displacement_image,
    jacobian_determinant,
    voxel_displacement_from_image,
)


def member_transforms(combined: FieldTransform, fields: torch.Tensor) -> list[FieldTransform]:
    """The members' transforms: ``combined`` with member ``k``'s field ``fields[k]`` (mm, world axes,
    ``[K, ndim, *field_shape]`` on ``combined``'s deformable grid) as its deformable part."""
    grid = Grid.from_image(combined.deformable)
    return [dataclasses.replace(combined, deformable=displacement_image(field.double().numpy(), grid),
                                deformable_inverse=None)
            for field in fields]


#: det J below this (folding) counts as this value in the log det J spread.
MIN_JACOBIAN = 1e-3


@dataclasses.dataclass
class Spread:
    """Per-voxel disagreement of an ensemble's members on the fixed grid (scalar float32 images).

    Attributes:
        displacement_std: ``sqrt(trace(cov))`` of the members' displacements ``phi_k(p) - p``
            in mm (unbiased covariance over the K members).
        log_jacobian_std: standard deviation over the members of ``log det J_phi_k`` (unbiased;
            det J clamped below at :data:`MIN_JACOBIAN`, so a folding member shows as a large spread).
    """

    displacement_std: sitk.Image
    log_jacobian_std: sitk.Image


def ensemble_spread(members: list[FieldTransform]) -> Spread:
    """The spread of at least two members' dense displacements on their common fixed grid.

    The members are sampled one at a time and accumulated with Welford's update, so only
    a mean and a sum of squares are held besides one member's field.
    """
    if len(members) < 2:
        raise ValueError("the spread of an ensemble needs at least two members")
    grid = members[0].fixed
    mean = squares = None
    for count, member in enumerate(members, start=1):
        image = member.displacement_image(grid)
        log_det = np.log(np.maximum(jacobian_determinant(voxel_displacement_from_image(image)), MIN_JACOBIAN))
        # displacement components and log det J as the channels of one sample
        sample = np.concatenate([sitk.GetArrayFromImage(image), log_det[..., None]], axis=-1)
        if mean is None:
            mean, squares = sample, np.zeros_like(sample)
            continue
        delta = sample - mean
        mean = mean + delta / count
        squares += delta * (sample - mean)
    variance = squares / (len(members) - 1)
    displacement_std = np.sqrt(variance[..., :-1].sum(axis=-1))
    log_jacobian_std = np.sqrt(variance[..., -1])
    return Spread(grid.to_image(displacement_std.astype(np.float32)), grid.to_image(log_jacobian_std.astype(np.float32)))
