"""The DuckDB manifest (minibatch/manifest.py): records round trip through a real DuckDB file,
and a second real process holding the file makes `connect()` wait, or give up at its deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from minibatch.manifest import Manifest, ManifestBusy, ManifestError
from minibatch.planner import BadFile
from minibatch.records import ChunkRecord, RunRecord

from conftest import start_ready

T0 = 1_750_000_000.0  # a fixed unix time, so timestamps can be compared exactly


def run_record(run_id: str, job: str = "j", started_at: float = T0, **kwargs: object) -> RunRecord:
    return RunRecord(run_id=run_id, job=job, pid=4242, started_at=started_at, **kwargs)


def chunk(chunk_id: str, job: str = "j", status: str = "done", **kwargs: object) -> ChunkRecord:
    fields: dict[str, object] = {
        "file": f"/data/{chunk_id}.parquet",
        "fingerprint": "100-200-abcdef",
        "row_start": 0,
        "row_end": 100,
        "run_id": "r1",
        "attempts": 1,
        "finished_at": T0 + 5,
    }
    fields.update(kwargs)
    return ChunkRecord(job=job, chunk_id=chunk_id, status=status, **fields)


def dead(chunk_id: str, job: str = "j") -> ChunkRecord:
    return chunk(
        chunk_id,
        job,
        status="dead",
        attempts=3,
        error_type="RuntimeError",
        error_message="poisoned row",
        traceback="Traceback ...",
    )


def query(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "manifest.duckdb"


# ---------------------------------------------------------------- records


def test_status_of_a_missing_manifest_is_empty_and_creates_nothing(path: Path) -> None:
    assert Manifest(path).status() == []
    assert Manifest(path).status("j") == []
    assert not path.exists()
    assert Manifest(path).chunk_states("j") == {}
    assert path.exists()  # a write connection creates it, with the schema
    assert query(path, "SELECT count(*) FROM runs") == [(0,)]


def test_commit_chunk_states_status_round_trip(path: Path) -> None:
    manifest = Manifest(path)
    run = run_record("r1", chunks_total=4)
    manifest.start_run(run)
    (row,) = manifest.status("j")
    assert row["status"] == "running" and row["done_total"] == 0 and row["dead_total"] == 0

    run.chunks_done, run.chunks_dead, run.rows_out = 2, 1, 10
    records = [
        chunk("c1", rows_in=100, rows_out=10, output_file="part-c1.parquet"),
        chunk("c2", rows_in=100, rows_out=0, output_file=None),
        dead("c3"),
    ]
    manifest.commit(run, records)
    assert manifest.chunk_states("j") == {
        "c1": ("done", "part-c1.parquet"),
        "c2": ("done", None),
        "c3": ("dead", None),
    }

    run.status, run.ended_at = "failed", T0 + 60
    manifest.commit(run, [])
    (row,) = manifest.status("j")
    assert row["run_id"] == "r1" and row["status"] == "failed" and row["pid"] == 4242
    assert (row["chunks_total"], row["chunks_done"], row["chunks_dead"], row["rows_out"]) == (4, 2, 1, 10)
    assert (row["done_total"], row["dead_total"], row["rows_out_total"]) == (2, 1, 10)
    assert row["started_at"] == datetime.fromtimestamp(T0, UTC)
    assert row["ended_at"] == datetime.fromtimestamp(T0 + 60, UTC)

    (letter,) = manifest.dead_letters("j")
    assert letter["chunk_id"] == "c3" and letter["attempts"] == 3
    assert (letter["error_type"], letter["error_message"]) == ("RuntimeError", "poisoned row")
    assert letter["finished_at"] == datetime.fromtimestamp(T0 + 5, UTC)
    assert query(path, "SELECT traceback FROM chunks WHERE chunk_id = 'c3'") == [("Traceback ...",)]


def test_recommitting_a_chunk_replaces_it(path: Path) -> None:
    manifest = Manifest(path)
    run = run_record("r1")
    manifest.commit(run, [dead("c1")])
    manifest.commit(run, [chunk("c1", attempts=4, output_file="part-c1.parquet")])
    assert manifest.chunk_states("j") == {"c1": ("done", "part-c1.parquet")}
    assert query(path, "SELECT count(*), max(attempts) FROM chunks") == [(1, 4)]


def test_status_shows_the_latest_run_of_each_job(path: Path) -> None:
    manifest = Manifest(path)
    manifest.commit(run_record("r1", status="succeeded"), [chunk("c1")])
    manifest.commit(run_record("r2", started_at=T0 + 100, status="stopped"), [chunk("c2")])
    manifest.commit(run_record("k1", job="k", status="succeeded"), [chunk("c1", job="k"), dead("c9", "k")])
    rows = manifest.status()
    assert [(r["job"], r["run_id"], r["status"]) for r in rows] == [
        ("j", "r2", "stopped"),
        ("k", "k1", "succeeded"),
    ]
    assert [(r["done_total"], r["dead_total"]) for r in rows] == [(2, 0), (1, 1)]
    assert [r["run_id"] for r in manifest.status("k")] == ["k1"]


def test_start_run_marks_a_left_over_running_run_crashed(path: Path) -> None:
    manifest = Manifest(path)
    manifest.start_run(run_record("r1"))
    manifest.start_run(run_record("other", job="k"))
    manifest.start_run(run_record("r2", started_at=T0 + 10))
    statuses = dict(query(path, "SELECT run_id, status FROM runs"))
    assert statuses == {"r1": "crashed", "r2": "running", "other": "running"}
    assert query(path, "SELECT ended_at IS NOT NULL FROM runs WHERE run_id = 'r1'") == [(True,)]


def test_forget_chunks_only_forgets_the_named_chunks_of_that_job(path: Path) -> None:
    manifest = Manifest(path)
    manifest.commit(run_record("r1"), [chunk("c1"), chunk("c2"), dead("c3")])
    manifest.commit(run_record("k1", job="k", status="failed"), [chunk("c1", job="k")])
    manifest.forget_chunks("j", [])
    assert set(manifest.chunk_states("j")) == {"c1", "c2", "c3"}
    manifest.forget_chunks("j", ["c1", "c3", "not-there"])
    assert set(manifest.chunk_states("j")) == {"c2"}
    assert set(manifest.chunk_states("k")) == {"c1"}


def test_bad_files_recorded_once_per_fingerprint(path: Path) -> None:
    manifest = Manifest(path)
    assert manifest.known_bad_files("j") == set()
    first = BadFile(path="/data/x.parquet", fingerprint="10-1-aa", size=10, error="ArrowInvalid: nope")
    manifest.record_bad_files("j", "r1", [first])
    manifest.record_bad_files("j", "r2", [first])  # seen again: still one row
    changed = BadFile(path="/data/x.parquet", fingerprint="12-2-bb", size=12, error="ValueError: worse")
    manifest.record_bad_files("j", "r2", [changed])
    manifest.record_bad_files("k", "k1", [first])
    assert manifest.known_bad_files("j") == {("/data/x.parquet", "10-1-aa"), ("/data/x.parquet", "12-2-bb")}
    assert manifest.known_bad_files("k") == {("/data/x.parquet", "10-1-aa")}
    rows = query(
        path, "SELECT fingerprint, size, error, run_id FROM bad_files WHERE job = 'j' ORDER BY fingerprint"
    )
    assert rows == [("10-1-aa", 10, "ArrowInvalid: nope", "r2"), ("12-2-bb", 12, "ValueError: worse", "r2")]


def test_revive_dead_forgets_dead_letters_and_bad_files_of_one_job(path: Path) -> None:
    manifest = Manifest(path)
    manifest.commit(run_record("r1"), [chunk("c1"), dead("c2"), dead("c3")])
    manifest.commit(run_record("k1", job="k", status="failed"), [dead("c2", "k")])  # it reported them
    bad = BadFile(path="/data/x.parquet", fingerprint="f", size=1, error="e")
    manifest.record_bad_files("j", "r1", [bad])
    manifest.record_bad_files("k", "k1", [bad])

    assert manifest.revive_dead("j") == 2
    assert manifest.chunk_states("j") == {"c1": ("done", None)}
    assert manifest.known_bad_files("j") == set()
    assert manifest.chunk_states("k") == {"c2": ("dead", None)}
    assert manifest.known_bad_files("k") == {("/data/x.parquet", "f")}
    assert manifest.revive_dead("j") == 0


def test_reset_forgets_a_jobs_checkpoint_but_keeps_its_history(path: Path) -> None:
    manifest = Manifest(path)
    manifest.commit(run_record("r1", status="succeeded"), [chunk("c1"), dead("c2")])
    manifest.commit(run_record("k1", job="k", status="failed"), [chunk("c1", job="k")])
    bad = BadFile(path="/data/x.parquet", fingerprint="f", size=1, error="e")
    manifest.record_bad_files("j", "r1", [bad])
    manifest.record_bad_files("k", "k1", [bad])

    manifest.reset("j")
    assert manifest.chunk_states("j") == {}
    assert manifest.known_bad_files("j") == set()
    (row,) = manifest.status("j")
    assert row["run_id"] == "r1" and (row["done_total"], row["dead_total"]) == (0, 0)
    assert manifest.chunk_states("k") == {"c1": ("done", None)}
    assert manifest.known_bad_files("k") == {("/data/x.parquet", "f")}


# ---------------------------------------------------------------- another process holds the file

HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("SELECT 1")
print("ready", flush=True)
if sys.argv[2] == "stdin":
    sys.stdin.readline()
else:
    time.sleep(float(sys.argv[2]))
con.close()
print("released", flush=True)
"""


