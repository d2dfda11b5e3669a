"""dipreg evaluate / compare: PAIRS.csv parsing, per-pair scoring, summary, report, CLI."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from dipreg.cli import main
from dipreg.comparison import compare
from dipreg.errors import DipregError
from dipreg.evaluation import evaluate
from dipreg.pairs import read_pairs
from dipreg.summary import read_results
from dipreg.images import write_image
from dipreg.registration import OUTPUT_FILES
from dipreg.synthetic import known_warp_pair


@pytest.fixture(scope="module")
def dataset(brain_slice, tmp_path_factory):
    """A folder with images/ (a known-warp pair, labels, masks, a 3D volume) and a CSV in csv/."""
    root = tmp_path_factory.mktemp("dataset")
    pair = known_warp_pair(brain_slice, max_displacement=6.0, smoothness=16.0, seed=2)
    paths = pair.save(root / "images")
    labels = sitk.Cast(sitk.BinaryThreshold(pair.fixed, 40, 1e6, 1, 0) + sitk.BinaryThreshold(pair.fixed, 120, 1e6, 1, 0),
                       sitk.sitkUInt8)
    write_image(labels, root / "images" / "labels.nii.gz")
    write_image(sitk.Image([8, 8, 8], sitk.sitkFloat32) + 1.0 + sitk.GaussianSource(sitk.sitkFloat32, [8, 8, 8]),
                root / "images" / "volume.nii.gz")
    (root / "csv").mkdir()
    return root, paths


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_paths_are_relative_to_the_csv_and_optional_columns_may_be_missing(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    pairs_csv = _write_csv(root / "csv" / "plain.csv", ["fixed", "moving"],
                           [["../images/fixed.nii.gz", "../images/moving.nii.gz"],
                            ["../images/moving.nii.gz", "../images/fixed.nii.gz"]])
    monkeypatch.chdir(tmp_path)  # somewhere else: paths must not depend on the working directory
    specs = read_pairs(pairs_csv)
    assert [spec.id for spec in specs] == ["pair001", "pair002"]
    assert specs[0].fixed.resolve() == (root / "images" / "fixed.nii.gz").resolve()
    assert specs[0].fixed_labels is None and specs[0].fixed_channel is None and specs[0].true_displacement is None


def test_all_columns_are_parsed(dataset):
    root, _ = dataset
    header = ["id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask",
              "fixed_channel", "moving_channel", "true_displacement", "initial_transform"]
    row = ["known", "../images/fixed.nii.gz", "../images/moving.nii.gz", "../images/labels.nii.gz",
           "../images/labels.nii.gz", "../images/mask.nii.gz", "../images/mask.nii.gz", "0", "0",
           "../images/true_displacement.nii.gz", "../images/true_displacement.nii.gz"]
    (spec,) = read_pairs(_write_csv(root / "csv" / "full.csv", header, [row]))
    assert spec.id == "known" and spec.fixed_channel == 0 and spec.moving_labels.name == "labels.nii.gz"
    assert spec.true_displacement.name == "true_displacement.nii.gz" == spec.initial_transform.name


@pytest.mark.parametrize("header, rows, message", [
    (["fixed", "moving"], [["../images/fixed.nii.gz", "../images/moving.nii.gz"],
                           ["../images/fixed.nii.gz", "../images/nowhere.nii.gz"]],
     r"row 2 \(line 3\): moving file ../images/nowhere.nii.gz not found"),
    (["fixed", "moving"], [["../images/fixed.nii.gz", ""]], r"row 1 \(line 2\): column moving is empty"),
    (["fixed", "moving", "fixed_channel"], [["../images/fixed.nii.gz", "../images/moving.nii.gz", "FLAIR"]],
     r"row 1 \(line 2\): fixed_channel 'FLAIR' is not a whole number"),
    (["fixed", "moving", "fixed_labels"], [["../images/fixed.nii.gz", "../images/moving.nii.gz", "../images/labels.nii.gz"]],
     r"row 1 \(line 2\): give both fixed_labels and moving_labels"),
    (["id", "fixed", "moving"], [["a", "../images/fixed.nii.gz", "../images/moving.nii.gz"],
                                 ["a", "../images/moving.nii.gz", "../images/fixed.nii.gz"]],
     r"row 2: id 'a' already used by row 1"),
    (["id", "fixed", "moving"], [["../up", "../images/fixed.nii.gz", "../images/moving.nii.gz"]],
     r"row 1 \(line 2\): id '../up' cannot name a folder"),
    (["fixed", "moving"], [["../images/fixed.nii.gz", "../images/moving.nii.gz", "extra"]],
     r"row 1 \(line 2\): more cells than columns"),
    (["fixed", "moving", "fixed_lables"], [], r"unknown column\(s\) fixed_lables"),
    (["fixed"], [], r"missing column\(s\) moving"),
    (["fixed", "moving"], [], r"no pairs listed"),
])
def test_bad_csv_gives_a_clear_error_naming_the_row(dataset, header, rows, message):
    root, _ = dataset
    with pytest.raises(DipregError, match=message):
        read_pairs(_write_csv(root / "csv" / "bad.csv", header, rows))


def test_evaluate_identity_scores_labels_masks_and_known_warp(dataset, tmp_path, capsys):
    root, paths = dataset
    header = ["id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask", "true_displacement"]
    pairs_csv = _write_csv(root / "csv" / "known.csv", header, [
        ["known", "../images/fixed.nii.gz", "../images/moving.nii.gz", "../images/labels.nii.gz",
         "../images/labels.nii.gz", "../images/mask.nii.gz", "../images/mask.nii.gz",
         "../images/true_displacement.nii.gz"],
        ["broken", "../images/fixed.nii.gz", "../images/volume.nii.gz", "", "", "", "", ""],
    ])
    summary = evaluate(pairs_csv, tmp_path / "out", method="identity")
    rows = {row["id"]: row for row in read_results(tmp_path / "out")}
    known = rows["known"]
    # the same label map on both sides and a zero field: perfect overlap
    assert known["dice_1"] == known["dice_2"] == known["dice_mean"] == pytest.approx(1.0)
    assert known["mask_dice"] == pytest.approx(1.0)
    # identity's endpoint error is the mean length of the true field over the mask
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["true_displacement"])))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["mask"]))).astype(bool)
    assert known["epe_mm"] == pytest.approx(np.sqrt((truth**2).sum(-1))[mask].mean())
    assert known["jacobian_mean"] == 1.0 and known["folding_percent"] == 0.0 and known["sdlogj"] == 0.0
    pair_metrics = json.loads((tmp_path / "out" / "pairs" / "known" / "metrics.json").read_text())
    assert known["seconds"] == pytest.approx(pair_metrics["seconds"]) and known["peak_memory_mb"] > 0
    assert "3D" in rows["broken"]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "pairs" / "known").iterdir()) == sorted(
        [*OUTPUT_FILES, "warped_labels.nii.gz"])
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["n_pairs"] == 2 and saved["n_failed"] == 1 and saved["failed"][0]["id"] == "broken"
    assert saved["metrics"]["epe_mm"]["mean"] == pytest.approx(known["epe_mm"])
    assert "data_range=1" in saved["ssim_definition"] and "resident set size" in saved["peak_memory_definition"]
    assert summary["table"] in capsys.readouterr().out
    assert f"SSIM             {known['ssim']:.3f} ± 0.000" in summary["table"]
    assert "Dice label 2" in summary["table"] and "EPE mm" in summary["table"]


def test_every_method_starts_from_the_pairs_initial_transform(dataset, tmp_path, monkeypatch):
    """A baseline registers the moving image resampled through the initial transform, and the
    written field includes it; dip and classic get it passed to register()."""
    root, paths = dataset
    fixed = sitk.ReadImage(str(paths["fixed"]))
    shift = (3.0, -2.0)
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(2, [-s for s in shift]), sitk.sitkLinear, 0.0)
    write_image(moving, root / "images" / "shifted.nii.gz")
    sitk.WriteTransform(sitk.TranslationTransform(2, shift), str(root / "images" / "shift.tfm"))
    pairs_csv = _write_csv(root / "csv" / "initial.csv", ["id", "fixed", "moving", "initial_transform"], [
        ["with", "../images/fixed.nii.gz", "../images/shifted.nii.gz", "../images/shift.tfm"],
        ["without", "../images/fixed.nii.gz", "../images/shifted.nii.gz", ""],
    ])
    evaluate(pairs_csv, tmp_path / "identity", method="identity")
    rows = {row["id"]: row for row in read_results(tmp_path / "identity")}
    assert rows["with"]["initial_transform"].endswith("shift.tfm") and "initial_transform" not in rows["without"]
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "identity" / "pairs" / "with" / "displacement.nii.gz")))
    assert np.allclose(field, shift)
    assert rows["with"]["ssim"] > 0.9 and rows["with"]["ssim"] > rows["without"]["ssim"] + 0.05

    seen = []

    def register_stub(*args, initial_transform=None, **kwargs):
        seen.append(initial_transform)
        raise DipregError("stub: not registering")

    monkeypatch.setattr("dipreg.baselines.register", register_stub)
    evaluate(pairs_csv, tmp_path / "dip", method="dip")
    assert [str(t).endswith("shift.tfm") if t else t for t in seen] == [True, None]


def test_mask_columns_reach_the_similarity_only_with_mask_similarity(dataset, tmp_path, monkeypatch):
    """Without the option the masks only score the pair; with it dip gets them as its
    similarity masks, the summary says which; a baseline refuses it before anything runs."""
    root, _ = dataset
    pairs_csv = _write_csv(root / "csv" / "masks.csv", ["fixed", "moving", "fixed_mask", "moving_mask"], [
        ["../images/fixed.nii.gz", "../images/moving.nii.gz", "../images/mask.nii.gz", "../images/mask.nii.gz"]])
    seen = []

    def register_stub(*args, fixed_mask=None, moving_mask=None, **kwargs):
        seen.append((fixed_mask, moving_mask))
        raise DipregError("stub: not registering")

    monkeypatch.setattr("dipreg.baselines.register", register_stub)
    plain = evaluate(pairs_csv, tmp_path / "plain", method="dip", quiet=True)
    masked = evaluate(pairs_csv, tmp_path / "masked", method="dip", quiet=True, mask_similarity=True)
    assert seen[0] == (None, None)
    assert [path.name for path in seen[1]] == ["mask.nii.gz", "mask.nii.gz"]
    assert not plain["mask_similarity"] and masked["mask_similarity"]
    with pytest.raises(DipregError, match="takes no similarity masks"):
        evaluate(pairs_csv, tmp_path / "itk", method="itk", mask_similarity=True)
    assert not (tmp_path / "itk").exists()


def test_label_maps_on_another_grid_are_resampled_in_physical_space(dataset, tmp_path):
    root, _ = dataset
    labels = sitk.ReadImage(str(root / "images" / "labels.nii.gz"))
    # the same anatomy stored two voxels further along x, with the origin moved to match
    shifted = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(labels), 2, axis=1))
    shifted.CopyInformation(labels)
    shifted.SetOrigin((labels.GetOrigin()[0] - 2 * labels.GetSpacing()[0], labels.GetOrigin()[1]))
    write_image(shifted, root / "images" / "labels_shifted.nii.gz")
    pairs_csv = _write_csv(root / "csv" / "shifted.csv", ["fixed", "moving", "fixed_labels", "moving_labels"], [
        ["../images/fixed.nii.gz", "../images/fixed.nii.gz", "../images/labels_shifted.nii.gz", "../images/labels.nii.gz"]])
    evaluate(pairs_csv, tmp_path / "out", method="identity", quiet=True)
    (row,) = read_results(tmp_path / "out")
    assert row["dice_mean"] == pytest.approx(1.0)
    assert "labels_shifted.nii.gz: resampled" in row["notes"]


def test_options_for_a_baseline_are_refused_before_anything_runs(dataset, tmp_path):
    root, _ = dataset
    pairs_csv = _write_csv(root / "csv" / "one.csv", ["fixed", "moving"], [["../images/fixed.nii.gz", "../images/moving.nii.gz"]])
    with pytest.raises(DipregError, match="takes no registration options"):
        evaluate(pairs_csv, tmp_path / "out", method="itk", iterations=5)
    with pytest.raises(DipregError, match="unknown option"):
        evaluate(pairs_csv, tmp_path / "out", method="dip", iterationz=5)
    assert not (tmp_path / "out").exists()


def test_cli_evaluate_and_compare(dataset, tmp_path, capsys):
    root, _ = dataset
    pairs_csv = _write_csv(root / "csv" / "two.csv", ["fixed", "moving", "true_displacement", "fixed_mask"], [
        ["../images/fixed.nii.gz", "../images/moving.nii.gz", "../images/true_displacement.nii.gz", "../images/mask.nii.gz"],
        ["../images/moving.nii.gz", "../images/fixed.nii.gz", "", ""],
    ])
    assert main(["evaluate", str(pairs_csv), "-o", str(tmp_path / "classic"), "--method", "classic",
                 "--iterations", "2", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "classic" / "pairs" / "pair001" / "metrics.json").read_text())
    assert metrics["method"] == "classic" and metrics["preset"] == "classic" and metrics["iterations"] == 2
    assert main(["evaluate", str(pairs_csv), "-o", str(tmp_path / "identity"), "--method", "identity", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "classic"), str(tmp_path / "identity"), "-o", str(tmp_path / "report")]) == 0
    report = tmp_path / "report"
    page = (report / "index.html").read_text()
    for name in ("boxplots.png", "figure2.png", "qc/pair001-classic.png", "qc/pair001-identity.png"):
        assert (report / name).is_file() and name in page
    assert "data_range=1" in page and "EPE mm" in page
    for method in ("classic", "identity"):  # every pair's report, linked relative to the compare folder
        for pair_id in ("pair001", "pair002"):
            href = f"../{method}/pairs/{pair_id}/report.html"
            assert f"href='{href}'" in page and (report / href).resolve().is_file()
    with open(report / "wins.csv") as handle:
        tally = {row["metric"]: row for row in csv.DictReader(handle)}
    assert tally["folding_percent"]["method"] == "identity" and int(tally["ssim"]["pairs"]) == 2
    assert tally["jacobian_mean"]["wins"] == ""
    with open(report / "paired.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert main(["evaluate", str(root / "csv" / "missing.csv"), "-o", str(tmp_path / "x"), "--method", "identity"]) == 1
    assert "missing.csv: file not found" in capsys.readouterr().err


def test_compare_labels_repeated_methods_by_folder(dataset, tmp_path):
    root, _ = dataset
    pairs_csv = _write_csv(root / "csv" / "id.csv", ["fixed", "moving"], [["../images/fixed.nii.gz", "../images/moving.nii.gz"]])
    for name in ("first", "second"):
        evaluate(pairs_csv, tmp_path / name, method="identity", quiet=True)
    compare([tmp_path / "first", tmp_path / "second"], tmp_path / "report")
    assert (tmp_path / "report" / "qc" / "pair001-second.png").is_file()
    with pytest.raises(DipregError, match="no results.csv"):
        compare([tmp_path / "first", tmp_path / "nothing"], tmp_path / "report")

