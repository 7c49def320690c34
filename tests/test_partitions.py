"""Partitioned output and right-sized files: partitions replaced whole (a SIGKILL during the
publication leaves each one old or new), untouched partitions byte for byte, escaped values
that DuckDB's and pyarrow's hive readers agree on, small files merged by rewriting."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minibatch import compact, hive
from minibatch.compact import Slice, plan_files
from minibatch.hive import FILE_RE, MAX_ROW_GROUP_ROWS, NULL_VALUE, Shape, escape, split_units
from minibatch.layout import with_provenance, write_durably

from conftest import Project, wait_for

JOB = """
[jobs.p]
input = "data/*.parquet"
output = "out/p"
sql = "SELECT * FROM chunk"
chunk_bytes = "3KB"
partition_by = ["day", "region"]
target_file_bytes = "6KB"
row_group_rows = 64
"""
REGIONS = ["eu", "us", "a/b", "x=y", "..", "ünï", "sp ace", None, "__HIVE_DEFAULT_PARTITION__", ""]


def write(
    project: Project, name: str, ids: range, days: int = 3, regions: list[str | None] = REGIONS
) -> None:
    project.data.mkdir(exist_ok=True)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "day": pa.array([f"2026-11-{1 + i % days:02d}" for i in ids]),
            "region": pa.array([regions[i % len(regions)] for i in ids], pa.string()),
            "amount": pa.array([i % 13 for i in ids], pa.int64()),
        }
    )
    pq.write_table(table, project.data / name, row_group_size=100)


def expected(project: Project) -> dict[tuple[str, str | None], set[int]]:
    """Each partition's ids, from the input files."""
    found: dict[tuple[str, str | None], set[int]] = defaultdict(set)
    for path in sorted(project.data.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            region = None if row["region"] in ("", NULL_VALUE) else row["region"]  # as in Hive
            found[(row["day"], region)].add(row["id"])
    return dict(found)


def by_duckdb(output: Path) -> dict[tuple[str, str | None], list[int]]:
    rows = duckdb.sql(
        f"SELECT CAST(day AS VARCHAR), region, id FROM read_parquet('{output}/**/*.parquet', "
        "hive_partitioning = true, hive_types_autocast = false)"
    ).fetchall()
    return _group(rows)


def by_pyarrow(output: Path) -> dict[tuple[str, str | None], list[int]]:
    schema = pa.schema([("day", pa.string()), ("region", pa.string())])
    table = ds.dataset(
        output, format="parquet", partitioning=ds.partitioning(schema, flavor="hive")
    ).to_table()
    return _group(
        zip(table["day"].to_pylist(), table["region"].to_pylist(), table["id"].to_pylist(), strict=True)
    )


def _group(rows: object) -> dict[tuple[str, str | None], list[int]]:
    found: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for day, region, id_ in rows:  # type: ignore[attr-defined]
        found[(day, region)].append(id_)
    return {key: sorted(ids) for key, ids in found.items()}


def check_output(project: Project) -> None:
    """Each partition holds exactly its ids, once, as both readers see it."""
    want = {key: sorted(ids) for key, ids in expected(project).items()}
    assert by_duckdb(project.out("p")) == want
    assert by_pyarrow(project.out("p")) == want


def files(output: Path) -> dict[str, str]:
    """Every published file under the output: relative path -> content digest."""
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in output.rglob("*.parquet")
    }


def test_partition_values_round_trip_through_both_hive_readers(project: Project) -> None:
    write(project, "a.parquet", range(0, 600))
    project.write_config(JOB)
    result = project.cli("run-now", "p", "-q")
    assert result.returncode == 0, result.stderr
    check_output(project)
    names = {path.name for path in project.out("p").glob("day=2026-11-01/*")}
    assert "region=__HIVE_DEFAULT_PARTITION__" in names
    assert {"region=a%2Fb", "region=x%3Dy", "region=%2E%2E", "region=%C3%BCn%C3%AF"} <= names


def test_a_new_file_replaces_only_the_partitions_it_has_rows_for(project: Project) -> None:
    write(project, "a.parquet", range(0, 1200))
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    before = files(project.out("p"))
    marker = project.out("p") / "day=2026-11-01" / "region=eu" / "_SUCCESS"
    marker.write_text("mine")  # in a partition about to be replaced: not minibatch's, it stays
    write(project, "b.parquet", range(5000, 5050), days=1, regions=["eu"])  # day 01, eu only
    assert project.cli("run-now", "p", "-q").returncode == 0
    after = files(project.out("p"))
    touched = "day=2026-11-01/region=eu/"
    assert {k: v for k, v in before.items() if not k.startswith(touched)} == {
        k: v for k, v in after.items() if not k.startswith(touched)
    }  # every other partition byte for byte
    assert {k for k in after if k.startswith(touched)} != {k for k in before if k.startswith(touched)}
    assert marker.read_text() == "mine"
    check_output(project)
    (status,) = json.loads(project.cli("status", "p", "--json").stdout)
    assert status["output_rows"] == 1250  # what readers see: the published files

    (project.data / "b.parquet").unlink()  # its rows go, and only from its partition
    write(project, "c.parquet", range(9000, 9010), days=1, regions=["new"])
    assert project.cli("run-now", "p", "-q").returncode == 0
    check_output(project)
    assert (
        files(project.out("p"))["day=2026-11-02/region=us/" + _only(project, "day=2026-11-02/region=us")]
        == (before["day=2026-11-02/region=us/" + _only(project, "day=2026-11-02/region=us")])
    )

    (project.data / "c.parquet").unlink()  # a partition no input has rows for any more
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert not (project.out("p") / "day=2026-11-01" / "region=new").exists()
    check_output(project)


