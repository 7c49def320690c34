"""The output's schema across runs and chunks, where Parquet or the environment blur a type:
a result is judged against the schema a part gives back, each part's columns are nullable,
and a result staged before the schema was decided is computed again to it, not charged."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import Project

DRIFT = '''
import datetime, time
import pyarrow as pa
from myjobs.testenv import get as env

def typed(table, ctx):
    """Types a Parquet file gives back otherwise: timestamp[s], date64, time32[s]; a zone; in lists too."""
    n, ids, zone = table.num_rows, table["id"], env("MB_ZONE", "UTC")
    return pa.table({
        "id": ids,
        "at": pa.array([datetime.datetime(2026, 11, 1, 10)] * n, pa.timestamp("s")),
        "day": pa.array([datetime.date(2026, 11, 1)] * n, pa.date64()),
        "t": pa.array([datetime.time(10, 0, 1)] * n, pa.time32("s")),
        "z": pa.array([datetime.datetime(2026, 11, 1, 10)] * n, pa.timestamp("us", zone)),
        "zs": pa.array([[datetime.datetime(2026, 11, 1)]] * n, pa.list_(pa.timestamp("us", zone))),
        "days": pa.array([[20393 * 86400000 + 3600000]] * n, pa.list_(pa.date64())),  # 01:00: cut to the day
    })

def strict(table, ctx):
    """A not-null column in the first file's part, nulls in the second's."""
    ids = table["id"]
    kind = pa.field("k", pa.int64(), nullable=not ctx.file.endswith("a.parquet"))
    keys = ids if not kind.nullable else pa.array([None] * len(ids), pa.int64())
    return pa.Table.from_arrays([ids, keys], schema=pa.schema([("id", pa.int64()), kind]))

def late(table, ctx):
    """The first file's chunk is slow and typed; the second's all null, Arrow typing it null."""
    first = ctx.file.endswith("a.parquet")
    time.sleep(1.0 if first else 0)
    values = table["id"].to_pylist() if first else [None] * table.num_rows
    return pa.table({"id": table["id"], "c": values})
'''


def job(function: str, extra: str = "") -> str:
    return f"""
    [jobs.d]
    input = "data/*.parquet"
    output = "out/d"
    process = "myjobs.drift:{function}"
    {extra}
    """


def ids(project: Project) -> list[int]:
    return sorted(pq.read_table(project.out("d"))["id"].to_pylist())


def test_a_type_parquet_gives_back_otherwise_passes_the_next_runs(project: Project) -> None:
    """Hostile review: the output's schema is read back from a part, where timestamp[s] is
    timestamp[ms] and date64 date32: every later chunk was dead-lettered (SchemaMismatch), the
    run after exited 0 without its rows. A zone named `Etc/UTC` in one environment and `UTC`
    in another did the same."""
    (project.root / "myjobs" / "drift.py").write_text(DRIFT)
    project.write_config(job("typed"))
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "d", env={"MB_ZONE": "Etc/UTC"}).returncode == 0
    project.write_input("b.parquet", 100, 100)
    result = project.cli("run-now", "d", env={"MB_ZONE": "UTC"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert ids(project) == list(range(200))
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in project.out("d").glob("*.parquet")}
    assert len(schemas) == 1, schemas


def test_every_part_is_nullable(project: Project) -> None:
    """Hostile review: a part with a not-null column beside one with nulls there: pyarrow took
    the first part's schema and said `not null` of a column holding nulls."""
    (project.root / "myjobs" / "drift.py").write_text(DRIFT)
    project.write_config(job("strict"))
    project.write_input("a.parquet", 0, 100)
    project.write_input("b.parquet", 100, 100)
    assert project.cli("run-now", "d").returncode == 0
    assert all(f.nullable for p in project.out("d").glob("*.parquet") for f in pq.read_schema(p))


def test_a_result_staged_before_the_schema_was_known_is_computed_again_uncharged(project: Project) -> None:
    """Hostile review: a chunk whose all-null column Arrow typed `null`, staged while an
    earlier chunk (in plan order) was still deciding the schema, failed SchemaMismatch once it
    was decided; with retries = 0 it was dead-lettered and its rows left out."""
    (project.root / "myjobs" / "drift.py").write_text(DRIFT)
    project.write_config(job("late", "retries = 0"))
    project.write_input("a.parquet", 0, 100)
    project.write_input("b.parquet", 100, 100)
    result = project.cli("run-now", "d")
    assert result.returncode == 0, result.stdout + result.stderr
    table = pq.read_table(project.out("d"))
    assert table.schema.field("c").type == pa.int64() and ids(project) == list(range(200))
