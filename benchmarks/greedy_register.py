"""Greedy (picsl-greedy) as one whole process: the second reference timed by ``benchmarks/speed.py``.

    python benchmarks/greedy_register.py FIXED MOVING OUTDIR

Runs Greedy as its documentation shows for brain MRI, the command sequence of
``run_greedy`` in ``benchmarks/front.py`` at its default point (keep the two consistent):

1. affine: ``-a -m NCC 2x2[x2] -ia-image-centers``
2. deformable: ``-m NCC 2x2[x2] -it affine.mat -wp 0`` with Greedy's default smoothing
   (``-s 1.732vox 0.7071vox``, front.py's ``GREEDY_DEFAULT``) and iterations (``-n 100x100``)
3. reslice: the moving image onto the fixed grid (``warped.nii.gz``, in the moving image's pixel
   type: Greedy 1.4 truncates a JPEG's to uchar and ignores ``-rt``) and the deformable warp
   and the affine composed by Greedy itself (``-rc``, ``-wp 0``) into one ITK displacement field
   on the fixed grid, ``displacement.nii.gz``: the file ``dipreg register`` writes, in the same
   convention (the moving image sampled at ``x + u(x)``).

All stages get ``-d DIM -seed 1`` and ``-threads $OMP_NUM_THREADS`` where that is set (else
Greedy's own default, all cores). ``timing.json`` holds the seconds of stages 1 and 2 (the
registration alone, as ``ants_syn.py`` times ``ants.registration``) and the picsl-greedy version;
Greedy's log goes to ``greedy.log``. Greedy reads and writes the files itself; the script
imports neither dipreg nor torch, so its start-up is Greedy's own. The image dimension is read
from the NIfTI header with the standard library (SimpleITK is imported only for other formats).
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import importlib.metadata
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from picsl_greedy import Greedy2D, Greedy3D


def image_dimension(path: str) -> int:
    """Spatial dimension of an image: from the NIfTI-1/2 header, else SimpleITK's image information."""
    if path.endswith((".nii", ".nii.gz")):
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as handle:
            header = handle.read(80)
        for order in "<>":
            size = struct.unpack(order + "i", header[:4])[0]
            if size == 348:  # NIfTI-1: short dim[8] at byte 40
                dims = struct.unpack(order + "8h", header[40:56])
                break
            if size == 540:  # NIfTI-2: int64 dim[8] at byte 16
                dims = struct.unpack(order + "8q", header[16:80])
                break
        else:
            raise ValueError(f"{path}: not a NIfTI header")
        return dims[0]
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetDimension()


@contextlib.contextmanager
def output_to(log: IO[str]) -> Iterator[None]:
    """The process's stdout and stderr (file descriptors 1 and 2) written to ``log`` inside the block.

    Greedy prints most of its log with C++ streams straight to those descriptors; only some lines
    go through the Python API's ``out=`` / ``err=`` streams.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        libc.fflush(None)  # C stdio buffers, before the descriptors go back
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def main(fixed: str, moving: str, outdir: str) -> None:
    """Register MOVING onto FIXED with Greedy (affine, then deformable) and write the outputs to OUTDIR."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    dim = image_dimension(fixed)
    if dim not in (2, 3):
        raise SystemExit(f"{fixed}: a {dim}D image; Greedy registers 2D or 3D images")
    greedy = (Greedy2D if dim == 2 else Greedy3D)()
    radius = "x".join(["2"] * dim)
    threads = os.environ.get("OMP_NUM_THREADS")
    common = f"-d {dim} -seed 1" + (f" -threads {int(threads)}" if threads else "")
    affine, warp = out / "affine.mat", out / "warp.nii.gz"
    with open(out / "greedy.log", "w", buffering=1) as log, output_to(log):
        start = time.perf_counter()
        greedy.execute(f"{common} -a -m NCC {radius} -i {fixed} {moving} -o {affine} -ia-image-centers",
                       out=log, err=log)
        greedy.execute(f"{common} -m NCC {radius} -i {fixed} {moving} -it {affine} -o {warp} -wp 0",
                       out=log, err=log)
        seconds = time.perf_counter() - start
        greedy.execute(f"{common} -rf {fixed} -rm {moving} {out / 'warped.nii.gz'} "
                       f"-rc {out / 'displacement.nii.gz'} -wp 0 -r {warp} {affine}", out=log, err=log)
    (out / "timing.json").write_text(json.dumps({"seconds": seconds,
                                                 "picsl_greedy": importlib.metadata.version("picsl-greedy")}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
