"""Inputs, outputs and job definitions that must not make a run lose, duplicate or fake rows.

Paths are read literally (never as glob patterns), `**` survives symlinks, an empty reduction is
one row, old files are readable, a changed job is recomputed, the output schema does not depend
on which worker finishes first, vanished inputs do not wipe the output, and minibatch touches no
file in an output directory that it did not write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from minibatch.inputs import _way, find_inputs, reach_of
from minibatch.mounts import mount_table, mounted, mounts_above, unmounted
from minibatch.planner import InputUnreadable, plan_chunks, read_file_meta, scan_inputs
from minibatch.reading import read_chunk, release_held, sql_on_file
from minibatch.states import ErrorKind
from minibatch.tasks import InputChanged, JobSpec
from minibatch.worker import describe_error

from conftest import MAP_JOB, Project, in_a_mount_namespace, install_jobs, wait_for

FAST = "retries = 0\nbreaker_failures = 0\n"  # today's failures dead-letter at once, no breaker pause
MAP = MAP_JOB + FAST


def make_project(root: Path, count_file: Path) -> Project:
    """What the `project` fixture builds, under any directory name."""
    install_jobs(root)
    return Project(root=root, count_file=count_file)


def said(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def ids_of(project: Project, job: str) -> list[int]:
    return sorted(project.output_table(job).column("id").to_pylist())


def parquet_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.parquet")) if directory.is_dir() else []


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def write_ids(path: Path, ids: range) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64())}), path)


# -- A. paths are read literally -------------------------------------------------------------


def test_sql_job_reads_file_names_with_glob_characters_literally(project: Project) -> None:
    project.write_config("""
    [jobs.all]
    input = "data/*.parquet"
    output = "out/all"
    sql = "SELECT * FROM chunk"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """)
    names = ["g[1].parquet", "g1.parquet", "f*.parquet", "f?.parquet", "fa.parquet"]
    for i, name in enumerate(names):
        project.write_input(name, i * 1000, 200)
    result = project.cli("run-now", "all")
    assert result.returncode == 0, said(result)
    expected = [i * 1000 + r for i in range(len(names)) for r in range(200)]
    assert ids_of(project, "all") == expected


def test_process_job_in_a_project_directory_with_glob_characters(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p[1]", tmp_path / "count.txt")
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    decoy = make_project(tmp_path / "p1", tmp_path / "decoy-count.txt")  # what p[1] matches as a glob
    decoy.write_input("a.parquet", 10_000, 50)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    assert ids_of(project, "ident") == list(range(500))


@pytest.mark.parametrize(("output", "twin"), [("o[r]", "or"), ("o*", "oX")])
def test_reduce_job_output_names_with_glob_characters(project: Project, output: str, twin: str) -> None:
    project.write_config(f"""
    [jobs.sums]
    input = "data/*.parquet"
    output = "out/{output}"
    sql = "SELECT id FROM chunk"
    reduce_sql = "SELECT count(*) AS n, sum(id) AS s FROM parts"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    out = project.root / "out"
    write_ids(out / twin / "other.parquet", range(50_000, 50_100))  # a sibling the glob would match
    expected = [{"n": 500, "s": sum(range(500))}]
    result = project.cli("run-now", "sums")
    assert result.returncode == 0, said(result)
    assert project.output_table(output).to_pylist() == expected
    # every directory the job keeps beside its output gets a twin the glob would match too
    for directory in [d for d in out.iterdir() if d.is_dir() and output in d.name]:
        for name in parquet_names(directory):
            write_ids(directory.with_name(directory.name.replace(output, twin)) / name, range(70_000, 70_100))
    result = project.cli("run-now", "sums", "--fresh")
    assert result.returncode == 0, said(result)
    assert project.output_table(output).to_pylist() == expected


# -- B. symlinks under ** --------------------------------------------------------------------

DEEP_JOB = MAP.replace('"data/*.parquet"', '"data/**/*.parquet"')


def test_symlink_loop_under_double_star_is_a_usage_error(project: Project) -> None:
    project.write_config(DEEP_JOB)
    project.write_input("top.parquet", 0, 100)
    (project.data / "sub").mkdir()
    project.write_input("sub/a.parquet", 100, 100)
    os.symlink("..", project.data / "sub" / "loop")
    result = project.cli("run-now", "ident")
    assert result.returncode == 2, said(result)
    assert "symlink loop" in said(result).lower()
    assert parquet_names(project.out("ident")) == []


def test_second_path_to_the_same_files_gives_each_row_once(project: Project) -> None:
    project.write_config(DEEP_JOB)
    project.write_input("top.parquet", 0, 100)
    (project.data / "sub").mkdir()
    project.write_input("sub/a.parquet", 100, 300)
    os.symlink("sub", project.data / "alias")
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    assert ids_of(project, "ident") == list(range(400))


def test_a_file_under_two_names_by_a_hard_link_is_one_input(tmp_path: Path) -> None:
    """Hostile review: a hard link (`cp -l`, `ln`) was two inputs, its rows published twice."""
    (tmp_path / "data").mkdir()
    for name in ("a", "b"):
        (tmp_path / "data" / f"{name}.csv").write_text("id\n1\n")
    os.link(tmp_path / "data" / "a.csv", tmp_path / "data" / "a-copy.csv")
    found = find_inputs(tmp_path, ["data/*.csv"]).files
    assert [Path(p).name for p in found] == ["a-copy.csv", "b.csv"]  # the first name, in sorted order


def test_input_glob_reaching_the_own_output_through_a_symlink_is_refused(project: Project) -> None:
    project.write_config("""
    [jobs.ident]
    input = "data/**/*.parquet"
    output = "out/ident"
    sql = "SELECT * FROM chunk"
    chunk_bytes = "3KB"
    """)  # results with the input's schema: read back as input, they would pass for input
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    os.symlink("../out/ident", project.data / "link")
    for _ in range(2):
        result = project.cli("run-now", "ident")
        assert result.returncode == 2, said(result)
        assert "output" in said(result).lower()
    assert snapshot(project.out("ident")) == before
    assert ids_of(project, "ident") == list(range(300))


# -- C. an empty reduction -------------------------------------------------------------------


def test_reduce_over_chunks_that_all_return_no_rows_is_one_row(project: Project) -> None:
    project.write_config("""
    [jobs.none]
    input = "data/*.parquet"
    output = "out/none"
    sql = "SELECT * FROM chunk WHERE id < 0"
    reduce_sql = "SELECT count(*) AS n FROM parts"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """)
    project.write_input("a.parquet", 0, 300)
    result = project.cli("run-now", "none")
    assert result.returncode == 0, said(result)
    assert project.output_table("none").to_pylist() == [{"n": 0}]


# -- D. files older than 1970 ----------------------------------------------------------------


