"""Multi-modal and masked registration on the TCGA-LGG slices (``../shared/data/lgg2d``).

1. **Known warp across contrasts.** Each slice has three co-registered channels (0 T1 pre,
   1 FLAIR, 2 T1 post). The T1-pre channel is warped with a known smooth random field
   (``dipreg.synthetic.random_displacement``, largest vector 8 mm, smoothness 16 mm, seed =
   slice number) and registered onto the FLAIR channel of the same slice. Reported: mean
   endpoint error (mm) against the inverse of the field over the FLAIR foreground (Otsu), for
   dipreg with ``--loss lncc`` and ``--loss mi`` (defaults otherwise; MI also in the affine
   stage, ``--affine-loss auto``), and ANTsPy SyN (its defaults) with its MI metric
   (``syn_metric="mattes"``) and with neighbourhood cross-correlation (``syn_metric="CC"``).
2. **Inter-patient FLAIR pairs with tumour masks.** The pairs of ``lgg2d/pairs.csv``
   (channel 1), registered with dipreg's defaults without masks and with the tumours excluded
   from the similarity (``fixed_mask`` = not the fixed tumour, ``moving_mask`` = not the moving
   tumour). Reported: SSIM (mean of scikit-image's SSIM map) and NCC over the fixed image's
   foreground outside both tumours (the fixed tumour and the warped moving tumour).

Writes ``benchmarks/results/multimodal.json`` with every run and the means, and prints tables.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/multimodal.py --threads 1
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/multimodal.py --threads 1 --slices 3 --pairs 3   # a subset
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.metrics import structural_similarity

import dipreg
from dipreg.baselines import ants_registration
from dipreg.images import intensity_range, normalise, read_image, resample_to_reference
from dipreg.synthetic import displacement_endpoint_error, foreground_mask, random_displacement
from dipreg.transforms import displacement_transform, invert_displacement

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg2d"
RESULTS = ROOT / "benchmarks" / "results"

#: Channels of the TCGA-LGG TIFFs.
T1_PRE, FLAIR = 0, 1


def slices() -> list[Path]:
    return sorted(path for path in (DATA / "slices").glob("*.tif") if not path.name.endswith("_mask.tif"))


def known_warp_runs(path: Path, seed: int, threads: int) -> list[dict]:
    """T1 pre warped by a known field, registered onto FLAIR by every method."""
    fixed = read_image(path, FLAIR)
    t1 = read_image(path, T1_PRE)
    forward = random_displacement(fixed, max_displacement=8.0, smoothness=16.0, seed=seed)
    moving = resample_to_reference(t1, fixed, displacement_transform(forward))
    truth, _ = invert_displacement(forward)
    foreground = foreground_mask(fixed)
    identity = float(np.sqrt((sitk.GetArrayFromImage(truth) ** 2).sum(-1))[sitk.GetArrayViewFromImage(foreground) != 0].mean())
    rows = [{"slice": path.stem, "method": "identity", "epe_mm": identity}]
    runs = {"dipreg lncc": lambda: dipreg.register(fixed, moving, loss="lncc", threads=threads),
            "dipreg mi": lambda: dipreg.register(fixed, moving, loss="mi", threads=threads),
            "ants SyN mattes (MI)": lambda: ants_registration(fixed, moving, "mattes"),
            "ants SyN CC": lambda: ants_registration(fixed, moving, "CC")}
    for name, run in runs.items():
        start = time.perf_counter()
        result = run()
        rows.append({"slice": path.stem, "method": name, "seconds": time.perf_counter() - start,
                     "epe_mm": displacement_endpoint_error(result.displacement, truth, foreground),
                     "folding_percent": result.metrics["folding_percent"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def outside_tumour_scores(result: dipreg.RegistrationResult, fixed_tumour: sitk.Image,
                          moving_tumour: sitk.Image) -> dict:
    """SSIM and NCC over the fixed foreground outside the fixed and the warped moving tumour."""
    warped_tumour = sitk.GetArrayFromImage(result.apply(moving_tumour, interpolation="nearest")) != 0
    region = ((sitk.GetArrayViewFromImage(foreground_mask(result.fixed)) != 0)
              & (sitk.GetArrayViewFromImage(fixed_tumour) == 0) & ~warped_tumour)
    fixed01 = normalise(sitk.GetArrayViewFromImage(result.fixed), intensity_range(result.fixed))
    warped01 = normalise(sitk.GetArrayViewFromImage(result.warped), intensity_range(result.moving))
    _, ssim_map = structural_similarity(fixed01, warped01, data_range=1.0, win_size=7, full=True)
    f, w = fixed01[region] - fixed01[region].mean(), warped01[region] - warped01[region].mean()
    return {"ssim_outside": float(ssim_map[region].mean()),
            "ncc_outside": float((f * w).sum() / np.sqrt((f * f).sum() * (w * w).sum())),
            "region_voxels": int(region.sum())}


def masked_pair_runs(fixed_path: Path, moving_path: Path, threads: int) -> list[dict]:
    fixed, moving = read_image(fixed_path, FLAIR), read_image(moving_path, FLAIR)
    tumours = [sitk.Cast(sitk.ReadImage(str(path.with_name(path.stem + "_mask.tif"))), sitk.sitkUInt8)
               for path in (fixed_path, moving_path)]
    for tumour, image in zip(tumours, (fixed, moving)):
        tumour.CopyInformation(image)
    fixed_tumour, moving_tumour = (sitk.Cast(t != 0, sitk.sitkUInt8) for t in tumours)
    rows = []
    for name, masks in (("no masks", {}),
                        ("tumours masked", dict(fixed_mask=fixed_tumour == 0, moving_mask=moving_tumour == 0))):
        start = time.perf_counter()
        result = dipreg.register(fixed, moving, threads=threads, **masks)
        rows.append({"pair": f"{fixed_path.stem}<-{moving_path.stem}", "method": name,
                     "seconds": time.perf_counter() - start,
                     "tumour_voxels": [int(sitk.GetArrayViewFromImage(t).sum()) for t in (fixed_tumour, moving_tumour)],
                     **outside_tumour_scores(result, fixed_tumour, moving_tumour)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def means(rows: list[dict], key: str, metrics: tuple[str, ...]) -> dict:
    table = {}
    for method in dict.fromkeys(row[key] for row in rows):
        chosen = [row for row in rows if row[key] == method]
        table[method] = {metric: statistics.mean(row[metric] for row in chosen) for metric in metrics if metric in chosen[0]}
        table[method]["n"] = len(chosen)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slices", type=int, default=None, help="only the first N slices (default: all 32)")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N FLAIR pairs (default: all 16)")
    parser.add_argument("--output", type=Path, default=RESULTS / "multimodal.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    known = [row for seed, path in enumerate(slices()[: args.slices]) for row in known_warp_runs(path, seed, args.threads)]
    with open(DATA / "pairs.csv", newline="") as handle:
        listed = list(csv.DictReader(handle))[: args.pairs]
    masked = [row for pair in listed for row in masked_pair_runs(DATA / pair["fixed"], DATA / pair["moving"], args.threads)]
    report = {
        "command": "python benchmarks/multimodal.py " + " ".join(os.sys.argv[1:]),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "dipreg_version": dipreg.__version__,
        "known_warp_t1pre_onto_flair": {"means": means(known, "method", ("epe_mm", "folding_percent", "seconds")),
                                        "runs": known},
        "flair_pairs_tumour_masks": {"means": means(masked, "method", ("ssim_outside", "ncc_outside", "seconds")),
                                     "runs": masked},
    }
    args.output.write_text(json.dumps(report, indent=2))
    for part in ("known_warp_t1pre_onto_flair", "flair_pairs_tumour_masks"):
        print(part)
        for method, values in report[part]["means"].items():
            print(f"  {method:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))


if __name__ == "__main__":
    main()
