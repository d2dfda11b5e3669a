"""dipreg: training-free deformable image registration with a deep image prior."""

__version__ = "0.1.0"

from dipreg.options import PRESETS, RegistrationConfig  # noqa: E402
from dipreg.errors import DipregError  # noqa: E402
from dipreg.registration import RegistrationResult, register  # noqa: E402

__all__ = ["register", "RegistrationResult", "RegistrationConfig", "PRESETS", "DipregError", "__version__"]
