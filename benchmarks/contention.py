"""Two registrations at once on the same cores: each one's wall time against its time alone.

Runs the bundled demo pair as whole ``dipreg register`` processes, first alone, then two
started together, for each OpenMP setting: a wait policy (``PASSIVE`` is what ``import dipreg``
sets unless the environment already has one; ``ACTIVE`` spins), or environment assignments such
as ``GOMP_SPINCOUNT=20000`` (libgomp's spin before sleeping; it overrides the policy's), each
with every ``--threads`` count. Prints a table and writes
``benchmarks/results/contention-<host>.json``. Run it on an otherwise quiet machine (check
``uptime``).

    python benchmarks/contention.py --preset default
    python benchmarks/contention.py --policies PASSIVE GOMP_SPINCOUNT=20000 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "dipreg" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def environment(policy: str) -> dict[str, str]:
    """The environment of a run: ``NAME=VALUE`` assignments separated by commas, or a wait policy."""
    if "=" not in policy:
        return {**os.environ, "OMP_WAIT_POLICY": policy}
    return {**os.environ, **dict(item.split("=", 1) for item in policy.split(","))}


def start(outdir: Path, preset: str, policy: str, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "dipreg", "register", str(DATA / "r16slice.jpg"), str(DATA / "r64slice.jpg"),
               "-o", str(outdir), "--quiet", "--preset", preset, "--threads", str(threads)]
    return subprocess.Popen(command, env=environment(policy))


def timed(processes: list[subprocess.Popen], started: float) -> list[float]:
    seconds = []
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"dipreg register failed with exit code {process.returncode}")
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--policies", nargs="+", default=["PASSIVE", "ACTIVE"],
                        help="wait policies, or NAME=VALUE[,NAME=VALUE] environment settings")
    parser.add_argument("--threads", nargs="+", type=int, default=[0],
                        help="--threads of each run (0: dipreg's automatic choice, its default)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / f"contention-{platform.node() or 'host'}.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dipreg-contention-") as tmp:
        for policy in args.policies:
            for threads in args.threads:
                name = f"{len(rows)}"
                started = time.perf_counter()
                alone = timed([start(Path(tmp, f"{name}-alone"), args.preset, policy, threads)], started)[0]
                started = time.perf_counter()
                together = timed([start(Path(tmp, f"{name}-{k}"), args.preset, policy, threads) for k in (1, 2)],
                                 started)
                rows.append({"policy": policy, "threads": threads, "alone_s": alone, "together_s": together,
                             "ratio": max(together) / alone})
                print(f"{policy:22s} threads {threads}  alone {alone:6.1f} s   two at once {together[0]:6.1f} / "
                      f"{together[1]:6.1f} s   ratio {rows[-1]['ratio']:.2f}", flush=True)
    report = {"preset": args.preset, "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg(), "rows": rows,
              "definition": "wall time of whole dipreg register processes on the bundled demo pair; ratio = the "
                            "slower of two started together over the same run alone"}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
