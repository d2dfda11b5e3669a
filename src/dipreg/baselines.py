"""Registration methods to compare: dipreg itself and the baselines ITK, ANTs and identity.

Every method returns a :class:`~dipreg.registration.RegistrationResult` built by
:func:`~dipreg.registration.result_from_transform` from its
:class:`~dipreg.field_transform.FieldTransform` (affine stage, deformable field and its
inverse), so all methods share the output writer and the metric code.
:func:`run_method` also measures the wall-clock seconds and the peak memory of the call.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from dipreg.errors import DipregError
from dipreg.field_transform import FieldTransform, as_affine
from dipreg.images import intensity_range, resample_to_fixed, write_image
from dipreg.options import DEFAULT_PRESETS, METHODS, make_config
from dipreg.registration import (
    InitialTransform,
    MaskLike,
    RegistrationResult,
    describe_initial_transform,
    load_initial_transform,
    register,
    result_from_displacement,
    result_from_transform,
)
from dipreg.transforms import Grid, displacement_image

_SHRINK_FACTORS = [4, 2, 1]
_SMOOTHING_SIGMAS = [2.0, 1.0, 0.0]
_AFFINE_SAMPLES = 20000

#: Settings of the ITK baseline (multi-resolution affine, then a dense displacement field).
ITK_SETTINGS: dict[str, Any] = {
    "affine": {
        "initialiser": "centred geometry",
        "metric": f"Mattes mutual information, 50 bins, ~{_AFFINE_SAMPLES} random samples per level (seeded, one thread)",
        "optimiser": "regular step gradient descent: learning rate 1, min step 1e-4, 200 iterations, relaxation 0.5",
        "shrink_factors": _SHRINK_FACTORS,
        "smoothing_sigmas_mm": _SMOOTHING_SIGMAS,
    },
    "deformable": {
        "transform": "DisplacementFieldTransform on the fixed grid, Gaussian smoothing of the total field (variance 1.5)",
        "metric": "ANTs neighbourhood correlation, radius 2",
        "optimiser": "gradient descent, learning rate estimated each iteration, 100 iterations per level, "
                     "convergence window 10 (1e-6)",
        "shrink_factors": _SHRINK_FACTORS,
        "smoothing_sigmas_mm": _SMOOTHING_SIGMAS,
    },
}

#: How :func:`run_method` measures peak memory.
PEAK_MEMORY_DEFINITIONS = {
    "vmhwm": "peak resident set size of the whole process during the method (Linux VmHWM, reset before the "
             "call; includes what the process already held, which the identity method shows)",
    "maxrss": "peak resident set size of the process since it started (getrusage ru_maxrss): an upper bound",
}


def _multi_resolution(method: sitk.ImageRegistrationMethod) -> None:
    method.SetShrinkFactorsPerLevel(_SHRINK_FACTORS)
    method.SetSmoothingSigmasPerLevel(_SMOOTHING_SIGMAS)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInterpolator(sitk.sitkLinear)


def itk_affine(fixed: sitk.Image, moving: sitk.Image, seed: int = 1) -> sitk.Transform:
    """Affine transform (fixed points to moving points) found by SimpleITK, see :data:`ITK_SETTINGS`.

    ``seed`` seeds the metric's random sampling; 0 would mean SimpleITK's wall-clock seed.
    """
    if seed == sitk.sitkWallClock:
        raise DipregError("ITK seed 0 means a wall-clock seed: give a positive seed for reproducible runs")
    dim = fixed.GetDimension()
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dim),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = float(np.prod(fixed.GetSize()))
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, _AFFINE_SAMPLES * factor**dim / voxels) for factor in _SHRINK_FACTORS], seed)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    _multi_resolution(method)
    method.SetInitialTransform(initial, inPlace=False)
    # The randomly sampled metric is only reproducible single-threaded (its filters and
    # metric take the global default, not the method's own setting).
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return method.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def itk_registration(fixed: sitk.Image, moving: sitk.Image, seed: int = 1) -> RegistrationResult:
    """The paper's baseline: SimpleITK affine, then a deformable displacement-field registration.

    Both stages are multi-resolution (see :data:`ITK_SETTINGS`); the composed transform is
    converted to one displacement field on the fixed grid.

    Args:
        fixed: fixed image.
        moving: moving image (any grid overlapping the fixed one in physical space).
        seed: seed of the affine metric's random sampling (positive).
    """
    affine = itk_affine(fixed, moving, seed)
    zero = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, fixed.GetDimension())
    zero.CopyInformation(fixed)
    deformable = sitk.DisplacementFieldTransform(zero)
    deformable.SetSmoothingGaussianOnUpdate(varianceForUpdateField=0.0, varianceForTotalField=1.5)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsANTSNeighborhoodCorrelation(radius=2)
    method.MetricUseFixedImageGradientFilterOff()
    method.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6,
                                         convergenceWindowSize=10, estimateLearningRate=method.EachIteration)
    method.SetOptimizerScalesFromPhysicalShift()
    _multi_resolution(method)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(deformable, inPlace=True)
    method.Execute(fixed, moving)
    # p -> affine(p + u_deformable(p)), the FieldTransform order; the inverse of the displacement
    # field stage is found by fixed-point iteration.
    transform = FieldTransform(Grid.from_image(fixed), as_affine(affine), deformable.GetDisplacementField(),
                               "displacement")
    info = {"method": "itk", "options": {**ITK_SETTINGS, "seed": seed},
            "stop_reason": method.GetOptimizerStopConditionDescription()}
    return result_from_transform(fixed, moving, transform, info)


def ants_registration(fixed: sitk.Image, moving: sitk.Image, syn_metric: str = "mattes") -> RegistrationResult:
    """ANTsPy ``registration(type_of_transform="SyN")`` with its defaults (affine + SyN).

    ``syn_metric`` is the SyN stage's similarity: ANTsPy's default ``mattes`` (mutual
    information), or ``CC`` (neighbourhood cross-correlation), ``meansquares``, ``demons``.

    The forward transforms are composed by ``antsApplyTransforms`` into one displacement
    field on the fixed grid (the ITK convention dipreg uses), see :func:`ants_result`. Runs
    are not reproducible: ANTsPy seeds the affine stage's random sampling from the clock, and
    threads sum in varying order (fields differ by up to a few mm between runs of one pair,
    SSIM by about 0.005).

    Raises:
        DipregError: if ANTsPy (the ``dipreg[ants]`` extra) is not installed.
    """
    def syn(ants, ants_fixed, ants_moving, prefix):
        outcome = ants.registration(ants_fixed, ants_moving, type_of_transform="SyN", outprefix=prefix)
        return outcome["fwdtransforms"], outcome["warpedmovout"]

    return ants_result(fixed, moving, syn, {"method": "ants", "options": {"type_of_transform": "SyN"}})


#: ``run(ants, ants_fixed, ants_moving, outprefix)`` -> (forward transform files, ANTs' warped image).
AntsRun = Callable[[Any, Any, Any, str], tuple[list[str], Any]]


def ants_result(fixed: sitk.Image, moving: sitk.Image, run: AntsRun, info: dict[str, Any]) -> RegistrationResult:
    """Run an ANTsPy registration and convert its forward transforms into a dipreg result.

    ``run`` gets the ``ants`` module, the two images as ANTs images (read from files, so the
    physical geometry is exactly SimpleITK's) and an output prefix in a temporary folder.
    ``antsApplyTransforms`` composes the forward transforms into one displacement field on
    the fixed grid. ``ants_warped_difference`` in the metrics is the largest difference
    between the moving image warped by that field and ANTs' own warped image, relative to
    the moving intensity range (about 1e-5 when the conventions agree).

    Raises:
        DipregError: if ANTsPy (the ``dipreg[ants]`` extra) is not installed.
    """
    try:
        import ants
    except ImportError:
        raise DipregError("method ants needs ANTsPy: pip install 'dipreg[ants]' (package antspyx)") from None
    with tempfile.TemporaryDirectory(prefix="dipreg-ants-") as tmp:
        write_image(fixed, Path(tmp, "fixed.nii.gz"))
        write_image(moving, Path(tmp, "moving.nii.gz"))
        ants_fixed = ants.image_read(str(Path(tmp, "fixed.nii.gz")))
        ants_moving = ants.image_read(str(Path(tmp, "moving.nii.gz")))
        fwdtransforms, ants_warped_image = run(ants, ants_fixed, ants_moving, str(Path(tmp, "reg_")))
        # [Warp, GenericAffine]: p -> affine(p + warp(p)); antsRegistration writes the warp's inverse beside it.
        warp_path, affine_path = fwdtransforms
        inverse_warp_path = warp_path.replace("Warp.nii.gz", "InverseWarp.nii.gz")
        fields = [sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64) for path in (warp_path, inverse_warp_path)]
        affine = as_affine(sitk.ReadTransform(affine_path))
        ants.image_write(ants_warped_image, str(Path(tmp, "warped.nii.gz")))
        ants_warped = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp, "warped.nii.gz"))))
    for image in fields:
        image.CopyInformation(fixed)
    transform = FieldTransform(Grid.from_image(fixed), affine, fields[0], "displacement", deformable_inverse=fields[1])
    info = {**info, "options": {**info.get("options", {}), "antspyx": ants.__version__}}
    result = result_from_transform(fixed, moving, transform, info)
    # Convention check: our field must reproduce ANTs' own warped image.
    low, high = intensity_range(moving)
    difference = np.abs(sitk.GetArrayFromImage(result.warped) - ants_warped).max() / (high - low)
    result.metrics["ants_warped_difference"] = float(difference)
    return result


def identity_registration(fixed: sitk.Image, moving: sitk.Image) -> RegistrationResult:
    """No registration: a zero field (the moving image only resampled into fixed space)."""
    grid = Grid.from_image(fixed)
    field = displacement_image(np.zeros((grid.ndim, *grid.shape)), grid)
    return result_from_displacement(fixed, moving, field, {"method": "identity", "options": {}})


def _reset_peak_memory() -> str:
    """Reset the process's peak RSS if the OS allows it; returns the measurement used."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return "vmhwm"
    except OSError:
        return "maxrss"


def _peak_memory_mb(measurement: str) -> float:
    if measurement == "vmhwm":
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def check_method(method: str, preset: str | None, options: dict[str, Any]) -> None:
    """Raise a DipregError for an unknown method, or options the method cannot take."""
    if method not in METHODS:
        raise DipregError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in DEFAULT_PRESETS:
        make_config(preset or DEFAULT_PRESETS[method], **{**options, "method": method})
    elif options or preset is not None:
        raise DipregError(f"method {method} takes no registration options (got "
                          f"{', '.join(sorted(options)) or 'preset'}); they apply to dip and classic")


def run_method(method: str, fixed: sitk.Image, moving: sitk.Image, preset: str | None = None,
               initial_transform: InitialTransform = None, fixed_mask: MaskLike = None,
               moving_mask: MaskLike = None, **options: Any) -> RegistrationResult:
    """Register with one of :data:`METHODS`, timing the call and measuring its peak memory.

    Args:
        method: ``dip`` and ``classic`` run :func:`dipreg.register` (``classic`` with the
            free field); ``itk``, ``ants`` and ``identity`` are the baselines.
        fixed: fixed image.
        moving: moving image.
        preset: preset of ``dip`` / ``classic`` (default: ``default`` / ``classic``).
        initial_transform: transform or ITK transform file (fixed-space points to moving-space
            points) every method starts from: ``register`` applies it itself; a baseline
            registers the moving image resampled through it. The result's field includes it.
        fixed_mask, moving_mask: masks of the similarity (``dip`` and ``classic`` only; see
            :func:`dipreg.register`).
        **options: registration options of ``dip`` and ``classic``.

    Returns:
        The result; its metrics hold ``seconds`` (wall clock of the whole call, the same
        for every method), ``peak_memory_mb`` and ``peak_memory_definition``. For ``dip``
        and ``classic`` the optimiser's own time is kept as ``optimisation_seconds``.

    Raises:
        DipregError: for an unknown method, options or masks given to a baseline, or an
            unusable initial transform.
    """
    check_method(method, preset, options)
    if method not in DEFAULT_PRESETS and (fixed_mask is not None or moving_mask is not None):
        raise DipregError(f"method {method} takes no similarity masks; they apply to dip and classic")
    measurement = _reset_peak_memory()
    start = time.perf_counter()
    if method in DEFAULT_PRESETS:
        result = register(fixed, moving, preset or DEFAULT_PRESETS[method], initial_transform=initial_transform,
                          fixed_mask=fixed_mask, moving_mask=moving_mask, **{**options, "method": method})
        result.metrics["optimisation_seconds"] = result.metrics["seconds"]
    else:
        initial = load_initial_transform(initial_transform, fixed.GetDimension())
        start_moving = moving if initial is None else resample_to_fixed(moving, fixed, initial)
        result = _run_baseline(method, fixed, start_moving)
        if initial is not None:
            # The baseline registered the moving image as seen through the initial transform.
            composed = result_from_transform(fixed, moving, dataclasses.replace(result.field_transform, initial=initial), {})
            # The run information of the baseline stays; the scores are those of the composed transform.
            composed.metrics = {**result.metrics, **composed.metrics,
                                "initial_transform": describe_initial_transform(initial_transform)}
            result = composed
    result.metrics["seconds"] = time.perf_counter() - start
    result.metrics["peak_memory_mb"] = _peak_memory_mb(measurement)
    result.metrics["peak_memory_definition"] = PEAK_MEMORY_DEFINITIONS[measurement]
    return result


def _run_baseline(method: str, fixed: sitk.Image, moving: sitk.Image) -> RegistrationResult:
    if method == "identity":
        return identity_registration(fixed, moving)
    try:
        return itk_registration(fixed, moving) if method == "itk" else ants_registration(fixed, moving)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines() or ["unknown error"]
        raise DipregError(f"{method} registration failed: {lines[-1].strip()}") from None
