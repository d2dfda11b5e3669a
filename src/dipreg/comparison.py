"""``dipreg compare``: box plots, a paired table and an HTML report over several evaluations."""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import statistics
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dipreg.errors import DipregError  # noqa: E402
from dipreg.summary import DISPLAY, SSIM_DEFINITION, STD_DEFINITION, read_results  # noqa: E402
from dipreg.html_report import html_table  # noqa: E402
from dipreg.metric_catalogue import METRICS  # noqa: E402

#: Metrics compared, and whether higher is better (None: no better direction, no wins counted).
COMPARED: dict[str, bool | None] = {key: METRICS[key].higher_is_better for key in (
    "ssim", "ncc", "mse", "jacobian_mean", "jacobian_min", "folding_percent", "sdlogj", "dice_mean", "mask_dice",
    "epe_mm", "seconds", "peak_memory_mb")}
#: Metrics drawn as box plots (the paper's Figure 2 is the first two).
PLOTTED = ("ssim", "jacobian_mean", "folding_percent", "sdlogj", "dice_mean", "mask_dice", "epe_mm")
#: Metric that ranks pairs for the best / median / worst QC figures, first present wins.
RANKING = (("dice_mean", True), ("epe_mm", False), ("ssim", True))


@dataclass
class Evaluation:
    """One ``dipreg evaluate`` output folder: its label and its successful rows by pair id."""

    label: str
    outdir: Path
    rows: dict[str, dict[str, Any]]


def _label(key: str) -> str:
    return DISPLAY[key][0] if key in DISPLAY else key


def load_evaluations(outdirs: list[str | os.PathLike]) -> list[Evaluation]:
    """Read the results of several evaluate folders, labelled by method (by folder if methods repeat).

    Raises:
        DipregError: if a folder has no results, or one pair id names different images in two folders.
    """
    loaded = []
    for outdir in map(Path, outdirs):
        summary_path = outdir / "summary.json"
        method = json.loads(summary_path.read_text())["method"] if summary_path.is_file() else outdir.name
        loaded.append((method, outdir, read_results(outdir)))
    methods = [method for method, _, _ in loaded]
    unique = len(set(methods)) == len(methods)
    evaluations = [Evaluation(method if unique else outdir.name, outdir,
                              {row["id"]: row for row in rows if "error" not in row})
                   for method, outdir, rows in loaded]
    reference = evaluations[0]
    for other in evaluations[1:]:
        for pair_id in reference.rows.keys() & other.rows.keys():
            a, b = reference.rows[pair_id], other.rows[pair_id]
            if (a["fixed"], a["moving"]) != (b["fixed"], b["moving"]):
                raise DipregError(f"pair {pair_id} has different images in {reference.outdir} and {other.outdir}")
    return evaluations


def _metrics_present(evaluations: list[Evaluation], candidates: tuple[str, ...] | list[str]) -> list[str]:
    return [key for key in candidates if any(key in row for e in evaluations for row in e.rows.values())]


