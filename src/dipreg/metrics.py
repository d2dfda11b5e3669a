"""Registration quality metrics: similarity, regularity of the deformation, overlap, error.

SSIM is scikit-image's ``structural_similarity`` on images scaled to [0, 1] with
``data_range=1`` (never the float default of older releases, which inflates SSIM).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def ssim(fixed: np.ndarray, warped: np.ndarray) -> float:
    """SSIM of two images already scaled to [0, 1] (``data_range=1``, 7-voxel window).

    Images thinner than 7 voxels along some axis use the widest odd window that fits; SSIM is
    undefined (NaN) for images 2 voxels thin, which leave no room for a 3-voxel window.
    """
    smallest = min(fixed.shape)
    win_size = 7 if smallest >= 7 else smallest - (1 - smallest % 2)
    if win_size < 3:
        return float("nan")
    return float(structural_similarity(fixed, warped, data_range=1.0, win_size=win_size))


def ncc(fixed: np.ndarray, warped: np.ndarray) -> float:
    """Global normalised cross-correlation in [-1, 1] (0 if either image is constant)."""
    f = fixed.astype(np.float64) - fixed.mean()
    w = warped.astype(np.float64) - warped.mean()
    denominator = np.sqrt((f * f).sum() * (w * w).sum())
    return float((f * w).sum() / denominator) if denominator > 0 else 0.0


def mse(fixed: np.ndarray, warped: np.ndarray) -> float:
    """Mean squared error."""
    return float(np.mean((fixed.astype(np.float64) - warped.astype(np.float64)) ** 2))


def jacobian_statistics(det: np.ndarray) -> dict[str, float]:
    """Mean, std and minimum of det(J), the percentage of voxels with det(J) <= 0, and SDlogJ.

    SDlogJ is the standard deviation of log det(J) over the voxels where det(J) > 0.
    """
    det = np.asarray(det, dtype=np.float64)
    positive = det[det > 0]
    return {
        "jacobian_mean": float(det.mean()),
        "jacobian_std": float(det.std()),
        "jacobian_min": float(det.min()),
        "folding_percent": float(100.0 * np.mean(det <= 0)),
        "sdlogj": float(np.log(positive).std()) if positive.size else float("nan"),
    }


def dice(fixed_labels: np.ndarray, warped_labels: np.ndarray,
         labels: list[int] | None = None) -> dict[int, float]:
    """Dice overlap per label (all non-zero labels of the fixed map by default)."""
    if labels is None:
        labels = [int(v) for v in np.unique(fixed_labels) if v != 0]
    scores = {}
    for label in labels:
        a, b = fixed_labels == label, warped_labels == label
        total = a.sum() + b.sum()
        scores[int(label)] = float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")
    return scores


def endpoint_error(estimated: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean Euclidean distance between two ``[ndim, *spatial]`` displacement fields (same units)."""
    error = np.sqrt(((np.asarray(estimated) - np.asarray(truth)) ** 2).sum(axis=0))
    return float(error[mask].mean() if mask is not None else error.mean())


def image_metrics(fixed: np.ndarray, warped: np.ndarray) -> dict[str, float]:
    """SSIM, NCC and MSE of a fixed and a warped image, both scaled to [0, 1]."""
    return {"ssim": ssim(fixed, warped), "ncc": ncc(fixed, warped), "mse": mse(fixed, warped)}
