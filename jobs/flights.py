"""Example job functions for config.toml. Each is called as `function(table, ctx)` per chunk."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def delays(table: pa.Table, ctx: Any) -> pa.Table:
    """Per chunk: sum and count of departure delays per carrier and day (reduce_sql averages)."""
    grouped = table.group_by(["carrier", "day"]).aggregate([("dep_delay", "sum"), ("dep_delay", "count")])
    return grouped.rename_columns(["carrier", "day", "delay_sum", "flights"])


def long_haul(table: pa.Table, ctx: Any) -> pa.Table:
    """A map job: flights over 2,000 miles, with the delay in hours."""
    far = table.filter(pc.greater(table["distance"], 2000))
    return far.append_column("delay_hours", pc.divide(far["dep_delay"], 60.0))
