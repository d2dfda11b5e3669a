"""End-to-end smoke test of the public API on a small real slice."""

import numpy as np
import SimpleITK as sitk

import dipreg


def test_identity_pair_gives_near_zero_field(brain_slice):
    result = dipreg.register(brain_slice, brain_slice, iterations=30)
    field = result.displacement_array
    assert field.shape == (64, 64, 2)
    assert np.abs(field).max() < 0.5
    det = sitk.GetArrayFromImage(result.jacobian)
    assert np.allclose(det, 1.0, atol=0.05)
    assert result.metrics["ssim"] > 0.99
