"""The coordinator's loop: admit chunks within the memory budget, retry, time out, stop.

It owns what happens to a chunk between the plan and the ledger: it hands tasks to a pool,
publishes finished results through the result store and reports every outcome to the
ledger. The clock, the random source and the pool are injected: tests drive the loop with an
in-process pool and a fake clock, in milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minibatch.admission import MemoryBudget, MemoryModel, backoff, frees_at_once, worker_memory_cap
from minibatch.breaker import CircuitBreaker
from minibatch.clock import SYSTEM, Clock
from minibatch.events import RunEvents
from minibatch.layout import part_name, staged_name
from minibatch.ledger import Ledger
from minibatch.planner import Chunk
from minibatch.records import AttemptRecord
from minibatch.results import CONFORM, ResultStore, SchemaGate
from minibatch.signals import StopSignals
from minibatch.states import Breaker, ErrorKind, EventKind, Outcome
from minibatch.tasks import (
    DETERMINISTIC,
    FIXES,
    Failed,
    Finished,
    JobSpec,
    Lost,
    Pool,
    PoolBroken,
    PoolEvent,
    Started,
    Task,
    TaskError,
    TaskResult,
)

if TYPE_CHECKING:
    from minibatch.config import JobConfig
    from minibatch.treemem import TreeMemory


def open_pool(job: JobConfig, todo: int) -> Pool:
    """The executor seam: local worker processes, or tasks on a Dask cluster."""
    if job.executor == "dask":
        from minibatch.dask_pool import DaskPool

        assert job.dask_scheduler is not None
        return DaskPool(job.dask_scheduler, limit=todo)
    from minibatch.pool import WorkerPool

    return WorkerPool(min(job.workers, todo), worker_memory_cap(job), frees_at_once(job))


@dataclass
class _InFlight:
    chunk: Chunk
    attempt: int  # 0: a result staged by an earlier run, salvaged
    reserved: int
    admitted_at: float  # unix time
    started: Started | None = None


_Done = tuple[_InFlight, TaskResult]
FAIL_FAST = 2  # chunks failing alike, before any success, that stop a run whose code is broken
BREAKER_EVENTS = {state: EventKind(f"breaker_{state}") for state in Breaker}


@dataclass
class Execution:
    """What the loop leaves for the run's record."""

    workers: int = 0
    stopped: bool = False
    error: str | None = None  # why the run cannot finish: breaker, lost cluster
    changed: set[str] = field(default_factory=set)  # input files rewritten under the run
    removed: dict[str, int] = field(default_factory=dict)  # input files removed -> their chunks
    busy_seconds: float = 0.0  # summed over attempts, for the run's worker utilisation
    peak_in_flight: int = 0  # the most budget bytes reserved at once
    peak_memory: int | None = None  # measured: the most the process tree held above idle
    idle_memory: int | None = None  # measured: the tree before the first chunk, and workers started later


