"""Shared fixtures: paths to the development data and small real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "src" / "dipreg" / "data"


@pytest.fixture(scope="session")
def brain_slice() -> sitk.Image:
    """The bundled ANTs r16 T1 slice (256 x 256, 1 mm) as float32, downsampled to 64 x 64."""
    image = sitk.Cast(sitk.ReadImage(str(BUNDLED_DATA / "r16slice.jpg")), sitk.sitkFloat32)
    return sitk.Shrink(image, [4, 4])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
