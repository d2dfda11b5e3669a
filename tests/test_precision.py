"""The channels_last path of the 2D network gives the field of the contiguous (plain fp32) path.

Both paths compute the same function, but the convolutions sum in a different order, and the
per-pair optimisation amplifies those rounding differences (Adam normalises the gradients,
so a tiny difference can flip a small step). Fields are therefore compared after a
registration against a stated tolerance, not bit for bit. Measured on a 64x64 slice at 4 mm
(known warp up to 8 mm, 100 iterations, seeds 0-2): mean distance between the two fields
0.24-0.31 mm, largest 1.0-1.3 mm, endpoint errors against the truth within 0.01 mm.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

import dipreg
from dipreg.synthetic import displacement_endpoint_error, known_warp_pair

#: Tolerances in mm on the 4 mm grid: mean a quarter voxel, largest one voxel.
MEAN_TOLERANCE_MM = 1.0
MAX_TOLERANCE_MM = 4.0
#: Largest difference of the endpoint error against the known warp between the two paths.
ERROR_TOLERANCE_MM = 0.1


def test_channels_last_gives_the_field_of_the_contiguous_path(brain_slice: sitk.Image) -> None:
    pair = known_warp_pair(brain_slice, max_displacement=8.0, smoothness=16.0, seed=0)
    results = {channels_last: dipreg.register(pair.fixed, pair.moving, iterations=100, patience=0,
                                              channels_last=channels_last)
               for channels_last in (True, False)}
    distance = np.linalg.norm(results[True].displacement_array - results[False].displacement_array, axis=-1)
    assert distance.mean() < MEAN_TOLERANCE_MM
    assert distance.max() < MAX_TOLERANCE_MM
    errors = [displacement_endpoint_error(result.displacement, pair.truth, pair.mask) for result in results.values()]
    assert abs(errors[0] - errors[1]) < ERROR_TOLERANCE_MM
