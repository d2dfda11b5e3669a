"""The per-pair optimisation engine: options, presets and the Adam loop.

Two parameterisations of the field share one loop:

* ``dip``: the field is the output of a randomly initialised :class:`SkipGenerator`
  fed with noise ``z`` (the deep image prior); only the network weights are optimised.
* ``classic``: the field is a free tensor (the paper's Eq. 1 with a diffusion penalty).

The field is either a displacement or a stationary velocity field (``svf``) integrated
by scaling and squaring, and may live on a grid coarser than the image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipreg.errors import DipregError
from dipreg.losses import bending_energy, diffusion, ncc, similarity_loss
from dipreg.networks import SkipGenerator
from dipreg.transforms import Grid, identity_grid, integrate_velocity, resize_field, warp

ProgressCallback = Callable[[int, float], None]

#: Deformable iterations between reads of the loss value (each read waits for the device).
LOSS_READ_INTERVAL = 10


def _option(default, help: str, choices: tuple | None = None):
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class RegistrationConfig:
    """Every option of a registration; see :data:`PRESETS` for named combinations."""

    method: str = _option("dip", "field parameterisation: dip (network prior) or classic (free field)", ("dip", "classic"))
    loss: str = _option("lncc", "image similarity term", ("lncc", "ncc", "mae", "mse"))
    lncc_window: int = _option(9, "window width in voxels of the local NCC loss")
    regularization: float = _option(1.0, "weight of the diffusion penalty on the field (0 = none)")
    bending: float = _option(0.0, "weight of the bending-energy penalty on the field, beside diffusion (0 = none)")
    field: str = _option("svf", "what is optimised: displacement, or svf (stationary velocity, diffeomorphic)", ("svf", "displacement"))
    field_resolution: float = _option(0.25, "field grid resolution as a fraction of the image's (0 < r <= 1)")
    integration_steps: int = _option(7, "scaling-and-squaring steps for svf")
    z_mode: str = _option("perturbed", "network input noise: fixed, fresh every iteration, or fixed + fresh perturbation", ("perturbed", "fixed", "fresh"))
    z_std: float = _option(0.1, "standard deviation of the input noise z")
    z_perturbation: float = _option(0.05, "standard deviation of the per-iteration perturbation (z_mode perturbed)")
    input_channels: int = _option(32, "channels of the input noise z")
    channels: int = _option(32, "channels per network level")
    levels: int = _option(5, "network levels (downsamplings)")
    skip_channels: int = _option(4, "skip-connection channels per level")
    batchnorm: bool = _option(True, "BatchNorm in the network")
    init_std: float = _option(0.01, "standard deviation of the N(0, s) weight initialisation")
    affine: bool = _option(True, "affine pre-alignment (global NCC) before the deformable stage")
    affine_iterations: int = _option(200, "Adam iterations of the affine stage")
    affine_learning_rate: float = _option(1e-2, "Adam learning rate of the affine translation (matrix: a quarter of it)")
    pyramid_levels: int = _option(2, "coarse-to-fine image levels of the deformable stage (halving per level)")
    max_loss_voxels: int = _option(128**3, "finest image level used by the loss has at most this many voxels (0 = full resolution; default 128^3, so a 1 mm 256^3 volume is matched at 2 mm)")
    iterations: int = _option(400, "maximum Adam iterations of the deformable stage (split over the pyramid levels)")
    learning_rate: float = _option(5e-3, "Adam learning rate")
    patience: int = _option(100, "stop when the smoothed loss has not improved for this many iterations (0 = never)")
    seed: int = _option(0, "random seed (network weights and noise)")
    device: str = _option("auto", "auto (CUDA when present), cpu or cuda", ("auto", "cpu", "cuda"))
    threads: int = _option(0, "CPU threads of the optimisation (0 = torch's default, one per core)")
    cuda_graphs: bool = _option(True, "replay each deformable iteration as one captured CUDA graph (CUDA only; fewer kernel launches)")
    mixed_precision: bool = _option(False, "bfloat16 autocast of the network on CUDA (ignored on the CPU); measured slower on an H100 for these small networks")
    channels_last: bool = _option(True, "channels-last memory format for the 2D network (faster on CPU; 3D is slower with it)")

    def validate(self) -> None:
        """Raise a DipregError naming the first invalid option."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise DipregError(f"option {f.name}={getattr(self, f.name)!r}: choose from {', '.join(choices)}")
        if not 0 < self.field_resolution <= 1:
            raise DipregError(f"option field_resolution={self.field_resolution}: must be in (0, 1]")
        if self.threads < 0:
            raise DipregError(f"option threads={self.threads}: must be 0 (default) or a positive count")
        for name in ("iterations", "channels", "levels", "input_channels", "lncc_window"):
            if getattr(self, name) < 1:
                raise DipregError(f"option {name}={getattr(self, name)}: must be at least 1")
        if self.learning_rate <= 0 or self.regularization < 0 or self.bending < 0:
            raise DipregError("options learning_rate must be > 0, regularization and bending >= 0")


