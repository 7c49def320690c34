"""The worker pool (minibatch/pool.py) and what runs inside a worker (minibatch/worker.py):
real forkserver workers, real Parquet chunks, real process deaths."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch.admission import MemoryBudget, frees_at_once
from minibatch.config import JobConfig
from minibatch.layout import publish, staged_name
from minibatch.planner import Chunk, plan_chunks, read_file_meta
from minibatch.pool import WorkerPool
from minibatch.results import check_schema
from minibatch.tasks import (
    Failed,
    Finished,
    InputChanged,
    JobSpec,
    Lost,
    PoolBroken,
    SchemaMismatch,
    Started,
    Task,
    TaskError,
)
from minibatch.treemem import RESCAN, TreeMemory
from minibatch.worker import read_chunk

from conftest import wait_for

JOBS = """
import os, time
import pyarrow.compute as pc

def double(table, ctx):
    return table.append_column("doubled", pc.multiply(table["value"], 2))

def die(table, ctx):
    os._exit(7)

def sleepy(table, ctx):
    time.sleep(60)
    return table

def nap(table, ctx):
    time.sleep(0.5)
    return table
"""


# ---------------------------------------------------------------- helpers


def write_parquet(path: Path, rows: int, row_group: int, start: int = 0) -> Path:
    ids = range(start, start + rows)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "value": pa.array([i % 97 for i in ids], pa.int64()),
            "name": pa.array([f"row-{i}" for i in ids]),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return path


def chunks_of(path: Path, chunk_bytes: int, columns: tuple[str, ...] | None = None) -> list[Chunk]:
    return plan_chunks([read_file_meta(str(path), columns)], chunk_bytes)


def group_chunks(path: Path) -> list[Chunk]:
    """One chunk per row group: chunk_bytes is the largest group's size."""
    meta = read_file_meta(str(path), None)
    chunks = plan_chunks([meta], max(g.nbytes for g in meta.row_groups))
    assert len(chunks) == len(meta.row_groups)
    return chunks


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    base = tmp_path / "project"
    base.mkdir()
    (base / "pooljobs.py").write_text(textwrap.dedent(JOBS))
    dirs = {"base": base, "parts": tmp_path / "parts", "staging": tmp_path / "staging"}
    dirs["parts"].mkdir()
    dirs["staging"].mkdir()
    dirs["input"] = write_parquet(tmp_path / "in.parquet", rows=300, row_group=100)
    return dirs


def spec(env: dict[str, Path], process: str | None = "pooljobs:double", sql: str | None = None) -> JobSpec:
    return JobSpec(
        name="t",
        process=process,
        sql=sql,
        columns=None,
        base_dir=str(env["base"]),
        parts_dir=str(env["parts"]),
        staging_dir=str(env["staging"]),
    )


def task(task_id: int, chunk: Chunk, job: JobSpec, schema: pa.Schema | None = None) -> Task:
    """A task; with `schema` (the output's, once known) the worker checks its result against it."""
    name = f"part-{task_id}.parquet"
    return Task(task_id, chunk, job, "run-1", 1, name, staged_name(name, "run-1", 1), schema=schema)


def publish_results(final: dict, parts: Path) -> None:
    """What the coordinator does with finished results: a worker only stages them."""
    for event in final.values():
        if isinstance(event, Finished) and event.result.staged:
            publish(Path(event.result.staged), parts / event.result.output_file)


DOUBLED = pa.schema(
    [("id", pa.int64()), ("value", pa.int64()), ("name", pa.string()), ("doubled", pa.int64())]
)


def collect(pool: WorkerPool, task_ids: set[int], timeout: float = 20.0) -> tuple[dict, list[Started]]:
    """Poll until every task in `task_ids` has its one final event (Finished, Failed or Lost)."""
    final: dict[int, Finished | Failed | Lost] = {}
    started: list[Started] = []
    deadline = time.monotonic() + timeout
    while task_ids - final.keys():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no final event for tasks {sorted(task_ids - final.keys())}")
        for event in pool.poll(min(left, 1.0)):
            if isinstance(event, Started):
                started.append(event)
            else:
                assert event.task_id not in final, f"two final events for task {event.task_id}"
                final[event.task_id] = event
    return final, started


