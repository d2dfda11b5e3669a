"""Image dissimilarity terms and the diffusion regulariser, as plain functions.

Every similarity loss takes ``(fixed, warped)`` tensors ``[N, C, *spatial]`` with
intensities scaled to about [0, 1] and returns a scalar to minimise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

SimilarityLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mae(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (the paper's data term)."""
    return (fixed - warped).abs().mean()


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return ((fixed - warped) ** 2).mean()


def ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """One minus the global normalised cross-correlation."""
    f = fixed - fixed.mean()
    w = warped - warped.mean()
    return 1.0 - (f * w).sum() / torch.sqrt((f * f).sum() * (w * w).sum() + eps)


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of ``[N, C, *spatial]`` over a box of ``window`` voxels per axis, clipped at the border.

    The box of voxel ``i`` spans ``i - (window - 1) // 2 .. i + window // 2`` per axis (centred
    for odd widths). Computed separably, one axis at a time (a clipped box is a product of
    clipped intervals), so the cost grows with ``window`` rather than ``window ** ndim``.
    """
    ndim = x.dim() - 2
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    before, after = (window - 1) // 2, window // 2
    for axis in range(ndim):
        kernel = [1] * ndim
        kernel[axis] = window
        # avg_pool refuses inputs shorter than the kernel even with padding: pad by hand there.
        if before == after and x.shape[2 + axis] >= window:
            padding = [0] * ndim
            padding[axis] = before
            x = pool(x, kernel, stride=1, padding=padding, count_include_pad=False)
        else:
            # avg_pool pads symmetrically: pad one voxel less before than after by hand (even
            # widths) and divide by the number of voxels inside the image.
            pad = [0, 0] * ndim
            pad[2 * (ndim - 1 - axis)], pad[2 * (ndim - 1 - axis) + 1] = before, after
            count = pool(F.pad(torch.ones_like(x[:1, :1]), pad), kernel, stride=1)
            x = pool(F.pad(x, pad), kernel, stride=1) / count
    return x


def lncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """One minus the mean squared local normalised cross-correlation in a box window.

    Local means use :func:`box_mean` (windows clipped at the image border).
    """
    channels = fixed.shape[1]
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    mean_f, mean_w, mean_ff, mean_ww, mean_fw = box_mean(stacked, window).split(channels, dim=1)
    cross = mean_fw - mean_f * mean_w
    var_f = (mean_ff - mean_f**2).clamp_min(0.0)
    var_w = (mean_ww - mean_w**2).clamp_min(0.0)
    return 1.0 - (cross * cross / (var_f * var_w + eps)).mean()


def diffusion(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared spatial gradient of a ``[N, ndim, *spatial]`` field in mm per mm.

    Args:
        field: displacement or velocity in mm.
        spacing: the field grid's spacing in ``(x, y[, z])`` order.
    """
    ndim = field.dim() - 2
    total = field.new_zeros(())
    for axis in range(ndim):
        step = spacing[ndim - 1 - axis]
        diff = torch.diff(field, dim=axis + 2) / step
        total = total + (diff * diff).mean()
    return total / ndim


def similarity_loss(name: str, lncc_window: int = 9) -> SimilarityLoss:
    """Look up a similarity loss by name: ``mae``, ``mse``, ``ncc`` or ``lncc``."""
    if name == "lncc":
        return lambda fixed, warped: lncc(fixed, warped, window=lncc_window)
    losses: dict[str, SimilarityLoss] = {"mae": mae, "mse": mse, "ncc": ncc}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose from mae, mse, ncc, lncc")
    return losses[name]
