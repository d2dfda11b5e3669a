"""What a batch run has finished, kept durably so that a rerun resumes where a crash stopped.

* :class:`Ledger`: ``OUTDIR/ledger.jsonl``, one JSON line per finished pair (success or
  failure), appended, flushed and synced as soon as the pair finishes. The last record of a
  pair id wins; a line torn by a crash is ignored.
* :func:`pair_key`: a hash of everything that determines a pair's outputs (the options and
  each input file's path, size and modification time). A rerun skips a pair whose last
  record succeeded with the same key and whose files are still there.
* :func:`staged_directory` and :func:`write_text_atomic`: outputs appear whole or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from dipreg.errors import DipregError

LEDGER_NAME = "ledger.jsonl"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Permissions of new files and folders (tempfile makes them private; outputs should not be).
_FILE_MODE, _FOLDER_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def pair_key(spec: Any, settings: dict[str, Any]) -> str:
    """Hash of a pair's settings and inputs: every path of the dataclass ``spec`` with its size
    and modification time (so an edited input is recomputed), every other field, and ``settings``.
    The ``row`` field (the pair's position in the CSV) is left out."""
    inputs: dict[str, Any] = {}
    for name, value in dataclasses.asdict(spec).items():
        if name == "row" or value is None:
            continue
        if isinstance(value, Path):
            stat = value.stat()
            value = [str(value), stat.st_size, stat.st_mtime_ns]
        inputs[name] = value
    text = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_files(folder: Path) -> dict[str, int]:
    """Names and sizes of the files in ``folder`` (empty if it does not exist)."""
    if not folder.is_dir():
        return {}
    return {item.name: item.stat().st_size for item in sorted(folder.iterdir()) if item.is_file()}


def _plain(value: Any) -> Any:
    """JSON for what ``json`` cannot write: numpy scalars as numbers, anything else as text."""
    return value.item() if hasattr(value, "item") else str(value)


class Ledger:
    """The append-only record of finished pairs in ``OUTDIR/ledger.jsonl``.

    ``latest`` (the last record per pair id) is read when :meth:`locked` takes the folder.
    """

    def __init__(self, outdir: str | os.PathLike) -> None:
        self.path = Path(outdir) / LEDGER_NAME
        self.latest: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        """The last record of every pair id (lines that do not parse, e.g. torn by a kill, are skipped)."""
        latest: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return latest
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "id" in record:
                        latest[record["id"]] = record
        return latest

    def append(self, pair_id: str, key: str, row: dict[str, Any], files: dict[str, int]) -> dict[str, Any]:
        """Record a finished pair (``row`` with an ``error`` for a failure) and sync it to disk."""
        record = {"id": pair_id, "key": key, "ok": "error" not in row, "finished": time.time(),
                  "files": files, "row": row}
        line = json.dumps(record, default=_plain) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            if handle.tell() > 0:  # a line torn by a crash must not swallow this one
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        self.latest[pair_id] = record
        return record

    @contextlib.contextmanager
    def locked(self, staging_parent: Path) -> Iterator[None]:
        """Hold the output folder for one run, after removing what a killed run left staged
        (hidden folders in ``staging_parent``, see :func:`staged_directory`).

        Raises:
            DipregError: if another run holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DipregError(f"{self.path.parent}: another run is writing to this folder") from None
            for leftover in staging_parent.glob(".*"):
                shutil.rmtree(leftover, ignore_errors=True)
            self.latest = self._read()
            yield

    def finished(self, pair_id: str, key: str, folder: Path) -> dict[str, Any] | None:
        """The record of a pair that succeeded with ``key`` and whose files in ``folder`` are all
        still there with their recorded sizes; None when it must be (re)computed."""
        record = self.latest.get(pair_id)
        if record and record["ok"] and record["key"] == key:
            present = folder_files(folder)
            if all(present.get(name) == size for name, size in record["files"].items()):
                return record
        return None


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` to write into; on success it replaces ``target`` whole.

    The old folder is first renamed aside, so a kill leaves either the old folder, the new
    one, or none (which a ledger check treats as not done), never a mix of both.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.", dir=target.parent))
    staging.chmod(_FOLDER_MODE)
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old or the new text."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
