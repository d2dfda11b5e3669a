"""The accuracy-smoothness front: dipreg against Greedy, ANTs SyN and SyNCC.

Each method is swept over its own regularisation (dipreg: the bending-energy weight, or λ of the
diffusion penalty; Greedy: its ``-s`` smoothing of
the update and of the warp; ANTs: SyN's ``flow_sigma`` / ``total_sigma``), every point is scored
by dipreg's own code (one displacement field on the fixed grid per method, then
:func:`dipreg.evaluation.score_pair` and the metrics of
:func:`dipreg.registration.result_from_displacement`), and accuracy is plotted against SDlogJ.
A point counts only with 0 % folding on every pair. Each method's front is the line through its
points that no other of its points beats on both axes.

    python benchmarks/front.py                                   # everything (days on 2 cores)
    python benchmarks/front.py --datasets knownwarp2d-ants --methods greedy ants-syn
    python benchmarks/front.py --datasets lpba40 --max-pairs 2 --methods dip --defaults-only
    python benchmarks/front.py --datasets lpba40 --max-pairs 1 --methods dip-diffusion --lambdas 1 2
    python benchmarks/front.py --report-only                     # plots and docs/front.md from the JSON

Resumable: every finished (point, pair) is merged at once into
``benchmarks/results/front-<dataset>.json`` and skipped on the next run. ``--report-only``
(and every run at its end) writes ``benchmarks/results/front-<dataset>.png`` (one panel per
accuracy measure, one line per method, the defaults as stars), ``benchmarks/results/front-summary.json``
(the points and the matched-smoothness comparisons) and ``docs/front.md``.

Data sets (from ../shared/data; generated pairs go to benchmarks/runs/front, git-ignored):
  knownwarp2d-ants  the six ANTs slices, each warped by a known random field (evaluate_all.py): EPE.
  knownwarp2d-mni   six MNI152 axial slices with known warps (ablation.py): EPE, GM/WM Dice.
  knownwarp3d       OASIS A and B, vxm3d and MNI152 with known warps (ablation.py): EPE, own labels' Dice.
  lpba40            the 4 inter-subject LPBA40 pairs: Dice over the 56 manual structures.
  oasis3d           OASIS B onto A: tissue Dice.
  lgg2d             16 inter-patient TCGA-LGG FLAIR pairs: SSIM and NCC only (no geometry).

Greedy needs ``pip install 'dipreg[bench]'`` (picsl-greedy), ANTs ``dipreg[ants]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import SimpleITK as sitk

# The sibling benchmark scripts: their data set builders and JSON merge.
from ablation import knownwarp2d_pairs, knownwarp3d_pairs, merge_row
from evaluate_all import knownwarp2d_csv, oasis3d_csv

from dipreg.baselines import ants_result, run_method
from dipreg.errors import DipregError
from dipreg.evaluation import score_pair
from dipreg.execution import thread_limit
from dipreg.images import intensity_range, read_displacement, write_image
from dipreg.pairs import read_pairs
from dipreg.metrics import jacobian_statistics
from dipreg.registration import RegistrationResult, load_pair, result_from_displacement
from dipreg.transforms import jacobian_determinant, voxel_displacement_from_image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "runs" / "front"
REPORT = ROOT / "docs" / "front.md"

Setting = dict[str, float]
Runner = Callable[[sitk.Image, sitk.Image, Setting, int], RegistrationResult]


# --------------------------------------------------------------------------- data sets

def write_pairs(folder: Path, pairs: Iterable[tuple[str, dict]]) -> Path:
    """Save in-memory pairs (the dicts of ablation.py) as NIfTI files and a PAIRS.csv in ``folder``."""
    columns = {"fixed": "fixed", "moving": "moving", "truth": "true_displacement", "mask": "fixed_mask",
               "fixed_labels": "fixed_labels", "moving_labels": "moving_labels"}
    rows = []
    for name, pair in pairs:
        row = {"id": name}
        (folder / name).mkdir(parents=True, exist_ok=True)
        for key, column in columns.items():
            if key in pair:
                write_image(pair[key], folder / name / f"{column}.nii.gz")
                row[column] = f"{name}/{column}.nii.gz"
        rows.append(row)
    header = ["id"] + [c for c in columns.values() if any(c in row for row in rows)]
    with open(folder / "pairs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return folder / "pairs.csv"


def cached_pairs(name: str, make: Callable[[], Iterable[tuple[str, dict]]]) -> Path:
    """The PAIRS.csv of a generated data set under WORK, made on first use."""
    path = WORK / name / "pairs.csv"
    return path if path.is_file() else write_pairs(path.parent, make())


@dataclass(frozen=True)
class Dataset:
    """Where a data set's PAIRS.csv comes from, what scores its accuracy, and how many of its
    pairs the fronts use unless ``--max-pairs`` says otherwise (None: all). Every point of a
    front is the mean over the same pairs, so a method run on more pairs than its peers adds
    nothing to the report."""

    pairs_csv: Callable[[], Path]
    scores: tuple[str, ...]
    channel: int | None = None
    front_pairs: int | None = None


DATASETS: dict[str, Dataset] = {
    "knownwarp2d-ants": Dataset(lambda: knownwarp2d_csv(WORK), ("epe_mm",), front_pairs=3),
    "knownwarp2d-mni": Dataset(lambda: cached_pairs("knownwarp2d-mni", lambda: knownwarp2d_pairs(6)),
                               ("epe_mm", "dice_mean")),
    "knownwarp3d": Dataset(lambda: cached_pairs("knownwarp3d", lambda: knownwarp3d_pairs(4)), ("epe_mm", "dice_mean")),
    "lpba40": Dataset(lambda: DATA / "lpba40" / "pairs.csv", ("dice_mean",)),
    "oasis3d": Dataset(oasis3d_csv, ("dice_mean",)),
    "lgg2d": Dataset(lambda: DATA / "lgg2d" / "pairs.csv", ("ssim", "ncc"), channel=1, front_pairs=4),
}

#: Direction and axis label of each accuracy measure.
SCORES = {"epe_mm": (-1, "EPE (mm), lower is better"), "dice_mean": (1, "mean Dice"),
          "ssim": (1, "SSIM"), "ncc": (1, "NCC")}


# --------------------------------------------------------------------------- methods

def dipreg_runner(preset: str, **options: Any) -> Runner:
    """``dipreg.register`` with a preset, fixed options and the point's setting (e.g. λ)."""
    def run(fixed: sitk.Image, moving: sitk.Image, setting: Setting, threads: int) -> RegistrationResult:
        return run_method("classic" if preset == "classic" else "dip", fixed, moving, preset,
                          threads=threads, **options, **setting)
    return run


