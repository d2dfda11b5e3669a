"""dipreg batch: resuming after SIGKILL, a real Dask scheduler, identical fields, failures.

Real processes throughout: the batch runs as ``python -m dipreg`` subprocesses or in this
process, a Dask LocalCluster, and a ``dask scheduler`` with two ``dask worker`` processes on
127.0.0.1. The pairs are 64 x 64 slices registered with a few iterations.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dipreg.cli import EXIT_SOME_FAILED, main
from dipreg.pairs import read_pairs
from dipreg.errors import DipregError
from dipreg.ledger import LEDGER_NAME, Ledger, pair_key

SOURCE = Path(__file__).resolve().parents[1] / "src"
#: Few iterations and one thread: a pair takes well under a second.
QUICK = ["--iterations", "8", "--affine-iterations", "5", "--threads", "1", "--seed", "3"]
ENV = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pairs_csv(brain_slice, tmp_path_factory) -> Path:
    """Four real pairs of two 64 x 64 slices (and shifted copies) plus one with a NaN image."""
    root = tmp_path_factory.mktemp("batch")
    other = sitk.Shrink(sitk.Cast(sitk.ReadImage(str(SOURCE / "dipreg" / "data" / "r64slice.jpg")),
                                  sitk.sitkFloat32), [4, 4])
    images = {"r16": brain_slice, "r64": other}
    for shift in (2, 4):
        shifted = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(other), shift, axis=1))
        shifted.CopyInformation(other)
        images[f"r64s{shift}"] = shifted
    broken = sitk.GetArrayFromImage(other)
    broken[20:30, 20:30] = np.nan
    images["nan"] = sitk.GetImageFromArray(broken)
    for name, image in images.items():
        sitk.WriteImage(image, str(root / f"{name}.mha"))  # .mha keeps NaN (the NIfTI reader turns it into 0)
    rows = [("a", "r16", "r64"), ("b", "r64", "r16"), ("c", "r16", "r64s2"), ("d", "r16", "r64s4"),
            ("diverges", "r16", "nan")]
    path = root / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "fixed", "moving"])
        writer.writerows([pair_id, f"{fixed}.mha", f"{moving}.mha"] for pair_id, fixed, moving in rows)
    return path


def _batch(pairs: Path, outdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dipreg", "batch", str(pairs), "-o", str(outdir), *QUICK, *extra],
                          env=ENV, capture_output=True, text=True, timeout=300)


def _fields(outdir: Path) -> dict[str, np.ndarray]:
    return {folder.name: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "displacement.nii.gz")))
            for folder in sorted((outdir / "pairs").iterdir()) if not folder.name.startswith(".")}


def _ledger_lines(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / LEDGER_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def in_process(pairs_csv, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference: the whole batch in one process (--workers 1, no Dask)."""
    outdir = tmp_path_factory.mktemp("in-process")
    return outdir, _batch(pairs_csv, outdir)


def test_a_failing_pair_is_recorded_and_the_others_complete(in_process):
    outdir, run = in_process
    assert run.returncode == EXIT_SOME_FAILED, run.stderr
    assert "4 of 5 pairs done, 1 failed" in run.stdout
    with open(outdir / "failures.csv") as handle:
        (failure,) = csv.DictReader(handle)
    assert failure["id"] == "diverges" and "NaN" in failure["error"]
    with open(outdir / "results.csv") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["a", "b", "c", "d", "diverges"] and rows["diverges"]["error"]
    assert sorted(_fields(outdir)) == ["a", "b", "c", "d"]
    summary = json.loads((outdir / "summary.json").read_text())
    assert (summary["n_pairs"], summary["n_done"], summary["n_failed"], summary["n_remaining"]) == (5, 4, 1, 0)


def test_same_seed_gives_identical_fields_on_a_rerun_and_on_two_workers(pairs_csv, in_process, tmp_path, capsys):
    pytest.importorskip("dask.distributed", reason="Dask (the dipreg[batch] extra) is not installed")
    outdir, _ = in_process
    reference = _fields(outdir)
    assert main(["batch", str(pairs_csv), "-o", str(outdir), *QUICK, "--force", "--quiet"]) == EXIT_SOME_FAILED
    assert capsys.readouterr().out == ""
    assert main(["batch", str(pairs_csv), "-o", str(tmp_path / "parallel"), *QUICK, "--workers", "2",
                 "--quiet"]) == EXIT_SOME_FAILED
    with open(tmp_path / "parallel" / "results.csv") as handle:  # in the CSV's order, whatever finished first
        assert [row["id"] for row in csv.DictReader(handle)] == ["a", "b", "c", "d", "diverges"]
    # the same options, threads included: bitwise identical (CPU)
    for fields in (_fields(outdir), _fields(tmp_path / "parallel")):
        assert fields.keys() == reference.keys()
        for pair_id, field in fields.items():
            np.testing.assert_array_equal(field, reference[pair_id])


