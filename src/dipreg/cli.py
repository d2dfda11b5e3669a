"""The ``dipreg`` command line: register, apply, invert, transform-points, demo, evaluate, compare."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
from importlib import resources
from pathlib import Path


from dipreg import __version__
from dipreg.errors import DipregError
from dipreg.options import INTERPOLATORS, METHODS, PRESETS, RegistrationConfig, make_config
from dipreg.outputs import FIELD_DTYPES, check_output_directory

SUMMARY_KEYS = ("ssim", "ncc", "folding_percent", "sdlogj", "jacobian_mean", "iterations", "seconds")

#: Commands that write their output only once complete (an interrupt leaves nothing behind).
WRITE_WHEN_DONE = ("register", "demo", "apply", "invert", "transform-points")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_registration_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset`` and one flag per :class:`RegistrationConfig` field."""
    parser.add_argument("--preset", default="default", choices=list(PRESETS),
                        help="named option set; explicit options override it (default: %(default)s). "
                        + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the defaults below'}"
                                    for name, values in PRESETS.items()))
    group = parser.add_argument_group("registration options (defaults are those of --preset default)")
    for f in dataclasses.fields(RegistrationConfig):
        kind = _parse_bool if f.type in (bool, "bool") else type(f.default)
        allowed = f.metadata.get("allowed")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                           choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper(),
                           help=f"{f.metadata['help']}{f'; allowed: {allowed}' if allowed else ''} (default: {f.default})")


def registration_options(args: argparse.Namespace) -> dict:
    """The registration options given on the command line (unset ones are omitted)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RegistrationConfig)
            if getattr(args, f.name) is not None}


def _add_io_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (created; files in it are replaced)")
    parser.add_argument("--channel", type=int, default=None,
                        help="channel of multi-channel images (e.g. 1 = FLAIR in the TCGA-LGG TIFFs) "
                        "(default: none; multi-channel images then stop with an error)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary (default: off)")
    parser.add_argument("--field-dtype", choices=list(FIELD_DTYPES), default="float32",
                        help="pixel type of displacement.nii.gz; float32 rounds by at most 6e-8 of each component "
                        "(6e-6 mm at 100 mm) (default: %(default)s)")
    add_registration_options(parser)


#: Subcommands added by :func:`add_evaluation_commands`.
EVALUATION_COMMANDS = ("evaluate", "batch", "compare")


#: Exit status of ``dipreg evaluate`` and ``dipreg batch`` when some pairs failed.
EXIT_SOME_FAILED = 3


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``dipreg evaluate`` and ``dipreg batch``."""
    parser.add_argument("pairs", type=Path, help="PAIRS.csv")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output folder (created; a rerun skips the pairs already done there)")
    add_registration_options(parser)
    parser.set_defaults(preset=None)
    parser.add_argument("--channel", type=int, default=None,
                        help="channel of multi-channel images unless the CSV gives fixed_channel/moving_channel "
                        "(e.g. 1 = FLAIR in the TCGA-LGG TIFFs) (default: none)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1,
                       help="pairs at once: 1 runs them in this process; more starts a local Dask cluster of that "
                       "many worker processes, each with cores/N threads (needs dipreg[batch]) (default: %(default)s)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the pairs on a running Dask cluster, e.g. tcp://host:8786; its workers must see "
                       "the same paths (default: none)")
    parser.add_argument("--force", action="store_true",
                        help="recompute every pair, also those already done with the same options (default: off)")
    parser.add_argument("--label-interpolation", choices=list(INTERPOLATORS), default="label",
                        help="how moving labels are warped for Dice: label (label-linear, ANTs' genericLabel), "
                        "nearest or linear (default: %(default)s)")
    parser.add_argument("--mask-similarity", action="store_true",
                        help="also use the fixed_mask/moving_mask columns as the similarity's masks of dip and classic "
                        "(non-zero = compared), not only for scoring (default: off)")
    parser.add_argument("--quiet", action="store_true", help="print nothing (default: off)")