def test_input_with_an_mtime_before_1970_is_processed(project: Project) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 200)
    old = project.write_input("old.parquet", 1000, 200)
    os.utime(old, ns=(0, -86400 * 10**9))
    assert old.stat().st_mtime_ns < 0
    for _ in range(2):
        result = project.cli("run-now", "ident")
        assert result.returncode == 0, said(result)
        assert ids_of(project, "ident") == list(range(200)) + list(range(1000, 1200))


# -- E. a changed job definition -------------------------------------------------------------

SCALED_MODULE = """
import pyarrow.compute as pc
from myjobs.testenv import get as env

FACTOR = {factor}


def scale(table, ctx):
    path = env("MB_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{{ctx.chunk_id}} {{ctx.attempt}}\\n")
    return table.append_column("scaled", pc.multiply(table["value"], FACTOR))
"""


def write_scaled(project: Project, factor: int) -> None:
    (project.root / "myjobs" / "scaled.py").write_text(SCALED_MODULE.format(factor=factor))


def values_by_id(project: Project, job: str, column: str) -> dict[int, int]:
    table = project.output_table(job)
    return dict(zip(table["id"].to_pylist(), table[column].to_pylist(), strict=True))


def test_changed_sql_recomputes_every_chunk(project: Project) -> None:
    job = """
    [jobs.vals]
    input = "data/*.parquet"
    output = "out/vals"
    sql = "{sql}"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """
    project.write_config(job.format(sql="SELECT id, value FROM chunk"))
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    assert project.cli("run-now", "vals").returncode == 0
    project.write_config(job.format(sql="SELECT id, value * 10 AS value FROM chunk"))
    result = project.cli("run-now", "vals")
    assert result.returncode == 0, said(result)
    assert values_by_id(project, "vals", "value") == {i: (i % 97) * 10 for i in range(500)}
    assert "definition changed" in result.stdout.lower()


def test_edited_job_module_recomputes_every_chunk(project: Project) -> None:
    project.write_config("""
    [jobs.sc]
    input = "data/*.parquet"
    output = "out/sc"
    process = "myjobs.scaled:scale"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """)
    project.write_input("a.parquet", 0, 300)
    write_scaled(project, 2)
    assert project.cli("run-now", "sc").returncode == 0
    assert values_by_id(project, "sc", "scaled") == {i: (i % 97) * 2 for i in range(300)}
    write_scaled(project, 300)  # another size too: Python's .pyc check is mtime and size
    result = project.cli("run-now", "sc")
    assert result.returncode == 0, said(result)
    assert values_by_id(project, "sc", "scaled") == {i: (i % 97) * 300 for i in range(300)}


def test_a_module_edited_during_a_run_fails_it_and_labels_no_result_wrongly(project: Project) -> None:
    """Hostile review: workers imported the edited module at their next chunk and labelled its
    results with the definition the run began with: the run succeeded with rows of both
    versions, and once the file was put back the new version's rows looked current for good."""
    project.write_config("""
    [jobs.sc]
    input = "data/*.parquet"
    output = "out/sc"
    process = "myjobs.scaled:scale"
    chunk_bytes = "3KB"
    """)
    project.write_input("a.parquet", 0, 600)
    slow = SCALED_MODULE.replace("    return", "    __import__('time').sleep(0.2)\n    return")
    module = project.root / "myjobs" / "scaled.py"
    module.write_text(slow.replace("{factor}", "3").replace("{{", "{").replace("}}", "}"))
    original = module.read_bytes()
    run = project.start("run-now", "sc")
    wait_for(lambda: len(project.computations()) >= 2, timeout=60, what="two chunks")
    module.write_bytes(original.replace(b"FACTOR = 3", b"FACTOR = 5"))
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "changed during the run" in err
    module.write_bytes(original)  # put back: the results of the run's definition are current
    again = project.cli("run-now", "sc")
    assert again.returncode == 0, said(again)
    assert values_by_id(project, "sc", "scaled") == {i: (i % 97) * 3 for i in range(600)}


@pytest.mark.parametrize("name", ["file_row_number", "File_Row_Number"])
def test_an_input_column_named_file_row_number_is_read_by_a_sql_job(project: Project, name: str) -> None:
    """Hostile review: the chunk view DuckDB reads adds its own `file_row_number`; an input
    column of that name (in any case: DuckDB's names are not case-sensitive) failed every
    chunk (dead letters, then an empty output, exit 0)."""
    project.write_config(MAP.replace('process = "myjobs.basic:ident"', 'sql = "SELECT * FROM chunk"'))
    project.data.mkdir()
    table = pa.table({"id": pa.array(range(500), pa.int64()), name: pa.array(range(500, 1000))})
    pq.write_table(table, project.data / "a.parquet", row_group_size=100)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    assert project.output_table("ident").sort_by("id").to_pydict() == table.to_pydict()


def test_changed_columns_recompute_every_chunk(project: Project) -> None:
    job = """
    [jobs.ident]
    input = "data/*.parquet"
    output = "out/ident"
    process = "myjobs.basic:ident"
    columns = {columns}
    chunk_bytes = "64MB"
    retries = 0
    breaker_failures = 0
    """  # one chunk per file, whichever columns are read: the plan itself does not change
    project.write_config(job.format(columns='["id", "value"]'))
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    assert project.cli("run-now", "ident").returncode == 0
    assert project.output_table("ident").column_names == ["id", "value", "doubled"]
    project.write_config(job.format(columns='["id", "value", "name"]'))
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    table = project.output_table("ident")
    assert table.column_names == ["id", "value", "name", "doubled"]
    assert sorted(zip(table["id"].to_pylist(), table["name"].to_pylist(), strict=True)) == [
        (i, f"row-{i}") for i in range(500)
    ]


def test_changed_reduce_sql_and_sql_of_a_reduce_job(project: Project) -> None:
    job = """
    [jobs.tot]
    input = "data/*.parquet"
    output = "out/tot"
    sql = "{sql}"
    reduce_sql = "{reduce_sql}"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """
    sql, total = "SELECT id, value FROM chunk", sum(i % 97 for i in range(500))
    project.write_config(job.format(sql=sql, reduce_sql="SELECT sum(value) AS s FROM parts"))
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    assert project.cli("run-now", "tot").returncode == 0
    assert project.output_table("tot").to_pylist() == [{"s": total}]
    reduce_sql = "SELECT sum(value) AS s, count(*) AS n FROM parts"
    project.write_config(job.format(sql=sql, reduce_sql=reduce_sql))
    result = project.cli("run-now", "tot")
    assert result.returncode == 0, said(result)
    assert project.output_table("tot").to_pylist() == [{"s": total, "n": 500}]
    project.write_config(job.format(sql="SELECT id, value * 10 AS value FROM chunk", reduce_sql=reduce_sql))
    result = project.cli("run-now", "tot")
    assert result.returncode == 0, said(result)
    assert project.output_table("tot").to_pylist() == [{"s": total * 10, "n": 500}]


