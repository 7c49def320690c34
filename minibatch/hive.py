"""Hive-style output units: how rows are laid out when a job has `partition_by` or
`target_file_bytes` (see compact.py, which publishes them).

A unit is a directory of the output that is replaced as a whole: one partition
(`date=2026-11-01/region=eu`), or the output itself when a job is not partitioned. Workers
write a chunk's result as one part whose row groups are grouped by unit (the footer says
which row groups hold which unit), so a chunk with thousands of partition values still has
one writer open, and the publisher reads one unit's rows of a part without the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from minibatch.checking import Checker, positive_size

if TYPE_CHECKING:
    import pyarrow as pa

NULL_VALUE = "__HIVE_DEFAULT_PARTITION__"  # what Hive, Spark, pyarrow and DuckDB read as NULL
UNITS_KEY = b"minibatch.units"  # a part's footer: unit -> [first row group, row groups]
SOURCES_KEY = b"minibatch.sources"  # a published file's footer: the chunk results it holds
FILE_RE = re.compile(r"^file-[0-9a-f]{24}\.parquet$")  # a published file's name
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}")  # fullmatch; no leading `_`: pyarrow skips `_x=1/`
SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
DEFAULT_TARGET = 128 * 2**20
DEFAULT_ROW_GROUP = 122_880  # DuckDB's row group size: readers parallelise over row groups
MAX_ROW_GROUP_ROWS = 64 * 1024 * 1024  # Arrow's writer cuts a longer row group in two


@dataclass(frozen=True)
class Shape:
    """How a job's output is laid out; the default (no key set) is a part per chunk."""

    partition_by: tuple[str, ...] = ()
    target_file_bytes: int | None = None
    row_group_rows: int = DEFAULT_ROW_GROUP

    @property
    def published(self) -> bool:
        """Rows reach readers through units the publisher replaces, not part by part."""
        return bool(self.partition_by) or self.target_file_bytes is not None

    @property
    def target(self) -> int:
        return self.target_file_bytes or DEFAULT_TARGET

    def of_parts(self, reduce_sql: str | None) -> Shape:
        """How a chunk's part is written: by unit where parts are published, whole where
        reduce_sql reads them (partition_by then partitions the reduce's result)."""
        return Shape() if reduce_sql else self

    def facts(self) -> dict[str, Any]:
        """What a chunk's part depends on (its row groups are split by unit)."""
        return {"partition_by": list(self.partition_by)} if self.published else {}


def parse_shape(c: Checker) -> Shape:
    partition_by = c.string_list("partition_by") or ()
    for column in partition_by:  # DuckDB does not decode escaped names: none to escape
        if not NAME_RE.fullmatch(column):
            c.error(
                "partition_by",
                f"{column!r}: partition columns need plain names ([A-Za-z][A-Za-z0-9_]*: pyarrow's "
                "dataset reader skips directories whose names start with `_`)",
            )
    if len(set(partition_by)) != len(partition_by):
        c.error("partition_by", "names a column twice")
    target = positive_size(c, "target_file_bytes", DEFAULT_TARGET) if "target_file_bytes" in c.table else None
    row_group_rows = c.positive_int("row_group_rows", DEFAULT_ROW_GROUP)
    if row_group_rows > MAX_ROW_GROUP_ROWS:
        c.error(
            "row_group_rows", f"at most {MAX_ROW_GROUP_ROWS:,} (the most rows Arrow writes in one row group)"
        )
    return Shape(partition_by, target, min(row_group_rows, MAX_ROW_GROUP_ROWS))


def escape(value: str | None) -> str:
    """A partition value as a directory name: every byte outside [A-Za-z0-9_-] as %XX (as
    Hive escapes, and as pyarrow's and DuckDB's hive readers decode); NULL as Hive's default
    partition. As in Hive and Spark, "" and the default partition's name are NULL too (the
    readers disagree on them otherwise: pyarrow reads `k=` as NULL, DuckDB as '')."""
    if not value or value == NULL_VALUE:
        return NULL_VALUE
    return "".join(ch if ch in SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value)


def unit_of(columns: tuple[str, ...], values: list[str | None]) -> str:
    unit = "/".join(f"{column}={escape(value)}" for column, value in zip(columns, values, strict=True))
    if any(len(part) > 255 for part in unit.split("/")):
        raise PartitionError(f"partition directory too long for a file system: {unit[:80]}...")
    return unit


def nullable(table: pa.Table) -> pa.Table:
    """`table` with every column nullable: parts may differ in nullability only (a not-null
    field in one chunk's result, nulls in another's), and readers take one part's for all."""
    import pyarrow as pa

    if all(field.nullable for field in table.schema):
        return table
    schema = pa.schema([field.with_nullable(True) for field in table.schema])
    return table.cast(schema.with_metadata(table.schema.metadata or {}))


