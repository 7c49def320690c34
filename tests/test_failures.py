"""Fault injection through the real CLI: raising, crashing, hanging and hogging chunks,
signals, concurrent runs, and what the manifest and the output say afterwards."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest

from conftest import MAP_JOB, Project, faulty_job, wait_for, watch_stderr


def setup(project: Project, process: str, extra: str = "", files: int = 2, rows: int = 500) -> None:
    project.write_config(faulty_job(process, extra))
    for i in range(files):
        project.write_input(f"f{i}.parquet", i * rows, rows)


def ids(project: Project) -> list[int]:
    return sorted(project.output_table("f").column("id").to_pylist())


def attempts(project: Project) -> Counter[str]:
    return Counter(project.computations())


def test_raising_chunk_is_retried_with_the_attempt_number_in_ctx(project: Project) -> None:
    setup(project, "flaky")
    result = project.cli("run-now", "f", env={"MB_TARGET": "f1.parquet:0"})
    assert result.returncode == 0, result.stderr
    assert ids(project) == list(range(1000))
    lines = project.count_file.read_text().split("\n")
    assert sum(line.endswith(" 2") for line in lines) == 1  # the target's second attempt
    assert "chunk_retry" in result.stderr and "flaky service said no" in result.stderr


def test_poison_chunk_is_dead_lettered_skipped_then_retried(project: Project) -> None:
    setup(project, "poison", "retries = 1")
    fixed = project.root / "fixed"
    env = {"MB_TARGET": "f0.parquet:0", "MB_FIXED": str(fixed)}
    result = project.cli("run-now", "f", env=env)
    assert result.returncode == 1
    assert "dead letter:" in result.stdout and "f0.parquet rows 0-" in result.stdout
    assert "ValueError: cannot parse this chunk" in result.stdout
    assert "minibatch retry f" in result.stdout
    (dead,) = project.manifest_rows("SELECT attempts, error_type, traceback FROM chunks WHERE status='dead'")
    assert dead[0] == 2 and dead[1] == "ValueError" and "in poison" in dead[2]
    status = json.loads(project.cli("status", "f", "--json").stdout)[0]
    assert status["chunks_dead"] == 1 and status["status"] == "failed"
    missing = set(range(1000)) - set(ids(project))
    assert missing and min(missing) == 0 and len(ids(project)) == 1000 - len(missing)

    again = project.cli("run-now", "f", env=env)  # a nightly run: skips the dead letter, exit 0
    assert again.returncode == 0, again.stderr
    assert "dead_letters_skipped" in again.stderr
    assert "1 dead letters skipped" in again.stdout

    fixed.touch()
    retried = project.cli("retry", "f", env=env)
    assert retried.returncode == 0, retried.stderr
    assert ids(project) == list(range(1000))
    assert project.manifest_rows("SELECT count(*) FROM chunks WHERE status='dead'") == [(0,)]


@pytest.mark.parametrize("process", ["exit_once", "segfault_once", "sigkill_once"])
def test_worker_death_costs_only_its_chunk(project: Project, process: str) -> None:
    setup(project, process, files=3)
    result = project.cli("run-now", "f", env={"MB_TARGET": "f1.parquet:0", "MB_SLEEP": "0.02"})
    assert result.returncode == 0, result.stderr
    assert ids(project) == list(range(1500))
    assert "worker pid" in result.stderr  # the death was logged as the chunk's error
    lines = [line.split() for line in project.count_file.read_text().splitlines()]
    second_attempts = [chunk for chunk, attempt in lines if attempt == "2"]
    assert len(second_attempts) == 1  # only the chunk that killed its worker was charged


def test_hanging_chunk_is_stopped_by_its_timeout(project: Project) -> None:
    setup(project, "hang", 'timeout = "1s"\nretries = 1')
    started = time.monotonic()
    result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0"}, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "ChunkTimeout" in result.stdout and "timeout of 1s" in result.stdout
    assert elapsed < 20
    assert len(ids(project)) > 0 and 0 not in ids(project)


def test_runaway_allocation_fails_in_its_worker_with_a_memory_error(project: Project) -> None:
    setup(project, "hog", 'worker_memory_limit = "3GiB"\nretries = 0')
    result = project.cli("run-now", "f", env={"MB_TARGET": "f1.parquet:0"})
    assert result.returncode == 1
    assert "MemoryError" in result.stdout and "memory" in result.stdout
    assert 500 not in ids(project) and 499 in ids(project)


def test_a_worker_whose_allocation_failed_takes_no_more_chunks(project: Project) -> None:
    """Hostile review: after a MemoryError, Arrow's or DuckDB's state in that worker may be
    torn; it took the next chunks and failed them with other errors (a ZSTD decompression
    failure), dead letters that later runs skip. A fresh worker takes over."""
    pids = project.root / "pids.txt"
    setup(project, "hog_once", 'worker_memory_limit = "3GiB"\nworkers = 1')
    result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0", "MB_PIDS": str(pids)})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [line.split() for line in pids.read_text().splitlines()]
    hogged = {pid for pid, what in calls if what == "hog"}
    assert hogged and not hogged & {pid for pid, what in calls if what == "ok"}, calls
    assert ids(project) == list(range(1000))


def test_two_concurrent_runs_second_exits_3(project: Project) -> None:
    setup(project, "slow")
    first = project.start("run-now", "f", env={"MB_SLEEP": "0.2"})
    try:
        wait_for(lambda: len(project.computations()) >= 1, what="first run to start")
        second = project.cli("run-now", "f")
        assert second.returncode == 3
        assert f"already running in process {first.pid}" in second.stderr
        assert project.cli("status", "f").returncode == 0
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.mark.parametrize(
    ("to", "signum"), [("coordinator", signal.SIGTERM), ("group", signal.SIGTERM), ("group", signal.SIGINT)]
)
def test_sigterm_finishes_in_flight_chunks_exits_0_and_resumes(
    project: Project, to: str, signum: int
) -> None:
    """Hostile reviews: a SIGTERM to the whole process group (`kill -TERM -PGID`, a supervisor
    that signals every process) killed the workers mid-chunk, each chunk charged an attempt (a
    dead letter with `retries = 0`, skipped by later runs); the programs a job runs, too, with
    Ctrl-C as well. Stopping is the coordinator's: chunks in flight, and their programs, finish."""
    setup(project, "program", files=4)
    env = {"MB_SLEEP": "0.1"}
    process = project.start("run-now", "f", env=env)
    wait_for(lambda: len(project.computations()) >= 4, what="chunks to run")
    sent = time.monotonic()
    if to == "group":
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    stop_seconds = time.monotonic() - sent
    assert process.returncode == 0, err
    assert "stopped by a signal" in out and "stop_requested" in err
    assert stop_seconds < 5
    status = json.loads(project.cli("status", "f", "--json").stdout)[0]
    assert status["status"] == "stopped" and status["chunks_pending"] > 0 and status["chunks_dead"] == 0
    assert project.manifest_rows("SELECT count(*) FROM attempts WHERE outcome <> 'done'") == [(0,)]
    done_before = status["chunks_done"]
    assert done_before == len(set(project.computations()))  # every started chunk was recorded
    result = project.cli("run-now", "f")  # the resume need not be slow
    assert result.returncode == 0
    assert ids(project) == list(range(2000))
    assert len(project.computations()) == len(set(project.computations()))  # none computed twice


