"""The coordinator's loop (minibatch/execute.py) in milliseconds: an in-process pool and a fake
clock drive retries and backoff, the circuit breaker, timeouts, budget admission and a
graceful stop, with no process and no sleep. The real pool and real crashes are tested in
test_pool.py, test_failures.py and test_kill.py."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from minibatch.admission import LEARN_FROM, STARTUP_GUESS, MemoryBudget, MemoryModel
from minibatch.breaker import BreakerSettings
from minibatch.config import JobConfig
from minibatch.events import Emitter, Event, Listener
from minibatch.execute import Execution, Executor
from minibatch.layout import OutputLayout
from minibatch.ledger import Ledger
from minibatch.manifest import Manifest
from minibatch.planner import Chunk
from minibatch.pool import Hang, InlinePool
from minibatch.records import RunRecord
from minibatch.results import ResultStore
from minibatch.signals import StopSignals
from minibatch.states import ErrorKind, EventKind, Outcome
from minibatch.tasks import JobSpec, Task, TaskError, TaskResult


class FakeClock:
    """Time moves only when the loop waits (an idle poll) or a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


@dataclass
class Recorder(Listener):
    kinds: list[EventKind] = field(default_factory=list)

    def on_any(self, event: Event) -> None:
        self.kinds.append(event.kind)


def chunks(n: int, nbytes: int = 1000) -> list[Chunk]:
    return [Chunk(f"/in/f{i}.parquet", "10-1-ab", 0, 10, 0, 1, 0, nbytes) for i in range(n)]


def ok(task: Task) -> TaskResult:
    n = task.chunk.num_rows
    return TaskResult(
        rows_in=n, rows_out=0, bytes_in=task.chunk.nbytes, bytes_out=0, output_file=None, seconds=0.0
    )


@dataclass
class Harness:
    executor: Executor
    ledger: Ledger
    clock: FakeClock
    signals: StopSignals
    events: Recorder
    calls: list[tuple[str, int]]  # (file, attempt) of every task run

    def run(self, todo: list[Chunk]) -> Execution:
        out = self.executor.run(todo)
        self.ledger.flush()
        return out

    def attempts(self) -> list[dict[str, object]]:
        """The attempts as committed to the manifest."""
        return self.ledger.manifest.attempts("r1")


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Harness]:
    def build(
        run: Callable[[Task], TaskResult | TaskError],
        memory: object = None,
        pool: type[InlinePool] = InlinePool,
        model: MemoryModel | None = None,
        **settings: object,
    ) -> Harness:
        defaults: dict[str, object] = {
            "retries": 2,
            "retry_backoff": 1.0,
            "workers": 2,
            "memory_limit": 10**9,
        }
        job = JobConfig(name="j", inputs=(), output=tmp_path / "out", sql="x", **(defaults | settings))  # type: ignore[arg-type]
        clock, signals, recorder = FakeClock(), StopSignals(), Recorder()
        events = Emitter([recorder]).bind("j", "r1")
        record = RunRecord(run_id="r1", job="j", pid=1, started_at=clock.time())
        store = ResultStore(OutputLayout(job.output, reduce=False), "def", events)
        manifest = Manifest(tmp_path / "m.duckdb")
        ledger = Ledger(manifest, record, store.make_durable, events, clock)
        calls: list[tuple[str, int]] = []

        def counted(task: Task) -> TaskResult | TaskError:
            calls.append((task.chunk.path, task.attempt))
            return run(task)

        spec = JobSpec("j", None, "x", None, str(tmp_path), str(tmp_path), str(tmp_path))
        executor = Executor(
            job, spec, "r1", store=store, ledger=ledger, events=events, signals=signals,
            pool_factory=lambda n: pool(min(job.workers, n), counted, clock), clock=clock,
            rng=random.Random(7), memory=memory, model=model,  # type: ignore[arg-type]
        )  # fmt: skip
        return Harness(executor, ledger, clock, signals, recorder, calls)

    return build