def _only(project: Project, unit: str) -> str:
    (name,) = [p.name for p in (project.out("p") / unit).iterdir()]
    return name


def test_small_files_are_merged_by_rewriting_and_big_ones_kept(project: Project) -> None:
    project.write_config(
        JOB.replace('partition_by = ["day", "region"]', "").replace('"6KB"', '"40KB"').replace("64", "1000")
    )
    for n in range(4):  # four runs, each adding a little: one small file each time, merged
        write(project, f"{n}.parquet", range(n * 1000, n * 1000 + 300))
        assert project.cli("run-now", "p", "-q").returncode == 0
    published = [p for p in project.out("p").iterdir() if FILE_RE.match(p.name)]
    assert len(published) <= 2
    groups = [
        pq.read_metadata(p).row_group(i).num_rows
        for p in published
        for i in range(pq.read_metadata(p).num_row_groups)
    ]
    assert max(groups) > 300  # rewritten: rows of several runs in one row group, not concatenated
    table = ds.dataset(project.out("p"), format="parquet").to_table()
    assert sorted(table["id"].to_pylist()) == [i for n in range(4) for i in range(n * 1000, n * 1000 + 300)]


def test_a_sigkill_while_partitions_are_replaced_leaves_each_old_or_new(project: Project) -> None:
    """Killed at a random instant of the publication (staging holds a unit being built), every
    partition is whole: all its old rows or all its new ones; the next run finishes the job."""
    rng = random.Random(1130)
    write(project, "a.parquet", range(0, 2000), days=10)
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    staging = project.root / "out" / ".p.minibatch-staging"
    for round_ in range(3):
        old = {key: sorted(ids) for key, ids in expected(project).items()}
        if round_ == 1:
            (project.data / "a.parquet").unlink()  # partitions shrink and vanish
        write(
            project,
            f"new{round_}.parquet",
            range(10_000 * (round_ + 1), 10_000 * (round_ + 1) + 900),
            days=10,
        )
        new = {key: sorted(ids) for key, ids in expected(project).items()}
        process = project.start("run-now", "p")
        wait_for(
            lambda: any(p.name.startswith("unit-") for p in staging.iterdir()), timeout=60, what="publication"
        )
        time.sleep(rng.uniform(0, 0.2))  # a random instant of it (not a synchronisation)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        seen = by_duckdb(project.out("p"))
        assert seen == by_pyarrow(project.out("p"))
        for key in old.keys() | new.keys():
            assert seen.get(key) in (old.get(key), new.get(key)), (round_, key)
        assert project.cli("run-now", "p", "-q").returncode == 0
        check_output(project)


def test_split_units_keeps_every_row_once_grouped_by_value() -> None:
    table = pa.table({"k": ["b", None, "a", "b", "", None], "n": [1, 2, 3, 1, 1, None], "i": range(6)})
    units = split_units(table, ("k", "n"))
    assert [unit for unit, _ in units] == sorted({unit for unit, _ in units}, key=[u for u, _ in units].index)
    assert sorted(i for _, rows in units for i in rows["i"].to_pylist()) == list(range(6))
    for unit, rows in units:
        assert (
            len({(k, n) for k, n in zip(rows["k"].to_pylist(), rows["n"].to_pylist(), strict=True)}) == 1
        ), unit
    assert escape(None) == escape("") == NULL_VALUE and escape("a.b/c") == "a%2Eb%2Fc"


@given(st.lists(st.integers(1, 5000), max_size=40), st.integers(1, 8000))
def test_planned_files_hold_every_slice_once_in_order(sizes: list[int], target: int) -> None:
    slices = [Slice(f"s{i}", Path("p"), 0, 1, size) for i, size in enumerate(sizes)]
    planned = plan_files(slices, target)
    assert [piece for group in planned for piece in group] == slices
    for group in planned[:-1]:
        assert sum(p.nbytes for p in group) >= target  # only the last file is short
        assert sum(p.nbytes for p in group[:-1]) < target  # and none grows past what it needs


