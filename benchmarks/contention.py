"""Two registrations at once on the same cores: each one's wall time against its time alone.

Runs the bundled demo pair as whole ``dipreg register`` processes, first alone, then two
started together, for each OpenMP wait policy (``PASSIVE`` is what ``import dipreg`` sets unless
the environment already has one; ``ACTIVE`` is OpenMP's spinning default). Prints a table and
writes ``benchmarks/results/contention-<host>.json``. Run it on an otherwise quiet machine
(check ``uptime``).

    python benchmarks/contention.py --preset default
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


def start(outdir: Path, preset: str, policy: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    command = [sys.executable, "-m", "dipreg", "register", str(DATA / "r16slice.jpg"), str(DATA / "r64slice.jpg"),
               "-o", str(outdir), "--quiet", "--preset", preset]
    return subprocess.Popen(command, env=env)


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
    parser.add_argument("--policies", nargs="+", default=["PASSIVE", "ACTIVE"])
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / f"contention-{platform.node() or 'host'}.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dipreg-contention-") as tmp:
        for policy in args.policies:
            started = time.perf_counter()
            alone = timed([start(Path(tmp, f"{policy}-alone"), args.preset, policy)], started)[0]
            started = time.perf_counter()
            together = timed([start(Path(tmp, f"{policy}-{k}"), args.preset, policy) for k in (1, 2)], started)
            rows.append({"policy": policy, "alone_s": alone, "together_s": together,
                         "ratio": max(together) / alone})
            print(f"{policy:8s} alone {alone:6.1f} s   two at once {together[0]:6.1f} / {together[1]:6.1f} s   "
                  f"ratio {rows[-1]['ratio']:.2f}", flush=True)
    report = {"preset": args.preset, "cpus": os.cpu_count(), "load_before": load_before, "rows": rows,
              "definition": "wall time of whole dipreg register processes on the bundled demo pair; ratio = the "
                            "slower of two started together over the same run alone"}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
