"""Every engine's output is checked against an answer computed independently with DuckDB.

A check returns None when the output is right, else a message saying what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.jobs import TAX
from bench.queries import Q1_KEYS, Q1_VALUES, q1_over_files

REL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Expected:
    """The answer for one workload: a Q1 table, or a few aggregates over the output."""

    kind: str
    q1: pa.Table | None = None
    aggregates: tuple[float, ...] = ()


def _files_sql(files: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def expected_for(kind: str, files: tuple[str, ...], row_groups: int) -> Expected:
    con = duckdb.connect(":memory:")
    try:
        if kind == "q1":
            return Expected(kind, q1=con.sql(q1_over_files(list(files))).to_arrow_table())
        source = f"read_parquet({_files_sql(files)})"
        if kind in ("map", "mem"):
            sql = f"SELECT count(*), sum(amount * {TAX!r}::DOUBLE) FROM {source} WHERE amount > 0"
        elif kind == "udf":
            return Expected(kind, aggregates=(row_groups, _scalar(con, f"SELECT count(*) FROM {source}")))
        else:
            sql = f"SELECT count(*), sum(id) FROM {source}"
        return Expected(kind, aggregates=tuple(float(v) for v in con.execute(sql).fetchone() or ()))
    finally:
        con.close()


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> float:
    row = con.execute(sql).fetchone()
    return float(row[0]) if row else math.nan


def check(expected: Expected, out_dir: Path) -> str | None:
    files = sorted(str(p) for p in out_dir.rglob("*.parquet"))
    if not files:
        return f"no Parquet output in {out_dir}"
    if expected.kind == "q1":
        return check_q1(expected.q1, pq.read_table(files[0]) if len(files) == 1 else None)
    columns = {
        "map": "count(*), sum(amount_taxed)",
        "mem": "count(*), sum(amount_taxed)",
        "udf": "count(*), sum(rows)",
        "identity": "count(*), sum(id)",
        "fixed": "count(*), sum(id)",
    }[expected.kind]
    con = duckdb.connect(":memory:")
    try:
        got = con.execute(f"SELECT {columns} FROM read_parquet({_files_sql(files)})").fetchone() or ()
    finally:
        con.close()
    if all(_close(float(g), e) for g, e in zip(got, expected.aggregates, strict=True)):
        return None
    return f"{columns} = {tuple(got)}, expected {expected.aggregates}"


def udf_checksum(out_dir: Path) -> int:
    """Sum of the per-chunk hashes: equal across engines when every engine chunked alike."""
    return _output_sum(out_dir, "checksum")


def rows_fingerprint(out_dir: Path) -> int:
    """Sum of a hash of every output row: equal when two outputs hold the same rows, in any files."""
    return _output_sum(out_dir, "hash(t)")


def _output_sum(out_dir: Path, expression: str) -> int:
    files = sorted(str(p) for p in out_dir.rglob("*.parquet"))
    con = duckdb.connect(":memory:")
    try:
        row = con.execute(f"SELECT sum({expression}) FROM read_parquet({_files_sql(files)}) t").fetchone()
    finally:
        con.close()
    return int(row[0]) if row and row[0] is not None else 0


def check_q1(expected: pa.Table | None, got: pa.Table | None) -> str | None:
    """Same groups in the same order; every value within REL_TOLERANCE (relative) of DuckDB's."""
    if expected is None or got is None:
        return "expected exactly one result file"
    missing = [c for c in (*Q1_KEYS, *Q1_VALUES) if c not in got.column_names]
    if missing:
        return f"result lacks columns {missing}"
    want_keys, got_keys = _keys(expected), _keys(got)
    if want_keys != got_keys:
        return f"groups {got_keys}, expected {want_keys}"
    for name in Q1_VALUES:
        want = pc.cast(expected[name], pa.float64()).to_pylist()
        have = pc.cast(got[name], pa.float64()).to_pylist()
        for key, w, h in zip(want_keys, want, have, strict=True):
            if not _close(h, w):
                return f"{name} of {key} is {h}, expected {w}"
    return None


def _keys(table: pa.Table) -> list[tuple[str, ...]]:
    columns = [pc.cast(table[k], pa.string()).to_pylist() for k in Q1_KEYS]
    return list(zip(*columns, strict=True))


def _close(got: float | None, want: float | None) -> bool:
    if got is None or want is None:
        return got is want
    return math.isclose(got, want, rel_tol=REL_TOLERANCE, abs_tol=1e-9)
