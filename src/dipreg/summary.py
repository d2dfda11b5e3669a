"""The tables of a batch: results.csv, failures.csv and summary.json, and their text form.

The columns and the way each metric is printed come from :mod:`dipreg.metric_catalogue`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from dipreg.errors import DipregError
from dipreg.ledger import write_text_atomic
from dipreg.metric_catalogue import METRICS


#: Per-pair columns of results.csv before the Dice columns.
METRIC_COLUMNS = ("ssim", "ncc", "mse", "jacobian_mean", "jacobian_std", "jacobian_min", "folding_percent", "sdlogj")


#: Columns of results.csv that describe a pair rather than score it.
TEXT_COLUMNS = ("id", "fixed", "moving", "initial_transform", "method", "error", "notes")


#: How each summarised metric is printed: heading and decimals from the metric catalogue
#: (paper format ``0.913 ± 0.051``).
DISPLAY = {key: (METRICS[key].heading, METRICS[key].decimals) for key in (
    *METRIC_COLUMNS, "dice_mean", "mask_dice", "epe_mm", "tre_before_mean_mm", "tre_after_mean_mm", "peak_memory_mb")}


SSIM_DEFINITION = f"SSIM: {METRICS['ssim'].definition}"


STD_DEFINITION = "sample standard deviation across pairs (ddof=1)"


def result_columns(rows: list[dict[str, Any]]) -> list[str]:
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
    keys = [key for key in result_columns(done) if key not in TEXT_COLUMNS]
    return {key: _statistics([float(row[key]) for row in done if key in row]) for key in keys}


def format_table(summary: dict[str, Any]) -> str:
    """The summary as text in the paper's format (``SSIM  0.913 ± 0.051``), seconds as a median."""
    stats = summary["metrics"]
    label_keys = [key for key in stats if key.startswith("dice_") and key not in DISPLAY]
    order: list[str] = []
    for key in DISPLAY:
        order += label_keys if key == "dice_mean" else []
        order.append(key)
    lines = [f"{summary['method']}: {summary['n_done']} of {summary['n_pairs']} pairs "
             f"({SSIM_DEFINITION}; ± is the {STD_DEFINITION})"]
    for key in order:
        if stats.get(key, {}).get("n"):
            label, decimals = DISPLAY.get(key, (f"Dice label {key[5:]}", 3))
            lines.append(f"  {label:<16} {stats[key]['mean']:.{decimals}f} ± {stats[key]['std']:.{decimals}f}")
    if stats.get("seconds", {}).get("n"):
        lines.append(f"  {'seconds (median)':<16} {stats['seconds']['median']:.1f}")
    return "\n".join(lines)


def _pair_metrics(outdir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json of the first pair that succeeded (empty if none did)."""
    for row in rows:
        if "error" not in row:
            return json.loads((outdir / "pairs" / row["id"] / "metrics.json").read_text())
    return {}


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_tables(outdir: Path, rows: list[dict[str, Any]], n_pairs: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Write results.csv, failures.csv and summary.json (each atomically) from the finished rows."""
    write_text_atomic(outdir / "results.csv", _csv_text(rows, result_columns(rows)))
    failed = [row for row in rows if "error" in row]
    write_text_atomic(outdir / "failures.csv", _csv_text(failed, ["id", "fixed", "moving", "error"]))
    summary = {
        **settings,
        "n_pairs": n_pairs,
        "n_done": len(rows) - len(failed),
        "n_failed": len(failed),
        "n_remaining": n_pairs - len(rows),
        "failed": [{"id": row["id"], "error": row["error"]} for row in failed],
        "metrics": summarise(rows),
        "ssim_definition": SSIM_DEFINITION,
        "std_definition": STD_DEFINITION,
        "seconds_definition": "wall clock of the method on one pair, including warping and metrics",
        "peak_memory_definition": _pair_metrics(outdir, rows).get("peak_memory_definition"),
    }
    summary["table"] = format_table(summary)
    write_text_atomic(outdir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary
