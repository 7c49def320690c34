"""The job functions every engine runs, called as f(table, ctx) -> pyarrow.Table.

Self-contained on purpose: the minibatch engine rows copy this file next to their config.toml
as `benchjobs.py` (with UDF_ROWS set to the calibrated value), and the baselines import it as
`bench.jobs`, so every engine runs exactly the same code.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

UDF_ROWS = 10_000  # strings hashed per chunk by udf_heavy; bench.run substitutes the calibrated value
TAX = 1.2


def map_light(table: pa.Table, ctx: Any = None) -> pa.Table:
    """Keep rows with a positive amount and add the amount with tax."""
    kept = table.filter(pc.greater(table["amount"], 0.0))
    return kept.append_column("amount_taxed", pc.multiply(kept["amount"], TAX))


def identity(table: pa.Table, ctx: Any = None) -> pa.Table:
    return table


def udf_heavy(table: pa.Table, ctx: Any = None, rows: int | None = None) -> pa.Table | None:
    """Pure-Python work: a rolling hash over `rows` strings of the text column (cycled).

    One output row per chunk: its first id, its row count and the hash, so every engine's
    output can be compared.
    """
    rows = UDF_ROWS if rows is None else rows
    n = table.num_rows
    if n == 0:
        return None
    texts = table.column("text").slice(0, min(rows, n)).to_pylist()
    checksum = _rolling_hash(texts, rows)
    return pa.table(
        {
            "first_id": pa.array([table.column("id")[0].as_py()], pa.int64()),
            "rows": pa.array([n], pa.int64()),
            "checksum": pa.array([checksum], pa.int64()),
        }
    )


def _rolling_hash(texts: list[str], rows: int) -> int:
    checksum = 0
    count = len(texts)
    for i in range(rows):
        for char in texts[i % count]:
            checksum = (checksum * 31 + ord(char)) & 0xFFFFFFFF
    return checksum
