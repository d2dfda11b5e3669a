"""benchmarks/front.py: the front of a method's points, interpolation on it, and the peers'
conventions (their fields must map a known shift back in dipreg's convention)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dipreg.images import resample_to_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import front

SHIFT_MM = (6.0, -4.0)


def _point(sdlogj, epe, folding=0.0, method="m"):
    return {"method": method, "sdlogj": sdlogj, "epe_mm": epe, "dice_mean": -epe, "counts": folding == 0}


def test_front_keeps_the_undominated_points_that_do_not_fold():
    points = [_point(0.1, 0.5), _point(0.2, 0.3), _point(0.15, 0.6), _point(0.3, 0.35), _point(0.4, 0.1),
              _point(0.05, 0.05, folding=0.2), _point(0.1, 0.01, method="other")]
    kept = front.front(points, "m", "epe_mm")
    assert [(p["sdlogj"], p["epe_mm"]) for p in kept] == [(0.1, 0.5), (0.2, 0.3), (0.4, 0.1)]
    # higher is better for Dice: the same points, since dice = -epe here
    assert front.front(points, "m", "dice_mean") == kept


def test_front_value_at_a_smoothness_is_its_best_point_no_rougher():
    line = [_point(0.1, 0.5), _point(0.2, 0.3), _point(0.4, 0.1)]
    assert front.at_smoothness(line, "epe_mm", 0.15) == pytest.approx(0.5)
    assert front.at_smoothness(line, "epe_mm", 0.2) == pytest.approx(0.3)
    assert front.at_smoothness(line, "epe_mm", 0.5) == pytest.approx(0.1)
    assert front.at_smoothness(line, "epe_mm", 0.05) is None


@pytest.fixture(scope="module")
def shifted_pair(brain_slice):
    """``moving(p) = fixed(p - s)``: the field that maps it back is ``u = +s`` everywhere."""
    moving = resample_to_reference(brain_slice, brain_slice, sitk.TranslationTransform(2, [-s for s in SHIFT_MM]))
    return brain_slice, moving


@pytest.mark.parametrize("method", ["greedy", "ants-syncc"])
def test_peer_recovers_a_known_shift_in_dipreg_convention(shifted_pair, method):
    pytest.importorskip("picsl_greedy" if method == "greedy" else "ants", reason=f"{method} is not installed")
    fixed, moving = shifted_pair
    entry = front.METHODS[method]
    result = entry.run(fixed, moving, entry.default, 1)
    assert result.metrics[f"{method.split('-')[0]}_warped_difference"] < 1e-3
    assert result.displacement.GetSize() == fixed.GetSize()
    interior = result.displacement_array[16:-16, 16:-16].reshape(-1, 2).mean(axis=0)
    assert np.allclose(interior, SHIFT_MM, atol=1.0)
    assert result.metrics["ncc"] > 0.97


def test_greedy_register_script_recovers_a_known_shift_in_dipreg_convention(shifted_pair, tmp_path):
    """benchmarks/greedy_register.py (the Greedy run that speed.py times) as a whole process: its
    displacement maps the shift back, reproduces Greedy's warped image, and it loads no dipreg/torch."""
    pytest.importorskip("picsl_greedy", reason="picsl-greedy is not installed")
    fixed, moving = shifted_pair
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "greedy_register.py"
    argv = [str(script), str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), str(tmp_path / "out")]
    check = (f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert not {'dipreg', 'torch'} & set(sys.modules), 'imports dipreg or torch'")
    subprocess.run([sys.executable, "-c", check], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = tmp_path / "out"
    assert json.loads((out / "timing.json").read_text())["seconds"] > 0
    assert (out / "greedy.log").read_text()
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetSize() == fixed.GetSize()
    field.CopyInformation(fixed)
    warped = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Image(field)), sitk.sitkLinear, 0.0)
    greedy_warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    values = sitk.GetArrayFromImage(moving)
    assert np.abs(sitk.GetArrayFromImage(warped) - greedy_warped).max() < 1e-3 * (values.max() - values.min())
    interior = sitk.GetArrayFromImage(field)[16:-16, 16:-16].reshape(-1, 2).mean(axis=0)
    assert np.allclose(interior, SHIFT_MM, atol=1.0)