def test_explicit_version_decides_when_edited_code_recomputes(project: Project) -> None:
    job = """
    [jobs.sc]
    input = "data/*.parquet"
    output = "out/sc"
    process = "myjobs.scaled:scale"
    version = "{version}"
    chunk_bytes = "3KB"
    retries = 0
    breaker_failures = 0
    """
    project.write_config(job.format(version="1"))
    project.write_input("a.parquet", 0, 300)
    write_scaled(project, 2)
    first = project.cli("run-now", "sc")
    assert first.returncode == 0, said(first)
    computed = len(project.computations())
    write_scaled(project, 300)
    result = project.cli("run-now", "sc")
    assert result.returncode == 0, said(result)
    assert len(project.computations()) == computed  # the version says it is the same job
    assert "0 done now" in result.stdout
    assert values_by_id(project, "sc", "scaled") == {i: (i % 97) * 2 for i in range(300)}
    project.write_config(job.format(version="2"))
    result = project.cli("run-now", "sc")
    assert result.returncode == 0, said(result)
    assert len(project.computations()) == 2 * computed
    assert values_by_id(project, "sc", "scaled") == {i: (i % 97) * 300 for i in range(300)}


# -- F. a deterministic output schema --------------------------------------------------------

RACE_MODULE = """
import os
import time


def passthrough(table, ctx):
    if os.path.basename(ctx.file) != "a_odd.parquet":
        time.sleep(0.3)  # the odd file's chunk always finishes first
    return table
"""


def test_output_schema_does_not_depend_on_which_chunk_finishes_first(project: Project) -> None:
    (project.root / "myjobs" / "race.py").write_text(RACE_MODULE)
    project.write_config("""
    [jobs.race]
    input = "data/*.parquet"
    output = "out/race"
    process = "myjobs.race:passthrough"
    chunk_bytes = "64MB"
    retries = 0
    """)
    for i in range(6):
        project.write_input(f"good{i}.parquet", i * 100, 100)
    pq.write_table(pa.table({"x": pa.array(range(10), pa.int64())}), project.data / "a_odd.parquet")
    result = project.cli("run-now", "race")
    assert result.returncode == 1, said(result)
    assert "0 dead-lettered" in result.stdout
    lines = [line.lower() for line in said(result).splitlines() if "a_odd.parquet" in line]
    assert any("schema" in line for line in lines), said(result)
    bad = project.manifest_rows("SELECT file FROM bad_files WHERE job = 'race'")
    assert [os.path.basename(row[0]) for row in bad] == ["a_odd.parquet"]
    table = project.output_table("race")
    assert table.column_names == ["id", "value", "name"]
    assert sorted(table["id"].to_pylist()) == list(range(600))


# -- G. vanished inputs ----------------------------------------------------------------------


def test_inputs_that_vanished_do_not_wipe_the_output(project: Project) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    assert project.cli("run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    assert before
    project.data.rename(project.root / "data-away")
    result = project.cli("run-now", "ident")
    assert result.returncode == 1, said(result)
    assert "data/*.parquet" in result.stderr
    assert "matches no file" in result.stderr.lower()
    assert snapshot(project.out("ident")) == before
    check = project.cli("validate")
    assert check.returncode == 0, said(check)
    assert "matches no file" in said(check).lower()


def test_an_output_gone_with_every_result_is_refused_not_written_anew(project: Project) -> None:
    """The output's share not mounted (or its directory moved): the run wrote every result again
    into an empty directory on another disk, exit 0. It fails, writes nothing, names the fix."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    share = project.root / "out"
    share.rename(project.root / "unmounted")
    result = project.cli("run-now", "ident")
    assert result.returncode == 1, said(result)
    assert f"output {project.out('ident')} holds none of the 6 results recorded done" in said(result)
    assert "minibatch run-now ident --fresh" in said(result)
    assert not share.exists()  # not even the directories
    (project.root / "unmounted").rename(share)  # mounted back: as it was
    again = project.cli("run-now", "ident")
    assert again.returncode == 0, said(again)
    assert "0 done now, 6 already done" in again.stdout
    share.rename(project.root / "unmounted")
    share.mkdir()  # an empty mount point in its place: the same
    assert project.cli("run-now", "ident").returncode == 1
    assert list(share.iterdir()) == []
    fresh = project.cli("run-now", "ident", "--fresh")  # the way to compute them anew
    assert fresh.returncode == 0, said(fresh)
    assert ids_of(project, "ident") == list(range(300))


def test_a_reduce_job_whose_parts_are_gone_is_refused_and_keeps_its_output(project: Project) -> None:
    project.write_config("""
    [jobs.sums]
    input = "data/*.parquet"
    output = "out/sums"
    sql = "SELECT id FROM chunk"
    reduce_sql = "SELECT count(*) AS n FROM parts"
    chunk_bytes = "3KB"
    """)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "sums").returncode == 0
    before = snapshot(project.out("sums"))
    shutil.rmtree(project.root / "out" / ".sums.minibatch-parts")
    result = project.cli("run-now", "sums")
    assert result.returncode == 1, said(result)
    assert "the parts directory" in said(result) and "holds none of the 6 results" in said(result)
    assert snapshot(project.out("sums")) == before


def test_an_output_gone_stays_refused_when_the_definition_changed_too(project: Project) -> None:
    """Hostile review: the refused run still forgot the old definition's records, so the next
    run found none and wrote every result into the empty mount point, exit 0."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    (project.root / "out").rename(project.root / "unmounted")
    project.write_config(MAP.replace("myjobs.basic:ident", "myjobs.basic:nothing"))
    for _ in range(2):
        result = project.cli("run-now", "ident")
        assert result.returncode == 1 and "holds none of the 6 results" in said(result), said(result)
    assert not (project.root / "out").exists()


@pytest.mark.parametrize(
    "change",
    ['reduce_sql = "SELECT count(*) AS n FROM parts"', 'partition_by = ["value"]', "output"],
)
def test_an_output_moved_in_the_config_is_computed_again_not_refused(project: Project, change: str) -> None:
    """Hostile review: a new `output` or a new shape (reduce_sql, partition_by: results in a
    hidden parts directory) was taken for an unmounted share: every run failed until --fresh."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    moved = MAP.replace('"out/ident"', '"out/moved"') if change == "output" else MAP + change + "\n"
    project.write_config(moved)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)


def test_an_output_moved_whose_first_run_failed_is_still_computed_again(project: Project) -> None:
    """Hostile review: the first run under a new `output` failed for another reason (no input)
    yet recorded the new place as where results go: every later run was refused."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    project.write_config(MAP.replace('"out/ident"', '"out/moved"'))
    project.data.rename(project.root / "away")
    assert project.cli("run-now", "ident").returncode == 1  # no input
    (project.root / "away").rename(project.data)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)


