"""Every option of a registration, its allowed values, and the named presets.

Torch-free, so that the command line can build its parser and check options before
PyTorch is imported. :mod:`dipreg.engine` re-exports these names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dipreg.errors import DipregError


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
        if self.learning_rate <= 0 or self.regularization < 0:
            raise DipregError("options learning_rate must be > 0 and regularization >= 0")


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