def test_a_failed_attempt_is_retried_after_its_backoff_and_then_succeeds(
    make: Callable[..., Harness],
) -> None:
    failed_at: list[float] = []

    def flaky(task: Task) -> TaskResult:
        if task.chunk.path.endswith("f1.parquet") and task.attempt == 1:
            failed_at.append(h.clock.now)
            raise RuntimeError("flaky service said no")
        if task.attempt == 2:
            retried_at.append(h.clock.now)
        return ok(task)

    retried_at: list[float] = []
    h = make(flaky, retry_backoff=4.0)
    out = h.run(chunks(3))
    assert out.error is None and h.ledger.record.chunks_done == 3
    assert 0 <= retried_at[0] - failed_at[0] <= 4.0  # full jitter within the first backoff
    assert [a["outcome"] for a in h.attempts()].count(Outcome.RETRIED) == 1
    assert EventKind.CHUNK_RETRY in h.events.kinds


def test_a_chunk_failing_every_attempt_is_dead_lettered_and_the_others_carry_on(
    make: Callable[..., Harness],
) -> None:
    def poison(task: Task) -> TaskResult:
        if task.chunk.path.endswith("f0.parquet"):
            raise ValueError("cannot parse this chunk")
        return ok(task)

    h = make(poison, retries=2)
    h.run(chunks(4))
    assert h.ledger.record.chunks_done == 3 and h.ledger.record.chunks_dead == 1
    assert [a for f, a in h.calls if f.endswith("f0.parquet")] == [1, 2, 3]
    assert h.ledger.dead[0].error_type == "ValueError"


def test_the_breaker_opens_waits_its_cooldown_then_a_failed_probe_ends_the_run(
    make: Callable[..., Harness],
) -> None:
    times: list[float] = []

    def dies(task: Task) -> TaskError:
        times.append(h.clock.now)
        return TaskError(ErrorKind.DIED, "WorkerDied", "segfault", "")

    h = make(dies, retries=5, workers=1, breaker=BreakerSettings(failures=2, cooldown=30.0))
    out = h.run(chunks(6))
    assert out.error is not None and "circuit breaker opened (2 consecutive failed attempts)" in out.error
    assert EventKind.BREAKER_OPEN in h.events.kinds and EventKind.BREAKER_TRIPPED in h.events.kinds
    opened = times[1]  # the second consecutive failure
    assert len([t for t in times if t >= opened + 30.0]) == 1  # after the cool-down: one trial chunk
    assert len([t for t in times if opened < t < opened + 30.0]) == 0  # nothing admitted meanwhile
    assert h.ledger.record.chunks_dead == 0  # untried chunks stay pending, uncharged


def test_an_attempt_past_its_timeout_is_killed_and_retried(make: Callable[..., Harness]) -> None:
    def hangs_once(task: Task) -> TaskResult:
        if task.chunk.path.endswith("f0.parquet") and task.attempt == 1:
            raise Hang
        return ok(task)

    h = make(hangs_once, timeout=5.0)
    out = h.run(chunks(2))
    assert out.error is None and h.ledger.record.chunks_done == 2
    assert [a for f, a in h.calls if f.endswith("f0.parquet")] == [1, 2]
    errors = [a["error_type"] for a in h.attempts() if a["outcome"] == Outcome.RETRIED]
    assert errors == ["ChunkTimeout"]


def test_admission_keeps_the_estimates_in_flight_within_the_budget(make: Callable[..., Harness]) -> None:
    seen: list[int] = []

    def measure(task: Task) -> TaskResult:
        seen.append(h.executor.budget.in_flight)
        return ok(task)

    size = 1000
    h = make(measure, workers=4, memory_limit=2 * MemoryModel().estimate(chunks(1, size)[0]))
    h.run(chunks(8, size))
    assert h.ledger.record.chunks_done == 8
    assert max(seen) <= h.executor.budget.limit and h.executor.budget.peak <= h.executor.budget.limit


