"""Image pairs with a known deformation, and the endpoint error of a field against it.

A smooth random displacement ``d`` warps a real image: ``moving(x) = fixed(x + d(x))``.
A registration field ``u`` (dipreg's convention, ``warped(y) = moving(y + u(y)) ~ fixed(y)``)
must then satisfy ``u(y) = -d(y + u(y))``: it is the *inverse* of ``d``, not ``d`` (nor
exactly ``-d``). :func:`dipreg.transforms.invert_displacement` solves that fixed point numerically and
:func:`known_warp_pair` returns it as the ground truth to score against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dipreg.errors import DipregError
from dipreg.images import resample_to_reference, same_grid, write_image
from dipreg.metrics import endpoint_error
from dipreg.transforms import (
    Grid,
    displacement_image,
    displacement_transform,
    invert_displacement,
    jacobian_determinant,
    voxel_displacement_from_image,
)


@dataclass
class KnownWarpPair:
    """A fixed image, the moving image made from it, and the true answer.

    Attributes:
        fixed: the original image.
        moving: ``fixed`` warped by ``forward``: ``moving(x) = fixed(x + forward(x))``.
        forward: the random displacement ``d`` (ITK displacement image, mm, fixed grid).
        truth: the inverse of ``d``: the field a registration of ``moving`` onto ``fixed``
            should find (ITK displacement image, mm, fixed grid).
        mask: foreground of ``fixed`` (uint8 image, fixed grid), where errors are scored.
        inverse_residual: max over the image of ``|truth(y) + d(y + truth(y))|`` in mm.
    """

    fixed: sitk.Image
    moving: sitk.Image
    forward: sitk.Image
    truth: sitk.Image
    mask: sitk.Image
    inverse_residual: float

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write the images as NIfTI files to ``directory``; returns their paths by name.

        Names: ``fixed``, ``moving``, ``forward``, ``true_displacement`` and ``mask``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        images = {"fixed": self.fixed, "moving": self.moving, "forward": self.forward,
                  "true_displacement": self.truth, "mask": self.mask}
        paths = {name: directory / f"{name}.nii.gz" for name in images}
        for name, image in images.items():
            write_image(image, paths[name])
        return paths


def random_displacement(reference: sitk.Image, max_displacement: float = 8.0,
                        smoothness: float = 16.0, seed: int = 0) -> sitk.Image:
    """A smooth random displacement field on ``reference``'s grid.

    White noise per component, smoothed by a Gaussian and scaled so that the largest
    vector is ``max_displacement`` long; its statistics are the same everywhere in the grid.

    Args:
        reference: image whose grid the field lives on.
        max_displacement: length of the largest displacement vector, in mm.
        smoothness: standard deviation of the Gaussian smoothing, in mm.
        seed: seed of the noise.

    Returns:
        An ITK displacement field image (float64 vectors, mm, physical axes).

    Raises:
        DipregError: if the field folds (det J <= 0.1 somewhere): lower the magnitude or
            raise the smoothness.
    """
    grid = Grid.from_image(reference)
    rng = np.random.default_rng(seed)
    # Smooth noise on a grid padded by 4 sigma, then crop: statistics stay uniform up to the edges.
    pad = [int(np.ceil(4 * smoothness / s)) for s in reversed(grid.spacing)]
    crop = tuple(slice(p, p + n) for p, n in zip(pad, grid.shape))
    components = []
    for _ in range(grid.ndim):
        noise = sitk.GetImageFromArray(rng.standard_normal([n + 2 * p for n, p in zip(grid.shape, pad)]))
        noise.SetSpacing(grid.spacing)
        components.append(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, smoothness))[crop])
    world = np.stack(components).astype(np.float64)
    world *= max_displacement / np.sqrt((world**2).sum(axis=0)).max()
    field = displacement_image(world, grid)
    det_min = float(jacobian_determinant(voxel_displacement_from_image(field)).min())
    if det_min <= 0.1:
        raise DipregError(f"random displacement of {max_displacement} mm with smoothness {smoothness} mm "
                          f"is nearly folding (min det J {det_min:.2f}); lower the magnitude or raise the smoothness")
    return field


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """Foreground of an image: Otsu threshold with holes filled (uint8, 1 inside)."""
    mask = sitk.OtsuThreshold(image, 0, 1)
    return sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)


def known_warp_pair(fixed: sitk.Image, max_displacement: float = 8.0, smoothness: float = 16.0,
                    seed: int = 0) -> KnownWarpPair:
    """Make a moving image from ``fixed`` with a random smooth deformation, and its answer.

    Args:
        fixed: a real scalar image (2D or 3D).
        max_displacement: largest displacement of the random field, mm.
        smoothness: Gaussian smoothing of the random field, mm.
        seed: seed of the random field.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    forward = random_displacement(fixed, max_displacement, smoothness, seed)
    moving = resample_to_reference(fixed, fixed, displacement_transform(forward))
    truth, residual = invert_displacement(forward)
    return KnownWarpPair(fixed, moving, forward, truth, foreground_mask(fixed), residual)


def displacement_endpoint_error(displacement: sitk.Image, truth: sitk.Image,
                                mask: sitk.Image | None = None) -> float:
    """Mean endpoint error in mm of a displacement field against the true one.

    Args:
        displacement: estimated ITK displacement field (mm) on the fixed grid.
        truth: true field on the same grid.
        mask: where to score (non-zero voxels; same grid); the whole image if None.

    Raises:
        DipregError: if the grids differ or the mask is empty.
    """
    for name, image in (("true displacement", truth), ("mask", mask)):
        if image is not None and not same_grid(image, displacement):
            raise DipregError(f"{name} grid {image.GetSize()} does not match the displacement field "
                              f"grid {displacement.GetSize()}")
    estimated = np.moveaxis(sitk.GetArrayFromImage(displacement), -1, 0)
    true = np.moveaxis(sitk.GetArrayFromImage(truth), -1, 0)
    region = None
    if mask is not None:
        region = sitk.GetArrayViewFromImage(mask) != 0
        if not region.any():
            raise DipregError("mask for the endpoint error is empty")
    return endpoint_error(estimated, true, region)
