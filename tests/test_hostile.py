"""Hostile input files: each is reported with its name and the reader's error; good files are
processed exactly once; the run exits 1; later runs skip what is known bad."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from conftest import MAP_JOB as BASE_MAP_JOB
from conftest import Project

MAP_JOB = BASE_MAP_JOB + 'retries = 1\nretry_backoff = "10ms"\n'


def test_zero_byte_text_and_truncated_files(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("good1.parquet", 0, 500)
    good2 = project.write_input("good2.parquet", 500, 500)
    (project.data / "empty.parquet").write_bytes(b"")
    (project.data / "notes.parquet").write_text("id,value\n1,2\n")
    truncated = project.data / "truncated.parquet"
    shutil.copy(good2, truncated)
    truncated.write_bytes(good2.read_bytes()[: good2.stat().st_size // 2])

    result = project.cli("run-now", "ident")
    assert result.returncode == 1, result.stderr
    for name in ("empty.parquet", "notes.parquet", "truncated.parquet"):
        line = next(x for x in result.stdout.splitlines() if name in x)
        assert line.startswith("  bad input file:") and ": " in line.split(name, 1)[1]
    assert "too small to be Parquet" in result.stdout
    assert "not a Parquet file" in result.stdout
    assert "Traceback" not in result.stderr
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(1000))

    again = project.cli("run-now", "ident")  # same bad files: warned about, not failed on again
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("known_bad_file") == 3
    assert "0 done now" in again.stdout

    (project.data / "notes.parquet").unlink()
    project.write_input("empty.parquet", 1000, 100)  # the file changed: it is new input
    fixed = project.cli("run-now", "ident")
    assert fixed.returncode == 0, fixed.stderr  # truncated.parquet is still bad, and known
    assert fixed.stderr.count("known_bad_file") == 1
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(1100))


def test_corrupt_files_from_the_parquet_project(project: Project, shared_testdata: Path) -> None:
    project.write_config(f"""
    [jobs.count]
    input = "{shared_testdata}/*.parquet"
    output = "out/count"
    process = "myjobs.faulty:count_rows"
    retries = 0
    """)
    files = sorted(p.name for p in shared_testdata.glob("*.parquet"))
    result = project.cli("run-now", "count")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    reported = {name for name in files if name in result.stdout}
    output = project.output_table("count").to_pylist()
    processed = {row["file"] for row in output}
    assert reported | processed == set(files)  # every file: reported with its error, or processed
    assert not reported & processed
    for name in reported:  # each report names the file and carries the reader's error
        line = next(x for x in result.stdout.splitlines() if name in x)
        assert line.startswith(("  bad input file:", "  dead letter:"))
        assert re.search(r"(Error|Invalid|Exception)\w*: \S", line.split(name, 1)[1]), line
    for row in output:  # what was processed, was processed whole
        assert row["n"] == pq.read_table(shared_testdata / row["file"]).num_rows
    status = json.loads(project.cli("status", "count", "--json").stdout)[0]
    assert status["chunks_dead"] + status["bad_files"] == len(reported)


def test_sql_job_over_corrupt_files_reports_and_survives(project: Project, shared_testdata: Path) -> None:
    project.write_config(f"""
    [jobs.scan]
    input = "{shared_testdata}/*.parquet"
    output = "out/scan"
    sql = "SELECT count(*) AS n FROM (SELECT * FROM chunk)"
    retries = 0
    """)
    result = project.cli("run-now", "scan")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "bad input file:" in result.stdout  # the footer that no reader can parse
    again = project.cli("run-now", "scan")  # known bad files and dead letters: skipped, exit 0
    assert again.returncode == 0, again.stderr
    assert "0 done now" in again.stdout


def test_a_slice_of_a_page_shorter_than_its_header_fails_as_the_whole_read_does(
    tmp_path: Path, shared_testdata: Path
) -> None:
    """Differential fuzzing: ARROW-GH-47662 (a required column whose pages hold fewer values
    than their headers say) fails a whole read, but a slice decoded only part of its page and
    gave values shifted into other rows without a word. Slices decode whole pages; a page that
    does not decode is read with its whole group, which fails as it would unsliced."""
    import pytest

    from minibatch import reading
    from minibatch.planner import plan_chunks, read_file_meta

    path = tmp_path / "bad.parquet"
    shutil.copy(shared_testdata / "ARROW-GH-47662.parquet", path)
    meta = read_file_meta(str(path), None)
    chunks = plan_chunks([meta], 64)  # the planner's own slices of its one row group
    assert len(chunks) > 1
    for chunk in chunks:  # (its first page holds many chunks' rows: each decodes it to its end)
        with pytest.raises(OSError, match="Unexpected end of stream"):
            reading.read_chunk(chunk, None)