def test_changing_the_layout_keeps_every_row_once(project: Project) -> None:
    """Hostile review: a new partition_by at the same depth, or reduce_sql added, left the
    earlier layout's files beside the new ones (every row twice)."""
    write(project, "a.parquet", range(0, 600))
    ids = sorted(range(600))
    base = JOB.replace('target_file_bytes = "6KB"', "")
    layouts = ['["day"]', '["region"]', '["day", "region"]', '["region"]', "[]", '["day"]']
    for layout in layouts:
        project.write_config(base.replace('["day", "region"]', layout) if layout != "[]" else base.replace(
            'partition_by = ["day", "region"]', 'target_file_bytes = "4KB"'))  # fmt: skip
        result = project.cli("run-now", "p", "-q")
        assert result.returncode == 0, (layout, result.stderr)
        seen = duckdb.sql(f"SELECT id FROM read_parquet('{project.out('p')}/**/*.parquet')").fetchall()
        assert sorted(i for (i,) in seen) == ids, layout
    reduce = base.replace(
        'sql = "SELECT * FROM chunk"', 'sql = "SELECT * FROM chunk"\nreduce_sql = "SELECT * FROM parts"'
    )
    project.write_config(reduce.replace('partition_by = ["day", "region"]', ""))
    assert project.cli("run-now", "p", "-q").returncode == 0
    seen = duckdb.sql(f"SELECT id FROM read_parquet('{project.out('p')}/**/*.parquet')").fetchall()
    assert sorted(i for (i,) in seen) == ids


@pytest.mark.parametrize("shape", ['partition_by = ["day"]', 'target_file_bytes = "4KB"'])
def test_removing_reduce_sql_recomputes_the_parts_for_the_output(project: Project, shape: str) -> None:
    """Hostile review: parts a reduce read are written whole; taken up as a partitioned or
    right-sized output's parts, every later run crashed with a traceback until --fresh."""
    write(project, "a.parquet", range(0, 300), days=2)
    base = JOB.replace('partition_by = ["day", "region"]\ntarget_file_bytes = "6KB"', shape)
    reduce = base.replace(
        'sql = "SELECT * FROM chunk"', 'sql = "SELECT * FROM chunk"\nreduce_sql = "FROM parts"'
    )
    for config in (reduce, base, reduce):
        project.write_config(config)
        result = project.cli("run-now", "p", "-q")
        assert result.returncode == 0, result.stdout + result.stderr
        seen = duckdb.sql(f"SELECT id FROM read_parquet('{project.out('p')}/**/*.parquet')").fetchall()
        assert sorted(i for (i,) in seen) == list(range(300))


def test_a_reductions_new_partition_by_lays_it_out_anew(project: Project) -> None:
    """Hostile review: once parts written whole no longer counted partition_by, a reduce job's
    new partition_by changed nothing: readers of the new layout found nothing, exit 0."""
    write(project, "a.parquet", range(0, 300), days=2, regions=["eu", "us"])
    reduce = JOB.replace(
        'sql = "SELECT * FROM chunk"', 'sql = "SELECT * FROM chunk"\nreduce_sql = "FROM parts"'
    )
    for layout, top in (('["day"]', "day"), ('["region"]', "region"), ("[]", "part")):
        project.write_config(reduce.replace('["day", "region"]', layout))
        assert project.cli("run-now", "p", "-q").returncode == 0
        tops = {p.name.partition("=")[0] if "=" in p.name else p.name[:4] for p in project.out("p").iterdir()}
        assert tops == {top}, layout
        seen = duckdb.sql(f"SELECT id FROM read_parquet('{project.out('p')}/**/*.parquet')").fetchall()
        assert sorted(i for (i,) in seen) == list(range(300))


def test_an_empty_partitioned_reduction_removes_the_partitions(project: Project) -> None:
    write(project, "a.parquet", range(0, 300))
    reduce = JOB.replace(
        'sql = "SELECT * FROM chunk"',
        'sql = "SELECT * FROM chunk"\nreduce_sql = "SELECT * FROM parts WHERE id < $cap"',
    )
    project.write_config(reduce.replace("$cap", "100"))
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert list(project.out("p").rglob("*.parquet"))
    project.write_config(reduce.replace("$cap", "0"))
    result = project.cli("run-now", "p", "-q")
    assert result.returncode == 0, result.stderr  # was: IndexError, and the old partitions stayed
    assert not list(project.out("p").rglob("*.parquet"))


def test_what_minibatch_did_not_write_is_never_carried_off(project: Project) -> None:
    write(project, "a.parquet", range(0, 300), days=1)
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    mine = project.out("p") / "day=2026-11-02"
    mine.write_text("a user's file, named like the next partition")
    keep = project.out("p") / "day=2026-11-01" / "region=eu" / "_SUCCESS"
    keep.write_text("x")
    write(project, "b.parquet", range(1000, 1300), days=2)  # rows for day 2: its directory is a file
    result = project.cli("run-now", "p")
    assert result.returncode == 1 and "is not a directory minibatch made" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr  # the run fails, readably: it was a crash
    assert "failed" in result.stdout
    assert mine.read_text().startswith("a user's file")
    (project.data / "b.parquet").unlink()
    (project.data / "a.parquet").unlink()
    write(project, "c.parquet", range(2000, 2010), days=1, regions=["us"])  # eu has no rows now
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert keep.read_text() == "x"
    assert not [p for p in keep.parent.iterdir() if p.suffix == ".parquet"]