def test_second_signal_stops_at_once(project: Project) -> None:
    setup(project, "slow", 'stop_grace = "60s"')
    process = project.start("run-now", "f", env={"MB_SLEEP": "30"})
    wait_for(lambda: len(project.computations()) >= 1, what="a chunk to start")
    err = watch_stderr(process)
    process.send_signal(signal.SIGINT)
    # Unhandled signals of one kind coalesce, so wait until the first one was acted on.
    wait_for(lambda: "stop_requested" in "".join(err), what="the first signal to be handled")
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    process.wait(timeout=15)
    assert time.monotonic() - started < 10  # not the 30 s the chunk would take
    assert process.returncode == 0
    status = json.loads(project.cli("status", "f", "--json").stdout)[0]
    assert status["status"] == "stopped" and status["chunks_done"] == 0


def test_circuit_breaker_ends_the_run_and_leaves_untried_chunks_pending(project: Project) -> None:
    extra = 'retries = 0\nbreaker_failures = 3\nbreaker_cooldown = "200ms"'
    setup(project, "always_fail", extra, files=4)
    result = project.cli("run-now", "f")
    assert result.returncode == 1
    assert "circuit breaker opened (3 consecutive failed attempts)" in result.stdout
    assert "breaker_open" in result.stderr
    status = json.loads(project.cli("status", "f", "--json").stdout)[0]
    # the 3 that opened it, up to 4 already in flight (2 workers x 2 queued), the trial; no more
    assert status["chunks_dead"] <= 8
    assert status["chunks_pending"] >= status["chunks_total"] - 8
    assert len(project.computations()) == status["chunks_dead"]


def test_chunk_with_a_different_schema_fails_naming_the_column(project: Project) -> None:
    setup(project, "drift", "retries = 0")
    result = project.cli("run-now", "f", env={"MB_TARGET": "f1.parquet:0"})
    assert result.returncode == 1
    assert "SchemaMismatch" in result.stdout and "value is string, expected int64" in result.stdout
    table = project.output_table("f")  # still readable as one table
    assert table.schema.field("value").type == "int64"
    assert 500 not in table.column("id").to_pylist()


