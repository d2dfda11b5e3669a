"""Landmarks: reading point files and the target registration error (TRE).

Points are physical coordinates in mm in SimpleITK's LPS axes. Files:

* CSV with columns ``x,y[,z]`` (a header row is optional; extra columns are ignored), LPS;
* 3D Slicer markups ``.fcsv`` and ``.mrk.json``, whose coordinates are RAS unless the file
  says LPS: they are converted (x and y change sign).

Direction: a fixed-space point ``p`` corresponds to ``phi(p) = p + u(p)`` in the moving image
(ITK's ``TransformPoint`` of the forward displacement transform). So with corresponding fixed
landmarks ``p_i`` and moving landmarks ``q_i`` the TRE after registration is
``|phi(p_i) - q_i|`` and before it ``|p_i - q_i|``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from dipreg.errors import DipregError

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def read_landmarks(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Points ``[n, ndim]`` in mm (LPS) from a CSV, ``.fcsv`` or ``.mrk.json`` file.

    Raises:
        DipregError: for a missing or unreadable file, a row that is not numbers, too few
            coordinates, or no points at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DipregError(f"{path}: landmark file not found")
    name = path.name.lower()
    try:
        if name.endswith(".mrk.json"):
            points, system = _read_markups_json(path)
        elif name.endswith(".fcsv"):
            points, system = _read_fcsv(path)
        else:
            points, system = _read_csv(path), "LPS"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DipregError(f"{path}: cannot read landmarks ({exc})") from None
    if not points:
        raise DipregError(f"{path}: no landmarks in the file")
    width = min(len(p) for p in points)
    if width < ndim:
        raise DipregError(f"{path}: landmarks have {width} coordinates; {ndim}D images need {ndim}")
    array = np.array([p[:3] for p in points], dtype=np.float64) if width >= 3 else np.array(points, dtype=np.float64)
    if system == "RAS":
        array = array * _RAS_TO_LPS[: array.shape[1]]
    return array[:, :ndim]


def _read_csv(path: Path) -> list[list[float]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if rows and not _is_number(rows[0][0]):
        header = [cell.strip().lower() for cell in rows[0]]
        columns = [header.index(axis) for axis in ("x", "y", "z") if axis in header]
        if len(columns) < 2:
            raise ValueError(f"the header {','.join(rows[0])} has no x and y columns")
        rows = [[row[c] for c in columns] for row in rows[1:]]
    points = []
    for number, row in enumerate(rows, start=1):
        try:
            points.append([float(cell) for cell in row[:3]])
        except ValueError:
            raise ValueError(f"row {number} is not numbers: {','.join(row)}") from None
    return points


def _read_fcsv(path: Path) -> tuple[list[list[float]], str]:
    system = "RAS"
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            if "CoordinateSystem" in line:
                value = line.split("=", 1)[1].strip().upper()
                system = "LPS" if value in ("LPS", "1") else "RAS"
            continue
        if line.strip():
            cells = line.split(",")
            points.append([float(c) for c in cells[1:4]])
    return points, system


def _read_markups_json(path: Path) -> tuple[list[list[float]], str]:
    document = json.loads(path.read_text(encoding="utf-8"))
    markup = document["markups"][0]
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    points = [list(map(float, point["position"])) for point in markup.get("controlPoints", [])]
    return points, system


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_points(points: np.ndarray, path: str | os.PathLike) -> None:
    """Write points ``[n, ndim]`` (mm, LPS) as a CSV with an ``x,y[,z]`` header."""
    points = np.asarray(points)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow("xyz"[: points.shape[1]])
        writer.writerows([f"{v:.6f}" for v in point] for point in points)


def landmark_errors(fixed_points: np.ndarray, moving_points: np.ndarray,
                    mapped_points: np.ndarray) -> tuple[dict[str, float], list[dict[str, float]]]:
    """TRE before (``|p - q|``) and after (``|phi(p) - q|``) registration.

    Args:
        fixed_points: landmarks ``p_i`` in the fixed image (mm).
        moving_points: the corresponding ``q_i`` in the moving image (mm).
        mapped_points: ``phi(p_i)``.

    Returns:
        The summary (mean, median, max before and after, count) and one row per point.
    """
    if fixed_points.shape != moving_points.shape:
        raise DipregError(f"{len(fixed_points)} fixed landmarks but {len(moving_points)} moving landmarks: "
                          "they must correspond one to one, in order")
    before = np.linalg.norm(fixed_points - moving_points, axis=1)
    after = np.linalg.norm(mapped_points - moving_points, axis=1)
    summary = {"landmarks": len(before)}
    for label, values in (("before", before), ("after", after)):
        summary.update({f"tre_{label}_mean_mm": float(values.mean()), f"tre_{label}_median_mm": float(np.median(values)),
                        f"tre_{label}_max_mm": float(values.max())})
    axes = "xyz"[: fixed_points.shape[1]]
    rows = []
    for i in range(len(before)):
        row: dict[str, float] = {"point": i + 1}
        for prefix, points in (("fixed", fixed_points), ("moving", moving_points), ("mapped", mapped_points)):
            row.update({f"{prefix}_{axis}": float(points[i, k]) for k, axis in enumerate(axes)})
        row.update(tre_before_mm=float(before[i]), tre_after_mm=float(after[i]))
        rows.append(row)
    return summary, rows


def write_landmark_table(rows: list[dict[str, float]], path: str | os.PathLike) -> None:
    """Write the per-point rows of :func:`landmark_errors` as ``landmarks.csv``."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
