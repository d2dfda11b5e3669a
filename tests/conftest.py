"""Shared fixtures: paths to the development data and small real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import rotation_direction, with_geometry

# The test images are tiny: one thread is as fast as several on an idle machine and much
# faster on a busy one (OpenMP threads spin while waiting for a core).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "src" / "dipreg" / "data"


@pytest.fixture(scope="session")
def brain_slice() -> sitk.Image:
    """The bundled ANTs r16 T1 slice (256 x 256, 1 mm) as float32, downsampled to 64 x 64."""
    image = sitk.Cast(sitk.ReadImage(str(BUNDLED_DATA / "r16slice.jpg")), sitk.sitkFloat32)
    return sitk.Shrink(image, [4, 4])


@pytest.fixture(scope="session")
def oblique_slice(brain_slice: sitk.Image) -> sitk.Image:
    """The 64 x 64 brain slice on an anisotropic (1.5 x 0.8 mm), 30-degree rotated, shifted grid."""
    return with_geometry(sitk.GetArrayFromImage(brain_slice), (1.5, 0.8), (10.0, -5.0), rotation_direction(2, 30))


@pytest.fixture(scope="session")
def brain_volume() -> sitk.Image:
    """MNI152 T1 (shared data) block-averaged to 19 x 23 x 18 voxels, zero-padded by 3, on an
    anisotropic (1.2 x 1.0 x 0.9 mm), rotated grid: 25 x 29 x 24 voxels."""
    path = SHARED_DATA / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    array = sitk.GetArrayFromImage(sitk.BinShrink(sitk.ReadImage(str(path), sitk.sitkFloat32), [10, 10, 10]))
    return with_geometry(np.pad(array, 3), (1.2, 1.0, 0.9), (5.0, -3.0, 2.0), rotation_direction(3, 20))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
