"""Figures: the per-pair QC panel (moving, fixed, warped, differences, grid, det J)."""

from __future__ import annotations

import os
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from dipreg.images import intensity_range, normalise, resample_to_fixed, same_grid  # noqa: E402
from dipreg.transforms import voxel_displacement_from_image  # noqa: E402

class ResultLike(Protocol):
    """What the figures read of a :class:`dipreg.registration.RegistrationResult` (so that this
    module, a lower layer, does not import the registration)."""

    fixed: sitk.Image
    moving: sitk.Image
    warped: sitk.Image
    displacement: sitk.Image
    jacobian: sitk.Image
    metrics: dict[str, Any]
    loss_history: list[float]


#: The orthogonal planes of a 3D volume: name and the array axis (z, y, x order) held fixed.
PLANES_3D = (("axial", 0), ("coronal", 1), ("sagittal", 2))


def plane_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` of a 3D array across array ``axis``."""
    return np.take(volume, index, axis=axis)


def field_plane(voxel_field: np.ndarray, axis: int, index: int) -> np.ndarray:
    """In-plane voxel displacement ``[2, h, w]`` (components along plane columns, rows) of a
    3D field ``[3, z, y, x]`` on the slice ``index`` across array ``axis``."""
    in_plane = [component for component in range(3) if component != 2 - axis]  # components are x, y, z
    return np.take(voxel_field, index, axis=axis + 1)[in_plane]


def _planes(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """2D images of an array: itself in 2D, three orthogonal mid-slices in 3D."""
    if volume.ndim == 2:
        return [("", volume)]
    return [(name, plane_slice(volume, axis, volume.shape[axis] // 2)) for name, axis in PLANES_3D]


def _field_planes(voxel_field: np.ndarray) -> list[np.ndarray]:
    """In-plane voxel displacement ``[2, h, w]`` of each plane of :func:`_planes`."""
    if voxel_field.shape[0] == 2:
        return [voxel_field]
    return [field_plane(voxel_field, axis, voxel_field.shape[axis + 1] // 2) for _, axis in PLANES_3D]


def grid_lines(plane_field: np.ndarray, lines: int = 24) -> list[tuple[np.ndarray, np.ndarray]]:
    """Polylines ``(columns, rows)`` in voxels of a regular grid of the plane moved by its
    in-plane displacement ``[2, h, w]``: about ``lines`` lines across the shorter side."""
    h, w = plane_field.shape[1:]
    step = max(1, min(h, w) // lines)
    rows, cols = np.mgrid[0:h, 0:w]
    warped_cols, warped_rows = cols + plane_field[0], rows + plane_field[1]
    return ([(warped_cols[r], warped_rows[r]) for r in range(0, h, step)]
            + [(warped_cols[:, c], warped_rows[:, c]) for c in range(0, w, step)])


def _draw_grid(ax: plt.Axes, plane_field: np.ndarray, lines: int = 24) -> None:
    for cols, rows in grid_lines(plane_field, lines):
        ax.plot(cols, rows, color="yellow", linewidth=0.5)


def jacobian_norm(det: np.ndarray) -> TwoSlopeNorm:
    """Colour scale of a det J map: centred on 1, from min(0, det J min) to at least 1.5."""
    return TwoSlopeNorm(1.0, min(0.0, float(det.min())), max(1.5, float(np.abs(det - 1).max()) + 1))


def display_images(result: "ResultLike") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, moving (resampled onto the fixed grid) and warped images scaled to [0, 1]."""
    fixed_image, moving_image = result.fixed, result.moving
    moving_on_fixed = moving_image if same_grid(fixed_image, moving_image) else resample_to_fixed(moving_image, fixed_image)
    fixed = normalise(sitk.GetArrayViewFromImage(fixed_image), intensity_range(fixed_image))
    moving = normalise(sitk.GetArrayViewFromImage(moving_on_fixed), intensity_range(moving_image))
    warped = normalise(sitk.GetArrayViewFromImage(result.warped), intensity_range(moving_image))
    return fixed, moving, warped


def save_qc_figure(result: "ResultLike", path: str | os.PathLike) -> None:
    """Write the QC panel of a registration result as a PNG."""
    fixed, moving, warped = display_images(result)
    det = sitk.GetArrayViewFromImage(result.jacobian)
    field_planes = _field_planes(voxel_displacement_from_image(result.displacement))

    columns = ["moving", "fixed", "warped", "|fixed - moving|", "|fixed - warped|", "grid on fixed", "det J"]
    planes = list(zip(_planes(moving), _planes(fixed), _planes(warped), _planes(det), field_planes))
    fig, axes = plt.subplots(len(planes), len(columns), figsize=(2.6 * len(columns), 2.8 * len(planes)), squeeze=False)
    origin = "upper" if fixed.ndim == 2 else "lower"  # 3D: superior / anterior up
    for row, ((name, m), (_, f), (_, w), (_, d), plane_field) in enumerate(planes):
        panels = [m, f, w, np.abs(f - m), np.abs(f - w)]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, cmap="gray", vmin=0, vmax=1, origin=origin)
        axes[row, 5].imshow(f, cmap="gray", vmin=0, vmax=1, origin=origin)
        _draw_grid(axes[row, 5], plane_field)
        axes[row, 5].set_xlim(-0.5, f.shape[1] - 0.5)
        axes[row, 5].set_ylim(*((f.shape[0] - 0.5, -0.5) if origin == "upper" else (-0.5, f.shape[0] - 0.5)))
        shown = axes[row, 6].imshow(d, cmap="RdBu_r", norm=jacobian_norm(det), origin=origin)
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