#: Named option sets. ``default`` is what measured best; ``paper`` is the published method.
PRESETS: dict[str, dict] = {
    "default": {},
    "paper": dict(
        loss="mae", regularization=0.0, field="displacement", field_resolution=1.0,
        z_mode="fresh", channels=128, levels=5, skip_channels=4, input_channels=32, affine=False, pyramid_levels=1,
        max_loss_voxels=0,
        learning_rate=1e-2, iterations=500, patience=0,
    ),
    "fast": dict(iterations=150, channels=16, patience=30),
    "classic": dict(method="classic", learning_rate=5e-2, regularization=1.0),
}


def make_config(preset: str = "default", **overrides) -> RegistrationConfig:
    """Options of a preset with explicit overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise DipregError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in dataclasses.fields(RegistrationConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DipregError(f"unknown option(s): {', '.join(unknown)}")
    config = RegistrationConfig(**values)
    config.validate()
    return config


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
    """What the loop produced: the field in normalised units on the image grid, and a log."""

    displacement: torch.Tensor
    loss_history: list[float]
    iterations: int
    seconds: float
    device: str
    stop_reason: str


def field_grid_shape(shape: tuple[int, ...], resolution: float) -> tuple[int, ...]:
    """Shape of the (possibly coarser) field grid for an image of ``shape``."""
    return tuple(max(4, int(round(n * resolution))) for n in shape)


class FieldModel(torch.nn.Module):
    """Produces the field (mm, world axes) on the field grid: network output or free tensor."""

    def __init__(self, config: RegistrationConfig, ndim: int, shape: tuple[int, ...]):
        super().__init__()
        self.config = config
        if config.method == "classic":
            self.free_field = torch.nn.Parameter(torch.zeros(1, ndim, *shape))
            self.network = None
            return
        self.free_field = None
        # BatchNorm needs more than one voxel at the coarsest level: cap the depth on small grids.
        levels = max(1, min(config.levels, int(math.log2(min(shape) / 2))))
        self.network = SkipGenerator(
            ndim, config.input_channels, ndim, [config.channels] * levels,
            config.skip_channels, batchnorm=config.batchnorm, init_std=config.init_std,
        )
        self.register_buffer("z", torch.randn(1, config.input_channels, *shape) * config.z_std)

    def forward(self, final: bool = False) -> torch.Tensor:
        if self.network is None:
            return self.free_field
        z = self.z
        if self.config.z_mode == "fresh":
            z = torch.randn_like(z) * self.config.z_std
        elif self.config.z_mode == "perturbed" and not final:
            z = z + torch.randn_like(z) * self.config.z_perturbation
        if self.config.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        if self.config.mixed_precision and z.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                field = self.network(z)
        else:
            field = self.network(z)
        # The field is integrated, resampled and penalised in float32.
        return field.float().contiguous()


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

    def __init__(self, body: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer):
        self.body, self.optimizer = body, optimizer

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.body()


class CudaGraphStep(EagerStep):
    """The same step on CUDA, captured once as a CUDA graph and then replayed.

    The first ``warmup`` calls run eagerly on a side stream (as capture requires); the next
    captures the step and every call replays it, one launch instead of hundreds. The body's
    tensors must keep their shapes and it must not read values back to the host. Each call
    returns a copy of the step's loss (the captured output is overwritten by the next replay).
    """

    def __init__(self, body: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, warmup: int = 3):
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
            self.optimizer.zero_grad(set_to_none=True)
            try:
                with torch.cuda.graph(self.graph):
                    self.loss = self.body()
            except RuntimeError as exc:
                raise DipregError(f"capturing the iteration as a CUDA graph failed ({exc}); "
                                  "run with --cuda-graphs false") from exc
        self.graph.replay()
        return self.loss.clone()


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


def align_affine(fixed: torch.Tensor, moving: torch.Tensor, config: "RegistrationConfig",
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Affine pre-alignment (normalised coordinates) by global NCC on a coarse-to-fine pyramid.

    Starts from the translation that aligns the intensity centres of mass.

    Returns:
        ``(matrix, translation, loss_history)`` with ``moving(M x + t) ≈ fixed(x)``.
    """
    ndim = fixed.dim() - 2
    device = fixed.device
    identity = identity_grid(tuple(fixed.shape[2:]), device)
    translation = (center_of_mass(moving, identity) - center_of_mass(fixed, identity)).detach().requires_grad_(True)
    matrix = torch.eye(ndim, device=device).requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": [matrix], "lr": config.affine_learning_rate / 4},
                                  {"params": [translation], "lr": config.affine_learning_rate}])
    history: list[float] = []
    shapes = pyramid_shapes(tuple(fixed.shape[2:]), 3, minimum=24)[:-1] or [tuple(fixed.shape[2:])]
    iterations = max(1, config.affine_iterations // len(shapes))
    for shape in shapes:
        fixed_level, moving_level = downsample(fixed, shape), downsample(moving, shape)
        identity_level = identity_grid(shape, device)
        stopper = _Stopper(patience=30)
        best = (math.inf, matrix.detach().clone(), translation.detach().clone())
        for iteration in tqdm(range(iterations), disable=not progress, desc=f"affine {shape}", unit="it", leave=False):
            optimizer.zero_grad(set_to_none=True)
            warped = warp(moving_level, affine_displacement(matrix, translation, identity_level), identity_level)
            loss = ncc(fixed_level, warped)
            value = float(loss.detach())
            history.append(value)
            if value < best[0]:
                best = (value, matrix.detach().clone(), translation.detach().clone())
            if stopper.update(iteration, value):
                break
            loss.backward()
            optimizer.step()
        # Adam keeps stepping near the optimum: continue from, and return, the best parameters seen.
        with torch.no_grad():
            matrix.copy_(best[1])
            translation.copy_(best[2])
        for group in optimizer.param_groups:
            group["lr"] /= 2
    return matrix.detach(), translation.detach(), history


def optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    grid: Grid,
    config: RegistrationConfig,
    progress: bool = True,
    callback: ProgressCallback | None = None,
) -> OptimisationResult:
    """Find the field that warps ``moving`` onto ``fixed``.

    Optional affine pre-alignment, then the deformable field on a coarse-to-fine image
    pyramid; the returned displacement composes both: ``u = u_affine + M u_deformable``.

    Args:
        fixed: ``[1, 1, *spatial]`` fixed image, intensities scaled to about [0, 1].
        moving: ``[1, 1, *spatial]`` moving image already on the fixed grid, same scaling.
        grid: geometry of the fixed image (converts mm to sampler units).
        config: the options.
        progress: show a progress bar with the current loss.
        callback: called as ``callback(iteration, loss)`` for every deformable iteration, in
            batches of :data:`LOSS_READ_INTERVAL` (the loss is read from the device that often).

    Raises:
        DipregError: if the loss becomes NaN or Inf.
    """
    with cpu_threads(config.threads):
        return _optimise(fixed, moving, grid, config, progress, callback)


