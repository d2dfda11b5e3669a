"""The fault catalogue: every broken input, option or output location ends a real
``python -m dipreg`` process with one line naming the file or option, a non-zero exit code,
no traceback and nothing left behind; interrupts and written outputs behave as documented."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from dipreg.errors import DipregError
from dipreg.options import RegistrationConfig, make_config

SRC = Path(__file__).resolve().parents[1] / "src"
#: Children import this checkout's dipreg, one thread each.
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
QUICK = ["--iterations", "2", "--affine-iterations", "2", "--threads", "1", "--quiet"]


def dipreg(*argv: object, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m dipreg ARGV`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "dipreg", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kwargs)


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def write_nifti(array: np.ndarray, path: Path) -> Path:
    """A NIfTI file written by nibabel, which stores NaN/Inf and any dimension as given."""
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, brain_slice: sitk.Image) -> dict[str, Path]:
    """Every input of the catalogue, written once: a good 64x64 slice and its broken variants."""
    root = tmp_path_factory.mktemp("catalogue")
    array = sitk.GetArrayFromImage(brain_slice)
    good = write(brain_slice, root / "good.nii.gz")
    paths = {"good": good}
    compressed = good.read_bytes()
    (root / "truncated.nii.gz").write_bytes(compressed[: len(compressed) // 2])
    paths["truncated.nii.gz"] = root / "truncated.nii.gz"
    (root / "text.nii.gz").write_text("this is a text file, not an image\n")
    paths["text.nii.gz"] = root / "text.nii.gz"
    paths["four_d.nii.gz"] = write_nifti(np.random.default_rng(0).random((6, 6, 6, 3)).astype(np.float32),
                                         root / "four_d.nii.gz")
    paths["one_d.nii.gz"] = write_nifti(np.arange(10, dtype=np.float32), root / "one_d.nii.gz")
    for bad in ("nan", "inf"):
        values = array.copy()
        values[30, 30] = np.nan if bad == "nan" else np.inf
        paths[f"{bad}.nii.gz"] = write_nifti(values.T[..., None], root / f"{bad}.nii.gz")
        for suffix in ("nrrd", "mha"):
            paths[f"{bad}.{suffix}"] = write(sitk.GetImageFromArray(values), root / f"{bad}.{suffix}")
    paths["constant.nii.gz"] = write(sitk.GetImageFromArray(np.full((16, 16), 7.0, np.float32)),
                                     root / "constant.nii.gz")
    paths["volume.nii.gz"] = write(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9, 10))
                                                          .astype(np.float32)), root / "volume.nii.gz")
    far = sitk.Image(brain_slice)
    far.SetOrigin((1000.0, 0.0))
    paths["far.nii.gz"] = write(far, root / "far.nii.gz")
    coarse = sitk.Image(brain_slice)
    coarse.SetSpacing(tuple(100 * s for s in brain_slice.GetSpacing()))  # 400 mm for the 4 mm slice
    paths["coarse.nii.gz"] = write(coarse, root / "coarse.nii.gz")
    paths["rgb.tif"] = write(sitk.Compose([sitk.Cast(brain_slice, sitk.sitkUInt8)] * 3), root / "rgb.tif")
    paths["complex.nii.gz"] = write_nifti((array + 1j * array).T.astype(np.complex64)[..., None],
                                          root / "complex.nii.gz")
    # A header of 4096^3 voxels with almost no data: refused before any voxel is read.
    header = nibabel.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.uint8)
    with open(root / "huge.nii", "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 4)
    paths["huge.nii"] = root / "huge.nii"
    (root / "regular_file").write_text("not a directory")
    paths["regular_file"] = root / "regular_file"
    return paths


#: name -> (fixed, moving, extra arguments, file the message names, phrase it contains).
INPUT_CASES = {
    "missing": ("good", "nothere.nii.gz", [], "nothere.nii.gz", "file not found"),
    "truncated .nii.gz": ("good", "truncated.nii.gz", [], "truncated.nii.gz", "file is truncated or damaged"),
    "text renamed .nii.gz": ("text.nii.gz", "good", [], "text.nii.gz", "cannot read image"),
    "4D": ("good", "four_d.nii.gz", [], "four_d.nii.gz", "4D images are not supported"),
    "1D": ("one_d.nii.gz", "good", [], "one_d.nii.gz", "1D images are not supported"),
    **{f"{bad} in .{suffix}": ("good", f"{bad}.{suffix}", [], f"{bad}.{suffix}", "NaN or Inf voxels")
       for bad in ("nan", "inf") for suffix in ("nii.gz", "nrrd", "mha")},
    "constant": ("good", "constant.nii.gz", [], "constant.nii.gz", "image is constant"),
    "2D vs 3D": ("good", "volume.nii.gz", [], "volume.nii.gz", "moving image is 3D but fixed image"),
    "no overlap": ("good", "far.nii.gz", [], "far.nii.gz", "does not overlap"),
    "100x spacing mismatch": ("good", "coarse.nii.gz", [], "coarse.nii.gz",
                              "spans only 0.63 moving voxels along one axis (at least 4 needed; a wrong spacing?); "
                              "moving: spacing 400x400 mm"),
    "multi-channel without --channel": ("rgb.tif", "rgb.tif", [], "rgb.tif", "3 channels; choose one with --channel"),
    "channel out of range": ("rgb.tif", "rgb.tif", ["--channel", "5"], "rgb.tif", "--channel 5 out of range 0..2"),
    "complex": ("complex.nii.gz", "good", [], "complex.nii.gz", "complex pixel type"),
    "4096^3 header": ("huge.nii", "good", [], "huge.nii", "a 4096x4096x4096 image with these options needs about"),
}


def assert_one_line_failure(completed: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit code 1, no traceback, and exactly one line on stderr containing every phrase."""
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("dipreg: error: ")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def run_and_wait(argv: list[str]) -> tuple[int, str, float]:
    """Run ``python -m dipreg`` and return (exit code, stderr, the child's own peak RSS in MB)."""
    with open(os.devnull, "w") as devnull, subprocess.Popen(
            [sys.executable, "-m", "dipreg", *argv], stdout=devnull, stderr=subprocess.PIPE, text=True, env=ENV) as child:
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, stderr, usage.ru_maxrss / 1024


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_bad_input_stops_with_one_line_and_no_output(case: str, files: dict[str, Path], tmp_path: Path) -> None:
    fixed, moving, extra, named, phrase = INPUT_CASES[case]
    argv = [str(files.get(fixed, files["good"].parent / fixed)), str(files.get(moving, files["good"].parent / moving))]
    outdir = tmp_path / "out"
    code, stderr, peak_mb = run_and_wait(["register", *argv, "-o", str(outdir), *extra, *QUICK])
    assert_one_line_failure(subprocess.CompletedProcess(argv, code, "", stderr), named, phrase)
    assert list(tmp_path.iterdir()) == []  # no output and no staging directory
    if case == "4096^3 header":
        assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB: voxels were loaded"  # the volume alone is 64 GB


