"""dipreg: training-free deformable image registration with a deep image prior."""

__version__ = "0.1.0"

import os  # noqa: E402

# OpenMP threads that wait for work spin on their core by default; with two registrations (or a
# registration and anything else) on the same cores that spinning starves the others. Two default
# demo runs at once on 2 cores took 1.2x their time alone with passive waiting, 3.1-4.8x with
# active waiting; alone, passive costs 5-25 % (benchmarks/contention.py). It only takes effect if
# set before PyTorch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