def run_greedy(fixed: sitk.Image, moving: sitk.Image, setting: Setting, threads: int) -> RegistrationResult:
    """Greedy (picsl-greedy) as its documentation shows for brain MRI: affine (``-a``, NCC radius 2,
    image centres), then deformable NCC radius 2 with ``-s`` from the setting; default iterations
    (``-n 100x100``). The warp is written unquantised (``-wp 0``) and composed with the affine by
    Greedy itself (``-rc``) into one ITK displacement field on the fixed grid."""
    try:
        from picsl_greedy import Greedy2D, Greedy3D
    except ImportError:
        raise DipregError("method greedy needs picsl-greedy: pip install 'dipreg[bench]'") from None
    start = time.perf_counter()
    dim = fixed.GetDimension()
    greedy = (Greedy2D if dim == 2 else Greedy3D)()
    radius = "x".join(["2"] * dim)
    sigmas = f"{setting['sigma_gradient']:g}vox {setting['sigma_warp']:g}vox"
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="front-greedy-") as tmp:
        f, m, affine, warp, composed, warped = (os.path.join(tmp, n) for n in (
            "fixed.nii.gz", "moving.nii.gz", "affine.mat", "warp.nii.gz", "composed.nii.gz", "warped.nii.gz"))
        write_image(fixed, Path(f))
        write_image(moving, Path(m))
        common = f"-d {dim} -threads {threads} -seed 1"
        greedy.execute(f"{common} -a -m NCC {radius} -i {f} {m} -o {affine} -ia-image-centers", out=log, err=log)
        greedy.execute(f"{common} -m NCC {radius} -i {f} {m} -it {affine} -o {warp} -wp 0 -s {sigmas}", out=log, err=log)
        greedy.execute(f"{common} -rf {f} -rm {m} {warped} -rc {composed} -wp 0 -r {warp} {affine}", out=log, err=log)
        displacement = sitk.Cast(sitk.ReadImage(composed), sitk.sitkVectorFloat64)
        greedy_warped = sitk.GetArrayFromImage(sitk.ReadImage(warped))
    displacement.CopyInformation(fixed)
    result = result_from_displacement(fixed, moving, displacement,
                                      {"method": "greedy", "options": {"s": sigmas, "ncc_radius": radius}})
    low, high = intensity_range(moving)
    result.metrics["greedy_warped_difference"] = float(
        np.abs(sitk.GetArrayFromImage(result.warped) - greedy_warped).max() / (high - low))
    result.metrics["seconds"] = time.perf_counter() - start
    return result


