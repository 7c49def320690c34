"""The coordinator's loop: admit chunks within the memory budget, retry, time out, stop."""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minibatch.breaker import CircuitBreaker
from minibatch.manifest import AttemptRecord
from minibatch.planner import Chunk
from minibatch.pool import Failed, Finished, Lost, MemoryBudget, Pool, PoolBroken, Started, WorkerPool
from minibatch.results import SchemaGate, part_name, publish, staged_name
from minibatch.units import MAX_SIZE
from minibatch.worker import JobSpec, SchemaMismatch, Task, TaskError, TaskResult, check_schema

if TYPE_CHECKING:
    import pyarrow as pa

    from minibatch.config import JobConfig
    from minibatch.runner import Run
    from minibatch.signals import StopSignals

FLUSH_INTERVAL = 1.0  # seconds between manifest commits of finished chunks
BACKOFF_CAP = 60.0
MEMORY_FACTOR = 2.0  # working memory of a chunk ~ its uncompressed input + its result


def backoff(attempt: int, base: float, cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff before attempt number `attempt + 1`."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt - 1, 64)))


def memory_estimate(chunk: Chunk) -> int:
    return int(chunk.nbytes * MEMORY_FACTOR)


def open_pool(job: JobConfig, todo: int) -> Pool:
    """The executor seam: local worker processes, or tasks on a Dask cluster."""
    if job.executor == "dask":
        from minibatch.dask_pool import DaskPool

        assert job.dask_scheduler is not None
        return DaskPool(job.dask_scheduler, limit=todo)
    return WorkerPool(min(job.workers, todo), worker_memory_cap(job))


def worker_memory_cap(job: JobConfig) -> int:
    """Default per-worker address-space cap: a fair share of the budget plus the runtime's own."""
    if job.worker_memory_limit:
        return job.worker_memory_limit
    return min(2 * 2**30 + 4 * job.memory_limit // job.workers, MAX_SIZE)


@dataclass
class _InFlight:
    chunk: Chunk
    attempt: int
    reserved: int
    admitted_at: float  # unix time
    started: Started | None = None


_Done = tuple[_InFlight, TaskResult]


class Executor:
    def __init__(
        self, run: Run, todo: list[Chunk], signals: StopSignals, salvaged: list[tuple[Chunk, TaskResult]]
    ) -> None:
        self.owner = run
        self.job = run.job
        self.signals = signals
        self.salvaged = salvaged
        done = {chunk.chunk_id for chunk, _ in salvaged}
        self.pending: deque[Chunk] = deque(c for c in todo if c.chunk_id not in done)
        self.retry_at: list[tuple[float, int, Chunk]] = []  # heap of (ready time, seq, chunk)
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[int, _InFlight] = {}
        self.budget = MemoryBudget(self.job.memory_limit)
        self.ids = itertools.count()
        self.stopped = False
        self.error: str | None = None  # why the run cannot finish: breaker, lost cluster
        self.stop_deadline: float | None = None
        self.last_flush = time.monotonic()
        self.spec = JobSpec(
            name=self.job.name,
            process=self.job.process,
            sql=self.job.sql,
            columns=self.job.columns,
            base_dir=str(run.config.base_dir),
            parts_dir=str(run.layout.parts),
            staging_dir=str(run.layout.staging),
            definition=run.definition,
        )
        self.pool: Pool | None = None
        self.breaker = CircuitBreaker(self.job.breaker)
        self.probe: int | None = None  # the task let through by a half-open breaker
        # the output's schema, and the results waiting for it to be decided
        self.gate: SchemaGate[_Done] = SchemaGate(run.schema, [c.chunk_id for c in todo])
        self.empty_schema: pa.Schema | None = None  # of a result without rows, for an empty reduce
        self.changed: set[str] = set()  # input files rewritten under the run
        self.removed: dict[str, int] = {}  # input files removed under the run -> chunks of them
        self.busy_seconds = 0.0  # summed over attempts, for the run's worker utilisation

    def run(self) -> None:
        for chunk, result in self.salvaged:  # attempt 0: computed by an earlier run's worker
            self._finished(_InFlight(chunk, 0, 0, time.time()), result, probe=False)
        if not (self.pending or self.retry_at):
            return
        try:
            self.pool = open_pool(self.job, len(self.pending) + len(self.retry_at))
            try:
                while self._work_left():
                    self._admit()
                    self._step()
            finally:
                self.pool.terminate()  # idle now, or stopping at once: nothing left to wait for
        except PoolBroken as exc:  # chunks in flight are not recorded: the next run does them
            self.error = f"{exc}; {len(self.in_flight) + len(self.pending)} chunks left to do"
            return
        # in_flight is non-empty when the grace period ran out or a second signal came
        self.stopped = self.signals.requested and bool(self.pending or self.retry_at or self.in_flight)
        if self.breaker.tripped:
            untried = len({c.chunk_id for c in self.pending} | {c.chunk_id for _, _, c in self.retry_at})
            self.error = (
                f"circuit breaker opened ({self.breaker.reason}) and the trial chunk after the "
                f"{self.job.breaker.cooldown:g}s cool-down failed too; {untried} chunks left pending"
            )

    def _work_left(self) -> bool:
        if self.signals.immediate or self._grace_over():
            return False
        if self.signals.requested or self.breaker.tripped:
            return bool(self.in_flight)
        return bool(self.pending or self.retry_at or self.in_flight)

    def _grace_over(self) -> bool:
        return self.stop_deadline is not None and time.monotonic() > self.stop_deadline

    def _admit(self) -> None:
        if self.signals.requested:
            return
        now = time.monotonic()
        while self.retry_at and self.retry_at[0][0] <= now:
            self.pending.appendleft(heapq.heappop(self.retry_at)[2])
        while self.pending and self.pool.has_room():
            chunk = self.pending[0]
            need = memory_estimate(chunk)
            if not self.budget.fits(need):
                break
            if not self.breaker.allow(now):
                break
            self.pending.popleft()
            task_id = self._submit(chunk, need)
            if self.breaker.state == "half_open":
                self.probe = task_id

    def _submit(self, chunk: Chunk, need: int) -> int:
        attempt = self.attempts.get(chunk.chunk_id, 0) + 1
        task_id = next(self.ids)
        self.budget.reserve(need)
        self.in_flight[task_id] = _InFlight(chunk, attempt, need, time.time())
        run_id = self.owner.record.run_id
        name = part_name(chunk.chunk_id)
        staged = staged_name(name, run_id, attempt)
        self.pool.submit(Task(task_id, chunk, self.spec, run_id, attempt, name, staged, self.gate.schema))
        return task_id

    def _step(self) -> None:
        events = self.pool.poll(self._wait_time(), extra=[self.signals.wakeup])
        self._on_signals()
        for event in events:
            self._handle(event)
        self._kill_overdue()
        if time.monotonic() - self.last_flush > FLUSH_INTERVAL:
            self.owner.flush(wait=False)
            self.last_flush = time.monotonic()

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadlines = [self.last_flush + FLUSH_INTERVAL, now + 1.0]
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        elif self.retry_at:  # once stopping, due retries are not admitted: don't wake for them
            deadlines.append(self.retry_at[0][0])
        if self.breaker.state == "open" and self.breaker.open_until > now:
            deadlines.append(self.breaker.open_until)
        return max(0.0, min(deadlines) - now)

    def _on_signals(self) -> None:
        self.signals.drain()
        if self.signals.requested and self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.job.stop_grace
            self.pool.stop_starting()
            self.owner.emit(
                "stop_requested",
                signal=self.signals.last,
                in_flight=len(self.in_flight),
                grace_seconds=self.job.stop_grace,
            )

    def _handle(self, event: Started | Finished | Failed | Lost) -> None:
        if not isinstance(event, Started):
            self._complete(event)
            return
        item = self.in_flight[event.task_id]
        item.started = event
        self.owner.emit(
            "chunk_started",
            chunk=item.chunk.chunk_id,
            attempt=item.attempt,
            pid=event.pid,
            in_flight=self.budget.in_flight,
            budget=self.budget.limit,
        )

    def _complete(self, event: Finished | Failed | Lost) -> None:
        item = self.in_flight.pop(event.task_id)
        self.budget.release(item.reserved)
        probe = event.task_id == self.probe
        if isinstance(event, Lost):
            self.pending.appendleft(item.chunk)
        elif isinstance(event, Finished):
            self._finished(item, event.result, probe)
            return
        elif event.error.kind not in ("input_changed", "input_removed"):
            self.attempts[item.chunk.chunk_id] = item.attempt
            self._breaker_failure(probe)
            self._failed(item, event.error)
            return
        else:
            self._input_changed(item, event.error)
        if probe:  # no outcome to judge the breaker by: let another chunk try
            self.breaker.cancel_probe()

    def _input_changed(self, item: _InFlight, error: TaskError) -> None:
        path = item.chunk.path
        if error.kind == "input_removed":
            self.removed[path] = self.removed.get(path, 0) + 1
        else:
            self.changed.add(path)
        self._record_attempt(item, "input_changed", error=error)
        self.owner.emit("chunk_input_changed", chunk=item.chunk.chunk_id, error=error.message)
        self._accept_all(self.gate.resolve(item.chunk.chunk_id))

    def _finished(self, item: _InFlight, result: TaskResult, probe: bool) -> None:
        """The worker is done; the result waits, staged, until the output schema is decided."""
        self.attempts[item.chunk.chunk_id] = item.attempt
        self.breaker.record(True, time.monotonic(), probe)
        if result.staged is None and result.schema is not None and self.empty_schema is None:
            self.empty_schema = result.schema
        rows_schema = result.schema if result.staged is not None else None
        self._accept_all(self.gate.offer(item.chunk.chunk_id, rows_schema, (item, result)))

    def _accept_all(self, released: list[_Done]) -> None:
        for item, result in released:
            self._accept(item, result)

    def _accept(self, item: _InFlight, result: TaskResult) -> None:
        error = self._publish(result) if result.staged else None
        if error is not None:
            self._breaker_failure(False)
            self._failed(item, error, result)
            return
        self._record_attempt(item, "done", result)
        self.owner.chunk_done(item.chunk, item.attempt, result, self.budget.in_flight)

    def _publish(self, result: TaskResult) -> TaskError | None:
        """Make a staged result visible, if it has the output's schema. The coordinator alone
        renames results into the output, while it holds the job lock: the fence."""
        assert result.staged is not None and result.output_file is not None
        staged = Path(result.staged)
        try:
            if self.gate.schema is not None and result.schema is not None:
                check_schema(result.schema, self.gate.schema)
        except SchemaMismatch as exc:
            staged.unlink(missing_ok=True)
            return TaskError(kind="error", type="SchemaMismatch", message=str(exc), traceback="")
        publish(staged, self.owner.layout.parts / result.output_file)
        return None

    def _breaker_failure(self, probe: bool) -> None:
        was = self.breaker.state
        self.breaker.record(False, time.monotonic(), probe)
        if self.breaker.state != was:
            self.owner.emit(
                f"breaker_{self.breaker.state}",
                reason=self.breaker.reason,
                cooldown=self.job.breaker.cooldown,
                pending=len(self.pending),
            )

    def _failed(self, item: _InFlight, error: TaskError, result: TaskResult | None = None) -> None:
        if item.attempt > self.job.retries:
            self._record_attempt(item, "dead", result, error)
            self.owner.chunk_dead(item.chunk, item.attempt, error, self.budget.in_flight)
            self._accept_all(self.gate.resolve(item.chunk.chunk_id))
            return
        self._record_attempt(item, "retried", result, error)
        delay = backoff(item.attempt, self.job.retry_backoff)
        heapq.heappush(self.retry_at, (time.monotonic() + delay, next(self.ids), item.chunk))
        self.owner.emit(
            "chunk_retry",
            chunk=item.chunk.chunk_id,
            label=item.chunk.label,
            attempt=item.attempt,
            delay=round(delay, 3),
            error=f"{error.type}: {error.message}",
            in_flight=self.budget.in_flight,
        )

    def _record_attempt(
        self, item: _InFlight, outcome: str, result: TaskResult | None = None, error: TaskError | None = None
    ) -> None:
        if item.attempt == 0:
            return  # a salvaged result: its attempt belongs to the run that computed it
        started = item.started
        ended = time.time()
        record = AttemptRecord(
            job=self.job.name,
            run_id=self.owner.record.run_id,
            chunk_id=item.chunk.chunk_id,
            attempt=item.attempt,
            label=item.chunk.label,
            slot=started.slot if started else None,
            pid=started.pid if started else None,
            admitted_at=item.admitted_at,
            started_at=started.at if started else None,
            ended_at=ended,
            outcome=outcome,
            reserved_bytes=item.reserved,
        )
        if result is not None:
            record.read_seconds = result.read_seconds
            record.compute_seconds = result.compute_seconds
            record.write_seconds = result.write_seconds
            record.rows_in, record.rows_out = result.rows_in, result.rows_out
            record.bytes_in, record.bytes_out = result.bytes_in, result.bytes_out
            record.peak_rss = result.peak_rss
        if error is not None:
            record.error_type, record.error_message = error.type, error.message
            record.traceback = error.traceback or None
        if started is not None:
            self.busy_seconds += max(0.0, ended - started.at)
        self.owner.pending_attempts.append(record)

    def _kill_overdue(self) -> None:
        for handle in self.pool.overdue(self.job.timeout):  # a slot here, a task on Dask
            error = TaskError(
                kind="timeout",
                type="ChunkTimeout",
                message=f"chunk attempt exceeded timeout of {self.job.timeout:g}s",
                traceback="",
            )
            for event in self.pool.kill(handle, error):
                self._handle(event)
