"""One catalogue of the metrics dipreg reports: label, unit, decimals, better direction, definition.

Every table that names a metric (the evaluate summary, the compare page, the per-pair HTML
report) reads its label and decimals here, so a metric is described in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """How one metric is shown and read.

    Attributes:
        key: the metric's key in ``result.metrics`` and results.csv.
        label: short name for tables.
        unit: unit of the value ("" for a ratio or score).
        decimals: decimals shown.
        better: ``"higher"``, ``"lower"``, or None where neither direction is better.
        definition: one line saying what the number is.
    """

    key: str
    label: str
    unit: str
    decimals: int
    better: str | None
    definition: str

    @property
    def heading(self) -> str:
        """The label with its unit, e.g. ``EPE mm``."""
        return f"{self.label} {self.unit}" if self.unit else self.label

    @property
    def higher_is_better(self) -> bool | None:
        """True, False, or None when no direction is better."""
        return None if self.better is None else self.better == "higher"

    def format(self, value: float) -> str:
        """The value with this metric's decimals."""
        return f"{value:.{self.decimals}f}"


_DICE = "Dice overlap 2|A∩B| / (|A| + |B|) of the fixed labels and the warped moving labels"

#: Every metric dipreg reports, by key, in the order tables list them.
METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("ssim", "SSIM", "", 3, "higher",
           "structural similarity of fixed and warped (1 = identical): scikit-image structural_similarity on "
           "images scaled to [0, 1] (0.5-99.5 percentiles), data_range=1, 7-voxel window"),
    Metric("ncc", "NCC", "", 3, "higher", "global normalised cross-correlation of fixed and warped, in [-1, 1]"),
    Metric("mse", "MSE", "", 4, "lower", "mean squared difference of fixed and warped, both scaled to [0, 1]"),
    Metric("jacobian_mean", "det J mean", "", 3, None,
           "mean of det(J_phi), the local volume change of the map (1 = none), over the fixed grid"),
    Metric("jacobian_std", "det J std", "", 3, None, "standard deviation of det(J_phi) over the fixed grid"),
    Metric("jacobian_min", "det J min", "", 3, "higher", "smallest det(J_phi) (0 or less: the map folds there)"),
    Metric("folding_percent", "folding", "%", 3, "lower", "percentage of voxels with det(J_phi) <= 0 (folded)"),
    Metric("sdlogj", "SDlogJ", "", 3, "lower",
           "standard deviation of log det(J_phi) over the voxels with det(J_phi) > 0 (roughness of the map)"),
    Metric("dice_mean", "Dice mean", "", 3, "higher", f"mean over labels of the {_DICE}"),
    Metric("mask_dice", "mask Dice", "", 3, "higher", "Dice overlap of the fixed mask and the warped moving mask"),
    Metric("epe_mm", "EPE", "mm", 3, "lower",
           "mean endpoint error: distance between the found and the known displacement, over the fixed mask if any"),
    Metric("tre_before_mean_mm", "TRE before", "mm", 3, None,
           "mean target registration error |p - q| of corresponding landmarks before registration"),
    Metric("tre_after_mean_mm", "TRE after", "mm", 3, "lower",
           "mean target registration error |phi(p) - q| of corresponding landmarks after registration"),
    Metric("inverse_consistency_mean_mm", "inverse consistency", "mm", 3, "lower",
           "mean of |phi^-1(phi(p)) - p| over the fixed image's foreground: how well the written inverse undoes the map"),
    Metric("inverse_consistency_p95_mm", "inverse consistency p95", "mm", 3, "lower",
           "95th percentile of |phi^-1(phi(p)) - p| over the fixed image's foreground"),
    Metric("seconds", "wall time", "s", 1, "lower",
           "wall clock of the registration (of an evaluate pair: the whole call, including warping and metrics)"),
    Metric("optimisation_seconds", "optimisation time", "s", 1, "lower",
           "wall clock of the optimisation loop alone (affine and deformable stages)"),
    Metric("iterations", "iterations", "", 0, None, "Adam iterations of the deformable stage"),
    Metric("peak_memory_mb", "peak memory", "MB", 0, "lower", "peak resident memory of the process during the call"),
)}


def metric_info(key: str) -> Metric:
    """The catalogue entry of ``key``; per-label Dice (``dice_<n>``) and unknown keys get a generic one."""
    if key in METRICS:
        return METRICS[key]
    label = key[5:]
    if key.startswith("dice_") and label.lstrip("-").isdigit():
        return Metric(key, f"Dice label {label}", "", 3, "higher", f"{_DICE}, label {label} only")
    return Metric(key, key, "", 4, None, "")