def test_a_chunk_bigger_than_the_budget_runs_alone(make: Callable[..., Harness]) -> None:
    h = make(ok, memory_limit=10)
    out = h.run(chunks(3, nbytes=1000))
    assert h.ledger.record.chunks_done == 3 and out.peak_in_flight == MemoryModel().estimate(chunks(1)[0])


def test_a_stop_lets_in_flight_chunks_finish_and_leaves_the_rest_uncharged(
    make: Callable[..., Harness],
) -> None:
    def stop_on_third(task: Task) -> TaskResult:
        if len(h.calls) == 3:
            h.signals.request()
        return ok(task)

    h = make(stop_on_third, workers=1)
    out = h.run(chunks(10))
    assert out.stopped and out.error is None
    assert h.ledger.record.chunks_done == 3 and h.ledger.record.chunks_dead == 0
    assert len(h.calls) == 3  # queued tasks came back unstarted (Lost): never run, never charged
    assert EventKind.STOP_REQUESTED in h.events.kinds


def test_a_full_disk_halts_admission_and_charges_nothing(make: Callable[..., Harness]) -> None:
    def disk_full(task: Task) -> TaskResult | TaskError:
        if task.chunk.path.endswith("f1.parquet"):
            return TaskError(ErrorKind.ENVIRONMENT, "OSError", "[Errno 28] No space left on device", "")
        return ok(task)

    h = make(disk_full, workers=1)
    out = h.run(chunks(6))
    assert out.error is not None and "No space left" in out.error
    assert h.ledger.record.chunks_dead == 0 and h.ledger.record.chunks_done < 6
    assert EventKind.RUN_HALTED in h.events.kinds


@dataclass
class Measured:
    """Stands in for treemem.TreeMemory: what the process tree holds above idle, set by tests."""

    current: int = 0
    peak: int = 0
    idle: int = 100
    available: bool = True

    def start(self, workers: Callable[[], list[int]] = list) -> None: ...
    def stop(self) -> None: ...
    def sampled_peak(self) -> int:
        return self.peak

    def starting(self, start: Callable[[], int | None]) -> int | None:
        return start()


class Terminated(InlinePool):
    terminated = 0

    def terminate(self) -> None:
        Terminated.terminated += 1
        super().terminate()


class Unmeasurable(Measured):
    def start(self, workers: Callable[[], list[int]] = list) -> None:
        raise RuntimeError("no /proc after all")


def test_the_pool_is_stopped_when_measuring_it_fails_to_start(make: Callable[..., Harness]) -> None:
    """A review: starting to measure the tree came before the `try` whose `finally` stops the
    pool, so an error there left its workers running."""
    h = make(ok, memory=Unmeasurable(), pool=Terminated)
    with pytest.raises(RuntimeError, match="no /proc"):
        h.run(chunks(2, nbytes=10))
    assert Terminated.terminated == 1


@pytest.mark.parametrize("over", [False, True])
def test_a_tree_measured_over_the_budget_admits_one_chunk_at_a_time(
    make: Callable[..., Harness], over: bool
) -> None:
    seen: list[int] = []

    def measure(task: Task) -> TaskResult:
        seen.append(len(h.executor.in_flight))
        return ok(task)

    memory = Measured(current=2000 if over else 0)
    h = make(measure, memory=memory, workers=4, memory_limit=1000, model=MemoryModel(startup=0))
    out = h.run(chunks(8, nbytes=10))  # estimates far below the budget: only the measure limits
    assert h.ledger.record.chunks_done == 8 and out.idle_memory == 100
    assert max(seen) == (1 if over else 8)


