"""The public entry point :func:`register` and its :class:`RegistrationResult`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from dipreg import __version__
from dipreg.engine import (
    OptimisationResult,
    ProgressCallback,
    RegistrationConfig,
    affine_loss_name,
    make_config,
    optimise,
)
from dipreg.errors import DipregError
from dipreg.images import (
    ImageLike,
    as_image,
    check_compatible,
    check_moving_on_fixed,
    image_shape,
    intensity_range,
    label_map_on,
    normalise,
    resample_to_fixed,
    resample_to_reference,
    same_grid,
    write_image,
)
from dipreg.ensemble import ensemble_spread, member_transforms
from dipreg.field_transform import FieldTransform, affine_transform
from dipreg.initialisation import initial_rotation
from dipreg.losses import similarity_loss
from dipreg.memory import check_memory
from dipreg.metric_catalogue import METRICS
from dipreg.landmarks import landmark_errors, write_landmark_table
from dipreg.metrics import dice, image_metrics, jacobian_statistics, ncc, ssim
from dipreg.outputs import FIELD_DTYPES, make_staging_directory
from dipreg.synthetic import foreground_mask
from dipreg.transforms import (
    Grid,
    displacement_image,
    displacement_transform,
    jacobian_determinant,
    read_transform,
    voxel_displacement_from_image,
)

#: File names written by :meth:`RegistrationResult.save` for every result.
OUTPUT_FILES = ("warped.nii.gz", "displacement.nii.gz", "inverse_displacement.nii.gz", "affine.mat",
                "jacobian.nii.gz", "qc.png", "report.html", "metrics.json")


@dataclass
class RegistrationResult:
    """Outcome of registering a moving image onto a fixed image.

    Attributes:
        fixed: the fixed image (defines the output grid).
        moving: the moving image as given (its own grid, original intensities).
        warped: the moving image resampled by phi onto the fixed grid, original intensities.
        displacement: ITK displacement field (mm, physical axes) on the fixed grid:
            a fixed-space point ``p`` corresponds to ``p + u(p)`` in the moving image.
        jacobian: det(J_phi) on the fixed grid.
        metrics: similarity and regularity figures plus run information.
        loss_history: the loss at every iteration (empty for methods without one).
        field_transform: the transform as optimised (affine stage, deformable part, initial
            transform) with its inverse; see :class:`dipreg.field_transform.FieldTransform`.
        inverse_displacement: ITK displacement field on the moving image's grid mapping
            moving-space points to fixed-space points (``q -> q + w(q)``).
        extra_images: further outputs written by :meth:`save` (file name -> image), such as
            ``warped_labels.nii.gz``.
        landmarks: per-point landmark errors written by :meth:`save` as ``landmarks.csv``.
        uncertainty: with ``ensemble=K > 1``, per voxel of the fixed grid the spread of the
            members' displacements, ``sqrt(trace(cov))`` in mm (saved as ``uncertainty.nii.gz``);
            None for a single run.
        members: with ``ensemble=K > 1``, the K members' transforms (the same affine stage);
            ``field_transform`` is their mean.
    """

    fixed: sitk.Image
    moving: sitk.Image
    warped: sitk.Image
    displacement: sitk.Image
    jacobian: sitk.Image
    metrics: dict[str, Any]
    loss_history: list[float] = field(default_factory=list)
    field_transform: FieldTransform | None = None
    inverse_displacement: sitk.Image | None = None
    extra_images: dict[str, sitk.Image] = field(default_factory=dict)
    landmarks: list[dict[str, float]] = field(default_factory=list)
    uncertainty: sitk.Image | None = None
    members: list[FieldTransform] = field(default_factory=list)

    @property
    def displacement_array(self) -> np.ndarray:
        """Displacement in mm as an array ``[*spatial, ndim]`` (array axis order, vectors last)."""
        return sitk.GetArrayFromImage(self.displacement)

    @property
    def transform(self) -> sitk.DisplacementFieldTransform:
        """The deformation as a SimpleITK transform (fixed-space points to moving-space points)."""
        return displacement_transform(self.displacement)

    @property
    def inverse_transform(self) -> sitk.DisplacementFieldTransform:
        """The inverse deformation as a SimpleITK transform (moving-space points to fixed-space points)."""
        return displacement_transform(self.inverse_displacement)

    def apply(self, image: sitk.Image, labels: bool = False, interpolation: str | None = None) -> sitk.Image:
        """Warp another image of the moving subject onto the fixed grid.

        ``interpolation`` is ``linear``, ``nearest`` or ``label`` (label-linear); the default is
        ``label`` for label maps (``labels``), else ``linear``.
        """
        interpolation = interpolation or ("label" if labels else "linear")
        return resample_to_reference(image, self.fixed, self.transform, interpolation=interpolation)

    def apply_inverse(self, image: sitk.Image, labels: bool = False, interpolation: str | None = None) -> sitk.Image:
        """Warp an image of the fixed subject onto the moving image's grid (same interpolation choices)."""
        interpolation = interpolation or ("label" if labels else "linear")
        return resample_to_reference(image, self.moving, self.inverse_transform, interpolation=interpolation)

    def transform_points(self, points: np.ndarray) -> np.ndarray:
        """Fixed-space points ``[n, ndim]`` (mm, LPS) mapped into the moving image (``p + u(p)``)."""
        return self.field_transform.transform_points(points)

    def propagate_labels(self, moving_labels: sitk.Image, fixed_labels: sitk.Image | None = None,
                         interpolation: str = "label") -> sitk.Image:
        """Warp a label map of the moving image onto the fixed grid; it is saved as
        ``warped_labels.nii.gz``. With ``fixed_labels`` (on the fixed grid) the Dice of every
        label and their mean go into the metrics.
        """
        warped = self.apply(moving_labels, interpolation=interpolation)
        self.extra_images["warped_labels.nii.gz"] = warped
        self.metrics["label_interpolation"] = interpolation
        if fixed_labels is not None:
            per_label = dice(sitk.GetArrayViewFromImage(fixed_labels), sitk.GetArrayViewFromImage(warped))
            self.metrics.update({f"dice_{label}": value for label, value in sorted(per_label.items())})
            self.metrics["dice_mean"] = float(np.nanmean(list(per_label.values()))) if per_label else float("nan")
            self.score_uncertainty(fixed_labels, "labels")
        return warped

    def score_uncertainty(self, region: sitk.Image, name: str) -> float | None:
        """Mean of :attr:`uncertainty` (mm) over the nonzero voxels of ``region`` (an image on the
        fixed grid), stored in the metrics as ``uncertainty_<name>_mean_mm``; None for a single run."""
        if self.uncertainty is None:
            return None
        inside = sitk.GetArrayViewFromImage(region) != 0
        value = float(sitk.GetArrayViewFromImage(self.uncertainty)[inside].mean()) if inside.any() else float("nan")
        self.metrics[f"uncertainty_{name}_mean_mm"] = value
        return value

    def score_landmarks(self, fixed_points: np.ndarray, moving_points: np.ndarray) -> dict[str, float]:
        """Target registration error of corresponding landmarks (mm): ``|p - q|`` before and
        ``|phi(p) - q|`` after; the summary goes into the metrics, the points into ``landmarks.csv``."""
        summary, self.landmarks = landmark_errors(fixed_points, moving_points, self.transform_points(fixed_points))
        self.metrics.update(summary)
        return summary

    def save(self, outdir: str | os.PathLike, field_dtype: str = "float32") -> Path:
        """Write the output files (:data:`OUTPUT_FILES`, plus extra images and landmarks) to ``outdir``.

        Files are written into a temporary sibling directory first and moved into place
        only when all of them exist, so a failure leaves no half-written output. Directories
        and files follow the umask. The displacement field is written as ``field_dtype``
        (see :data:`dipreg.outputs.FIELD_DTYPES`).
        """
        from dipreg.html_report import write_html_report
        from dipreg.reports import save_qc_figure

        outdir = Path(outdir)
        staging = make_staging_directory(outdir)
        try:
            write_image(self.warped, staging / "warped.nii.gz")
            field_type = getattr(sitk, FIELD_DTYPES[field_dtype])
            write_image(sitk.Cast(self.displacement, field_type), staging / "displacement.nii.gz")
            write_image(sitk.Cast(self.inverse_displacement, field_type), staging / "inverse_displacement.nii.gz")
            sitk.WriteTransform(self.field_transform.linear_transform(), str(staging / "affine.mat"))
            write_image(self.jacobian, staging / "jacobian.nii.gz")
            if self.uncertainty is not None:
                write_image(self.uncertainty, staging / "uncertainty.nii.gz")
            for name, image in self.extra_images.items():
                write_image(image, staging / name)
            if self.landmarks:
                write_landmark_table(self.landmarks, staging / "landmarks.csv")
            save_qc_figure(self, staging / "qc.png")
            write_html_report(self, staging / "report.html")
            metrics = {**self.metrics, "loss_history": self.loss_history}
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            publish_directory(staging, outdir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return outdir


def publish_directory(staging: Path, outdir: Path) -> None:
    """Move a finished staging directory to ``outdir`` (merging into it if it exists)."""
    if not outdir.exists():
        staging.rename(outdir)
        return
    for item in staging.iterdir():
        os.replace(item, outdir / item.name)


def result_from_transform(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: FieldTransform,
    info: dict[str, Any],
    loss_history: list[float] | None = None,
) -> RegistrationResult:
    """Warp, Jacobian, inverse and metrics of a transform; shared by every method.

    Args:
        fixed: fixed image; ``transform.fixed`` must be its grid.
        moving: moving image on its own grid.
        transform: the method's answer (fixed-space points to moving-space points).
        info: run information added to the metrics (method, options, seconds...).
        loss_history: loss per iteration, if the method has one.
    """
    displacement = transform.displacement_image()
    inverse = transform.inverse_displacement_image(Grid.from_image(moving))
    warped = resample_to_reference(moving, fixed, displacement_transform(displacement))
    det = jacobian_determinant(voxel_displacement_from_image(displacement)).astype(np.float32)
    jacobian = Grid.from_image(fixed).to_image(det)
    fixed01 = normalise(sitk.GetArrayViewFromImage(fixed), intensity_range(fixed))
    warped01 = normalise(sitk.GetArrayViewFromImage(warped), intensity_range(moving))
    foreground = sitk.GetArrayViewFromImage(foreground_mask(fixed)) != 0
    metrics = {
        **image_metrics(fixed01, warped01),
        **jacobian_statistics(det),
        **transform.inverse_consistency(foreground),
        "inverse_residual_p95_mm": transform.inverse_residual_p95_mm,
        "ssim_definition": METRICS["ssim"].definition,
        "inverse_consistency_definition": METRICS["inverse_consistency_mean_mm"].definition,
        **info,
        "dipreg_version": __version__,
    }
    return RegistrationResult(fixed, moving, warped, displacement, jacobian, metrics, list(loss_history or []),
                              transform, inverse)


def result_from_displacement(
    fixed: sitk.Image,
    moving: sitk.Image,
    displacement: sitk.Image,
    info: dict[str, Any],
    loss_history: list[float] | None = None,
    inverse: sitk.Image | None = None,
) -> RegistrationResult:
    """:func:`result_from_transform` of a dense displacement field on the fixed grid (its
    inverse given, or found by fixed-point iteration)."""
    return result_from_transform(fixed, moving, FieldTransform.from_displacement(displacement, inverse), info,
                                 loss_history)


def load_pair(
    fixed: ImageLike,
    moving: ImageLike,
    channel: int | None = None,
    fixed_channel: int | None = None,
    moving_channel: int | None = None,
    spacing: tuple[float, ...] | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """Read and validate a fixed and a moving image (per-image channels override ``channel``)."""
    fixed_name, moving_name = input_name(fixed, "fixed image"), input_name(moving, "moving image")
    fixed_image = as_image(fixed, fixed_name, spacing, fixed_channel if fixed_channel is not None else channel)
    moving_image = as_image(moving, moving_name, spacing, moving_channel if moving_channel is not None else channel)
    check_compatible(fixed_image, moving_image, fixed_name, moving_name)
    return fixed_image, moving_image


def input_name(image: ImageLike, role: str) -> str:
    """How error messages name an input: its path, else its role."""
    return str(image) if isinstance(image, (str, os.PathLike)) else role


InitialTransform = sitk.Transform | str | os.PathLike | None


def load_initial_transform(initial_transform: InitialTransform, dimension: int) -> sitk.Transform | None:
    """An initial transform given as a transform object or an ITK transform file, checked
    against the images' dimension (None stays None)."""
    initial = read_transform(initial_transform) if isinstance(initial_transform, (str, os.PathLike)) else initial_transform
    if initial is not None and initial.GetDimension() != dimension:
        raise DipregError(f"initial transform is {initial.GetDimension()}D for {dimension}D images")
    return initial


def describe_initial_transform(initial_transform: InitialTransform) -> str:
    """How the metrics name an initial transform (or a mask): its file, or ``given`` for an object."""
    return str(initial_transform) if isinstance(initial_transform, (str, os.PathLike)) else "given"


MaskLike = sitk.Image | str | os.PathLike | None


def mask_on(mask: MaskLike, image: sitk.Image) -> sitk.Image | None:
    """A mask (file or SimpleITK image; non-zero = inside) as a 0/1 UInt8 image on ``image``'s
    grid, resampled in physical space (nearest neighbour) when its grid differs."""
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        labels = label_map_on(mask, image)[0]
    elif mask.GetDimension() != image.GetDimension():
        raise DipregError(f"mask is {mask.GetDimension()}D but its image is {image.GetDimension()}D")
    else:
        labels = mask if same_grid(mask, image) else resample_to_reference(mask, image, interpolation="nearest")
    return sitk.Cast(labels != 0, sitk.sitkUInt8)


def register(
    fixed: ImageLike,
    moving: ImageLike,
    preset: str = "default",
    *,
    channel: int | None = None,
    fixed_channel: int | None = None,
    moving_channel: int | None = None,
    spacing: tuple[float, ...] | None = None,
    initial_transform: InitialTransform = None,
    fixed_mask: MaskLike = None,
    moving_mask: MaskLike = None,
    progress: bool = False,
    callback: ProgressCallback | None = None,
    **options: Any,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a deep image prior (or the classic free field).

    Args:
        fixed: path, SimpleITK image, or numpy array (SimpleITK axis order) of the fixed image.
        moving: the same for the moving image; resampled into the fixed grid's physical
            space first if its geometry differs.
        preset: named option set (see :data:`dipreg.engine.PRESETS`).
        channel: channel to use from multi-channel images; ``fixed_channel`` and
            ``moving_channel`` override it per image.
        spacing: voxel spacing ``(x, y[, z])`` for numpy inputs (default 1 mm).
        initial_transform: a SimpleITK transform or an ITK transform file mapping fixed-space
            points to moving-space points (like ANTs' initial moving transform), applied before
            the affine stage; the returned displacement includes it.
        fixed_mask, moving_mask: where the similarity is computed (a file or SimpleITK
            image, non-zero = inside, resampled in physical space onto its image's grid by
            nearest neighbour): every loss, the affine and the deformable stage, every
            pyramid level; the moving mask moves with the moving image. None = everywhere.
        progress: show a progress bar.
        callback: called as ``callback(iteration, loss)`` after each iteration.
        **options: any field of :class:`dipreg.engine.RegistrationConfig`.

    Returns:
        A :class:`RegistrationResult`; ``result.save(outdir)`` writes the standard files.

    Raises:
        DipregError: for unusable inputs or a diverging optimisation. In this order, before the
            optimisation starts: an option outside its allowed values, the memory needed
            (estimated from the fixed image's header), unreadable or broken images, images
            that do not overlap, and a moving image that on the fixed grid covers too little
            of the fixed foreground or is constant (see :func:`dipreg.images.check_moving_on_fixed`).
    """
    config = make_config(preset, **options)
    pair = prepare_pair(fixed, moving, config, channel=channel, fixed_channel=fixed_channel,
                        moving_channel=moving_channel, spacing=spacing, initial_transform=initial_transform,
                        fixed_mask=fixed_mask, moving_mask=moving_mask)
    return solve(pair, config, preset, progress=progress, callback=callback)


@dataclass
class PreparedPair:
    """A pair read, checked and brought onto the fixed grid, ready for the optimiser.

    Attributes:
        fixed, moving: the images as read (moving on its own grid, original intensities).
        grid: the fixed image's grid.
        initial: the transform the optimisation starts from (the user's initial transform and
            the start search's rotation), or None.
        header_aligned: the moving image on the fixed grid through the headers alone.
        fixed01, moving01: the fixed image and the moving image through ``initial``, on the
            fixed grid, scaled to [0, 1] for the optimisation (0.5-99.5 percentiles).
        fixed_weight, moving_weight: the similarity masks on the fixed grid (0/1), or None.
        info: what the metrics say about the preparation (initial transform, masks, start).
    """

    fixed: sitk.Image
    moving: sitk.Image
    grid: Grid
    initial: sitk.Transform | None
    header_aligned: sitk.Image
    fixed01: np.ndarray
    moving01: np.ndarray
    fixed_weight: np.ndarray | None
    moving_weight: np.ndarray | None
    info: dict[str, Any]


def prepare_pair(fixed: ImageLike, moving: ImageLike, config: RegistrationConfig, *, channel: int | None = None,
                 fixed_channel: int | None = None, moving_channel: int | None = None,
                 spacing: tuple[float, ...] | None = None, initial_transform: InitialTransform = None,
                 fixed_mask: MaskLike = None, moving_mask: MaskLike = None) -> PreparedPair:
    """Read and check a pair, find the start and put the moving image and masks on the fixed grid
    (the arguments are those of :func:`register`); raises a DipregError before any optimisation."""
    # From the fixed image's header (the grid of the whole run), before any voxel is read.
    try:
        check_memory(image_shape(fixed, fixed_channel if fixed_channel is not None else channel), config)
    except DipregError as exc:
        raise DipregError(f"{input_name(fixed, 'fixed image')}: {exc}") from None
    fixed_image, moving_image = load_pair(fixed, moving, channel, fixed_channel, moving_channel, spacing)
    user_initial = load_initial_transform(initial_transform, fixed_image.GetDimension())
    fixed_weight = mask_on(fixed_mask, fixed_image)
    moving_weight = mask_on(moving_mask, moving_image)
    initial, info = starting_transform(fixed_image, moving_image, config, user_initial, fixed_weight, moving_weight)
    header_aligned = (moving_image if same_grid(fixed_image, moving_image)
                      else resample_to_fixed(moving_image, fixed_image))
    moving_on_fixed = header_aligned if initial is None else resample_to_fixed(moving_image, fixed_image, initial)
    check_moving_on_fixed(moving_image, fixed_image, moving_on_fixed, initial,
                          input_name(moving, "moving image"), input_name(fixed, "fixed image"))
    if moving_weight is not None:
        moving_weight = resample_to_reference(moving_weight, fixed_image, initial, interpolation="nearest")
    if user_initial is not None:
        info["initial_transform"] = describe_initial_transform(initial_transform)
    for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if mask is not None:
            info[name] = describe_initial_transform(mask)

    def weight(mask: sitk.Image | None) -> np.ndarray | None:
        return None if mask is None else normalise(sitk.GetArrayViewFromImage(mask), (0.0, 1.0))

    return PreparedPair(
        fixed_image, moving_image, Grid.from_image(fixed_image), initial, header_aligned,
        normalise(sitk.GetArrayViewFromImage(fixed_image), intensity_range(fixed_image)),
        normalise(sitk.GetArrayViewFromImage(moving_on_fixed), intensity_range(moving_image)),
        weight(fixed_weight), weight(moving_weight), info)


def solve(pair: PreparedPair, config: RegistrationConfig, preset: str = "default", progress: bool = False,
          callback: ProgressCallback | None = None) -> RegistrationResult:
    """Optimise a prepared pair and build its result (transform, inverse, warped image, metrics)."""
    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array)[None, None]

    outcome = optimise(tensor(pair.fixed01), tensor(pair.moving01), pair.grid, config, progress=progress,
                       callback=callback, fixed_mask=tensor(pair.fixed_weight), moving_mask=tensor(pair.moving_weight))

    def similarity(moving01: np.ndarray) -> dict[str, float]:
        return {"ssim": ssim(pair.fixed01, moving01), "ncc": ncc(pair.fixed01, moving01)}

    # Before registering: with the headers alone, and after the affine stage (None when skipped).
    before = {
        "identity": similarity(normalise(sitk.GetArrayViewFromImage(pair.header_aligned), intensity_range(pair.moving))),
        "affine": None if outcome.affine_warped is None else similarity(outcome.affine_warped[0, 0].numpy()),
    }
    info = {
        "method": config.method,
        "preset": preset,
        "iterations": outcome.iterations,
        "stop_reason": outcome.stop_reason,
        "seconds": outcome.seconds,
        "device": outcome.device,
        "options": dataclasses.asdict(config),
        "before": before,
        "loss_stages": outcome.loss_stages,
        **pair.info,
    }
    transform = field_transform_from(outcome, pair.grid, config, pair.initial)
    result = result_from_transform(pair.fixed, pair.moving, transform, info, outcome.loss_history)
    if outcome.members is not None:
        add_ensemble(result, outcome.members)
    return result


def add_ensemble(result: RegistrationResult, fields: torch.Tensor) -> None:
    """Give a result (whose transform is the members' mean) its members, its uncertainty image and
    the uncertainty metrics, from the members' fields as optimised (``[K, ndim, *field_shape]``, mm)."""
    result.members = member_transforms(result.field_transform, fields)
    spread = ensemble_spread(result.members)
    result.uncertainty = spread.displacement_std
    result.extra_images["uncertainty_log_jacobian.nii.gz"] = spread.log_jacobian_std
    result.metrics.update({
        "ensemble": len(result.members),
        "uncertainty_mean_mm": float(sitk.GetArrayViewFromImage(spread.displacement_std).mean()),
        "uncertainty_log_jacobian_mean": float(sitk.GetArrayViewFromImage(spread.log_jacobian_std).mean()),
        "uncertainty_definition": "per voxel sqrt(trace(cov)) of the ensemble members' displacements (mm, "
                                  "unbiased over the members); the field is their mean (log-Euclidean for velocity fields)",
    })
    result.score_uncertainty(foreground_mask(result.fixed), "foreground")


def starting_transform(fixed: sitk.Image, moving: sitk.Image, config: RegistrationConfig,
                       user_initial: sitk.Transform | None, fixed_mask: sitk.Image | None = None,
                       moving_mask: sitk.Image | None = None) -> tuple[sitk.Transform | None, dict[str, Any]]:
    """The transform the optimisation starts from: the user's initial transform followed by the
    rotation of ``init moments|search`` (:func:`dipreg.initialisation.initial_rotation`, searched
    on the images as given, or through the user's transform on the fixed grid), and the
    metrics entry describing the rotation."""
    if config.init in ("none", "centers") or (not config.affine and config.transform == "deformable"):
        return user_initial, {}
    if user_initial is not None:
        moving = resample_to_fixed(moving, fixed, user_initial)
        moving_mask = None if moving_mask is None else resample_to_reference(moving_mask, fixed, user_initial,
                                                                               interpolation="nearest")
    similarity = similarity_loss(affine_loss_name(config), mi_bins=config.mi_bins)
    rotation = initial_rotation(config.init, fixed, moving, similarity, fixed_mask, moving_mask)
    if rotation is None:
        return user_initial, {}
    info = {"init_matrix": list(rotation.GetMatrix()), "init_translation": list(rotation.GetTranslation()),
            "init_center": list(rotation.GetCenter())}
    return (rotation if user_initial is None else sitk.CompositeTransform([user_initial, rotation])), info


def field_transform_from(outcome: OptimisationResult, grid: Grid, config: RegistrationConfig,
                         initial: sitk.Transform | None = None) -> FieldTransform:
    """The world-space transform of the optimiser's output (affine stage, field as optimised)."""
    matrix, translation = grid.normalized_affine_to_world(outcome.affine_matrix.double().numpy(),
                                                          outcome.affine_translation.double().numpy())
    if outcome.field is None:
        return FieldTransform(grid, affine_transform(matrix, translation), None, initial=initial)
    field_grid = grid.coarser(tuple(outcome.field.shape[2:]))
    field_image = displacement_image(outcome.field[0].double().numpy(), field_grid)
    return FieldTransform(grid, affine_transform(matrix, translation), field_image,
                          "velocity" if config.field == "svf" else "displacement", config.integration_steps, initial)