def test_a_killed_run_resumes_without_recomputing_finished_pairs(pairs_csv, tmp_path, capsys):
    outdir = tmp_path / "killed"
    command = [sys.executable, "-m", "dipreg", "batch", str(pairs_csv), "-o", str(outdir), *QUICK, "--quiet"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        ledger = outdir / LEDGER_NAME
        if ledger.is_file() and len(ledger.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = {record["id"] for record in _ledger_lines(outdir) if record["ok"]}
    assert 1 <= len(finished) < 5
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns)
              for pair_id in finished for path in (outdir / "pairs" / pair_id).iterdir()}

    assert main(["batch", str(pairs_csv), "-o", str(outdir), *QUICK]) == EXIT_SOME_FAILED
    assert f"({len(finished)} already done before)" in capsys.readouterr().out
    for path, (content, mtime) in before.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path
    records = {record["id"]: record for record in _ledger_lines(outdir)}
    assert sorted(records) == ["a", "b", "c", "d", "diverges"]
    assert sum(record["id"] in finished for record in _ledger_lines(outdir)) == len(finished)  # not appended again
    assert not [p for p in (outdir / "pairs").iterdir() if p.name.startswith(".")]  # nothing left staged
    with open(outdir / "results.csv") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    for pair_id, record in records.items():
        assert record["ok"] == ("error" not in record["row"]) == (rows[pair_id]["error"] == "")
        if record["ok"]:  # whole folders: every file the ledger names, with its size
            files = {p.name: p.stat().st_size for p in (outdir / "pairs" / pair_id).iterdir()}
            assert files == record["files"] and set(files) >= {"displacement.nii.gz", "metrics.json", "qc.png"}
            assert float(rows[pair_id]["ssim"]) == record["row"]["ssim"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_running_dask_cluster_gives_the_in_process_results(pairs_csv, in_process, tmp_path):
    pytest.importorskip("dask.distributed", reason="Dask (the dipreg[batch] extra) is not installed")
    from dask.distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = [sys.executable, "-m", "dask"]  # the `dask` command of this Python
    processes = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1",
                                   "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
                                  env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        processes += [subprocess.Popen([*dask, "worker", address, "--nthreads", "1",
                                        "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{index}"],
                                       env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for index in range(2)]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            names = sorted(info["name"] for info in client.scheduler_info(n_workers=-1)["workers"].values())
        assert names == ["w0", "w1"]
        status = main(["batch", str(pairs_csv), "-o", str(tmp_path / "cluster"), *QUICK, "--scheduler", address,
                       "--quiet"])
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    assert status == EXIT_SOME_FAILED
    reference_dir, _ = in_process
    reference, fields = _fields(reference_dir), _fields(tmp_path / "cluster")
    assert fields.keys() == reference.keys()
    for pair_id, field in fields.items():
        np.testing.assert_array_equal(field, reference[pair_id])
    with open(reference_dir / "results.csv") as a, open(tmp_path / "cluster" / "results.csv") as b:
        for ours, theirs in zip(csv.DictReader(a), csv.DictReader(b)):
            assert ours["id"] == theirs["id"] and ours["ssim"] == theirs["ssim"] and ours["error"] == theirs["error"]


def test_every_bad_row_is_reported_at_once_before_any_work(tmp_path, capsys):
    (tmp_path / "image.mha").write_bytes(b"")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("id,fixed,moving\na,image.mha,image.mha\nb,image.mha,missing.mha\nc,image.mha,image.mha,extra\n"
                     "a,image.mha,image.mha\nd,,image.mha\n")
    assert main(["batch", str(pairs), "-o", str(tmp_path / "out")]) == 1
    assert "4 bad rows" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(DipregError) as error:
        read_pairs(pairs)
    lines = str(error.value).splitlines()
    assert lines[0] == f"4 bad rows in {pairs} (nothing was run):"
    assert "row 2 (line 3): moving file missing.mha not found" in lines[1]
    assert "row 3 (line 4): more cells than columns" in lines[2]
    assert "row 5 (line 6): column fixed is empty" in lines[3]
    assert "row 4: id 'a' already used by row 1" in lines[4]


def test_pair_keys_follow_options_and_input_files(pairs_csv, tmp_path):
    spec = read_pairs(pairs_csv)[0]
    key = pair_key(spec, {"iterations": 8})
    assert pair_key(spec, {"iterations": 8}) == key != pair_key(spec, {"iterations": 9})
    stat = spec.moving.stat()
    os.utime(spec.moving, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        assert pair_key(spec, {"iterations": 8}) != key  # an edited input is recomputed
    finally:
        os.utime(spec.moving, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_torn_ledger_line_is_skipped_and_does_not_swallow_the_next(tmp_path):
    ledger = Ledger(tmp_path)
    with ledger.locked(tmp_path / "pairs"):
        ledger.append("a", "k1", {"id": "a"}, {})
    with open(tmp_path / LEDGER_NAME, "a") as handle:
        handle.write('{"id": "b", "key": "k')  # a kill in the middle of a write
    with ledger.locked(tmp_path / "pairs"):
        assert sorted(ledger.latest) == ["a"]
        ledger.append("c", "k3", {"id": "c", "error": "x"}, {})
    with ledger.locked(tmp_path / "pairs"):
        assert sorted(ledger.latest) == ["a", "c"] and not ledger.latest["c"]["ok"]
        with pytest.raises(DipregError, match="another run"):
            with Ledger(tmp_path).locked(tmp_path / "pairs"):
                pass
