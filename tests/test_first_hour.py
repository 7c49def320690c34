"""What a new user met in their first hour (issue "Ship it"), each as it should be now."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time

from minibatch.log import configure_logging

from conftest import MAP_JOB, Project


def test_a_closed_pipe_is_not_an_error(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    command = f"{sys.executable} -m minibatch --config {project.root / 'config.toml'} history --json | true"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_config_after_the_command_and_json_everywhere(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    config = str(project.root / "config.toml")
    ran = project.cli("run-now", "ident", "--json", "--config", config)  # --config given twice: fine
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["status"] == "succeeded" and summary["chunks_done"] == 2 and summary["exit_status"] == 0
    assert json.loads(project.cli("list", "--json").stdout)[0]["job"] == "ident"
    assert json.loads(project.cli("validate", "--json").stdout)["jobs"] == ["ident"]
    retried = project.cli("retry", "ident", "--workers", "1", "--memory-limit", "64MiB", "-q")
    assert retried.returncode == 0, retried.stderr


def test_a_mistyped_key_gets_a_suggestion_and_every_error_line_says_error(project: Project) -> None:
    project.write_config(MAP_JOB + 'chunk_byte = "1KB"\nretires = 2\n')
    result = project.cli("validate")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "did you mean 'chunk_bytes'?" in result.stderr and "did you mean 'retries'?" in result.stderr


def test_a_function_with_the_wrong_signature_and_broken_sql_fail_at_once(project: Project) -> None:
    (project.root / "myjobs" / "wrong.py").write_text("def one_arg(table):\n    return table\n")
    project.write_config("""
    [jobs.sig]
    input = "data/*.parquet"
    output = "out/sig"
    process = "myjobs.wrong:one_arg"

    [jobs.sql]
    input = "data/*.parquet"
    output = "out/sql"
    sql = "SELEC id FROM chunk"
    """)
    project.write_input("a.parquet", 0, 100)
    checked = project.cli("validate")
    assert checked.returncode == 2
    assert "jobs.sig.process: myjobs.wrong:one_arg cannot be called as f(table, ctx)" in checked.stderr
    assert "jobs.sql.sql: Parser Error" in checked.stderr
    started = time.monotonic()
    assert project.cli("run-now", "sql").returncode == 2
    assert time.monotonic() - started < 5  # not ~31 s of retries and the breaker's cool-down


def test_a_run_whose_code_breaks_on_every_chunk_stops_after_the_first(project: Project) -> None:
    (project.root / "myjobs" / "late.py").write_text(
        "def f(table, ctx):\n    return table.no_such_method()\n"  # fine to import, broken to call
    )
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.late:f"))
    for i in range(3):
        project.write_input(f"f{i}.parquet", i * 500, 500)
    result = project.cli("run-now", "ident")
    assert result.returncode == 1
    assert "the first 2 chunks failed with it before any succeeded" in result.stdout
    dead = int(re.search(r"(\d+) dead-lettered", result.stdout)[1])  # type: ignore[index]
    assert 1 <= dead <= 4  # the ones in flight (2 workers, 2 queued each); the rest run next time
    assert "minibatch retry ident" in result.stdout


def test_status_shows_what_readers_see_and_dead_lists_dead_letters(project: Project) -> None:
    project.write_config("""
    [jobs.totals]
    input = "data/*.parquet"
    output = "out/totals"
    sql = "SELECT value % 5 AS k, count(*) AS n FROM chunk GROUP BY k"
    reduce_sql = "SELECT k, sum(n) AS n FROM parts GROUP BY k"
    chunk_bytes = "3KB"
    """)
    project.write_input("a.parquet", 0, 700)
    (project.data / "junk.parquet").write_bytes(b"not parquet")
    assert project.cli("run-now", "totals").returncode == 1  # the bad file
    assert project.cli("run-now", "totals").returncode == 0  # a no-op run: it skips the known bad file
    (status,) = json.loads(project.cli("status", "totals", "--json").stdout)
    assert status["output_rows"] == 5 and status["output_bytes"] > 0  # the reduction, not the parts
    assert status["bad_files_total"] == 1
    dead = project.cli("dead", "totals")
    assert dead.returncode == 0 and "no dead letters" in dead.stdout
    assert json.loads(project.cli("dead", "totals", "--json").stdout) == []


def test_the_report_shows_the_latest_run_that_did_work(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    first = project.cli("run-now", "ident").stdout.split(" run ")[1].split(":")[0]
    project.cli("run-now", "ident")  # nothing to do
    path = project.cli("report", "ident").stdout.strip()
    assert path.endswith(f"{first}.html")


def test_library_log_lines_go_through_structlog(capsys: object) -> None:
    configure_logging("json")
    logging.getLogger("apscheduler.scheduler").warning("maximum number of running instances reached (%d)", 1)
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    line = json.loads(err.strip().splitlines()[-1])
    assert line["logger"] == "apscheduler.scheduler" and "maximum number" in line["event"]
