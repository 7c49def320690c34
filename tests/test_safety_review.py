"""Defects a hostile review of the data-safety change found (each failed before its fix):
stale results adopted or reduced, files deleted through links or in other jobs' directories,
runs that exit 0 with holes, and an input name that crashed every run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch.config import ConfigError, parse_config
from minibatch.layout import OutputLayout, part_name, staged_name
from minibatch.planner import FileMeta, misfits, scan_inputs
from minibatch.results import SchemaGate, inspect_part
from minibatch.states import ErrorKind
from minibatch.worker import describe_error

from conftest import Project, wait_for


def test_a_part_whose_footer_names_no_chunk_and_definition_is_never_adopted(tmp_path: Path) -> None:
    legacy = tmp_path / "p.parquet"  # what an older release wrote: adopting it could keep stale rows
    pq.write_table(pa.table({"id": [1]}), legacy)
    with pytest.raises(ValueError, match="does not say"):
        inspect_part(legacy, "c" * 24, "def1")


def test_removing_reduce_sql_removes_the_old_reduction(project: Project) -> None:
    body = """
    [jobs.j]
    input = "data/*.parquet"
    output = "out/j"
    sql = "SELECT id FROM chunk"
    {extra}
    """
    project.write_config(body.format(extra='reduce_sql = "SELECT count(*) AS n FROM parts"'))
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "j").returncode == 0
    project.write_config(body.format(extra=""))
    assert project.cli("run-now", "j").returncode == 0
    assert sorted(project.output_table("j").column("id").to_pylist()) == list(range(300))
    assert not (project.root / "out" / ".j.minibatch-parts").exists()


def test_a_staging_directory_that_is_a_symlink_is_refused(project: Project, tmp_path: Path) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 100)
    victim = tmp_path / "victim"
    (victim / "subdir").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    (project.root / "out").mkdir()
    os.symlink(victim, project.root / "out" / ".ident.minibatch-staging")
    result = project.cli("run-now", "ident")
    assert result.returncode == 2 and "symlink" in result.stderr
    assert sorted(os.listdir(victim)) == ["precious.txt", "subdir"]


def test_an_output_inside_another_jobs_staging_directory_is_a_config_error(tmp_path: Path) -> None:
    raw = {
        "jobs": {
            "a": {"input": "data/*.parquet", "output": "out/.b.minibatch-staging/a", "sql": "SELECT 1"},
            "b": {"input": "data/*.parquet", "output": "out/b", "sql": "SELECT 1"},
        }
    }
    with pytest.raises(ConfigError, match="overlaps"):
        parse_config(raw, tmp_path / "config.toml")


def test_fresh_does_not_publish_what_an_earlier_run_staged(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out", reduce=False)
    layout.prepare()
    name = part_name("a" * 24)
    (layout.staging / staged_name(name, "20261129T000000Z-abcdef", 1)).write_bytes(b"old")
    assert layout.staged_results()
    layout.remove_all(keep_claim=True)
    assert layout.staging.is_dir() and not layout.staged_results()


def test_a_file_name_that_is_not_utf8_is_a_bad_file_not_a_crash(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad\xff.parquet")
    with open(tmp_path / name, "wb") as handle:  # pyarrow itself cannot take the name
        pq.write_table(pa.table({"id": [1]}), handle)
    good, bad = scan_inputs([str(tmp_path / name)], None)
    assert good == [] and "not valid UTF-8" in bad[0].error
    bad[0].path.encode()  # printable: the manifest and logs can hold it


def test_columns_in_another_order_do_not_fit_the_input_schema() -> None:
    signature = (("id", "int64"), ("name", "string"))
    swapped = FileMeta("/d/x.parquet", "fp", 1, (), signature=(("name", "string"), ("id", "int64")))
    assert "another order" in (misfits(swapped, signature, None) or "")
    assert misfits(swapped, signature, ["id"]) is None  # a projection fixes the order


def test_a_first_chunk_with_an_all_null_column_does_not_decide_the_schema() -> None:
    nulls = pa.schema([("id", pa.int64()), ("note", pa.null())])
    typed = pa.schema([("id", pa.int64()), ("note", pa.string())])
    gate: SchemaGate[str] = SchemaGate(None, ["c0", "c1", "c2"])
    assert gate.offer("c0", nulls, "r0") == []  # waits for a schema without guessed types
    assert gate.offer("c1", typed, "r1") == ["r0", "r1"]
    assert gate.schema == typed
    only_nulls: SchemaGate[str] = SchemaGate(None, ["c0"])
    assert only_nulls.offer("c0", nulls, "r0") == ["r0"]  # nothing better: the guess stands
    assert only_nulls.schema == nulls


def test_a_full_disk_is_the_machines_fault_not_the_chunks() -> None:
    try:
        raise OSError(28, "No space left on device")
    except OSError as exc:
        assert describe_error(exc).kind == ErrorKind.ENVIRONMENT


MAP = """
[jobs.ident]
input = "data/*.parquet"
output = "out/ident"
sql = "SELECT * FROM chunk"
chunk_bytes = "3KB"
"""


def test_a_reduce_reads_its_parts_with_their_own_schema_after_empty_runs(project: Project) -> None:
    (project.root / "myjobs" / "m.py").write_text(
        "import pyarrow.compute as pc\n"
        "def big(table, ctx):\n"
        "    t = table.filter(pc.greater_equal(table['id'], 1000))\n"
        "    return t if t.num_rows == 0 else t.append_column('score', pc.multiply(t['id'], 2))\n"
    )
    project.write_config("""
    [jobs.j]
    input = "data/*.parquet"
    output = "out/j"
    process = "myjobs.m:big"
    reduce_sql = "SELECT * FROM parts ORDER BY id"
    """)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "j").returncode == 0  # only empty results: the schema is {id}
    project.write_input("later.parquet", 1000, 10)
    assert project.cli("run-now", "j").returncode == 0
    reduced = pq.read_table(project.out("j") / "part-reduced.parquet")
    assert reduced.column_names == ["id", "value", "name", "score"] and reduced.num_rows == 10


def test_inputs_that_vanish_during_a_run_fail_it(project: Project) -> None:
    project.write_config(MAP.replace('sql = "SELECT * FROM chunk"', 'process = "myjobs.faulty:slow"'))
    for i in range(4):
        project.write_input(f"f{i}.parquet", i * 500, 500)
    process = project.start("run-now", "ident", env={"MB_SLEEP": "0.05"})
    wait_for(lambda: len(project.computations()) >= 2, what="chunks to run")
    project.data.rename(project.root / "unmounted")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, out + err
    assert "vanished during the run" in out


def test_repair_keeps_the_input_schema_the_outputs_were_computed_under(project: Project) -> None:
    project.write_config(MAP)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    for i in range(2):  # a producer's new version: two files of another schema outnumber the first
        table = pa.table({"id": pa.array(range(100), pa.int32()), "extra": ["x"] * 100})
        pq.write_table(table, project.data / f"new{i}.parquet")
    before = sorted(os.listdir(project.out("ident")))
    (project.root / ".state" / "manifest.duckdb").write_bytes(b"garbage" * 100)
    assert project.cli("repair").returncode == 0
    assert project.cli("run-now", "ident").returncode == 1  # the new files are bad files again
    assert sorted(os.listdir(project.out("ident"))) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_a_full_disk_while_staging_dead_letters_nothing(project: Project) -> None:
    project.write_config(MAP)
    for i in range(3):
        project.write_input(f"f{i}.parquet", i * 2000, 2000)
    out = project.root / "out"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (out / "filler").write_bytes(b"x" * 200 * 1024)
        first = project.cli("run-now", "ident")
        assert first.returncode == 1 and "No space left" in first.stdout, first.stdout + first.stderr
        assert project.manifest_rows("SELECT count(*) FROM chunks WHERE status = 'dead'") == [(0,)]
        (out / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        assert project.cli("run-now", "ident").returncode == 0
        assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(6000))
    finally:
        subprocess.run(["umount", "-l", str(out)])


def test_a_result_staged_but_not_published_by_a_killed_run_is_salvaged_not_recomputed(
    project: Project,
) -> None:
    """What made the crash-and-resume property flaky: a worker had finished and staged chunk A,
    then the run was killed before the coordinator published it; A was computed again."""
    project.write_config(MAP.replace('sql = "SELECT * FROM chunk"', 'process = "myjobs.basic:ident"'))
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    computed = len(project.computations())
    victim = sorted(p for p in os.listdir(project.out("ident")) if p.startswith("part-"))[0]
    staging = project.root / "out" / ".ident.minibatch-staging"
    os.rename(project.out("ident") / victim, staging / staged_name(victim, "20261129T000000Z-dead00", 1))
    con = duckdb.connect(str(project.root / ".state" / "manifest.duckdb"))
    con.execute("DELETE FROM chunks WHERE output_file = ?", [victim])
    con.close()
    again = project.cli("run-now", "ident")
    assert again.returncode == 0, again.stderr
    assert len(project.computations()) == computed  # published from staging, not recomputed
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(300))
    assert [p.name for p in staging.iterdir()] == ["minibatch-owner"]  # nothing else left
