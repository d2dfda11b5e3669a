"""Batch evaluation of one method on the pairs of a PAIRS.csv: ``dipreg evaluate`` and ``dipreg batch``.

Each pair (see :mod:`dipreg.pairs` for the columns) is registered by a method of
:mod:`dipreg.baselines`, scored as far as its columns allow, and written to its own folder;
:mod:`dipreg.execution` runs the pairs (in process or on Dask), :mod:`dipreg.ledger` makes the
run resumable, :mod:`dipreg.summary` writes the tables after every pair.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk
from tqdm import tqdm

from dipreg import __version__
from dipreg.errors import DipregError
from dipreg.execution import describe_error, run_tasks
from dipreg.images import label_map_on, read_displacement, same_grid
from dipreg.landmarks import read_landmarks
from dipreg.ledger import Ledger, folder_files, pair_key, staged_directory
from dipreg.pairs import PairSpec, read_pairs
from dipreg.summary import METRIC_COLUMNS, write_tables

if TYPE_CHECKING:  # modules that need PyTorch or scikit-image are imported where used: the CLI starts fast
    from dipreg.registration import RegistrationResult


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
    from dipreg.metrics import dice

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
        from dipreg.synthetic import displacement_endpoint_error

        truth = read_displacement(spec.true_displacement)
        if not same_grid(truth, result.fixed):
            raise DipregError(f"{spec.true_displacement}: true displacement is not on the fixed image's grid")
        scores["epe_mm"] = displacement_endpoint_error(result.displacement, truth, fixed_mask)
    result.metrics.update(scores)
    return scores


def evaluate_pair(spec: PairSpec, outdir: Path, method: str, preset: str | None = None,
                  channel: int | None = None, options: dict[str, Any] | None = None,
                  label_interpolation: str = "label", mask_similarity: bool = False) -> dict[str, Any]:
    """Register one pair, score it and write its outputs to ``outdir/pairs/<id>/`` (with
    ``mask_similarity`` the pair's masks are also the similarity's masks).

    Returns:
        The pair's row of results.csv. A pair that fails (unreadable image, diverging
        registration, ...) gives a row whose ``error`` says why, instead of an exception.
    """
    row: dict[str, Any] = {"id": spec.id, "fixed": str(spec.fixed), "moving": str(spec.moving), "method": method}
    if spec.initial_transform:
        row["initial_transform"] = str(spec.initial_transform)
    notes: list[str] = []
    from dipreg.baselines import run_method
    from dipreg.registration import load_pair

    try:
        fixed, moving = load_pair(spec.fixed, spec.moving, channel, spec.fixed_channel, spec.moving_channel)
        masks = dict(fixed_mask=spec.fixed_mask, moving_mask=spec.moving_mask) if mask_similarity else {}
        result = run_method(method, fixed, moving, preset, initial_transform=spec.initial_transform, **masks,
                            **(options or {}))
        scores = score_pair(spec, result, notes, label_interpolation)
        with staged_directory(outdir / "pairs" / spec.id) as pair_dir:
            result.save(pair_dir)
    except (DipregError, RuntimeError) as exc:
        row["error"] = describe_error(exc)
        return row
    row.update({key: result.metrics[key] for key in METRIC_COLUMNS})
    row.update(scores)
    row.update(seconds=result.metrics["seconds"], peak_memory_mb=result.metrics["peak_memory_mb"])
    if notes:
        row["notes"] = "; ".join(notes)
    return row


def _pair_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['id']}: FAILED: {row['error']}"
    extra = "".join(f" {key} {row[key]:.3f}" for key in ("dice_mean", "epe_mm") if key in row)
    return (f"{row['id']}: SSIM {row['ssim']:.3f} folding {row['folding_percent']:.3f} % "
            f"SDlogJ {row['sdlogj']:.3f}{extra} ({row['seconds']:.1f} s)")


def evaluate(
    pairs_csv: str | os.PathLike,
    outdir: str | os.PathLike,
    method: str = "dip",
    preset: str | None = None,
    channel: int | None = None,
    workers: int | None = None,
    quiet: bool = False,
    scheduler: str | None = None,
    force: bool = False,
    label_interpolation: str = "label",
    mask_similarity: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run one method on every pair of a PAIRS.csv and write per-pair outputs and a summary.

    Writes ``outdir/pairs/<id>/`` (the files of ``dipreg register``, plus
    ``warped_labels.nii.gz`` when labels are given; each folder appears whole), and after
    every pair ``outdir/ledger.jsonl`` (one line per finished pair, see :mod:`dipreg.ledger`),
    ``outdir/results.csv`` (one row per finished pair), ``outdir/failures.csv`` and
    ``outdir/summary.json``. A rerun skips the pairs the ledger records as done with the same
    options and unchanged inputs. Prints a progress bar and the summary table unless ``quiet``.

    Args:
        pairs_csv: the PAIRS.csv (see the module documentation for its columns).
        outdir: output folder (created; a pair's folder is replaced when it is recomputed).
        method: one of :data:`dipreg.baselines.METHODS`.
        preset: preset of ``dip`` / ``classic`` (default: their own).
        channel: channel of multi-channel images, unless the CSV gives one per image.
        workers: pairs run at once on a local Dask cluster (``dipreg[batch]``); one at a
            time in this process when None or 1.
        quiet: print nothing.
        scheduler: address of a running Dask scheduler to run the pairs on instead.
        force: recompute every pair, even those the ledger records as done.
        label_interpolation: how moving labels are warped: ``label`` (label-linear),
            ``nearest`` or ``linear``.
        mask_similarity: the pairs' ``fixed_mask``/``moving_mask`` are also the masks of the
            similarity (``dip`` and ``classic``), not only of the scores.
        **options: registration options of ``dip`` and ``classic``.

    Returns:
        The summary (as written to summary.json); ``n_failed`` counts the failed pairs.

    Raises:
        DipregError: for a bad PAIRS.csv, method or option (before anything runs).
    """
    from dipreg.baselines import check_method

    check_method(method, preset, options)
    if mask_similarity and method not in ("dip", "classic"):
        raise DipregError(f"mask_similarity: method {method} takes no similarity masks; they apply to dip and classic")
    specs = read_pairs(pairs_csv)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    settings = {"method": method, "preset": preset, "options": options, "channel": channel,
                "label_interpolation": label_interpolation, "mask_similarity": mask_similarity,
                "masks_definition": "fixed_mask/moving_mask score the pairs; with mask_similarity they are also the "
                                    "similarity's masks" if mask_similarity else "fixed_mask/moving_mask score the pairs only",
                "pairs_csv": str(Path(pairs_csv).resolve()), "dipreg_version": __version__}
    key_settings = {name: settings[name] for name in ("method", "preset", "options", "channel", "label_interpolation",
                                                      "mask_similarity", "dipreg_version")}
    keys = {spec.id: pair_key(spec, key_settings) for spec in specs}
    task = functools.partial(evaluate_pair, outdir=outdir, method=method, preset=preset, channel=channel,
                             options=options, label_interpolation=label_interpolation,
                             mask_similarity=mask_similarity)
    ledger = Ledger(outdir)
    with ledger.locked(outdir / "pairs"):
        todo = [spec for spec in specs
                if force or not ledger.finished(spec.id, keys[spec.id], outdir / "pairs" / spec.id)]

        def current_rows() -> list[dict[str, Any]]:
            records = (ledger.latest.get(spec.id) for spec in specs)
            return [record["row"] for spec, record in zip(specs, records) if record and record["key"] == keys[spec.id]]

        def finish(spec: PairSpec, row: dict[str, Any] | None, error: str | None) -> None:
            if row is None:
                row = {"id": spec.id, "fixed": str(spec.fixed), "moving": str(spec.moving), "method": method,
                       "error": error}
            ledger.append(spec.id, keys[spec.id], row,
                          {} if "error" in row else folder_files(outdir / "pairs" / spec.id))
            summary = write_tables(outdir, current_rows(), len(specs), settings)
            progress.set_postfix(done=summary["n_done"], failed=summary["n_failed"],
                                 remaining=summary["n_remaining"], refresh=False)
            progress.update()
            if not quiet:
                progress.write(_pair_line(row), file=sys.stderr)

        with tqdm(total=len(specs), initial=len(specs) - len(todo), unit="pair", disable=quiet, file=sys.stderr,
                  dynamic_ncols=True) as progress:
            run_tasks(task, todo, finish, workers or 1, scheduler, names=lambda spec: spec.id)
        summary = write_tables(outdir, current_rows(), len(specs), settings)
    if not quiet:
        print(summary["table"])
        skipped = f" ({len(specs) - len(todo)} already done before)" if len(todo) < len(specs) else ""
        failures = f", see {outdir / 'failures.csv'}" if summary["n_failed"] else ""
        print(f"{summary['n_done']} of {len(specs)} pairs done{skipped}, {summary['n_failed']} failed{failures}")
    return summary