def test_an_output_behind_a_symlink_on_the_share_is_refused_when_the_share_is_gone(
    project: Project,
) -> None:
    """Hostile review: `output = "share/current/out"` with `current -> v2` on the share resolved
    to share/v2/out, and with the share gone to share/current/out: another place, so the run
    wrote every result into the mount point."""
    share = project.root / "share"
    (share / "v2").mkdir(parents=True)
    (share / "current").symlink_to("v2")
    project.write_config(MAP.replace('"out/ident"', '"share/current/out"'))
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    share.rename(project.root / "unmounted")
    share.mkdir()  # the bare mount point
    result = project.cli("run-now", "ident")
    assert result.returncode == 1 and "holds none of the 6 results" in said(result), said(result)
    assert list(share.iterdir()) == []


def as_a_user(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a process for which file modes hold: root without its bypass of them."""
    argv = [sys.executable, "-m", "minibatch", "--config", str(project.root / "config.toml"), *args]
    if os.geteuid() == 0:
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    return subprocess.run(argv, capture_output=True, text=True, env=project.env(), timeout=120)


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores file modes")
def test_an_input_that_cannot_be_opened_keeps_its_results_and_fails_every_run(project: Project) -> None:
    """Hostile review: an unchanged input that could not be opened (its mode or owner changed,
    a share's credentials expired) was taken for a rewritten file: its results were deleted,
    and the next run succeeded without them. It fails, deleting nothing, until it can be read."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    assert as_a_user(project, "run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    (project.data / "a.parquet").chmod(0)
    try:
        for _ in range(2):
            result = as_a_user(project, "run-now", "ident")
            assert result.returncode == 1, said(result)
            assert "a.parquet: cannot be read (Permission denied)" in said(result)
            assert "nothing was deleted" in said(result)
            assert snapshot(project.out("ident")) == before
        check = as_a_user(project, "validate")
        assert "a.parquet: cannot be read (Permission denied) (a run would fail)" in said(check), said(check)
        fresh = as_a_user(project, "run-now", "ident", "--fresh")  # it said so, and had deleted all
        assert fresh.returncode == 1 and snapshot(project.out("ident")) == before, said(fresh)
    finally:
        (project.data / "a.parquet").chmod(0o644)
    again = as_a_user(project, "run-now", "ident")
    assert again.returncode == 0, said(again)
    assert "0 done now, 10 already done" in again.stdout
    assert ids_of(project, "ident") == list(range(500))


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores file modes")
def test_a_directory_the_glob_cannot_list_keeps_its_files_results(project: Project) -> None:
    """Hostile review: glob passes over a directory it may not list (a share's credentials
    expired) in silence; its files looked removed, their results were deleted, exit 0."""
    project.write_config(MAP.replace('"data/*.parquet"', '"data/*/*.parquet"'))
    for place, first in (("a", 0), ("b", 300)):
        (project.data / place).mkdir(parents=True)
        project.write_input(f"{place}/x.parquet", first, 300)
    assert as_a_user(project, "run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    (project.data / "b").chmod(0)
    try:
        result = as_a_user(project, "run-now", "ident")
        assert result.returncode == 1, said(result)
        assert f"{project.data / 'b'}: a directory that cannot be listed (Permission denied)" in said(result)
        assert snapshot(project.out("ident")) == before
    finally:
        (project.data / "b").chmod(0o755)
    shutil.rmtree(project.data / "b")  # removed for real: its results go
    assert as_a_user(project, "run-now", "ident").returncode == 0
    assert ids_of(project, "ident") == list(range(300))


EIO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
/* A read of the data pages (offsets 4..63) of a file named *EIOFILE* fails with EIO, as a bad
   sector or a flaky share would; its footer reads well. */
static int bad(int fd, off_t off) {
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strstr(path, "EIOFILE") != NULL && off >= 4 && off < 64;
}
ssize_t pread64(int fd, void *buf, size_t count, off_t off) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    if (bad(fd, off)) { errno = EIO; return -1; }
    return real(fd, buf, count, off);
}
ssize_t pread(int fd, void *buf, size_t count, off_t off) { return pread64(fd, buf, count, off); }
ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "read");
    if (bad(fd, lseek(fd, 0, SEEK_CUR))) { errno = EIO; return -1; }
    return real(fd, buf, count);
}
"""


@pytest.mark.skipif(not shutil.which("cc"), reason="builds an LD_PRELOAD shim")
@pytest.mark.parametrize("job", ["process", "sql"])
def test_an_io_error_reading_an_input_is_the_machines_fault_not_a_dead_letter(
    project: Project, tmp_path: Path, job: str
) -> None:
    """Hostile review: an I/O error reading a chunk's pages (not opening the file) was the
    chunk's error: dead-lettered, skipped by every later run, exit 0 with a hole."""
    (tmp_path / "eio.c").write_text(EIO_SHIM)
    shim = tmp_path / "eio.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", shim, tmp_path / "eio.c", "-ldl"], check=True)
    config = MAP if job == "process" else MAP.replace('process = "myjobs.basic:ident"', 'sql = "FROM chunk"')
    project.write_config(config)
    project.write_input("a.parquet", 0, 300)
    project.write_input("EIOFILE.parquet", 300, 300)
    failing = project.cli("run-now", "ident", env={"LD_PRELOAD": str(shim)}, real=True)
    assert failing.returncode == 1, said(failing)
    assert "EIOFILE.parquet: cannot be read (Input/output error)" in said(failing)
    assert project.manifest_rows("SELECT count(*) FROM chunks WHERE status = 'dead'") == [(0,)]
    healed = project.cli("run-now", "ident")
    assert healed.returncode == 0, said(healed)
    assert ids_of(project, "ident") == list(range(600))


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores file modes")
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores file modes")
def test_a_directory_above_an_input_that_may_be_entered_not_listed_keeps_its_results(
    project: Project,
) -> None:
    """Hostile review: under `**`, data/a made enter-only (0111): glob could not list it and
    passed over data/a/b; only data/a/b was checked, so y.parquet's results went, exit 0."""
    project.write_config(MAP.replace('"data/*.parquet"', '"data/**/*.parquet"'))
    (project.data / "a" / "b").mkdir(parents=True)
    project.write_input("x.parquet", 0, 300)
    project.write_input("a/b/y.parquet", 300, 300)
    assert as_a_user(project, "run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    (project.data / "a").chmod(0o111)
    try:
        result = as_a_user(project, "run-now", "ident")
    finally:
        (project.data / "a").chmod(0o755)
    assert result.returncode == 1, said(result)
    assert f"{project.data / 'a'}: a directory that cannot be listed" in said(result)
    assert snapshot(project.out("ident")) == before


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores file modes")
def test_a_directory_glob_only_passes_through_may_be_enter_only(project: Project) -> None:
    """Hostile review: `data/*/exports/*.parquet` with data/alice enter-only (0711, a home
    directory): glob passes through it to the literal `exports`; a file removed there on
    purpose made every run, --fresh too, refuse data/alice as a directory it cannot list."""
    project.write_config(MAP.replace('"data/*.parquet"', '"data/*/exports/*.parquet"'))
    for who, first in (("alice", 0), ("bob", 300)):
        (project.data / who / "exports").mkdir(parents=True)
        project.write_input(f"{who}/exports/x.parquet", first, 300)
    project.write_input("alice/exports/y.parquet", 600, 300)
    assert as_a_user(project, "run-now", "ident").returncode == 0
    (project.data / "alice" / "exports" / "y.parquet").unlink()  # removed on purpose
    (project.data / "alice").chmod(0o111)
    try:
        result = as_a_user(project, "run-now", "ident")
    finally:
        (project.data / "alice").chmod(0o755)
    assert result.returncode == 0, said(result)
    assert ids_of(project, "ident") == list(range(600))


def test_a_dotdot_glob_from_a_config_directory_reached_by_a_symlink(tmp_path: Path) -> None:
    """Hostile review: glob resolves `..` on disk, minibatch's paths did so by text: from a
    config directory that is a symlink, every input was "No such file", on the first run."""
    (tmp_path / "deploy" / "etl").mkdir(parents=True)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "etl").symlink_to(tmp_path / "deploy" / "etl")
    write_ids(tmp_path / "deploy" / "landing" / "a.parquet", range(3))
    found = find_inputs(tmp_path / "jobs" / "etl", ["../landing/*.parquet"], read={})
    assert found.files == [str(tmp_path / "deploy" / "landing" / "a.parquet")] and not found.unreadable
    (tmp_path / "link").symlink_to(tmp_path / "deploy")  # a symlink above the config directory:
    found = find_inputs(tmp_path / "link" / "etl", ["../landing/*.parquet"])  # paths spelled as before
    assert found.files == [str(tmp_path / "link" / "landing" / "a.parquet")]


