"""The channels_last path (CPU), the bfloat16 autocast path and CUDA graph replay (CUDA) give
the field of the plain eager contiguous fp32 path.

Both paths compute the same function, but the convolutions sum in a different order, and the
per-pair optimisation amplifies those rounding differences (Adam normalises the gradients,
so a tiny difference can flip a small step). Fields are therefore compared after a
registration against a stated tolerance, not bit for bit. Measured on a 64x64 slice at 4 mm
(known warp up to 8 mm, 100 iterations, seeds 0-2): mean distance between the two fields
0.24-0.31 mm, largest 1.0-1.3 mm, endpoint errors against the truth within 0.01 mm. The
bfloat16 and CUDA graph paths are held to the same tolerances; they only run where CUDA is
present (not in CI).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import dipreg
from dipreg.synthetic import displacement_endpoint_error, known_warp_pair

#: Tolerances in mm on the 4 mm grid: mean a quarter voxel, largest one voxel.
MEAN_TOLERANCE_MM = 1.0
MAX_TOLERANCE_MM = 4.0
#: Largest difference of the endpoint error against the known warp between the two paths.
ERROR_TOLERANCE_MM = 0.1


def _assert_same_registration(brain_slice: sitk.Image, option: str, **common) -> None:
    """Register one known-warp pair with ``option`` on and off; compare the fields and errors."""
    pair = known_warp_pair(brain_slice, max_displacement=8.0, smoothness=16.0, seed=0)
    results = {value: dipreg.register(pair.fixed, pair.moving, iterations=100, patience=0, **{option: value}, **common)
               for value in (True, False)}
    distance = np.linalg.norm(results[True].displacement_array - results[False].displacement_array, axis=-1)
    assert distance.mean() < MEAN_TOLERANCE_MM
    assert distance.max() < MAX_TOLERANCE_MM
    errors = [displacement_endpoint_error(result.displacement, pair.truth, pair.mask) for result in results.values()]
    assert abs(errors[0] - errors[1]) < ERROR_TOLERANCE_MM


def test_channels_last_gives_the_field_of_the_contiguous_path(brain_slice: sitk.Image) -> None:
    _assert_same_registration(brain_slice, "channels_last", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 autocast is used on CUDA only")
def test_bfloat16_autocast_gives_the_field_of_the_fp32_path(brain_slice: sitk.Image) -> None:
    _assert_same_registration(brain_slice, "mixed_precision", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist on CUDA only")
def test_cuda_graph_replay_gives_the_field_of_eager_steps(brain_slice: sitk.Image) -> None:
    _assert_same_registration(brain_slice, "cuda_graphs", device="cuda")
