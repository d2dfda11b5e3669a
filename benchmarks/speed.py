"""Speed benchmark: ``dipreg register`` (default, fast, paper presets) against ANTsPy SyN and Greedy.

All tools register the SAME pairs in ONE invocation, alternating (the method order rotates
with each repetition), each run a whole process started from scratch:

* ``python -m dipreg register FIXED MOVING -o OUT --quiet --preset P --device D`` (the same
  command line as the ``dipreg`` console script)
* ``python benchmarks/ants_syn.py FIXED MOVING OUT`` (``ants.registration(type_of_transform="SyN")``
  with its defaults, writing the warped image and the composed displacement field)
* ``python benchmarks/greedy_register.py FIXED MOVING OUT`` (picsl-greedy as its documentation
  shows for brain MRI: affine, then deformable NCC 2 with Greedy's default smoothing and
  iterations, the same commands as ``benchmarks/front.py``'s default Greedy point; writing the
  warped image and the displacement field composed by Greedy's ``-rc``)

Per run: whole-process wall time, registration-only seconds (dipreg's ``metrics.json``
``seconds``; ANTs: the ``ants.registration`` call; Greedy: its affine and deformable stages),
and the child's own peak RSS (``wait4`` resource usage of that process). Accuracy is computed
afterwards, outside the timing, from each method's displacement field by the same code
(``result_from_displacement``: SSIM, folding %, SDlogJ; Dice where the pair has labels). The
inputs are first written once as NIfTI by ``dipreg.registration.load_pair`` (channel selection
included), so every tool reads identical files. All get the same thread limit (``OMP_NUM_THREADS``
and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; Greedy ``-threads`` from the former), within which
dipreg makes its own automatic choice (one thread for images under 2^20 voxels,
``dipreg.engine.ONE_THREAD_BELOW_VOXELS``); on a machine shared with other jobs use
``--threads 1``.

Writes ``benchmarks/results/speed-<host>.json`` and prints medians and the ratios of every
method's times to each reference's (dipreg/ANTs, dipreg/Greedy; the references to each other).

    python benchmarks/speed.py                               # all pairs, 3 repeats: hours (paper preset)
    python benchmarks/speed.py --pairs ants2d --repeats 1    # a quick check
    python benchmarks/speed.py --skip-paper --threads 2
    python benchmarks/speed.py --device cuda                 # dipreg on the GPU (ANTs, Greedy stay on the CPU)
    python benchmarks/speed.py --device cuda --skip-ants --skip-greedy   # a GPU machine without antspyx, picsl-greedy
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

import dipreg
from dipreg.images import read_displacement
from dipreg.engine import make_config
from dipreg.evaluation import score_pair
from dipreg.execution import thread_limit
from dipreg.pairs import PairSpec, read_pairs
from dipreg.images import write_image
from dipreg.memory import estimate_peak_memory
from dipreg.registration import load_pair, result_from_displacement

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
#: The references of the ratios: each one's whole-process script and its column label in the table.
REFERENCES = {
    "ants SyN": (ROOT / "benchmarks" / "ants_syn.py", "ANTs"),
    "greedy": (ROOT / "benchmarks" / "greedy_register.py", "Greedy"),
}
#: Methods in their base order; the order rotates with each repetition.
METHODS = ("dipreg default", "dipreg fast", "dipreg paper", *REFERENCES)
ACCURACY = ("ssim", "folding_percent", "sdlogj", "jacobian_min", "dice_mean")


def benchmark_pairs() -> dict[str, PairSpec]:
    """The pairs: 2D LGG (first row of lgg2d/pairs.csv, FLAIR), 2D ANTs r64 onto r16, 3D OASIS B onto A."""
    lgg = read_pairs(DATA / "lgg2d" / "pairs.csv")[0]
    oasis = DATA / "oasis3d"
    return {
        "lgg2d": PairSpec(row=1, id="lgg2d", fixed=lgg.fixed, moving=lgg.moving, fixed_channel=1, moving_channel=1),
        "ants2d": PairSpec(row=2, id="ants2d", fixed=DATA / "ants2d" / "r16slice.jpg",
                           moving=DATA / "ants2d" / "r64slice.jpg"),
        "oasis3d": PairSpec(row=3, id="oasis3d", fixed=oasis / "image_A_160x192x144.nii.gz",
                            moving=oasis / "image_B_160x192x144.nii.gz",
                            fixed_labels=oasis / "image_A_160x192x144_seg.nii.gz",
                            moving_labels=oasis / "image_B_160x192x144_seg.nii.gz"),
    }


def command(method: str, fixed: Path, moving: Path, outdir: Path, device: str) -> list[str]:
    """The command line of one whole-process run."""
    if method in REFERENCES:
        return [sys.executable, str(REFERENCES[method][0]), str(fixed), str(moving), str(outdir)]
    preset = method.split()[-1]
    return [sys.executable, "-m", "dipreg", "register", str(fixed), str(moving), "-o", str(outdir), "--quiet",
            "--preset", preset, "--device", device]


#: Runs a command and writes its wall seconds, exit status and peak RSS as JSON to argv[1].
#: Linux keeps a process's peak RSS across exec and a forked child starts from its parent's
#: resident size, so a child forked straight from this benchmark (torch loaded: ~380 MB)
#: could never report less than that; forked from this small launcher it reports its own.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as handle:
    json.dump({"wall_s": time.perf_counter() - start, "maxrss": usage.ru_maxrss,
               "returncode": os.waitstatus_to_exitcode(status)}, handle)
"""


