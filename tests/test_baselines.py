"""Baseline methods on tiny images: identity, ITK, ANTs, and the dispatcher run_method."""

import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from dipreg.baselines import METHODS, ants_registration, identity_registration, itk_registration, run_method
from dipreg.errors import DipregError
from dipreg.images import resample_to_reference

SHIFT_MM = (6.0, -4.0)


@pytest.fixture(scope="module")
def shifted_pair(brain_slice):
    """The 64 x 64 (4 mm) slice and a copy whose content moved by -SHIFT_MM.

    ``moving(p) = fixed(p - s)``, so the field that maps it back is ``u = +s`` everywhere.
    """
    moving = resample_to_reference(brain_slice, brain_slice, sitk.TranslationTransform(2, [-s for s in SHIFT_MM]))
    return brain_slice, moving


def _interior_mean(field: np.ndarray) -> np.ndarray:
    return field[16:-16, 16:-16].reshape(-1, 2).mean(axis=0)


def test_identity_gives_a_zero_field(shifted_pair):
    fixed, moving = shifted_pair
    result = identity_registration(fixed, moving)
    assert np.array_equal(result.displacement_array, np.zeros((64, 64, 2)))
    assert result.metrics["method"] == "identity"
    assert result.metrics["jacobian_mean"] == 1.0 and result.metrics["folding_percent"] == 0.0
    assert np.array_equal(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(moving))


def test_itk_recovers_a_known_shift(shifted_pair):
    fixed, moving = shifted_pair
    before = identity_registration(fixed, moving).metrics
    result = itk_registration(fixed, moving)
    assert result.metrics["ncc"] > max(0.97, before["ncc"] + 0.05)
    assert np.allclose(_interior_mean(result.displacement_array), SHIFT_MM, atol=1.0)
    assert result.displacement.GetSize() == fixed.GetSize()


def test_itk_is_reproducible(shifted_pair):
    fixed, moving = shifted_pair
    moving = resample_to_reference(moving, moving, sitk.Euler2DTransform([0, 0], 0.05))  # some rotation too
    first, second = itk_registration(fixed, moving), itk_registration(fixed, moving)
    assert np.array_equal(first.displacement_array, second.displacement_array)


def test_ants_recovers_a_known_shift_in_dipreg_convention(shifted_pair):
    pytest.importorskip("ants", reason="antspyx (the dipreg[ants] extra) is not installed")
    fixed, moving = shifted_pair
    result = ants_registration(fixed, moving)
    # the composed field reproduces ANTs' own warped image ...
    assert result.metrics["ants_warped_difference"] < 1e-3
    # ... and points the way dipreg's fields do (fixed point -> moving point)
    assert np.allclose(_interior_mean(result.displacement_array), SHIFT_MM, atol=1.0)


def test_missing_ants_gives_a_clear_error(shifted_pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)
    with pytest.raises(DipregError, match=r"dipreg\[ants\]"):
        ants_registration(*shifted_pair)


def test_run_method_times_every_method_the_same_way(shifted_pair, monkeypatch):
    """The seconds cover the whole call of the method (here made to take at least 0.3 s)."""
    slow = identity_registration

    def slow_identity(*args):
        time.sleep(0.3)
        return slow(*args)

    monkeypatch.setattr("dipreg.baselines.identity_registration", slow_identity)
    result = run_method("identity", *shifted_pair)
    assert 0.3 <= result.metrics["seconds"] < 30
    assert result.metrics["peak_memory_mb"] > 0
    assert "resident set size" in result.metrics["peak_memory_definition"]


@pytest.mark.parametrize("method, preset", [("dip", "default"), ("classic", "classic")])
def test_run_method_passes_options_to_dipreg(shifted_pair, method, preset):
    result = run_method(method, *shifted_pair, iterations=3)
    assert result.metrics["method"] == method
    assert result.metrics["preset"] == preset
    assert result.metrics["iterations"] == 3
    assert result.metrics["optimisation_seconds"] <= result.metrics["seconds"]


def test_run_method_refuses_bad_requests(shifted_pair):
    assert set(METHODS) == {"dip", "classic", "itk", "ants", "identity"}
    with pytest.raises(DipregError, match="unknown method"):
        run_method("elastix", *shifted_pair)
    with pytest.raises(DipregError, match="takes no registration options"):
        run_method("itk", *shifted_pair, iterations=3)