def _optimise(fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, config: RegistrationConfig,
              progress: bool, callback: ProgressCallback | None) -> OptimisationResult:
    start = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    ndim = grid.ndim
    shape = grid.shape
    fixed, moving = fixed.to(device), moving.to(device)
    identity = identity_grid(shape, device)

    matrix, translation = torch.eye(ndim, device=device), torch.zeros(ndim, device=device)
    history: list[float] = []
    if config.affine:
        matrix, translation, history = align_affine(fixed, moving, config, progress)
        with torch.no_grad():
            moving = warp(moving, affine_displacement(matrix, translation, identity), identity)

    coarse_shape = field_grid_shape(shape, config.field_resolution)
    coarse_spacing = [s * (n - 1) / (m - 1) for s, n, m in zip(grid.spacing, grid.size, reversed(coarse_shape))]
    model = FieldModel(config, ndim, coarse_shape).to(device)
    if config.channels_last and model.network is not None and ndim == 2:
        model.network.to(memory_format=torch.channels_last)
    identity_coarse = identity_grid(coarse_shape, device) if config.field == "svf" else None
    to_normalized = torch.as_tensor(grid.world_to_normalized_matrix(), dtype=torch.float32, device=device)
    similarity = similarity_loss(config.loss, config.lncc_window)
    use_graphs = config.cuda_graphs and device.type == "cuda"
    # foreach: one batched update of the network's ~100 small tensors instead of a loop over
    # them (the CPU default); the same arithmetic.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, capturable=use_graphs, foreach=True)

    def displacement_from(field_mm: torch.Tensor, level_shape: tuple[int, ...]) -> torch.Tensor:
        field_normalized = torch.einsum("ij,bj...->bi...", to_normalized, field_mm)
        if config.field == "svf":
            field_normalized = integrate_velocity(field_normalized, identity_coarse, config.integration_steps)
        return resize_field(field_normalized, level_shape)

    stop_reason = "maximum iterations reached"
    levels = pyramid_shapes(shape, config.pyramid_levels, max_voxels=config.max_loss_voxels)
    per_level = max(1, config.iterations // len(levels))
    iteration = 0
    for level, level_shape in enumerate(levels):
        fixed_level, moving_level = downsample(fixed, level_shape), downsample(moving, level_shape)
        identity_level = identity if level_shape == shape else identity_grid(level_shape, device)
        stopper = _Stopper(config.patience)
        count = per_level if level < len(levels) - 1 else config.iterations - per_level * (len(levels) - 1)
        bar = tqdm(range(count), disable=not progress, desc=f"deformable {'x'.join(map(str, level_shape))}",
                   unit="it", leave=False)
        def loss_step(fixed_level=fixed_level, moving_level=moving_level, identity_level=identity_level,
                      level_shape=level_shape) -> torch.Tensor:
            field_mm = model()
            warped = warp(moving_level, displacement_from(field_mm, level_shape), identity_level)
            loss = similarity(fixed_level, warped)
            if config.regularization > 0:
                loss = loss + config.regularization * diffusion(field_mm, coarse_spacing)
            if config.bending > 0:
                loss = loss + config.bending * bending_energy(field_mm, coarse_spacing)
            loss.backward()
            optimizer.step()
            return loss.detach()

        run_step = CudaGraphStep(loss_step, optimizer) if use_graphs else EagerStep(loss_step, optimizer)
        pending: list[torch.Tensor] = []
        for step in bar:
            pending.append(run_step())
            # Reading the loss waits for the device: do it once per LOSS_READ_INTERVAL iterations.
            if len(pending) == LOSS_READ_INTERVAL or step == count - 1:
                values = torch.stack(pending).tolist()
                pending.clear()
                first_step = step - len(values) + 1
                stopped = False
                for offset, value in enumerate(values):
                    history.append(value)
                    iteration += 1
                    if callback is not None:
                        callback(iteration, value)
                    stopped = stopper.update(first_step + offset, value) or stopped
                bar.set_postfix(loss=f"{values[-1]:.4f}")
                if stopped:
                    stop_reason = f"loss stopped improving for {config.patience} iterations"
                    break
        bar.close()

    with torch.no_grad():
        deformable = displacement_from(model(final=True), shape)
        displacement = affine_displacement(matrix, translation, identity) + torch.einsum("ij,bj...->bi...", matrix, deformable)
    return OptimisationResult(
        displacement=displacement.detach().cpu(),
        loss_history=history,
        iterations=iteration,
        seconds=time.perf_counter() - start,
        device=str(device),
        stop_reason=stop_reason,
    )
