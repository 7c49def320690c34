"""The same pool interface as `pool.WorkerPool`, with chunks run as tasks on a Dask cluster.

Planning, admission within the memory budget, retries, dead letters and the manifest stay
in the coordinator (`execute.Executor`); a Dask worker only runs `worker.run_task` on one
chunk, reading its rows from the input file and staging its result beside the job's output
(the coordinator publishes it, as with local workers). Inputs and outputs must therefore be
on storage every worker sees.

Dask re-runs a task whose worker died on another worker by itself, so a death costs that
chunk's recomputation; a task that keeps killing workers fails with KilledWorker and is
retried or dead-lettered like any failure. A timed-out task cannot be stopped inside Dask:
its worker process is killed by its nanny (which starts a new one), as the local pool kills its process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Pipe, wait
from typing import TYPE_CHECKING, Any

from minibatch.pool import QUEUE_DEPTH
from minibatch.states import ErrorKind
from minibatch.tasks import Failed, Finished, Lost, PoolBroken, PoolEvent, Started, Task, TaskError, said

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


# One topic for all runs: the scheduler keeps every topic it has seen (and 1000 events each).
TOPIC = "minibatch-started"
CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler, at start and after a lost connection
REPLACE_TIMEOUT = 30.0  # seconds for a nanny to replace a worker the coordinator ended


def run_on_worker(task: Task) -> tuple[str, float, int, Any]:
    """Runs inside a Dask worker: ("done" | "error", start time, pid, TaskResult | TaskError)."""
    import pyarrow as pa

    from minibatch.worker import RELEASE_AFTER, describe_error, run_task

    started = time.time()
    with contextlib.suppress(Exception):  # only the timeline and timeouts need it
        from distributed import get_worker

        get_worker().log_event(TOPIC, [task.run_id, task.task_id, os.getpid(), started])
    try:
        return "done", started, os.getpid(), run_task(task)
    except Exception as exc:  # every failure becomes data, as in a local worker
        return "error", started, os.getpid(), describe_error(exc)
    finally:
        if task.chunk.size >= RELEASE_AFTER:
            pa.default_memory_pool().release_unused()


def _kill_from_nanny(dask_worker: Any) -> None:
    """Runs in a worker's nanny: SIGKILL the worker process; the nanny starts a new one."""
    if dask_worker.pid:
        os.kill(dask_worker.pid, signal.SIGKILL)