def hold(path: Path, how: str) -> subprocess.Popen[str]:
    """A real process holding the manifest open for writing; returns once it holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return start_ready([sys.executable, "-c", HOLDER, str(path), how], "ready")


def test_connect_waits_while_another_process_holds_the_file(path: Path) -> None:
    Manifest(path).start_run(run_record("r1"))
    holder = hold(path, "1.0")
    try:
        started = time.monotonic()
        with Manifest(path, deadline=30).connect() as con:
            waited = time.monotonic() - started
            assert con.execute("SELECT run_id FROM runs").fetchall() == [("r1",)]
        out, _ = holder.communicate(timeout=10)
    finally:
        holder.kill()
        holder.wait()
    assert waited >= 0.7, f"connect returned after {waited:.2f}s while the holder kept the file for 1s"
    assert waited < 10
    assert out == "released\n" and holder.returncode == 0


def test_connect_gives_up_at_its_deadline_while_held(path: Path) -> None:
    Manifest(path).start_run(run_record("r1"))
    holder = hold(path, "stdin")
    try:
        manifest = Manifest(path, deadline=0.2)
        for read_only in (False, True):
            started = time.monotonic()
            with pytest.raises(ManifestBusy, match="busy"), manifest.connect(read_only=read_only):
                pass
            gave_up = time.monotonic() - started
            assert 0.2 <= gave_up < 3.0, gave_up
        with pytest.raises(ManifestBusy):
            manifest.status("j")
        assert holder.poll() is None  # still holding it: the failures were real waits
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()
    (row,) = Manifest(path, deadline=0.2).status("j")  # free again: no wait needed
    assert row["run_id"] == "r1"


def test_threads_of_one_process_read_and_write_without_refusals(tmp_path: Path) -> None:
    """DuckDB refuses a read-only and a read-write connection to one file in one process at
    once; the daemon reads status in one thread while runs commit in others."""
    import threading

    manifest = Manifest(tmp_path / "manifest.duckdb")
    record = run_record("r1")
    manifest.start_run(record)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(16):
                manifest.commit(record, [chunk(f"c{i}")])
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(6):
                manifest.status("j")
                manifest.runs("j")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(manifest.chunk_states("j")) == 16


# ---------------------------------------------------------------- one DuckDB per process, files attached

PROBE = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])  # read-write: refused while any other process holds the file
print(con.execute("SELECT count(*) FROM chunks").fetchone()[0])
"""


