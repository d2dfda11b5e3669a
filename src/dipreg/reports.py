"""Figures: the per-pair QC panel (moving, fixed, warped, differences, grid, det J)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from dipreg.images import intensity_range, normalise, resample_to_fixed, same_grid  # noqa: E402
from dipreg.transforms import voxel_displacement_from_image  # noqa: E402

if TYPE_CHECKING:
    from dipreg.registration import RegistrationResult


def _planes(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """2D images of an array: itself in 2D, three orthogonal mid-slices in 3D."""
    if volume.ndim == 2:
        return [("", volume)]
    z, y, x = (n // 2 for n in volume.shape)
    return [("axial", volume[z]), ("coronal", volume[:, y]), ("sagittal", volume[:, :, x])]


def _field_planes(voxel_field: np.ndarray) -> list[np.ndarray]:
    """In-plane voxel displacement ``[2, h, w]`` (components along plane columns, rows)."""
    if voxel_field.shape[0] == 2:
        return [voxel_field]
    z, y, x = (n // 2 for n in voxel_field.shape[1:])
    return [
        voxel_field[[0, 1]][:, z],
        voxel_field[[0, 2]][:, :, y],
        voxel_field[[1, 2]][:, :, :, x],
    ]


def _draw_grid(ax: plt.Axes, plane_field: np.ndarray, lines: int = 24) -> None:
    h, w = plane_field.shape[1:]
    step = max(1, min(h, w) // lines)
    rows, cols = np.mgrid[0:h, 0:w]
    warped_cols, warped_rows = cols + plane_field[0], rows + plane_field[1]
    for r in range(0, h, step):
        ax.plot(warped_cols[r], warped_rows[r], color="yellow", linewidth=0.5)
    for c in range(0, w, step):
        ax.plot(warped_cols[:, c], warped_rows[:, c], color="yellow", linewidth=0.5)


def save_qc_figure(result: "RegistrationResult", path: str | os.PathLike) -> None:
    """Write the QC panel of a registration result as a PNG."""
    fixed_image, moving_image = result.fixed, result.moving
    moving_on_fixed = moving_image if same_grid(fixed_image, moving_image) else resample_to_fixed(moving_image, fixed_image)
    fixed = normalise(sitk.GetArrayViewFromImage(fixed_image), intensity_range(fixed_image))
    moving = normalise(sitk.GetArrayViewFromImage(moving_on_fixed), intensity_range(moving_image))
    warped = normalise(sitk.GetArrayViewFromImage(result.warped), intensity_range(moving_image))
    det = sitk.GetArrayViewFromImage(result.jacobian)
    field_planes = _field_planes(voxel_displacement_from_image(result.displacement))

    columns = ["moving", "fixed", "warped", "|fixed - moving|", "|fixed - warped|", "grid on fixed", "det J"]
    planes = list(zip(_planes(moving), _planes(fixed), _planes(warped), _planes(det), field_planes))
    fig, axes = plt.subplots(len(planes), len(columns), figsize=(2.6 * len(columns), 2.8 * len(planes)), squeeze=False)
    origin = "upper" if fixed.ndim == 2 else "lower"  # 3D: superior / anterior up
    det_limit = max(1.5, float(np.abs(det - 1).max()) + 1)
    for row, ((name, m), (_, f), (_, w), (_, d), plane_field) in enumerate(planes):
        panels = [m, f, w, np.abs(f - m), np.abs(f - w)]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, cmap="gray", vmin=0, vmax=1, origin=origin)
        axes[row, 5].imshow(f, cmap="gray", vmin=0, vmax=1, origin=origin)
        _draw_grid(axes[row, 5], plane_field)
        axes[row, 5].set_xlim(-0.5, f.shape[1] - 0.5)
        axes[row, 5].set_ylim(*((f.shape[0] - 0.5, -0.5) if origin == "upper" else (-0.5, f.shape[0] - 0.5)))
        shown = axes[row, 6].imshow(d, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, min(0.0, float(d.min())), det_limit), origin=origin)
        fig.colorbar(shown, ax=axes[row, 6], fraction=0.046, pad=0.04)
        if np.any(d <= 0):
            axes[row, 6].contour(d <= 0, levels=[0.5], colors="black", linewidths=0.6)
        axes[row, 0].set_ylabel(name)
    for col, title in enumerate(columns):
        axes[0, col].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    metrics = result.metrics
    fig.suptitle(
        f"SSIM {metrics['ssim']:.3f}   folding {metrics['folding_percent']:.2f} %   "
        f"SDlogJ {metrics['sdlogj']:.3f}   det J {metrics['jacobian_mean']:.3f} ± {metrics['jacobian_std']:.3f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