def syncc_arguments(fixed: str, moving: str, prefix: str, dim: int, setting: Setting) -> list[str]:
    """The stages of ANTsPy 0.6's ``type_of_transform="SyNCC"`` (rigid, affine, SyN with CC radius 4),
    with SyN's flow and total sigmas from the setting. ANTsPy's SyNCC itself ignores its
    ``flow_sigma`` / ``total_sigma`` arguments (it hard-codes ``SyN[0.15,3,0]``), so the stages are
    given to antsRegistration directly; at flow 3, total 0 this is exactly SyNCC."""
    mattes = f"mattes[{fixed},{moving},1,32,regular,0.2]"
    return [
        "--dimensionality", str(dim), "-r", f"[{fixed},{moving},1]",
        "--metric", mattes, "--transform", "Rigid[1]", "--convergence", "2100x1200x1200x0",
        "--smoothing-sigmas", "3x2x1x0", "--shrink-factors", "4x4x2x1", "-x", "[NA,NA]",
        "--metric", mattes, "--transform", "Affine[1]", "--convergence", "1200x1200x100",
        "--smoothing-sigmas", "2x1x0", "--shrink-factors", "4x2x1", "-x", "[NA,NA]",
        "--metric", f"CC[{fixed},{moving},1,4]",
        "--transform", f"SyN[0.15,{setting['flow_sigma']:g},{setting['total_sigma']:g}]",
        "--convergence", "[2100x1200x1200x20,1e-7,8]", "--smoothing-sigmas", "3x2x1x0", "--shrink-factors", "4x3x2x1",
        "-u", "0", "-z", "1", "--output", f"[{prefix},{prefix}Warped.nii.gz]", "-x", "[NA,NA]", "--float", "1",
    ]


def run_ants(transform: str) -> Runner:
    """ANTsPy SyN (``ants.registration`` with the setting's flow/total sigmas) or SyNCC (its stages)."""
    def run(fixed: sitk.Image, moving: sitk.Image, setting: Setting, threads: int) -> RegistrationResult:
        def register(ants, ants_fixed, ants_moving, prefix):
            if transform == "SyN":
                outcome = ants.registration(ants_fixed, ants_moving, type_of_transform="SyN", outprefix=prefix,
                                            **setting)
                return outcome["fwdtransforms"], outcome["warpedmovout"]
            f, m = prefix + "fixed.nii.gz", prefix + "moving.nii.gz"
            ants.image_write(ants_fixed, f)
            ants.image_write(ants_moving, m)
            ants.registration(syncc_arguments(f, m, prefix, fixed.GetDimension(), setting), None)
            return [prefix + "1Warp.nii.gz", prefix + "0GenericAffine.mat"], ants.image_read(prefix + "Warped.nii.gz")

        start = time.perf_counter()
        with thread_limit(threads):
            result = ants_result(fixed, moving, register, {"method": f"ants-{transform}",
                                                           "options": {"type_of_transform": transform, **setting}})
        result.metrics["seconds"] = time.perf_counter() - start
        return result
    return run


@dataclass(frozen=True)
class Method:
    """A registration method with the settings its front sweeps and its own default (None: no default)."""

    run: Runner
    sweep: tuple[Setting, ...]
    default: Setting | None
    description: str
    #: the sweep is over λ and ``--lambdas`` replaces it
    lambdas: bool = False


LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
GREEDY_DEFAULT = {"sigma_gradient": 1.732, "sigma_warp": 0.7071}
ANTS_DEFAULT = {"flow_sigma": 3.0, "total_sigma": 0.0}
ANTS_SWEEP = tuple({"flow_sigma": f, "total_sigma": 0.0} for f in (1.5, 3.0, 4.5, 6.0)) + tuple(
    {"flow_sigma": 3.0, "total_sigma": t} for t in (1.0, 2.0))

BENDING = (4.0, 8.0, 16.0, 32.0, 64.0)
#: The default's two weights scaled together: (λ, bending) = s (0.5, 4).
STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
DIP_SWEEP = tuple({"regularization": s / 2, "bending": 4 * s} for s in STRENGTHS)

#: The loss cap of the default before round 4 (volumes over 128³ voxels matched at half
#: resolution). The families below that pin it were measured with it; in 2D it changes nothing.
HALF_LOSS = {"max_loss_voxels": 128**3}

METHODS: dict[str, Method] = {
    "dip": Method(dipreg_runner("default"), DIP_SWEEP,
                  {"regularization": 0.5, "bending": 4.0},
                  "dipreg default preset (fixed noise input, diffusion λ plus bending energy), both weights scaled "
                  "together"),
    # Ablations of the default (issue 16, part 2): no default, measured against "dip".
    "dip-half-loss": Method(dipreg_runner("default", **HALF_LOSS), DIP_SWEEP, None,
                            "the default with the previous loss cap (3D volumes over 128³ voxels matched at half "
                            "resolution), both weights scaled together"),
    "dip-bending": Method(dipreg_runner("default", regularization=0.0, **HALF_LOSS), tuple({"bending": w} for w in BENDING),
                          None, "dipreg default with bending energy alone (no diffusion), its weight swept; 3D loss "
                                "at half resolution"),
    "dip-diffusion": Method(dipreg_runner("default", bending=0.0, **HALF_LOSS), tuple({"regularization": v} for v in LAMBDAS),
                            None, "dipreg default with diffusion alone (no bending energy), λ swept; 3D loss at half "
                                  "resolution", lambdas=True),
    "dip-perturbed": Method(dipreg_runner("default", z_mode="perturbed", bending=0.0, **HALF_LOSS),
                            tuple({"regularization": v} for v in LAMBDAS), None,
                            "the previous default: noise input perturbed every iteration, diffusion penalty, λ swept; "
                            "3D loss at half resolution", lambdas=True),
    "dip-refined": Method(dipreg_runner("default", refine_iterations=100, **HALF_LOSS), DIP_SWEEP, None,
                          "dipreg default plus 100 iterations of a free field on the half-resolution grid "
                          "(--refine-iterations 100); 3D loss at half resolution; both weights scaled together"),
    "classic": Method(dipreg_runner("classic", **HALF_LOSS), tuple({"regularization": v} for v in LAMBDAS),
                      {"regularization": 1.0}, "dipreg classic preset (free SVF, diffusion), λ swept; 3D loss at half "
                                                "resolution", lambdas=True),
    "classic-bending": Method(dipreg_runner("classic", regularization=0.0, **HALF_LOSS),
                              tuple({"bending": w} for w in (2.0, 8.0, 32.0)), None,
                              "dipreg classic preset with bending energy instead of diffusion, its weight swept; 3D "
                              "loss at half resolution"),
    "greedy": Method(run_greedy, tuple({k: round(v * s, 4) for k, v in GREEDY_DEFAULT.items()}
                                       for s in (0.75, 1.0, 1.5, 2.0, 3.0)), GREEDY_DEFAULT,
                     "Greedy NCC 2, affine first; -s sigmas (vox) swept by a common factor"),
    "ants-syn": Method(run_ants("SyN"), ANTS_SWEEP, ANTS_DEFAULT, "ANTsPy SyN (Mattes), flow/total sigma swept"),
    # SyNCC takes ~100 s per 2D pair on the shared 2-core machine: a shorter sweep.
    "ants-syncc": Method(run_ants("SyNCC"), (ANTS_DEFAULT, *ANTS_SWEEP[::3], ANTS_SWEEP[-1]), ANTS_DEFAULT,
                         "ANTsPy SyNCC stages (CC 4), flow/total sigma swept"),
}


