"""PAIRS.csv: the pairs of a batch, their columns and the checks on them.

Columns (paths relative to the CSV file):

* ``fixed``, ``moving`` (required): the images.
* ``fixed_labels``, ``moving_labels``: anatomical label maps; the moving one is warped by the
  same transform (label-linear interpolation unless ``label_interpolation`` says otherwise)
  and scored by Dice per label and mean.
* ``fixed_landmarks``, ``moving_landmarks``: corresponding points (CSV ``x,y[,z]`` in LPS mm,
  or 3D Slicer ``.fcsv``/``.mrk.json``); the target registration error before and after.
* ``fixed_mask``, ``moving_mask``: masks used for scoring: the endpoint error is averaged
  over ``fixed_mask``, and with both masks the warped moving mask's Dice with the fixed mask
  is reported as ``mask_dice``. No method sees them, unless ``mask_similarity`` (``dipreg
  evaluate --mask-similarity``) also makes them the cost-function masks of ``dip`` and
  ``classic`` (non-zero = where the similarity is computed; see :func:`dipreg.register`).
* ``fixed_channel``, ``moving_channel``: channel per image, overriding ``--channel``.
* ``initial_transform``: an ITK transform file (fixed-space points to moving-space points)
  every method starts from, e.g. to bring together images whose headers disagree; the
  written field and the scores include it.
* ``true_displacement``: the known answer of a synthetic pair (see :mod:`dipreg.synthetic`);
  its endpoint error in mm is reported as ``epe_mm``.
* ``id``: name of the pair's output folder (default ``pairNNN`` from the row number).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dipreg.errors import DipregError


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
        DipregError: a missing or unknown column; or, naming every bad row (and its line) at
            once, one line each: an empty required cell, a missing file, a bad channel, a label
            or mask given for one image only, too many cells, or a duplicate id.
    """
    pairs_csv = Path(pairs_csv)
    if not pairs_csv.is_file():
        raise DipregError(f"{pairs_csv}: file not found")
    base = pairs_csv.parent
    specs: list[PairSpec] = []
    problems: list[str] = []
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
        for number, record in enumerate(reader, start=1):
            where = f"{pairs_csv}: row {number} (line {reader.line_num})"
            if None in record:
                problems.append(f"{where}: more cells than columns")
                continue
            values = {name: (value or "").strip() for name, value in record.items()}
            if not any(values.values()):
                continue
            try:
                specs.append(_pair_spec(number, values, base, where))
            except DipregError as exc:
                problems.append(str(exc))
    if not specs and not problems:
        raise DipregError(f"{pairs_csv}: no pairs listed")
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.id in seen:
            problems.append(f"{pairs_csv}: row {spec.row}: id {spec.id!r} already used by row {seen[spec.id]}")
        seen.setdefault(spec.id, spec.row)
    if len(problems) > 1:
        raise DipregError(f"{len(problems)} bad rows in {pairs_csv} (nothing was run):\n" + "\n".join(problems))
    if problems:
        raise DipregError(problems[0])
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
