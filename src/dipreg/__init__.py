"""dipreg: training-free deformable image registration with a deep image prior."""

__version__ = "0.1.0"

from dipreg.errors import DipregError  # noqa: E402
from dipreg.options import PRESETS, RegistrationConfig  # noqa: E402

__all__ = ["register", "RegistrationResult", "RegistrationConfig", "PRESETS", "DipregError", "__version__"]

#: Names imported on first use: they need PyTorch, which ``import dipreg`` (and so the
#: command line's help and argument errors) does not load.
_LAZY = {"register": "dipreg.registration", "RegistrationResult": "dipreg.registration"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dipreg' has no attribute {name!r}")
