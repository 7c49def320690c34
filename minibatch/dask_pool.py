"""The same pool interface as `pool.WorkerPool`, with chunks run as tasks on a Dask cluster.

Planning, admission within the memory budget, retries, dead letters and the manifest stay
in the coordinator (`execute.Executor`); a Dask worker only runs `worker.run_task` on one
chunk, reading its rows from the input file and writing its result into the job's output
directory itself. Inputs and outputs must therefore be on storage every worker sees.

Dask re-runs a task whose worker died on another worker by itself, so a death costs that
chunk's recomputation; a task that keeps killing workers fails with KilledWorker and is
retried or dead-lettered like any failure. A timed-out task cannot be stopped inside Dask:
its worker is restarted through its nanny, as the local pool kills its process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from multiprocessing.connection import Pipe, wait
from typing import TYPE_CHECKING, Any

from minibatch.pool import Failed, Finished, Lost, PoolBroken, Started

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from minibatch.pool import Event
    from minibatch.worker import Task, TaskError

CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler, at start and after a lost connection


def run_on_worker(task: Task) -> tuple[str, float, int, Any]:
    """Runs inside a Dask worker: ("done" | "error", start time, pid, TaskResult | TaskError)."""
    import pyarrow as pa

    from minibatch.worker import RELEASE_AFTER, describe_error, run_task

    started = time.time()
    try:
        return "done", started, os.getpid(), run_task(task)
    except Exception as exc:  # every failure becomes data, as in a local worker
        return "error", started, os.getpid(), describe_error(exc)
    finally:
        if task.chunk.nbytes >= RELEASE_AFTER:
            pa.default_memory_pool().release_unused()


class DaskPool:
    def __init__(self, address: str, limit: int) -> None:
        from distributed import Client

        for name in list(logging.root.manager.loggerDict):  # distributed sets its own levels
            if name.startswith(("distributed", "tornado")):  # a lost scheduler: the run says so
                logging.getLogger(name).setLevel(logging.CRITICAL)
        self.address = address
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise PoolBroken(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        threads = sum(self.client.nthreads().values())
        if not threads:
            self.client.close()
            raise PoolBroken(f"the Dask cluster at {address} has no workers")
        self.size = min(limit, threads)
        self._futures: dict[int, Any] = {}  # task id -> Future
        self._slots: dict[int, int] = {}  # task id -> virtual slot, for the report's timeline
        self._submitted: dict[int, float] = {}  # task id -> monotonic time
        self._cancelled: set[int] = set()
        self._done_r, self._done_w = Pipe(duplex=False)  # done callbacks -> poll()

    def has_room(self) -> bool:
        return len(self._futures) < self.size

    def submit(self, task: Task) -> None:
        free = set(range(self.size)) - set(self._slots.values())
        self._slots[task.task_id] = min(free) if free else 0
        self._submitted[task.task_id] = time.monotonic()
        with self._scheduler_calls():
            future = self.client.submit(
                run_on_worker, task, key=f"minibatch-{task.run_id}-{task.task_id}", pure=False
            )
        self._futures[task.task_id] = future
        future.add_done_callback(lambda _, task_id=task.task_id: self._done_w.send(task_id))

    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[Event]:
        ready = wait([self._done_r, *extra], timeout)
        events: list[Event] = []
        if self._done_r in ready:
            while self._done_r.poll():
                task_id = self._done_r.recv()
                if task_id in self._futures:
                    events.extend(self._collect(task_id))
        return events

    def _collect(self, task_id: int) -> list[Event]:
        from distributed.client import FutureCancelledError

        future = self._futures.pop(task_id)
        slot = self._slots.pop(task_id)
        self._submitted.pop(task_id)
        try:
            kind, started, pid, payload = future.result()
        except FutureCancelledError as exc:
            if "connection-lost" in str(exc) or self.client.status != "running":
                raise PoolBroken(f"lost the Dask scheduler at {self.address}") from None
            return [Lost(task_id)]  # cancelled by someone else before it ran: not its fault
        except Exception as exc:  # KilledWorker: it took workers down with it, more than once
            return [Failed(task_id, _error("died", exc))]
        outcome = Finished(task_id, payload) if kind == "done" else Failed(task_id, payload)
        return [Started(task_id, pid, slot, started), outcome]

    def overdue(self, timeout: float, now: float | None = None) -> list[int]:
        """Task ids (the "slots" a timeout kills) running longer than `timeout` seconds.

        Counted from submission: admission keeps no more tasks in flight than the cluster has
        threads, so a task starts about when it is submitted."""
        now = time.monotonic() if now is None else now
        return [task_id for task_id, at in self._submitted.items() if now - at > timeout]

    def kill(self, task_id: int, error: TaskError) -> list[Event]:
        future = self._futures.pop(task_id)
        self._slots.pop(task_id)
        self._submitted.pop(task_id)
        with self._scheduler_calls():
            workers = [w for w, keys in self.client.processing().items() if future.key in keys]
            future.cancel()
            if workers:  # free the thread the task is stuck in
                self.client.restart_workers(workers, raise_for_error=False)
        return [Failed(task_id, error)]

    @contextlib.contextmanager
    def _scheduler_calls(self) -> Iterator[None]:
        """Calls that need the scheduler: losing it is the run's end, not a traceback."""
        from distributed.client import ClosedClientError
        from distributed.comm.core import CommClosedError

        try:
            yield
        except (ClosedClientError, CommClosedError, OSError, TimeoutError) as exc:
            raise PoolBroken(f"lost the Dask scheduler at {self.address}: {exc}") from None

    def stop_starting(self) -> None:
        """Nothing waits here beyond what runs: in-flight tasks are running tasks."""

    def terminate(self) -> None:
        if self._futures and self.client.status == "running":
            with contextlib.suppress(Exception):  # going away anyway
                self.client.cancel(list(self._futures.values()))
        self._futures.clear()
        self.client.close()
        self._done_r.close()
        self._done_w.close()


def _error(kind: str, exc: BaseException) -> TaskError:
    from minibatch.worker import TaskError

    return TaskError(kind=kind, type=type(exc).__name__, message=str(exc), traceback="")