def other_process_count(path: Path) -> int:
    probe = [sys.executable, "-c", PROBE, str(path)]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_session_lets_go_of_the_file_when_it_ends_even_after_an_error(path: Path) -> None:
    manifest = Manifest(path)
    manifest.commit(run_record("r1"), [chunk("c1")])
    assert other_process_count(path) == 1  # released after a normal session
    with pytest.raises(RuntimeError), manifest.connect() as con:
        con.execute("BEGIN")
        con.execute("INSERT INTO chunks SELECT * REPLACE ('c2' AS chunk_id) FROM chunks")
        raise RuntimeError("the caller broke inside a transaction")
    assert other_process_count(path) == 1  # rolled back, and released
    with pytest.raises(duckdb.ProgrammingError), manifest.connect() as con:
        con.execute("SELECT * FROM no_such_table")
    manifest.commit(run_record("r1"), [chunk("c3")])  # this process can use it again
    assert other_process_count(path) == 2


def test_a_damaged_manifest_does_not_break_the_next_one_in_the_process(tmp_path: Path) -> None:
    """Whatever a damaged file does to this process's DuckDB (a refused attach, a checkpoint
    that fails when it is let go: see test_safety_crash's repair test), the next session, of
    any manifest, works."""
    broken, good = Manifest(tmp_path / "a" / "m.duckdb"), Manifest(tmp_path / "b" / "m.duckdb")
    broken.commit(run_record("r1"), [chunk(f"c{i}") for i in range(50)])
    os.truncate(broken.path, broken.path.stat().st_size // 2)
    with pytest.raises(ManifestError):
        broken.status()
    with pytest.raises(ManifestError):
        broken.commit(run_record("r1"), [chunk("c51")])
    good.commit(run_record("r1"), [chunk("c1")])
    assert good.chunk_states("j") == {"c1": ("done", None)}
    assert other_process_count(good.path) == 1


def test_a_thread_may_use_another_manifest_inside_a_connection(tmp_path: Path) -> None:
    """The same file again (another Manifest object) shares the attached file; another file is
    attached beside it; both come back as they were, and nothing is held afterwards."""
    a, b = Manifest(tmp_path / "a.duckdb"), Manifest(tmp_path / "b.duckdb")
    a.commit(run_record("r1"), [chunk("a1")])
    b.commit(run_record("r1"), [chunk("b1"), chunk("b2")])
    with a.connect() as con:  # (not inside a transaction: the connection, and so it, is shared)
        assert Manifest(a.path).chunk_states("j").keys() == {"a1"}
        assert b.chunk_states("j").keys() == {"b1", "b2"}
        b.commit(run_record("r1"), [chunk("b3")])
        con.execute("INSERT INTO chunks SELECT * REPLACE ('a2' AS chunk_id) FROM chunks")
    assert other_process_count(a.path) == 2 and other_process_count(b.path) == 3


def test_a_reader_adds_this_releases_columns_to_an_older_manifest_once(path: Path) -> None:
    Manifest(path).commit(run_record("r1"), [chunk("c1")])
    con = duckdb.connect(str(path))  # what the release before measured memory wrote
    dropped = (
        ("runs", "peak_memory"),
        ("runs", "idle_memory"),
        ("attempts", "start_rss"),
        ("attempts", "chunk_size"),
        ("runs", "params"),
        ("runs", "parts_dir"),
        ("runs", "mounts"),
        ("runs", "seq"),
    )
    for table, column in dropped:
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    for table in ("paused_jobs", "backfill_dates", "backfills", "waiting_fires"):
        con.execute(f"DROP TABLE {table}")
    con.close()
    reader = Manifest(path)
    (run,) = reader.runs("j")
    assert run["run_id"] == "r1" and "idle_memory" in run and run["peak_memory"] is None
    assert reader.status("j")[0]["run_id"] == "r1"
    assert query(path, "SELECT count(*) FROM duckdb_columns() WHERE column_name = 'start_rss'") == [(1,)]
    assert query(path, "SELECT count(*) FROM duckdb_columns() WHERE column_name = 'chunk_size'") == [(1,)]
    assert query(
        path, "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'runs' AND column_name = 'params'"
    ) == [(1,)]
    assert query(path, "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'backfill%'") == [(2,)]


def test_learned_memory_counts_a_workers_real_first_attempt(path: Path) -> None:
    """Per byte: what later attempts grew; a worker's start-up: what its first attempt grew beyond
    its chunk at that factor. A worker's first attempt that failed is still its first (a review
    found the second then counted as first, and the start-up came out too low)."""
    from minibatch.records import AttemptRecord
    from minibatch.states import Outcome

    MiB = 2**20

    def attempt(n: int, pid: int, grew: int, outcome: Outcome = Outcome.DONE, job="j") -> AttemptRecord:
        return AttemptRecord(
            job=job, run_id="r1", chunk_id=f"c{pid}-{n}", attempt=1, label="", slot=0, pid=pid,
            admitted_at=T0 + n, started_at=T0 + n, ended_at=T0 + n + 0.5, outcome=outcome,
            reserved_bytes=0, peak_rss=100 * MiB + grew, start_rss=100 * MiB, chunk_size=4 * MiB,
        )  # fmt: skip

    m = Manifest(path)
    assert m.learned_memory("j", 2**20) == (None, None)  # nothing learned yet (a first run learns it)
    attempts = [attempt(1, 7, 30 * MiB), attempt(2, 7, 8 * MiB), attempt(3, 7, 8 * MiB)]
    attempts += [attempt(1, 8, 0, Outcome.RETRIED), attempt(2, 8, 8 * MiB), attempt(3, 8, 8 * MiB)]
    m.start_run(run_record("r1"))
    m.commit(run_record("r1", status="succeeded"), [], attempts)
    factor, startup = m.learned_memory("j", 2**20)
    assert factor == 2.0  # 8 MiB for 4 MiB chunks
    assert startup == 22 * MiB  # pid 7's first: 30 - 2 x 4; pid 8's first failed and does not count
    # Chunks too small to learn a factor from still say what a worker takes on as it starts
    # (a job of 1 KiB chunks learned no start-up, and its later runs started workers it kept).
    small = [replace(attempt(n, 9, grew, job="k"), chunk_size=1024) for n, grew in [(1, 70 * MiB), (2, 0)]]
    m.commit(run_record("r1", status="succeeded"), [], small)
    assert m.learned_memory("k", 2**20) == (None, 70 * MiB)
    # ... but no more than a recent run measured above idle per worker: an attempt's RSS counts
    # library pages a first chunk maps (shared, file-backed), which the tree measure does not
    # (runs of the job's parameter sets count: their key is job[k=v]; runs that did no work don't)
    m.start_run(run_record("r2", job="k[date=2026-01-01]"))
    done = {"status": "succeeded", "chunks_done": 3, "peak_memory": 40 * MiB, "workers": 2}
    m.commit(run_record("r2", job="k[date=2026-01-01]", **done), [], [])
    m.start_run(run_record("r3", job="k"))
    m.commit(run_record("r3", job="k", **(done | {"chunks_done": 0, "peak_memory": 1024})), [], [])
    assert m.learned_memory("k", 2**20) == (None, 20 * MiB)
    assert m.learned_memory("nothing-learned", 2**20) == (None, None)  # a cap is no start-up
    m.start_run(run_record("r4", job="nothing-learned"))
    m.commit(run_record("r4", job="nothing-learned", **done), [], [])
    assert m.learned_memory("nothing-learned", 2**20) == (None, None)
