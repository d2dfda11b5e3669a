"""Run one task per pair: in this process, on a local Dask cluster, or on a running one.

:func:`run_tasks` is the executor of ``dipreg batch`` and ``dipreg evaluate``. Whatever a task
raises, and a worker process that dies, becomes that item's error; the other items go on.
Each finished item is handed to a callback in the calling process at once (the ledger is
written there, by one writer).

Thread counts are set inside each worker process (the client's environment never reaches a
remote worker): a worker gets its host's cores divided by the task slots of all the workers
on that host, for PyTorch, SimpleITK and the ITK inside ANTs.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Callable, Iterator, Sequence, TypeVar

from dipreg.errors import DipregError

Item = TypeVar("Item")

#: A task's outcome: its result, or None and the error that stopped it.
Outcome = tuple[Any, str | None]


def describe_error(exc: BaseException) -> str:
    """One line saying why something failed: the last line of the message, after the exception's
    type unless it is a :class:`DipregError` (whose messages are written for users)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return lines[-1] if isinstance(exc, DipregError) else f"{type(exc).__name__}: {lines[-1]}"


def limit_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in this process: PyTorch and SimpleITK now, and (through the
    environment) OpenMP and ITK libraries loaded later, such as ANTsPy's."""
    import SimpleITK as sitk
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _run_task(task: Callable[[Item], Any], item: Item, threads_by_worker: dict[str, int] | None) -> Outcome:
    """Run ``task`` on ``item`` (on a Dask worker: with that worker's thread count first)."""
    if threads_by_worker is not None:
        from dask.distributed import get_worker

        worker = get_worker()
        limit_threads(threads_by_worker.get(worker.address) or max(1, (os.cpu_count() or 1) // worker.state.nthreads))
    try:
        return task(item), None
    except Exception as exc:  # any failure is this item's, not the batch's
        return None, describe_error(exc)


def _threads_by_worker(client: Any) -> dict[str, int]:
    """Threads per worker address: its host's cores over the task slots of that host's workers."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(os.cpu_count)
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info["host"]] = slots.get(info["host"], 0) + info["nthreads"]
    return {address: max(1, (cores.get(address) or 1) // slots[info["host"]]) for address, info in workers.items()}


def run_tasks(task: Callable[[Item], Any], items: Sequence[Item], on_done: Callable[[Item, Any, str | None], None],
              workers: int = 1, scheduler: str | None = None, names: Callable[[Item], str] = str) -> None:
    """Run ``task`` on every item and call ``on_done(item, result, error)`` as each finishes.

    Args:
        task: a picklable function of one item (pickled to the workers with Dask).
        items: what to run it on.
        on_done: called in this process, in the order items finish; ``result`` is None and
            ``error`` one line when the task raised or its worker died.
        workers: 1 runs the items one after another in this process, without Dask; more
            starts a local Dask cluster of that many worker processes, one task slot each.
        scheduler: address of a running Dask scheduler (``tcp://host:8786``) to submit to
            instead; its workers must be able to import dipreg and read and write the paths.
        names: a unique name per item, for the Dask task keys.

    Raises:
        DipregError: if Dask is missing or the scheduler cannot be reached.
    """
    if scheduler is None and workers <= 1:
        for item in items:
            on_done(item, *_run_task(task, item, None))
        return
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise DipregError("--workers and --scheduler need Dask: pip install 'dipreg[batch]'") from None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    else:
        cluster = None
    run = uuid.uuid4().hex[:8]
    try:
        try:
            client = Client(cluster if cluster is not None else scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise DipregError(f"cannot reach the Dask scheduler at {scheduler}: {describe_error(exc)}") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise DipregError(f"the Dask scheduler at {scheduler} has no workers (waited 60 s)") from None
            threads = _threads_by_worker(client)
            futures = {client.submit(_run_task, task, item, threads, key=f"dipreg-{names(item)}-{run}",
                                     pure=False): item for item in items}
            for future in as_completed(futures):
                try:
                    result, error = future.result()
                except Exception as exc:  # the worker died (e.g. killed for memory) or the task could not load
                    result, error = None, describe_error(exc)
                on_done(futures[future], result, error)
    finally:
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Thread counts for processes started inside the block (OpenMP/torch, ITK, ANTs)."""
    names = ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
