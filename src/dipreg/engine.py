"""The per-pair optimisation engine: the Adam loop (options and presets: :mod:`dipreg.options`).

Two parameterisations of the field share one loop:

* ``dip``: the field is the output of a randomly initialised :class:`SkipGenerator`
  fed with noise ``z`` (the deep image prior); only the network weights are optimised.
* ``classic``: the field is a free tensor (the paper's Eq. 1 with a diffusion penalty).

The field is either a displacement or a stationary velocity field (``svf``) integrated
by scaling and squaring, and may live on a grid coarser than the image.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipreg.adam import Adam
from dipreg.errors import DipregError
from dipreg.initialisation import rotation_from_parameters
from dipreg.losses import bending_energy, diffusion, similarity_loss
from dipreg.networks import SkipGenerator
from dipreg.options import PRESETS, RegistrationConfig, make_config  # noqa: F401 (re-exported)
from dipreg.transforms import Grid, gaussian_smooth, identity_grid, integrate_velocity, resize_field, warp

ProgressCallback = Callable[[int, float], None]

#: Deformable iterations between reads of the loss value (each read waits for the device).
LOSS_READ_INTERVAL = 10


#: With ``threads 0``, images with fewer voxels than this are registered on one CPU thread:
#: their operations are too small to share between threads. On this project's 2-core machine
#: (benchmarks/contention.py, quiet) a 2D 256x256 default run took 25.1 s with one thread and
#: 27.1 s with two, and beside a second run 1.08x against 1.35x its time alone; a 3D
#: 160x192x144 run was 1.4x faster with two threads.
ONE_THREAD_BELOW_VOXELS = 2**20


def optimisation_threads(threads: int, shape: Sequence[int]) -> int:
    """The torch CPU threads of a registration of an image of ``shape``: ``threads``, or for 0
    one thread below :data:`ONE_THREAD_BELOW_VOXELS` voxels and else the process's setting (0)."""
    if threads:
        return threads
    return 1 if math.prod(shape) < ONE_THREAD_BELOW_VOXELS else 0


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0 leaves the setting alone)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DipregError("option device=cuda: no CUDA device is available")
    return torch.device(name)


@dataclass
class OptimisationResult:
    """What the loop produced, and a log.

    Attributes:
        displacement: the composed field ``u_affine + M u_deformable`` in normalised units
            on the image grid, ``[1, ndim, *shape]``.
        affine_matrix, affine_translation: the affine stage ``x -> M x + t`` (normalised
            coordinates; identity without the stage).
        field: the deformable part as optimised: velocity (``svf``) or displacement, mm in
            world axes, ``[1, ndim, *field_shape]`` on the coarse field grid that spans the
            image's extent (see :meth:`Grid.coarser`); None for a rigid or affine transform. For
            an ensemble, the members' mean (the log-Euclidean mean of the velocity fields).
        members: the ensemble members' fields, ``[K, ndim, *field_shape]`` (None for K = 1).
    """

    displacement: torch.Tensor
    affine_matrix: torch.Tensor
    affine_translation: torch.Tensor
    field: torch.Tensor | None
    loss_history: list[float]
    iterations: int
    seconds: float
    device: str
    stop_reason: str
    #: ``{"stage": "affine" | "deformable <shape>", "losses": [...]}`` in order; ``loss_history`` concatenated.
    loss_stages: list[dict]
    #: The moving image after the affine stage on the fixed grid, scaled as given (None without it).
    affine_warped: torch.Tensor | None
    members: torch.Tensor | None = None


def field_grid_shape(shape: tuple[int, ...], resolution: float) -> tuple[int, ...]:
    """Shape of the (possibly coarser) field grid for an image of ``shape``."""
    return tuple(max(4, int(round(n * resolution))) for n in shape)


