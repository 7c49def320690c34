"""Hostile input files: each is reported with its name and the reader's error; good files are
processed exactly once; the run exits 1; later runs skip what is known bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from conftest import Project

MAP_JOB = """
[jobs.ident]
input = "data/*.parquet"
output = "out/ident"
process = "myjobs.basic:ident"
chunk_bytes = "3KB"
retries = 1
retry_backoff = "10ms"
"""


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
    sql = "SELECT count(*) AS n FROM chunk"
    retries = 0
    """)
    files = sorted(p.name for p in shared_testdata.glob("*.parquet"))
    result = project.cli("run-now", "count")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    reported = [name for name in files if name in result.stdout]
    readable = []
    for path in sorted(shared_testdata.glob("*.parquet")):
        try:
            readable.append((path.name, pq.read_table(path).num_rows))
        except Exception:
            continue
    # every file is either reported (bad footer or dead-lettered chunk) or fully processed
    assert set(reported) | {name for name, _ in readable} == set(files)
    counts = sorted(project.output_table("count").column("n").to_pylist())
    assert counts == sorted(n for _, n in readable)
    status = json.loads(project.cli("status", "count", "--json").stdout)[0]
    assert status["chunks_failed"] == len(files) - len(readable) - status["bad_files"]
