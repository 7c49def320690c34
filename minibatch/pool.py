"""Worker processes, one pipe each, supervised by the coordinator.

Not `ProcessPoolExecutor`: one dead worker there fails every in-flight future and the pool
with it, and a running task cannot be stopped. Here each slot is one process; a death or a
timeout costs only the task that was running in it, and the slot is restarted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the worker module imports pyarrow and DuckDB; warm_up() must not wait for them
    from minibatch.worker import Task, TaskError, TaskResult

QUEUE_DEPTH = 2  # tasks sent ahead per worker, so no worker idles for a round trip


@dataclass
class Started:
    task_id: int
    pid: int
    slot: int
    at: float  # unix time the worker started the task


@dataclass
class Finished:
    task_id: int
    result: TaskResult


@dataclass
class Failed:
    task_id: int
    error: TaskError


@dataclass
class Lost:
    """Sent to a worker that died before starting it: resubmit without charging an attempt."""

    task_id: int


Event = Started | Finished | Failed | Lost


class PoolBroken(Exception):
    """The pool cannot go on (e.g. the Dask scheduler is gone); the run fails, the next resumes."""


class Pool(Protocol):
    """What the coordinator drives: `WorkerPool` here, or `dask_pool.DaskPool`."""

    size: int

    def has_room(self) -> bool: ...
    def submit(self, task: Task) -> None: ...
    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[Event]: ...
    def overdue(self, timeout: float, now: float | None = None) -> list[int]: ...
    def kill(self, handle: int, error: TaskError) -> list[Event]: ...
    def stop_starting(self) -> None: ...
    def terminate(self) -> None: ...


@dataclass
class _Slot:
    process: BaseProcess
    conn: Connection
    queue: deque[int] = field(default_factory=deque)
    started_at: float | None = None  # monotonic time the head of the queue started


class MemoryBudget:
    """Admission: reserve a chunk's estimated bytes before submit, release when it completes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return self.in_flight == 0 or self.in_flight + nbytes <= self.limit

    def reserve(self, nbytes: int) -> None:
        self.in_flight += nbytes
        self.peak = max(self.peak, self.in_flight)

    def release(self, nbytes: int) -> None:
        self.in_flight -= nbytes


def _context() -> multiprocessing.context.BaseContext:
    # Forking a process whose pyarrow/DuckDB threads are running is unsafe, and forked children
    # inherit descriptors such as the job lock; the forkserver is a clean process that
    # imports the heavy modules once and forks workers from there.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["minibatch.worker"])
    return ctx


def warm_up() -> None:
    """Start the forkserver now (it imports pyarrow and DuckDB meanwhile) so that the first
    workers fork from a ready server instead of waiting for those imports."""
    import multiprocessing.forkserver

    _context()
    multiprocessing.forkserver.ensure_running()


class WorkerPool:
    def __init__(self, size: int, memory_cap: int | None) -> None:
        self.size = size
        self.memory_cap = memory_cap
        self._ctx = _context()
        self._stopping = self._ctx.Event()
        self._slots: list[_Slot] = [self._spawn() for _ in range(size)]

    def _spawn(self) -> _Slot:
        from minibatch.worker import worker_main

        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(child, self.memory_cap, self._stopping),
            daemon=True,
            name="minibatch-worker",
        )
        process.start()
        child.close()
        return _Slot(process=process, conn=parent)

    @property
    def idle(self) -> bool:
        return not any(slot.queue for slot in self._slots)

    def has_room(self) -> bool:
        return any(len(slot.queue) < QUEUE_DEPTH for slot in self._slots)

    def submit(self, task: Task) -> None:
        slot = min(self._slots, key=lambda s: len(s.queue))
        slot.queue.append(task.task_id)
        # If the worker died, its sentinel reports it and the task comes back as Lost.
        with contextlib.suppress(OSError):
            slot.conn.send(task)

    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[Event]:
        """Wait for messages or deaths (or a ready object in `extra`); return what happened."""
        by_conn = {slot.conn: slot for slot in self._slots}
        by_sentinel = {slot.process.sentinel: slot for slot in self._slots}
        ready = wait([*by_conn, *by_sentinel, *extra], timeout)
        events: list[Event] = []
        for item in ready:
            if item in by_conn:
                events.extend(self._drain(by_conn[item]))
        for item in ready:
            if item in by_sentinel:
                events.extend(self._replace(by_sentinel[item], None))
        return events

    def stop_starting(self) -> None:
        """Workers hand back the tasks queued with them instead of starting them."""
        self._stopping.set()

    def overdue(self, timeout: float, now: float | None = None) -> list[int]:
        """Indexes of slots whose running task has run longer than `timeout` seconds."""
        now = time.monotonic() if now is None else now
        return [
            i
            for i, slot in enumerate(self._slots)
            if slot.started_at is not None and now - slot.started_at > timeout
        ]

    def kill(self, index: int, error: TaskError) -> list[Event]:
        """Stop slot `index` at once (its running task fails with `error`) and restart it.

        If that task finished just before the kill, the one started after it is not to blame:
        it comes back as Lost.
        """
        slot = self._slots[index]
        victim = slot.queue[0] if slot.queue and slot.started_at is not None else None
        slot.process.kill()
        slot.process.join()
        return self._replace(slot, error, victim)

    def _drain(self, slot: _Slot) -> list[Event]:
        events: list[Event] = []
        try:
            while slot.conn.poll():
                events.append(self._message(slot, slot.conn.recv()))
        except (EOFError, OSError):
            pass  # died; the sentinel will say so
        return events

    def _message(self, slot: _Slot, message: tuple[str, int, Any]) -> Event:
        kind, task_id, payload = message
        if kind == "start":
            slot.started_at = time.monotonic()
            return Started(task_id, slot.process.pid or 0, self._slots.index(slot), payload)
        slot.queue.popleft()
        slot.started_at = None
        if kind == "unstarted":
            return Lost(task_id)
        return Finished(task_id, payload) if kind == "done" else Failed(task_id, payload)

    def _replace(self, slot: _Slot, error: TaskError | None, victim: int | None = None) -> list[Event]:
        events = self._drain(slot)
        slot.process.join()
        events.extend(self._orphans(slot, error or _death(slot.process), victim))
        slot.conn.close()
        self._slots[self._slots.index(slot)] = self._spawn()
        return events

    def _orphans(self, slot: _Slot, error: TaskError, victim: int | None) -> list[Event]:
        events: list[Event] = []
        if slot.queue and slot.started_at is not None and victim in (None, slot.queue[0]):
            events.append(Failed(slot.queue.popleft(), error))
        events.extend(Lost(task_id) for task_id in slot.queue)
        slot.queue.clear()
        return events

    def terminate(self) -> None:
        """Kill every worker. Safe at any time: a chunk cut short was not recorded, and its
        result is either absent or complete (published by an atomic rename)."""
        for slot in self._slots:
            if slot.process.is_alive():
                slot.process.kill()
            slot.process.join()
            slot.conn.close()


def _death(process: BaseProcess) -> TaskError:
    from minibatch.worker import TaskError

    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: out of memory or by an operator?)" if name == "SIGKILL" else ""
        message = f"worker pid {process.pid} died with signal {name}{hint}"
    else:
        message = f"worker pid {process.pid} exited with code {code} mid-chunk"
    return TaskError(kind="died", type="WorkerDied", message=message, traceback="")