class FieldModel(torch.nn.Module):
    """Produces the field (mm, world axes) on the field grid: network output or free tensor.

    With ``config.ensemble = K`` it holds K networks run as one grouped
    :class:`SkipGenerator` and returns K fields ``[K, ndim, *shape]``. Member ``m``'s weights
    and noise ``z`` are drawn right after ``torch.manual_seed(config.seed + m)``, exactly as
    a single network is, so with ``z_mode fixed`` member ``m`` follows the single run with
    seed ``seed + m`` (the per-iteration perturbations of all members are drawn together).
    With ``config.dropout > 0`` it holds one network (with Monte Carlo dropout) and the K
    members are K dropout samples of its final field.
    """

    def __init__(self, config: RegistrationConfig, ndim: int, shape: tuple[int, ...]):
        super().__init__()
        self.config = config
        #: fields per forward pass: the ensemble's members, or one field of a dropout network
        self.members = 1 if config.dropout or config.method == "classic" else config.ensemble
        if config.method == "classic":
            self.free_field = torch.nn.Parameter(torch.zeros(1, ndim, *shape))
            self.network = None
            return
        self.free_field = None
        # BatchNorm needs more than one voxel at the coarsest level: cap the depth on small grids.
        levels = max(1, min(config.levels, int(math.log2(min(shape) / 2))))
        networks, noise = [], []
        for member in range(self.members):
            torch.manual_seed(config.seed + member)
            networks.append(SkipGenerator(
                ndim, config.input_channels, ndim, [config.channels] * levels,
                config.skip_channels, batchnorm=config.batchnorm, init_std=config.init_std, dropout=config.dropout,
            ))
            noise.append(torch.randn(1, config.input_channels, *shape) * config.z_std)
        self.network = networks[0] if len(networks) == 1 else SkipGenerator.stack(networks)
        self.register_buffer("z", torch.cat(noise))

    def forward(self, final: bool = False) -> torch.Tensor:
        if self.network is None:
            return self.free_field
        z = self.z
        if self.config.z_mode == "fresh":
            z = torch.randn_like(z) * self.config.z_std
        elif self.config.z_mode == "perturbed" and not final:
            z = z + torch.randn_like(z) * self.config.z_perturbation
        # The members' inputs side by side in channels: [K, C, ...] -> [1, K * C, ...].
        z = z.reshape(1, -1, *z.shape[2:])
        if self.config.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        if self.config.mixed_precision and z.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                field = self.network(z)
        else:
            field = self.network(z)
        # The field is integrated, resampled and penalised in float32.
        return field.float().reshape(self.members, -1, *field.shape[2:]).contiguous()

    def final_fields(self) -> torch.Tensor:
        """The members' final fields ``[K, ndim, *shape]``: the K networks' outputs, or K Monte
        Carlo dropout samples of one network (``config.dropout > 0``)."""
        if self.members == self.config.ensemble:
            return self(final=True)
        return torch.cat([self(final=True) for _ in range(self.config.ensemble)])


class _Stopper:
    """Early stopping on an exponentially smoothed loss, and the NaN/Inf guard."""

    def __init__(self, patience: int):
        self.patience = patience
        self.smoothed = self.best = math.inf
        self.best_iteration = 0

    def update(self, iteration: int, value: float) -> bool:
        """Record a loss; True when the smoothed loss has not improved for ``patience`` steps."""
        if not math.isfinite(value):
            raise DipregError(f"registration diverged: loss became {value} at iteration {iteration}; "
                              "try a smaller --learning-rate")
        self.smoothed = value if not math.isfinite(self.smoothed) else 0.9 * self.smoothed + 0.1 * value
        if self.smoothed < self.best - 1e-4 * abs(self.smoothed):
            self.best, self.best_iteration = self.smoothed, iteration
            return False
        return bool(self.patience) and iteration - self.best_iteration >= self.patience


class EagerStep:
    """One optimisation step: clear the gradients, then ``body`` (loss, backward, Adam step)."""

    def __init__(self, body: Callable[[], torch.Tensor], optimizer: Adam):
        self.body, self.optimizer = body, optimizer

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        return self.body()