def add_evaluation_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dipreg evaluate``, ``dipreg batch`` and ``dipreg compare`` to the ``dipreg`` command's subparsers."""
    outputs = ("Writes OUTPUT/pairs/<id>/ (the files of dipreg register), and after every pair OUTPUT/ledger.jsonl, "
               "OUTPUT/results.csv, OUTPUT/failures.csv and OUTPUT/summary.json. A rerun skips the pairs already done "
               "with the same options and inputs. Exit status 0 if every pair succeeded, 3 if some failed.")
    columns = ("PAIRS.csv has columns fixed,moving; optional fixed_labels,moving_labels, fixed_mask,moving_mask, "
               "fixed_channel,moving_channel, true_displacement, initial_transform, fixed_landmarks,moving_landmarks, "
               "id; paths relative to the CSV.")
    evaluate_parser = subparsers.add_parser(
        "evaluate", conflict_handler="resolve",
        help="run one method on every pair of a PAIRS.csv; write per-pair outputs, results.csv, summary.json",
        description=f"Run METHOD on every pair of PAIRS.csv and print mean ± std per metric. {columns} {outputs} "
        "--preset defaults to the method's own (default for dip, classic for classic); registration options apply "
        "to dip and classic only.")
    _add_batch_options(evaluate_parser)
    evaluate_parser.add_argument("--method", choices=METHODS, default="dip",
                                 help="dip (dipreg), classic (free field, Eq. 1), itk (SimpleITK affine + displacement "
                                 "field), ants (ANTsPy SyN, needs dipreg[ants]), identity (no registration) "
                                 "(default: %(default)s)")
    batch_parser = subparsers.add_parser(
        "batch", conflict_handler="resolve",
        help="register every pair of a PAIRS.csv, resumably, in parallel or on a Dask cluster",
        description=f"Register every pair of PAIRS.csv with dipreg, scoring what the CSV provides. {columns} {outputs}")
    _add_batch_options(batch_parser)

    compare_parser = subparsers.add_parser(
        "compare", help="compare evaluate outputs: box plots, paired table, index.html",
        description="Compare the outputs of dipreg evaluate for several methods on the same pairs: box plots per "
        "metric, a paired table (per-pair differences, wins/losses against the first folder) and REPORT/index.html "
        "with the QC figures of the best, median and worst pairs.")
    compare_parser.add_argument("outdirs", nargs="+", type=Path, help="output folders of dipreg evaluate; the first is the reference")
    compare_parser.add_argument("-o", "--output", required=True, type=Path, help="report folder (created)")


