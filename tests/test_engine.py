"""Engine helpers: the image pyramid of the deformable stage and the CPU thread setting."""

from __future__ import annotations

import pytest
import torch

from dipreg.engine import ONE_THREAD_BELOW_VOXELS, cpu_threads, make_config, optimisation_threads, pyramid_shapes


@pytest.mark.parametrize("shape, expected", [
    ((256, 256), [(128, 128), (256, 256)]),                   # 2D: full resolution
    ((144, 192, 160), [(72, 96, 80), (144, 192, 160)]),       # OASIS, 4.4 M voxels: full resolution
    ((256, 256, 256), [(128, 128, 128), (256, 256, 256)]),    # a 1 mm 256^3 volume: still full resolution
    ((320, 320, 320), [(80, 80, 80), (160, 160, 160)]),       # 32.8 M voxels: the loss at half resolution
])
def test_default_pyramid_keeps_the_loss_at_most_256_cubed_voxels(shape, expected) -> None:
    config = make_config()
    assert pyramid_shapes(shape, config.pyramid_levels, max_voxels=config.max_loss_voxels) == expected


def test_pyramid_without_a_voxel_cap_ends_at_full_resolution() -> None:
    assert pyramid_shapes((256, 256, 256), 3, max_voxels=0) == [(64, 64, 64), (128, 128, 128), (256, 256, 256)]


def test_pyramid_stops_before_levels_smaller_than_the_minimum() -> None:
    assert pyramid_shapes((40, 50), 4, minimum=16) == [(20, 25), (40, 50)]


def test_cpu_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with cpu_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with cpu_threads(0):
        assert torch.get_num_threads() == before


def test_automatic_threads_are_one_for_small_images_and_the_process_setting_for_large() -> None:
    assert optimisation_threads(0, (256, 256)) == 1
    assert optimisation_threads(0, (160, 192, 144)) == 0       # 4.4 M voxels: left to the process
    assert optimisation_threads(0, (1024, 1023)) == 1
    assert optimisation_threads(0, (1024, 1024)) == 0           # exactly the bound: all cores
    assert optimisation_threads(3, (64, 64)) == 3               # an explicit count is kept
    assert ONE_THREAD_BELOW_VOXELS == 1024 * 1024


def test_a_small_registration_runs_on_one_thread_and_restores_the_setting(brain_slice) -> None:
    import dipreg

    seen: list[int] = []
    before = torch.get_num_threads()
    with cpu_threads(2):
        dipreg.register(brain_slice, brain_slice, iterations=12, affine_iterations=2, progress=False,
                        callback=lambda iteration, loss: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == 2
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_import_makes_openmp_wait_passively_unless_told_otherwise(given, expected) -> None:
    """``import dipreg`` sets OMP_WAIT_POLICY=PASSIVE before PyTorch loads; a user's own setting stays."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    script = "import os, dipreg; print(os.environ['OMP_WAIT_POLICY'])"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert completed.stdout.strip() == expected, completed.stderr
