"""Image dissimilarity terms and the diffusion and bending-energy regularisers, as plain functions.

Every similarity loss takes ``(fixed, warped, mask=None)`` tensors ``[N, C, *spatial]`` with
intensities scaled to about [0, 1] and returns a scalar to minimise. ``mask`` is an optional
voxel weight in [0, 1] (``[N, 1, *spatial]`` or the images' shape): a voxel of weight 0 does
not count at all, so a lesion or the field of view's edge can be left out of the similarity.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

SimilarityLoss = Callable[..., torch.Tensor]

#: Histogram bins of the mutual information losses (``mi_bins``), the kernel's padding included.
MI_BINS = 32


def weighted_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over all voxels, each weighted by ``mask`` (broadcast to ``x``; None = 1)."""
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.expand_as(x).sum().clamp_min(1e-8)


def mae(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error (the paper's data term)."""
    return weighted_mean((fixed - warped).abs(), mask)


def mse(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error."""
    return weighted_mean((fixed - warped) ** 2, mask)


def ncc(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
        eps: float = 1e-8) -> torch.Tensor:
    """One minus the global normalised cross-correlation (weighted by ``mask``) of each batch
    element, averaged over the batch (ensemble members stay separate)."""
    batch = warped.shape[0]
    f = fixed.expand_as(warped).reshape(batch, -1)
    w = warped.reshape(batch, -1)
    weight = torch.ones_like(w) if mask is None else mask.expand_as(warped).reshape(batch, -1)
    total = weight.sum(dim=1, keepdim=True).clamp_min(eps)
    f = f - (weight * f).sum(dim=1, keepdim=True) / total
    w = w - (weight * w).sum(dim=1, keepdim=True) / total
    correlation = (weight * f * w).sum(dim=1) / torch.sqrt((weight * f * f).sum(dim=1) * (weight * w * w).sum(dim=1) + eps)
    return (1.0 - correlation).mean()


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

    With a ``mask`` the local statistics count only the window's voxels weighted by it
    (``sum(m f) / sum(m)`` and so on) and the mean over voxels is weighted by it too, so
    masked-out voxels take no part; the fixed statistics are then not cached (the mask
    usually follows the warped moving image).
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

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mean_f, var_f = self._statistics(fixed)
            stacked = torch.cat([warped, warped * warped, fixed * warped], dim=1)
            mean_w, mean_ww, mean_fw = box_mean(stacked, self.window).split(fixed.shape[1], dim=1)
        else:
            mask = mask.expand_as(fixed)
            stacked = torch.cat([mask, mask * fixed, mask * fixed * fixed,
                                 mask * warped, mask * warped * warped, mask * fixed * warped], dim=1)
            weight, *sums = box_mean(stacked, self.window).split(fixed.shape[1], dim=1)
            mean_f, mean_ff, mean_w, mean_ww, mean_fw = (total / weight.clamp_min(1e-6) for total in sums)
            var_f = (mean_ff - mean_f**2).clamp_min(0.0)
        cross = mean_fw - mean_f * mean_w
        var_w = (mean_ww - mean_w**2).clamp_min(0.0)
        return 1.0 - weighted_mean(cross * cross / (var_f * var_w + self.eps), mask)


def lncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """One minus the mean squared local normalised cross-correlation (see :class:`LocalNCC`)."""
    return LocalNCC(window, eps)(fixed, warped, mask)


def cubic_bspline(distance: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel of ``|distance|`` in bin units (support 2, sums to 1 over bins)."""
    d = distance.abs()
    inner = (4.0 - 6.0 * d**2 + 3.0 * d**3) / 6.0
    outer = (2.0 - d).clamp_min(0.0) ** 3 / 6.0
    return torch.where(d < 1.0, inner, outer)


def parzen_weights(values: torch.Tensor, bins: int, inside: torch.Tensor | None = None) -> torch.Tensor:
    """Each voxel's share of every histogram bin, ``[voxels, bins]`` (Mattes et al.'s Parzen window).

    Intensities are binned over the image's own range, taken over the voxels where
    ``inside`` (a boolean tensor of the same size) is true (the range is a constant of the
    loss: no gradient flows through it), onto bin positions ``2 .. bins - 3`` so that the
    cubic B-spline kernel stays inside the histogram.
    """
    values = values.reshape(-1)
    if inside is None:
        low, high = values.detach().amin(), values.detach().amax()
    else:
        inside = inside.reshape(-1)
        low = torch.where(inside, values.detach(), torch.inf).amin()
        high = torch.where(inside, values.detach(), -torch.inf).amax()
    position = (values - low) / (high - low).clamp_min(1e-8) * (bins - 5) + 2.0
    centres = torch.arange(bins, dtype=values.dtype, device=values.device)
    return cubic_bspline(position[:, None] - centres)


def joint_histogram(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                    bins: int = MI_BINS) -> torch.Tensor:
    """Parzen-window joint probability ``p(fixed bin, warped bin)``, ``[bins, bins]``, summing to 1.

    Only voxels with a positive ``mask`` weight count, each with its weight.
    """
    mask = None if mask is None else mask.expand_as(fixed)
    inside = None if mask is None else mask > 0
    fixed_weights = parzen_weights(fixed, bins, inside)
    warped_weights = parzen_weights(warped, bins, inside)
    if mask is not None:
        fixed_weights = fixed_weights * mask.reshape(-1, 1)
    joint = fixed_weights.T @ warped_weights
    return joint / joint.sum().clamp_min(1e-8)


def _entropies(joint: torch.Tensor, eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropies (nats) of the fixed marginal, the warped marginal and the joint distribution."""
    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(eps))).sum()

    return entropy(joint.sum(1)), entropy(joint.sum(0)), entropy(joint)


def mutual_information(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                       bins: int = MI_BINS) -> torch.Tensor:
    """Negative mutual information ``-(H(F) + H(W) - H(F, W))`` (nats) of the Parzen joint histogram."""
    fixed_entropy, warped_entropy, joint_entropy = _entropies(joint_histogram(fixed, warped, mask, bins))
    return joint_entropy - fixed_entropy - warped_entropy


def normalized_mutual_information(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
                                  bins: int = MI_BINS) -> torch.Tensor:
    """Two minus Studholme's normalised mutual information ``(H(F) + H(W)) / H(F, W)`` (in [1, 2])."""
    fixed_entropy, warped_entropy, joint_entropy = _entropies(joint_histogram(fixed, warped, mask, bins))
    return 2.0 - (fixed_entropy + warped_entropy) / joint_entropy.clamp_min(1e-10)


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


#: Every similarity loss by name, built from ``(lncc_window, mi_bins)``.
SIMILARITY_LOSSES: dict[str, Callable[[int, int], SimilarityLoss]] = {
    "mae": lambda window, bins: mae,
    "mse": lambda window, bins: mse,
    "ncc": lambda window, bins: ncc,
    "lncc": lambda window, bins: LocalNCC(window),
    "mi": lambda window, bins: functools.partial(mutual_information, bins=bins),
    "nmi": lambda window, bins: functools.partial(normalized_mutual_information, bins=bins),
}


def similarity_loss(name: str, lncc_window: int = 9, mi_bins: int = MI_BINS) -> SimilarityLoss:
    """Look up a similarity loss of :data:`SIMILARITY_LOSSES` by name."""
    if name not in SIMILARITY_LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(SIMILARITY_LOSSES)}")
    return SIMILARITY_LOSSES[name](lncc_window, mi_bins)
