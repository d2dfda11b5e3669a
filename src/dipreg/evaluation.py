"""Batch evaluation of one method on the pairs of a PAIRS.csv: ``dipreg evaluate``.

PAIRS.csv columns (paths relative to the CSV file):

* ``fixed``, ``moving`` (required): the images.
* ``fixed_labels``, ``moving_labels``: anatomical label maps; the moving one is warped by the
  same transform (label-linear interpolation unless ``label_interpolation`` says otherwise)
  and scored by Dice per label and mean.
* ``fixed_landmarks``, ``moving_landmarks``: corresponding points (CSV ``x,y[,z]`` in LPS mm,
  or 3D Slicer ``.fcsv``/``.mrk.json``); the target registration error before and after.
* ``fixed_mask``, ``moving_mask``: masks used for scoring only (no method sees them):
  the endpoint error is averaged over ``fixed_mask``, and with both masks the warped
  moving mask's Dice with the fixed mask is reported as ``mask_dice``.
* ``fixed_channel``, ``moving_channel``: channel per image, overriding ``--channel``.
* ``initial_transform``: an ITK transform file (fixed-space points to moving-space points)
  every method starts from, e.g. to bring together images whose headers disagree; the
  written field and the scores include it.
* ``true_displacement``: the known answer of a synthetic pair (see :mod:`dipreg.synthetic`);
  its endpoint error in mm is reported as ``epe_mm``.
* ``id``: name of the pair's output folder (default ``pairNNN`` from the row number).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

from dipreg import __version__
from dipreg.baselines import METHODS, check_method, run_method
from dipreg.errors import DipregError
from dipreg.images import INTERPOLATORS, label_map_on, read_displacement, same_grid
from dipreg.landmarks import read_landmarks
from dipreg.metrics import dice
from dipreg.registration import RegistrationResult, load_pair
from dipreg.synthetic import displacement_endpoint_error

#: Per-pair columns of results.csv before the Dice columns.
METRIC_COLUMNS = ("ssim", "ncc", "mse", "jacobian_mean", "jacobian_std", "jacobian_min", "folding_percent", "sdlogj")

#: Columns of results.csv that describe a pair rather than score it.
TEXT_COLUMNS = ("id", "fixed", "moving", "initial_transform", "method", "error", "notes")

#: How each summarised metric is printed: label and decimals (paper format ``0.913 ± 0.051``).
DISPLAY = {
    "ssim": ("SSIM", 3), "ncc": ("NCC", 3), "mse": ("MSE", 4),
    "jacobian_mean": ("det J mean", 3), "jacobian_std": ("det J std", 3), "jacobian_min": ("det J min", 3),
    "folding_percent": ("folding %", 3), "sdlogj": ("SDlogJ", 3),
    "dice_mean": ("Dice mean", 3), "mask_dice": ("mask Dice", 3), "epe_mm": ("EPE mm", 3),
    "tre_before_mean_mm": ("TRE before mm", 3), "tre_after_mean_mm": ("TRE after mm", 3),
    "peak_memory_mb": ("peak memory MB", 0),
}

#: Subcommands added by :func:`add_evaluation_commands`.
EVALUATION_COMMANDS = ("evaluate", "compare")

SSIM_DEFINITION = ("SSIM: scikit-image structural_similarity on images scaled to [0, 1] "
                   "(0.5-99.5 percentiles), data_range=1, 7-voxel window")
STD_DEFINITION = "sample standard deviation across pairs (ddof=1)"


@dataclass(frozen=True)
class PairSpec:
    """One row of PAIRS.csv with its paths resolved (``row`` counts data rows from 1)."""

    row: int
    id: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    fixed_channel: int | None = None
    moving_channel: int | None = None
    true_displacement: Path | None = None
    initial_transform: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None


PATH_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask", "true_displacement",
                "initial_transform", "fixed_landmarks", "moving_landmarks")
_CHANNEL_COLUMNS = ("fixed_channel", "moving_channel")
COLUMNS = tuple(f.name for f in fields(PairSpec) if f.name != "row")


def read_pairs(pairs_csv: str | os.PathLike) -> list[PairSpec]:
    """Parse and check a PAIRS.csv (see the module documentation for its columns).

    Raises:
        DipregError: naming the row (and line) of the first problem: a missing or unknown
            column, an empty required cell, a missing file, a bad channel, a label or mask
            given for one image only, or a duplicate id.
    """
    pairs_csv = Path(pairs_csv)
    if not pairs_csv.is_file():
        raise DipregError(f"{pairs_csv}: file not found")
    base = pairs_csv.parent
    with open(pairs_csv, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in ("fixed", "moving") if name not in header]
        if missing:
            raise DipregError(f"{pairs_csv}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        unknown = [name for name in header if name not in COLUMNS]
        if unknown:
            raise DipregError(f"{pairs_csv}: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
        reader.fieldnames = header
        specs: list[PairSpec] = []
        for number, record in enumerate(reader, start=1):
            where = f"{pairs_csv}: row {number} (line {reader.line_num})"
            if None in record:
                raise DipregError(f"{where}: more cells than columns")
            values = {name: (value or "").strip() for name, value in record.items()}
            if not any(values.values()):
                continue
            specs.append(_pair_spec(number, values, base, where))
    if not specs:
        raise DipregError(f"{pairs_csv}: no pairs listed")
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.id in seen:
            raise DipregError(f"{pairs_csv}: row {spec.row}: id {spec.id!r} already used by row {seen[spec.id]}")
        seen[spec.id] = spec.row
    return specs


def _pair_spec(number: int, values: dict[str, str], base: Path, where: str) -> PairSpec:
    entries: dict[str, Any] = {}
    for name in ("fixed", "moving"):
        if not values.get(name):
            raise DipregError(f"{where}: column {name} is empty")
    for name in PATH_COLUMNS:
        if values.get(name):
            path = (base / values[name]).resolve()
            if not path.exists():
                raise DipregError(f"{where}: {name} file {values[name]} not found (looked for {path})")
            entries[name] = path
    for name in _CHANNEL_COLUMNS:
        if values.get(name):
            try:
                entries[name] = int(values[name])
            except ValueError:
                raise DipregError(f"{where}: {name} {values[name]!r} is not a whole number") from None
            if entries[name] < 0:
                raise DipregError(f"{where}: {name} {entries[name]} is negative")
    if ("fixed_labels" in entries) != ("moving_labels" in entries):
        raise DipregError(f"{where}: give both fixed_labels and moving_labels, or neither")
    if ("fixed_landmarks" in entries) != ("moving_landmarks" in entries):
        raise DipregError(f"{where}: give both fixed_landmarks and moving_landmarks, or neither")
    if "moving_mask" in entries and "fixed_mask" not in entries:
        raise DipregError(f"{where}: moving_mask needs a fixed_mask")
    pair_id = values.get("id") or f"pair{number:03d}"
    if pair_id in (".", "..") or any(c in pair_id for c in "/\\"):
        raise DipregError(f"{where}: id {pair_id!r} cannot name a folder")
    return PairSpec(row=number, id=pair_id, **entries)


def _label_map_on(path: Path, image: sitk.Image, notes: list[str]) -> sitk.Image:
    labels, note = label_map_on(path, image)
    if note:
        notes.append(note)
    return labels


def score_pair(spec: PairSpec, result: RegistrationResult, notes: list[str],
               label_interpolation: str = "label") -> dict[str, Any]:
    """Dice, mask Dice, TRE and endpoint error of a result, as far as the pair's columns allow.

    The moving labels are warped with ``label_interpolation`` and kept in the result (saved
    as ``warped_labels.nii.gz``); the scores are added to ``result.metrics`` and returned.
    """
    scores: dict[str, Any] = {}
    if spec.fixed_labels and spec.moving_labels:
        result.propagate_labels(_label_map_on(spec.moving_labels, result.moving, notes),
                                _label_map_on(spec.fixed_labels, result.fixed, notes), label_interpolation)
        scores.update({key: value for key, value in result.metrics.items() if key.startswith("dice_")})
    fixed_mask = _label_map_on(spec.fixed_mask, result.fixed, notes) != 0 if spec.fixed_mask else None
    if fixed_mask is not None:
        result.score_uncertainty(fixed_mask, "mask")
    if fixed_mask is not None and spec.moving_mask:
        warped_mask = result.apply(_label_map_on(spec.moving_mask, result.moving, notes) != 0, interpolation="nearest")
        scores["mask_dice"] = dice(sitk.GetArrayViewFromImage(fixed_mask), sitk.GetArrayViewFromImage(warped_mask), [1])[1]
    if spec.fixed_landmarks and spec.moving_landmarks:
        ndim = result.fixed.GetDimension()
        tre = result.score_landmarks(read_landmarks(spec.fixed_landmarks, ndim), read_landmarks(spec.moving_landmarks, ndim))
        scores.update({key: tre[key] for key in ("tre_before_mean_mm", "tre_after_mean_mm")})
    if spec.true_displacement:
        truth = read_displacement(spec.true_displacement)
        if not same_grid(truth, result.fixed):
            raise DipregError(f"{spec.true_displacement}: true displacement is not on the fixed image's grid")
        scores["epe_mm"] = displacement_endpoint_error(result.displacement, truth, fixed_mask)
    result.metrics.update(scores)
    return scores


def evaluate_pair(spec: PairSpec, outdir: Path, method: str, preset: str | None = None,
                  channel: int | None = None, options: dict[str, Any] | None = None,
                  label_interpolation: str = "label") -> dict[str, Any]:
    """Register one pair, score it and write its outputs to ``outdir/pairs/<id>/``.

    Returns:
        The pair's row of results.csv. A pair that fails (unreadable image, diverging
        registration, ...) gives a row whose ``error`` says why, instead of an exception.
    """
    row: dict[str, Any] = {"id": spec.id, "fixed": str(spec.fixed), "moving": str(spec.moving), "method": method}
    if spec.initial_transform:
        row["initial_transform"] = str(spec.initial_transform)
    notes: list[str] = []
    try:
        fixed, moving = load_pair(spec.fixed, spec.moving, channel, spec.fixed_channel, spec.moving_channel)
        result = run_method(method, fixed, moving, preset, initial_transform=spec.initial_transform, **(options or {}))
        scores = score_pair(spec, result, notes, label_interpolation)
        result.save(outdir / "pairs" / spec.id)
    except (DipregError, RuntimeError) as exc:
        row["error"] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return row
    row.update({key: result.metrics[key] for key in METRIC_COLUMNS})
    row.update(scores)
    row.update(seconds=result.metrics["seconds"], peak_memory_mb=result.metrics["peak_memory_mb"])
    if notes:
        row["notes"] = "; ".join(notes)
    return row


def _result_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns of results.csv in a stable order (Dice labels numerically)."""
    present = {key for row in rows for key in row}
    labels = sorted((key for key in present if key.startswith("dice_") and key[5:].lstrip("-").isdigit()),
                    key=lambda key: int(key[5:]))
    order = [*TEXT_COLUMNS[:5], *METRIC_COLUMNS, *labels, "dice_mean", "mask_dice", "tre_before_mean_mm",
             "tre_after_mean_mm", "epe_mm",
             "seconds", "peak_memory_mb", *TEXT_COLUMNS[5:]]
    return [key for key in order if key in present]