def test_a_directory_no_glob_reaches_any_more_may_be_unreadable(project: Project) -> None:
    """Hostile review: a glob moved to another directory, the old one locked away: every run,
    --fresh too, was refused for a directory that was no longer input."""
    for place, first in (("old", 0), ("new", 300)):
        (project.data / place).mkdir(parents=True)
        project.write_input(f"{place}/x.parquet", first, 300)
    project.write_config(MAP.replace('"data/*.parquet"', '"data/old/*.parquet"'))
    assert as_a_user(project, "run-now", "ident").returncode == 0
    project.write_config(MAP.replace('"data/*.parquet"', '"data/new/*.parquet"'))
    (project.data / "old").chmod(0)
    try:
        result = as_a_user(project, "run-now", "ident")
    finally:
        (project.data / "old").chmod(0o755)
    assert result.returncode == 0, said(result)
    assert ids_of(project, "ident") == list(range(300, 600))


def test_a_directory_symlink_to_a_share_gone_keeps_its_files_results(project: Project) -> None:
    """Hostile review: data/share -> a share, unmounted: its files looked removed, their
    results were deleted, exit 0 (a file symlink in the same state fails the run)."""
    share = project.root / "mnt" / "share"
    share.mkdir(parents=True)
    (project.data / "local").mkdir(parents=True)
    project.write_input("local/x.parquet", 0, 300)
    (project.data / "share").symlink_to(share)
    project.write_input("share/y.parquet", 300, 300)
    project.write_config(MAP.replace('"data/*.parquet"', '"data/*/*.parquet"'))
    assert project.cli("run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    share.rename(project.root / "mnt" / "away")  # unmounted
    result = project.cli("run-now", "ident")
    assert result.returncode == 1, said(result)
    assert f"{project.data / 'share'}: a symlink to {share}, which cannot be reached" in said(result)
    assert snapshot(project.out("ident")) == before
    (project.root / "mnt" / "away").rename(share)
    shutil.rmtree(project.data / "local")  # removed for real: its results go
    assert project.cli("run-now", "ident").returncode == 0
    assert ids_of(project, "ident") == list(range(300, 600))


@pytest.mark.skipif(in_a_mount_namespace() is None, reason="no mount namespace to mount a tmpfs in")
def test_a_share_mounted_under_a_glob_unmounted_keeps_its_files_results(project: Project) -> None:
    """Left alone in an earlier session, then fixed: `data/*/*.parquet` with data/b a share's
    mount point. Unmounted, data/b is an empty directory: its files looked removed, their
    results were deleted, exit 0. Hostile review: a stale file of the same name left in the bare
    mount point, or another filesystem mounted over it, lost them too. A file removed on the
    mounted share still has its results go; a mount point removed with its share, too; `--fresh`
    is the way out when the share's files live in the bare mount point now."""
    project.write_config(MAP.replace('"data/*.parquet"', '"data/*/*.parquet"'))
    for place in ("a", "b"):
        (project.data / place).mkdir(parents=True)
    project.write_input("a/x.parquet", 0, 300)
    for name, first in (("y", 300), ("z", 600), ("stale", 900)):
        project.write_input(f"{name}.parquet", first, 300).rename(project.root / f"{name}.parquet")
    run = f"{sys.executable} -m minibatch --config {project.root / 'config.toml'} run-now ident"
    script = f"""
        cd {project.root}
        mount -t tmpfs share data/b && cp y.parquet z.parquet data/b/ || exit 9
        {run} > 1.out 2>&1; echo $? > 1.rc
        rm data/b/z.parquet  # removed on the share: its results go
        {run} > 2.out 2>&1; echo $? > 2.rc
        cp -p data/b/y.parquet y.parquet; umount data/b
        mount -t tmpfs moved data/b && cp -p y.parquet data/b/  # the same file on another share
        {run} > 3.out 2>&1; echo $? > 3.rc
        umount data/b
        {run} > 4.out 2>&1; echo $? > 4.rc
        cp stale.parquet data/b/y.parquet  # written into the bare mount point meanwhile
        {run} > 5.out 2>&1; echo $? > 5.rc
        mount -t tmpfs other data/b  # another filesystem mounted there
        {run} > 6.out 2>&1; echo $? > 6.rc
        umount data/b
        cp -r out/ident kept
        {run} --fresh > 7.out 2>&1; echo $? > 7.rc  # the share's files live here now: the way out
    """
    namespace = in_a_mount_namespace()
    assert namespace is not None
    done = subprocess.run([*namespace, "sh", "-c", script], env=project.env(), timeout=300)
    assert done.returncode == 0
    outcome = [((project.root / f"{i}.rc").read_text().strip(), (project.root / f"{i}.out").read_text())
               for i in range(1, 8)]  # fmt: skip
    assert [rc for rc, _ in outcome] == ["0", "0", "0", "1", "1", "1", "0"], outcome
    assert "0 done now, 12 already done" in outcome[2][1], outcome[2][1]  # nothing computed again
    unmounted = (
        f"{project.data / 'b'}: a mount point of moved (tmpfs) when its inputs were last read, and not"
    )
    assert unmounted in outcome[3][1] and unmounted in outcome[4][1], outcome[3][1]
    assert "when its inputs were last read, other (tmpfs) now" in outcome[5][1], outcome[5][1]
    kept = ds.dataset(project.root / "kept", format="parquet").to_table()  # after the refused runs
    assert sorted(kept.column("id").to_pylist()) == list(range(600))
    assert ids_of(project, "ident") == [*range(300), *range(900, 1200)]
    shutil.rmtree(project.data / "b")  # (no mount recorded by the --fresh run): its results go
    assert project.cli("run-now", "ident").returncode == 0
    assert ids_of(project, "ident") == list(range(300))


def test_a_mount_point_is_checked_as_spelled_where_it_resolves_and_on_a_file(tmp_path: Path) -> None:
    """Hostile reviews: a directory symlink on the share leading off it (data/b/day1 -> store)
    was checked only where it resolves, so data/b, unmounted, was never seen; a file
    bind-mounted over a placeholder (a container's volume), or a file that is a symlink onto a
    share, was not checked at all; a mount point an automounter removed was taken as retired."""
    write_ids(tmp_path / "store" / "y.parquet", range(3))
    write_ids(tmp_path / "share" / "w.parquet", range(3))
    (tmp_path / "data" / "b").mkdir(parents=True)
    (tmp_path / "data" / "b" / "day1").symlink_to(tmp_path / "store")
    (tmp_path / "data" / "w.parquet").symlink_to(tmp_path / "share" / "w.parquet")
    y, placeholder = tmp_path / "data" / "b" / "day1" / "y.parquet", tmp_path / "data" / "f.parquet"
    placeholder.touch()
    files = [str(y), str(placeholder), str(tmp_path / "data" / "w.parquet")]
    places = [tmp_path / "data" / "b", placeholder, tmp_path / "share"]
    table = {str(place): [(os.stat(place).st_dev, f"srv:/{place.name} (nfs4)")] for place in places}
    share = {place: what for place, [(_, what)] in table.items()}
    assert mounts_above(files, table | {"/elsewhere": [(0, "x (tmpfs)")]}) == share
    assert unmounted(files, share, table) == []
    assert [why.split(":")[0] for why in unmounted(files, share, {})] == sorted(share)
    shutil.rmtree(tmp_path / "data")  # as an automounter leaves them: gone is not retired
    assert [why.split(":")[0] for why in unmounted(files, share, {}) if "and gone now" in why] == [
        str(tmp_path / "data" / "b"), str(placeholder)
    ]  # fmt: skip


def test_what_is_mounted_on_a_place_is_the_mount_seen_there(tmp_path: Path) -> None:
    """Hostile review: mountinfo lists a mount hidden under one on its parent, and a mount
    moved on top keeps its old line: the mount seen is the one whose device the place is on."""
    seen = os.stat(tmp_path).st_dev
    assert mounted(str(tmp_path), {str(tmp_path): [(seen + 1, "hidden (tmpfs)")]}) is None
    assert mounted(str(tmp_path), {str(tmp_path): [(seen, "top (tmpfs)"), (seen + 1, "under (tmpfs)")]}) == (
        "top (tmpfs)"
    )
    assert mounted(str(tmp_path / "gone"), {str(tmp_path / "gone"): [(seen, "top (tmpfs)")]}) is None


@pytest.mark.parametrize(
    ("pattern", "listed"),
    [
        ("*/*.parquet", {"a/x.parquet", "b/y.parquet"}),
        ("**/*.parquet", {"top.parquet", "a/x.parquet", "b/y.parquet", "b/c/z.parquet"}),
        ("b/**", {"b/y.parquet", "b/c/z.parquet"}),
        ("*.parquet", {"top.parquet"}),
        ("*/.h/*.parquet", {"a/.h/v.parquet"}),
        ("../[[]x]/b/*.parquet", {"b/y.parquet"}),  # reaching out of the base, back into it
    ],
)
def test_what_a_glob_could_list_is_what_it_lists(tmp_path: Path, pattern: str, listed: set[str]) -> None:
    base = tmp_path / "[x]"  # the base directory's name is not a pattern
    everything = (
        "top.parquet",
        "a/x.parquet",
        "b/y.parquet",
        "b/c/z.parquet",
        ".h/w.parquet",
        "a/.h/v.parquet",
    )
    for name in everything:  # (glob's wildcards, `**` too, pass over hidden names)
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(b"")
    found = {str(Path(p).relative_to(base)) for p in find_inputs(base, [pattern]).files}
    assert found == listed
    assert {name for name in everything if _way(str(base / name), [reach_of(base, pattern)])} == listed


def test_a_file_that_cannot_be_opened_while_planning_is_not_a_bad_file(tmp_path: Path) -> None:
    """The same between the glob and the footer's read (here: removed): not a file whose
    results may go, but a reason to stop."""
    with pytest.raises(InputUnreadable, match="gone.parquet: cannot be read"):
        scan_inputs([str(tmp_path / "gone.parquet")], None)


def test_an_input_the_worker_cannot_open_is_the_machines_fault_not_the_chunks(tmp_path: Path) -> None:
    """Made unreadable after planning: the chunk is not charged (a dead letter would be skipped
    by later runs, a hole with exit 0), the run halts and the next one carries on."""
    path = tmp_path / "a.parquet"
    write_ids(path, range(10))
    (chunk,) = plan_chunks([read_file_meta(str(path), None)], 10_000)
    path.unlink()
    path.mkdir()  # open() fails here as it does, for any user, on a file of mode 000
    with pytest.raises(InputUnreadable, match="a.parquet: cannot be read") as caught:
        read_chunk(chunk, None)
    assert describe_error(caught.value).kind == ErrorKind.ENVIRONMENT


# -- H. files in the output that minibatch did not write -------------------------------------


def test_foreign_files_in_the_output_survive_runs_fresh_runs_and_reset(project: Project) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    out = project.out("ident")
    write_ids(out / "foreign.parquet", range(90_000, 90_010))
    (out / "NOTES.txt").write_text("kept by hand\n")
    foreign = {name: (out / name).read_bytes() for name in ("foreign.parquet", "NOTES.txt")}
    for args in (["run-now", "ident"], ["run-now", "ident", "--fresh"], ["reset", "ident", "--yes"]):
        result = project.cli(*args)
        assert result.returncode == 0, (args, said(result))
        assert {name: (out / name).read_bytes() for name in foreign if (out / name).exists()} == foreign, args
    assert parquet_names(out) == ["foreign.parquet"]  # reset removed what minibatch wrote
    assert project.cli("run-now", "ident").returncode == 0  # and kept its claim: not refused for them


def test_reset_never_follows_a_symlink_in_place_of_the_staging_directory(
    project: Project, tmp_path: Path
) -> None:
    """A review: with the staging directory replaced by a symlink to a user's directory,
    `reset` made that directory world-writable and emptied it, exit 0."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    (project.out("ident") / "README.txt").write_text("the user's")
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "notes.txt").write_text("keep")
    os.chmod(theirs, 0o750)
    staging = project.out("ident").parent / ".ident.minibatch-staging"
    shutil.rmtree(staging)
    staging.symlink_to(theirs)
    refused = project.cli("reset", "ident", "--yes")
    assert refused.returncode == 2 and "is a symlink" in refused.stderr, refused.stdout + refused.stderr
    assert (theirs / "notes.txt").read_text() == "keep" and os.stat(theirs).st_mode & 0o777 == 0o750


def test_existing_output_directory_minibatch_did_not_create_is_refused(project: Project) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    project.out("ident").mkdir(parents=True)
    (project.out("ident") / "keep.txt").write_text("not minibatch's\n")
    result = project.cli("run-now", "ident")
    assert result.returncode == 2, said(result)
    assert "out/ident" in said(result)
    assert snapshot(project.out("ident")) == {"keep.txt": b"not minibatch's\n"}


def test_the_same_job_of_another_state_dir_may_not_write_the_output(project: Project) -> None:
    import shutil

    """An operator review: a copy of the config with its own state_dir (to try a change) and
    the job's name unchanged published over the output, removed 5 of its 6 parts, and the
    first config's manifest went on calling the output complete; its `reset` removed it all."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    config = project.root / "config.toml"
    config.write_text(config.read_text().replace('state_dir = ".state"', 'state_dir = ".state-try"'))
    for command in (["run-now", "ident"], ["reset", "ident", "--yes"]):
        result = project.cli(*command)
        assert result.returncode == 2, said(result)
        assert ".state-try" in said(result) and "state_dir" in said(result)
    assert snapshot(project.out("ident")) == before
    # nor a copy of the state_dir (`cp -r .state .state-try`), which carries its id along,
    shutil.copytree(project.root / ".state", project.root / ".state-try", dirs_exist_ok=True)
    result = project.cli("run-now", "ident")
    assert result.returncode == 2 and "copy" in said(result), said(result)
    assert snapshot(project.out("ident")) == before
    # also once the output moved (renamed, the config following): the copy ran first and took it
    for name in ("ident", ".ident.minibatch-staging", ".ident.minibatch-parts"):
        if (project.root / "out" / name).exists():
            (project.root / "out" / name).rename(project.root / "out" / name.replace("ident", "renamed"))
    config.write_text(config.read_text().replace('"out/ident"', '"out/renamed"'))
    result = project.cli("run-now", "ident")
    assert result.returncode == 2 and "copy" in said(result), said(result)
    config.write_text(config.read_text().replace('state_dir = ".state-try"', 'state_dir = ".state"'))
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    # and a state_dir copy moved beside the output it moved along (their places kept: a review)
    (project.root / "sub").mkdir()
    shutil.copytree(project.root / ".state", project.root / "sub" / ".state-try")
    (project.root / "out").rename(project.root / "sub" / "out")
    text = config.read_text().replace('"out/renamed"', '"sub/out/renamed"')
    config.write_text(text.replace('state_dir = ".state"', 'state_dir = "sub/.state-try"'))
    result = project.cli("run-now", "ident")
    assert result.returncode == 2 and "copy" in said(result), said(result)


def test_a_project_moved_whole_or_its_state_dir_behind_a_symlink_keeps_its_output(
    project: Project, tmp_path: Path
) -> None:
    """The owner file named the state_dir's path: `mv proj proj2`, or the state_dir moved to
    a bigger disk behind a symlink, refused every run (reviews). It names the state_dir's id."""
    import shutil

    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    moved = Project(root=tmp_path / "moved", count_file=project.count_file)
    shutil.move(project.root, moved.root)
    moved.write_input("b.parquet", 300, 100)
    result = moved.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    shutil.move(moved.root / ".state", tmp_path / "bigdisk")
    (moved.root / ".state").symlink_to(tmp_path / "bigdisk")
    moved.write_input("c.parquet", 400, 100)
    result = moved.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    assert ids_of(moved, "ident") == list(range(500))
    # a whole project copied while the original is there cannot be told from a state_dir copied
    # beside a moved or copied output (reviews: such copies took the output from the original):
    # refused, with the way out in the message; the original runs on
    copy = Project(root=tmp_path / "copy", count_file=project.count_file)
    shutil.copytree(moved.root, copy.root, symlinks=False)
    copy.write_input("d.parquet", 500, 100)
    result = copy.cli("run-now", "ident")
    assert result.returncode == 2 and "to hand the output over" in said(result), said(result)
    (copy.root / "out" / ".ident.minibatch-staging" / "minibatch-owner").unlink()
    assert copy.cli("run-now", "ident").returncode == 0
    assert ids_of(copy, "ident") == list(range(600)) and ids_of(moved, "ident") == list(range(500))
    assert moved.cli("run-now", "ident").returncode == 0


def test_an_older_releases_owner_file_is_not_taken_by_a_state_dir_without_its_runs(project: Project) -> None:
    """An owner file from before the state_dir was in it names the job only: the first config
    to run after the upgrade took it, a copy with its own state_dir included (a review)."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    owner = project.root / "out" / ".ident.minibatch-staging" / "minibatch-owner"
    owner.write_text("ident")  # as an older release wrote it
    before = snapshot(project.out("ident"))
    config = project.root / "config.toml"
    config.write_text(config.read_text().replace('state_dir = ".state"', 'state_dir = ".state-try"'))
    for command in (["run-now", "ident"], ["reset", "ident", "--yes"]):
        result = project.cli(*command)
        assert result.returncode == 2 and "older release" in said(result), said(result)
    assert snapshot(project.out("ident")) == before and owner.read_text() == "ident"
    config.write_text(config.read_text().replace('state_dir = ".state-try"', 'state_dir = ".state"'))
    assert project.cli("run-now", "ident").returncode == 0  # the manifest that wrote it: upgraded
    assert owner.read_text().startswith("ident\n")


def test_existing_empty_output_directory_is_fine(project: Project) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    project.out("ident").mkdir(parents=True)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, said(result)
    assert ids_of(project, "ident") == list(range(300))


# -- L. a footer length that claims gigabytes ------------------------------------------------

SCAN_UNDER_A_CAP = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
    from minibatch.planner import scan_inputs
    good, bad = scan_inputs([sys.argv[1]], None)
    assert not good, good
    print(bad[0].error)
""")


