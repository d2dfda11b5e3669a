"""Throughput of ``dipreg batch`` (pairs per minute) in process, on a local Dask cluster and on a
running one, against ANTs SyN run the same way (``dipreg evaluate --method ants``).

Per method, three runs of the same pairs, each a whole ``python -m dipreg`` process in a fresh
output folder:

* ``workers1``: ``--workers 1``, the pairs one after another in the process, no Dask;
* ``workers2``: ``--workers 2``, a local Dask cluster started by the command (its start counted);
* ``scheduler2``: ``--scheduler``, a ``dask scheduler`` and two ``dask worker --nthreads 1``
  processes started beforehand as separate processes (their start not counted: the cluster is
  already running, as it would be for a study).

Dask's cost is what a run spends outside the pairs: ``outside_s = wall - sum(pair seconds) /
slots`` (process start, imports, cluster start, scheduling, the tables after every pair),
compared with the in-process run. Thread counts are the executor's own (one worker: torch's
default; N workers: cores / N each). Writes ``benchmarks/results/batch-<host>.json`` and prints a
table. On a machine shared with other jobs, record the load (printed before and after).

    python benchmarks/batch.py                                   # 16 lgg2d pairs, default preset
    python benchmarks/batch.py --preset fast --max-pairs 8      # a quicker run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("workers1", "workers2", "scheduler2")
#: The dipreg subcommand and options of each method.
METHOD_COMMANDS = {"dip": ["batch"], "ants": ["evaluate", "--method", "ants"]}


def _subset(pairs_csv: Path, max_pairs: int | None, folder: Path) -> Path:
    """The first ``max_pairs`` rows of PAIRS.csv, with absolute paths, as a new CSV."""
    with open(pairs_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))[:max_pairs]
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["fixed", "moving"])
        writer.writeheader()
        writer.writerows({name: str((pairs_csv.parent / row[name]).resolve()) for name in ("fixed", "moving")}
                         for row in rows)
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_cluster(workers: int) -> tuple[str, list[subprocess.Popen], float]:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1; seconds until ready."""
    from dask.distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    start = time.perf_counter()
    processes = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                  **quiet)]
    processes += [subprocess.Popen([*dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                    "--no-dashboard"], **quiet) for _ in range(workers)]
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(workers, timeout=120)
    return address, processes, time.perf_counter() - start


def _run(method: str, mode: str, pairs: Path, outdir: Path, preset: str, channel: str,
         address: str) -> dict[str, Any]:
    where = {"workers1": ["--workers", "1"], "workers2": ["--workers", "2"], "scheduler2": ["--scheduler", str(address)]}
    command = [sys.executable, "-m", "dipreg", *METHOD_COMMANDS[method], str(pairs), "-o", str(outdir), "--quiet",
               *where[mode], "--channel", channel, *(["--preset", preset] if method == "dip" else [])]
    start = time.perf_counter()
    status = subprocess.run(command, capture_output=True, text=True).returncode
    wall = time.perf_counter() - start
    with open(outdir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    done = [row for row in rows if not row.get("error")]
    pair_seconds = sum(float(row["seconds"]) for row in done)
    slots = 1 if mode == "workers1" else 2
    return {
        "command": " ".join(command[1:]), "exit_status": status, "pairs": len(rows), "failed": len(rows) - len(done),
        "wall_s": wall, "pairs_per_minute": 60 * len(done) / wall, "pair_seconds_sum": pair_seconds,
        "outside_s": wall - pair_seconds / slots, "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=DATA / "lgg2d" / "pairs.csv", help="PAIRS.csv (default: lgg2d)")
    parser.add_argument("--max-pairs", type=int, default=None, help="the first N pairs only (default: all)")
    parser.add_argument("--preset", default="default", help="dipreg preset (default: %(default)s)")
    parser.add_argument("--channel", default="1", help="channel of the images (default: 1, FLAIR)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_COMMANDS), choices=list(METHOD_COMMANDS))
    parser.add_argument("--output", type=Path, default=RESULTS / f"batch-{platform.node() or 'host'}.json")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    report: dict[str, Any] = {
        "host": platform.node(), "cores": os.cpu_count(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_before": os.getloadavg(), "preset": args.preset, "pairs_csv": str(args.pairs),
        "max_pairs": args.max_pairs,
        "outside_definition": "wall - sum(per-pair seconds) / slots: process start, imports, cluster start, "
                              "scheduling and result tables, i.e. what running the pairs costs beyond the pairs",
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="dipreg-batch-bench-") as workdir:
        pairs = _subset(args.pairs, args.max_pairs, Path(workdir))
        address, processes, cluster_start = _start_cluster(2)
        report["cluster_start_s"] = cluster_start
        try:
            for method in args.methods:
                for mode in MODES:
                    result = _run(method, mode, pairs, Path(workdir) / f"{method}-{mode}", args.preset, args.channel,
                                  address)
                    report["runs"][f"{method} {mode}"] = result
                    print(f"{method:5} {mode:10} {result['pairs_per_minute']:6.2f} pairs/min  wall {result['wall_s']:6.1f} s  "
                          f"outside the pairs {result['outside_s']:5.1f} s  ({result['failed']} failed)", flush=True)
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                process.wait(timeout=60)
    report["load_average_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
