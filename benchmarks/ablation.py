"""Ablation of the deep-image-prior configuration: every variant on every development set.

Writes one JSON per data set to ``benchmarks/results/ablation-<dataset>.json`` (rows per
variant and pair; re-running merges into it) and regenerates ``docs/ablation.md``.

    python benchmarks/ablation.py                          # everything (slow: ~1 h on 2 cores)
    python benchmarks/ablation.py --datasets knownwarp2d --variants default "z fixed"
    python benchmarks/ablation.py --report-only            # rebuild docs/ablation.md from the JSON

Data sets (from ../shared/data):
  knownwarp2d  MNI152 axial slices warped by a known smooth random field (max 8 mm):
               EPE (mm) against the numerically inverted field, GM/WM Dice.
  lgg2d        TCGA-LGG FLAIR inter-patient pairs from lgg2d/pairs.csv (SSIM, regularity).
  oasis3d      OASIS B onto A, 3D, tissue Dice (only the variants marked 3D).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import dipreg
from dipreg.images import resample_to_reference
from dipreg.metrics import dice
from dipreg.synthetic import displacement_endpoint_error, known_warp_pair
from dipreg.transforms import displacement_transform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ROOT / "docs" / "ablation.md"

#: name -> (preset, options, run in 3D too)
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "default": ("default", {}, True),
    "paper (literal)": ("paper", {}, False),
    "paper + fixed z": ("paper", {"z_mode": "fixed"}, False),
    "paper + affine + pyramid": ("paper", {"affine": True, "pyramid_levels": 2}, False),
    "z fresh": ("default", {"z_mode": "fresh"}, False),
    "z fixed": ("default", {"z_mode": "fixed"}, False),
    "displacement (no svf)": ("default", {"field": "displacement"}, False),
    "field 1/2 res": ("default", {"field_resolution": 0.5}, False),
    "field full res": ("default", {"field_resolution": 1.0}, False),
    "lambda 0": ("default", {"regularization": 0.0}, False),
    "lambda 0.3": ("default", {"regularization": 0.3}, False),
    "lambda 2": ("default", {"regularization": 2.0}, False),
    "lambda 3": ("default", {"regularization": 3.0}, False),
    "loss mae": ("default", {"loss": "mae"}, False),
    "loss ncc (global)": ("default", {"loss": "ncc"}, False),
    "no pyramid": ("default", {"pyramid_levels": 1}, False),
    "pyramid 3": ("default", {"pyramid_levels": 3}, False),
    "no affine": ("default", {"affine": False}, False),
    "no batchnorm": ("default", {"batchnorm": False}, False),
    "64 channels": ("default", {"channels": 64}, False),
    "fast preset": ("fast", {}, True),
    "classic (free field, same loss/svf)": ("classic", {}, True),
}

METRICS = ("ssim", "folding_percent", "sdlogj", "dice_mean", "epe_mm", "seconds")


def knownwarp2d_pairs(limit: int):
    """MNI152 axial slices (every 12 mm around the centre) with a known random warp each."""
    t1 = sitk.ReadImage(str(DATA / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    gm = sitk.ReadImage(str(DATA / "mni152" / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    wm = sitk.ReadImage(str(DATA / "mni152" / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    labels = sitk.Cast(gm > 0.5, sitk.sitkUInt8) + 2 * sitk.Cast(wm > 0.5, sitk.sitkUInt8)
    depth = t1.GetSize()[2]
    for k, z in enumerate([depth // 2 + dz for dz in (0, 12, -12, 24, -24, 6)][:limit]):
        def axial(image):
            size = list(image.GetSize())
            return sitk.Extract(image, [size[0], size[1], 0], [0, 0, z])
        fixed = axial(t1)
        pair = known_warp_pair(fixed, max_displacement=8.0, smoothness=16.0, seed=k)
        fixed_labels = sitk.Cast(axial(labels), sitk.sitkUInt8)
        moving_labels = sitk.Resample(fixed_labels, fixed_labels, displacement_transform(pair.forward),
                                      sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        yield f"mni-z{z}", dict(fixed=pair.fixed, moving=pair.moving, truth=pair.truth, mask=pair.mask,
                                fixed_labels=fixed_labels, moving_labels=moving_labels)


def lgg2d_pairs(limit: int):
    """Inter-patient FLAIR pairs of lgg2d/pairs.csv."""
    rows = list(csv.DictReader(open(DATA / "lgg2d" / "pairs.csv")))[:limit]
    for row in rows:
        name = Path(row["moving"]).stem + "->" + Path(row["fixed"]).stem
        yield name, dict(fixed=str(DATA / "lgg2d" / row["fixed"]), moving=str(DATA / "lgg2d" / row["moving"]), channel=1)


def oasis3d_pairs(limit: int):
    """OASIS image B onto image A with their tissue segmentations."""
    base = DATA / "oasis3d"
    fixed = sitk.ReadImage(str(base / "image_A_160x192x144.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(base / "image_B_160x192x144.nii.gz"), sitk.sitkFloat32)
    # The segmentation headers are right (copying the image header shifts them by voxels):
    # bring each onto its image's grid in physical space.
    labels = [resample_to_reference(sitk.ReadImage(str(base / f"image_{name}_160x192x144_seg.nii.gz"), sitk.sitkUInt8),
                                    image, labels=True)
              for name, image in (("A", fixed), ("B", moving))]
    yield "oasis-B->A", dict(fixed=fixed, moving=moving, fixed_labels=labels[0], moving_labels=labels[1])


DATASETS = {"knownwarp2d": knownwarp2d_pairs, "lgg2d": lgg2d_pairs, "oasis3d": oasis3d_pairs}


def run_pair(preset: str, options: dict, pair: dict) -> dict:
    """Register one pair with one variant and score it."""
    start = time.perf_counter()
    result = dipreg.register(pair["fixed"], pair["moving"], preset, channel=pair.get("channel"), **options)
    row = {k: result.metrics[k] for k in ("ssim", "ncc", "folding_percent", "sdlogj", "jacobian_std")}
    row["seconds"] = time.perf_counter() - start
    if "truth" in pair:
        row["epe_mm"] = displacement_endpoint_error(result.displacement, pair["truth"], pair["mask"])
    if "fixed_labels" in pair:
        warped = result.apply(pair["moving_labels"], labels=True)
        scores = dice(sitk.GetArrayFromImage(pair["fixed_labels"]), sitk.GetArrayFromImage(warped))
        row["dice"] = scores
        row["dice_mean"] = float(np.nanmean(list(scores.values())))
    return row


def write_report() -> None:
    """Regenerate docs/ablation.md from every results/ablation-*.json."""
    lines = [
        "# Ablation of the deep-image-prior configuration",
        "",
        "Generated by `python benchmarks/ablation.py` (re-run it to regenerate; `--report-only` rebuilds",
        "this page from `benchmarks/results/ablation-*.json`). Means over the pairs of each data set;",
        "SSIM is scikit-image's on [0,1]-scaled images with `data_range=1`. Folding is % of voxels with",
        "det J <= 0; SDlogJ the std of log det J. EPE is the endpoint error in mm against the numerically",
        "inverted known warp. Seconds are wall time per pair on the machine that ran it (2 CPU cores,",
        "shared with other jobs: compare within a table only).",
        "",
    ]
    for path in sorted(RESULTS.glob("ablation-*.json")):
        data = json.loads(path.read_text())
        key = "epe_mm" if any("epe_mm" in r for r in data.get("default", {}).values()) else "ssim"
        lines += [f"## {path.stem.removeprefix('ablation-')}", "",
                  "| variant | pairs | " + " | ".join(METRICS) + f" | Δ {key} vs default (same pairs) |",
                  "|---|---|" + "---|" * (len(METRICS) + 1)]
        for variant in [v for v in VARIANTS if v in data] + [v for v in data if v not in VARIANTS]:
            rows = list(data[variant].values())
            cells = []
            for metric in METRICS:
                values = [r[metric] for r in rows if metric in r and r[metric] is not None]
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "")
            common = [p for p in data[variant] if p in data.get("default", {})]
            delta = np.mean([data[variant][p][key] - data["default"][p][key] for p in common]) if common else None
            cells.append(f"{delta:+.3f}" if delta is not None and variant != "default" else "")
            lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
        lines.append("")
    conclusion = ROOT / "benchmarks" / "ablation_conclusion.md"
    if conclusion.exists():
        lines += [conclusion.read_text()]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=None, help="variant names (default: all; 3D: those marked)")
    parser.add_argument("--pairs", type=int, default=6, help="pairs per 2D data set")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for dataset in args.datasets:
            path = RESULTS / f"ablation-{dataset}.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            pairs = list(DATASETS[dataset](args.pairs))
            names = args.variants or [v for v, (_, _, in3d) in VARIANTS.items() if in3d or dataset != "oasis3d"]
            for variant in names:
                preset, options, _ = VARIANTS[variant]
                for pair_name, pair in pairs:
                    row = run_pair(preset, options, pair)
                    data.setdefault(variant, {})[pair_name] = row
                    print(f"{dataset:12s} {variant:38s} {pair_name:40s} "
                          + " ".join(f"{k}={row[k]:.3f}" for k in METRICS if k in row), flush=True)
                    path.write_text(json.dumps(data, indent=1))
    write_report()


if __name__ == "__main__":
    main()
