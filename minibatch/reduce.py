"""`reduce_sql` over every chunk result of a job, published as one file atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

from minibatch.output import REDUCED_NAME, OutputLayout, fsync_dir, write_atomically


def reduce_parts(sql: str, parts: list[Path], layout: OutputLayout) -> int:
    """Run `sql` with the parts as table `parts`; replace the job's output with the result."""
    import duckdb

    target = layout.output / REDUCED_NAME
    if not parts:
        target.unlink(missing_ok=True)
        return 0
    con = duckdb.connect(":memory:")
    try:
        con.read_parquet([str(p) for p in parts], union_by_name=True).create_view("parts")
        result = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    write_atomically(result, target, layout.staging)
    for other in layout.output.iterdir():
        if other.name != REDUCED_NAME:
            other.unlink(missing_ok=True)
    fsync_dir(layout.output)
    return result.num_rows


def reduce_key(sql: str, parts: list[Path]) -> str:
    """What a reduction is built from: the SQL and the set of part files."""
    text = "\n".join([sql, *sorted(p.name for p in parts)])
    return hashlib.sha256(text.encode()).hexdigest()