class Executor:
    def __init__(
        self,
        job: JobConfig,
        spec: JobSpec,
        run_id: str,
        *,
        store: ResultStore,
        ledger: Ledger,
        events: RunEvents,
        signals: StopSignals,
        pool_factory: Callable[[int], Pool],
        clock: Clock = SYSTEM,
        rng: random.Random | None = None,
        memory: TreeMemory | None = None,
        model: MemoryModel | None = None,
    ) -> None:
        self.job, self.spec, self.run_id = job, spec, run_id
        self.store, self.ledger, self.events, self.signals = store, ledger, events, signals
        self.pool_factory, self.clock, self.rng, self.memory = pool_factory, clock, rng, memory
        self.pending: deque[Chunk] = deque()
        self.retry_at: list[tuple[float, int, Chunk]] = []  # heap of (ready time, seq, chunk)
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[int, _InFlight] = {}
        self.budget = MemoryBudget(job.memory_limit)
        self.model = model or MemoryModel()
        self.ids = itertools.count()
        self.stop_deadline: float | None = None
        self.breaker = CircuitBreaker(job.breaker)
        self.probe: int | None = None  # the task let through by a half-open breaker
        self.gate: SchemaGate[_Done]  # the output's schema, and results waiting for it
        self.pool: Pool
        self.out = Execution()
        self.successes = 0
        self.same_error: dict[tuple[str, str], set[str]] = {}  # error -> chunks it failed

    def run(self, todo: list[Chunk], salvaged: Sequence[tuple[Chunk, TaskResult]] = ()) -> Execution:
        """Run `todo` to the end (or a stop); `salvaged` are finished results of earlier runs."""
        self.gate = self.store.gate(c.chunk_id for c in todo)
        done = {chunk.chunk_id for chunk, _ in salvaged}
        self.pending.extend(c for c in todo if c.chunk_id not in done)
        for chunk, result in salvaged:
            self._finished(_InFlight(chunk, 0, 0, self.clock.time()), result, probe=False)
        if self.pending or self.retry_at:
            self._loop()
        self.out.peak_in_flight = self.budget.peak
        return self.out

    def _loop(self) -> None:
        try:
            pool = self.pool = self.pool_factory(len(self.pending) + len(self.retry_at))
            try:
                if self.memory is not None:
                    self.memory.start(pool.pids)  # the idle baseline: a worker started, no chunk yet
                    self.budget.hold(self.model.start(pool.size))
                while self._work_left():
                    self._admit()
                    self._step()
            finally:
                self.out.workers = pool.size  # the workers it started
                pool.terminate()  # idle now, or stopping at once: nothing left to wait for
                if self.memory is not None and self.memory.available:
                    self.memory.stop()
                    self.out.peak_memory, self.out.idle_memory = self.memory.peak, self.memory.idle
        except PoolBroken as exc:  # chunks in flight are not recorded: the next run does them
            self.out.error = f"{exc}; {len(self.in_flight) + len(self.pending)} chunks left to do"
            return
        if self.out.error:  # halted
            return
        # in_flight is non-empty when the grace period ran out or a second signal came
        self.out.stopped = self.signals.requested and bool(self.pending or self.retry_at or self.in_flight)
        if self.breaker.tripped:
            untried = len({c.chunk_id for c in self.pending} | {c.chunk_id for _, _, c in self.retry_at})
            self.out.error = (
                f"circuit breaker opened ({self.breaker.reason}) and the trial chunk after the "
                f"{self.job.breaker.cooldown:g}s cool-down failed too; {untried} chunks left pending"
            )

    def _work_left(self) -> bool:
        if self.signals.immediate or self._grace_over():
            return False
        if self.signals.requested or self.breaker.tripped or self.out.error:
            return bool(self.in_flight)
        return bool(self.pending or self.retry_at or self.in_flight)

    def _grace_over(self) -> bool:
        return self.stop_deadline is not None and self.clock.monotonic() > self.stop_deadline

    # -- admission ------------------------------------------------------------------------------

    def _admit(self) -> None:
        if self.signals.requested or self.out.error:
            return
        now = self.clock.monotonic()
        while self.retry_at and self.retry_at[0][0] <= now:
            self.pending.appendleft(heapq.heappop(self.retry_at)[2])
        while self.pending and self.pool.has_room():
            chunk = self.pending[0]
            need = self.model.estimate(chunk)
            room = need + (self.model.room_to_start() if self.pool.would_start() else 0)
            if not self.budget.fits(room) or self._measured_over() or not self.breaker.allow(now):
                break
            self.pending.popleft()
            task_id = self._submit(chunk, need)
            if self.breaker.state == Breaker.HALF_OPEN:
                self.probe = task_id

    def _measured_over(self) -> bool:
        # Measured over the budget: admit nothing, whatever the estimates say (but one chunk when none runs)
        return self.memory is not None and bool(self.in_flight) and self.memory.current > self.budget.limit

    def _submit(self, chunk: Chunk, need: int) -> int:
        attempt = self.attempts.get(chunk.chunk_id, 0) + 1
        task_id = next(self.ids)
        self.budget.reserve(need)
        self.in_flight[task_id] = _InFlight(chunk, attempt, need, self.clock.time())
        name = part_name(chunk.chunk_id)
        staged, schema = staged_name(name, self.run_id, attempt), self.gate.schema
        task = Task(task_id, chunk, self.spec, self.run_id, attempt, name, staged, schema)
        pid = self.memory.starting(lambda: self.pool.submit(task)) if self.memory else self.pool.submit(task)
        if pid is not None:  # a worker started for it (none if starting one failed: PoolBroken)
            self.budget.hold(self.model.start(1))
        return task_id

    # -- waiting --------------------------------------------------------------------------------

    def _step(self) -> None:
        events = self.pool.poll(self._wait_time(), extra=[self.signals.wakeup])
        self._on_signals()
        for event in events:
            self._handle(event)
        self._kill_overdue()
        self.ledger.tick()

    def _wait_time(self) -> float:
        now = self.clock.monotonic()
        deadlines = [self.ledger.next_flush(), now + 1.0]
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        elif self.retry_at:  # once stopping, due retries are not admitted: don't wake for them
            deadlines.append(self.retry_at[0][0])
        if self.breaker.state == Breaker.OPEN and self.breaker.open_until > now:
            deadlines.append(self.breaker.open_until)
        return max(0.0, min(deadlines) - now)

    def _on_signals(self) -> None:
        self.signals.drain()
        if self.signals.requested and self.stop_deadline is None:
            self.stop_deadline = self.clock.monotonic() + self.job.stop_grace
            self.pool.stop_starting()
            self.events(
                EventKind.STOP_REQUESTED, signal=self.signals.last, in_flight=len(self.in_flight),
                grace_seconds=self.job.stop_grace,
            )  # fmt: skip

    def _kill_overdue(self) -> None:
        for handle in self.pool.overdue(self.job.timeout, self.clock.monotonic()):
            why = f"chunk attempt exceeded timeout of {self.job.timeout:g}s"
            error = TaskError(kind=ErrorKind.TIMEOUT, type="ChunkTimeout", message=why, traceback="")
            for event in self.pool.kill(handle, error):
                self._handle(event)

    # -- outcomes -------------------------------------------------------------------------------

    def _handle(self, event: PoolEvent) -> None:
        if not isinstance(event, Started):
            self._complete(event)
            return
        item = self.in_flight[event.task_id]
        item.started = event
        self.events(
            EventKind.CHUNK_STARTED, chunk=item.chunk.chunk_id, attempt=item.attempt, pid=event.pid,
            in_flight=self.budget.in_flight, budget=self.budget.limit,
        )  # fmt: skip

    def _complete(self, event: Finished | Failed | Lost) -> None:
        item = self.in_flight.pop(event.task_id)
        self.budget.release(item.reserved)
        probe = event.task_id == self.probe
        if isinstance(event, Finished):
            self._finished(item, event.result, probe)
            return
        if isinstance(event, Failed) and item.started:
            self.model.failed(item.started.pid)
        if isinstance(event, Lost):
            self.pending.appendleft(item.chunk)
        elif event.error.kind in (ErrorKind.INPUT_CHANGED, ErrorKind.INPUT_REMOVED):
            self._input_changed(item, event.error)
        elif event.error.kind == ErrorKind.ENVIRONMENT:
            self._halt(item, event.error)
        else:
            self.attempts[item.chunk.chunk_id] = item.attempt
            self._breaker_failure(probe)
            self._failed(item, event.error)
            return
        if probe:  # no outcome to judge the breaker by: let another chunk try
            self.breaker.cancel_probe()

    def _halt(self, item: _InFlight, error: TaskError) -> None:
        """A full disk (or the like) is the machine's fault: the chunk is not charged, goes back
        to the queue, and the run stops admitting and fails, its chunks left to do."""
        self._record_attempt(item, Outcome.RETRIED, err=error)
        self.pending.appendleft(item.chunk)
        fix = FIXES.get(error.type, "free space, or fix the filesystem, and run again")
        self._stop_admitting(f"{error.type}: {error.message} ({fix})")

    def _stop_admitting(self, why: str) -> None:
        if self.out.error is None:
            self.out.error = why
            self.events(EventKind.RUN_HALTED, error=why, in_flight=len(self.in_flight))

    def _code_is_broken(self, item: _InFlight, error: TaskError) -> bool:
        """The first chunks all fail with one error no retry mends (a TypeError, a SQL binder
        error): the job's code is broken, and trying every chunk burns time. The chunk is dead-
        lettered and the run stops; had the data been the cause, the next run skips it."""
        if self.successes or error.type not in DETERMINISTIC:
            return False
        chunks = self.same_error.setdefault((error.type, error.message), set())
        chunks.add(item.chunk.chunk_id)
        return len(chunks) >= FAIL_FAST

    def _input_changed(self, item: _InFlight, error: TaskError) -> None:
        if error.kind == ErrorKind.INPUT_REMOVED:
            self.out.removed[item.chunk.path] = self.out.removed.get(item.chunk.path, 0) + 1
        else:
            self.out.changed.add(item.chunk.path)
        self._record_attempt(item, Outcome.INPUT_CHANGED, err=error)
        self.events(EventKind.CHUNK_INPUT_CHANGED, chunk=item.chunk.chunk_id, error=error.message)
        self._accept_all(self.gate.resolve(item.chunk.chunk_id))

    def _finished(self, item: _InFlight, result: TaskResult, probe: bool) -> None:
        """The worker is done; the result waits, staged, until the output schema is decided."""
        self.attempts[item.chunk.chunk_id] = item.attempt
        self.breaker.record(True, self.clock.monotonic(), probe)
        pid = item.started.pid if item.started else None
        learned = self.model.learn(pid, item.chunk.size, result.start_rss, result.peak_rss, self.memory)
        self.budget.hold(learned)  # a start-up, once this run learns it
        if result.staged is None and result.schema is not None and self.store.empty_schema is None:
            self.store.empty_schema = result.schema
        rows_schema = result.schema if result.staged is not None else None
        self._accept_all(self.gate.offer(item.chunk.chunk_id, rows_schema, (item, result)))

    def _accept_all(self, released: list[_Done]) -> None:
        self.store.schema = self.gate.schema
        for item, result in released:
            self._accept(item, result)

    def _accept(self, item: _InFlight, result: TaskResult) -> None:
        error = self.store.publish(result, item.chunk.chunk_id)
        if error is None:
            self._record_attempt(item, Outcome.DONE, result)
            self.successes += 1
            self.ledger.done(item.chunk, item.attempt, result, self.budget.in_flight)
        elif error.type == CONFORM:  # staged before the output schema was known: again, to it
            self.attempts[item.chunk.chunk_id] = max(item.attempt - 1, 0)  # not charged
            self.pending.appendleft(item.chunk)
        elif error.kind == ErrorKind.ENVIRONMENT:
            self._halt(item, error)
        else:
            self._breaker_failure(False)
            self._failed(item, error, result)

    def _breaker_failure(self, probe: bool) -> None:
        was = self.breaker.state
        self.breaker.record(False, self.clock.monotonic(), probe)
        if self.breaker.state != was:
            self.events(
                BREAKER_EVENTS[self.breaker.state], reason=self.breaker.reason,
                cooldown=self.job.breaker.cooldown, pending=len(self.pending),
            )  # fmt: skip

    def _failed(self, item: _InFlight, error: TaskError, result: TaskResult | None = None) -> None:
        broken = self._code_is_broken(item, error)
        if broken or item.attempt > self.job.retries:  # a retry cannot mend broken code
            self._record_attempt(item, Outcome.DEAD, result, error)
            self.ledger.dead_letter(item.chunk, item.attempt, error, self.budget.in_flight)
            self._accept_all(self.gate.resolve(item.chunk.chunk_id))
            if broken:
                self._stop_admitting(
                    f"{error.type}: {error.message} (the first {FAIL_FAST} chunks failed with it before "
                    f"any succeeded: fix the job, then `minibatch retry {self.job.name}`)"
                )
            return
        self._record_attempt(item, Outcome.RETRIED, result, error)
        delay = backoff(item.attempt, self.job.retry_backoff, rng=self.rng)
        heapq.heappush(self.retry_at, (self.clock.monotonic() + delay, next(self.ids), item.chunk))
        self.events(
            EventKind.CHUNK_RETRY, chunk=item.chunk.chunk_id, label=item.chunk.label, attempt=item.attempt,
            delay=round(delay, 3), error=f"{error.type}: {error.message}", in_flight=self.budget.in_flight,
        )  # fmt: skip

    def _record_attempt(
        self, item: _InFlight, how: Outcome, result: TaskResult | None = None, err: TaskError | None = None
    ) -> None:
        if item.attempt == 0:
            return  # a salvaged result: its attempt belongs to the run that computed it
        started, ended = item.started, self.clock.time()
        record = AttemptRecord(
            job=self.job.name, run_id=self.run_id, chunk_id=item.chunk.chunk_id, attempt=item.attempt,
            label=item.chunk.label, slot=started.slot if started else None,
            pid=started.pid if started else None, admitted_at=item.admitted_at,
            started_at=started.at if started else None, ended_at=ended, outcome=how,
            reserved_bytes=item.reserved, chunk_bytes=item.chunk.nbytes, chunk_size=item.chunk.size,
        )  # fmt: skip
        if started is not None:  # (a result waits for the output's schema after its worker is done)
            self.out.busy_seconds += result.seconds if result is not None else max(0.0, ended - started.at)
        self.ledger.attempt(record.measured(result, err))