def _invalid_values() -> list[tuple[str, str]]:
    """(option, value) just outside each option's allowed values, from the options' own table."""
    cases = []
    for f in dataclasses.fields(RegistrationConfig):
        allowed = f.metadata.get("allowed")
        if allowed is None:
            continue
        if allowed.low is not None:
            below = allowed.low if allowed.low_open else allowed.low - 1
            cases.append((f.name, below))
        if allowed.high is not None:
            cases.append((f.name, allowed.high + 0.5))
        if allowed.odd:
            cases.append((f.name, allowed.low + 1))
    return [(name, f"{value:g}") for name, value in cases]


INVALID_VALUES = _invalid_values()


@pytest.mark.parametrize(("option", "value"), INVALID_VALUES, ids=[f"{o}={v}" for o, v in INVALID_VALUES])
def test_invalid_option_value_names_option_value_and_range(option: str, value: str, files: dict[str, Path],
                                                           tmp_path: Path) -> None:
    allowed = next(f.metadata["allowed"] for f in dataclasses.fields(RegistrationConfig) if f.name == option)
    flag = f"--{option.replace('_', '-')}"
    completed = dipreg("register", files["good"], files["good"], "-o", tmp_path / "out", *QUICK, flag, value)
    assert_one_line_failure(completed, f"option {option}=", flag, f"must be {allowed}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("integration_steps", -3, ">= 1"), ("pyramid_levels", 0, ">= 1"), ("affine_iterations", -3, ">= 1"),
    ("max_loss_voxels", 5, "0 or >= 256"), ("lncc_window", 8, "odd and >= 3"), ("learning_rate", 0.0, "> 0"),
    ("regularization", -1.0, ">= 0"), ("field_resolution", float("nan"), "in (0, 1]"), ("iterations", 2.5, "of type int"),
])
def test_values_that_break_the_method_are_refused_by_name(option: str, value: object, allowed: str) -> None:
    """The values once accepted though they break the method (in-process: the same table as the CLI)."""
    with pytest.raises(DipregError) as info:
        make_config(**{option: value})
    assert str(info.value) == f"option {option}={value!r} (--{option.replace('_', '-')}): must be {allowed}"