def wait_started(pool: WorkerPool, task_id: int, timeout: float = 20.0) -> Started:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in pool.poll(0.5):
            assert not isinstance(event, Failed | Finished | Lost), f"unexpected {event}"
            if isinstance(event, Started) and event.task_id == task_id:
                return event
    raise AssertionError(f"task {task_id} never started")


def ids_of(path: Path) -> list[int]:
    return pq.read_table(path).column("id").to_pylist()


# ---------------------------------------------------------------- pool


def test_tasks_finish_and_write_their_results(env: dict[str, Path]) -> None:
    chunks = group_chunks(env["input"])
    job = spec(env)
    pool = WorkerPool(2, memory_cap=None)
    try:
        for i, chunk in enumerate(chunks):
            pool.submit(task(i, chunk, job, DOUBLED))
        final, started = collect(pool, set(range(len(chunks))))
    finally:
        pool.terminate()
    assert {s.task_id for s in started} == set(range(len(chunks)))
    assert all(s.pid > 0 and s.pid != os.getpid() for s in started)
    assert list(env["parts"].iterdir()) == []  # the fence: workers stage, never publish
    assert len(list(env["staging"].iterdir())) == len(chunks)
    publish_results(final, env["parts"])
    for i, chunk in enumerate(chunks):
        event = final[i]
        assert isinstance(event, Finished), event
        assert event.result.rows_in == event.result.rows_out == chunk.num_rows
        assert event.result.output_file == f"part-{i}.parquet"
        assert event.result.bytes_out == (env["parts"] / f"part-{i}.parquet").stat().st_size
        table = pq.read_table(env["parts"] / f"part-{i}.parquet")
        assert table.column("id").to_pylist() == list(range(chunk.row_start, chunk.row_end))
        assert table.column("doubled").to_pylist() == [
            2 * (r % 97) for r in range(chunk.row_start, chunk.row_end)
        ]
    assert list(env["staging"].iterdir()) == []


def test_a_worker_starts_only_when_every_started_one_is_busy(env: dict[str, Path]) -> None:
    """A worker holds memory before its first chunk: a pool starts one, and another only when a
    task finds every started worker busy (a run whose budget admits one chunk at a time never
    starts a second). `submit` names the worker it started, for the run's idle baseline."""
    chunks = group_chunks(env["input"])
    job = spec(env)
    pool = WorkerPool(2, memory_cap=None)
    try:
        assert pool.submit(task(0, chunks[0], job, DOUBLED)) is None  # the first worker's
        final, first = collect(pool, {0})
        assert pool.size == 1  # what a run records as the workers it started
        assert not pool.would_start() and pool.submit(task(1, chunks[1], job, DOUBLED)) is None  # free again
        assert pool.would_start()  # what admission reserves a worker's start-up for
        started = pool.submit(task(2, chunks[2], job, DOUBLED))  # it is busy: a second starts
        assert started is not None and started != first[0].pid
        assert pool.submit(task(3, chunks[0], job, DOUBLED)) is None  # two at most
        more, later = collect(pool, {1, 2, 3})
    finally:
        pool.terminate()
    assert all(isinstance(event, Finished) for event in [*final.values(), *more.values()])
    assert {s.pid for s in [*first, *later]} == {first[0].pid, started}


def test_a_worker_started_mid_run_counts_as_idle_not_as_a_peak(env: dict[str, Path], monkeypatch) -> None:
    """The run's sampler walks the tree once a second: a walk that saw a worker the pool had just
    started, before the run took in what it holds as idle, counted its ~25 MiB as a peak (a
    review's finding). The sampler now waits until the worker is counted as idle."""
    chunks = group_chunks(env["input"])
    job = spec(env)
    pool = WorkerPool(2, memory_cap=None)
    memory = TreeMemory(interval=3600)  # no samples but the test's
    memory.start()
    spawn, seen = pool._spawn, []

    def spawn_then_sample() -> object:
        slot = spawn()
        memory._walked = -RESCAN  # a walk is due
        sampler = threading.Thread(target=lambda: seen.append(memory.sample()))
        sampler.start()
        sampler.join(0.2)  # (it waits for the start to be counted)
        return slot

    try:
        memory.starting(lambda: pool.submit(task(0, chunks[0], job, DOUBLED)))
        first, _ = collect(pool, {0})  # the first worker's start-up on its first chunk, done
        memory._walked = -RESCAN
        before = memory.sample()
        monkeypatch.setattr(pool, "_spawn", spawn_then_sample)
        memory.starting(lambda: pool.submit(task(1, chunks[1], job, DOUBLED)))  # on the first
        memory.starting(lambda: pool.submit(task(2, chunks[2], job, DOUBLED)))  # the first is busy
        wait_for(lambda: bool(seen), timeout=10)
        final, _ = collect(pool, {1, 2})
    finally:
        memory.stop()
        pool.terminate()
    assert all(isinstance(event, Finished) for event in [*first.values(), *final.values()])
    assert pool.size == 2 and seen[0] - before < 8 * 2**20, (before, seen)


