"""What a job with hidden parts publishes: `reduce_sql` over every chunk result (one file,
or partitions), or the results laid out in partitions and right-sized files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.compact import Published, publish_parts, read_slices
from minibatch.layout import (
    PART_RE,
    OutputLayout,
    fsync_dir,
    with_provenance,
    write_atomically,
    write_durably,
)
from minibatch.params import sql_values

if TYPE_CHECKING:
    import pyarrow as pa


def publish_output(
    sql: str | None,
    layout: OutputLayout,
    parts: list[Path],
    empty: pa.Schema | None,
    params: dict[str, Any],
    key: str,
) -> tuple[int, Published | None]:
    """Publish what readers see of a job whose parts are hidden: the reduction of its parts
    (one file, or partitions), or the parts themselves laid out in units (compact.py).
    Returns the rows reduced (0 without `sql`) and, for units, what the publisher did."""
    if sql is None:
        return 0, publish_parts(layout, read_slices(parts))
    result = reduce_table(sql, parts, empty, params)
    if layout.shape.partition_by:
        staged = layout.staging / f"reduced-{key[:24]}.parquet"
        write_durably(with_provenance(result, key[:24], key), staged, layout.shape)
        try:
            return result.num_rows, publish_parts(layout, read_slices([staged]))
        finally:
            staged.unlink(missing_ok=True)
    write_atomically(result, layout.reduced, layout.staging)
    for other in layout.output.iterdir():
        if PART_RE.match(other.name):  # a map job's parts, from before reduce_sql was set
            other.unlink(missing_ok=True)
    fsync_dir(layout.output)
    return result.num_rows, None


def reduce_table(sql: str, parts: list[Path], empty: pa.Schema | None, params: dict[str, Any]) -> pa.Table:
    """`sql` with the parts as table `parts`.

    The parts reach DuckDB as a pyarrow dataset of exact paths: DuckDB would expand glob
    characters in the output directory's name. With no part, `parts` is an empty table of the
    schema `empty`, so that `SELECT count(*) FROM parts` says 0."""
    import duckdb
    import pyarrow as pa
    import pyarrow.dataset as ds

    if parts:
        table: object = ds.dataset([str(p) for p in parts], format="parquet")
    else:
        table = (empty or pa.schema([("_", pa.null())])).empty_table()
    con = duckdb.connect(":memory:")
    try:
        con.register("parts", table)
        result: pa.Table = con.sql(sql, params=sql_values(sql, params)).to_arrow_table()
        return result
    finally:
        con.close()


def reduce_key(sql: str, definition: str, parts: list[Path]) -> str:
    """What a reduction is built from: the SQL, the job's definition and the part files."""
    files = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(parts)]
    text = "\n".join([sql, definition, *files])
    return hashlib.sha256(text.encode()).hexdigest()
