"""`reduce_sql` over every chunk result of a job, published as one file atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.layout import PART_RE, OutputLayout, fsync_dir, write_atomically
from minibatch.params import sql_values

if TYPE_CHECKING:
    import pyarrow as pa


def reduce_parts(
    sql: str, parts: list[Path], layout: OutputLayout, empty: pa.Schema | None, params: dict[str, Any]
) -> int:
    """Run `sql` with the parts as table `parts`; replace the job's output with the result.

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
        result = con.sql(sql, params=sql_values(sql, params)).to_arrow_table()
    finally:
        con.close()
    target = layout.reduced
    write_atomically(result, target, layout.staging)
    for other in layout.output.iterdir():
        if PART_RE.match(other.name):  # a map job's parts, from before reduce_sql was set
            other.unlink(missing_ok=True)
    fsync_dir(layout.output)
    return int(result.num_rows)


def reduce_key(sql: str, definition: str, parts: list[Path]) -> str:
    """What a reduction is built from: the SQL, the job's definition and the part files."""
    files = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(parts)]
    text = "\n".join([sql, definition, *files])
    return hashlib.sha256(text.encode()).hexdigest()
