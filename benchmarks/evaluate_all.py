"""Evaluate identity, ITK, ANTs, classic and dip on the development sets, and tabulate.

Runs ``dipreg evaluate`` (in this process, with exactly the printed command lines) for
every method on every data set, then ``dipreg compare`` per data set, and writes
``benchmarks/results/evaluate-<dataset>-<method>.json`` (summary, per-pair rows, command)
and the generated table ``benchmarks/results/README.md``. Run from anywhere:

    python benchmarks/evaluate_all.py                       # everything (hours on 2 CPU cores)
    python benchmarks/evaluate_all.py --datasets lgg2d --methods identity itk
    python benchmarks/evaluate_all.py --limit 2 --results /tmp/check   # quick check, not for the record
    python benchmarks/evaluate_all.py --report-only          # rebuild README.md from the JSON files

Data sets (read from ../shared/data):
  lgg2d        16 inter-patient TCGA-LGG FLAIR pairs (lgg2d/pairs.csv, channel 1): SSIM, regularity.
  lgg2d-intra  T1 post-contrast (channel 2) onto T1 pre-contrast (channel 0) of the same slice,
               32 patients (benchmarks/lgg2d_intra_pairs.csv, generated).
  oasis3d      OASIS image B onto image A, 3D, 2 tissue classes: Dice
               (benchmarks/oasis3d_pairs.csv, generated).
  knownwarp2d  the six ANTs slices each warped by a known smooth random field (max 8 mm,
               smoothness 16 mm): EPE in mm over the brain against the numerically inverted field.
               The pairs are generated under the work folder.
  knownwarp3d  the same for three whole volumes (OASIS A and B, vxm3d; max 8 mm, smoothness
               16 mm): EPE in mm. Slow on a CPU (minutes per pair and method).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

import SimpleITK as sitk

from dipreg import __version__
from dipreg.cli import main as dipreg_main
from dipreg.pairs import PATH_COLUMNS
from dipreg.summary import DISPLAY, SSIM_DEFINITION, STD_DEFINITION, read_results
from dipreg.images import read_image
from dipreg.synthetic import known_warp_pair

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DATA = ROOT.parent / "shared" / "data"
DATASETS = ("lgg2d", "lgg2d-intra", "oasis3d", "knownwarp2d", "knownwarp3d")
#: Fast methods first; ``dipreg compare`` uses the order of METHODS (dip is the reference).
METHODS = ("dip", "classic", "itk", "ants", "identity")
RUN_ORDER = ("identity", "itk", "ants", "classic", "dip")
TABLE_COLUMNS = ("ssim", "ncc", "folding_percent", "sdlogj", "jacobian_mean", "jacobian_min", "dice_mean", "epe_mm")
KNOWN_WARP = {"max_displacement": 8.0, "smoothness": 16.0}


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def lgg2d_intra_csv() -> Path:
    """benchmarks/lgg2d_intra_pairs.csv: channel 2 (T1 post) onto channel 0 (T1 pre) of each slice."""
    slices = sorted(p for p in (DATA / "lgg2d" / "slices").glob("*.tif") if not p.stem.endswith("_mask"))
    rows = [[p.stem, _relative(p, BENCHMARKS), _relative(p, BENCHMARKS), "0", "2"] for p in slices]
    return _write_csv(BENCHMARKS / "lgg2d_intra_pairs.csv", ["id", "fixed", "moving", "fixed_channel", "moving_channel"], rows)


def oasis3d_csv() -> Path:
    """benchmarks/oasis3d_pairs.csv: image B onto image A with their tissue labels."""
    folder = DATA / "oasis3d"
    names = [f"image_{side}_160x192x144{suffix}.nii.gz" for side in "AB" for suffix in ("", "_seg")]
    a, a_seg, b, b_seg = (_relative(folder / name, BENCHMARKS) for name in names)
    return _write_csv(BENCHMARKS / "oasis3d_pairs.csv", ["id", "fixed", "moving", "fixed_labels", "moving_labels"],
                      [["oasis_B_to_A", a, b, a_seg, b_seg]])


def knownwarp2d_csv(workdir: Path) -> Path:
    """Known-warp pairs from the ANTs slices, written under ``workdir/knownwarp2d/data``."""
    folder = workdir / "knownwarp2d" / "data"
    rows = []
    for seed, source in enumerate(sorted((DATA / "ants2d").glob("r*slice.jpg"))):
        pair = known_warp_pair(read_image(source), seed=seed, **KNOWN_WARP)
        paths = pair.save(folder / source.stem)
        rows.append([source.stem] + [_relative(paths[name], folder) for name in ("fixed", "moving", "mask", "true_displacement")])
    return _write_csv(folder / "pairs.csv", ["id", "fixed", "moving", "fixed_mask", "true_displacement"], rows)


def knownwarp3d_csv(workdir: Path) -> Path:
    """Known-warp pairs from whole volumes (OASIS A and B, vxm3d), under ``workdir/knownwarp3d/data``."""
    folder = workdir / "knownwarp3d" / "data"
    volumes = [DATA / "oasis3d" / "image_A_160x192x144.nii.gz", DATA / "oasis3d" / "image_B_160x192x144.nii.gz",
               DATA / "vxm3d" / "test_scan_vol.nii.gz"]
    rows = []
    for seed, source in enumerate(volumes):
        name = f"{source.parent.name}-{source.name.split('.')[0]}"
        pair = known_warp_pair(read_image(source), seed=seed, **KNOWN_WARP)
        paths = pair.save(folder / name)
        rows.append([name] + [_relative(paths[key], folder) for key in ("fixed", "moving", "mask", "true_displacement")])
    return _write_csv(folder / "pairs.csv", ["id", "fixed", "moving", "fixed_mask", "true_displacement"], rows)


def dataset_csv(name: str, workdir: Path) -> tuple[Path, list[str]]:
    """The PAIRS.csv of a data set and the extra evaluate arguments it needs."""
    if name == "lgg2d":
        return DATA / "lgg2d" / "pairs.csv", ["--channel", "1"]
    if name == "lgg2d-intra":
        return lgg2d_intra_csv(), []
    if name == "oasis3d":
        return oasis3d_csv(), []
    if name == "knownwarp3d":
        return knownwarp3d_csv(workdir), []
    return knownwarp2d_csv(workdir), []


def first_pairs(pairs_csv: Path, limit: int, target: Path) -> Path:
    """A copy of the first ``limit`` rows of a PAIRS.csv, with absolute paths."""
    with open(pairs_csv, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = [row for _, row in zip(range(limit), reader)]
    for row in rows:
        for column in PATH_COLUMNS:
            if row.get(column):
                row[column] = str((pairs_csv.parent / row[column]).resolve())
    return _write_csv(target, header, [[row[c] for c in header] for row in rows])


def run(argv: list[str]) -> int:
    """Run one dipreg command line in this process, after printing it."""
    print("$ dipreg " + shlex.join(argv), flush=True)
    return dipreg_main(argv)


def _cell(stats: dict, key: str) -> str:
    entry = stats.get(key, {})
    if not entry.get("n"):
        return ""
    decimals = DISPLAY[key][1]
    return f"{entry['mean']:.{decimals}f} ± {entry['std']:.{decimals}f}"


def write_report(results: Path) -> Path:
    """Regenerate results/README.md from every evaluate-*.json in ``results``."""
    records = [json.loads(p.read_text()) for p in sorted(results.glob("evaluate-*.json"))]
    lines = [
        "# Evaluation against baselines",
        "",
        "Generated by `benchmarks/evaluate_all.py` from the `evaluate-*.json` files beside this one; "
        "do not edit by hand. Each cell is mean ± std over the pairs that succeeded "
        f"({STD_DEFINITION}); seconds are the median wall clock per pair, peak memory the largest "
        "peak RSS of a pair.",
        "",
        f"{SSIM_DEFINITION}. Read SSIM next to % folding (det J ≤ 0) and SDlogJ: SSIM alone rewards folding.",
        "",
        "ants is not reproducible run to run (ANTsPy seeds its sampling from the clock; expect SSIM to "
        "vary by about 0.005); itk, classic and dip are seeded.",
    ]
    if not records:
        lines += ["", "No results yet: run `python benchmarks/evaluate_all.py` from the repository root."]
    for dataset in DATASETS:
        chosen = sorted((r for r in records if r["dataset"] == dataset),
                        key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS))
        if not chosen:
            continue
        shown = [key for key in TABLE_COLUMNS if any(r["summary"]["metrics"].get(key, {}).get("n") for r in chosen)]
        lines += ["", f"## {dataset}", ""]
        lines.append("| method | pairs | " + " | ".join(DISPLAY[k][0] for k in shown) + " | seconds (median) | peak MB |")
        lines.append("|---" * (len(shown) + 4) + "|")
        for record in chosen:
            summary = record["summary"]
            stats = summary["metrics"]
            done = summary["n_pairs"] - summary["n_failed"]
            pairs = f"{done}/{summary['n_pairs']}" + (f" (first {record['limit']} only)" if record.get("limit") else "")
            seconds = f"{stats['seconds']['median']:.1f}" if stats.get("seconds", {}).get("n") else ""
            memory = f"{stats['peak_memory_mb']['max']:.0f}" if stats.get("peak_memory_mb", {}).get("n") else ""
            lines.append(f"| {record['method']} | {pairs} | " + " | ".join(_cell(stats, k) for k in shown)
                         + f" | {seconds} | {memory} |")
        lines += ["", "Commands (from the repository root):", "", "```"]
        lines += [f"dipreg {record['command']}" for record in chosen]
        lines += ["```"]
        versions = sorted({record["summary"]["dipreg_version"] for record in chosen})
        lines += ["", f"dipreg version {', '.join(versions)}."]
    path = results / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs of each data set (a check)")
    parser.add_argument("--workers", type=int, default=None, help="pairs in parallel (Dask), passed to evaluate")
    parser.add_argument("--workdir", type=Path, default=BENCHMARKS / "runs",
                        help="per-pair outputs, compare reports and generated pairs (default: %(default)s, git-ignored)")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results",
                        help="where the JSON files and README.md go (default: %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild README.md from the JSON files")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # commands are printed and recorded relative to the repository root
    results, workdir = args.results.resolve(), args.workdir.resolve()
    results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        print(f"wrote {write_report(results)}")
        return 0
    methods = [m for m in RUN_ORDER if m in args.methods]
    if "ants" in methods and importlib.util.find_spec("ants") is None:
        print("antspyx is not installed (pip install 'dipreg[ants]'): skipping method ants", file=sys.stderr)
        methods.remove("ants")
    status = 0
    for dataset in args.datasets:
        pairs_csv, extra = dataset_csv(dataset, workdir)
        if args.limit:
            pairs_csv = first_pairs(pairs_csv, args.limit, workdir / dataset / f"first{args.limit}.csv")
        outdirs = {}
        for method in methods:
            outdir = workdir / dataset / method
            command = ["evaluate", _relative(pairs_csv, ROOT), "-o", _relative(outdir, ROOT), "--method", method, *extra]
            command += ["--workers", str(args.workers)] if args.workers else []
            code = run(command)
            if not (outdir / "summary.json").is_file():
                status = 1
                continue
            status = max(status, code)
            outdirs[method] = outdir
            record = {"dataset": dataset, "method": method, "command": shlex.join(command), "limit": args.limit,
                      "summary": json.loads((outdir / "summary.json").read_text()), "pairs": read_results(outdir)}
            (results / f"evaluate-{dataset}-{method}.json").write_text(json.dumps(record, indent=2) + "\n")
        if outdirs:
            # Compare every method with results in the work folder, including earlier runs.
            for method in METHODS:
                if method not in outdirs and (workdir / dataset / method / "summary.json").is_file():
                    outdirs[method] = workdir / dataset / method
            ordered = [_relative(outdirs[m], ROOT) for m in METHODS if m in outdirs]
            run(["compare", *ordered, "-o", _relative(workdir / dataset / "report", ROOT)])
    print(f"wrote {write_report(results)} (dipreg {__version__}, SimpleITK {sitk.Version_VersionString()})")
    return status


if __name__ == "__main__":
    sys.exit(main())
