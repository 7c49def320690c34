"""End to end through the real CLI in a subprocess: outputs checked row by row."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import MAP_JOB, Project, wait_for


def ids_of(project: Project, job: str) -> list[int]:
    return sorted(project.output_table(job).column("id").to_pylist())


def duckdb_ids(project: Project, job: str) -> list[int]:
    glob = str(project.out(job) / "**" / "*.parquet")
    return sorted(r[0] for r in duckdb.sql(f"SELECT id FROM read_parquet('{glob}')").fetchall())


def test_map_job_outputs_every_row_once_and_rerun_computes_nothing(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 1000)
    project.write_input("b.parquet", 1000, 500)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout
    assert ids_of(project, "ident") == list(range(1500))
    assert duckdb_ids(project, "ident") == list(range(1500))
    table = project.output_table("ident")
    pairs = zip(table["doubled"].to_pylist(), table["value"].to_pylist(), strict=True)
    assert all(d == v * 2 for d, v in pairs)
    computed = len(project.computations())
    assert computed >= 2
    again = project.cli("run-now", "ident")
    assert again.returncode == 0
    assert len(project.computations()) == computed  # nothing recomputed
    assert "0 done now" in again.stdout


def test_new_rewritten_and_removed_files_follow_the_inputs(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 300)
    assert project.cli("run-now", "ident").returncode == 0
    project.write_input("c.parquet", 600, 100)  # new
    project.write_input("a.parquet", 5000, 200)  # rewritten with other rows
    (project.data / "b.parquet").unlink()  # removed
    assert project.cli("run-now", "ident").returncode == 0
    assert ids_of(project, "ident") == list(range(600, 700)) + list(range(5000, 5200))
    assert duckdb_ids(project, "ident") == ids_of(project, "ident")


def test_sql_job_matches_duckdb_on_the_same_files(project: Project) -> None:
    project.write_config("""
    [jobs.evens]
    input = "data/*.parquet"
    output = "out/evens"
    sql = "SELECT id, value * 3 AS tripled FROM chunk WHERE id % 2 = 0"
    chunk_bytes = "3KB"
    """)
    project.write_input("a.parquet", 0, 800)
    assert project.cli("run-now", "evens").returncode == 0
    expected = duckdb.sql(
        f"SELECT id, value * 3 FROM read_parquet('{project.data}/*.parquet') WHERE id % 2 = 0 ORDER BY id"
    ).fetchall()
    got = project.output_table("evens").sort_by("id")
    assert list(zip(got["id"].to_pylist(), got["tripled"].to_pylist(), strict=True)) == expected


def test_nan_rows_are_not_pruned_by_the_files_statistics(project: Project) -> None:
    """Parquet's min/max leave NaN out (the spec says so, and pyarrow follows it): DuckDB's reader
    pruned row groups by them and lost the NaN rows a filter keeps (`isnan(x)`, `x > 5`, `x <> 1`),
    in a SQL job's chunks and in a reduce of float parts alike."""
    project.write_config("""
    [jobs.kept]
    input = "data/*.parquet"
    output = "out/kept"
    sql = "SELECT id, x FROM chunk WHERE isnan(x) OR x > 5 OR x <> x"

    [jobs.nans]
    input = "data/*.parquet"
    output = "out/nans"
    sql = "SELECT id, x FROM chunk"
    reduce_sql = '''SELECT count(*) FILTER (WHERE isnan(x)) AS nan, count(*) FILTER (WHERE x > 5) AS big
                    FROM parts WHERE x <> 1'''
    """)
    ids = pa.array(range(300), pa.int64())
    x = pa.array([float("nan") if i % 100 == 7 else float(i % 5) for i in range(300)])
    project.data.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ids, "x": x}), project.data / "a.parquet", row_group_size=100)
    assert project.cli("run-now", "kept").returncode == 0
    kept = project.output_table("kept")
    assert sorted(kept.column("id").to_pylist() if kept.num_rows else []) == [7, 107, 207]
    assert project.cli("run-now", "nans").returncode == 0
    assert project.output_table("nans").to_pylist() == [{"nan": 3, "big": 3}]


def test_reduce_job_matches_duckdb_and_replaces_its_output(project: Project) -> None:
    project.write_config("""
    [jobs.totals]
    input = "data/*.parquet"
    output = "out/totals"
    sql = "SELECT value % 5 AS k, sum(value) AS s, count(*) AS n FROM chunk GROUP BY k"
    reduce_sql = "SELECT k, sum(s) AS s, sum(n) AS n FROM parts GROUP BY k ORDER BY k"
    chunk_bytes = "3KB"
    """)
    project.write_input("a.parquet", 0, 700)
    project.write_input("b.parquet", 700, 300)
    query = (
        f"SELECT value % 5 AS k, sum(value), count(*) FROM read_parquet('{project.data}/*.parquet') "
        "GROUP BY k ORDER BY k"
    )
    assert project.cli("run-now", "totals").returncode == 0
    files = sorted(p.name for p in project.out("totals").iterdir())
    assert files == ["part-reduced.parquet"]
    got = pq.read_table(project.out("totals") / files[0])
    assert [tuple(r.values()) for r in got.to_pylist()] == duckdb.sql(query).fetchall()
    project.write_input("c.parquet", 1000, 200)
    assert project.cli("run-now", "totals").returncode == 0
    got = project.output_table("totals")
    assert [tuple(r.values()) for r in got.to_pylist()] == duckdb.sql(query).fetchall()


