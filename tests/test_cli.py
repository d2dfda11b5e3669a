"""The ``dipreg`` command line: end-to-end runs, help text, ``apply`` and error handling."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation_direction, with_geometry

from dipreg import __version__
from dipreg.cli import main
from dipreg.engine import PRESETS, RegistrationConfig
from dipreg.registration import OUTPUT_FILES

#: Keys that metrics.json documents (README).
METRIC_KEYS = ("ssim", "ncc", "mse", "jacobian_mean", "jacobian_std", "jacobian_min", "folding_percent",
               "sdlogj", "iterations", "seconds", "device", "options", "dipreg_version")
FAST = ["--iterations", "6", "--quiet"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Call ``dipreg.cli.main`` in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(image: sitk.Image, path: Path) -> Path:
    """Write ``image`` to ``path`` and return the path."""
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# help


def test_console_script_help_runs_in_a_subprocess() -> None:
    """The installed ``dipreg`` entry point starts and lists its commands."""
    executable = shutil.which("dipreg")
    command = [executable, "--help"] if executable else [sys.executable, "-m", "dipreg.cli", "--help"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    for command_name in ("register", "apply", "demo"):
        assert command_name in completed.stdout


def _help_text(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(RegistrationConfig)])
def test_register_help_lists_every_option_with_its_default(field: str, capsys: pytest.CaptureFixture) -> None:
    """Each RegistrationConfig field is a flag whose help ends with its default value."""
    text = _help_text(["register", "--help"], capsys)
    default = next(f.default for f in dataclasses.fields(RegistrationConfig) if f.name == field)
    flag = f"--{field.replace('_', '-')}"
    start = text.index(f" {flag} ", text.index("registration options"))
    following = text.find(" --", start + len(flag) + 2)
    assert f"(default: {default})" in text[start:following if following > 0 else None]


def test_register_help_documents_presets_and_io_defaults(capsys: pytest.CaptureFixture) -> None:
    text = _help_text(["register", "--help"], capsys)
    for name in PRESETS:
        assert f"{name}:" in text
    assert "(default: default)" in text  # --preset
    assert "--channel CHANNEL" in text and "(default: none" in text
    assert "--quiet" in text and "(default: off)" in text


def test_version_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dipreg {__version__}"


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def pair_2d(tmp_path_factory: pytest.TempPathFactory, oblique_slice: sitk.Image) -> dict[str, Path]:
    """A 2D pair on an oblique grid (moving = fixed shifted 2 mm in x), with a label map of the moving."""
    root = tmp_path_factory.mktemp("pair2d")
    shift = sitk.TranslationTransform(2, (-2.0, 0.0))
    moving = sitk.Resample(oblique_slice, oblique_slice, shift, sitk.sitkLinear, 0.0)
    array = sitk.GetArrayFromImage(moving)
    labels = (np.digitize(array, [60.0, 160.0]) * 5).astype(np.uint8)  # values 0, 5, 10
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(moving)
    return {"fixed": write(oblique_slice, root / "fixed.nii.gz"), "moving": write(moving, root / "moving.nrrd"),
            "labels": write(label_image, root / "labels.nii.gz"), "root": root}


@pytest.fixture(scope="module")
def registered_2d(pair_2d: dict[str, Path]) -> Path:
    """Output directory of ``dipreg register`` on the 2D pair."""
    outdir = pair_2d["root"] / "out"
    assert main(["register", str(pair_2d["fixed"]), str(pair_2d["moving"]), "-o", str(outdir), *FAST]) == 0
    return outdir


def test_register_2d_writes_all_outputs(registered_2d: Path) -> None:
    assert sorted(p.name for p in registered_2d.iterdir()) == sorted(OUTPUT_FILES)


def test_metrics_json_has_documented_keys(registered_2d: Path) -> None:
    metrics = json.loads((registered_2d / "metrics.json").read_text())
    missing = [key for key in METRIC_KEYS if key not in metrics]
    assert missing == []
    assert metrics["iterations"] == 6
    assert metrics["options"]["iterations"] == 6
    assert metrics["dipreg_version"] == __version__
    assert metrics["device"].split(":")[0] in ("cpu", "cuda")


def test_outputs_are_on_the_fixed_grid(registered_2d: Path, pair_2d: dict[str, Path]) -> None:
    fixed = sitk.ReadImage(str(pair_2d["fixed"]))
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
        image = sitk.ReadImage(str(registered_2d / name))
        assert image.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), fixed.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-6)


def test_apply_labels_keeps_the_label_set(registered_2d: Path, pair_2d: dict[str, Path],
                                          capsys: pytest.CaptureFixture) -> None:
    """``dipreg apply --labels``: integer type kept, no value outside {0, 5, 10} appears."""
    out = pair_2d["root"] / "labels_on_fixed.nii.gz"
    code, _, err = run_cli(["apply", registered_2d / "displacement.nii.gz", pair_2d["labels"], "-o", out, "--labels"],
                           capsys)
    assert code == 0, err
    warped = sitk.ReadImage(str(out))
    assert warped.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(warped)).tolist()) == {0, 5, 10}


def test_apply_to_moving_reproduces_warped(registered_2d: Path, pair_2d: dict[str, Path],
                                           capsys: pytest.CaptureFixture) -> None:
    """``dipreg apply`` with the moving image gives back warped.nii.gz."""
    out = pair_2d["root"] / "moving_on_fixed.nii.gz"
    code, _, err = run_cli(["apply", registered_2d / "displacement.nii.gz", pair_2d["moving"], "-o", out], capsys)
    assert code == 0, err
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out))),
                               sitk.GetArrayFromImage(sitk.ReadImage(str(registered_2d / "warped.nii.gz"))), atol=1e-4)


@pytest.fixture(scope="module")
def registered_3d(tmp_path_factory: pytest.TempPathFactory, brain_volume: sitk.Image) -> Path:
    """Output directory of ``dipreg register`` on a small oblique 3D volume and a shifted copy."""
    root = tmp_path_factory.mktemp("pair3d")
    moving = sitk.Resample(brain_volume, brain_volume, sitk.TranslationTransform(3, (1.0, 0.0, -1.0)),
                           sitk.sitkLinear, 0.0)
    fixed_path, moving_path = write(brain_volume, root / "f.nii.gz"), write(moving, root / "m.mha")
    assert main(["register", str(fixed_path), str(moving_path), "-o", str(root / "out"), *FAST]) == 0
    return root / "out"


def test_register_3d_writes_all_outputs(registered_3d: Path) -> None:
    assert sorted(p.name for p in registered_3d.iterdir()) == sorted(OUTPUT_FILES)
    field = sitk.ReadImage(str(registered_3d / "displacement.nii.gz"))
    assert field.GetDimension() == 3 and field.GetNumberOfComponentsPerPixel() == 3
    metrics = json.loads((registered_3d / "metrics.json").read_text())
    assert [key for key in METRIC_KEYS if key not in metrics] == []


@pytest.mark.parametrize("dimension, rows", [(2, 1), (3, 3)])
def test_qc_figure_has_one_row_per_plane(dimension: int, rows: int, registered_2d: Path, registered_3d: Path) -> None:
    """qc.png: seven 2.6-inch panels per row at 100 dpi; one row in 2D, three mid-slices in 3D."""
    outdir = registered_2d if dimension == 2 else registered_3d
    png = sitk.ReadImage(str(outdir / "qc.png"))
    assert png.GetSize()[0] == 1820
    assert png.GetSize()[1] == 280 * rows


def test_register_prints_a_summary_unless_quiet(tmp_path: Path, brain_slice: sitk.Image,
                                                capsys: pytest.CaptureFixture) -> None:
    path = write(brain_slice, tmp_path / "slice.nii.gz")
    code, out, _ = run_cli(["register", path, path, "-o", tmp_path / "out", "--iterations", "2"], capsys)
    assert code == 0
    assert '"ssim"' in out and "wrote" in out


def test_register_channel_of_rgb_images(tmp_path: Path, brain_slice: sitk.Image, capsys: pytest.CaptureFixture) -> None:
    """--channel picks one component of a 3-channel TIFF for both images."""
    rgb = sitk.Compose([sitk.Cast(brain_slice, sitk.sitkUInt8)] * 3)
    path = write(rgb, tmp_path / "rgb.tif")
    code, _, err = run_cli(["register", path, path, "-o", tmp_path / "out", "--channel", "1", *FAST], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "warped.nii.gz").exists()


def test_demo_runs_on_the_bundled_slices(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["demo", "-o", tmp_path / "demo", "--iterations", "2", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(OUTPUT_FILES)


# ---------------------------------------------------------------------------------------------
# bad inputs and options: the catalogue of one-line errors is tests/test_errors.py


def test_unknown_option_value_is_a_usage_error(tmp_path: Path, brain_slice: sitk.Image) -> None:
    """argparse rejects a bad choice with exit code 2 before anything runs."""
    path = write(brain_slice, tmp_path / "slice.nii.gz")
    with pytest.raises(SystemExit) as info:
        main(["register", str(path), str(path), "-o", str(tmp_path / "out"), "--loss", "mind"])
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels", [False, True])
def test_apply_with_missing_image_gives_one_line_error(labels: bool, registered_2d: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.nii.gz"
    argv = ["apply", registered_2d / "displacement.nii.gz", tmp_path / "nothere.nii.gz", "-o", out]
    code, _, err = run_cli(argv + (["--labels"] if labels else []), capsys)
    assert code == 1
    assert err.strip() == f"dipreg: error: {tmp_path / 'nothere.nii.gz'}: file not found"
    assert not out.exists()


def test_apply_with_missing_field_gives_one_line_error(pair_2d: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    argv = ["apply", tmp_path / "nofield.nii.gz", pair_2d["moving"], "-o", tmp_path / "x.nii.gz"]
    code, _, err = run_cli(argv, capsys)
    assert code == 1
    assert "nofield.nii.gz: file not found" in err


def test_apply_rejects_an_image_that_is_not_a_field(pair_2d: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["apply", pair_2d["moving"], pair_2d["moving"], "-o", tmp_path / "x.nii.gz"], capsys)
    assert code == 1
    assert "not a displacement field" in err


def test_apply_rejects_dimension_mismatch(registered_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 3D label map cannot be warped by a 2D field."""
    volume = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    labels = write(volume, tmp_path / "labels3d.nii.gz")
    out = tmp_path / "x.nii.gz"
    code, _, err = run_cli(["apply", registered_2d / "displacement.nii.gz", labels, "-o", out, "--labels"], capsys)
    assert code == 1
    assert "labels3d.nii.gz: image is 3D but displacement field" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_apply_onto_a_reference_grid(registered_2d: Path, pair_2d: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """--reference chooses the output grid (here a coarser, differently rotated one)."""
    reference = with_geometry(np.random.default_rng(0).random((20, 30)), (2.0, 2.5), (0.0, 0.0),
                              rotation_direction(2, 10))
    ref_path = write(reference, tmp_path / "ref.nii.gz")
    out = tmp_path / "x.nii.gz"
    code, _, err = run_cli(["apply", registered_2d / "displacement.nii.gz", pair_2d["labels"], "-o", out,
                            "--labels", "--reference", ref_path], capsys)
    assert code == 0, err
    warped = sitk.ReadImage(str(out))
    assert warped.GetSize() == (30, 20)
    np.testing.assert_allclose(warped.GetSpacing(), (2.0, 2.5), atol=1e-6)


def test_register_reads_an_initial_transform_file(brain_slice: sitk.Image, tmp_path: Path, capsys) -> None:
    """--initial-transform takes an ITK transform file; the written field includes it."""
    shift = (8.0, 4.0)
    moving = sitk.Resample(brain_slice, brain_slice, sitk.TranslationTransform(2, [-s for s in shift]), sitk.sitkLinear, 0.0)
    transform_file = tmp_path / "initial.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(2, shift), str(transform_file))
    code, _, err = run_cli(["register", write(brain_slice, tmp_path / "f.nii.gz"), write(moving, tmp_path / "m.nii.gz"),
                            "-o", tmp_path / "out", "--initial-transform", transform_file, "--affine", "false", *FAST], capsys)
    assert code == 0, err
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "displacement.nii.gz")))
    brain = sitk.GetArrayFromImage(brain_slice) > 0.3 * sitk.GetArrayFromImage(brain_slice).max()
    np.testing.assert_allclose(field[brain].mean(axis=0), shift, atol=0.5)


def test_register_names_a_missing_initial_transform_file(brain_slice: sitk.Image, tmp_path: Path, capsys) -> None:
    image = write(brain_slice, tmp_path / "f.nii.gz")
    code, _, err = run_cli(["register", image, image, "-o", tmp_path / "out", "--initial-transform",
                            tmp_path / "missing.tfm", *FAST], capsys)
    assert code == 1
    assert "missing.tfm: transform file not found" in err


def test_register_names_an_unreadable_initial_transform_file(brain_slice: sitk.Image, tmp_path: Path, capsys) -> None:
    image = write(brain_slice, tmp_path / "f.nii.gz")
    (tmp_path / "bad.tfm").write_text("not a transform\n")
    code, _, err = run_cli(["register", image, image, "-o", tmp_path / "out", "--initial-transform",
                            tmp_path / "bad.tfm", *FAST], capsys)
    assert code == 1
    assert "bad.tfm: cannot read an ITK transform" in err
