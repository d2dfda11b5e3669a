"""Ablation of the deep-image-prior configuration: every variant on every development set.

Writes one JSON per data set to ``benchmarks/results/ablation-<dataset>.json`` (rows per
variant and pair; re-running merges into it) and regenerates ``docs/ablation.md``.

    python benchmarks/ablation.py                          # everything (slow: ~1 h on 2 cores)
    python benchmarks/ablation.py --datasets knownwarp2d --variants default "z fixed"
    python benchmarks/ablation.py --report-only            # rebuild docs/ablation.md from the JSON
    python benchmarks/ablation.py --datasets oasis3d --tag H100 --deadline 1700000000 ...

``--tag T`` stores the rows as "<variant> (T)" (e.g. the machine they ran on), so that rows from
another device do not mix with the untagged (CPU) rows; their Δ column is against "default (T)".
Several processes may write the same JSON at once (each row is merged in under a file lock), and
``--deadline`` (Unix time) stops a process from starting a registration that would not finish by
then (estimated from the slowest one it has run on that data set).

Data sets (from ../shared/data):
  knownwarp2d  MNI152 axial slices warped by a known smooth random field (max 8 mm):
               EPE (mm) against the numerically inverted field, GM/WM Dice.
  lgg2d        TCGA-LGG FLAIR inter-patient pairs from lgg2d/pairs.csv (SSIM, regularity).
  oasis3d      OASIS B onto A, 3D, tissue Dice (only the variants marked 3D).
  knownwarp3d  four whole volumes each warped by a known smooth random field (max 8 mm): EPE (mm)
               and Dice of each volume's own labels (only the variants marked 3D; slow on a CPU).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
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
    "seed 1": ("default", {"seed": 1}, True),
    "seed 2": ("default", {"seed": 2}, True),
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
    "lambda 2": ("default", {"regularization": 2.0}, True),
    "lambda 3": ("default", {"regularization": 3.0}, True),
    "lambda 4": ("default", {"regularization": 4.0}, True),
    "lambda 5": ("default", {"regularization": 5.0}, True),
    "lambda 3, seed 1": ("default", {"regularization": 3.0, "seed": 1}, True),
    "lambda 3 + levels 3": ("default", {"regularization": 3.0, "levels": 3}, True),
    "lncc window 5": ("default", {"lncc_window": 5}, True),
    "lncc window 15": ("default", {"lncc_window": 15}, True),
    "full-res loss": ("default", {"max_loss_voxels": 0}, True),
    "loss mae": ("default", {"loss": "mae"}, False),
    "loss ncc (global)": ("default", {"loss": "ncc"}, False),
    "no pyramid": ("default", {"pyramid_levels": 1}, False),
    "pyramid 3": ("default", {"pyramid_levels": 3}, True),
    "no affine": ("default", {"affine": False}, False),
    "no batchnorm": ("default", {"batchnorm": False}, False),
    "64 channels": ("default", {"channels": 64}, False),
    "16 channels": ("default", {"channels": 16}, True),
    "input channels 8": ("default", {"input_channels": 8}, True),
    "levels 3": ("default", {"levels": 3}, True),
    "field 1/8 res": ("default", {"field_resolution": 0.125}, True),
    "iterations 200": ("default", {"iterations": 200}, True),
    "fast preset": ("fast", {}, True),
    "classic (free field, same loss/svf)": ("classic", {}, True),
    "classic, lambda 3": ("classic", {"regularization": 3.0}, True),
    "classic, lambda 5": ("classic", {"regularization": 5.0}, True),
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


def knownwarp3d_pairs(limit: int):
    """Whole 3D volumes (OASIS A and B, the vxm3d subject, the MNI152 template), each with a known
    random warp (max 8 mm, smoothness 16 mm), with their own labels for Dice (OASIS tissue
    classes, vxm3d FreeSurfer aseg, MNI GM/WM at 0.5)."""
    mni = DATA / "mni152"
    mni_t1 = sitk.ReadImage(str(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    mni_labels = (sitk.Cast(sitk.ReadImage(str(mni / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")) > 0.5, sitk.sitkUInt8)
                  + 2 * sitk.Cast(sitk.ReadImage(str(mni / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")) > 0.5, sitk.sitkUInt8))
    volumes = [
        ("oasis-A", DATA / "oasis3d" / "image_A_160x192x144.nii.gz", DATA / "oasis3d" / "image_A_160x192x144_seg.nii.gz"),
        ("oasis-B", DATA / "oasis3d" / "image_B_160x192x144.nii.gz", DATA / "oasis3d" / "image_B_160x192x144_seg.nii.gz"),
        ("vxm3d", DATA / "vxm3d" / "test_scan_vol.nii.gz", DATA / "vxm3d" / "test_scan_seg.nii.gz"),
        ("mni152", None, None),
    ]
    for k, (name, image_path, labels_path) in enumerate(volumes[:limit]):
        if image_path is None:
            fixed, fixed_labels = mni_t1, sitk.Cast(mni_labels, sitk.sitkUInt8)
        else:
            fixed = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
            fixed_labels = resample_to_reference(sitk.ReadImage(str(labels_path), sitk.sitkUInt8), fixed, labels=True)
        pair = known_warp_pair(fixed, max_displacement=8.0, smoothness=16.0, seed=k)
        moving_labels = sitk.Resample(fixed_labels, fixed_labels, displacement_transform(pair.forward),
                                      sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        yield f"{name}-warped", dict(fixed=pair.fixed, moving=pair.moving, truth=pair.truth, mask=pair.mask,
                                     fixed_labels=fixed_labels, moving_labels=moving_labels)


DATASETS = {"knownwarp2d": knownwarp2d_pairs, "lgg2d": lgg2d_pairs, "oasis3d": oasis3d_pairs,
            "knownwarp3d": knownwarp3d_pairs}
THREE_D = ("oasis3d", "knownwarp3d")


def run_pair(preset: str, options: dict, pair: dict) -> dict:
    """Register one pair with one variant and score it."""
    start = time.perf_counter()
    result = dipreg.register(pair["fixed"], pair["moving"], preset, channel=pair.get("channel"), **options)
    row = {k: result.metrics[k] for k in ("ssim", "ncc", "folding_percent", "sdlogj", "jacobian_std")}
    row["seconds"] = time.perf_counter() - start
    row.update({k: result.metrics[k] for k in ("device", "iterations", "stop_reason") if k in result.metrics})
    if "truth" in pair:
        row["epe_mm"] = displacement_endpoint_error(result.displacement, pair["truth"], pair["mask"])
    if "fixed_labels" in pair:
        warped = result.apply(pair["moving_labels"], labels=True)
        scores = dice(sitk.GetArrayFromImage(pair["fixed_labels"]), sitk.GetArrayFromImage(warped))
        row["dice"] = scores
        row["dice_mean"] = float(np.nanmean(list(scores.values())))
    return row


def split_tag(name: str) -> tuple[str, str]:
    """``"lambda 2 (H100)"`` -> ``("lambda 2", " (H100)")``; untagged names get ``""``."""
    base, sep, tag = name.rpartition(" (")
    if sep and tag.endswith(")") and base in VARIANTS:
        return base, " (" + tag
    return name, ""


def merge_row(path: Path, variant: str, pair_name: str, row: dict) -> None:
    """Merge one row into the JSON under an exclusive lock (several writers may share the file)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(variant, {})[pair_name] = row
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


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
        "Rows whose variant ends in **(H100)** ran on one NVIDIA H100 GPU (16 CPU cores), with several",
        "registrations sharing the GPU at once: their accuracy columns compare with the CPU rows, their",
        "seconds compare with nothing (neither with the CPU rows nor as a GPU speed measurement). Their",
        "Δ column is against `default (H100)` on the same pairs; untagged rows ran on the 2-core CPU.",
        "Rows tagged **(CPU s3)** ran on the 2-core CPU with the code of a later session (batched Adam,",
        "box sums from views: the same arithmetic up to rounding); their Δ is against `default (CPU s3)`.",
        "",
    ]
    for path in sorted(RESULTS.glob("ablation-*.json")):
        data = json.loads(path.read_text())
        first = [r for rows in data.values() for r in rows.values()]
        key = next((k for k in ("epe_mm", "dice_mean") if any(k in r for r in first)), "ssim")
        lines += [f"## {path.stem.removeprefix('ablation-')}", "",
                  "| variant | pairs | " + " | ".join(METRICS) + f" | Δ {key} vs default (same pairs) |",
                  "|---|---|" + "---|" * (len(METRICS) + 1)]
        tags = sorted({split_tag(v)[1] for v in data})
        ordered = [v + t for t in tags for v in VARIANTS if v + t in data]
        for variant in ordered + [v for v in data if v not in ordered]:
            rows = list(data[variant].values())
            baseline = data.get("default" + split_tag(variant)[1], {})
            cells = []
            for metric in METRICS:
                values = [r[metric] for r in rows if metric in r and r[metric] is not None]
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "")
            common = [p for p in data[variant] if p in baseline and key in baseline[p] and key in data[variant][p]]
            delta = np.mean([data[variant][p][key] - baseline[p][key] for p in common]) if common else None
            cells.append(f"{delta:+.3f}" if delta is not None and split_tag(variant)[0] != "default" else "")
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
    parser.add_argument("--tag", default="", help='store rows as "<variant> (TAG)", e.g. the device they ran on')
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time: start no registration estimated to end after it")
    args = parser.parse_args()
    if not args.report_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for dataset in args.datasets:
            path = RESULTS / f"ablation-{dataset}.json"
            pairs = list(DATASETS[dataset](args.pairs))
            names = args.variants or [v for v, (_, _, in3d) in VARIANTS.items() if in3d or dataset not in THREE_D]
            slowest = 0.0
            for variant in names:
                preset, options, _ = VARIANTS[variant]
                stored = variant + (f" ({args.tag})" if args.tag else "")
                for pair_name, pair in pairs:
                    if args.deadline is not None and time.time() + 1.1 * slowest > args.deadline:
                        print(f"{dataset:12s} {stored:38s} {pair_name:40s} skipped: would end after the deadline", flush=True)
                        continue
                    row = run_pair(preset, options, pair)
                    slowest = max(slowest, row["seconds"])
                    merge_row(path, stored, pair_name, row)
                    print(f"{dataset:12s} {stored:38s} {pair_name:40s} "
                          + " ".join(f"{k}={row[k]:.3f}" for k in METRICS if k in row), flush=True)
    write_report()


if __name__ == "__main__":
    main()