def test_fresh_rebuilds_and_reset_removes(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 400)
    assert project.cli("run-now", "ident").returncode == 0
    first = len(project.computations())
    assert project.cli("run-now", "ident", "--fresh").returncode == 0
    assert len(project.computations()) == 2 * first
    assert ids_of(project, "ident") == list(range(400))
    result = project.cli("reset", "ident", "--yes")
    assert result.returncode == 0, result.stderr
    assert not project.out("ident").exists()
    status = json.loads(project.cli("status", "ident", "--json").stdout)
    assert status[0]["chunks_done"] == 0


def test_status_json_while_running_and_second_run_refused(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 3000)
    process = project.start("run-now", "ident", env={"MB_SLEEP": "0.1"})
    try:
        wait_for(lambda: len(project.computations()) >= 2, what="the run to start")
        second = project.cli("run-now", "ident")
        assert second.returncode == 3
        assert f"process {process.pid}" in second.stderr
        status = project.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        (entry,) = json.loads(status.stdout)
        assert entry["status"] == "running"
        assert entry["chunks_total"] > entry["chunks_done"]
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0


def test_unknown_job_and_bad_config_exit_2_without_traceback(project: Project) -> None:
    project.write_config(MAP_JOB + 'bogus = 1\nchunk_bytes2 = "x"\n')
    result = project.cli("run-now", "ident")
    assert result.returncode == 2
    assert "jobs.ident.bogus: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    project.write_config(MAP_JOB)
    result = project.cli("run-now", "nope")
    assert result.returncode == 2
    assert "unknown job 'nope'" in result.stderr
    result = project.cli("run-now", "ident", "--memory-limit", "lots")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


REDUCE_JOB = """
[jobs.totals]
input = "data/*.parquet"
output = "out/totals"
process = "myjobs.faulty:{process}"
reduce_sql = "{reduce}"
chunk_bytes = "5KB"
retries = 0
stop_grace = "300ms"
"""
GOOD_REDUCE = "SELECT count(*) AS n, sum(id) AS s FROM parts"


def reduce_config(project: Project, reduce: str = GOOD_REDUCE, process: str = "slow") -> None:
    project.write_config(REDUCE_JOB.format(process=process, reduce=reduce))


def reduced(project: Project) -> tuple[int, int]:
    (row,) = pq.read_table(project.out("totals") / "part-reduced.parquet").to_pylist()
    return row["n"], row["s"]


def test_a_failed_reduce_is_run_again_by_the_next_run(project: Project) -> None:
    reduce_config(project)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "totals").returncode == 0
    assert reduced(project) == (300, sum(range(300)))
    project.write_input("b.parquet", 300, 200)
    reduce_config(project, reduce="SELECT no_such_column FROM parts")
    failed = project.cli("run-now", "totals")
    assert failed.returncode == 1 and "reduce_sql failed" in failed.stdout
    assert reduced(project) == (300, sum(range(300)))  # the old result stays in place
    reduce_config(project)
    fixed = project.cli("run-now", "totals")  # nothing to compute, but the reduce is owed
    assert fixed.returncode == 0, fixed.stderr
    assert "0 done now" in fixed.stdout
    assert reduced(project) == (500, sum(range(500)))


def test_a_deleted_result_file_is_computed_again(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 600)
    assert project.cli("run-now", "ident").returncode == 0
    victim = sorted(project.out("ident").iterdir())[0]
    victim.unlink()
    again = project.cli("run-now", "ident")
    assert again.returncode == 0, again.stderr
    assert "1 done now" in again.stdout
    assert ids_of(project, "ident") == list(range(600))