def label(setting: Setting) -> str:
    return ",".join(f"{k}={v:g}" for k, v in setting.items())


def point_name(method: str, setting: Setting) -> str:
    return f"{method} [{label(setting)}]"


# --------------------------------------------------------------------------- running

ROW_METRICS = ("ssim", "ncc", "folding_percent", "sdlogj", "jacobian_std", "jacobian_min", "seconds")


def run_point(method: str, setting: Setting, spec, channel: int | None, threads: int) -> dict[str, Any]:
    """Register one pair at one setting and score it with dipreg's code."""
    if spec.initial_transform:
        raise DipregError("front.py does not pass initial transforms to the peers")
    fixed, moving = load_pair(spec.fixed, spec.moving, channel, spec.fixed_channel, spec.moving_channel)
    result = METHODS[method].run(fixed, moving, setting, threads)
    scores = score_pair(spec, result, [])
    row = {key: result.metrics[key] for key in ROW_METRICS}
    row.update({k: v for k, v in scores.items() if k in ("dice_mean", "epe_mm", "mask_dice")})
    row.update(method=method, setting=setting)
    for key in ("ants_warped_difference", "greedy_warped_difference", "iterations"):
        if key in result.metrics:
            row[key] = result.metrics[key]
    return row


def run_dataset(dataset: str, methods: list[str], max_pairs: int | None, lambdas: list[float] | None,
                threads: int, defaults_only: bool, settings: list[str] | None = None) -> None:
    """Run every missing (point, pair) of a data set, merging each into its JSON as it finishes."""
    spec = DATASETS[dataset]
    pairs = read_pairs(spec.pairs_csv())[:max_pairs or spec.front_pairs]
    path = RESULTS / f"front-{dataset}.json"
    for method in methods:
        entry = METHODS[method]
        sweep = [{"regularization": v} for v in lambdas] if lambdas and entry.lambdas else list(entry.sweep)
        if defaults_only:
            sweep = [s for s in sweep if s == entry.default]
        if settings:
            sweep = [s for s in sweep if label(s) in settings]
        for setting in sweep:
            name = point_name(method, setting)
            for pair in pairs:
                done = json.loads(path.read_text()) if path.exists() else {}
                if pair.id in done.get(name, {}):
                    continue
                try:
                    row = run_point(method, setting, pair, spec.channel, threads)
                except (DipregError, RuntimeError) as exc:
                    print(f"{dataset} {name} {pair.id}: FAILED {exc}", flush=True)
                    continue
                merge_row(path, name, pair.id, row)
                print(f"{dataset:16s} {name:48s} {pair.id:24s} "
                      + " ".join(f"{k}={row[k]:.4f}" for k in ("sdlogj", "folding_percent", *spec.scores, "seconds")
                                 if k in row), flush=True)


# --------------------------------------------------------------------------- analysis