def test_a_replaced_partition_keeps_its_mode(project: Project) -> None:
    """A review: a partition swapped in was made anew with the run's umask, so a group-shared
    one (2770) became 755: world-readable, and no longer the group's."""
    write(project, "a.parquet", range(0, 300), days=1, regions=["eu"])
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    unit = project.out("p") / "day=2026-11-01" / "region=eu"
    os.chmod(unit, 0o2770)
    write(project, "b.parquet", range(1000, 1100), days=1, regions=["eu"])  # the unit is replaced
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert os.stat(unit).st_mode & 0o7777 == 0o2770


def test_a_users_directory_of_partitions_is_not_taken(project: Project) -> None:
    """Hostile review: a partitioned job's first run took an existing output whose `k=v`
    directories held the user's own files (any name with `=` passed for minibatch's), and
    published beside them: the output read 2 rows more than its input, exit 0."""
    write(project, "a.parquet", range(0, 300), days=1)
    project.write_config(JOB)
    theirs = project.out("p") / "day=2026-11-01" / "region=eu" / "users_own.parquet"
    theirs.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": [999_999]}), theirs)
    refused = project.cli("run-now", "p")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "day=2026-11-01/region=eu/users_own.parquet" in refused.stderr, refused.stderr
    assert [p.name for p in theirs.parent.iterdir()] == ["users_own.parquet"]


@pytest.mark.parametrize("name", ["my col", "_day", "day\\n"])
def test_partition_columns_need_plain_names(project: Project, name: str) -> None:
    """Hostile review: `_day` was accepted, and pyarrow's dataset reader skips every directory
    whose name starts with `_`: its readers saw none of the rows of a run that succeeded."""
    write(project, "a.parquet", range(0, 10))
    project.write_config(JOB.replace('["day", "region"]', f'["{name}", "region"]'))
    result = project.cli("validate")
    assert result.returncode == 2, result.stdout
    assert "partition columns need plain names" in result.stderr, result.stderr


def test_a_reduce_partitioned_by_a_column_only_its_result_has(project: Project) -> None:
    """Hostile review: the chunks' parts were split by partition_by too, so a column made by
    reduce_sql failed every chunk ("not in the result"): the job could never succeed."""
    write(project, "a.parquet", range(0, 300))
    reduce = 'reduce_sql = "SELECT id % 3 AS k, count(*) AS n FROM parts GROUP BY 1"\nretries = 0\n'
    project.write_config(
        JOB.replace('["day", "region"]', '["k"]').replace("row_group_rows", reduce + "row_group_rows")
    )
    result = project.cli("run-now", "p", "-q")
    assert result.returncode == 0, result.stderr
    table = ds.dataset(project.out("p"), format="parquet", partitioning="hive").to_table()
    assert sorted(zip(table["k"].to_pylist(), table["n"].to_pylist(), strict=True)) == [
        (0, 100),
        (1, 100),
        (2, 100),
    ]


@pytest.mark.parametrize(
    ("reduce_sql", "partition_by", "says"),
    [
        ("SELECT count(*) AS n FROM parts", "day", "partition_by column 'day' is not in the result"),
        ("SELECT id, [id] AS l FROM parts", "l", "partition_by column 'l' is list<l: int64>"),
        ("SELECT id, repeat('e', 300) AS k FROM parts", "k", "partition directory too long"),
    ],
    ids=["missing", "list", "too-long"],
)
def test_a_reduction_that_cannot_be_partitioned_fails_the_run_readably(
    project: Project, reduce_sql: str, partition_by: str, says: str
) -> None:
    """Hostile review: these escaped the run as a traceback, the run left `crashed`; what was
    published before stays as it was."""
    write(project, "a.parquet", range(0, 300), days=2, regions=["eu", "us"])
    good = JOB.replace(
        'sql = "SELECT * FROM chunk"', 'sql = "SELECT * FROM chunk"\nreduce_sql = "FROM parts"'
    )
    good = good.replace('["day", "region"]', "[{}]")
    project.write_config(good.format('"day"'))
    assert project.cli("run-now", "p", "-q").returncode == 0
    before = {p: p.read_bytes() for p in project.out("p").rglob("*") if p.is_file()}
    project.write_config(good.replace('"FROM parts"', json.dumps(reduce_sql)).format(f'"{partition_by}"'))
    result = project.cli("run-now", "p", "-q")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and says in result.stderr, result.stderr
    assert project.manifest_rows("SELECT status FROM runs ORDER BY started_at DESC LIMIT 1") == [("failed",)]
    assert {p: p.read_bytes() for p in project.out("p").rglob("*") if p.is_file()} == before