class CudaGraphStep(EagerStep):
    """The same step on CUDA, captured once as a CUDA graph and then replayed.

    The first ``warmup`` calls run eagerly on a side stream (as capture requires); the next
    captures the step and every call replays it, one launch instead of hundreds. The body's
    tensors must keep their shapes and it must not read values back to the host. Each call
    returns a copy of the step's loss (the captured output is overwritten by the next replay).
    """

    def __init__(self, body: Callable[[], torch.Tensor], optimizer: Adam, warmup: int = 3):
        super().__init__(body, optimizer)
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = super().__call__()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            # Gradients set to None: backward allocates them from the graph's own memory pool.
            self.optimizer.zero_grad()
            try:
                with torch.cuda.graph(self.graph):
                    self.loss = self.body()
            except RuntimeError as exc:
                raise DipregError(f"capturing the iteration as a CUDA graph failed ({exc}); "
                                  "run with --cuda-graphs false") from exc
        self.graph.replay()
        return self.loss.clone()


class _StageRunner:
    """Runs the stages of the deformable loop: a progress bar per stage, the loss read from
    the device every :data:`LOSS_READ_INTERVAL` steps, the callback, early stopping, and the
    losses appended to the history and to the stage's record."""

    def __init__(self, history: list[float], loss_stages: list[dict], callback: ProgressCallback | None,
                 progress: bool):
        self.history, self.loss_stages, self.callback, self.progress = history, loss_stages, callback, progress
        self.iterations = 0

    def run(self, name: str, step: Callable[[], torch.Tensor], count: int, patience: int) -> bool:
        """Run ``step`` up to ``count`` times; True if it stopped early (no improvement for ``patience``)."""
        stopper = _Stopper(patience)
        stage = {"stage": name, "losses": []}
        self.loss_stages.append(stage)
        pending: list[torch.Tensor] = []
        with tqdm(range(count), disable=not self.progress, desc=name, unit="it", leave=False) as bar:
            for index in bar:
                pending.append(step())
                # Reading the loss waits for the device: do it once per LOSS_READ_INTERVAL iterations.
                if len(pending) < LOSS_READ_INTERVAL and index < count - 1:
                    continue
                values = torch.stack(pending).tolist()
                pending.clear()
                stopped = False
                for offset, value in enumerate(values, start=index - len(values) + 1):
                    self.history.append(value)
                    stage["losses"].append(value)
                    self.iterations += 1
                    if self.callback is not None:
                        self.callback(self.iterations, value)
                    stopped = stopper.update(offset, value) or stopped
                bar.set_postfix(loss=f"{values[-1]:.4f}")
                if stopped:
                    return True
        return False