def aggregate(data: dict[str, dict[str, dict]], scores: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """Mean of every point over the reference pairs (those of dip's default, else all pairs seen).

    Returns the points (method, setting, means, folding_max, counts, default) and the pair ids.
    Points missing a reference pair are left out.
    """
    reference = data.get(point_name("dip", METHODS["dip"].default))
    pair_ids = sorted(reference) if reference else sorted({p for rows in data.values() for p in rows})
    points = []
    for name, rows in data.items():
        if not all(p in rows for p in pair_ids):
            continue
        chosen = [rows[p] for p in pair_ids]
        method, setting = chosen[0]["method"], chosen[0]["setting"]
        point = {"name": name, "method": method, "setting": setting,
                 "default": method in METHODS and setting == METHODS[method].default, "pairs": len(chosen)}
        for key in ("sdlogj", "folding_percent", "seconds", *scores):
            values = [r[key] for r in chosen if r.get(key) is not None]
            point[key] = float(np.mean(values)) if values else None
        point["folding_max"] = max(r["folding_percent"] for r in chosen)
        point["counts"] = point["folding_max"] == 0
        points.append(point)
    return points, pair_ids


def front(points: list[dict], method: str, score: str) -> list[dict]:
    """The method's counted points that none of its other counted points beats on SDlogJ and ``score``."""
    sign = SCORES[score][0]
    candidates = sorted((p for p in points if p["method"] == method and p["counts"] and p.get(score) is not None),
                        key=lambda p: (p["sdlogj"], -sign * p[score]))
    kept, best = [], -np.inf
    for p in candidates:
        if sign * p[score] > best:
            kept.append(p)
            best = sign * p[score]
    return kept


def at_smoothness(line: list[dict], score: str, sdlogj: float) -> float | None:
    """The best ``score`` a method's front reaches at no more than ``sdlogj`` (None: none that smooth).

    A step function: the front is undominated, so this is its last point at or left of ``sdlogj``.
    """
    eligible = [p[score] for p in line if p["sdlogj"] <= sdlogj + 1e-9]
    return float(eligible[-1]) if eligible else None


def matched(points: list[dict], scores: tuple[str, ...]) -> list[dict]:
    """Every method's front at the SDlogJ of each peer's default point."""
    methods = sorted({p["method"] for p in points}, key=lambda m: list(METHODS).index(m) if m in METHODS else 99)
    rows = []
    for reference in (p for p in points if p["default"] and p["method"] in ("greedy", "ants-syn", "ants-syncc")):
        row = {"at": reference["method"], "sdlogj": reference["sdlogj"]}
        for score in scores:
            row[score] = {m: at_smoothness(front(points, m, score), score, reference["sdlogj"]) for m in methods}
        rows.append(row)
    return rows


def truth_sdlogj(dataset: str, pair_ids: list[str]) -> float | None:
    """Mean SDlogJ of the true fields of a known-warp data set's pairs (None without them)."""
    specs = [s for s in read_pairs(DATASETS[dataset].pairs_csv()) if s.id in pair_ids and s.true_displacement]
    if not specs:
        return None
    return float(np.mean([jacobian_statistics(jacobian_determinant(voxel_displacement_from_image(
        read_displacement(s.true_displacement))))["sdlogj"] for s in specs]))


def plot(dataset: str, points: list[dict], scores: tuple[str, ...], pairs: int, path: Path,
         truth: float | None) -> None:
    """One panel per accuracy measure: each method's points, its front as a line, its default as a star
    (and the true fields' SDlogJ as a dotted line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(p["method"] for p in points)]
    methods.sort(key=lambda m: list(METHODS).index(m) if m in METHODS else 99)
    figure, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, score in zip(axes[0], scores):
        for method in methods:  # one colour per method across data sets
            colour = colours[(list(METHODS).index(method) if method in METHODS else -1) % len(colours)]
            mine = [p for p in points if p["method"] == method and p.get(score) is not None]
            line = front(points, method, score)
            axis.plot([p["sdlogj"] for p in line], [p[score] for p in line], "-o", color=colour, label=method, ms=4)
            others = [p for p in mine if p["counts"] and p not in line]
            axis.plot([p["sdlogj"] for p in others], [p[score] for p in others], "o", color=colour, mfc="none", ms=4)
            folding = [p for p in mine if not p["counts"]]
            axis.plot([p["sdlogj"] for p in folding], [p[score] for p in folding], "x", color=colour, ms=6)
            for p in mine:
                if p["default"]:
                    axis.plot(p["sdlogj"], p[score], "*", color=colour, ms=14, mec="black")
        if truth is not None:
            axis.axvline(truth, color="grey", ls=":", label="true field")
        axis.set_xlabel("SDlogJ (std of log det J), lower is smoother")
        axis.set_ylabel(SCORES[score][1])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{dataset}: accuracy against smoothness, mean of {pairs} pairs\n"
                    "(★ default, ○ dominated, × folds: does not count)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_report(command_log: list[str]) -> None:
    """Plots, front-summary.json and docs/front.md from every front-<dataset>.json."""
    summary: dict[str, Any] = {}
    lines = ["# Accuracy against smoothness: the front", "",
             ("Generated by `python benchmarks/front.py` (`--report-only` rebuilds it from "
             "`benchmarks/results/front-*.json`). Each method is swept over its own regularisation; "
             "every point is the mean over the pairs of a data set (the pairs of dipreg's default point), "
             "scored by dipreg's own code (EPE in mm over the fixed image's foreground against the inverted "
             "known warp; Dice of the warped moving labels; SSIM/NCC; SDlogJ = std of log det J over the image). "
             "A point counts only with 0 % folding on every pair. The front of a method joins its counted points "
             "that no other of its points beats on both axes. Seconds are wall time per pair on the 2-core "
             "machine shared with other jobs, one thread per registration (compare within a table only)."), "",
             "Methods: " + "; ".join(f"**{m}**: {e.description} (default {label(e.default) if e.default else 'none'})"
                                      for m, e in METHODS.items()) + ".", ""]
    for dataset, entry in DATASETS.items():
        path = RESULTS / f"front-{dataset}.json"
        if not path.exists():
            continue
        points, pair_ids = aggregate(json.loads(path.read_text()), entry.scores)
        if not points:
            continue
        png = RESULTS / f"front-{dataset}.png"
        truth = truth_sdlogj(dataset, pair_ids)
        plot(dataset, points, entry.scores, len(pair_ids), png, truth)
        comparisons = matched(points, entry.scores)
        summary[dataset] = {"pairs": pair_ids, "points": points, "matched": comparisons, "truth_sdlogj": truth}
        lines += [f"## {dataset}", "", f"Pairs: {', '.join(pair_ids)}."
                  + (f" SDlogJ of the true fields: {truth:.3f}." if truth is not None else ""), "",
                  f"![{dataset}](../benchmarks/results/{png.name})", "",
                  "| point | SDlogJ | folding % (max) | " + " | ".join(entry.scores) + " | seconds |",
                  "|---|---|---|" + "---|" * (len(entry.scores) + 1)]
        order = list(METHODS)
        for p in sorted(points, key=lambda p: (order.index(p["method"]) if p["method"] in order else 99, p["sdlogj"])):
            name = f"**{p['name']}** (default)" if p["default"] else p["name"]
            lines.append(f"| {name} | {_number(p['sdlogj'])} | {_number(p['folding_max'])} | "
                         + " | ".join(_number(p[s]) for s in entry.scores) + f" | {_number(p['seconds'], 1)} |")
        if comparisons:
            methods = list(comparisons[0][entry.scores[0]])
            lines += ["", ("The best each method reaches at no more than the SDlogJ of a peer's default (blank: no "
                           "point of it is that smooth):"), "",
                      "| at the SDlogJ of | SDlogJ | " + " | ".join(f"{s} {m}" for s in entry.scores for m in methods) + " |",
                      "|---|---|" + "---|" * (len(methods) * len(entry.scores))]
            for row in comparisons:
                lines.append(f"| {row['at']} default | {_number(row['sdlogj'])} | "
                             + " | ".join(_number(row[s][m]) for s in entry.scores for m in methods) + " |")
        lines.append("")
    lines += ["## Commands", "", "```"] + (command_log or ["python benchmarks/front.py"]) + ["```", ""]
    notes = ROOT / "benchmarks" / "front_notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    (RESULTS / "front-summary.json").write_text(json.dumps(summary, indent=1))
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT}")


COMMANDS = RESULTS / "front-commands.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-pairs", type=int, default=None, help="only the first N pairs of each data set (default: the pairs its fronts use: "
                             + ", ".join(f"{name} {spec.front_pairs}" for name, spec in DATASETS.items()
                                         if spec.front_pairs) + ", all of the others)")
    parser.add_argument("--lambdas", nargs="+", type=float, default=None, help="λ values of the dipreg methods")
    parser.add_argument("--defaults-only", action="store_true", help="only each method's default point")
    parser.add_argument("--settings", nargs="+", default=None,
                        help='only the settings with these labels, e.g. "bending=8" "regularization=2"')
    parser.add_argument("--threads", type=int, default=1, help="threads per registration (default: %(default)s)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = COMMANDS.read_text().splitlines() if COMMANDS.exists() else []
    if not args.report_only:
        WORK.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/front.py " + " ".join(sys.argv[1:])
        if command not in log:
            COMMANDS.write_text("\n".join(log + [command]) + "\n")
            log.append(command)
        for dataset in args.datasets:
            run_dataset(dataset, args.methods, args.max_pairs, args.lambdas, args.threads, args.defaults_only,
                        args.settings)
    write_report(log)


if __name__ == "__main__":
    main()