def test_a_worker_that_cannot_start_mid_run_leaves_the_run_its_workers(
    env: dict[str, Path], monkeypatch
) -> None:
    """A forkserver that fails twice as the pool starts its second worker: the tasks run on
    the first, instead of the run failing with its chunks cut short (a review's finding)."""
    chunks = group_chunks(env["input"])
    job = spec(env)
    pool = WorkerPool(2, memory_cap=None)

    def broken(tries: int = 2) -> object:
        raise PoolBroken("cannot start a worker process (its forkserver failed: test)")

    monkeypatch.setattr(pool, "_spawn", broken)
    try:
        assert pool.submit(task(0, chunks[0], job, DOUBLED)) is None
        assert pool.submit(task(1, chunks[1], job, DOUBLED)) is None  # queued with the first
        assert not pool.has_room() or pool.size == 1
        final, started = collect(pool, {0, 1})
    finally:
        pool.terminate()
    assert all(isinstance(event, Finished) for event in final.values())
    assert len({s.pid for s in started}) == 1 and pool.size == 1


def test_without_a_known_schema_the_result_is_staged_not_published(env: dict[str, Path]) -> None:
    chunk = group_chunks(env["input"])[0]
    pool = WorkerPool(1, memory_cap=None)
    try:
        pool.submit(task(0, chunk, spec(env)))
        final, _ = collect(pool, {0})
    finally:
        pool.terminate()
    result = final[0].result
    assert result.staged is not None and Path(result.staged).parent == env["staging"]
    assert not (env["parts"] / "part-0.parquet").exists()  # the coordinator publishes it
    assert pq.read_schema(result.staged).names == DOUBLED.names


def test_sql_task_and_empty_result(env: dict[str, Path]) -> None:
    chunk = group_chunks(env["input"])[1]
    pool = WorkerPool(1, memory_cap=None)
    try:
        ids = pa.schema([("id", pa.int64())])
        pool.submit(
            task(0, chunk, spec(env, process=None, sql="SELECT id FROM chunk WHERE id % 10 = 0"), ids)
        )
        pool.submit(task(1, chunk, spec(env, process=None, sql="SELECT id FROM chunk WHERE id < 0"), ids))
        final, _ = collect(pool, {0, 1})
    finally:
        pool.terminate()
    publish_results(final, env["parts"])
    assert isinstance(final[0], Finished) and isinstance(final[1], Finished)
    assert final[0].result.rows_out == 10
    assert sorted(ids_of(env["parts"] / "part-0.parquet")) == list(range(100, 200, 10))
    # no rows: no file, no output name
    assert final[1].result.rows_out == 0 and final[1].result.output_file is None
    assert not (env["parts"] / "part-1.parquet").exists()


def test_job_exception_is_a_failed_event(env: dict[str, Path]) -> None:
    chunk = group_chunks(env["input"])[0]
    pool = WorkerPool(1, memory_cap=None)
    try:
        pool.submit(task(0, chunk, spec(env, process=None, sql="SELECT no_such_column FROM chunk")))
        pool.submit(task(1, chunk, spec(env), DOUBLED))
        final, _ = collect(pool, {0, 1})
    finally:
        pool.terminate()
    assert isinstance(final[0], Failed)
    assert final[0].error.kind == "error" and "no_such_column" in final[0].error.message
    assert final[0].error.traceback  # the worker's traceback travels with the error
    # the same worker carries on with the next task
    assert isinstance(final[1], Finished)


