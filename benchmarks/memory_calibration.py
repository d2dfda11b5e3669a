"""Measured peak RSS of ``dipreg.register`` against :func:`dipreg.memory.estimate_peak_memory`.

Every case runs in a fresh process (``ru_maxrss`` of that process: register plus save, as
``dipreg register`` does) with one thread and a few iterations: the peak is reached in the
first iteration of the finest level and in the output phase, so the iteration count does
not change it. Writes ``benchmarks/results/memory-<host>.json`` and prints a table.

    OMP_NUM_THREADS=1 python benchmarks/memory_calibration.py
    python benchmarks/memory_calibration.py --cases "ants2d 256 default" "oasis3d full default"
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

_ANTS = (DATA / "ants2d" / "r16slice.jpg", DATA / "ants2d" / "r64slice.jpg")
_OASIS = (DATA / "oasis3d" / "image_A_160x192x144.nii.gz", DATA / "oasis3d" / "image_B_160x192x144.nii.gz")

#: name -> (fixed, moving, resampling factor (<1 shrinks, >1 expands), preset, options)
CASES: dict[str, tuple[Path, Path, float, str, dict]] = {
    "ants2d 128 paper": (*_ANTS, 0.5, "paper", {}),
    "ants2d 256 default": (*_ANTS, 1, "default", {}),
    "ants2d 256 paper": (*_ANTS, 1, "paper", {}),
    "ants2d 1024 default": (*_ANTS, 4, "default", {}),
    "oasis3d 53x64x48 default": (*_OASIS, 1 / 3, "default", {}),
    "oasis3d 80x96x72 default": (*_OASIS, 0.5, "default", {}),
    "oasis3d full default": (*_OASIS, 1, "default", {}),
    "oasis3d full field 0.5": (*_OASIS, 1, "default", {"field_resolution": 0.5}),
}

#: Few iterations: enough to reach the peak of every phase.
SHORT_RUN = {"iterations": 4, "affine_iterations": 10}


def resized(image: sitk.Image, factor: float) -> sitk.Image:
    """The image shrunk (factor < 1) or expanded (factor > 1) by an integer factor per axis."""
    if factor == 1:
        return image
    if factor < 1:
        return sitk.Shrink(image, [round(1 / factor)] * image.GetDimension())
    return sitk.Expand(image, [round(factor)] * image.GetDimension())


def child(name: str) -> None:
    """Register one case in this process and print its shape, peak RSS and seconds as JSON."""
    import torch

    import dipreg
    from dipreg.registration import load_pair

    torch.set_num_threads(1)
    fixed_path, moving_path, factor, preset, options = CASES[name]
    fixed, moving = (resized(image, factor) for image in load_pair(fixed_path, moving_path))
    start = time.perf_counter()
    result = dipreg.register(fixed, moving, preset, **{**SHORT_RUN, **options})
    with tempfile.TemporaryDirectory() as outdir:
        result.save(outdir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"shape": list(reversed(fixed.GetSize())), "peak_rss_bytes": peak,
                      "seconds": time.perf_counter() - start}))


def measure(name: str) -> dict:
    """Run one case in a fresh process; its measured peak next to the estimate."""
    from dipreg.engine import make_config
    from dipreg.memory import estimate_peak_memory

    output = subprocess.run([sys.executable, __file__, "--child", name], check=True,
                            capture_output=True, text=True).stdout
    row = json.loads(output.strip().splitlines()[-1])
    _, _, _, preset, options = CASES[name]
    row["estimate_bytes"] = estimate_peak_memory(tuple(row["shape"]), make_config(preset, **options))
    row["estimate_over_measured"] = row["estimate_bytes"] / row["peak_rss_bytes"]
    return {"case": name, "preset": preset, "options": options, **row}


def main() -> None:
    """Measure the chosen cases, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run (default: all)")
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    print(f"{'case':<28} {'shape':<16} {'measured MB':>12} {'estimate MB':>12} {'est/meas':>9}")
    for name in args.cases:
        row = measure(name)
        rows.append(row)
        print(f"{name:<28} {'x'.join(map(str, row['shape'])):<16} {row['peak_rss_bytes'] / 2**20:>12.0f} "
              f"{row['estimate_bytes'] / 2**20:>12.0f} {row['estimate_over_measured']:>9.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory-{platform.node()}.json"
    path.write_text(json.dumps({"host": platform.node(), "threads": 1, "short_run": SHORT_RUN,
                                "peak_definition": "ru_maxrss of a fresh process running register() and save()",
                                "cases": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
