"""Which start of the rigid/affine stage (``--init``) to use by default: a measurement.

For every pair and every ``--init`` (none, centers, moments, search) the affine stage alone
(``--transform affine``, defaults otherwise) registers the pair; reported are the seconds, NCC
and SSIM after it and, for 3D pairs, the Dice of the tissue classes:

* ``vxm3d`` onto ``oasis3d`` A: the subject whose axes are stored in another order (coronal
  slices along the first array axis instead of axial), the case that failed before without an
  ``--initial-transform``. The FreeSurfer aseg of vxm3d is mapped onto the two OASIS classes:
  1 = cortical grey matter (3, 42 and cerebellar cortex 8, 47), 2 = white matter and deep grey
  matter (2, 41, 7, 46, 10-13, 49-52, brainstem 16, ventral DC 28, 60, accumbens 26, 58,
  WM hypointensities 77, corpus callosum 251-255); everything else (ventricles, hippocampus,
  amygdala, CSF) is left out.
* ``oasis3d`` B onto A: an ordinary pair (the start must not make it worse).
* 2D: ANTs slices r64, r85, r27 onto r16, as they are and with the moving slice rotated by
  90° and 180° (array rotation, same header).

With ``--deformable`` instead, only the vxm3d pair is registered, with the full default
pipeline (``dipreg.register`` defaults, no initial transform): Dice and the QC figure.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/initialisation.py --threads 1
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/initialisation.py --threads 1 --deformable

Writes ``benchmarks/results/initialisation.json`` (``--deformable``:
``initialisation-vxm3d.json`` and ``initialisation-vxm3d-qc.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import dipreg
from dipreg.images import label_map_on
from dipreg.initialisation import INITIALISATIONS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

#: FreeSurfer aseg labels of each OASIS tissue class (see the module documentation).
ASEG_TO_OASIS = {1: (3, 42, 8, 47),
                 2: (2, 41, 7, 46, 10, 11, 12, 13, 49, 50, 51, 52, 16, 28, 60, 26, 58, 77, 251, 252, 253, 254, 255)}


def aseg_as_tissue_classes(aseg: sitk.Image) -> sitk.Image:
    """The aseg label map with its labels replaced by the OASIS tissue classes (0 elsewhere)."""
    array = sitk.GetArrayFromImage(aseg)
    classes = np.zeros(array.shape, np.int32)
    for tissue, labels in ASEG_TO_OASIS.items():
        classes[np.isin(array, labels)] = tissue
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(aseg)
    return image


def rotated(image: sitk.Image, quarter_turns: int) -> sitk.Image:
    """A 2D image with its array turned by ``quarter_turns`` x 90°, the header kept."""
    turned = sitk.GetImageFromArray(np.rot90(sitk.GetArrayFromImage(image), quarter_turns).copy())
    turned.CopyInformation(image)
    return turned


def cases(only: str | None) -> list[dict]:
    """The pairs: name, fixed, moving and (3D) the label maps on each image's grid."""
    found = []
    oasis_a = sitk.ReadImage(str(DATA / "oasis3d" / "image_A_160x192x144.nii.gz"), sitk.sitkFloat32)
    oasis_a_seg = label_map_on(DATA / "oasis3d" / "image_A_160x192x144_seg.nii.gz", oasis_a)[0]
    vxm = sitk.ReadImage(str(DATA / "vxm3d" / "test_scan_vol.nii.gz"), sitk.sitkFloat32)
    vxm_seg = aseg_as_tissue_classes(sitk.ReadImage(str(DATA / "vxm3d" / "test_scan_seg.nii.gz")))
    found.append(dict(name="vxm3d->oasis3dA", fixed=oasis_a, moving=vxm, fixed_labels=oasis_a_seg, moving_labels=vxm_seg))
    oasis_b = sitk.ReadImage(str(DATA / "oasis3d" / "image_B_160x192x144.nii.gz"), sitk.sitkFloat32)
    oasis_b_seg = label_map_on(DATA / "oasis3d" / "image_B_160x192x144_seg.nii.gz", oasis_b)[0]
    found.append(dict(name="oasis3dB->A", fixed=oasis_a, moving=oasis_b, fixed_labels=oasis_a_seg,
                      moving_labels=oasis_b_seg))
    r16 = sitk.ReadImage(str(DATA / "ants2d" / "r16slice.jpg"), sitk.sitkFloat32)
    for name in ("r64", "r85", "r27"):
        moving = sitk.ReadImage(str(DATA / "ants2d" / f"{name}slice.jpg"), sitk.sitkFloat32)
        for turns in (0, 1, 2):
            found.append(dict(name=f"{name}->r16 rot{90 * turns}", fixed=r16, moving=rotated(moving, turns)))
    return [case for case in found if only is None or only in case["name"]]


def score(case: dict, result: dipreg.RegistrationResult) -> dict:
    row = {k: result.metrics[k] for k in ("ssim", "ncc", "seconds")}
    if "moving_labels" in case:
        result.propagate_labels(case["moving_labels"], case["fixed_labels"], interpolation="nearest")
        row.update({k: result.metrics[k] for k in ("dice_1", "dice_2", "dice_mean")})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--deformable", action="store_true", help="only the full default registration of vxm3d")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report = {"command": "python benchmarks/initialisation.py " + " ".join(os.sys.argv[1:]),
              "load_average_before": os.getloadavg(), "dipreg_version": dipreg.__version__}
    if args.deformable:
        case = cases("vxm3d")[0]
        result = dipreg.register(case["fixed"], case["moving"], threads=args.threads)
        report["vxm3d_default_deformable"] = {**score(case, result), "init": result.metrics["options"]["init"],
                                              "init_matrix": result.metrics["init_matrix"]}
        with tempfile.TemporaryDirectory() as tmp:  # keep the QC figure, not the volumes
            shutil.copy(result.save(Path(tmp) / "out") / "qc.png", RESULTS / "initialisation-vxm3d-qc.png")
        print(json.dumps(report["vxm3d_default_deformable"]))
        (args.output or RESULTS / "initialisation-vxm3d.json").write_text(json.dumps(report, indent=2))
        return
    rows = []
    for case in cases(args.only):
        for init in INITIALISATIONS:
            start = time.perf_counter()
            result = dipreg.register(case["fixed"], case["moving"], transform="affine", init=init, threads=args.threads)
            row = {"case": case["name"], "init": init, **score(case, result), "wall_s": time.perf_counter() - start}
            print(json.dumps(row), flush=True)
            rows.append(row)
    report.update(load_average_after=os.getloadavg(), affine_only=rows)
    (args.output or RESULTS / "initialisation.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