def test_right_sized_output_follows_its_input_down_to_no_rows(project: Project) -> None:
    """Without partition_by the output is one unit: when no chunk has rows any more, its
    published files go too (they were left, holding rows the new definition drops)."""
    write(project, "a.parquet", range(0, 300))
    job = JOB.replace('partition_by = ["day", "region"]', "")
    project.write_config(job.replace("SELECT * FROM chunk", "SELECT * FROM chunk WHERE id < 1000"))
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert [p for p in project.out("p").iterdir() if FILE_RE.match(p.name)]
    project.write_config(job.replace("SELECT * FROM chunk", "SELECT * FROM chunk WHERE id < 0"))
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert not [p for p in project.out("p").iterdir() if FILE_RE.match(p.name)]


def test_dropping_partition_by_keeps_the_old_output_until_the_new_one_is_in(project: Project) -> None:
    """Second review: removing partition_by emptied the output when the run started."""
    write(project, "a.parquet", range(0, 300))
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    plain = JOB.replace('partition_by = ["day", "region"]', "").replace('target_file_bytes = "6KB"', "")
    failing = plain.replace("SELECT * FROM chunk", "SELECT *, CAST(day || 'x' AS INTEGER) AS n FROM chunk")
    project.write_config(failing + "retries = 0\nbreaker_failures = 0\n")  # no 30 s cool-down
    assert project.cli("run-now", "p", "-q").returncode == 1  # fails: the old output stays whole
    check_output(project)
    project.write_config(plain)
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert not [p for p in project.out("p").rglob("file-*.parquet")]
    ids = duckdb.sql(f"SELECT id FROM read_parquet('{project.out('p')}/*.parquet')").fetchall()
    assert sorted(i for (i,) in ids) == list(range(300))


