"""Worker processes, one pipe each, supervised by the coordinator; and an in-process pool.

Invariant this module owns: every task submitted gets exactly one final event (Finished,
Failed or Lost), whatever happens to its worker; a task that never started is Lost (resubmit
it without charge), never Failed.

Not `ProcessPoolExecutor`: one dead worker there fails every in-flight future and the pool
with it, and a running task cannot be stopped. Here each slot is one process; a death or a
timeout costs only the task that was running in it, and the slot is restarted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from minibatch.clock import SYSTEM, Clock
from minibatch.states import ErrorKind
from minibatch.tasks import (
    Failed,
    Finished,
    Lost,
    PoolBroken,
    PoolEvent,
    Started,
    Task,
    TaskError,
    TaskResult,
    said,
)

QUEUE_DEPTH = 2  # tasks sent ahead per worker, so no worker idles for a round trip


@dataclass
class _Slot:
    process: BaseProcess
    conn: Connection
    queue: deque[int] = field(default_factory=deque)
    started_at: float | None = None  # monotonic time the head of the queue started


def _context(duckdb: bool = False, free_at_once: bool = False) -> multiprocessing.context.ForkServerContext:
    # Forking a process whose pyarrow/DuckDB threads are running is unsafe, and forked children
    # inherit descriptors such as the job lock; the forkserver is a clean process that
    # imports the heavy modules once and forks workers from there.
    # pyarrow.compute too: most job functions use it, and it costs each new worker ~80 ms.
    # (The modules count only when the forkserver starts: the first run of a process decides.)
    ctx = multiprocessing.get_context("forkserver")
    preload = ["minibatch.allocator", *(["minibatch.allocator_at_once"] if free_at_once else [])]
    preload += ["minibatch.server_signals", "minibatch.worker", "pyarrow.compute"]
    ctx.set_forkserver_preload([*preload, *(["duckdb"] if duckdb else [])])
    return ctx


def warm_up(duckdb: bool = True, free_at_once: bool = False) -> None:
    """Start the forkserver now (it imports pyarrow, and DuckDB for a job whose workers run
    SQL, meanwhile) so that the first workers fork from a ready server instead of waiting for
    those imports. Without `duckdb` a job's workers never import it (~0.13 s of the server's
    start, on the way to the first chunk), and one that does imports it itself. `free_at_once`:
    see allocator_at_once (the first run of a process decides, as for the modules)."""
    import multiprocessing.forkserver

    _context(duckdb, free_at_once)
    if threading.current_thread() is not threading.main_thread():  # (signals are the main thread's)
        multiprocessing.forkserver.ensure_running()
        return
    # A terminal's Ctrl-C goes to the whole process group: the server, importing its modules,
    # printed a KeyboardInterrupt traceback. It starts ignoring SIGINT, as it would after them.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


class WorkerPool:
    def __init__(self, size: int, memory_cap: int | None, free_at_once: bool = False) -> None:
        self.most = size
        self.memory_cap, self.free_at_once = memory_cap, free_at_once
        self._ctx = _context(free_at_once=free_at_once)  # (for a forkserver started anew mid-run)
        self._stopping = self._ctx.Event()
        # One worker now, the others when a task finds every started one busy: one that the budget
        # never lets run a chunk beside another would only hold memory.
        self._slots: list[_Slot] = [self._spawn()]

    def _spawn(self, tries: int = 2) -> _Slot:
        from minibatch.worker import worker_main

        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(child, self.memory_cap, self._stopping, self.free_at_once),
            daemon=True,
            name="minibatch-worker",
        )
        try:
            process.start()
        except (EOFError, OSError) as exc:  # the forkserver died (killed?) as it forked the worker
            parent.close()
            if tries > 1:  # once it is reaped, a new one starts
                time.sleep(0.1)
                return self._spawn(tries - 1)
            raise PoolBroken(f"cannot start a worker process (its forkserver failed: {said(exc)})") from exc
        finally:
            child.close()
        return _Slot(process=process, conn=parent)

    @property
    def size(self) -> int:
        return len(self._slots)

    def pids(self) -> list[int]:
        return [pid for slot in self._slots if (pid := slot.process.pid) is not None]

    @property
    def idle(self) -> bool:
        return not any(slot.queue for slot in self._slots)

    def has_room(self) -> bool:
        return len(self._slots) < self.most or any(len(slot.queue) < QUEUE_DEPTH for slot in self._slots)

    def would_start(self) -> bool:
        return len(self._slots) < self.most and all(slot.queue for slot in self._slots)

    def submit(self, task: Task) -> int | None:
        """Queue `task` with the least busy worker, first starting one if every worker is busy
        and the pool may have more; returns the pid of a worker started for it."""
        started = None
        if self.would_start():
            try:
                self._slots.append(self._spawn())
                started = self._slots[-1].process.pid
            except PoolBroken:  # (twice: see _spawn) the run goes on with the workers it has
                self.most = len(self._slots)
        slot = min(self._slots, key=lambda s: len(s.queue))
        slot.queue.append(task.task_id)
        # If the worker died, its sentinel reports it and the task comes back as Lost.
        with contextlib.suppress(OSError):
            slot.conn.send(task)
        return started

    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[PoolEvent]:
        """Wait for messages or deaths (or a ready object in `extra`); return what happened."""
        by_conn = {slot.conn: slot for slot in self._slots}
        by_sentinel = {slot.process.sentinel: slot for slot in self._slots}
        ready = wait([*by_conn, *by_sentinel, *extra], timeout)
        events: list[PoolEvent] = []
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

    def kill(self, handle: int, error: TaskError) -> list[PoolEvent]:
        """Stop slot `handle` at once (its running task fails with `error`) and restart it.

        If that task finished just before the kill, the one started after it is not to blame:
        it comes back as Lost.
        """
        slot = self._slots[handle]
        victim = slot.queue[0] if slot.queue and slot.started_at is not None else None
        slot.process.kill()
        slot.process.join()
        return self._replace(slot, error, victim)

    def _drain(self, slot: _Slot) -> list[PoolEvent]:
        events: list[PoolEvent] = []
        try:
            while slot.conn.poll():
                events.append(self._message(slot, slot.conn.recv()))
        except (EOFError, OSError):
            pass  # died; the sentinel will say so
        return events

    def _message(self, slot: _Slot, message: tuple[str, int, Any]) -> PoolEvent:
        kind, task_id, payload = message
        if kind == "start":
            slot.started_at = time.monotonic()
            return Started(task_id, slot.process.pid or 0, self._slots.index(slot), payload)
        slot.queue.popleft()
        slot.started_at = None
        if kind == "unstarted":
            return Lost(task_id)
        return Finished(task_id, payload) if kind == "done" else Failed(task_id, payload)

    def _replace(self, slot: _Slot, error: TaskError | None, victim: int | None = None) -> list[PoolEvent]:
        events = self._drain(slot)
        slot.process.join()
        events.extend(self._orphans(slot, error or _death(slot.process), victim))
        slot.conn.close()
        self._slots[self._slots.index(slot)] = self._spawn()
        return events

    def _orphans(self, slot: _Slot, error: TaskError, victim: int | None) -> list[PoolEvent]:
        events: list[PoolEvent] = []
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
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: out of memory or by an operator?)" if name == "SIGKILL" else ""
        message = f"worker pid {process.pid} died with signal {name}{hint}"
    else:
        message = f"worker pid {process.pid} exited with code {code} mid-chunk"
    return TaskError(kind=ErrorKind.DIED, type="WorkerDied", message=message, traceback="")


class Hang(Exception):
    """Raised by an `InlinePool` task function: the attempt runs until it is killed."""


class InlinePool:
    """A pool in the coordinator's own process, for tests of the executor: each poll runs one
    queued task per free slot, one after the other, on the injected clock, through `run` (default: the
    worker's `run_task`, so results are real files). `run` may return a TaskError (a worker
    death, say) or raise `Hang` (an attempt that ends only when killed)."""

    def __init__(
        self, size: int, run: Callable[[Task], TaskResult | TaskError] | None = None, clock: Clock = SYSTEM
    ) -> None:
        self.size = size
        self.run = run or _run_in_process
        self.clock = clock
        self.queue: deque[Task] = deque()
        self.hung: dict[int, tuple[Task, float]] = {}  # slot -> (task, monotonic start)
        self.stopping = False

    def has_room(self) -> bool:
        return len(self.queue) + len(self.hung) < self.size * QUEUE_DEPTH

    def would_start(self) -> bool:
        return False

    def pids(self) -> list[int]:
        return []

    def submit(self, task: Task) -> None:
        self.queue.append(task)

    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[PoolEvent]:
        if self.stopping:
            lost: list[PoolEvent] = [Lost(task.task_id) for task in self.queue]
            self.queue.clear()
            if lost:
                return lost
        events: list[PoolEvent] = []
        for slot in [i for i in range(self.size) if i not in self.hung]:  # one task per free slot
            if self.queue:
                events += self._run(self.queue.popleft(), slot)
        if not events:
            self.clock.sleep(timeout or 0.0)
        return events

    def _run(self, task: Task, slot: int) -> list[PoolEvent]:
        started = Started(task.task_id, os.getpid(), slot, self.clock.time())
        try:
            outcome = self.run(task)
        except Hang:
            self.hung[slot] = (task, self.clock.monotonic())
            return [started]
        except Exception as exc:  # the job's error, as a worker would report it
            error = TaskError(ErrorKind.ERROR, type(exc).__name__, said(exc), traceback.format_exc())
            return [started, Failed(task.task_id, error)]
        if isinstance(outcome, TaskError):
            return [started, Failed(task.task_id, outcome)]
        return [started, Finished(task.task_id, outcome)]

    def overdue(self, timeout: float, now: float | None = None) -> list[int]:
        now = self.clock.monotonic() if now is None else now
        return [slot for slot, (_, began) in self.hung.items() if now - began > timeout]

    def kill(self, handle: int, error: TaskError) -> list[PoolEvent]:
        task, _ = self.hung.pop(handle)
        return [Failed(task.task_id, error)]

    def stop_starting(self) -> None:
        self.stopping = True

    def terminate(self) -> None:
        self.queue.clear()
        self.hung.clear()


def _run_in_process(task: Task) -> TaskResult | TaskError:
    from minibatch.worker import describe_error, run_task

    try:
        return run_task(task)
    except Exception as exc:
        return describe_error(exc)
