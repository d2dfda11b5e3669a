"""Where results go: the output location checked before any work, staging directories that
follow the user's umask, and the pixel types a displacement field can be written in.

Torch-free, so that the command line can refuse an unusable output before PyTorch loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dipreg.errors import DipregError

#: ``--field-dtype``: pixel type of the written displacement field. float32 (what ANTs and ITK
#: tools write) rounds each component by at most 2^-24 of its magnitude: 6e-6 mm at 100 mm.
#: SimpleITK pixel types by attribute name, so that the command line does not import SimpleITK.
FIELD_DTYPES = {"float32": "sitkVectorFloat32", "float64": "sitkVectorFloat64"}


def current_umask() -> int:
    """The process's file mode creation mask (reading it means setting it and back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_staging_directory(outdir: Path) -> Path:
    """A new empty directory beside ``outdir`` (its parents created) with the mode a plain
    ``mkdir`` would give (0755 under the usual umask), not ``mkdtemp``'s 0700."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    staging.chmod(0o777 & ~current_umask())
    return staging


def check_output_directory(outdir: str | os.PathLike) -> None:
    """Refuse, before any work, an output directory that could not be created or written.

    Test-writes a staging directory (and a file in it) where :func:`make_staging_directory`
    will put one: in the nearest existing ancestor of ``outdir``, and in ``outdir`` itself
    when it exists; creates nothing that stays.

    Raises:
        DipregError: naming the output and what is in the way.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise DipregError(f"{outdir}: output exists and is not a directory")
    ancestor = outdir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DipregError(f"{outdir}: cannot create the output directory: {ancestor} is a file, not a directory")
    for place in (ancestor, outdir) if outdir.is_dir() else (ancestor,):
        try:
            probe = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=place))
            try:
                (probe / "probe").write_bytes(b"")
            finally:
                shutil.rmtree(probe, ignore_errors=True)
        except OSError as exc:
            raise DipregError(f"{outdir}: output location {place} is not writable ({exc.strerror})") from None
