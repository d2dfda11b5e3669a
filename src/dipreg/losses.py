"""Image dissimilarity terms and the diffusion and bending-energy regularisers, as plain functions.

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
    for odd widths). Computed separably from cumulative sums (a clipped box is a product of
    clipped intervals), so the cost does not grow with ``window``.
    """
    ndim = x.dim() - 2
    before, after = (window - 1) // 2, window // 2
    for axis in range(2, 2 + ndim):
        n = x.shape[axis]
        # Prefix sums padded so that both ends of every box are shifted views: padded[before + k]
        # is the sum of the first clamp(k, 0, n) voxels, for k = -before .. n + after.
        cumulative = torch.cumsum(x, dim=axis)
        head = [before + 1 if d == axis else size for d, size in enumerate(x.shape)]
        tail = [after if d == axis else -1 for d in range(x.dim())]
        padded = torch.cat([x.new_zeros(head), cumulative, cumulative.narrow(axis, n - 1, 1).expand(tail)], dim=axis)
        index = torch.arange(n, device=x.device)
        count = (index + after + 1).clamp_max(n) - (index - before).clamp_min(0)
        count_shape = [1] * x.dim()
        count_shape[axis] = n
        inverse_count = (1.0 / count.to(x.dtype)).reshape(count_shape)
        x = (padded.narrow(axis, before + after + 1, n) - padded.narrow(axis, 0, n)) * inverse_count
    return x


class LocalNCC:
    """One minus the mean squared local normalised cross-correlation in a box window.

    Local means use :func:`box_mean`. The fixed image's local statistics are computed once
    per fixed tensor and reused while the same (unmodified) tensor is passed again, which
    saves two fifths of the work in an optimisation loop.
    """

    def __init__(self, window: int = 9, eps: float = 1e-5):
        self.window, self.eps = window, eps
        self._fixed: tuple[torch.Tensor, int] | None = None
        self._fixed_statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def _statistics(self, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._fixed is not None and self._fixed[0] is fixed and self._fixed[1] == fixed._version
        if not cached:
            mean_f, mean_ff = box_mean(torch.cat([fixed, fixed * fixed], dim=1), self.window).split(fixed.shape[1], dim=1)
            statistics = (mean_f, (mean_ff - mean_f**2).clamp_min(0.0))
            if fixed.requires_grad:  # part of a graph: not reusable across backward passes
                return statistics
            self._fixed, self._fixed_statistics = (fixed, fixed._version), statistics
        return self._fixed_statistics

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        mean_f, var_f = self._statistics(fixed)
        stacked = torch.cat([warped, warped * warped, fixed * warped], dim=1)
        mean_w, mean_ww, mean_fw = box_mean(stacked, self.window).split(fixed.shape[1], dim=1)
        cross = mean_fw - mean_f * mean_w
        var_w = (mean_ww - mean_w**2).clamp_min(0.0)
        return 1.0 - (cross * cross / (var_f * var_w + self.eps)).mean()


def lncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """One minus the mean squared local normalised cross-correlation (see :class:`LocalNCC`)."""
    return LocalNCC(window, eps)(fixed, warped)


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


def bending_energy(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Thin-plate bending energy per voxel of a ``[N, ndim, *spatial]`` field (mm per mm², squared).

    The squared second derivatives summed over components and axis pairs (mixed ones counted
    twice, as in the energy's definition), averaged over voxels; each from differences of
    differences, which are exact for quadratic fields (``x**2`` gives 4, ``x * y`` gives 2). Compared with
    :func:`diffusion` it penalises smooth, large-scale motion much less than fine-scale roughness.

    Args:
        field: displacement or velocity in mm.
        spacing: the field grid's spacing in ``(x, y[, z])`` order.
    """
    ndim = field.dim() - 2
    total = field.new_zeros(())
    for a in range(ndim):
        first = torch.diff(field, dim=a + 2) / spacing[ndim - 1 - a]
        for b in range(ndim):
            second = torch.diff(first, dim=b + 2) / spacing[ndim - 1 - b]
            total = total + (second * second).sum(dim=1).mean()
    return total


def similarity_loss(name: str, lncc_window: int = 9) -> SimilarityLoss:
    """Look up a similarity loss by name: ``mae``, ``mse``, ``ncc`` or ``lncc``."""
    if name == "lncc":
        return LocalNCC(lncc_window)
    losses: dict[str, SimilarityLoss] = {"mae": mae, "mse": mse, "ncc": ncc}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose from mae, mse, ncc, lncc")
    return losses[name]
