"""CPU options of the engine, measured: channels_last, bf16 autocast, torch.compile, fused Adam, threads.

Two kinds of measurement, all in this one process:

* network: forward + backward of the DIP network alone (:class:`dipreg.engine.FieldModel`),
  median seconds per call over ``--calls`` calls after a warm-up call, for the default
  preset's network on the field grid of a 256² image (64², 32 channels), the paper preset's
  (256², 128 channels) and the 3D default's on OASIS (36x48x40, array order); per variant and thread
  count. For compiled variants the first call's time (compilation) is reported as well.
* registration: ``dipreg.register`` on the ANTs slices r64 onto r16 (shrunk to 128² by
  default), default preset, ``--iterations`` iterations with no early stop; seconds per
  iteration (median interval between progress callbacks) and the difference of the
  resulting displacement field from the reference run (the engine's default fp32
  channels_last path), in mm: largest and mean endpoint distance. The reference is run
  twice (determinism); fp32 without channels_last shows how far mere reordering of fp32
  sums moves the result, the scale against which bf16 is judged.

bf16, compile and fused Adam are not engine options: they are applied here by wrapping
``SkipGenerator.forward`` in ``torch.autocast("cpu", dtype=torch.bfloat16)`` (output cast
back to float32), by building the network through ``torch.compile`` and by making
``torch.optim.Adam`` default to ``fused=True``; the engine is otherwise unchanged. Writes ``benchmarks/results/cpu-options-<host>.json``.

    python benchmarks/cpu_options.py                         # 1 and 2 threads; ~30 min (compiling is slow)
    python benchmarks/cpu_options.py --skip-compile --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import SimpleITK as sitk
import torch

import dipreg
import dipreg.engine
from dipreg.engine import FieldModel, field_grid_shape, make_config
from dipreg.networks import SkipGenerator

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

#: name -> (preset, field grid shape)
NETWORKS: dict[str, tuple[str, tuple[int, ...]]] = {
    "default 2D (32 ch, 64x64)": ("default", field_grid_shape((256, 256), 0.25)),
    "paper 2D (128 ch, 256x256)": ("paper", (256, 256)),
    "default 3D (32 ch, 36x48x40)": ("default", field_grid_shape((144, 192, 160), 0.25)),
}



@dataclass(frozen=True)
class Variant:
    """How the network (and the optimiser) run: memory format, precision, compilation."""

    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    fused_adam: bool = False  # the optimiser's, so registrations only


VARIANTS: dict[str, Variant] = {
    "fp32": Variant(),
    "fp32 channels_last": Variant(channels_last=True),
    "bf16": Variant(bf16=True),
    "bf16 channels_last": Variant(channels_last=True, bf16=True),
    "compiled": Variant(compile=True),
    "compiled channels_last": Variant(channels_last=True, compile=True),
    "fp32 channels_last fused Adam": Variant(channels_last=True, fused_adam=True),
}

#: The engine's default path, the reference of the field differences; run twice (determinism).
REFERENCE = "fp32 channels_last"
REPEATED = f"{REFERENCE} (again)"

_fp32_forward = SkipGenerator.forward


def _bf16_forward(self: SkipGenerator, z: torch.Tensor) -> torch.Tensor:
    """SkipGenerator.forward under bf16 autocast, returning float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _fp32_forward(self, z).float()


def _compiled_generator(*args: Any, **kwargs: Any) -> torch.nn.Module:
    """A SkipGenerator built through torch.compile."""
    return torch.compile(SkipGenerator(*args, **kwargs))


@contextlib.contextmanager
def engine_variant(variant: Variant) -> Iterator[None]:
    """Make the engine use bf16 autocast, torch.compile and/or fused Adam inside the block."""
    with contextlib.ExitStack() as stack:
        if variant.bf16:
            stack.enter_context(mock.patch.object(SkipGenerator, "forward", _bf16_forward))
        if variant.compile:
            torch._dynamo.reset()  # compile this network afresh: static shapes, compile time included
            stack.enter_context(mock.patch.object(dipreg.engine, "SkipGenerator", _compiled_generator))
        if variant.fused_adam:
            stack.enter_context(mock.patch.object(torch.optim, "Adam", functools.partial(torch.optim.Adam, fused=True)))
        yield


