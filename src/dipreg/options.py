"""Every option of a registration, its allowed values, and the named presets.

Torch-free, so that the command line can build its parser and check options before
PyTorch is imported. :mod:`dipreg.engine` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dipreg.errors import DipregError


@dataclass(frozen=True)
class Allowed:
    """The allowed values of a numeric option: an interval, optionally odd integers only,
    plus at most one value outside it that switches something off (e.g. 0 = no limit)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    odd: bool = False
    also: int | None = None

    def __contains__(self, value: float) -> bool:
        if value == self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and value > self.high:
            return False
        return not self.odd or value % 2 == 1

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"<= {self.high:g}"
        text = f"odd and {text}" if self.odd else text
        return f"{self.also} or {text}" if self.also is not None else text


def _option(default, help: str, choices: tuple | None = None, allowed: Allowed | None = None):
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    if allowed:
        metadata["allowed"] = allowed
    return field(default=default, metadata=metadata)


POSITIVE = Allowed(0, low_open=True)
NON_NEGATIVE = Allowed(0)
AT_LEAST_ONE = Allowed(1)


@dataclass
class RegistrationConfig:
    """Every option of a registration; see :data:`PRESETS` for named combinations."""

    method: str = _option("dip", "field parameterisation: dip (network prior) or classic (free field)", ("dip", "classic"))
    loss: str = _option("lncc", "image similarity term (mi, nmi: Parzen-window mutual information, normalised MI, for different contrasts)", ("lncc", "ncc", "mae", "mse", "mi", "nmi"))
    lncc_window: int = _option(9, "window width in voxels of the local NCC loss", allowed=Allowed(3, odd=True))
    regularization: float = _option(0.5, "weight of the diffusion penalty on the field (0 = none)", allowed=NON_NEGATIVE)
    bending: float = _option(4.0, "weight of the bending-energy penalty (squared second derivatives) on the field, "
                                  "beside diffusion (0 = none)", allowed=NON_NEGATIVE)
    field: str = _option("svf", "what is optimised: displacement, or svf (stationary velocity, diffeomorphic)", ("svf", "displacement"))
    field_resolution: float = _option(0.25, "field grid resolution as a fraction of the image's (0 < r <= 1)", allowed=Allowed(0, 1, low_open=True))
    integration_steps: int = _option(7, "scaling-and-squaring steps for svf", allowed=AT_LEAST_ONE)
    z_mode: str = _option("fixed", "network input noise: fixed, fresh every iteration, or fixed + fresh perturbation", ("fixed", "perturbed", "fresh"))
    z_std: float = _option(0.1, "standard deviation of the input noise z", allowed=POSITIVE)
    z_perturbation: float = _option(0.05, "standard deviation of the per-iteration perturbation (z_mode perturbed)", allowed=NON_NEGATIVE)
    input_channels: int = _option(32, "channels of the input noise z", allowed=AT_LEAST_ONE)
    channels: int = _option(32, "channels per network level", allowed=AT_LEAST_ONE)
    levels: int = _option(5, "network levels (downsamplings)", allowed=AT_LEAST_ONE)
    skip_channels: int = _option(4, "skip-connection channels per level", allowed=NON_NEGATIVE)
    batchnorm: bool = _option(True, "BatchNorm in the network")
    init_std: float = _option(0.01, "standard deviation of the N(0, s) weight initialisation", allowed=POSITIVE)
    affine: bool = _option(True, "affine pre-alignment (global NCC) before the deformable stage")
    affine_iterations: int = _option(200, "Adam iterations of the affine stage", allowed=AT_LEAST_ONE)
    affine_learning_rate: float = _option(1e-2, "Adam learning rate of the affine translation (matrix: a quarter of it)", allowed=POSITIVE)
    transform: str = _option("deformable", "transform model: rigid, affine, or deformable (the affine stage, unless affine is false, then the deformable field)", ("deformable", "affine", "rigid"))
    affine_loss: str = _option("auto", "similarity of the rigid/affine stage (auto: mi when the loss is mi, nmi for nmi, else ncc)", ("auto", "ncc", "mi", "nmi"))
    init: str = _option("search", "start of the rigid/affine stage: none, centers (intensity centres of mass), moments (+ principal axes, best sign), search (+ coarse rotation search at low resolution)", ("none", "centers", "moments", "search"))
    mi_bins: int = _option(32, "histogram bins of the mi and nmi losses (each image binned over its own range)", allowed=Allowed(8))
    pyramid_levels: int = _option(2, "coarse-to-fine image levels of the deformable stage (halving per level)", allowed=AT_LEAST_ONE)
    max_loss_voxels: int = _option(256**3, "finest image level used by the loss has at most this many voxels (0 = full "
                                           "resolution; default 256^3, so brain MRI up to 1 mm 256^3 is matched at full "
                                           "resolution and a 0.5 mm 512^3 volume at 1 mm)", allowed=Allowed(16**2, also=0))
    iterations: int = _option(300, "maximum Adam iterations of the deformable stage (split over the pyramid levels)", allowed=AT_LEAST_ONE)
    learning_rate: float = _option(5e-3, "Adam learning rate", allowed=POSITIVE)
    refine_iterations: int = _option(0, "Adam iterations of a final stage that adds a free velocity (or displacement) "
                                        "field on a finer grid to the network's field, at the finest loss level "
                                        "(0 = none)", allowed=NON_NEGATIVE)
    refine_resolution: float = _option(0.5, "grid of the refinement field as a fraction of the image's resolution",
                                       allowed=Allowed(0, 1, low_open=True))
    refine_smoothing: float = _option(0.0, "Gaussian smoothing (sigma, voxels of the refinement grid) of the "
                                           "refinement field (0 = none)", allowed=NON_NEGATIVE)
    refine_learning_rate: float = _option(1e-2, "Adam learning rate of the refinement field (mm per step)", allowed=POSITIVE)
    patience: int = _option(100, "stop when the smoothed loss has not improved for this many iterations (0 = never)", allowed=NON_NEGATIVE)
    seed: int = _option(0, "random seed (network weights and noise)", allowed=NON_NEGATIVE)
    ensemble: int = _option(1, "ensemble members optimised together, member m with seed + m; the result is their mean "
                               "field and uncertainty.nii.gz their spread (dip only)", allowed=AT_LEAST_ONE)
    dropout: float = _option(0.0, "dropout probability after every activation of the network; with ensemble K > 1 the "
                                  "members are then K Monte Carlo dropout samples of one network instead of K networks "
                                  "(K = 1: one sample)", allowed=Allowed(0, 0.99))
    device: str = _option("auto", "auto (CUDA when present), cpu or cuda", ("auto", "cpu", "cuda"))
    threads: int = _option(0, "CPU threads of the optimisation (0 = automatic: one for images under 2^20 voxels, "
                              "such as 2D slices, where more measured slower; else one per core)", allowed=NON_NEGATIVE)
    cuda_graphs: bool = _option(True, "replay each deformable iteration as one captured CUDA graph (CUDA only; fewer kernel launches)")
    mixed_precision: bool = _option(False, "bfloat16 autocast of the network on CUDA (ignored on the CPU); measured slower on an H100 for these small networks")
    channels_last: bool = _option(True, "channels-last memory format for the 2D network (faster on CPU; 3D is slower with it)")

    def validate(self) -> None:
        """Raise a DipregError naming the first option whose value is of the wrong type or not
        allowed (its field's ``choices`` or ``allowed`` metadata), with the allowed values."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            name = f"option {f.name}={value!r} (--{f.name.replace('_', '-')})"
            types = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[f.type]
            if not isinstance(value, types) or (isinstance(value, bool) and f.type != "bool"):
                raise DipregError(f"{name}: must be of type {f.type}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise DipregError(f"{name}: choose from {', '.join(choices)}")
            allowed = f.metadata.get("allowed")
            if allowed and value not in allowed:
                raise DipregError(f"{name}: must be {allowed}")
        if self.ensemble > 1 and self.method != "dip":
            raise DipregError(f"option ensemble={self.ensemble} (--ensemble): needs method dip (every free field starts "
                              "at zero, so the members of a classic ensemble would all be the same)")
        if self.ensemble > 1 and self.loss in ("mi", "nmi"):
            raise DipregError(f"option ensemble={self.ensemble} (--ensemble): not available with loss {self.loss} "
                              "(its joint histogram would mix the members); use lncc or ncc")


#: Interpolation of ``apply --interpolation`` and of warped label maps: name -> SimpleITK
#: interpolator (by attribute name, so that the command line does not import SimpleITK).
#: ``label`` is SimpleITK's label-linear (ANTs' genericLabel).
INTERPOLATORS = {"linear": "sitkLinear", "nearest": "sitkNearestNeighbor", "label": "sitkLabelLinear"}

#: Methods known to :func:`dipreg.baselines.run_method` (and ``dipreg evaluate --method``).
METHODS = ("dip", "classic", "itk", "ants", "identity")

#: Preset used by ``dip`` and ``classic`` when none is given.
DEFAULT_PRESETS = {"dip": "default", "classic": "classic"}


#: Named option sets. ``default`` is what measured best; ``paper`` is the published method.
PRESETS: dict[str, dict] = {
    "default": {},
    "paper": dict(
        loss="mae", regularization=0.0, bending=0.0, field="displacement", field_resolution=1.0,
        z_mode="fresh", channels=128, levels=5, skip_channels=4, input_channels=32, affine=False, pyramid_levels=1,
        max_loss_voxels=0,
        learning_rate=1e-2, iterations=500, patience=0,
    ),
    "fast": dict(iterations=150, channels=16, patience=30),
    "classic": dict(method="classic", learning_rate=5e-2, regularization=1.0, bending=0.0),
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