def downsample(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Smooth (3-voxel box) and resample an image to ``shape`` on the same normalised extent."""
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    pool = F.avg_pool2d if image.dim() == 4 else F.avg_pool3d
    smoothed = pool(image, 3, stride=1, padding=1, count_include_pad=False)
    return F.interpolate(smoothed, size=shape, mode="bilinear" if image.dim() == 4 else "trilinear", align_corners=True)


def pyramid_shapes(shape: tuple[int, ...], levels: int, minimum: int = 16,
                   max_voxels: int = 0) -> list[tuple[int, ...]]:
    """Image shapes of a coarse-to-fine pyramid (halving per level), ending with the finest.

    With ``max_voxels`` set, levels larger than that are left out (the coarsest level is
    always kept), so a large volume is registered on a downsampled version of itself.
    """
    shapes = [tuple(shape)]
    while max_voxels and math.prod(shapes[0]) > max_voxels and min(shapes[0]) >= 2 * minimum:
        shapes = [tuple(max(2, (n + 1) // 2) for n in shapes[0])]
    for _ in range(levels - 1):
        smaller = tuple(max(2, (n + 1) // 2) for n in shapes[0])
        if min(smaller) < minimum:
            break
        shapes.insert(0, smaller)
    return shapes


def affine_displacement(matrix: torch.Tensor, translation: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Normalised displacement ``(M - I) x + t`` of an affine map on an identity grid."""
    ndim = matrix.shape[0]
    points = identity.reshape(-1, ndim)
    moved = points @ matrix.T + translation
    field = (moved - points).reshape(*identity.shape)
    return field.movedim(-1, 1)


def center_of_mass(image: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre (normalised coordinates) of a ``[1, 1, *spatial]`` image."""
    weights = image.reshape(-1, 1)
    return (identity.reshape(-1, identity.shape[-1]) * weights).sum(0) / weights.sum().clamp_min(1e-8)


def similarity_weight(fixed_mask: torch.Tensor | None, moving_mask: torch.Tensor | None,
                      displacement: torch.Tensor, identity: torch.Tensor) -> torch.Tensor | None:
    """Voxel weight of the similarity: the fixed mask times the moving mask warped with the
    moving image (either may be None; None when both are)."""
    if moving_mask is None:
        return fixed_mask
    warped_mask = warp(moving_mask, displacement, identity)
    return warped_mask if fixed_mask is None else fixed_mask * warped_mask


class DeformableObjective:
    """The deformable stage's loss: ``similarity(fixed, moving o A o (id + u)) + lambda R(field) + beta B(field)``
    (R diffusion, B bending energy, A the affine stage's ``x -> M x + t`` or the identity).

    ``u`` is the field (mm, world axes, on the coarse field grid) in normalised units,
    integrated by scaling and squaring for ``svf`` and resized to the loss level. The affine
    map is composed with ``u`` before the moving image is sampled, so the image is
    interpolated once per iteration (sampling an affinely resampled copy blurs it twice;
    measured on three known 2D warps: EPE 0.178 mm that way, 0.159 mm this way). The loop and the memory estimate
    (:mod:`dipreg.memory`) both call this one objective.
    """

    def __init__(self, config: RegistrationConfig, to_normalized: torch.Tensor, field_spacing: Sequence[float],
                 field_shape: tuple[int, ...], device: torch.device | str = "cpu",
                 affine_matrix: torch.Tensor | None = None, affine_translation: torch.Tensor | None = None):
        self.config = config
        self.to_normalized = to_normalized
        self.field_spacing = field_spacing
        self.identity_field = identity_grid(field_shape, device) if config.field == "svf" else None
        self.similarity = similarity_loss(config.loss, config.lncc_window, config.mi_bins)
        ndim = len(field_shape)
        self.affine_matrix = torch.eye(ndim, device=device) if affine_matrix is None else affine_matrix
        self.affine_translation = torch.zeros(ndim, device=device) if affine_translation is None else affine_translation
        self._affine_on_level: dict[tuple[int, ...], torch.Tensor] = {}

    def moving_displacement(self, field_mm: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """The normalised displacement ``A(x + u(x)) - x`` that samples the moving image on the
        grid of ``identity`` (a pyramid level)."""
        level_shape = tuple(identity.shape[1:-1])
        if level_shape not in self._affine_on_level:  # constant during the deformable stage
            self._affine_on_level[level_shape] = affine_displacement(self.affine_matrix, self.affine_translation, identity)
        deformable = self.displacement(field_mm, level_shape)
        return self._affine_on_level[level_shape] + torch.einsum("ij,bj...->bi...", self.affine_matrix, deformable)

    def displacement(self, field_mm: torch.Tensor, level_shape: tuple[int, ...]) -> torch.Tensor:
        """The normalised displacement of ``field_mm`` on a grid of ``level_shape``."""
        field_normalized = torch.einsum("ij,bj...->bi...", self.to_normalized, field_mm)
        if self.config.field == "svf":
            field_normalized = integrate_velocity(field_normalized, self.identity_field, self.config.integration_steps)
        return resize_field(field_normalized, level_shape)

    def __call__(self, field_mm: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, identity: torch.Tensor,
                 fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``field_mm`` on one pyramid level (``identity`` is that level's grid;
        ``moving`` and its mask are as given, before the affine map)."""
        displacement = self.moving_displacement(field_mm, identity)
        warped = warp(moving, displacement, identity)
        loss = self.similarity(fixed, warped, similarity_weight(fixed_mask, moving_mask, displacement, identity))
        if self.config.regularization > 0:
            loss = loss + self.config.regularization * diffusion(field_mm, self.field_spacing)
        if self.config.bending > 0:
            loss = loss + self.config.bending * bending_energy(field_mm, self.field_spacing)
        return loss


def downsample_mask(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A mask on a pyramid level (smoothed like the images: soft weights at its border)."""
    return None if mask is None else downsample(mask, shape)


def affine_loss_name(config: "RegistrationConfig") -> str:
    """The similarity of the rigid/affine stage: ``affine_loss``, or for ``auto`` the
    deformable loss when it is mutual information, else global NCC."""
    if config.affine_loss != "auto":
        return config.affine_loss
    return config.loss if config.loss in ("mi", "nmi") else "ncc"


def align_affine(fixed: torch.Tensor, moving: torch.Tensor, config: "RegistrationConfig",
                 progress: bool, spacing: Sequence[float] | None = None, fixed_mask: torch.Tensor | None = None,
                 moving_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Rigid or affine alignment (normalised coordinates) on a coarse-to-fine pyramid.

    Starts from the translation that aligns the intensity centres of mass (none for
    ``init none``; rotations found by :mod:`dipreg.initialisation` are applied before, to the
    moving image) and minimises ``affine_loss_name(config)`` over the voxels the masks keep
    (the moving mask warped with the moving image). A rigid transform is a rotation in mm
    (``spacing`` in ``(x, y[, z])`` order; 1 mm if None) and a translation.

    Returns:
        ``(matrix, translation, loss_history)`` with ``moving(M x + t) ≈ fixed(x)``.
    """
    ndim = fixed.dim() - 2
    device = fixed.device
    similarity = similarity_loss(affine_loss_name(config), mi_bins=config.mi_bins)
    shapes = pyramid_shapes(tuple(fixed.shape[2:]), 3, minimum=24)[:-1] or [tuple(fixed.shape[2:])]
    # half the extent in mm per axis (x, y[, z]): a rotation R in mm is D^-1 R D in normalised units
    scale = torch.tensor([(n - 1) * s / 2.0 for n, s in zip(reversed(fixed.shape[2:]), spacing or [1.0] * ndim)],
                         device=device)

    def level_loss(matrix: torch.Tensor, translation: torch.Tensor, level: tuple[torch.Tensor, ...]) -> torch.Tensor:
        fixed_level, moving_level, fixed_mask_level, moving_mask_level, identity_level = level
        displacement = affine_displacement(matrix, translation, identity_level)
        weight = similarity_weight(fixed_mask_level, moving_mask_level, displacement, identity_level)
        return similarity(fixed_level, warp(moving_level, displacement, identity_level), weight)

    def pyramid_level(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return (downsample(fixed, shape), downsample(moving, shape), downsample_mask(fixed_mask, shape),
                downsample_mask(moving_mask, shape), identity_grid(shape, device))

    identity = identity_grid(tuple(fixed.shape[2:]), device)
    translation = torch.zeros(ndim, device=device) if config.init == "none" else \
        center_of_mass(moving, identity) - center_of_mass(fixed, identity)
    translation = translation.detach().requires_grad_(True)
    if config.transform == "rigid":
        rotation = torch.zeros(1 if ndim == 2 else 3, device=device, requires_grad=True)
        linear = [rotation]

        def current_matrix() -> torch.Tensor:
            return rotation_from_parameters(rotation) / scale[:, None] * scale[None, :]
    else:
        matrix = torch.eye(ndim, device=device).requires_grad_(True)
        linear = [matrix]

        def current_matrix() -> torch.Tensor:
            return matrix
    optimizer = Adam([{"params": linear, "lr": config.affine_learning_rate / 4},
                      {"params": [translation], "lr": config.affine_learning_rate}], lr=config.affine_learning_rate)
    history: list[float] = []
    iterations = max(1, config.affine_iterations // len(shapes))
    for shape in shapes:
        level = pyramid_level(shape)
        stopper = _Stopper(patience=30)
        best = (math.inf, linear[0].detach().clone(), translation.detach().clone())
        for iteration in tqdm(range(iterations), disable=not progress, desc=f"affine {shape}", unit="it", leave=False):
            optimizer.zero_grad()
            loss = level_loss(current_matrix(), translation, level)
            value = float(loss.detach())
            history.append(value)
            if value < best[0]:
                best = (value, linear[0].detach().clone(), translation.detach().clone())
            if stopper.update(iteration, value):
                break
            loss.backward()
            optimizer.step()
        # Adam keeps stepping near the optimum: continue from, and return, the best parameters seen.
        with torch.no_grad():
            linear[0].copy_(best[1])
            translation.copy_(best[2])
        for group in optimizer.param_groups:
            group["lr"] /= 2
    return current_matrix().detach(), translation.detach(), history


def optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    grid: Grid,
    config: RegistrationConfig,
    progress: bool = True,
    callback: ProgressCallback | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> OptimisationResult:
    """Find the field that warps ``moving`` onto ``fixed``.

    Optional affine pre-alignment, then the deformable field on a coarse-to-fine image
    pyramid; the returned displacement composes both: ``u = u_affine + M u_deformable``.
    A ``rigid`` or ``affine`` transform stops after the first stage.

    Args:
        fixed: ``[1, 1, *spatial]`` fixed image, intensities scaled to about [0, 1].
        moving: ``[1, 1, *spatial]`` moving image already on the fixed grid, same scaling.
        grid: geometry of the fixed image (converts mm to sampler units).
        config: the options.
        progress: show a progress bar with the current loss.
        callback: called as ``callback(iteration, loss)`` for every deformable iteration, in
            batches of :data:`LOSS_READ_INTERVAL` (the loss is read from the device that often).
        fixed_mask: ``[1, 1, *spatial]`` weight in [0, 1] of the fixed image's voxels in the
            similarity (every stage and level), or None for all of them.
        moving_mask: the same for the moving image, on the fixed grid like ``moving``; it is
            warped with the moving image.

    Raises:
        DipregError: if the loss becomes NaN or Inf.
    """
    with cpu_threads(optimisation_threads(config.threads, grid.shape)):
        return _optimise(fixed, moving, grid, config, progress, callback, fixed_mask, moving_mask)


def _optimise(fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, config: RegistrationConfig,
              progress: bool, callback: ProgressCallback | None, fixed_mask: torch.Tensor | None,
              moving_mask: torch.Tensor | None) -> OptimisationResult:
    start = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    ndim = grid.ndim
    shape = grid.shape
    fixed, moving = fixed.to(device), moving.to(device)
    fixed_mask, moving_mask = (None if mask is None else mask.to(device) for mask in (fixed_mask, moving_mask))
    identity = identity_grid(shape, device)

    matrix, translation = torch.eye(ndim, device=device), torch.zeros(ndim, device=device)
    history: list[float] = []
    loss_stages: list[dict] = []
    if config.affine or config.transform != "deformable":
        matrix, translation, history = align_affine(fixed, moving, config, progress, grid.spacing, fixed_mask, moving_mask)
        loss_stages.append({"stage": "affine", "losses": list(history)})
        with torch.no_grad():
            affine_warped = warp(moving, affine_displacement(matrix, translation, identity), identity).cpu()
    else:
        affine_warped = None
    if config.transform != "deformable":
        return OptimisationResult(
            displacement=affine_displacement(matrix, translation, identity).cpu(), affine_matrix=matrix.cpu(),
            affine_translation=translation.cpu(), field=None, loss_history=history, iterations=len(history),
            seconds=time.perf_counter() - start, device=str(device),
            stop_reason=f"{config.transform} transform: no deformable stage", loss_stages=loss_stages,
            affine_warped=affine_warped)

    coarse_shape = field_grid_shape(shape, config.field_resolution)
    coarse_spacing = grid.coarser(coarse_shape).spacing
    model = FieldModel(config, ndim, coarse_shape).to(device)
    members = model.members
    # Ensemble members see the same pair: the images as a batch of K views, one per field.
    fixed, moving = fixed.expand(members, *fixed.shape[1:]), moving.expand(members, *moving.shape[1:])
    if moving_mask is not None:
        moving_mask = moving_mask.expand(members, *moving_mask.shape[1:])
    if config.channels_last and model.network is not None and ndim == 2:
        model.network.to(memory_format=torch.channels_last)
    objective = DeformableObjective(config, torch.as_tensor(grid.world_to_normalized_matrix(), dtype=torch.float32,
                                                            device=device), coarse_spacing, coarse_shape, device,
                                    matrix, translation)
    use_graphs = config.cuda_graphs and device.type == "cuda"
    # One fused update of the network's ~100 small tensors; capturable in a CUDA graph.
    optimizer = Adam(model.parameters(), lr=config.learning_rate)

    stop_reason = "maximum iterations reached"
    levels = pyramid_shapes(shape, config.pyramid_levels, max_voxels=config.max_loss_voxels)
    per_level = max(1, config.iterations // len(levels))
    stages = _StageRunner(history, loss_stages, callback, progress)
    for level, level_shape in enumerate(levels):
        fixed_level, moving_level = downsample(fixed, level_shape), downsample(moving, level_shape)
        fixed_mask_level, moving_mask_level = downsample_mask(fixed_mask, level_shape), downsample_mask(moving_mask, level_shape)
        identity_level = identity if level_shape == shape else identity_grid(level_shape, device)
        count = per_level if level < len(levels) - 1 else config.iterations - per_level * (len(levels) - 1)

        def loss_step(fixed_level=fixed_level, moving_level=moving_level, identity_level=identity_level,
                      fixed_mask_level=fixed_mask_level, moving_mask_level=moving_mask_level) -> torch.Tensor:
            loss = objective(model(), fixed_level, moving_level, identity_level, fixed_mask_level, moving_mask_level)
            # The losses are means over the members: scaled by K, each member gets its own gradient.
            (members * loss).backward()
            optimizer.step()
            return loss.detach()

        run_step = CudaGraphStep(loss_step, optimizer) if use_graphs else EagerStep(loss_step, optimizer)
        if stages.run(f"deformable {'x'.join(map(str, level_shape))}", run_step, count, config.patience):
            stop_reason = f"loss stopped improving for {config.patience} iterations"

    with torch.no_grad():
        member_fields = model.final_fields()
    if config.refine_iterations:
        # A free field on a finer grid added to the network's (fixed) field, fitted at the finest loss level.
        fine_shape = field_grid_shape(shape, config.refine_resolution)
        objective = DeformableObjective(config, objective.to_normalized, grid.coarser(fine_shape).spacing, fine_shape,
                                        device, matrix, translation)
        # mm values interpolate like normalised ones: resize_field applies to both
        network_fields = resize_field(member_fields, fine_shape)
        residual = torch.nn.Parameter(torch.zeros_like(network_fields))
        refine_optimizer = Adam([residual], lr=config.refine_learning_rate)

        def refined_fields() -> torch.Tensor:
            return network_fields + gaussian_smooth(residual, config.refine_smoothing)

        def refine_step() -> torch.Tensor:
            loss = objective(refined_fields(), fixed_level, moving_level, identity_level, fixed_mask_level,
                             moving_mask_level)
            (members * loss).backward()
            refine_optimizer.step()
            return loss.detach()

        run_step = (CudaGraphStep if use_graphs else EagerStep)(refine_step, refine_optimizer)
        if stages.run(f"refine {'x'.join(map(str, fine_shape))}", run_step, config.refine_iterations,
                              config.patience):
            stop_reason += f"; refinement stopped improving after {len(loss_stages[-1]['losses'])} iterations"
        member_fields = refined_fields().detach()
    iteration = stages.iterations
    with torch.no_grad():
        # Velocity fields are averaged before exp (the log-Euclidean mean), displacements directly.
        field_mm = member_fields.mean(dim=0, keepdim=True)
        deformable = objective.displacement(field_mm, shape)
        displacement = affine_displacement(matrix, translation, identity) + torch.einsum("ij,bj...->bi...", matrix, deformable)
    return OptimisationResult(
        displacement=displacement.detach().cpu(),
        affine_matrix=matrix.detach().cpu(),
        affine_translation=translation.detach().cpu(),
        field=field_mm.detach().cpu(),
        loss_history=history,
        iterations=iteration,
        seconds=time.perf_counter() - start,
        device=str(device),
        stop_reason=stop_reason,
        loss_stages=loss_stages,
        affine_warped=affine_warped,
        members=member_fields.detach().cpu() if config.ensemble > 1 else None,
    )
