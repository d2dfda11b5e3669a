"""Is the ensemble's uncertainty meaningful? And what does an ensemble cost?

    python benchmarks/uncertainty.py --knownwarp 3 --lgg 3 --cost --ensemble 4 --threads 1

Sections (each merged into ``benchmarks/results/uncertainty.json``, printed as it runs):

* ``knownwarp2d``: MNI152 axial slices warped by a known smooth random field (the data set of
  ``benchmarks/ablation.py``). Per pair, over the fixed foreground: the Spearman correlation
  between the per-voxel uncertainty (``uncertainty.nii.gz``) and the per-voxel endpoint error
  of the combined field; calibration (the fraction of voxels whose error ``|truth - u|`` is
  within 1 and 2 uncertainties; a calibrated isotropic 2D Gaussian gives 0.632 and 0.982);
  the combined field's EPE and GM/WM Dice against each member's.
* ``lgg2d``: inter-patient TCGA-LGG FLAIR pairs of ``lgg2d/pairs.csv`` in which both slices have
  a tumour: mean uncertainty inside the union of the fixed tumour and the moving tumour
  warped onto the fixed grid, against the rest of the brain (the fixed foreground).
* ``cost``: wall time of one ``register(..., ensemble=K)`` against K single runs (seeds 0..K-1)
  on one 256x256 lgg2d pair, alternating, with the load (``os.getloadavg``) around each.

``--figure`` also writes ``docs/uncertainty-lgg2d.png`` (fixed, warped, uncertainty with the
tumour outlines) for the first lgg2d pair.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

import dipreg
from dipreg.images import as_image, resample_to_reference
from dipreg.metrics import dice
from dipreg.synthetic import foreground_mask

from ablation import DATA, ROOT, knownwarp2d_pairs

RESULTS = ROOT / "benchmarks" / "results" / "uncertainty.json"
FIGURE = ROOT / "docs" / "uncertainty-lgg2d.png"
#: P(|e| <= k sigma) for an isotropic 2D Gaussian error with sigma^2 = trace of its covariance.
GAUSSIAN_2D = {1: 1 - np.exp(-1.0), 2: 1 - np.exp(-4.0)}


def merge(section: str, key: str, row: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault(section, {})[key] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def label_dice(fixed_labels: sitk.Image, moving_labels: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> float:
    warped = resample_to_reference(moving_labels, fixed, transform, interpolation="label")
    return float(np.nanmean(list(dice(array(fixed_labels), array(warped)).values())))


def knownwarp(count: int, options: dict) -> None:
    for name, pair in knownwarp2d_pairs(count):
        start = time.perf_counter()
        result = dipreg.register(pair["fixed"], pair["moving"], **options)
        seconds = time.perf_counter() - start
        mask = array(pair["mask"]) != 0
        truth = array(pair["truth"])
        error = np.sqrt(((array(result.displacement) - truth) ** 2).sum(axis=-1))[mask]
        sigma = array(result.uncertainty)[mask]
        member_epe = [float(np.sqrt(((array(m.displacement_image()) - truth) ** 2).sum(axis=-1))[mask].mean())
                      for m in result.members]
        member_dice = [label_dice(pair["fixed_labels"], pair["moving_labels"], pair["fixed"], m.to_sitk())
                       for m in result.members]
        row = {
            "seconds": seconds,
            "epe_mm": float(error.mean()),
            "member_epe_mm": member_epe,
            "dice_mean": label_dice(pair["fixed_labels"], pair["moving_labels"], pair["fixed"], result.transform),
            "member_dice_mean": member_dice,
            "uncertainty_mean_mm": float(sigma.mean()),
            "spearman_uncertainty_epe": float(spearmanr(sigma, error).statistic),
            "within_1sd": float((error <= sigma).mean()),
            "within_2sd": float((error <= 2 * sigma).mean()),
            "gaussian_within_1sd_2sd": [GAUSSIAN_2D[1], GAUSSIAN_2D[2]],
            "options": options,
        }
        merge("knownwarp2d", f"{name} K={options['ensemble']}" + tag(options), row)
        print(f"knownwarp2d {name}: EPE {row['epe_mm']:.3f} mm (members {np.mean(member_epe):.3f}, best "
              f"{min(member_epe):.3f}), Dice {row['dice_mean']:.4f} (members {np.mean(member_dice):.4f}), "
              f"uncertainty {row['uncertainty_mean_mm']:.3f} mm, Spearman {row['spearman_uncertainty_epe']:.3f}, "
              f"within 1/2 sd {row['within_1sd']:.3f}/{row['within_2sd']:.3f} ({seconds:.0f} s)", flush=True)


def lgg_pairs(count: int) -> list[dict]:
    """Rows of lgg2d/pairs.csv whose fixed and moving slices both show a tumour."""
    rows = []
    for row in csv.DictReader(open(DATA / "lgg2d" / "pairs.csv")):
        masks = {side: DATA / "lgg2d" / row[side].replace(".tif", "_mask.tif") for side in ("fixed", "moving")}
        if all(array(sitk.ReadImage(str(path))).any() for path in masks.values()):
            rows.append({side: DATA / "lgg2d" / row[side] for side in ("fixed", "moving")}
                        | {f"{side}_mask": path for side, path in masks.items()})
    return rows[:count]


def tumour_mask(path: Path, reference: sitk.Image) -> sitk.Image:
    mask = sitk.Cast(sitk.ReadImage(str(path)) > 0, sitk.sitkUInt8)
    mask.CopyInformation(reference)
    return mask


def lgg(count: int, options: dict, figure: bool) -> None:
    for index, pair in enumerate(lgg_pairs(count)):
        name = f"{pair['moving'].stem}->{pair['fixed'].stem}"
        start = time.perf_counter()
        result = dipreg.register(str(pair["fixed"]), str(pair["moving"]), channel=1, **options)
        seconds = time.perf_counter() - start
        fixed_tumour = array(tumour_mask(pair["fixed_mask"], result.fixed)) != 0
        moving_tumour = array(result.apply(tumour_mask(pair["moving_mask"], result.moving), interpolation="nearest")) != 0
        union = fixed_tumour | moving_tumour
        brain = (array(foreground_mask(result.fixed)) != 0) & ~union
        sigma = array(result.uncertainty)
        row = {
            "seconds": seconds,
            "tumour_voxels": int(union.sum()),
            "uncertainty_tumour_mm": float(sigma[union].mean()),
            "uncertainty_fixed_tumour_mm": float(sigma[fixed_tumour].mean()),
            "uncertainty_moving_tumour_mm": float(sigma[moving_tumour].mean()) if moving_tumour.any() else None,
            "uncertainty_brain_mm": float(sigma[brain].mean()),
            "ssim": result.metrics["ssim"],
            "options": options,
        }
        row["ratio_tumour_brain"] = row["uncertainty_tumour_mm"] / row["uncertainty_brain_mm"]
        merge("lgg2d", f"{name} K={options['ensemble']}" + tag(options), row)
        print(f"lgg2d {name}: uncertainty in the tumours {row['uncertainty_tumour_mm']:.3f} mm "
              f"(fixed {row['uncertainty_fixed_tumour_mm']:.3f}, moving {row['uncertainty_moving_tumour_mm']}), "
              f"rest of the brain {row['uncertainty_brain_mm']:.3f} mm, ratio {row['ratio_tumour_brain']:.2f} "
              f"({seconds:.0f} s)", flush=True)
        if figure and index == 0:
            save_figure(result, fixed_tumour, moving_tumour)


def save_figure(result, fixed_tumour: np.ndarray, moving_tumour: np.ndarray) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    panels = [(array(result.fixed), "fixed (FLAIR)"), (array(result.warped), "moving warped onto fixed")]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image, cmap="gray")
        ax.set_title(title)
    shown = axes[2].imshow(array(result.uncertainty), cmap="magma")
    axes[2].set_title(f"uncertainty (K={len(result.members)}), mm")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.contour(fixed_tumour, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.contour(moving_tumour, levels=[0.5], colors="lime", linewidths=0.8)
        ax.axis("off")
    fig.suptitle("tumour outlines: fixed (cyan), moving warped (green)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=80)
    plt.close(fig)
    print(f"wrote {FIGURE}")


def cost(options: dict, repeats: int) -> None:
    pair = lgg_pairs(1)[0]
    fixed, moving = (as_image(str(pair[side]), side, None, 1) for side in ("fixed", "moving"))
    members = options["ensemble"]
    single_options = {**options, "ensemble": 1}
    ensemble_times, single_times, loads = [], [], []
    for _ in range(repeats):
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        dipreg.register(fixed, moving, **options)
        ensemble_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for seed in range(members):
            dipreg.register(fixed, moving, **{**single_options, "seed": options.get("seed", 0) + seed})
        single_times.append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    row = {"pair": f"{pair['moving'].stem}->{pair['fixed'].stem}", "ensemble_seconds": ensemble_times,
           "separate_runs_seconds": single_times, "ratio": float(np.sum(ensemble_times) / np.sum(single_times)),
           "load_1min_around_runs": loads, "cpus": os.cpu_count(), "host": platform.node(), "options": options}
    merge("cost", f"K={members} threads={options.get('threads')}" + tag(options) + time.strftime(" %Y-%m-%d %H:%M"), row)
    print(f"cost: one ensemble of {members}: {np.mean(ensemble_times):.1f} s, {members} separate runs: "
          f"{np.mean(single_times):.1f} s, ratio {row['ratio']:.2f} (1-min load {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} CPUs)", flush=True)


def tag(options: dict) -> str:
    extra = {k: v for k, v in options.items() if k not in ("ensemble", "threads", "device")}
    return "".join(f" {k}={v}" for k, v in sorted(extra.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knownwarp", type=int, default=3, help="knownwarp2d pairs (0 = skip)")
    parser.add_argument("--lgg", type=int, default=3, help="lgg2d pairs with two tumours (0 = skip)")
    parser.add_argument("--cost", action="store_true", help="time one ensemble against separate runs")
    parser.add_argument("--cost-repeats", type=int, default=1)
    parser.add_argument("--figure", action="store_true", help=f"write {FIGURE.relative_to(ROOT)}")
    parser.add_argument("--ensemble", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--option", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a further registration option (value parsed as JSON, else a string)")
    args = parser.parse_args()
    options = {"ensemble": args.ensemble, "threads": args.threads, "device": args.device}
    for name, value in args.option:
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    print(f"load {os.getloadavg()} on {os.cpu_count()} CPUs, options {options}", flush=True)
    if args.knownwarp:
        knownwarp(args.knownwarp, options)
    if args.lgg:
        lgg(args.lgg, options, args.figure)
    if args.cost:
        cost(options, args.cost_repeats)


if __name__ == "__main__":
    main()