def test_footer_length_claiming_gigabytes_is_a_bad_file_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3]}), path)
    with open(path, "r+b") as f:
        f.truncate(3 * 2**30)  # sparse: takes no disk
        f.seek(0, os.SEEK_END)
        f.write((2**31).to_bytes(4, "little") + b"PAR1")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SCAN_UNDER_A_CAP, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    error = result.stdout.strip()
    assert "footer" in error.lower(), error
    assert "MemoryError" not in error
    assert time.monotonic() - started < 30


def test_an_input_that_cannot_be_read_fails_the_run_and_deletes_nothing(project: Project) -> None:
    """Hostile review: b.parquet, a symlink into a share that went away, was skipped like a
    removed file: exit 0, and its results deleted from the output. A pipe named like an input
    was skipped as well (reading it would have waited forever)."""
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 300)
    shared = project.write_shared_input("b.parquet", 300, 200)
    assert project.cli("run-now", "ident").returncode == 0
    shared.rename(shared.with_name("away"))  # unmounted
    os.mkfifo(project.data / "c.parquet")
    result = project.cli("run-now", "ident")
    assert result.returncode == 1, said(result)
    assert "b.parquet: a symlink to" in said(result) and "nothing was deleted" in said(result)
    assert "c.parquet: not a regular file" in said(result)
    assert sorted(ids_of(project, "ident")) == list(range(500))
    fresh = project.cli("run-now", "ident", "--fresh")  # it wiped the output before it failed
    assert fresh.returncode == 1 and sorted(ids_of(project, "ident")) == list(range(500)), said(fresh)
    shared.with_name("away").rename(shared)  # back, and the pipe gone: nothing to compute
    (project.data / "c.parquet").unlink()
    again = project.cli("run-now", "ident")
    assert again.returncode == 0 and "0 done now" in said(again), said(again)
    assert sorted(ids_of(project, "ident")) == list(range(500))


