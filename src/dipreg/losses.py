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


def lncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """One minus the mean squared local normalised cross-correlation in a cubic window."""
    pool = F.avg_pool2d if fixed.dim() == 4 else F.avg_pool3d

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return pool(x, window, stride=1, padding=window // 2, count_include_pad=False)

    mean_f, mean_w = local_mean(fixed), local_mean(warped)
    cross = local_mean(fixed * warped) - mean_f * mean_w
    var_f = (local_mean(fixed * fixed) - mean_f**2).clamp_min(0.0)
    var_w = (local_mean(warped * warped) - mean_w**2).clamp_min(0.0)
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