def test_the_memory_model_learns_from_chunks_past_each_workers_first() -> None:
    model = MemoryModel()
    big = Chunk("/in/f.parquet", "10-1-ab", 0, 10, 0, 1, 0, 4 * LEARN_FROM)
    assert model.estimate(big) == 8 * LEARN_FROM  # twice the planned size, with nothing learned
    model.learn(1, big.nbytes, 100, 100 + 40 * LEARN_FROM)  # a worker's first: its start-up too
    model.learn(2, LEARN_FROM // 2, 100, 100 + 40 * LEARN_FROM)  # too small to say
    assert model.factor == 2.0
    model.learn(1, big.nbytes, 100, 100 + 20 * LEARN_FROM)
    assert model.factor == 5.0 and model.estimate(big) == 20 * LEARN_FROM
    model.learn(1, big.nbytes, 100, 100 + LEARN_FROM)
    assert model.factor == 5.0  # it only rises within a run
    assert MemoryModel(learned=0.3).factor == 1.0 and MemoryModel(learned=7.5).factor == 7.5
    # what writing may hold counts until a factor is learned
    unknown, learned = MemoryModel(None, 64 * 1024, 10), MemoryModel(2.0, 64 * 1024, 10)
    assert unknown.estimate(big) == 8 * LEARN_FROM + 32 * 64 * 1024
    assert learned.estimate(big) == 8 * LEARN_FROM


class Starting(InlinePool):
    """As WorkerPool: one worker at first, another (a made-up pid) for a task that finds each
    started one with a task queued, up to `size`; `broken`: starting one fails (PoolBroken,
    which submit swallows)."""

    broken = False

    def __init__(self, size: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(size, *args, **kwargs)
        self.most, self.size = size, 1

    def would_start(self) -> bool:
        return self.size < self.most and len(self.queue) >= self.size

    def submit(self, task: Task) -> int | None:  # type: ignore[override]
        starts = self.would_start() and not self.broken
        super().submit(task)
        if not starts:
            return None
        self.size += 1
        return 1000 + self.size


class Broken(Starting):
    broken = True


@pytest.mark.parametrize(("pool", "held"), [(Starting, 3 * 100), (Broken, 100)])
def test_each_worker_started_holds_its_start_up(make: Callable[..., Harness], pool: type, held: int) -> None:
    h = make(ok, pool=pool, model=MemoryModel(2.0, 0, startup=100), workers=3, memory=Measured())
    h.run(chunks(6))
    assert h.ledger.record.chunks_done == 6
    assert h.executor.budget.in_flight == held  # the chunks' released, a started worker's start-up held


def test_a_first_run_starts_a_second_worker_once_a_first_chunk_told_its_start_up(
    make: Callable[..., Harness],
) -> None:
    """A job's first run knew no start-up and counted none: under 16 MiB, 2 MiB slices of a huge
    row group started a second worker at once, whose ~10 MiB start-up took the tree to 1.3-1.6 x
    the budget (a later run, which knew it, kept one worker: 0.8 x). Until a first chunk has
    finished, a chunk that would start a worker needs room for a guessed start-up; then the
    start-up that chunk's worker grew beyond it is held for every worker started."""
    workers_at_run: list[int] = []

    def grew(task: Task) -> TaskResult:  # each worker's first chunk grows it 300 beyond the chunk
        workers_at_run.append(h.executor.pool.size)
        return replace(ok(task), start_rss=0, peak_rss=200 + 300)

    measured = Measured(peak=400)  # the tree above idle: more than the start-up (no cap)
    h = make(grew, pool=Starting, model=MemoryModel(2.0, 0), workers=3, memory_limit=1000, memory=measured)
    h.run(chunks(4, nbytes=100))  # 200 a chunk at that factor
    assert h.ledger.record.chunks_done == 4
    assert workers_at_run[0] == 1  # the second worker waited for the first chunk's start-up
    assert max(workers_at_run) == 2  # 300 + 200 + 300 + 200 fit in 1000; a third worker does not
    assert h.executor.model.startup == 300 and h.executor.budget.in_flight == 2 * 300


def test_a_start_up_not_learned_yet_is_held_as_a_guess_for_each_worker_started(
    make: Callable[..., Harness],
) -> None:
    """A review: the guess was only checked for the worker about to start, so one admission
    pass, before any chunk had finished, started four workers in 100 MiB (6 MiB chunks). Each
    worker after the first holds it (the first's start-up is what its first chunk shows: held
    for it too, a second review found a first run of two long chunks in 64 MiB run serially)."""
    MiB, workers_at_run = 2**20, []

    def run(task: Task) -> TaskResult:
        workers_at_run.append(h.executor.pool.size)
        return ok(task)  # no RSS said: nothing learned

    model = MemoryModel(2.0, 0)
    h = make(run, pool=Starting, model=model, workers=4, memory_limit=100 * MiB, memory=Measured())
    h.run(chunks(8, nbytes=3 * MiB))
    assert h.ledger.record.chunks_done == 8
    assert max(workers_at_run) == 3  # 3 x 6 + 2 x 32 fit in 100 MiB, a fourth 38 more does not


def test_two_long_chunks_of_a_first_run_in_64_mib_run_side_by_side(make: Callable[..., Harness]) -> None:
    workers_at_run: list[int] = []

    def run(task: Task) -> TaskResult:
        workers_at_run.append(h.executor.pool.size)
        return ok(task)

    model = MemoryModel(2.0, 0)
    h = make(run, pool=Starting, model=model, workers=2, memory_limit=64 * 2**20, memory=Measured())
    h.run(chunks(2, nbytes=1000))
    assert workers_at_run == [2, 2]


def test_a_first_runs_start_up_is_what_first_chunks_grew_beyond_later_ones() -> None:
    """A review: a first run learned the start-up at the default factor (2), so a job of ~4 per
    byte took the rest of its chunks' growth for start-up and held it for each worker for the
    run (33 MiB chunks: 77 MiB a worker where its later runs learned 14; nearly serial under
    400 MiB). A factor learned later in the run gives that back; each worker started holds it."""
    MiB, size = 2**20, 4 * LEARN_FROM
    model = MemoryModel(None, 0)
    held = model.start(2)
    assert held == STARTUP_GUESS and model.room_to_start() == STARTUP_GUESS  # unknown: a guess
    held += model.learn(1, size, 0, 4 * size + 30 * MiB)  # a worker's first chunk
    assert held == 2 * (2 * size + 30 * MiB)  # at the default factor, for both workers started
    held += model.learn(1, size, 0, 4 * size)  # its second: the factor is 4
    assert model.factor == 4.0 and model.startup == 30 * MiB and held == 2 * 30 * MiB
    held += model.learn(2, size, 0, 4 * size + 20 * MiB)  # the other's first: the most of them
    assert model.startup == 30 * MiB and held == 2 * 30 * MiB
    held += model.start(1)
    assert held == 3 * 30 * MiB
    # what writing may hold is part of a first run's estimate, not of the start-up
    writes = MemoryModel(None, 64 * 1024)
    writes.learn(1, size, 0, 2 * size + min(size, 32 * 64 * 1024) + 10 * MiB)
    assert writes.startup == 10 * MiB
    known = MemoryModel(None, 0, startup=5 * MiB)  # learned from earlier runs: kept as it is
    assert known.start(1) == 5 * MiB and known.learn(1, size, 0, 9 * size) == 0 and known.startup == 5 * MiB


def test_a_workers_first_attempt_that_failed_is_still_its_first() -> None:
    """Its next attempt, the imports done, would show no start-up and give the guess back (the
    query over earlier runs counts failed attempts too: test_manifest)."""
    model = MemoryModel(2.0, 0)
    model.start(2)
    model.failed(1)
    assert model.learn(1, 100, 0, 200) == 0 and model.startup is None


def test_an_attempt_of_no_known_worker_teaches_no_start_up() -> None:
    """A result that came before its start event (Dask) has no pid: each was taken for a first
    attempt, and kept, so a long run rescanned a list growing by one a chunk."""
    model = MemoryModel(2.0, 0)
    for _ in range(3):
        assert model.learn(None, 100, 0, 10**6) == 0
    assert model.startup is None


def test_the_executor_counts_a_failed_attempt_as_its_workers(make: Callable[..., Harness]) -> None:
    def fails_first(task: Task) -> TaskResult | TaskError:
        if task.attempt == 1 and task.chunk.path.endswith("f0.parquet"):
            return TaskError(ErrorKind.ERROR, "ValueError", "flaky", "")
        return replace(ok(task), start_rss=0, peak_rss=1)

    h = make(fails_first, model=MemoryModel(2.0, 0), workers=1, memory=Measured(), retry_backoff=0.0)
    h.run(chunks(2))
    assert h.ledger.record.chunks_done == 2 and h.executor.model.startup is None  # (one pid in-process)


def test_each_first_chunk_caps_the_start_up_by_the_tree_then() -> None:
    model, MiB = MemoryModel(2.0, 0), 2**20
    model.start(2)
    model.learn(1, 100, 0, 200 + 40 * MiB, Measured(peak=20 * MiB))  # type: ignore[arg-type]
    assert model.startup == 10 * MiB  # the tree's 20 MiB above idle, for two workers
    model.learn(2, 100, 0, 200 + 40 * MiB, Measured(peak=60 * MiB))  # type: ignore[arg-type]
    assert model.startup == 30 * MiB


def test_a_start_up_learned_in_a_run_is_capped_by_the_tree_measured(make: Callable[..., Harness]) -> None:
    """An attempt's RSS counts library pages its first chunk maps (shared, file-backed), which
    the tree's anonymous memory does not: a learned start-up is capped by the tree measured."""

    def grew(task: Task) -> TaskResult:
        return replace(ok(task), start_rss=0, peak_rss=200 + 300)

    measured = Measured(peak=100)
    h = make(grew, pool=Starting, model=MemoryModel(2.0, 0), workers=3, memory_limit=1000, memory=measured)
    h.executor.model.start(1)  # a second worker already started: the tree's peak is two workers'
    h.run(chunks(4, nbytes=100))
    assert h.executor.model.startup == 50


def test_a_workers_start_up_is_held_for_the_run() -> None:
    budget = MemoryBudget(100)
    budget.hold(120)  # a start-up above the whole budget: one chunk still runs at a time
    assert budget.fits(50)
    budget.reserve(50)
    assert not budget.fits(1)
    budget.release(50)
    assert budget.fits(50) and budget.in_flight == 120 and budget.peak == 170


def test_a_result_waiting_for_the_output_schema_is_not_busy_time(
    make: Callable[..., Harness], tmp_path: Path
) -> None:
    """CI flake, then found: results wait, staged, until the chunk first in plan order decides
    the output's schema; that wait (here f0's retry backoff) counted as their workers' busy
    time, and utilisation came out above 100 %."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "out").mkdir()

    def staged(task: Task) -> TaskResult:
        if task.chunk.path.endswith("f0.parquet") and task.attempt == 1:
            raise RuntimeError("flaky service said no")
        table = pa.table({"v": [1]})
        path = tmp_path / f"{task.chunk.chunk_id}.{task.attempt}.tmp"
        pq.write_table(table, path)
        return TaskResult(
            rows_in=1, rows_out=1, bytes_in=10, bytes_out=path.stat().st_size,
            output_file=f"part-{task.chunk.chunk_id}.parquet", seconds=0.5, schema=table.schema,
            staged=str(path),
        )  # fmt: skip

    h = make(staged, retry_backoff=30.0)
    out = h.run(chunks(4))
    assert out.error is None and h.ledger.record.chunks_done == 4
    assert out.busy_seconds == pytest.approx(4 * 0.5), out.busy_seconds