@pytest.mark.parametrize("shape", ["", 'target_file_bytes = "1MB"'], ids=["parts", "right-sized"])
def test_a_file_removed_under_a_resumed_run_takes_all_its_rows_with_it(project: Project, shape: str) -> None:
    """Hostile review: b.parquet, half done by a killed run, removed while the next run ran: that
    run exited 0 and published the half earlier runs had finished (rows of a file that is no
    longer input, and not all of them)."""
    job = MAP_JOB.replace("myjobs.basic:ident", "myjobs.faulty:crash_at") + f"workers = 1\n{shape}\n"
    project.write_config(job)
    project.write_input("a.parquet", 0, 500)  # 10 chunks of 50 rows
    project.write_input("b.parquet", 500, 1000)  # 20
    killed = project.start("run-now", "ident", env={"MB_CRASH_AT": "16", "MB_SLEEP": "0.15"})
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    run = project.start("run-now", "ident", env={"MB_SLEEP": "0.2"})
    lines = watch_stderr(run)
    wait_for(lambda: any('"run_planned"' in line for line in lines), what="the plan")
    (project.data / "b.parquet").unlink()
    run.wait(timeout=60)
    assert run.returncode == 0, "".join(lines)  # a removed file is not a failure ...
    ids = sorted(project.output_table("ident").column("id").to_pylist())
    assert ids == list(range(500))  # ... and none of its rows stay
    assert project.manifest_rows("SELECT count(*) FROM chunks WHERE file LIKE '%b.parquet'") == [(0,)]
    again = project.cli("run-now", "ident")
    assert again.returncode == 0 and sorted(project.output_table("ident").column("id").to_pylist()) == ids


def test_errors_that_are_hard_to_put_into_words_are_dead_letters(project: Project) -> None:
    """Hostile review: a message with a lone surrogate (os.fsdecode of a non-UTF-8 name) failed
    every commit of the manifest, so every run crashed and the chunk never became a dead letter;
    an exception whose __str__ raises killed its worker."""
    project.write_config(faulty_job("odd_errors", "retries = 0\nbreaker_failures = 0"))
    project.write_input("a.parquet", 0, 300)
    first = project.cli("run-now", "f")
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    dead = dict(project.manifest_rows("SELECT error_type, error_message FROM chunks WHERE status = 'dead'"))
    assert dead == {
        "FileNotFoundError": "lookup file missing: /landing/bad\\udcff.csv",
        "Unprintable": "<str() of the Unprintable raised RuntimeError>",
    }
    assert project.cli("dead", "f").returncode == 0
    again = project.cli("run-now", "f")
    assert again.returncode == 0, again.stderr  # the dead letters are skipped


def test_a_result_with_two_columns_of_one_name_is_refused(project: Project) -> None:
    """Hostile review: it was published, and pyarrow's dataset cannot read such an output."""
    project.write_config(faulty_job("twin_columns", "retries = 0\nbreaker_failures = 0"))
    project.write_input("a.parquet", 0, 100)
    result = project.cli("run-now", "f")
    assert result.returncode == 1, result.stderr
    dead = project.manifest_rows("SELECT DISTINCT error_message FROM chunks WHERE status = 'dead'")
    ((message,),) = dead
    assert message.startswith("the result has more than one column named 'id'")
    assert not list(project.out("f").glob("*.parquet"))


def test_a_share_gone_under_a_run_keeps_its_results(project: Project) -> None:
    """Hostile review of drop_removed: b.parquet, a symlink into a share, dangling once the share
    went away mid-run, was taken for a removed file and its results were deleted."""
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.faulty:crash_at") + "workers = 1\n")
    project.write_input("a.parquet", 0, 500)
    shared = project.write_shared_input("b.parquet", 500, 1000)
    killed = project.start("run-now", "ident", env={"MB_CRASH_AT": "16", "MB_SLEEP": "0.15"})
    killed.communicate(timeout=60)
    run = project.start("run-now", "ident", env={"MB_SLEEP": "0.2"})
    lines = watch_stderr(run)
    wait_for(lambda: any('"run_planned"' in line for line in lines), what="the plan")
    shared.rename(shared.with_name("away"))  # unmounted
    run.wait(timeout=60)
    assert run.returncode == 1, "".join(lines)
    ((error,),) = project.manifest_rows("SELECT error FROM runs ORDER BY started_at DESC LIMIT 1")
    assert "b.parquet: a symlink to" in error and "which cannot be reached" in error, error
    done = project.manifest_rows("SELECT count(*) FROM chunks WHERE file LIKE '%b.parquet'")
    assert done[0][0] >= 5  # what earlier runs finished of b stays
    shared.with_name("away").rename(shared)
    assert project.cli("run-now", "ident").returncode == 0
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(1500))