def test_worker_death_fails_its_task_loses_the_queued_one_and_pool_recovers(env: dict[str, Path]) -> None:
    chunks = group_chunks(env["input"])
    pool = WorkerPool(1, memory_cap=None)
    try:
        pool.submit(task(0, chunks[0], spec(env, process="pooljobs:die")))
        pool.submit(task(1, chunks[1], spec(env), DOUBLED))  # queued behind it on the only slot
        final, started = collect(pool, {0, 1})
        dead_pid = next(s.pid for s in started if s.task_id == 0)

        assert isinstance(final[0], Failed), final[0]
        assert final[0].error.kind == "died"
        assert "exited with code 7" in final[0].error.message
        assert str(dead_pid) in final[0].error.message
        # never started there: Lost (resubmit without charging an attempt), not Failed
        assert isinstance(final[1], Lost), final[1]
        assert 1 not in {s.task_id for s in started}
        assert not (env["parts"] / "part-1.parquet").exists()

        # the slot was restarted with a new process; the pool keeps working
        pool.submit(task(2, chunks[1], spec(env), DOUBLED))
        final, started = collect(pool, {2})
    finally:
        pool.terminate()
    publish_results(final, env["parts"])
    assert isinstance(final[2], Finished), final[2]
    assert started[0].pid != dead_pid
    assert ids_of(env["parts"] / "part-2.parquet") == list(range(100, 200))


def test_kill_fails_the_running_task_with_the_given_error(env: dict[str, Path]) -> None:
    chunks = group_chunks(env["input"])
    pool = WorkerPool(1, memory_cap=None)
    try:
        pool.submit(task(0, chunks[0], spec(env, process="pooljobs:sleepy")))
        pool.submit(task(1, chunks[1], spec(env), DOUBLED))
        victim = wait_started(pool, 0).pid
        error = TaskError(kind="timeout", type="ChunkTimeout", message="too slow", traceback="")
        events = pool.kill(0, error)
        assert [e for e in events if not isinstance(e, Started)] == [Failed(0, error), Lost(1)]
        with pytest.raises(ProcessLookupError):
            os.kill(victim, 0)  # killed and reaped
        assert pool.idle
        pool.submit(task(2, chunks[2], spec(env), DOUBLED))
        final, _ = collect(pool, {2})
    finally:
        pool.terminate()
    assert isinstance(final[2], Finished)


def test_stop_starting_hands_back_queued_tasks_unstarted(env: dict[str, Path]) -> None:
    chunks = group_chunks(env["input"])
    pool = WorkerPool(1, memory_cap=None)
    try:
        pool.submit(task(0, chunks[0], spec(env, process="pooljobs:nap")))
        pool.submit(task(1, chunks[1], spec(env), DOUBLED))
        wait_started(pool, 0)
        pool.stop_starting()  # what a first SIGTERM does: the running task finishes, no new one starts
        final, started = collect(pool, {0, 1})
    finally:
        pool.terminate()
    assert isinstance(final[0], Finished)
    assert final[1] == Lost(1)
    assert not [s for s in started if s.task_id == 1]


def test_overdue_reports_only_a_started_task(env: dict[str, Path]) -> None:
    chunk = group_chunks(env["input"])[0]
    pool = WorkerPool(2, memory_cap=None)
    try:
        far_future = time.monotonic() + 1e6
        assert pool.overdue(0.0, now=far_future) == []  # nothing running
        pool.submit(task(0, chunk, spec(env, process="pooljobs:sleepy")))
        wait_started(pool, 0)
        assert pool.overdue(5.0, now=time.monotonic() + 10) == [0]
        assert pool.overdue(5.0, now=time.monotonic()) == []
        assert pool.overdue(5.0) == []
        error = TaskError(kind="timeout", type="ChunkTimeout", message="overdue", traceback="")
        events = pool.kill(0, error)
        assert Failed(0, error) in events
        assert pool.overdue(0.0, now=far_future) == []  # the new worker runs nothing
    finally:
        pool.terminate()


# ---------------------------------------------------------------- admission budget


def test_memory_budget_fits_reserve_release() -> None:
    budget = MemoryBudget(100)
    assert budget.fits(60)
    budget.reserve(60)
    assert budget.fits(40)
    assert not budget.fits(41)
    budget.reserve(40)
    assert budget.in_flight == 100 and not budget.fits(1)
    budget.release(60)
    assert budget.in_flight == 40 and budget.fits(60) and not budget.fits(61)
    budget.release(40)
    assert budget.in_flight == 0 and budget.peak == 100


def test_memory_budget_oversized_chunk_runs_alone() -> None:
    budget = MemoryBudget(100)
    assert budget.fits(10_000)  # nothing in flight: a chunk bigger than the budget may run
    budget.reserve(10_000)
    assert not budget.fits(1)  # ... but alone
    budget.release(10_000)
    assert budget.fits(1) and budget.peak == 10_000


