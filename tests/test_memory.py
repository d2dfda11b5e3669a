"""The peak memory estimate and the check that refuses a registration before it starts."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import dipreg
from dipreg.engine import make_config
from dipreg.memory import available_memory, check_memory, estimate_peak_memory


@pytest.mark.parametrize("preset", ["default", "paper", "classic"])
@pytest.mark.parametrize("shapes", [[(32, 32), (64, 64), (128, 128), (256, 256), (512, 512)],
                                    [(16, 16, 16), (32, 32, 32), (64, 64, 48), (96, 96, 96)]])
def test_estimate_grows_with_image_size(preset: str, shapes: list[tuple[int, ...]]) -> None:
    estimates = [estimate_peak_memory(shape, make_config(preset)) for shape in shapes]
    assert estimates == sorted(estimates) and estimates[0] < estimates[-1]


@pytest.mark.parametrize("shape", [(256, 256), (64, 64, 64)])
def test_estimate_grows_with_channels(shape: tuple[int, ...]) -> None:
    estimates = [estimate_peak_memory(shape, make_config(channels=c)) for c in (8, 16, 32, 64, 128)]
    assert estimates == sorted(estimates) and estimates[0] < estimates[-1]


def test_estimate_is_plausible_for_the_bundled_slices() -> None:
    """A 256² default run measured ~0.5 GB of peak RSS; the estimate is in that range."""
    assert 0.3e9 < estimate_peak_memory((256, 256), make_config()) < 1e9


def test_absurd_volume_is_refused_with_the_estimate() -> None:
    with pytest.raises(dipreg.DipregError, match=r"needs about [\d.]+ GB of memory, but only 8.0 GB"):
        check_memory((4000, 4000, 4000), make_config(), available=8 * 10**9)


def test_absurd_volume_is_refused_by_default_available_memory() -> None:
    assert available_memory() > 0
    with pytest.raises(dipreg.DipregError, match="GB of memory"):
        check_memory((4000, 4000, 4000), make_config())


def test_available_memory_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    assert available_memory() > 0


def test_register_refuses_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """register() checks memory before the optimisation starts."""
    monkeypatch.setattr("dipreg.registration.optimise", lambda *args, **kwargs: pytest.fail("optimise was called"))
    monkeypatch.setattr("dipreg.memory.available_memory", lambda: 10**6)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    with pytest.raises(dipreg.DipregError, match="GB of memory"):
        dipreg.register(image, image)
