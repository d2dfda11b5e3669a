"""ANTsPy SyN as one whole process: the baseline timed by ``benchmarks/speed.py``.

    python benchmarks/ants_syn.py FIXED MOVING OUTDIR

Reads the pair, runs ``ants.registration(type_of_transform="SyN")`` with its defaults and
writes the ANTs transforms (``syn_*``), ``warped.nii.gz``, ``displacement.nii.gz`` (the
forward transforms composed by antsApplyTransforms into one displacement field on the fixed
grid, the file ``dipreg register`` writes too) and ``timing.json`` (seconds of
``ants.registration`` alone). It imports ANTsPy only, not dipreg (torch), so its start-up is
ANTs' own; ``dipreg.baselines.ants_registration`` is the in-process equivalent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ants


def main(fixed_path: str, moving_path: str, outdir: str) -> None:
    """Register MOVING onto FIXED with SyN and write the outputs to OUTDIR."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    start = time.perf_counter()
    outcome = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(out / "syn_"))
    seconds = time.perf_counter() - start
    composed = ants.apply_transforms(fixed, moving, outcome["fwdtransforms"], compose=str(out / "composed_"))
    os.replace(composed, out / "displacement.nii.gz")
    ants.image_write(outcome["warpedmovout"], str(out / "warped.nii.gz"))
    (out / "timing.json").write_text(json.dumps({"seconds": seconds, "antspyx": ants.__version__}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
