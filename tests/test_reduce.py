"""reduce_sql's input: DuckDB reads the part files itself where that gives the columns a pyarrow
dataset of them would (and imports neither pyarrow's dataset module nor, through it, pandas);
otherwise, and for paths DuckDB could glob, the dataset."""

from __future__ import annotations

import datetime
import decimal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from minibatch.reduce import ReduceStopped, _native_parts, reduce_table

COMMON = {
    "i": pa.array([1, 2, None], pa.int64()),
    "u": pa.array([1, 2, 3], pa.uint8()),
    "f": pa.array([0.5, None, 2.0]),
    "s": pa.array(["a", None, "ü"]),
    "d": pa.array(["x", "y", "x"]).dictionary_encode(),
    "day": pa.array([datetime.date(2026, 11, 1), None, datetime.date(1970, 1, 1)]),
    "ts": pa.array(
        [datetime.datetime(2026, 3, 29, 1, 30), None, datetime.datetime(1969, 12, 31)],
        pa.timestamp("us", tz="Europe/Berlin"),
    ),  # fmt: skip
    "amount": pa.array([decimal.Decimal("1.25"), None, decimal.Decimal("-3.10")], pa.decimal128(10, 2)),
    "tags": pa.array([[1, 2], [], None]),
    "point": pa.array([{"x": 1, "y": "a"}, None, {"x": 3, "y": None}]),
    "raw": pa.array([b"\x00", None, b"xy"]),
    "ok": pa.array([True, None, False]),
}
DIVERGENT = {  # the Arrow schema in the file restores these; DuckDB's own reader does not
    "wait": pa.array([1, 2, None], pa.duration("ms")),
    "at": pa.array([1, None, 3], pa.timestamp("s")),
}


def parts(directory: Path, columns: dict[str, pa.Array]) -> list[Path]:
    directory.mkdir(parents=True)
    table = pa.table({"n": pa.array([0, 1, 2]), **columns})
    paths = [directory / f"part-{k}.parquet" for k in range(2)]
    for k, path in enumerate(paths):
        pq.write_table(table.set_column(0, "n", pa.array([3 * k, 3 * k + 1, 3 * k + 2])), path)
    return paths


def through_dataset(sql: str, paths: list[Path]) -> pa.Table:
    con = duckdb.connect()
    con.register("parts", ds.dataset([str(p) for p in paths], format="parquet"))
    return con.sql(sql).to_arrow_table()


@pytest.mark.parametrize(
    ("columns", "native"), [(COMMON, True), (DIVERGENT, False)], ids=["common", "divergent"]
)
def test_the_reduction_sees_what_a_dataset_of_the_parts_shows(tmp_path: Path, columns, native: bool) -> None:
    paths = parts(tmp_path / "out", columns)
    assert _native_parts(duckdb.connect(), paths) is native
    sql = "SELECT * FROM parts ORDER BY n"
    got = reduce_table(sql, paths, None, {})
    assert got.equals(through_dataset(sql, paths))
    assert got.column("n").to_pylist() == [0, 1, 2, 3, 4, 5]


def test_an_output_path_duckdb_would_glob_is_read_as_exact_paths(tmp_path: Path) -> None:
    paths = parts(tmp_path / "out[ab]", {"v": pa.array([1, 2, 3])})
    parts(tmp_path / "outa", {"v": pa.array([100, 200, 300])})  # what `out[ab]` matches as a glob
    assert not _native_parts(duckdb.connect(), paths)
    assert reduce_table("SELECT sum(v) AS v FROM parts", paths, None, {}).to_pylist() == [{"v": 12}]


def test_reducing_common_types_does_not_import_pandas(tmp_path: Path) -> None:
    """Importing pyarrow's dataset module imports pandas where it is installed (0.3-0.5 s at
    the end of every reduce run): the coordinator reads ordinary parts without it."""
    pytest.importorskip("pandas")
    paths = parts(tmp_path / "out", COMMON)
    files = [str(p) for p in paths]
    code = (
        "import sys; from pathlib import Path; from minibatch.reduce import reduce_table; "
        f"reduce_table('SELECT count(*) FROM parts', [Path(p) for p in {files!r}], None, {{}}); "
        "print(sorted(m for m in ('pandas', 'pyarrow.dataset') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("where", ["isnan(x)", "x > 5", "x <> 1", "NOT (x <= 2)"])
def test_nan_rows_reach_the_reduction(tmp_path: Path, where: str) -> None:
    """Parquet's min/max statistics leave NaN out: pruning by them lost the NaN rows."""
    paths = parts(tmp_path / "out", {"x": pa.array([1.0, float("nan"), 2.0])})
    assert _native_parts(duckdb.connect(), paths)
    sql = f"SELECT n, x FROM parts WHERE {where} ORDER BY n"
    got = reduce_table(sql, paths, None, {})
    assert repr(got.to_pylist()) == repr(through_dataset(sql, paths).to_pylist())  # NaN == NaN here
    assert {1, 4} <= set(got.column("n").to_pylist())  # the NaN rows of both parts


def test_a_quote_in_the_output_path_reaches_duckdb_escaped(tmp_path: Path) -> None:
    paths = parts(tmp_path / "it's out", {"v": pa.array([1, 2, 3])})
    assert _native_parts(duckdb.connect(), paths)  # read by DuckDB, the name quoted in its SQL
    assert reduce_table("SELECT sum(v) AS v, count(*) AS n FROM parts", paths, None, {}).to_pylist() == [
        {"v": 12, "n": 6}
    ]


def test_a_stop_interrupts_a_running_reduce(tmp_path: Path) -> None:
    """Hostile review: SIGTERM and SIGINT waited for the whole reduce (17 s against a 3 s
    stop_grace) and the run ended as succeeded; a stop now interrupts DuckDB's query."""
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"v": [1]}), path)
    slow = "SELECT v, (SELECT sum(x % 7) FROM range(20000000000) t(x)) AS pad FROM parts"  # minutes
    asked = time.monotonic() + 0.3
    with pytest.raises(ReduceStopped):
        reduce_table(slow, [path], None, {}, stop=lambda: time.monotonic() > asked)
    assert time.monotonic() - asked < 5