@pytest.mark.parametrize("where", ["under a regular file", "is a regular file", "read-only file system",
                                   "read-only directory"])
def test_unusable_output_is_refused_before_registering(where: str, files: dict[str, Path], tmp_path: Path) -> None:
    if where == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only (0555) directory; /proc covers what root cannot write")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        outdir, phrase = locked / "out", "is not writable"
    else:
        outdir, phrase = {
            "under a regular file": (files["regular_file"] / "sub", "regular_file is a file, not a directory"),
            "is a regular file": (files["regular_file"], "output exists and is not a directory"),
            "read-only file system": (Path("/proc/dipreg-test/out"), "is not writable"),
        }[where]
    start = time.perf_counter()
    completed = dipreg("register", files["good"], files["good"], "-o", outdir, "--iterations", "100000", "--quiet")
    assert_one_line_failure(completed, str(outdir), phrase)
    assert time.perf_counter() - start < 60  # refused before 100000 iterations ran
    assert files["regular_file"].read_text() == "not a directory"


def test_help_version_and_file_errors_do_not_import_torch(files: dict[str, Path], tmp_path: Path) -> None:
    script = ("import sys\nfrom dipreg.cli import main\n"
              "for argv in (['--help'], ['register', '--help'], ['evaluate', '--help'], ['--version'],"
              f" ['register', {str(tmp_path / 'nothere.nii')!r}, {str(files['good'])!r}, '-o', 'x'],"
              f" ['register', {str(files['good'])!r}, {str(files['good'])!r}, '-o', 'x', '--lncc-window', '4']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert completed.stdout.strip().endswith("torch not imported"), completed.stdout[-300:] + completed.stderr
    assert "nothere.nii: file not found" in completed.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_prints_one_line_and_leaves_nothing(signum: int, code: int, files: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """A signal sent while the optimisation runs (its progress bar is showing) ends the process."""
    outdir = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "dipreg", "register", str(files["good"]), str(files["good"]),
                              "-o", str(outdir), "--iterations", "100000", "--threads", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                             # Python turns SIGINT into KeyboardInterrupt unless it starts with SIGINT ignored
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = bytearray()
    started = threading.Event()

    def read() -> None:
        while chunk := child.stderr.read1(4096):
            stderr.extend(chunk)
            if b"deformable" in stderr or b"affine" in stderr:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "the registration did not start: " + stderr.decode(errors="replace")
        child.send_signal(signum)
        assert child.wait(60) == code
    finally:
        child.kill()
    reader.join(10)
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text
    assert text.replace("\r", "\n").strip().splitlines()[-1].strip() == "dipreg: interrupted; nothing written"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def written(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Output of a short successful registration run under a umask other than the usual 022
    (so that following it is seen), and the umask."""
    umask = 0o027
    outdir = tmp_path_factory.mktemp("written") / "new" / "out"
    completed = dipreg("register", files["good"], files["good"], "-o", outdir, *QUICK, preexec_fn=lambda: os.umask(umask))
    assert completed.returncode == 0, completed.stderr
    return outdir, umask


def test_written_output_follows_the_umask(written: tuple[Path, int]) -> None:
    outdir, umask = written
    for directory in (outdir, outdir.parent):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask, directory
    for path in outdir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert [p.name for p in outdir.parent.iterdir()] == ["out"]  # the staging directory is gone


def test_metrics_split_the_loss_by_stage_and_give_the_before_block(written: tuple[Path, int]) -> None:
    metrics = json.loads((written[0] / "metrics.json").read_text())
    stages = metrics["loss_stages"]
    assert stages[0]["stage"] == "affine" and all(s["stage"].startswith("deformable ") for s in stages[1:])
    assert [v for s in stages for v in s["losses"]] == metrics["loss_history"]
    assert sum(len(s["losses"]) for s in stages[1:]) == metrics["iterations"] == 2
    # fixed = moving: before any registration both images are identical
    assert metrics["before"]["identity"] == {"ssim": pytest.approx(1.0), "ncc": pytest.approx(1.0)}
    assert set(metrics["before"]["affine"]) == {"ssim", "ncc"}


def test_displacement_is_written_as_float32(written: tuple[Path, int]) -> None:
    field = sitk.ReadImage(str(written[0] / "displacement.nii.gz"))
    assert field.GetPixelID() == sitk.sitkVectorFloat32