def test_a_users_file_made_while_its_partition_is_rebuilt_stays(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review: the old unit, swapped out, was deleted whole, with a file a user made in
    the partition (or replaced there) while minibatch was building the new one; and a unit
    removed as empty took a file made after it was found to hold only minibatch's."""
    write(project, "a.parquet", range(0, 300), days=2, regions=["eu"])
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    day1, day2 = project.out("p") / "day=2026-11-01" / "region=eu", project.out("p") / "day=2026-11-02"
    (day1 / "_SUCCESS").write_text("before")  # carried into the new unit
    (day1 / "_notes").mkdir()  # a user's directory, carried too
    (day1 / "_report").write_text("a file")
    real_exchange, real_remove = compact.exchange, compact.Publisher._remove_unit

    def user_writes_then_exchange(staged: Path, target: Path) -> None:  # as the swap happens
        if target == day1:
            (target / "_NOTES.txt").write_text("made while it was rebuilt")
            (target / ".tmp").write_text("after")
            os.replace(target / ".tmp", target / "_SUCCESS")  # replaced, not rewritten in place
            (target / "_notes" / "file-0123456789abcdef.parquet").write_text("named like ours, below")
            (target / "_report").unlink()
            (target / "_report").mkdir()  # a file became a directory
            (target / "_report" / "x").write_text("in it")
        real_exchange(staged, target)

    def user_writes_then_remove(self: compact.Publisher, unit: str) -> None:
        (project.out("p") / unit / "_LATE").write_text("made after the check")
        real_remove(self, unit)

    monkeypatch.setattr(compact, "exchange", user_writes_then_exchange)
    monkeypatch.setattr(compact.Publisher, "_remove_unit", user_writes_then_remove)
    (project.data / "a.parquet").unlink()
    write(project, "b.parquet", range(1000, 1100), days=1, regions=["eu"])  # day 1 rebuilt, day 2 empty
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert (day1 / "_NOTES.txt").read_text() == "made while it was rebuilt"
    assert (day1 / "_SUCCESS").read_text() == "after"
    assert (day1 / "_notes" / "file-0123456789abcdef.parquet").read_text() == "named like ours, below"
    assert (day1 / "_report").read_text() == "a file" and (day1 / "_report.1" / "x").read_text() == "in it"
    assert (day2 / "region=eu" / "_LATE").read_text() == "made after the check"
    assert {i for ids in by_pyarrow(project.out("p")).values() for i in ids} == set(range(1000, 1100))


@pytest.mark.parametrize(
    "swap, then", [("replaced", "run"), ("removed", "run"), ("replaced", "fresh"), ("removed", "reset")]
)
def test_a_users_file_in_a_unit_a_dead_publication_swapped_out_stays(
    project: Project, monkeypatch: pytest.MonkeyPatch, swap: str, then: str
) -> None:
    """Hostile review: a publication that died between swapping a unit out and moving back what
    a user made in it meanwhile left the user's file in staging, and the next run deleted it
    with the rest of staging (`temp_files_removed=1`); so did `--fresh` and `reset` after the
    first fix, and a file the user changed after the crash got its old copy back over it."""
    write(project, "a.parquet", range(0, 300), days=2, regions=["eu"])
    project.write_config(JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    unit = project.out("p") / ("day=2026-11-01" if swap == "replaced" else "day=2026-11-02") / "region=eu"
    (unit / "_KEEP").write_text("old")
    os.chmod(unit, 0o750)  # a review: a death after the swap left the new unit the umask's mode
    real_exchange, real_rename = compact.exchange, os.rename

    def dies_after_the_swap(staged: Path, target: Path) -> None:
        if target == unit:
            (target / "_NOTES.txt").write_text("made while it was rebuilt")
        real_exchange(staged, target)
        if target == unit:
            raise OSError(28, "No space left on device")  # the process's end, as far as the unit knows

    def dies_after_the_removal(source: Path, destination: Path) -> None:
        if Path(source) == unit:
            (unit / "_NOTES.txt").write_text("made after the check")
            real_rename(source, destination)
            raise OSError(28, "No space left on device")
        real_rename(source, destination)

    monkeypatch.setattr(compact, "exchange", dies_after_the_swap)
    monkeypatch.setattr(compact.os, "rename", dies_after_the_removal)
    (project.data / "a.parquet").unlink()
    write(project, "b.parquet", range(1000, 1100), days=1, regions=["eu"])  # day 1 rebuilt, day 2 empty
    assert project.cli("run-now", "p", "-q").returncode == 1
    monkeypatch.undo()
    if swap == "replaced":  # the user changes a file of theirs before the next command
        (unit / ".new").write_text("changed after the crash")
        os.replace(unit / ".new", unit / "_KEEP")
    command = {
        "run": ["run-now", "p"],
        "fresh": ["run-now", "p", "--fresh"],
        "reset": ["reset", "p", "--yes"],
    }
    assert project.cli(*command[then], "-q" if then != "reset" else "--yes").returncode == 0
    assert (unit / "_NOTES.txt").read_text().startswith("made")
    assert (unit / "_KEEP").read_text() == ("changed after the crash" if swap == "replaced" else "old")
    if swap == "replaced":
        assert os.stat(unit).st_mode & 0o777 == 0o750
    if then != "reset":
        assert {i for ids in by_pyarrow(project.out("p")).values() for i in ids} == set(range(1000, 1100))
        assert [p.name for p in project.out("p").parent.glob(".p.minibatch-staging/*")] == ["minibatch-owner"]
    else:  # what is left is the user's: the claim stays, so the next run is not refused
        assert project.cli("run-now", "p", "-q").returncode == 0


def test_a_part_names_every_row_when_arrow_caps_its_row_groups(tmp_path: Path) -> None:
    """Hostile review: row_group_rows above Arrow's 64 Mi cap. The footer counted
    ceil(rows / row_group_rows) row groups where Arrow had written more, and publishing copied
    only those: a 67.2 M-row result published 67,108,864 rows, and the run succeeded."""
    rows = MAX_ROW_GROUP_ROWS + 91_136
    table = pa.table({"x": pa.nulls(rows, pa.int8())})  # cheap to write: one run of nulls
    part = tmp_path / "part.parquet"
    write_durably(
        with_provenance(table, "chunk", "job"), part, Shape(target_file_bytes=2**30, row_group_rows=10**8)
    )
    ((unit, slices),) = compact.read_slices([part]).items()
    meta = pq.read_metadata(part)  # row groups [67108864, 91136]
    assert sum(meta.row_group(i).num_rows for s in slices for i in range(s.first, s.first + s.count)) == rows
    # and a writer that cuts row groups other than planned fails the part, never publishes part of it
    with pytest.raises(ValueError, match="did not write partition ''"):
        hive._check_units(meta, {"": [0, 1]}, [rows])


def test_row_group_rows_above_what_arrow_writes_is_refused(project: Project) -> None:
    write(project, "a.parquet", range(0, 10))
    project.write_config(JOB.replace("row_group_rows = 64", "row_group_rows = 100000000"))
    result = project.cli("validate")
    assert result.returncode == 2, result.stderr
    assert "row_group_rows: at most 67,108,864" in result.stderr, result.stderr
    assert MAX_ROW_GROUP_ROWS == pq.core._parquet._MAX_ROW_GROUP_SIZE  # Arrow's own limit


@pytest.mark.parametrize("reduce", [False, True], ids=["map", "reduce"])
def test_a_published_partition_lost_from_the_output_is_published_again(
    project: Project, reduce: bool
) -> None:
    """Hostile review: with nothing new to compute a run skipped publishing, so a partition
    removed from the output (a user, a partial restore of the output) stayed missing, and every
    run succeeded with its rows gone. Then (review of the fix) `output_rows_change` compared the
    same result with the hole readers saw, and failed every run."""
    write(project, "a.parquet", range(0, 300))
    reduce_sql = 'reduce_sql = "SELECT * FROM parts"\noutput_rows_change = 0.5\n'
    job = JOB.replace("row_group_rows", reduce_sql + "row_group_rows")
    project.write_config(job if reduce else JOB)
    assert project.cli("run-now", "p", "-q").returncode == 0
    for day in sorted(p for p in project.out("p").iterdir() if p.name.startswith("day="))[1:]:
        shutil.rmtree(day)  # two days of three: a third of the rows left
    again = project.cli("run-now", "p", "-q")
    assert again.returncode == 0, again.stdout + again.stderr
    check_output(project)


def test_output_rows_change_compares_with_the_previous_result_not_with_a_hole(project: Project) -> None:
    """Review: with files lost from a reduce output and new input in the same run, the new
    result (310 rows) was compared with the 100 rows readers still saw, not with the previous
    result's 300: every run failed, and the hole stayed."""
    write(project, "a.parquet", range(0, 300))
    reduce_sql = 'reduce_sql = "SELECT * FROM parts"\noutput_rows_change = 0.5\n'
    project.write_config(JOB.replace("row_group_rows", reduce_sql + "row_group_rows"))
    assert project.cli("run-now", "p", "-q").returncode == 0
    for day in sorted(p for p in project.out("p").iterdir() if p.name.startswith("day="))[1:]:
        shutil.rmtree(day)
    write(project, "b.parquet", range(300, 310))
    again = project.cli("run-now", "p", "-q")
    assert again.returncode == 0, again.stdout + again.stderr
    check_output(project)


MOVING = """
[jobs.r]
input = "data/*.parquet"
output = "out/r"
sql = "SELECT id AS k, day FROM chunk"
reduce_sql = '''SELECT k, count(*)::BIGINT AS n, CASE WHEN k = 3 THEN 'zzz'
                WHEN count(*) >= 3 THEN 'big' ELSE 'small' END AS p FROM parts GROUP BY k'''
partition_by = ["p"]
"""


def reduced(project: Project) -> list[tuple]:
    files = f"{project.out('r')}/p=*/*.parquet"
    return duckdb.sql(
        f"SELECT k, n, p FROM read_parquet('{files}', hive_partitioning = 1) ORDER BY k, p"
    ).fetchall()


@pytest.mark.parametrize("dies", ["before", "after"])
def test_a_partitioned_reduction_is_replaced_whole(
    project: Project, monkeypatch: pytest.MonkeyPatch, dies: str
) -> None:
    """Hostile review: a reduction's partitions were swapped one by one; a row moving between
    partitions (k=1 from p=small to p=big) was in both for a reader during the publication, and
    after a SIGKILL in it until the next run. And a publication refused part-way (a user's file
    where a new partition goes) left the new partitions before it in, a row lost, exit 1."""
    project.data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [1, 1, 2], "day": ["d"] * 3}), project.data / "a.parquet")
    project.write_config(MOVING)
    assert project.cli("run-now", "r", "-q").returncode == 0
    old = [(1, 2, "small"), (2, 1, "small")]
    assert reduced(project) == old
    (project.out("r") / "p=small" / "_NOTES").write_text("a user's")
    pq.write_table(pa.table({"id": [1], "day": ["d"]}), project.data / "b.parquet")  # k=1 moves to big
    real_exchange = compact.exchange
    seen: list[list[tuple]] = []

    def crash(staged: Path, target: Path) -> None:
        seen.append(reduced(project))  # what a reader sees just before the swap
        if dies == "after":
            real_exchange(staged, target)
        raise OSError(28, "No space left on device")  # the process's end, as far as the output knows

    monkeypatch.setattr(compact, "exchange", crash)
    assert project.cli("run-now", "r", "-q").returncode == 1
    assert seen == [old] and reduced(project) == (
        old if dies == "before" else [(1, 3, "big"), (2, 1, "small")]
    )
    monkeypatch.undo()
    notes = project.out("r") / "p=small" / "_NOTES"
    (notes.parent / ".new").write_text("changed after the crash")  # a review: the old copy came back
    os.replace(notes.parent / ".new", notes)
    assert project.cli("run-now", "r", "-q").returncode == 0
    assert reduced(project) == [(1, 3, "big"), (2, 1, "small")]
    assert notes.read_text() == "changed after the crash" and sorted(os.listdir(notes.parent))[0] == "_NOTES"
    if dies == "before":  # nothing was swapped out: nothing comes back (not even beside it)
        assert not (notes.parent / "_NOTES.1").exists()
    # a review: a copy of a published file in a directory of the user's, the output's mode, and
    # a symlink in a partition's place (written through, rows doubled)
    archive = project.out("r") / "_archive"
    archive.mkdir(mode=0o750)
    os.chmod(archive, 0o750)
    shutil.copy(
        next((project.out("r") / "p=big").glob("file-*.parquet")),
        archive / "file-0123456789abcdef01234567.parquet",
    )
    os.chmod(project.out("r"), 0o700)
    elsewhere = project.root / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(project.out("r") / "p=big")
    os.symlink(elsewhere, project.out("r") / "p=big")
    pq.write_table(pa.table({"id": [2], "day": ["d"]}), project.data / "d.parquet")
    linked = project.cli("run-now", "r")
    assert (
        linked.returncode == 1 and "p=big is not a directory minibatch made" in linked.stdout + linked.stderr
    )
    assert list(elsewhere.iterdir()) == []
    (project.out("r") / "p=big").unlink()
    assert project.cli("run-now", "r", "-q").returncode == 0
    assert reduced(project) == [(1, 3, "big"), (2, 2, "small")]
    assert [p.name for p in archive.iterdir()] == ["file-0123456789abcdef01234567.parquet"]
    assert os.stat(project.out("r")).st_mode & 0o777 == 0o700 and os.stat(archive).st_mode & 0o777 == 0o750
    # a user's file where a new partition goes: refused before anything is replaced
    (project.out("r") / "p=zzz").write_text("my notes")
    pq.write_table(pa.table({"id": [3, 2], "day": ["d"] * 2}), project.data / "c.parquet")
    refused = project.cli("run-now", "r")
    assert (
        refused.returncode == 1
        and "p=zzz is not a directory minibatch made" in refused.stdout + refused.stderr
    )
    assert reduced(project) == [(1, 3, "big"), (2, 2, "small")]
    assert [p.name for p in project.out("r").parent.glob(".r.minibatch-staging/*")] == ["minibatch-owner"]


