"""Per-attempt measurements in the manifest, `minibatch history`, and the progress log line."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import structlog

from minibatch.events import Emitter
from minibatch.progress import LogProgress
from minibatch.states import EventKind

from conftest import Project, faulty_job


def flaky_job(project: Project) -> None:
    # room for a second worker's start-up (under 1 MiB a first run keeps to one worker)
    project.write_config(faulty_job("flaky", 'memory_limit = "64MiB"'))
    for i in range(2):
        project.write_input(f"f{i}.parquet", i * 400, 400)


def test_every_attempt_is_measured(project: Project) -> None:
    flaky_job(project)
    result = project.cli("run-now", "f", env={"MB_TARGET": "f1.parquet:0"})
    assert result.returncode == 0, result.stderr
    ((chunks,),) = project.manifest_rows("SELECT count(*) FROM chunks")
    rows = project.manifest_rows(
        "SELECT outcome, attempt, slot, pid, epoch(ended_at) - epoch(started_at), read_seconds, "
        "compute_seconds, write_seconds, rows_in, rows_out, bytes_in, bytes_out, reserved_bytes, "
        "peak_rss, error_message, admitted_at <= started_at FROM attempts",
    )
    assert len(rows) == chunks + 1  # the flaky chunk's first attempt, then one per chunk
    (retried,) = [r for r in rows if r[0] == "retried"]
    assert retried[1] == 1 and "flaky service said no" in retried[14]
    done = [r for r in rows if r[0] == "done"]
    assert len(done) == chunks
    assert {r[2] for r in rows} == {0, 1}  # two worker slots
    ((coordinator,),) = project.manifest_rows("SELECT pid FROM runs")
    assert all(r[3] and r[3] != coordinator for r in rows)  # measured in the workers
    for r in done:
        duration, parts = r[4], r[5] + r[6] + r[7]
        assert 0 <= parts <= duration + 0.01  # worker-timed parts fit in the attempt
        assert r[8] == r[9] > 0 and r[10] > 0 and r[11] > 0 and r[12] > 0
        assert r[13] > 10 * 2**20  # a Python process with pyarrow holds more than 10 MiB
        assert r[15]
    assert sum(r[8] for r in done) == 800
    ((utilisation, peak, budget, workers, settings, rate),) = project.manifest_rows(
        "SELECT utilisation, peak_in_flight, memory_limit, workers, settings, rows_per_second FROM runs",
    )
    assert 0 < utilisation <= 1 and 0 < peak <= budget == 64 * 2**20 and workers == 2 and rate > 0
    assert json.loads(settings)["process"] == "myjobs.faulty:flaky"
    ((peak_memory, idle_memory),) = project.manifest_rows("SELECT peak_memory, idle_memory FROM runs")
    # measured (None: not measured); 800 rows may add nothing the 50 ms sampler sees above idle
    assert peak_memory is not None and peak_memory >= 0 and idle_memory > 10 * 2**20
    (bad,) = project.manifest_rows(
        "SELECT count(*) FILTER (WHERE NOT (0 < start_rss AND start_rss <= peak_rss AND chunk_bytes > 0)) "
        "FROM attempts WHERE outcome = 'done'"
    )
    assert bad == (0,)
    assert "busy; memory: measured peak" in result.stdout


def test_history_lists_runs_newest_first(project: Project) -> None:
    flaky_job(project)
    assert "no runs recorded" in project.cli("history").stdout
    first = project.cli("run-now", "f")
    second = project.cli("run-now", "f", "--fresh")
    first_id, second_id = (r.stdout.split(" run ")[1].split(":")[0] for r in (first, second))
    table = project.cli("history").stdout.splitlines()
    assert table[0].split() == ["RUN", "JOB", "STARTED", "SECONDS", "STATUS", "CHUNKS", "ROWS", "ROWS/S"]
    assert [line.split()[0] for line in table[1:]] == [second_id, first_id]
    assert table[1].split()[4] == "succeeded" and table[1].split()[6] == "800"
    runs = json.loads(project.cli("history", "f", "--json", "--limit", "1").stdout)
    assert [r["run_id"] for r in runs] == [second_id]
    assert runs[0]["rows_in"] == 800 and runs[0]["rows_per_second"] > 0 and runs[0]["seconds"] > 0
    unknown = project.cli("history", "nope")
    assert unknown.returncode == 2 and "unknown job 'nope'" in unknown.stderr


def test_progress_log_line_tells_rate_memory_failures_and_eta() -> None:
    progress = LogProgress(every=0)
    events = [
        (EventKind.RUN_STARTED, {"memory_limit": 2**30}),
        (EventKind.RUN_PLANNED, {"todo": 4}),
        (EventKind.CHUNK_STARTED, {"in_flight": 3 * 2**20}),
        (EventKind.CHUNK_RETRY, {"in_flight": 2 * 2**20}),
        (EventKind.CHUNK_DONE, {"rows": 100, "bytes_in": 1000, "in_flight": 2**20}),
    ]
    emit = Emitter([progress]).bind("j", "r")
    with structlog.testing.capture_logs() as logs:
        for kind, data in events:
            emit(kind, **data)
    line = logs[-1]
    assert line["event"] == "progress" and line["done"] == 1 and line["total"] == 4
    assert line["retried"] == 1 and line["dead"] == 0
    assert line["in_flight"] == "1.0 MiB" and line["budget"] == "1.0 GiB"
    assert line["eta_s"] is not None and line["rows_per_s"] > 0


def test_report_command_writes_the_latest_or_a_chosen_run(project: Project) -> None:
    flaky_job(project)
    assert project.cli("report", "f").returncode == 2  # no runs yet
    first = project.cli("run-now", "f").stdout.split(" run ")[1].split(":")[0]
    second = project.cli("run-now", "f", "--fresh").stdout.split(" run ")[1].split(":")[0]
    latest = project.cli("report", "f")
    assert latest.returncode == 0, latest.stderr
    path = latest.stdout.strip()
    assert path.endswith(f"reports/f/{second}.html") and second in Path(path).read_text()
    chosen = project.cli("report", "f", "--run", first, "-o", str(project.root / "r.html"))
    assert chosen.stdout.strip() == str(project.root / "r.html")
    assert first in (project.root / "r.html").read_text()
    missing = project.cli("report", "f", "--run", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr


OLD_RUNS = """
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, job VARCHAR NOT NULL, pid INTEGER,
    started_at TIMESTAMPTZ NOT NULL, status VARCHAR NOT NULL, ended_at TIMESTAMPTZ,
    chunks_total INTEGER, chunks_done INTEGER, chunks_reused INTEGER, chunks_dead INTEGER,
    chunks_skipped INTEGER, bad_files INTEGER, rows_in BIGINT, rows_out BIGINT, bytes_in BIGINT,
    bytes_out BIGINT, error VARCHAR);
INSERT INTO runs VALUES ('r1', 'f', 1, now(), 'succeeded', now(), 1, 1, 0, 0, 0, 0, 10, 10, 80, 90, NULL);
"""


def test_history_and_report_read_a_manifest_from_the_release_before(project: Project) -> None:
    flaky_job(project)
    (project.root / ".state").mkdir()
    con = duckdb.connect(str(project.root / ".state" / "manifest.duckdb"))
    con.execute(OLD_RUNS)  # no attempts table, none of the new columns
    con.close()
    history = project.cli("history", "--json")
    assert history.returncode == 0, history.stderr
    assert json.loads(history.stdout)[0]["run_id"] == "r1"
    report = project.cli("report", "f")
    assert report.returncode == 0, report.stderr
    assert "No chunks were computed" in Path(report.stdout.strip()).read_text()