def run_evaluation_command(args: argparse.Namespace) -> int:
    """Run ``dipreg evaluate``, ``batch`` or ``compare`` from parsed arguments; returns the exit status."""
    if args.command in ("evaluate", "batch"):
        from dipreg.evaluation import evaluate

        options = registration_options(args)
        options.pop("method", None)
        summary = evaluate(args.pairs, args.output, args.method or "dip", args.preset, args.channel,
                           args.workers, args.quiet, args.scheduler, args.force,
                           label_interpolation=args.label_interpolation, mask_similarity=args.mask_similarity,
                           **options)
        return EXIT_SOME_FAILED if summary["n_failed"] else 0
    from dipreg.comparison import compare

    index = compare(args.outdirs, args.output)
    print(f"wrote {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dipreg`` command."""
    parser = argparse.ArgumentParser(
        prog="dipreg",
        description="Deformable registration with a deep image prior: no training data, one optimisation per pair. "
        "Images may be NIfTI, NRRD, MHA/MHD, a DICOM series directory, PNG/JPEG/TIFF. "
        "Displacement fields are ITK displacement fields (mm, physical LPS axes) usable by SimpleITK and ANTs.",
    )
    parser.add_argument("--version", action="version", version=f"dipreg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register MOVING onto FIXED and write warped image, field, Jacobian, QC, metrics",
                              description="Register MOVING onto FIXED. Writes to OUTPUT: warped.nii.gz (moving on the fixed grid), "
                              "displacement.nii.gz (ITK displacement field, mm), jacobian.nii.gz (det J), qc.png, report.html, metrics.json.")
    reg.add_argument("fixed", type=Path, help="fixed (target) image; defines the output grid")
    reg.add_argument("moving", type=Path, help="moving image, resampled into the fixed image's physical space")
    reg.add_argument("--initial-transform", type=Path, default=None, metavar="FILE",
                     help="ITK transform file (.tfm/.txt/.mat/.h5) mapping fixed-space points to moving-space points, "
                     "applied before the affine stage, e.g. from another tool when the images' headers disagree "
                     "(default: none); the written displacement field includes it")
    reg.add_argument("--fixed-mask", type=Path, default=None, metavar="FILE",
                     help="where the similarity is computed in the fixed image (any readable image, non-zero = inside, "
                     "resampled onto the fixed grid in physical space), in every stage and level (default: everywhere)")
    reg.add_argument("--moving-mask", type=Path, default=None, metavar="FILE",
                     help="the same for the moving image; it moves with the moving image, e.g. to leave out a lesion "
                     "(default: everywhere)")
    reg.add_argument("--moving-labels", type=Path, default=None, metavar="FILE",
                     help="label map of the moving image, warped onto the fixed grid as warped_labels.nii.gz (default: none)")
    reg.add_argument("--fixed-labels", type=Path, default=None, metavar="FILE",
                     help="label map of the fixed image: with --moving-labels, Dice per label and the mean go into "
                     "metrics.json (default: none)")
    reg.add_argument("--label-interpolation", choices=list(INTERPOLATORS), default="label",
                     help="how --moving-labels is warped: label (label-linear, ANTs' genericLabel), nearest or linear "
                     "(default: %(default)s)")
    reg.add_argument("--fixed-landmarks", type=Path, default=None, metavar="FILE",
                     help="points in the fixed image: CSV x,y[,z] in LPS mm (header optional) or 3D Slicer .fcsv/.mrk.json "
                     "(RAS, converted) (default: none)")
    reg.add_argument("--moving-landmarks", type=Path, default=None, metavar="FILE",
                     help="the corresponding points in the moving image, same order: target registration error before and "
                     "after in metrics.json, per point in landmarks.csv (default: none)")
    _add_io_options(reg)

    demo = commands.add_parser("demo", help="register the bundled pair of 2D brain slices (ANTs r64 onto r16)")
    _add_io_options(demo)

    apply = commands.add_parser("apply", help="warp an image with a saved displacement field",
                                description="Warp IMAGE with DISPLACEMENT (as written by register) onto the reference grid.")
    apply.add_argument("displacement", type=Path, help="displacement.nii.gz from dipreg register")
    apply.add_argument("image", type=Path, help="image of the moving subject to warp")
    apply.add_argument("-o", "--output", required=True, type=Path, help="output image file (e.g. warped_labels.nii.gz)")
    apply.add_argument("--reference", type=Path, default=None, help="grid of the output (default: the displacement field's grid)")
    apply.add_argument("--labels", action="store_true",
                       help="IMAGE is a label map: pixel type kept, label-linear interpolation unless --interpolation "
                       "says otherwise (default: off)")
    apply.add_argument("--interpolation", choices=list(INTERPOLATORS), default=None,
                       help="linear, nearest or label (label-linear: per-label linear weights, most likely label) "
                       "(default: label with --labels, else linear)")
    apply.add_argument("--channel", type=int, default=None,
                       help="channel of a multi-channel image (default: none; the image must have one channel)")
    invert = commands.add_parser(
        "invert", help="invert a displacement field (fixed-point iteration) and print the residual",
        description="Invert DISPLACEMENT (an ITK displacement field, p -> p + u(p)) by fixed-point iteration "
        "w(q) = -u(q + w(q)). The inverse maps the other image's points back; for dipreg register's output "
        "inverse_displacement.nii.gz already holds the exact inverse.")
    invert.add_argument("displacement", type=Path, help="ITK displacement field (.nii.gz, .nrrd, .mha)")
    invert.add_argument("-o", "--output", required=True, type=Path, help="inverse field file")
    invert.add_argument("--reference", type=Path, default=None,
                        help="grid of the inverse, usually the moving image (default: the field's own grid)")

    points = commands.add_parser(
        "transform-points", help="map points through a saved displacement field",
        description="Map POINTS through DISPLACEMENT: each point p becomes p + u(p) (ITK TransformPoint of the "
        "displacement transform). displacement.nii.gz of dipreg register maps fixed-image points to where they "
        "lie in the moving image; inverse_displacement.nii.gz maps moving-image points to the fixed image.")
    points.add_argument("displacement", type=Path, help="ITK displacement field")
    points.add_argument("points", type=Path, help="CSV x,y[,z] in LPS mm (header optional), or 3D Slicer .fcsv/.mrk.json")
    points.add_argument("-o", "--output", required=True, type=Path, help="output CSV (x,y[,z], LPS mm)")
    add_evaluation_commands(commands)
    return parser


def _run_registration(fixed, moving, args: argparse.Namespace) -> int:
    moving_labels, fixed_labels_path = getattr(args, "moving_labels", None), getattr(args, "fixed_labels", None)
    if fixed_labels_path and not moving_labels:
        raise DipregError("--fixed-labels needs --moving-labels")
    landmark_paths = (getattr(args, "fixed_landmarks", None), getattr(args, "moving_landmarks", None))
    if any(landmark_paths) and not all(landmark_paths):
        raise DipregError("give both --fixed-landmarks and --moving-landmarks, or neither")
    from dipreg.images import label_map_on, read_image_information, read_labels
    from dipreg.landmarks import read_landmarks

    # Everything that can be checked from options, headers and the file system, before
    # PyTorch is imported and any voxel is read.
    make_config(args.preset, **registration_options(args))
    for path in (fixed, moving):
        read_image_information(path, args.channel)
    labels = read_labels(moving_labels) if moving_labels else None
    check_output_directory(args.output)
    from dipreg.registration import register

    result = register(fixed, moving, args.preset, channel=args.channel, progress=not args.quiet,
                      initial_transform=getattr(args, "initial_transform", None),
                      fixed_mask=getattr(args, "fixed_mask", None), moving_mask=getattr(args, "moving_mask", None),
                      **registration_options(args))
    if labels is not None:
        fixed_labels = label_map_on(fixed_labels_path, result.fixed)[0] if fixed_labels_path else None
        result.propagate_labels(labels, fixed_labels, args.label_interpolation)
    if all(landmark_paths):
        ndim = result.fixed.GetDimension()
        result.score_landmarks(*(read_landmarks(path, ndim) for path in landmark_paths))
    result.save(args.output, args.field_dtype)
    if not args.quiet:
        print(json.dumps({k: result.metrics[k] for k in SUMMARY_KEYS}, indent=2))
        print(f"wrote {', '.join(sorted(p.name for p in args.output.iterdir()))} to {args.output}")
    return 0


def _run_apply(args: argparse.Namespace) -> int:
    from dipreg.images import read_displacement, read_image, read_labels, resample_to_reference, write_image
    from dipreg.transforms import displacement_transform

    check_output_directory(args.output.parent)
    field = read_displacement(args.displacement)
    image = read_labels(args.image) if args.labels else read_image(args.image, args.channel)
    reference = read_image(args.reference) if args.reference else field
    for path, other in ((args.image, image), (args.reference, reference)):
        if other.GetDimension() != field.GetDimension():
            raise DipregError(f"{path}: image is {other.GetDimension()}D but displacement field "
                              f"{args.displacement} is {field.GetDimension()}D")
    interpolation = args.interpolation or ("label" if args.labels else "linear")
    warped = resample_to_reference(image, reference, displacement_transform(field), interpolation=interpolation)
    _write_atomically(args.output, lambda path: write_image(warped, path))
    return 0


def _write_atomically(output: Path, write) -> None:
    """``write(path)`` into a staging directory beside ``output``, then move the file into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as staging:
        staged = Path(staging) / output.name
        write(staged)
        staged.replace(output)


def _run_invert(args: argparse.Namespace) -> int:
    from dipreg.images import read_displacement, read_image, write_image
    from dipreg.transforms import Grid, invert_displacement

    check_output_directory(args.output.parent)
    field = read_displacement(args.displacement)
    reference = Grid.from_image(read_image(args.reference)) if args.reference else None
    if reference is not None and reference.ndim != field.GetDimension():
        raise DipregError(f"{args.reference}: image is {reference.ndim}D but displacement field "
                          f"{args.displacement} is {field.GetDimension()}D")
    inverse, residual = invert_displacement(field, tolerance=1e-3, reference=reference)
    _write_atomically(args.output, lambda path: write_image(inverse, path))
    print(f"inverse residual max |w(q) + u(q + w(q))| = {residual:.2e} mm; wrote {args.output}")
    return 0


def _run_transform_points(args: argparse.Namespace) -> int:
    from dipreg.images import read_displacement
    from dipreg.landmarks import read_landmarks, write_points
    from dipreg.transforms import displacement_transform

    check_output_directory(args.output.parent)
    field = read_displacement(args.displacement)
    points = read_landmarks(args.points, field.GetDimension())
    transform = displacement_transform(field)
    mapped = [transform.TransformPoint(point.tolist()) for point in points]
    _write_atomically(args.output, lambda path: write_points(mapped, path))
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that staging directories are removed on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dipreg`` console script.

    Returns 0 on success, 1 for a DipregError (one line on stderr), 2 for a usage error,
    130 on SIGINT (Ctrl-C) and 143 on SIGTERM; an interrupted command of :data:`WRITE_WHEN_DONE`
    leaves no output behind.
    """
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "register":
            return _run_registration(args.fixed, args.moving, args)
        if args.command == "demo":
            data = resources.files("dipreg") / "data"
            with resources.as_file(data / "r16slice.jpg") as fixed, resources.as_file(data / "r64slice.jpg") as moving:
                return _run_registration(fixed, moving, args)
        if args.command == "apply":
            return _run_apply(args)
        if args.command == "invert":
            return _run_invert(args)
        if args.command == "transform-points":
            return _run_transform_points(args)
        if args.command in EVALUATION_COMMANDS:
            return run_evaluation_command(args)
    except DipregError as exc:
        print(f"dipreg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        after_progress_bar = "" if getattr(args, "quiet", True) else "\n"
        outcome = "; nothing written" if args.command in WRITE_WHEN_DONE else " (finished pairs are kept)"
        print(f"{after_progress_bar}dipreg: interrupted{outcome}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 2


if __name__ == "__main__":
    sys.exit(main())
