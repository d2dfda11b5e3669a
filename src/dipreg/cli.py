"""The ``dipreg`` command line: register, apply, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
from importlib import resources
from pathlib import Path

import SimpleITK as sitk

from dipreg import __version__
from dipreg.errors import DipregError
from dipreg.evaluation import EVALUATION_COMMANDS, add_evaluation_commands, run_evaluation_command
from dipreg.images import read_image, read_image_information, read_labels, resample_to_reference, write_image
from dipreg.options import PRESETS, RegistrationConfig, make_config
from dipreg.outputs import FIELD_DTYPES, check_output_directory

SUMMARY_KEYS = ("ssim", "ncc", "folding_percent", "sdlogj", "jacobian_mean", "iterations", "seconds")

#: Commands that write their output only once complete (an interrupt leaves nothing behind).
WRITE_WHEN_DONE = ("register", "demo", "apply")


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
                              "displacement.nii.gz (ITK displacement field, mm), jacobian.nii.gz (det J), qc.png, metrics.json.")
    reg.add_argument("fixed", type=Path, help="fixed (target) image; defines the output grid")
    reg.add_argument("moving", type=Path, help="moving image, resampled into the fixed image's physical space")
    reg.add_argument("--initial-transform", type=Path, default=None, metavar="FILE",
                     help="ITK transform file (.tfm/.txt/.mat/.h5) mapping fixed-space points to moving-space points, "
                     "applied before the affine stage, e.g. from another tool when the images' headers disagree "
                     "(default: none); the written displacement field includes it")
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
                       help="label map: nearest-neighbour interpolation, pixel type kept (default: off, linear)")
    apply.add_argument("--channel", type=int, default=None,
                       help="channel of a multi-channel image (default: none; the image must have one channel)")
    add_evaluation_commands(commands)
    return parser


def _run_registration(fixed, moving, args: argparse.Namespace) -> int:
    # Everything that can be checked from options, headers and the file system, before
    # PyTorch is imported and any voxel is read.
    make_config(args.preset, **registration_options(args))
    for path in (fixed, moving):
        read_image_information(path, args.channel)
    check_output_directory(args.output)
    from dipreg.registration import register

    result = register(fixed, moving, args.preset, channel=args.channel, progress=not args.quiet,
                      initial_transform=getattr(args, "initial_transform", None), **registration_options(args))
    result.save(args.output, args.field_dtype)
    if not args.quiet:
        print(json.dumps({k: result.metrics[k] for k in SUMMARY_KEYS}, indent=2))
        print(f"wrote {', '.join(sorted(p.name for p in args.output.iterdir()))} to {args.output}")
    return 0


def _run_apply(args: argparse.Namespace) -> int:
    from dipreg.transforms import displacement_transform

    check_output_directory(args.output.parent)
    field = read_displacement(args.displacement)
    image = read_labels(args.image) if args.labels else read_image(args.image, args.channel)
    reference = read_image(args.reference) if args.reference else field
    for path, other in ((args.image, image), (args.reference, reference)):
        if other.GetDimension() != field.GetDimension():
            raise DipregError(f"{path}: image is {other.GetDimension()}D but displacement field "
                              f"{args.displacement} is {field.GetDimension()}D")
    warped = resample_to_reference(image, reference, displacement_transform(field), labels=args.labels)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.output.parent) as staging:
        staged = Path(staging) / args.output.name
        write_image(warped, staged)
        staged.replace(args.output)
    return 0


def read_displacement(path: Path) -> sitk.Image:
    """Read an ITK displacement field, with a clear error if the file is not one."""
    if not path.exists():
        raise DipregError(f"{path}: file not found")
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError:
        raise DipregError(f"{path}: cannot read displacement field") from None
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise DipregError(f"{path}: not a displacement field ({field.GetNumberOfComponentsPerPixel()} components "
                          f"in a {field.GetDimension()}D image)")
    return field


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