class PartitionError(ValueError):
    """A result that cannot be partitioned as configured: every chunk's would fail alike."""


def split_units(table: pa.Table, columns: tuple[str, ...]) -> list[tuple[str, pa.Table]]:
    """The rows of `table` by unit, in unit order (vectorised: sort, then find the runs)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not columns:
        return [("", table)]
    if set(table.column_names) <= set(columns):  # its files would have no column (Spark refuses too)
        raise PartitionError(
            f"the result has only partition_by columns ({', '.join(table.column_names)}): their values "
            "go in directory names, so its files would hold no column and no row; add a column"
        )
    if not table.num_rows:
        return []
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PartitionError(f"partition_by column {missing[0]!r} is not in the result {table.column_names}")
    for column in columns:  # DuckDB's names are case-insensitive: its hive read would take them as one
        if pa.types.is_nested(kind := table.schema.field(column).type):
            raise PartitionError(f"partition_by column {column!r} is {kind}: a directory names one value")
        if twin := [n for n in table.column_names if n != column and n.lower() == column.lower()]:
            raise PartitionError(f"partition_by column {column!r} and column {twin[0]!r} differ only in case")
    keys = [_text(table[c]) for c in columns]
    order = pc.sort_indices(
        pa.table({str(i): k for i, k in enumerate(keys)}),
        sort_keys=[(str(i), "ascending") for i in range(len(keys))],  # NULLs last
    )
    table = table.take(order)
    keys = [k.take(order) for k in keys]
    change = [0]
    if table.num_rows > 1:
        differs: Any = None
        key: Any
        for key in keys:
            filled = pc.fill_null(key, "\0")  # NULL differs from every string, "" too
            step = pc.not_equal(filled.slice(1), filled.slice(0, len(filled) - 1))
            null = pc.is_null(key)
            step = pc.or_(step, pc.not_equal(null.slice(1), null.slice(0, len(key) - 1)))
            differs = step if differs is None else pc.or_(differs, step)
        assert differs is not None
        change += [i + 1 for i in pc.indices_nonzero(differs).to_pylist()]
    bounds = [*change, table.num_rows]
    return [
        (unit_of(columns, [k[start].as_py() for k in keys]), table.slice(start, end - start))
        for start, end in zip(bounds, bounds[1:], strict=False)
    ]


def _text(column: Any) -> Any:
    """A partition column's values as directory text; "" is NULL (see `escape`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.cast(column, pa.string())
    null = pc.is_in(text, pa.array(["", NULL_VALUE]))
    return pc.if_else(null, pa.scalar(None, pa.string()), text)


def write_units(table: pa.Table, shape: Shape, handle: BinaryIO, **options: Any) -> None:
    """A part grouped by unit: each unit's rows in row groups of its own, and the footer's
    UNITS_KEY saying which."""
    import pyarrow.parquet as pq

    units: dict[str, list[int]] = {}
    first = 0
    size = min(shape.row_group_rows, MAX_ROW_GROUP_ROWS)
    slices = split_units(table, shape.partition_by)
    for unit, rows in slices:
        if unit in units:  # two runs of rows in one directory: the footer would lose one
            raise ValueError(f"partition {unit} came out twice when splitting the result")
        count = -(-rows.num_rows // size)
        units[unit] = [first, count]
        first += count
    metadata = dict(table.schema.metadata or {})
    metadata[UNITS_KEY] = json.dumps(units).encode()
    schema = table.schema.with_metadata(metadata)
    with pq.ParquetWriter(handle, schema, **options) as writer:
        for _, rows in slices:
            writer.write_table(rows.replace_schema_metadata(metadata), row_group_size=size)
    _check_units(writer.writer.metadata, units, [rows.num_rows for _, rows in slices])


def _check_units(written: Any, units: dict[str, list[int]], rows: list[int]) -> None:
    """The footer names row groups by unit ahead of writing them: that the writer wrote the
    row groups counted is checked, since publishing copies only those (rows past them would be
    lost without a word)."""
    groups = [written.row_group(i).num_rows for i in range(written.num_row_groups)]
    for (unit, (first, count)), expected in zip(units.items(), rows, strict=True):
        if sum(groups[first : first + count]) != expected:
            raise ValueError(f"the Parquet writer did not write partition {unit!r} in the row groups planned")
    if sum(groups) != sum(rows):
        raise ValueError("the Parquet writer wrote rows outside the row groups planned")


def units_of(metadata: dict[bytes, bytes] | None) -> dict[str, tuple[int, int]]:
    raw = (metadata or {}).get(UNITS_KEY)
    if raw is None:
        raise ValueError("its footer does not say which rows belong to which partition")
    return {unit: (int(a), int(b)) for unit, (a, b) in json.loads(raw).items()}