def limited_run(project: Project, *setpriv: str) -> Callable[[], subprocess.CompletedProcess[str]]:
    """`run-now p` as a process setpriv starts (root without some of its powers, or in a group)."""
    config = str(project.root / "config.toml")
    argv = ["setpriv", *setpriv, sys.executable, "-m", "minibatch", "--config", config, "run-now", "p"]
    return lambda: subprocess.run(argv, capture_output=True, text=True, env=project.env(), timeout=120)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops root's bypass of modes")
def test_a_partition_read_only_for_a_while_blocks_nothing_after(project: Project) -> None:
    """A review: a partition the user made read-only failed a run (as it must), but the unit
    minibatch had staged kept that mode, so later runs failed on it for good ('File exists'),
    after the user had made the partition writable again: readers missed rows. Run without
    the capabilities that let root ignore modes, as any other user would."""
    write(project, "a.parquet", range(0, 100), days=1, regions=["eu"])
    project.write_config(JOB)
    run = limited_run(project, "--bounding-set=-dac_override,-dac_read_search,-fowner")
    assert run().returncode == 0
    unit = project.out("p") / "day=2026-11-01" / "region=eu"
    os.chmod(unit, 0o555)
    write(project, "b.parquet", range(1000, 1100), days=1, regions=["eu"])
    assert run().returncode == 1  # its partition may not be replaced: the run says so
    os.chmod(unit, 0o755)
    again = run()
    assert again.returncode == 0, again.stdout + again.stderr
    assert {i for ids in by_pyarrow(project.out("p")).values() for i in ids} == {
        *range(100),
        *range(1000, 1100),
    }


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops root's right to chown")
def test_a_replaced_partition_keeps_its_group_where_its_owner_cannot_be_kept(project: Project) -> None:
    """A review: a team member's run (in the partition's group, not its owner) swapped in a
    partition of its own group: the owner, in the group, could no longer write it. The owner
    cannot be given away without privilege, the group can."""
    write(project, "a.parquet", range(0, 100), days=1, regions=["eu"])
    project.write_config(JOB)
    run = limited_run(project, "--groups=5000", "--bounding-set=-chown")
    assert run().returncode == 0
    unit = project.out("p") / "day=2026-11-01" / "region=eu"
    os.chown(unit, 1234, 5000)
    os.chmod(unit, 0o770)
    write(project, "b.parquet", range(1000, 1100), days=1, regions=["eu"])
    again = run()
    assert again.returncode == 0, again.stdout + again.stderr
    assert (os.stat(unit).st_gid, os.stat(unit).st_mode & 0o777) == (5000, 0o770)


@pytest.mark.parametrize(
    "query", ["sql = 'SELECT day FROM chunk'", "reduce_sql = 'SELECT DISTINCT day FROM parts'"]
)
def test_a_result_of_only_partition_columns_fails_and_publishes_nothing(project: Project, query: str) -> None:
    """Hostile review: `SELECT day` partitioned by day published files with no column and no
    row ("80,000 out", exit 0; DuckDB cannot read them). Its values are only directory names:
    the chunk (or the reduce) fails, saying so."""
    write(project, "a.parquet", range(300))
    body = JOB.replace('partition_by = ["day", "region"]', 'partition_by = ["day"]')
    project.write_config(
        body.replace('sql = "SELECT * FROM chunk"', query) if query.startswith("sql") else body + query
    )
    result = project.cli("run-now", "p")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "only partition_by columns (day)" in result.stdout + result.stderr
    assert not list(project.out("p").rglob("*.parquet"))