def _failure(exc: Exception) -> dict[str, str]:
    """A row for a variant that failed (torch.compile may fail to lower a network, a run may diverge)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return {"error": f"{type(exc).__name__}: {' '.join(lines[:2])}"}


def time_network(preset: str, shape: tuple[int, ...], variant: str, calls: int) -> dict[str, Any]:
    """Median seconds of one forward + backward pass of the network (and the first call's)."""
    channels_last = VARIANTS[variant].channels_last
    torch.manual_seed(0)
    with engine_variant(VARIANTS[variant]):
        model = FieldModel(make_config(preset, channels_last=channels_last), len(shape), shape)
    if channels_last:
        model.network.to(memory_format=torch.channels_last)
    times = []
    try:
        for _ in range(calls + 1):
            start = time.perf_counter()
            model().square().mean().backward()
            times.append(time.perf_counter() - start)
    except RuntimeError as exc:  # torch.compile's failures are RuntimeErrors
        return _failure(exc)
    return {"first_s": times[0], "median_s": statistics.median(times[1:])}


class IterationClock:
    """Progress callback recording the time of every iteration."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, iteration: int, loss: float) -> None:
        self.stamps.append(time.perf_counter())

    def median_interval(self) -> float:
        """Median seconds between consecutive iterations (one forward, backward and step)."""
        return statistics.median(np.diff(self.stamps))


def small_pair(size: int) -> tuple[sitk.Image, sitk.Image]:
    """The ANTs slices r16 (fixed) and r64 (moving), shrunk to about ``size`` voxels a side."""
    from dipreg.registration import load_pair

    fixed, moving = load_pair(DATA / "ants2d" / "r16slice.jpg", DATA / "ants2d" / "r64slice.jpg")
    factor = max(1, fixed.GetSize()[0] // size)
    return sitk.Shrink(fixed, [factor, factor]), sitk.Shrink(moving, [factor, factor])


def time_registration(pair: tuple[sitk.Image, sitk.Image], variant: str,
                      iterations: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """A default-preset registration with one network variant: timings, SSIM and its field (mm)."""
    clock = IterationClock()
    start = time.perf_counter()
    try:
        with engine_variant(VARIANTS[variant]):
            result = dipreg.register(*pair, "default", callback=clock, iterations=iterations, patience=0,
                                     channels_last=VARIANTS[variant].channels_last)
    except (RuntimeError, dipreg.DipregError) as exc:
        return _failure(exc), None
    row = {"seconds": time.perf_counter() - start, "optimisation_s": result.metrics["seconds"],
           "per_iteration_s": clock.median_interval(), "first_iteration_s": clock.stamps[1] - clock.stamps[0],
           "ssim": result.metrics["ssim"]}
    return row, result.displacement_array


def compare_fields(rows: dict[str, dict], fields: dict[str, np.ndarray | None], reference: str) -> None:
    """Add each run's difference from the reference run's field (mm) to its row: the largest and
    the mean over voxels of the endpoint distance, and the reference field's largest magnitude."""
    magnitude = float(np.linalg.norm(fields[reference], axis=-1).max())
    for name, field in fields.items():
        if field is not None:
            distance = np.linalg.norm(field - fields[reference], axis=-1)
            rows[name].update(max_difference_mm=float(distance.max()), mean_difference_mm=float(distance.mean()),
                              reference_max_displacement_mm=magnitude)


def _network_line(threads: int, network: str, variant: str, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"network  threads={threads}  {network:<30} {variant:<24} failed: {row['error']}"
    return (f"network  threads={threads}  {network:<30} {variant:<24} {row['median_s'] * 1000:8.1f} ms  "
            f"(first call {row['first_s']:.2f} s)")


def _registration_line(threads: int, variant: str, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"register threads={threads}  {variant:<24} failed: {row['error']}"
    return (f"register threads={threads}  {variant:<24} {row['per_iteration_s'] * 1000:7.1f} ms/it  "
            f"first it {row['first_iteration_s']:6.2f} s  total {row['seconds']:6.1f} s  "
            f"|du| max {row['max_difference_mm']:.2e} mean {row['mean_difference_mm']:.2e} mm "
            f"(|u| max {row['reference_max_displacement_mm']:.1f})  "
            f"SSIM {row['ssim']:.4f}")


def main() -> None:
    """Run the measurements, print them and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--calls", type=int, default=3, help="timed network calls per variant (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=100, help="iterations of the registrations (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="side of the registered image (default: %(default)s)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variants")
    args = parser.parse_args()
    variants = [name for name, variant in VARIANTS.items() if not (args.skip_compile and variant.compile)]
    report: dict[str, Any] = {"host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__,
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "load_average_before": os.getloadavg(), "network": {}, "registration": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        key = f"{threads} thread(s)"
        for network, (preset, shape) in NETWORKS.items():
            for variant in variants:
                if VARIANTS[variant].fused_adam or (VARIANTS[variant].channels_last and len(shape) == 3):
                    continue  # an optimiser option; the engine keeps channels_last to 2D
                row = time_network(preset, shape, variant, args.calls)
                report["network"].setdefault(key, {}).setdefault(network, {})[variant] = row
                print(_network_line(threads, network, variant, row), flush=True)
        pair = small_pair(args.size)
        rows, fields = {}, {}
        for name, variant in {**{v: v for v in variants}, REPEATED: REFERENCE}.items():
            rows[name], fields[name] = time_registration(pair, variant, args.iterations)
        compare_fields(rows, fields, REFERENCE)
        report["registration"][key] = rows
        for variant, row in rows.items():
            print(_registration_line(threads, variant, row), flush=True)
    report["load_average_after"] = os.getloadavg()
    report["registration_setup"] = {"pair": "ants2d r64 onto r16", "size": args.size, "iterations": args.iterations,
                                    "preset": "default", "patience": 0, "reference": REFERENCE}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cpu-options-{platform.node()}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