def paired_differences(evaluations: list[Evaluation]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-pair differences against the first evaluation, and wins/losses per method and metric.

    Returns:
        ``(per_pair, tally)``: rows ``{id, method, <metric>: other - reference}`` over the
        pairs both succeeded on, and rows ``{method, metric, pairs, mean_difference, wins,
        losses, ties}`` where a win means better than the reference.
    """
    reference = evaluations[0]
    metrics = _metrics_present(evaluations, list(COMPARED))
    per_pair: list[dict[str, Any]] = []
    tally: list[dict[str, Any]] = []
    for other in evaluations[1:]:
        common = [pair_id for pair_id in reference.rows if pair_id in other.rows]
        differences: dict[str, list[float]] = {key: [] for key in metrics}
        for pair_id in common:
            entry: dict[str, Any] = {"id": pair_id, "method": other.label}
            for key in metrics:
                if key in other.rows[pair_id] and key in reference.rows[pair_id]:
                    entry[key] = other.rows[pair_id][key] - reference.rows[pair_id][key]
                    differences[key].append(entry[key])
            per_pair.append(entry)
        for key, values in differences.items():
            if not values:
                continue
            better = COMPARED[key]
            wins = sum((v > 0) if better else (v < 0) for v in values) if better is not None else None
            losses = sum((v < 0) if better else (v > 0) for v in values) if better is not None else None
            tally.append({
                "method": other.label, "metric": key, "pairs": len(values),
                "mean_difference": statistics.fmean(values),
                "wins": wins, "losses": losses, "ties": None if wins is None else len(values) - wins - losses,
            })
    return per_pair, tally


def plot_boxes(evaluations: list[Evaluation], metrics: list[str], path: Path) -> None:
    """Box plots of each metric (one panel each, four panels a row), methods side by side."""
    columns = min(4, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(0.9 * len(evaluations) * columns + 1.5, 3.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    for ax, key in zip(axes.ravel(), metrics):
        data = [[row[key] for row in e.rows.values() if key in row] for e in evaluations]
        shown = [(e.label, values) for e, values in zip(evaluations, data) if values]
        ax.boxplot([values for _, values in shown], showmeans=True)
        ax.set_xticks(range(1, len(shown) + 1), [label for label, _ in shown], rotation=30)
        ax.set_title(_label(key))
        if key == "jacobian_mean":
            ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ranked_pairs(evaluations: list[Evaluation]) -> tuple[str, list[tuple[str, str]]]:
    """The ranking metric and the (role, pair id) of the best, median and worst pairs.

    Pairs are ranked by the reference (first) evaluation, among those every evaluation
    succeeded on (all of the reference's if there are none).
    """
    reference = evaluations[0]
    common = [pair_id for pair_id in reference.rows if all(pair_id in e.rows for e in evaluations)]
    for key, higher in RANKING:
        scored = [(reference.rows[pair_id][key], pair_id) for pair_id in common or reference.rows
                  if key in reference.rows[pair_id]]
        if scored:
            scored.sort(reverse=higher)
            picks = [("best", scored[0][1]), ("median", scored[len(scored) // 2][1]), ("worst", scored[-1][1])]
            chosen: list[tuple[str, str]] = []
            for role, pair_id in picks:  # with few pairs one pair may fill several roles
                if pair_id not in [chosen_id for _, chosen_id in chosen]:
                    chosen.append((role, pair_id))
            return key, chosen
    return "", []


def _number(value: Any, decimals: int = 3) -> str:
    return "" if value is None else f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def _report_href(evaluation: Evaluation, pair_id: str, report: Path) -> str | None:
    """URL of a pair's report.html relative to the compare folder (None when the pair has none)."""
    target = evaluation.outdir / "pairs" / pair_id / "report.html"
    if pair_id not in evaluation.rows or not target.is_file():
        return None
    return urllib.parse.quote(Path(os.path.relpath(target.resolve(), report.resolve())).as_posix())


def _report_links(evaluations: list[Evaluation], report: Path) -> str:
    """A table of pairs by methods, each cell linking that pair's report.html."""
    pair_ids = list(dict.fromkeys(pair_id for e in evaluations for pair_id in e.rows))
    rows = []
    for pair_id in pair_ids:
        cells = "".join(f"<td><a href='{html.escape(href)}'>report</a></td>" if href else "<td></td>"
                        for href in (_report_href(e, pair_id, report) for e in evaluations))
        rows.append(f"<tr><td>{html.escape(pair_id)}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(e.label)}</th>" for e in evaluations)
    return f"<table><thead><tr><th>pair</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def compare(outdirs: list[str | os.PathLike], report_dir: str | os.PathLike) -> Path:
    """Compare ``dipreg evaluate`` outputs; the first folder is the reference of the paired table.

    Writes to ``report_dir``: ``boxplots.png`` (every metric present), ``figure2.png``
    (SSIM and mean det J, the paper's Figure 2), ``paired.csv`` (per-pair differences),
    ``wins.csv`` (wins/losses against the reference), the QC figures of the best, median
    and worst pairs under ``qc/``, and ``index.html`` showing all of it and linking each
    pair's ``report.html`` (relative links into the evaluate folders).

    Returns:
        The path of ``index.html``.

    Raises:
        DipregError: for a folder without results, or folders that disagree on a pair's images.
    """
    if not outdirs:
        raise DipregError("compare needs at least one evaluate output folder")
    evaluations = load_evaluations(list(outdirs))
    report = Path(report_dir)
    (report / "qc").mkdir(parents=True, exist_ok=True)
    plotted = _metrics_present(evaluations, PLOTTED)
    if plotted:
        plot_boxes(evaluations, plotted, report / "boxplots.png")
        plot_boxes(evaluations, [key for key in ("ssim", "jacobian_mean") if key in plotted], report / "figure2.png")
    per_pair, tally = paired_differences(evaluations)
    _write_csv(per_pair, report / "paired.csv")
    _write_csv(tally, report / "wins.csv")

    metrics = _metrics_present(evaluations, list(COMPARED))
    summary_rows = []
    for e in evaluations:
        cells = [e.label, str(len(e.rows))]
        for key in metrics:
            values = [row[key] for row in e.rows.values() if key in row]
            decimals = DISPLAY.get(key, ("", 1))[1]
            if key == "seconds":
                cells.append(f"{statistics.median(values):.1f} (median)" if values else "")
            elif values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.{decimals}f} ± {std:.{decimals}f}")
            else:
                cells.append("")
        summary_rows.append(cells)
    ranking, ranked = _ranked_pairs(evaluations)
    qc_sections = []
    for role, pair_id in ranked:
        figures = []
        for e in evaluations:
            source = e.outdir / "pairs" / pair_id / "qc.png"
            if pair_id in e.rows and source.is_file():
                target = Path("qc") / f"{pair_id}-{e.label}.png"
                shutil.copyfile(source, report / target)
                row = e.rows[pair_id]
                caption = ", ".join(f"{_label(k)} {_number(row[k])}" for k in plotted if k in row)
                href = _report_href(e, pair_id, report)
                link = f" (<a href='{html.escape(href)}'>report</a>)" if href else ""
                figures.append(f"<figure><img src='{html.escape(target.as_posix())}' alt='QC {html.escape(e.label)}'>"
                               f"<figcaption><b>{html.escape(e.label)}</b>: {html.escape(caption)}{link}</figcaption></figure>")
        reference_row = evaluations[0].rows[pair_id]
        qc_sections.append(f"<h3>{role} pair by {html.escape(evaluations[0].label)} {html.escape(_label(ranking))}: "
                           f"{html.escape(pair_id)}</h3><p>fixed {html.escape(reference_row['fixed'])}<br>"
                           f"moving {html.escape(reference_row['moving'])}</p>" + "".join(figures))
    wins_rows = [[t["method"], _label(t["metric"]), str(t["pairs"]), _number(t["mean_difference"], 4),
                  _number(t["wins"]), _number(t["losses"]), _number(t["ties"])] for t in tally]
    pair_metrics = _metrics_present(evaluations, [k for k in COMPARED if k != "seconds"])
    pair_rows = [[p["id"], p["method"], *[_number(p.get(k), 4) for k in pair_metrics]] for p in per_pair]
    images = "".join(f"<img src='{name}' alt='{name}'>" for name in ("figure2.png", "boxplots.png") if (report / name).is_file())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dipreg comparison</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #bbb;padding:2px 6px;text-align:right}} img{{max-width:100%}}
figure{{margin:0.5em 0}}</style></head><body>
<h1>dipreg comparison</h1>
<p>Folders: {html.escape(", ".join(f"{e.label} = {e.outdir}" for e in evaluations))}. Reference for the paired
table: <b>{html.escape(evaluations[0].label)}</b>.</p>
<p>{html.escape(SSIM_DEFINITION)}. ± is the {html.escape(STD_DEFINITION)}. SSIM alone rewards folding: read it
next to % folding (det J &le; 0) and SDlogJ, and Dice or EPE where labels or known warps exist.</p>
<h2>Summary (pairs that succeeded)</h2>
{html_table(["method", "pairs", *[_label(k) for k in metrics]], summary_rows)}
<h2>Box plots</h2>
{images}
<h2>Paired against {html.escape(evaluations[0].label)}</h2>
<p>Difference = method &minus; reference over the pairs both succeeded on; a win is a pair where the method is
better (higher SSIM, NCC, det J min, Dice; lower MSE, folding, SDlogJ, EPE, seconds, memory; mean det J has no better
direction). Also in wins.csv and paired.csv.</p>
{html_table(["method", "metric", "pairs", "mean difference", "wins", "losses", "ties"], wins_rows)}
<details><summary>Per-pair differences</summary>
{html_table(["pair", "method", *[_label(k) for k in pair_metrics]], pair_rows)}
</details>
<h2>QC figures: best, median and worst pairs</h2>
{"".join(qc_sections) or "<p>No pair succeeded.</p>"}
<h2>Per-pair reports</h2>
<p>Each pair's report.html (images, overlays, det J, loss curves, metrics, options) in the evaluate folders.</p>
{_report_links(evaluations, report)}
</body></html>
"""
    (report / "index.html").write_text(page, encoding="utf-8")
    return report / "index.html"