def read_results(outdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``outdir/results.csv`` with numbers as floats (empty cells left out)."""
    path = Path(outdir) / "results.csv"
    if not path.is_file():
        raise DipregError(f"{outdir}: no results.csv (is it an output folder of dipreg evaluate?)")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    numeric = set(METRIC_COLUMNS) | set(DISPLAY) | {"seconds"}
    return [{key: (float(value) if key in numeric or key.startswith("dice_") else value)
             for key, value in row.items() if value not in ("", None)} for row in rows]


def _statistics(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"n": 0}
    return {
        "n": len(finite), "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "median": statistics.median(finite), "min": min(finite), "max": max(finite),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, std (ddof=1), median, min, max and count of every numeric column over the pairs."""
    done = [row for row in rows if "error" not in row]
    keys = [key for key in _result_columns(done) if key not in TEXT_COLUMNS]
    return {key: _statistics([float(row[key]) for row in done if key in row]) for key in keys}


def format_table(summary: dict[str, Any]) -> str:
    """The summary as text in the paper's format (``SSIM  0.913 ± 0.051``), seconds as a median."""
    stats = summary["metrics"]
    label_keys = [key for key in stats if key.startswith("dice_") and key not in DISPLAY]
    order: list[str] = []
    for key in DISPLAY:
        order += label_keys if key == "dice_mean" else []
        order.append(key)
    lines = [f"{summary['method']}: {summary['n_pairs'] - summary['n_failed']} of {summary['n_pairs']} pairs "
             f"({SSIM_DEFINITION}; ± is the {STD_DEFINITION})"]
    for key in order:
        if stats.get(key, {}).get("n"):
            label, decimals = DISPLAY.get(key, (f"Dice label {key[5:]}", 3))
            lines.append(f"  {label:<16} {stats[key]['mean']:.{decimals}f} ± {stats[key]['std']:.{decimals}f}")
    if stats.get("seconds", {}).get("n"):
        lines.append(f"  {'seconds (median)':<16} {stats['seconds']['median']:.1f}")
    return "\n".join(lines)


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Thread counts for processes started inside the block (OpenMP/torch, ITK, ANTs)."""
    names = ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _map_pairs(task: Callable[[PairSpec], dict[str, Any]], specs: list[PairSpec], workers: int | None,
               report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Run ``task`` on every pair: one after another, or on a Dask LocalCluster of ``workers`` processes."""
    if not workers or workers <= 1:
        rows = []
        for spec in specs:
            rows.append(task(spec))
            report(rows[-1])
        return rows
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise DipregError("--workers needs Dask: pip install 'dipreg[batch]'") from None
    threads = max(1, (os.cpu_count() or 1) // workers)
    with thread_limit(threads), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                              dashboard_address=None) as cluster, Client(cluster) as client:
        futures = client.map(task, specs, pure=False)
        by_id = {}
        for future in as_completed(futures):
            row = future.result()
            by_id[row["id"]] = row
            report(row)
    return [by_id[spec.id] for spec in specs]


def _pair_metrics(outdir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json of the first pair that succeeded (empty if none did)."""
    for row in rows:
        if "error" not in row:
            return json.loads((outdir / "pairs" / row["id"] / "metrics.json").read_text())
    return {}


def _write_results(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_result_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def evaluate(
    pairs_csv: str | os.PathLike,
    outdir: str | os.PathLike,
    method: str = "dip",
    preset: str | None = None,
    channel: int | None = None,
    workers: int | None = None,
    quiet: bool = False,
    label_interpolation: str = "label",
    **options: Any,
) -> dict[str, Any]:
    """Run one method on every pair of a PAIRS.csv and write per-pair outputs and a summary.

    Writes ``outdir/pairs/<id>/`` (the files of ``dipreg register``, plus
    ``warped_labels.nii.gz`` when labels are given), ``outdir/results.csv`` (one row per
    pair) and ``outdir/summary.json``, and prints the summary table unless ``quiet``.

    Args:
        pairs_csv: the PAIRS.csv (see the module documentation for its columns).
        outdir: output folder (created; existing files are replaced).
        method: one of :data:`dipreg.baselines.METHODS`.
        preset: preset of ``dip`` / ``classic`` (default: their own).
        channel: channel of multi-channel images, unless the CSV gives one per image.
        workers: pairs run in parallel on a Dask LocalCluster (``dipreg[batch]``); one
            at a time when None or 1.
        quiet: print nothing.
        label_interpolation: how moving labels are warped: ``label`` (label-linear),
            ``nearest`` or ``linear``.
        **options: registration options of ``dip`` and ``classic``.

    Returns:
        The summary (as written to summary.json).

    Raises:
        DipregError: for a bad PAIRS.csv, method or option (before anything runs).
    """
    check_method(method, preset, options)
    specs = read_pairs(pairs_csv)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    done = [0]

    def report(row: dict[str, Any]) -> None:
        done[0] += 1
        if quiet:
            return
        if "error" in row:
            print(f"[{done[0]}/{len(specs)}] {row['id']}: FAILED: {row['error']}", flush=True)
        else:
            extra = "".join(f" {key} {row[key]:.3f}" for key in ("dice_mean", "epe_mm") if key in row)
            print(f"[{done[0]}/{len(specs)}] {row['id']}: SSIM {row['ssim']:.3f} folding {row['folding_percent']:.3f} % "
                  f"SDlogJ {row['sdlogj']:.3f}{extra} ({row['seconds']:.1f} s)", flush=True)

    task = functools.partial(evaluate_pair, outdir=outdir, method=method, preset=preset, channel=channel,
                             options=options, label_interpolation=label_interpolation)
    rows = _map_pairs(task, specs, workers, report)
    _write_results(rows, outdir / "results.csv")
    failed = [{"id": row["id"], "error": row["error"]} for row in rows if "error" in row]
    summary = {
        "method": method,
        "preset": preset,
        "options": options,
        "label_interpolation": label_interpolation,
        "pairs_csv": str(Path(pairs_csv).resolve()),
        "channel": channel,
        "n_pairs": len(rows),
        "n_failed": len(failed),
        "failed": failed,
        "metrics": summarise(rows),
        "ssim_definition": SSIM_DEFINITION,
        "std_definition": STD_DEFINITION,
        "seconds_definition": "wall clock of the method on one pair, including warping and metrics",
        "peak_memory_definition": _pair_metrics(outdir, rows).get("peak_memory_definition"),
        "dipreg_version": __version__,
    }
    summary["table"] = format_table(summary)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not quiet:
        print(summary["table"])
        if failed:
            print(f"{len(failed)} pair(s) failed: " + ", ".join(item["id"] for item in failed))
        print(f"wrote {outdir / 'results.csv'} and {outdir / 'summary.json'}")
    return summary


def add_evaluation_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dipreg evaluate`` and ``dipreg compare`` to the ``dipreg`` command's subparsers."""
    from dipreg.cli import add_registration_options  # dipreg.cli imports this module

    evaluate_parser = subparsers.add_parser(
        "evaluate", conflict_handler="resolve",
        help="run one method on every pair of a PAIRS.csv; write per-pair outputs, results.csv, summary.json",
        description="Run METHOD on every pair of PAIRS.csv (columns fixed,moving; optional fixed_labels,moving_labels, "
        "fixed_mask,moving_mask, fixed_channel,moving_channel, true_displacement, initial_transform, "
        "fixed_landmarks,moving_landmarks, id; paths "
        "relative to the CSV). "
        "Writes OUTPUT/pairs/<id>/ (the files of dipreg register), OUTPUT/results.csv and OUTPUT/summary.json, "
        "and prints mean ± std per metric. --preset defaults to the method's own (default for dip, classic "
        "for classic); registration options apply to dip and classic only.")
    evaluate_parser.add_argument("pairs", type=Path, help="PAIRS.csv")
    evaluate_parser.add_argument("-o", "--output", required=True, type=Path,
                                 help="output folder (created; files in it are replaced)")
    add_registration_options(evaluate_parser)
    evaluate_parser.set_defaults(preset=None)
    evaluate_parser.add_argument("--method", choices=METHODS, default="dip",
                                 help="dip (dipreg), classic (free field, Eq. 1), itk (SimpleITK affine + displacement "
                                 "field), ants (ANTsPy SyN, needs dipreg[ants]), identity (no registration) "
                                 "(default: %(default)s)")
    evaluate_parser.add_argument("--channel", type=int, default=None,
                                 help="channel of multi-channel images unless the CSV gives fixed_channel/moving_channel "
                                 "(e.g. 1 = FLAIR in the TCGA-LGG TIFFs) (default: none)")
    evaluate_parser.add_argument("--workers", type=int, default=None,
                                 help="run this many pairs at once on a Dask LocalCluster (needs dipreg[batch]) "
                                 "(default: one pair at a time)")
    evaluate_parser.add_argument("--label-interpolation", choices=list(INTERPOLATORS), default="label",
                                 help="how moving labels are warped for Dice: label (label-linear, ANTs' genericLabel), "
                                 "nearest or linear (default: %(default)s)")
    evaluate_parser.add_argument("--quiet", action="store_true", help="print nothing (default: off)")

    compare_parser = subparsers.add_parser(
        "compare", help="compare evaluate outputs: box plots, paired table, index.html",
        description="Compare the outputs of dipreg evaluate for several methods on the same pairs: box plots per "
        "metric, a paired table (per-pair differences, wins/losses against the first folder) and REPORT/index.html "
        "with the QC figures of the best, median and worst pairs.")
    compare_parser.add_argument("outdirs", nargs="+", type=Path, help="output folders of dipreg evaluate; the first is the reference")
    compare_parser.add_argument("-o", "--output", required=True, type=Path, help="report folder (created)")


def run_evaluation_command(args: argparse.Namespace) -> int:
    """Run ``dipreg evaluate`` or ``dipreg compare`` from parsed arguments; returns the exit status."""
    if args.command == "evaluate":
        from dipreg.cli import registration_options  # dipreg.cli imports this module

        options = registration_options(args)
        options.pop("method", None)
        summary = evaluate(args.pairs, args.output, args.method, args.preset, args.channel, args.workers,
                           args.quiet, args.label_interpolation, **options)
        return 1 if summary["n_failed"] else 0
    from dipreg.comparison import compare

    index = compare(args.outdirs, args.output)
    print(f"wrote {index}")
    return 0
