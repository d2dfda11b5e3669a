"""The transform outputs on the command line: labels, landmarks, ``invert`` and ``transform-points``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import world_points

from dipreg.cli import main
from dipreg.synthetic import random_displacement
from dipreg.transforms import displacement_transform, invert_displacement

SHIFT = np.array([2.0, -1.0])


@pytest.fixture(scope="module")
def shifted_pair(tmp_path_factory: pytest.TempPathFactory, oblique_slice: sitk.Image) -> dict[str, Path]:
    """The oblique slice and a copy moved by SHIFT mm, label maps of both, landmarks moved alike."""
    root = tmp_path_factory.mktemp("shifted")
    moving = sitk.Resample(oblique_slice, oblique_slice, sitk.TranslationTransform(2, (-SHIFT).tolist()),
                           sitk.sitkLinear, 0.0)
    paths = {"root": root}
    for name, image in (("fixed", oblique_slice), ("moving", moving)):
        paths[name] = root / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
        labels = sitk.Cast(sitk.BinaryThreshold(image, 60.0, 1e9, 3, 0), sitk.sitkUInt8)
        paths[f"{name}_labels"] = root / f"{name}_labels.nii.gz"
        sitk.WriteImage(labels, str(paths[f"{name}_labels"]))
    points = world_points(oblique_slice)[20:44:6, 20:44:6].reshape(-1, 2)
    np.savetxt(root / "fixed_points.csv", points, delimiter=",", header="x,y", comments="")
    np.savetxt(root / "moving_points.csv", points + SHIFT, delimiter=",")  # no header
    paths.update(fixed_points=root / "fixed_points.csv", moving_points=root / "moving_points.csv")
    return paths


@pytest.fixture(scope="module")
def registered(shifted_pair: dict[str, Path]) -> Path:
    outdir = shifted_pair["root"] / "out"
    code = main(["register", str(shifted_pair["fixed"]), str(shifted_pair["moving"]), "-o", str(outdir),
                 "--moving-labels", str(shifted_pair["moving_labels"]), "--fixed-labels", str(shifted_pair["fixed_labels"]),
                 "--fixed-landmarks", str(shifted_pair["fixed_points"]),
                 "--moving-landmarks", str(shifted_pair["moving_points"]), "--iterations", "40", "--quiet"])
    assert code == 0
    return outdir


def test_register_writes_labels_dice_and_landmark_errors(registered: Path) -> None:
    metrics = json.loads((registered / "metrics.json").read_text())
    warped = sitk.ReadImage(str(registered / "warped_labels.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(warped)).tolist()) == {0, 3}
    assert metrics["label_interpolation"] == "label"
    assert metrics["dice_3"] == metrics["dice_mean"] > 0.95
    assert metrics["tre_before_mean_mm"] == pytest.approx(np.linalg.norm(SHIFT))
    assert metrics["tre_after_mean_mm"] < 0.4 * metrics["tre_before_mean_mm"]
    with open(registered / "landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["landmarks"] == 16
    assert float(rows[0]["tre_before_mm"]) == pytest.approx(np.linalg.norm(SHIFT))


def test_inverse_consistency_is_in_the_metrics(registered: Path) -> None:
    metrics = json.loads((registered / "metrics.json").read_text())
    assert 0 <= metrics["inverse_consistency_mean_mm"] <= metrics["inverse_consistency_p95_mm"] < 0.05


def test_transform_points_agrees_with_simpleitk_and_ants(registered: Path, shifted_pair: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """p -> p + u(p): SimpleITK's TransformPoint and ANTs' apply_transforms_to_points give the same points."""
    out = tmp_path / "mapped.csv"
    field_path = registered / "displacement.nii.gz"
    assert main(["transform-points", str(field_path), str(shifted_pair["fixed_points"]), "-o", str(out)]) == 0
    mapped = np.loadtxt(out, delimiter=",", skiprows=1)
    points = np.loadtxt(shifted_pair["fixed_points"], delimiter=",", skiprows=1)
    transform = displacement_transform(sitk.ReadImage(str(field_path)))
    np.testing.assert_allclose(mapped, [transform.TransformPoint(p.tolist()) for p in points], atol=1e-5)
    np.testing.assert_allclose(mapped, points + SHIFT, atol=0.5)  # the moving landmarks, nearly
    ants = pytest.importorskip("ants")
    import pandas as pd

    by_ants = ants.apply_transforms_to_points(2, pd.DataFrame(points, columns=["x", "y"]), [str(field_path)])
    np.testing.assert_allclose(by_ants[["x", "y"]].to_numpy(), mapped, atol=1e-4)


def test_invert_command_matches_the_fixed_point_inverse(oblique_slice: sitk.Image, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    field = random_displacement(oblique_slice, max_displacement=3.0, smoothness=8.0, seed=2)
    sitk.WriteImage(field, str(tmp_path / "field.nii.gz"))
    assert main(["invert", str(tmp_path / "field.nii.gz"), "-o", str(tmp_path / "inverse.nii.gz")]) == 0
    assert "residual" in capsys.readouterr().out
    expected, _ = invert_displacement(field, tolerance=1e-3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "inverse.nii.gz"))),
                               sitk.GetArrayFromImage(expected), atol=1e-4)


def test_register_rejects_fixed_labels_without_moving_labels(shifted_pair: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = main(["register", str(shifted_pair["fixed"]), str(shifted_pair["moving"]), "-o", str(tmp_path / "o"),
                 "--fixed-labels", str(shifted_pair["fixed_labels"]), "--quiet"])
    assert code == 1 and "--moving-labels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
