"""Label interpolation (nearest vs label-linear) and inverse consistency of the written transforms.

Two measurements behind the transform outputs:

* **Label propagation.** On the 3D known warps of ``ablation.py`` (OASIS A/B, vxm3d, MNI152
  with a random 8 mm warp) the moving labels are carried back by the *true* inverse field with
  nearest neighbour and with label-linear interpolation, and scored by Dice against the fixed
  labels: this isolates the interpolation from the registration. On the oasis3d pair (B onto A)
  the moving tissue labels are warped by dipreg's own field both ways.
* **Inverse consistency.** ``|phi^-1(phi(p)) - p|`` over the fixed foreground (mean and 95th
  percentile, mm) of dipreg's default on the bundled demo pair and on oasis3d.

Usage (from the repository root)::

    python benchmarks/transform_outputs.py --threads 2       # writes benchmarks/results/transform-outputs.json
    python benchmarks/transform_outputs.py --skip-oasis       # only the known warps and the demo pair
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import knownwarp3d_pairs, oasis3d_pairs  # noqa: E402

import dipreg  # noqa: E402
from dipreg.images import resample_to_reference  # noqa: E402
from dipreg.metrics import dice  # noqa: E402
from dipreg.transforms import displacement_transform  # noqa: E402

BUNDLED = Path(dipreg.__file__).parent / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def mean_dice(fixed_labels: sitk.Image, warped: sitk.Image) -> float:
    scores = dice(sitk.GetArrayViewFromImage(fixed_labels), sitk.GetArrayViewFromImage(warped))
    return float(np.nanmean(list(scores.values())))


def label_dice_by_interpolation(fixed_labels: sitk.Image, moving_labels: sitk.Image, transform: sitk.Transform) -> dict:
    return {interpolation: mean_dice(fixed_labels, resample_to_reference(moving_labels, fixed_labels, transform,
                                                                         interpolation=interpolation))
            for interpolation in ("nearest", "label")}


def consistency(result: dipreg.RegistrationResult) -> dict:
    keys = ("inverse_consistency_mean_mm", "inverse_consistency_p95_mm", "inverse_residual_p95_mm", "ssim",
            "folding_percent", "sdlogj", "seconds")
    return {key: result.metrics[key] for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the registrations (0 = default)")
    parser.add_argument("--skip-oasis", action="store_true", help="leave out the oasis3d registration (minutes on a CPU)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "transform-outputs.json")
    args = parser.parse_args()
    report: dict = {"known_warps_true_field": {}, "registrations": {}}

    for name, pair in knownwarp3d_pairs(4):
        scores = label_dice_by_interpolation(pair["fixed_labels"], pair["moving_labels"],
                                             displacement_transform(pair["truth"]))
        report["known_warps_true_field"][name] = scores
        print(f"{name:16s} true field   Dice nearest {scores['nearest']:.4f}  label {scores['label']:.4f}", flush=True)

    demo = dipreg.register(str(BUNDLED / "r16slice.jpg"), str(BUNDLED / "r64slice.jpg"), threads=args.threads)
    report["registrations"]["demo (r64 onto r16)"] = consistency(demo)
    print("demo", json.dumps(report["registrations"]["demo (r64 onto r16)"]), flush=True)

    if not args.skip_oasis:
        for name, pair in oasis3d_pairs(1):
            start = time.perf_counter()
            result = dipreg.register(pair["fixed"], pair["moving"], threads=args.threads)
            row = consistency(result)
            row["wall_seconds"] = time.perf_counter() - start
            row["dice"] = label_dice_by_interpolation(pair["fixed_labels"], pair["moving_labels"], result.transform)
            report["registrations"][name] = row
            print(name, json.dumps(row), flush=True)

    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