def _same_size_twin(path: Path, first: int) -> None:
    """100 int64 ids from `first`, written plain and uncompressed: any `first` gives a file of
    the same size, whose footer differs only in its min/max statistics."""
    table = pa.table({"id": pa.array(range(first, first + 100), pa.int64())})
    pq.write_table(table, path, row_group_size=50, compression="none", use_dictionary=False)


@pytest.mark.parametrize("how", ["renamed over", "rewritten in place"])
@pytest.mark.parametrize("reader", ["pyarrow", "duckdb"])
def test_a_file_replaced_by_one_of_its_size_and_mtime_is_changed_input(
    tmp_path: Path, how: str, reader: str
) -> None:
    """Hostile review: a worker compared only size and mtime with the plan, and `cp -p`,
    `rsync -t` or `touch -r` keep both: it read the new file's rows by the old plan's ranges,
    and the run succeeded with rows missing. Also when the worker had read the old file."""
    path = tmp_path / "a.parquet"
    _same_size_twin(path, 0)
    chunks = plan_chunks([read_file_meta(str(path), None)], 500)  # a chunk per row group
    job = JobSpec("j", None, "SELECT * FROM chunk", None, str(tmp_path), str(tmp_path), str(tmp_path))
    read = (lambda c: read_chunk(c, None)) if reader == "pyarrow" else (lambda c: sql_on_file(job, c))
    assert read(chunks[0])["id"].to_pylist() == list(range(50))  # the worker has the file open and parsed
    stat = path.stat()
    if how == "renamed over":
        _same_size_twin(tmp_path / "new.parquet", 1000)
        os.replace(tmp_path / "new.parquet", path)
    else:
        with open(path, "r+b") as handle:  # as cp does: same inode
            _same_size_twin(tmp_path / "new.parquet", 1000)
            handle.write((tmp_path / "new.parquet").read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    for chunk in chunks:
        with pytest.raises(InputChanged, match="changed since it was planned"):
            read(chunk)
    release_held()


def test_a_mount_point_recorded_above_a_symlinked_share_is_checked_where_it_resolves(tmp_path: Path) -> None:
    """data/share -> mnt/share, a mount point (recorded so by the last run), now a bare
    directory: the share unmounted behind a symlink that still resolves; or gone, as an
    automounter leaves it. An input still there, unchanged, is no reason to refuse."""
    mount = tmp_path / "mnt" / "share"
    write_ids(tmp_path / "data" / "local" / "x.parquet", range(3))
    mount.mkdir(parents=True)
    (tmp_path / "data" / "share").symlink_to(mount)
    gone = {str(tmp_path / "data" / "share" / "y.parquet"): {(1, 2)}}
    system = mounts_above([str(tmp_path)], mount_table())  # (/tmp on a tmpfs, say) as a run records them
    recorded = {**system, str(mount): "srv:/share (nfs4)"}
    found = find_inputs(tmp_path, ["data/*/*.parquet"], read=gone, mounts=recorded)
    [why] = found.unreadable
    assert why.startswith(
        f"{mount}: a mount point of srv:/share (nfs4) when its inputs were last read, and not"
    )
    elsewhere = {**system, "/elsewhere": "x (nfs4)"}
    assert find_inputs(tmp_path, ["data/*/*.parquet"], read=gone, mounts=elsewhere).unreadable == []
    x = str(tmp_path / "data" / "local" / "x.parquet")
    here = {x: {(os.stat(x).st_size, os.stat(x).st_mtime_ns)}}
    local = {**system, str(tmp_path / "data" / "local"): "srv:/old (nfs4)"}  # now a plain directory
    assert find_inputs(tmp_path, ["data/*/*.parquet"], read=here, mounts=local).unreadable == []
    assert find_inputs(tmp_path, ["data/*/*.parquet"], read={x: {(1, 2)}}, mounts=local).unreadable != []


def test_a_dotdot_glob_from_a_symlinked_config_directory_still_checks_what_is_gone(tmp_path: Path) -> None:
    """Hostile review: with the config directory reached through a symlink (`current ->
    releases/7`), a `../../data/*/*.parquet` glob's way down was taken from the symlink's text
    parents, which glob never visits: no earlier input was checked, and a share gone behind a
    directory symlink lost its results."""
    (tmp_path / "releases" / "7").mkdir(parents=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "7")
    data = tmp_path / "data"
    write_ids(data / "a" / "x.parquet", range(3))
    (data / "b").symlink_to(tmp_path / "unmounted")
    found = find_inputs(
        tmp_path / "current", ["../../data/*/*.parquet"], read={str(data / "b" / "y.parquet"): set()}
    )
    assert found.files == [str(data / "a" / "x.parquet")]
    assert found.unreadable == [
        f"{data / 'b'}: a symlink to {tmp_path / 'unmounted'}, which cannot be reached"
    ]