@pytest.mark.parametrize("change", ["alias", "rename"])
def test_a_file_still_matched_under_another_name_keeps_its_results(project: Project, change: str) -> None:
    """Hostile review of drop_removed: the plan named b.parquet by a symlink (a0.parquet sorts
    first); removing only the link dropped the results of a file still input, exit 0. Renaming
    b.parquet mid-run dropped its results too, and the run succeeded without the renamed file."""
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.faulty:crash_at") + "workers = 1\n")
    project.write_input("a.parquet", 0, 500)
    project.write_input("b.parquet", 500, 1000)
    if change == "alias":
        (project.data / "a0.parquet").symlink_to(project.data / "b.parquet")
    killed = project.start("run-now", "ident", env={"MB_CRASH_AT": "16", "MB_SLEEP": "0.15"})
    killed.communicate(timeout=60)
    run = project.start("run-now", "ident", env={"MB_SLEEP": "0.2"})
    lines = watch_stderr(run)
    wait_for(lambda: any('"run_planned"' in line for line in lines), what="the plan")
    if change == "alias":
        (project.data / "a0.parquet").unlink()
    else:
        (project.data / "b.parquet").rename(project.data / "c.parquet")
    assert run.wait(timeout=60) == 1, "".join(lines)  # the input changed: not a success
    assert project.manifest_rows("SELECT count(*) FROM chunks")[0][0] >= 15  # nothing was dropped
    assert project.cli("run-now", "ident").returncode == 0
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(1500))


@pytest.mark.parametrize("then", ["unchanged", "fixed"])
def test_a_run_stopped_after_a_dead_letter_or_bad_file_leaves_them_to_fail_the_next(
    project: Project, then: str
) -> None:
    """Hostile review: a run that dead-lettered a chunk (or found a new bad file) and was then
    stopped ended `stopped`, exit 0; the next skipped the dead letter (and knew the bad file)
    and succeeded, exit 0, on_success and dependents released over the hole: no run ever
    failed for them. The next run reports them (exit 1), once, naming them; and not a dead
    letter its file's rewrite took out of the plan (second review)."""
    setup(project, "poison", "retries = 0", files=4)
    (project.data / "bad.parquet").write_bytes(b"not parquet at all")
    env = {"MB_TARGET": "f0.parquet:0", "MB_FIXED": str(project.root / "fixed"), "MB_SLEEP": "0.3"}
    process = project.start("run-now", "f", env=env)
    err = watch_stderr(process)
    wait_for(lambda: "chunk_dead" in "".join(err), what="the dead letter")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, "".join(err)
    assert json.loads(project.cli("status", "f", "--json").stdout)[0]["status"] == "stopped"
    if then == "fixed":
        (project.data / "bad.parquet").unlink()
        project.write_input("f0.parquet", 0, 500)  # rewritten: its chunks are new ones
        project.write_env({**env, "MB_TARGET": ""})
        resumed = project.cli("run-now", "f", env={**env, "MB_TARGET": "", "MB_SLEEP": "0"})
        assert resumed.returncode == 0 and "0 dead-lettered, 0 dead letters skipped" in resumed.stdout
        assert ids(project) == list(range(2000))
        return
    resumed = project.cli("run-now", "f", env={**env, "MB_SLEEP": "0"})
    assert resumed.returncode == 1, resumed.stdout
    assert "1 dead-lettered" in resumed.stdout and "bad.parquet" in resumed.stdout + resumed.stderr
    assert "dead letter: " in resumed.stdout and "f0.parquet rows 0-50" in resumed.stdout, resumed.stdout
    again = project.cli("run-now", "f", env={**env, "MB_SLEEP": "0"})
    assert again.returncode == 0 and "1 dead letters skipped" in again.stdout, again.stdout
    assert ids(project) == list(range(50, 2000))  # all but the dead letter's rows (a 50-row chunk)


@pytest.mark.parametrize("retries", [2, 0])
def test_a_file_that_trips_the_breaker_every_run_starves_no_other(project: Project, retries: int) -> None:
    """Hostile review: a file whose every chunk fails, first in plan order, tripped the circuit
    breaker before any other file's chunk was admitted, run after run: no progress at all. A
    file that failed in an earlier run goes last (also when its chunks went straight to dead
    letters: second review)."""
    extra = f'breaker_failures = 3\nbreaker_cooldown = "50ms"\nretries = {retries}'
    setup(project, "bad_file", extra, files=3, rows=1000)  # 20 chunks a file
    env = {"MB_BAD_FILE": "f0.parquet"}
    first = project.cli("run-now", "f", env=env)
    assert first.returncode == 1 and "circuit breaker opened" in first.stdout, first.stdout
    second = project.cli("run-now", "f", env=env)
    assert second.returncode == 1, second.stdout  # the bad file fails it (its breaker, or its dead letters)
    assert ids(project) == list(range(1000, 3000))  # every other file's rows