def run_process(argv: list[str], logdir: Path) -> dict[str, Any]:
    """Run a command to completion: wall seconds, its own peak RSS (MB) and exit code,
    measured by :data:`LAUNCHER` (``wait4`` on the command's process alone)."""
    logdir.mkdir(parents=True, exist_ok=True)
    report = logdir / "process.json"
    with open(logdir / "stdout.txt", "w") as out, open(logdir / "stderr.txt", "w") as err:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *argv], stdout=out, stderr=err, check=True)
    measured = json.loads(report.read_text())
    peak = measured["maxrss"] / 2**20 if sys.platform == "darwin" else measured["maxrss"] / 1024
    row: dict[str, Any] = {"wall_s": measured["wall_s"], "peak_rss_mb": peak, "returncode": measured["returncode"]}
    if measured["returncode"]:
        lines = (logdir / "stderr.txt").read_text().strip().splitlines()
        row["error"] = lines[-1] if lines else f"exit code {measured['returncode']}"
    return row


def score(spec: PairSpec, fixed: sitk.Image, moving: sitk.Image, outdir: Path) -> dict[str, Any]:
    """Accuracy of a run's displacement field, by the metric code every method shares."""
    field = sitk.Cast(read_displacement(outdir / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)  # NIfTI round trips perturb the header in the last digits
    result = result_from_displacement(fixed, moving, field, {})
    labels = score_pair(spec, result, notes=[])
    metrics = {**result.metrics, **labels}
    return {key: metrics[key] for key in ACCURACY if key in metrics}


def registration_seconds(method: str, outdir: Path) -> dict[str, Any]:
    """Registration-only seconds (and dipreg's iteration count) from a run's own report."""
    if method in REFERENCES:  # the references' scripts write timing.json
        return {"registration_s": json.loads((outdir / "timing.json").read_text())["seconds"]}
    metrics = json.loads((outdir / "metrics.json").read_text())
    return {"registration_s": metrics["seconds"], "iterations": metrics["iterations"],
            "stop_reason": metrics["stop_reason"], "device": metrics["device"]}


def median(values: list[float]) -> float | None:
    """Median, or None for no values."""
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the successful runs of one method on one pair."""
    done = [run for run in runs if not run["returncode"]]
    summary: dict[str, Any] = {"runs": len(runs), "failed": len(runs) - len(done)}
    for key in ("wall_s", "registration_s", "peak_rss_mb", *ACCURACY):
        summary[key] = median([run[key] for run in done if run.get(key) is not None])
    summary["peak_rss_mb_max"] = max((run["peak_rss_mb"] for run in done), default=None)
    return summary


def ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per reference that ran, the median wall and registration time of every other method over its own."""
    result = {}
    for reference in REFERENCES:
        base = summaries.get(reference)
        if base is None:
            continue
        result[reference] = {
            method: {key: summary[key] / base[key] if summary[key] and base[key] else None
                     for key in ("wall_s", "registration_s")}
            for method, summary in summaries.items() if method != reference}
    return result


def benchmark_pair(name: str, spec: PairSpec, methods: list[str], repeats: int, device: str,
                   workdir: Path) -> dict[str, Any]:
    """Prepare one pair, run every method ``repeats`` times alternating, score every run."""
    fixed, moving = load_pair(spec.fixed, spec.moving, None, spec.fixed_channel, spec.moving_channel)
    shape = tuple(reversed(fixed.GetSize()))
    inputs = workdir / name
    inputs.mkdir(parents=True)
    fixed_path, moving_path = inputs / "fixed.nii.gz", inputs / "moving.nii.gz"
    write_image(fixed, fixed_path)
    write_image(moving, moving_path)
    skipped = {}
    if fixed.GetDimension() == 3 and "dipreg paper" in methods:
        methods = [m for m in methods if m != "dipreg paper"]
        estimate = estimate_peak_memory(shape, make_config("paper"))
        skipped["dipreg paper"] = (f"the paper preset is the 2D method: its 128-channel network on the full "
                                   f"{'x'.join(map(str, shape))} grid needs about {estimate / 1e9:.0f} GB")
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for repeat in range(repeats):
        order = methods[repeat % len(methods):] + methods[:repeat % len(methods)]
        for method in order:
            outdir = workdir / name / f"{method.replace(' ', '-')}-{repeat}"
            row = {"repeat": repeat, **run_process(command(method, fixed_path, moving_path, outdir, device), outdir)}
            if not row["returncode"]:
                row.update(registration_seconds(method, outdir))
                row.update(score(spec, fixed, moving, outdir))
            runs[method].append(row)
            print(f"  {name} {method} #{repeat}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "repeat"),
                flush=True)
            shutil.rmtree(outdir)
    summaries = {method: summarise(method_runs) for method, method_runs in runs.items()}
    return {
        "fixed": str(spec.fixed), "moving": str(spec.moving), "channel": spec.fixed_channel,
        "shape": list(shape), "skipped": skipped, "runs": runs, "summary": summaries, "ratios": ratios(summaries),
    }


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cell(value: Any, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def format_table(pairs: dict[str, dict[str, Any]]) -> str:
    """Medians per pair and method, with the ratios to each reference (``xANTs``, ``xGreedy``)."""
    over = " ".join(f"{'x' + label:>7}" for _, label in REFERENCES.values())
    header = (f"{'pair':<8} {'method':<15} {'wall s':>7} {over} {'reg s':>7} {over} {'peak MB':>8} "
              f"{'SSIM':>6} {'fold %':>7} {'SDlogJ':>7} {'Dice':>6}")
    lines = [header, "-" * len(header)]
    for name, pair in pairs.items():
        for method, s in pair["summary"].items():
            ratio = {key: " ".join(f"{_cell(pair['ratios'].get(ref, {}).get(method, {}).get(key), 2):>7}"
                                   for ref in REFERENCES) for key in ("wall_s", "registration_s")}
            lines.append(
                f"{name:<8} {method:<15} {_cell(s['wall_s'], 1):>7} {ratio['wall_s']} "
                f"{_cell(s['registration_s'], 1):>7} {ratio['registration_s']} "
                f"{_cell(s['peak_rss_mb'], 0):>8} {_cell(s['ssim'], 3):>6} {_cell(s['folding_percent'], 3):>7} "
                f"{_cell(s['sdlogj'], 3):>7} {_cell(s['dice_mean'], 3):>6}"
                + (f"  ({s['failed']} of {s['runs']} runs failed)" if s["failed"] else ""))
        for method, reason in pair["skipped"].items():
            lines.append(f"{name:<8} {method:<15} not run: {reason}")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run the benchmark, print the table and write the JSON."""
    pairs = benchmark_pairs()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=list(pairs), default=list(pairs), help="pairs to run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method per pair (default: %(default)s)")
    parser.add_argument("--skip-paper", action="store_true", help="leave out the (slow) paper preset")
    parser.add_argument("--skip-fast", action="store_true", help="leave out the fast preset")
    parser.add_argument("--skip-ants", action="store_true",
                        help="leave out ANTs SyN (where antspyx is not installed, e.g. a GPU machine): no ratios to it")
    parser.add_argument("--skip-greedy", action="store_true",
                        help="leave out Greedy (where picsl-greedy is not installed): no ratios to it")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="dipreg's --device (default: %(default)s); ANTs and Greedy run on the CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of every run, all tools (default: all cores, %(default)s)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / f"speed-{platform.node()}.json",
                        help="JSON file to write (default: %(default)s)")
    args = parser.parse_args()
    methods = [m for m in METHODS
               if not (args.skip_paper and m == "dipreg paper") and not (args.skip_fast and m == "dipreg fast")
               and not (args.skip_ants and m == "ants SyN") and not (args.skip_greedy and m == "greedy")]
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dipreg-speed-") as workdir, thread_limit(args.threads):
        for name in args.pairs:
            print(f"{name}:", flush=True)
            results[name] = benchmark_pair(name, pairs[name], methods, args.repeats, args.device, Path(workdir))
    report = {
        "host": platform.node(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "threads": args.threads, "device": args.device, "repeats": args.repeats, "started": started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "versions": {"dipreg": dipreg.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "antspyx": None if args.skip_ants else importlib.metadata.version("antspyx"),
                     "picsl_greedy": None if args.skip_greedy else importlib.metadata.version("picsl-greedy"),
                     "python": platform.python_version()},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None,
        "wall_definition": "whole process, start to exit (imports, reading, registration, metrics/outputs)",
        "peak_rss_definition": "ru_maxrss of the child process (wait4)",
        "pairs": results,
    }
    print(format_table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