async def _end_worker() -> None:
    """Runs in a worker's event loop (free while a task hangs in its thread): the process
    exits at once, and its nanny starts a new one."""
    os._exit(70)


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
        self._running: dict[int, float] = {}  # task id -> monotonic time its start was reported
        self._task_ids: dict[str, int] = {}  # Dask key -> task id
        self._lanes: dict[int, int] = {}  # worker pid -> its lane on the report's timeline
        self._run_id: str | None = None  # set by the first submit; start events of other runs are ignored
        # Done callbacks and start events arrive on the client's thread; poll() reads them here.
        self._inbox_r, self._inbox_w = Pipe(duplex=False)
        self._inbox_lock = threading.Lock()
        self._looked = self._workers_seen = time.monotonic()  # when poll last asked, and found some

    def has_room(self) -> bool:
        # QUEUE_DEPTH tasks per thread, so a thread finds its next task at the worker instead of
        # waiting for a round trip through the scheduler; the memory budget still bounds them.
        return bool(len(self._futures) < self.size * QUEUE_DEPTH)

    def would_start(self) -> bool:
        return False  # the cluster's workers are its own

    def pids(self) -> list[int]:
        return []  # (remote)

    def submit(self, task: Task) -> None:
        if not self._futures:  # idle till now (a breaker's cool-down, a backoff): not workerless
            self._looked = self._workers_seen = time.monotonic()
        with self._scheduler_calls():
            if self._run_id is None:
                self._run_id = task.run_id
                self.client.subscribe_topic(TOPIC, self._on_started)
            future = self.client.submit(
                run_on_worker, task, key=f"minibatch-{task.run_id}-{task.task_id}", pure=False
            )
        self._futures[task.task_id] = future
        self._task_ids[str(future.key)] = task.task_id
        self._watch(future, task.task_id)

    def _watch(self, future: Any, task_id: int) -> None:
        """Tell the coordinator's poll when the future is done (called in Dask's thread)."""
        future.add_done_callback(lambda _: self._tell(("done", task_id)))

    def _on_started(self, event: tuple[float, list[Any]]) -> None:
        run_id, *start = event[1]
        if run_id == self._run_id:
            self._tell(("start", start))

    def _tell(self, message: tuple[str, Any]) -> None:
        with self._inbox_lock, contextlib.suppress(OSError):  # closed: the pool is gone
            self._inbox_w.send(message)

    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[PoolEvent]:
        ready = wait([self._inbox_r, *extra], timeout)
        events: list[PoolEvent] = []
        if self._inbox_r in ready:
            while self._inbox_r.poll():
                kind, payload = self._inbox_r.recv()
                if kind == "start":
                    events.extend(self._started(*payload))
                elif payload in self._futures:
                    events.extend(self._collect(payload))
        if self._futures and time.monotonic() - self._looked > 1.0:
            self._check_workers()
        return events

    def _check_workers(self) -> None:
        """A cluster left without a worker (each died, no nanny brought one back) ends the run
        REPLACE_TIMEOUT later, as a lost scheduler does: its tasks wait in Dask's `no-worker`
        state, where no timeout sees them, for good."""
        self._looked = now = time.monotonic()
        with self._scheduler_calls():
            if self.client.nthreads():
                self._workers_seen = now
            elif now - self._workers_seen > REPLACE_TIMEOUT:
                raise PoolBroken(f"the Dask cluster at {self.address} has no workers left")

    def _started(self, task_id: int, pid: int, at: float) -> list[PoolEvent]:
        if task_id not in self._futures:
            return []  # finished, killed or cancelled meanwhile
        if task_id in self._running:  # run again after its worker died: time it from now
            self._running[task_id] = time.monotonic()
            return []
        return self._start(task_id, pid, at)

    def _start(self, task_id: int, pid: int, at: float) -> list[PoolEvent]:
        slot = self._lanes.setdefault(pid, len(self._lanes))  # one timeline lane per worker process
        self._running[task_id] = time.monotonic()
        return [Started(task_id, pid, slot, at)]

    def _collect(self, task_id: int) -> list[PoolEvent]:
        from distributed.client import FutureCancelledError

        future = self._futures[task_id]
        if not future.done():  # finished, then lost with a killed worker's memory: computed again
            self._watch(future, task_id)
            return []
        del self._futures[task_id]
        try:
            kind, at, pid, payload = future.result()
        except FutureCancelledError as exc:
            self._running.pop(task_id, None)
            if "connection-lost" in str(exc) or self.client.status != "running":
                raise PoolBroken(f"lost the Dask scheduler at {self.address}") from None
            return [Lost(task_id)]  # cancelled before it ran (a stop): not its fault
        except Exception as exc:  # KilledWorker: it took workers down with it, more than once
            self._running.pop(task_id, None)
            return [Failed(task_id, _error(ErrorKind.DIED, exc))]
        # its start event may be late (then ignored) or lost: the result says when it started
        events = [] if task_id in self._running else self._start(task_id, pid, at)
        self._running.pop(task_id, None)
        outcome = Finished(task_id, payload) if kind == "done" else Failed(task_id, payload)
        return [*events, outcome]

    def overdue(self, timeout: float, now: float | None = None) -> list[int]:
        """Task ids (the "slots" a timeout kills) running for longer than `timeout` seconds,
        counted from the start the worker reported."""
        now = time.monotonic() if now is None else now
        return [task_id for task_id, at in self._running.items() if now - at > timeout]

    def kill(self, handle: int, error: TaskError) -> list[PoolEvent]:
        task_id = handle
        if self._futures[task_id].done():  # it finished just now: its result stands
            return self._collect(task_id)
        future = self._futures.pop(task_id)
        self._running.pop(task_id, None)
        with self._scheduler_calls():
            processing = self.client.processing()
            workers = [w for w, keys in processing.items() if future.key in keys]
            future.cancel()
            if not workers:
                return [Failed(task_id, error)]
            # Free the thread the task is stuck in. The worker's other tasks run again
            # elsewhere: they are not overdue until they report their new start.
            for other in {key for w in workers for key in processing[w]} - {future.key}:
                self._running.pop(self._task_ids.get(other, -1), None)
            self._end_workers(workers)
        return [Failed(task_id, error)]

    def _end_workers(self, workers: list[str]) -> None:
        """Not restart_workers: a nanny gives a worker stuck in a task 4 s to close itself. Its
        nanny kills it at once; a worker without a nanny is asked to end itself."""
        self.client.run(_kill_from_nanny, workers=workers, nanny=True, on_error="ignore")
        self.client.run(_end_worker, workers=workers, wait=False, on_error="ignore")
        self._await_workers(besides=set(workers))

    def _await_workers(self, besides: set[str]) -> None:
        deadline = time.monotonic() + REPLACE_TIMEOUT
        while set(self.client.nthreads()) <= besides:
            if time.monotonic() > deadline:
                raise PoolBroken(f"the Dask cluster at {self.address} has no workers left")
            time.sleep(0.05)

    def stop_starting(self) -> None:
        """Tasks not started yet are cancelled; they come back as Lost, uncharged."""
        waiting = [f for task_id, f in self._futures.items() if task_id not in self._running]
        if waiting:
            with self._scheduler_calls():
                self.client.cancel(waiting)

    @contextlib.contextmanager
    def _scheduler_calls(self) -> Iterator[None]:
        """Calls that need the scheduler: losing it is the run's end, not a traceback."""
        from distributed.client import ClosedClientError
        from distributed.comm.core import CommClosedError

        try:
            yield
        except (ClosedClientError, CommClosedError, OSError, TimeoutError) as exc:
            raise PoolBroken(f"lost the Dask scheduler at {self.address}: {exc}") from None

    def terminate(self) -> None:
        if self._futures and self.client.status == "running":
            with contextlib.suppress(Exception):  # going away anyway
                self.client.cancel(list(self._futures.values()))
        if self._run_id is not None and self.client.status == "running":
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(TOPIC)
        self._futures.clear()
        self.client.close()
        self._inbox_r.close()
        self._inbox_w.close()


def _error(kind: ErrorKind, exc: BaseException) -> TaskError:
    return TaskError(kind=kind, type=type(exc).__name__, message=said(exc), traceback="")
