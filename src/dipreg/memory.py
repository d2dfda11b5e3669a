"""Peak memory of a registration, estimated before it starts, and the check that refuses one.

The estimate models a CPU run of :func:`dipreg.register` as two phases on top of a fixed
cost (interpreter, libraries and the two input images):

* the optimisation loop: the tensors autograd saves in one iteration at the finest loss
  level (network activations on the field grid, field integration and resizing, warp
  grids, loss intermediates, e.g. the ``[voxels, bins]`` Parzen weights of the mutual
  information losses), counted exactly on the ``meta`` device without allocating
  them, times a factor for the gradients alive during the backward pass; plus weights,
  gradients and the two Adam moments;
* the outputs: the full-resolution field (float32 and float64 copies, the SimpleITK
  field), the warped image, det(J) with its gradients and the SSIM intermediates.

The constants were fitted to peak RSS measured in fresh processes (2D ANTs slices at 128²,
256² and 1024², default and paper presets; OASIS at 48×64×53, 72×96×80 and 144×192×160
with field resolutions 0.25 and 0.5) by ``benchmarks/memory_calibration.py``; the
estimate is 0.89-1.07 times those measurements. On CUDA the optimisation tensors live
on the GPU, so for host memory the estimate is an upper bound.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch.autograd.graph import saved_tensors_hooks

from dipreg.engine import DeformableObjective, FieldModel, RegistrationConfig, field_grid_shape, pyramid_shapes
from dipreg.errors import DipregError
from dipreg.transforms import identity_grid

_MB = 2**20

#: Interpreter with torch, SimpleITK, scikit-image and matplotlib loaded (measured ~345 MB).
BASE_BYTES = 345 * _MB
#: Thread pools, kernels and allocator caches torch adds once it computes (measured 60-130 MB).
TORCH_RUNTIME_BYTES = 100 * _MB
#: Fixed and moving image as SimpleITK images and float32 tensors, plus their pyramid copies.
INPUT_BYTES_PER_VOXEL = 20
#: Peak of the backward pass relative to the bytes autograd saved in the forward pass (fitted).
AUTOGRAD_FACTOR = 1.4
#: Output phase per voxel of the image: field copies, warped image, det(J) and its gradients,
#: SSIM intermediates (fitted on 2D 1024² and OASIS 144×192×160).
OUTPUT_BYTES_PER_VOXEL = {2: 160, 3: 250}
#: Added to the output phase of an ensemble (K > 1) per voxel: the spread's running mean and
#: sum of squares (ndim + 1 float64 channels each) and one member's float64 displacement
#: (counted, not fitted).
ENSEMBLE_OUTPUT_BYTES_PER_VOXEL = {2: 64, 3: 88}


def _saved_bytes(step: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves while ``step`` runs (on the meta device: nothing is allocated)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.device("meta"), saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total


def optimisation_bytes(shape: tuple[int, ...], config: RegistrationConfig) -> int:
    """Memory of one iteration of the deformable stage at its finest level, or of the
    refinement stage where that is larger (bytes, CPU)."""
    ndim = len(shape)
    field_shape = field_grid_shape(shape, config.field_resolution)
    level = pyramid_shapes(shape, config.pyramid_levels, max_voxels=config.max_loss_voxels)[-1]
    with torch.device("meta"):
        model = FieldModel(config, ndim, field_shape)
    image = torch.empty(model.members, 1, *level, device="meta")

    def stage_bytes(field: Callable[[], torch.Tensor], shape_of_field: tuple[int, ...]) -> int:
        # Unit spacing and matrix: the estimate counts tensors, not values.
        objective = DeformableObjective(config, torch.eye(ndim, device="meta"), [1.0] * ndim, shape_of_field, "meta")
        return int(AUTOGRAD_FACTOR * _saved_bytes(lambda: objective(field(), image, image, identity_grid(level, "meta"))))

    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # weights, gradients and the two Adam moments (float32)
    model_bytes = 16 * parameters + 2 * buffers
    network_stage = stage_bytes(model, field_shape) + model_bytes
    if not config.refine_iterations:
        return network_stage
    fine_shape = field_grid_shape(shape, config.refine_resolution)
    residual = torch.empty(model.members, ndim, *fine_shape, device="meta", requires_grad=True)
    # the network's field, the residual, its gradient and two Adam moments (float32)
    refine_stage = stage_bytes(lambda: residual * 1, fine_shape) + 20 * residual.numel() + model_bytes
    return max(network_stage, refine_stage)


def _peak_bytes(shape: tuple[int, ...], optimisation: int, members: int = 1) -> int:
    ndim = len(shape)
    if ndim not in OUTPUT_BYTES_PER_VOXEL:
        raise DipregError(f"memory estimate: {ndim}D images are not supported (2D or 3D only)")
    voxels = math.prod(shape)
    output = OUTPUT_BYTES_PER_VOXEL[ndim] + (ENSEMBLE_OUTPUT_BYTES_PER_VOXEL[ndim] if members > 1 else 0)
    working = max(optimisation, output * voxels)
    return BASE_BYTES + INPUT_BYTES_PER_VOXEL * voxels + TORCH_RUNTIME_BYTES + working


def estimate_peak_memory(shape: tuple[int, ...], config: RegistrationConfig) -> int:
    """Estimated peak resident memory (bytes) of registering images of ``shape`` with ``config``.

    Args:
        shape: image array shape, ``(y, x)`` or ``(z, y, x)``.
        config: the registration options.
    """
    return _peak_bytes(tuple(shape), optimisation_bytes(tuple(shape), config), config.ensemble)


#: Upper bounds used by :func:`peak_memory_upper_bound` (the traced counts stay below them):
#: bytes saved per field-grid voxel and network channel (traced: at most 240 on grids of 16²
#: or more) plus a constant for tiny grids, per loss-level or field-integration voxel
#: (traced: at most 80), and convolutions per network level.
NETWORK_BYTES_BOUND = 300
NETWORK_BYTES_SLACK = 16 * _MB
FIELD_BYTES_BOUND = 100
CONVOLUTIONS_PER_LEVEL = 4
#: Bytes saved per loss-level voxel and histogram bin by the mi/nmi losses (traced: about 25:
#: the Parzen weights of both images and the kernel's intermediates).
HISTOGRAM_BYTES_BOUND = 30


def peak_memory_upper_bound(shape: tuple[int, ...], config: RegistrationConfig) -> int:
    """A quick upper bound of :func:`estimate_peak_memory` from per-voxel bounds, no tracing.

    The traced estimate takes about 0.3 s (1.4 s as the first meta-device work of a process);
    when even this bound fits in the available memory, :func:`check_memory` does not need it.
    """
    ndim = len(shape)
    field_voxels = math.prod(field_grid_shape(tuple(shape), config.field_resolution))
    level_voxels = math.prod(pyramid_shapes(tuple(shape), config.pyramid_levels, max_voxels=config.max_loss_voxels)[-1])
    saved = FIELD_BYTES_BOUND * (level_voxels + field_voxels * (config.integration_steps + 1))
    if config.loss in ("mi", "nmi"):
        saved += HISTOGRAM_BYTES_BOUND * level_voxels * config.mi_bins
    parameters = ndim * field_voxels
    if config.method == "dip":
        width = max(config.channels, config.input_channels) + config.skip_channels
        saved += NETWORK_BYTES_BOUND * field_voxels * width + NETWORK_BYTES_SLACK
        parameters = config.levels * CONVOLUTIONS_PER_LEVEL * 3**ndim * width * width + 3 * width
    # every member has its own activations, fields, weights and noise
    members = config.ensemble
    optimisation = members * (int(AUTOGRAD_FACTOR * saved) + 16 * parameters + 8 * config.input_channels * field_voxels)
    if config.refine_iterations:
        fine_voxels = math.prod(field_grid_shape(tuple(shape), config.refine_resolution))
        refine_saved = FIELD_BYTES_BOUND * (level_voxels + fine_voxels * (config.integration_steps + 1))
        refine = members * (int(AUTOGRAD_FACTOR * refine_saved) + 20 * ndim * fine_voxels + 16 * parameters)
        optimisation = max(optimisation, refine)
    return _peak_bytes(tuple(shape), optimisation, members)


def available_memory() -> int | None:
    """Memory available to a new allocation now (bytes): psutil, else /proc/meminfo, else sysconf
    (available pages, or total physical memory where only that is reported); None if unknown."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    names = getattr(os, "sysconf_names", {})
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        if pages in names:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    return None


def check_memory(shape: tuple[int, ...], config: RegistrationConfig, available: int | None = None) -> None:
    """Refuse a registration whose estimated peak memory exceeds the available memory.

    A quick upper bound is tried first; only when it exceeds the available memory is the
    traced estimate computed, and that decides.

    Args:
        shape: image array shape.
        config: the registration options.
        available: bytes available (default: :func:`available_memory`; no check where unknown).

    Raises:
        DipregError: naming the estimate and the available memory, before any work starts.
    """
    available = available_memory() if available is None else available
    if available is None or peak_memory_upper_bound(shape, config) <= available:
        return
    estimate = estimate_peak_memory(shape, config)
    if estimate > available:
        raise DipregError(
            f"registering a {'x'.join(map(str, shape))} image with these options needs about "
            f"{estimate / 1e9:.1f} GB of memory, but only {available / 1e9:.1f} GB is available; "
            "lower --field-resolution, --channels or --max-loss-voxels, or downsample the images")