def test_workers_free_pages_at_once_only_under_a_tight_budget(tmp_path: Path) -> None:
    def job(**settings: object) -> JobConfig:
        return JobConfig(name="j", inputs=(), output=tmp_path, sql="x", **settings)  # type: ignore[arg-type]

    MiB = 2**20
    assert frees_at_once(job(workers=2, memory_limit=24 * MiB, chunk_bytes=8 * MiB))  # the budget tests'
    assert frees_at_once(job(workers=2, memory_limit=1023 * MiB, chunk_bytes=64 * MiB))
    assert not frees_at_once(job(workers=2, memory_limit=1024 * MiB, chunk_bytes=64 * MiB))  # 8 chunks each
    assert not frees_at_once(job(workers=1, memory_limit=2**30, chunk_bytes=64 * MiB))  # the defaults
    # a share of up to 64 MiB cannot spare what a first write leaves, however small the chunks
    assert frees_at_once(job(workers=1, memory_limit=16 * MiB, chunk_bytes=2 * MiB))  # test_budget's
    assert frees_at_once(job(workers=2, memory_limit=128 * MiB, chunk_bytes=1 * MiB))
    assert not frees_at_once(job(workers=2, memory_limit=130 * MiB, chunk_bytes=1 * MiB))


def test_a_forkserver_started_by_a_tight_pool_frees_at_once() -> None:
    """Review: a pool reset the server's preload to the default, so a server started anew
    mid-run (the old one died) gave the rest of a tight run's workers the lazy allocator."""
    script = (
        "import multiprocessing.forkserver as server\n"
        "from minibatch.pool import WorkerPool\n"
        "pool = WorkerPool(1, None, free_at_once=True)\n"
        "print('minibatch.allocator_at_once' in server._forkserver._preload_modules)\n"
        "pool.terminate()\n"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == "True", found.stderr


# ---------------------------------------------------------------- inside a worker


def test_check_schema_names_the_differing_column() -> None:
    expected = pa.schema([("id", pa.int64()), ("name", pa.string())])
    check_schema(pa.schema([pa.field("id", pa.int64(), nullable=False), ("name", pa.string())]), expected)
    with pytest.raises(SchemaMismatch, match=r"name is int32, expected string"):
        check_schema(pa.schema([("id", pa.int64()), ("name", pa.int32())]), expected)
    with pytest.raises(SchemaMismatch) as excinfo:
        check_schema(pa.schema([("id", pa.int64()), ("extra", pa.float64())]), expected)
    assert "name (string) missing" in str(excinfo.value)
    assert "extra (double) unexpected" in str(excinfo.value)
    with pytest.raises(SchemaMismatch, match="order"):
        check_schema(pa.schema([("name", pa.string()), ("id", pa.int64())]), expected)


def test_check_schema_rejects_a_duplicated_column() -> None:
    expected = pa.schema([("id", pa.int64()), ("v", pa.int64())])
    with pytest.raises(SchemaMismatch):
        check_schema(pa.schema([("id", pa.int64()), ("v", pa.int64()), ("id", pa.int64())]), expected)


def test_read_chunk_row_ranges_of_one_big_row_group(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "big.parquet", rows=1000, row_group=1000)
    meta = read_file_meta(str(path), None)
    (group,) = meta.row_groups
    chunks = chunks_of(path, group.nbytes // 3 + 1)
    assert len(chunks) == 3
    assert all((c.rg_start, c.rg_end) == (0, 1) for c in chunks)
    seen: list[int] = []
    for chunk in chunks:
        table = read_chunk(chunk, ("id",))
        assert table.column_names == ["id"]
        ids = table.column("id").to_pylist()
        assert ids == list(range(chunk.row_start, chunk.row_end))
        seen.extend(ids)
    assert seen == list(range(1000))


def test_read_chunk_row_ranges_of_a_later_row_group(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "two.parquet", rows=2000, row_group=1000, start=5000)
    meta = read_file_meta(str(path), ("name", "id"))
    chunks = chunks_of(path, min(g.nbytes for g in meta.row_groups) // 7, ("name", "id"))
    later = [c for c in chunks if c.rg_start == 1]
    assert len(later) >= 7 and all(c.rg_row_offset == 1000 for c in later)
    for chunk in chunks:
        table = read_chunk(chunk, ("name", "id"))
        assert table.column_names == ["name", "id"]
        expected = list(range(5000 + chunk.row_start, 5000 + chunk.row_end))
        assert table.column("id").to_pylist() == expected
        assert table.column("name").to_pylist() == [f"row-{i}" for i in expected]


def test_read_chunk_whole_row_groups_and_all_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "groups.parquet", rows=300, row_group=100)
    meta = read_file_meta(str(path), None)
    (chunk,) = chunks_of(path, sum(g.nbytes for g in meta.row_groups))  # all three coalesced
    table = read_chunk(chunk, None)
    assert table.column_names == ["id", "value", "name"]
    assert table.column("id").to_pylist() == list(range(300))


def test_read_chunk_refuses_a_rewritten_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "f.parquet", rows=100, row_group=100)
    (chunk,) = chunks_of(path, 2**30)
    write_parquet(path, rows=150, row_group=100)
    with pytest.raises(InputChanged):
        read_chunk(chunk, None)


def test_the_forkserver_ignores_a_terminals_ctrl_c_while_it_loads() -> None:
    """Ctrl-C in a run's first second reached the forkserver (one process group) while it was
    importing, and it printed a KeyboardInterrupt traceback. The coordinator's handler stays."""
    code = (
        "import multiprocessing.forkserver as fs, signal\n"
        "from minibatch.pool import warm_up\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "warm_up(duckdb=False)\n"
        "status = open(f'/proc/{fs._forkserver._forkserver_pid}/status').read()\n"
        "ignored = int(status.split('SigIgn:')[1].split()[0], 16)\n"
        "kept = signal.getsignal(signal.SIGINT) is before\n"
        "print(bool(ignored & (1 << (signal.SIGINT - 1))), kept)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "True"], result.stderr


def test_one_attempt_run_twice_never_rewrites_the_others_file(env: dict[str, Path]) -> None:
    """Hostile review (Dask): a worker the scheduler gave up on, still alive, ran an attempt
    that the scheduler had run again elsewhere; both wrote the one staged name, so the late one
    truncated and rewrote the part after the coordinator had published it (unreadable, exit 0)."""
    from minibatch.worker import run_task

    chunk = plan_chunks([read_file_meta(str(env["input"]), None)], 10**9)[0]
    first = run_task(task(1, chunk, spec(env)))
    written = Path(str(first.staged)).read_bytes()
    second = run_task(task(1, chunk, spec(env)))  # the same attempt again, as Dask may run it
    assert first.staged != second.staged
    assert Path(str(first.staged)).read_bytes() == written


def test_a_long_lived_worker_runs_each_projects_own_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review (Dask, whose workers outlive runs and serve several configs): project a's
    job, whose function imports its helper as it runs, got project b's helper after b ran on the
    same worker; and a helper edited with `version` raised kept its old code (exit 0 both)."""
    import dataclasses

    import pyarrow.parquet as pq

    from minibatch.worker import run_task

    monkeypatch.setattr(sys, "path", list(sys.path))
    chunk = plan_chunks(
        [read_file_meta(str(write_parquet(tmp_path / "in.parquet", rows=10, row_group=10)), None)], 10**9
    )[0]

    def project(name: str, factor: int) -> JobSpec:
        base = tmp_path / name
        (base / "mbjobs").mkdir(parents=True)
        (base / "mbjobs" / "__init__.py").write_text("")
        (base / "mbjobs" / "helpers.py").write_text(f"FACTOR = {factor}\n")
        (base / "mbjobs" / "etl.py").write_text(
            "import pyarrow as pa\n\ndef run(table, ctx):\n    from mbjobs.helpers import FACTOR\n"
            "    return pa.table({'y': [FACTOR] * table.num_rows})\n"
        )
        (tmp_path / f"staging-{name}").mkdir()
        staging = str(tmp_path / f"staging-{name}")
        return JobSpec(name="t", process="mbjobs.etl:run", sql=None, columns=None, base_dir=str(base),
                       parts_dir=staging, staging_dir=staging, definition="v1")  # fmt: skip

    def factors(job: JobSpec) -> set[int]:
        result = run_task(Task(1, chunk, job, "run-1", 1, "part-1.parquet", "staged"))
        return set(pq.read_table(str(result.staged))["y"].to_pylist())

    try:
        a, b = project("a", 1), project("b", 1000)
        assert [factors(a), factors(b), factors(a)] == [{1}, {1000}, {1}]
        (Path(a.base_dir) / "mbjobs" / "helpers.py").write_text("FACTOR = 10\n")  # edited, `version` raised
        assert factors(dataclasses.replace(a, definition="v2")) == {10}
    finally:
        for name in [n for n in sys.modules if n == "mbjobs" or n.startswith("mbjobs.")]:
            del sys.modules[name]


def test_a_directory_waiting_for_a_worker_gets_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: on a worker with several threads, project b's task waited for as long as
    project a's tasks kept overlapping (each new one of a's went in ahead of it)."""
    import threading

    from minibatch import worker

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"job_{name}.py").write_text("def run(table, ctx):\n    return table\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = {
        name: JobSpec(name=name, process=f"job_{name}:run", sql=None, columns=None,
                      base_dir=str(tmp_path / name), parts_dir="", staging_dir="")
        for name in ("a", "b")
    }  # fmt: skip
    order: list[str] = []
    release = threading.Event()

    def task(name: str, hold: bool = False) -> None:
        with worker._job_code(spec[name]):
            order.append(name)
            if hold:
                release.wait(10)

    first = threading.Thread(target=task, args=("a", True))
    first.start()
    wait_for(lambda: order == ["a"], what="a's first task in")
    later = [threading.Thread(target=task, args=(name,)) for name in ("b", "a")]
    later[0].start()
    wait_for(lambda: worker._waiting[spec["b"].base_dir] == 1, what="b waiting")
    later[1].start()
    wait_for(lambda: worker._waiting[spec["a"].base_dir] == 1, what="a's second task waiting")
    release.set()
    for thread in [first, *later]:
        thread.join(10)
    assert order == ["a", "b", "a"]


def test_a_task_whose_import_fails_lets_the_others_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a task of another directory whose job code failed to import left the queue
    without a word, and a task that had gone back to wait behind it waited for good."""
    import threading

    from minibatch import worker
    from minibatch.jobcode import JobCodeError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "job_bad.py").write_text("raise RuntimeError('broken')\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "job_b.py").write_text("def run(table, ctx):\n    return table\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    bad = JobSpec(name="a", process="job_bad:run", sql=None, columns=None, base_dir=str(tmp_path / "a"),
                  parts_dir="", staging_dir="")  # fmt: skip
    good = dataclasses.replace(bad, name="b", process="job_b:run", base_dir=str(tmp_path / "b"))
    for _ in range(20):  # which waiter takes the lock first after a wake-up is the scheduler's choice
        release, outcomes = threading.Event(), []

        def task(
            job: JobSpec, hold: bool = False, release: threading.Event = release, seen: list = outcomes
        ) -> None:
            try:
                with worker._job_code(job):
                    seen.append(job.name)
                    if hold:
                        release.wait(10)
            except JobCodeError:
                seen.append("failed")

        threads = [threading.Thread(target=task, args=(good, True))]
        threads[0].start()
        wait_for(lambda seen=outcomes: seen == ["b"], what="b's first task in")
        threads.append(threading.Thread(target=task, args=(bad,)))
        threads[1].start()
        wait_for(lambda: worker._waiting[bad.base_dir] == 1, what="a waiting")
        threads.append(threading.Thread(target=task, args=(good,)))
        threads[2].start()
        wait_for(lambda: worker._waiting[good.base_dir] == 1, what="b's second task waiting")
        release.set()
        for thread in threads:
            thread.join(5)
        assert outcomes == ["b", "failed", "b"]


def test_a_job_error_that_quotes_a_full_disk_is_the_jobs_not_the_machines() -> None:
    """Hostile review: a job's ValueError quoting a value ("... No space left on device ...")
    was taken for a full disk: the chunk was never charged, and every run halted for good."""
    import errno

    from minibatch.states import ErrorKind
    from minibatch.worker import describe_error

    quoted = ValueError("row 5: unexpected note 'No space left on device' in column n")
    assert describe_error(quoted).kind == ErrorKind.ERROR
    arrows = OSError("IOError: No space left on device")  # no errno
    assert describe_error(arrows).kind == ErrorKind.ENVIRONMENT
    assert describe_error(OSError(errno.EROFS, "Read-only file system")).kind == ErrorKind.ENVIRONMENT