def test_a_result_file_truncated_or_replaced_by_another_is_computed_again(project: Project) -> None:
    """Hostile review: a result recorded done was only looked for, never looked at: one cut
    short, or overwritten by another chunk's, stayed, and every run exited 0 with rows missing
    and doubled (or an output DuckDB cannot read, or a traceback). One whose size is not what
    was recorded is checked as a found one is (its footer), and computed again."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 600)
    project.write_input("b.parquet", 600, 50, row_group=50)
    assert project.cli("run-now", "ident").returncode == 0
    parts = sorted(project.out("ident").iterdir(), key=lambda p: p.stat().st_size)
    small, victim, other = parts[0], parts[1], parts[-1]
    assert small.stat().st_size != other.stat().st_size
    other.write_bytes(other.read_bytes()[:-100])  # cut short
    victim.write_bytes(small.read_bytes())  # another chunk's result
    again = project.cli("run-now", "ident")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 done now" in again.stdout, again.stdout
    assert ids_of(project, "ident") == list(range(650))


def test_a_reduce_before_any_chunk_ran_says_why_it_cannot(project: Project) -> None:
    """Hostile review: a reduce job whose every input has no rows, on its first run, failed with
    DuckDB's `Referenced column "id" not found ... Candidate bindings: "_"`: no chunk had run
    to give the output's columns. It says so, and runs once one has."""
    reduce_config(project, "SELECT sum(id) AS s FROM parts")
    path = project.write_input("a.parquet", 0, 10)
    pq.write_table(pq.read_table(path).slice(0, 0), path)  # no rows, the columns' types kept
    result = project.cli("run-now", "totals")
    assert result.returncode == 1 and "no chunk has run yet to give the output's columns" in result.stdout
    project.write_input("b.parquet", 10, 10)
    again = project.cli("run-now", "totals")
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_reduce_job_stopped_mid_run_publishes_nothing(project: Project) -> None:
    reduce_config(project)
    for i in range(3):
        project.write_input(f"f{i}.parquet", i * 400, 400)
    process = project.start("run-now", "totals", env={"MB_SLEEP": "0.3"})
    wait_for(lambda: len(project.computations()) >= 3, what="chunks to run")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped" in out
    assert not (project.out("totals") / "part-reduced.parquet").exists()
    status = json.loads(project.cli("status", "totals", "--json").stdout)[0]
    assert status["status"] == "stopped"
    assert project.cli("run-now", "totals").returncode == 0
    assert reduced(project) == (1200, sum(range(1200)))


def test_a_stop_during_the_reduce_interrupts_it(project: Project) -> None:
    """Hostile review: SIGTERM waited for the whole reduce_sql (17 s against stop_grace) and the
    run was recorded as succeeded; systemd kills a unit that outlives its stop timeout."""
    slow = "SELECT count(*) AS n, sum(id) AS s FROM parts, range(100000000) t(x)"  # minutes
    reduce_config(project, reduce=slow)
    project.write_input("a.parquet", 0, 400)  # 4 chunks
    process = project.start("run-now", "totals")

    wait_for(lambda: len(project.computations()) >= 4, what="the chunks to run")
    start = _cpu_seconds(process.pid)  # then only the reduce spends CPU in the coordinator
    wait_for(lambda: _cpu_seconds(process.pid) > start + 1, what="the reduce to run")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)  # the reduce alone would take minutes
    assert process.returncode == 0, err
    assert "stopped" in out
    assert not (project.out("totals") / "part-reduced.parquet").exists()
    assert json.loads(project.cli("status", "totals", "--json").stdout)[0]["status"] == "stopped"
    reduce_config(project)
    assert project.cli("run-now", "totals").returncode == 0
    assert reduced(project) == (400, sum(range(400)))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_dead_letter_blocks_the_reduce_and_keeps_the_old_output(project: Project) -> None:
    reduce_config(project, process="poison")
    project.write_input("a.parquet", 0, 300)
    fixed = project.root / "fixed"
    fixed.touch()
    env = {"MB_TARGET": "b.parquet:0", "MB_FIXED": str(project.root / "not-yet")}
    assert project.cli("run-now", "totals", env=env).returncode == 0
    project.write_input("b.parquet", 300, 300)
    first = project.cli("run-now", "totals", env=env)
    assert first.returncode == 1 and "dead letter" in first.stdout
    second = project.cli("run-now", "totals", env=env)  # the dead letter is skipped: still incomplete
    assert second.returncode == 1 and "reduce_sql not run" in second.stdout
    assert reduced(project) == (300, sum(range(300)))
    retried = project.cli("retry", "totals", env={**env, "MB_FIXED": str(fixed)})
    assert retried.returncode == 0, retried.stderr
    assert reduced(project) == (600, sum(range(600)))


def test_an_input_removed_mid_run_is_not_a_failure(project: Project) -> None:
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.faulty:slow"))
    project.write_input("a.parquet", 0, 1000)
    doomed = project.write_input("b.parquet", 1000, 1000)
    process = project.start("run-now", "ident", env={"MB_SLEEP": "0.05"})
    wait_for(lambda: len(project.computations()) >= 2, what="chunks to run")
    doomed.unlink()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, out + err
    assert "0 dead-lettered" in out and "dead letter:" not in out
    assert project.cli("run-now", "ident").returncode == 0
    assert ids_of(project, "ident") == list(range(1000))
