"""Per row group work shared by the plain baselines (a pyarrow loop and a ProcessPoolExecutor)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import jobs
from bench.engines.spec import Spec
from bench.queries import Q1_KEYS, Q1_SHIPDATE_MAX

Q1_SUMS = ("l_quantity", "l_extendedprice", "disc_price", "charge", "l_discount")


def row_groups(files: list[str]) -> list[tuple[int, str, int]]:
    """(file index, path, row group) for every row group, from the footers."""
    return [
        (index, path, group)
        for index, path in enumerate(files)
        for group in range(pq.read_metadata(path).num_row_groups)
    ]


def apply(spec: Spec, table: pa.Table, index: int, group: int) -> int:
    """Run the workload's job function on one row group and write its result; rows written."""
    if spec.kind == "map":
        result = jobs.map_light(table)
    elif spec.kind == "udf":
        result = jobs.udf_heavy(table, rows=spec.udf_rows)
    elif spec.kind == "identity":
        result = jobs.identity(table)
    else:
        raise ValueError(f"unknown kind {spec.kind!r}")
    if result is None or result.num_rows == 0:
        return 0
    pq.write_table(result, Path(spec.out) / f"part-{index:04d}-{group:05d}.parquet")
    return result.num_rows


def q1_partial(table: pa.Table) -> pa.Table:
    """Per row group: Q1's sums and counts per (returnflag, linestatus), in float64.

    The keys are cast from string_view to string: pyarrow's filter has no string_view kernel.
    """
    qty, price, disc, tax = (
        pc.cast(table[c], pa.float64()) for c in ("l_quantity", "l_extendedprice", "l_discount", "l_tax")
    )
    disc_price = pc.multiply(price, pc.subtract(1.0, disc))
    work = pa.table(
        {
            "l_returnflag": pc.cast(table["l_returnflag"], pa.string()),
            "l_linestatus": pc.cast(table["l_linestatus"], pa.string()),
            "l_quantity": qty,
            "l_extendedprice": price,
            "disc_price": disc_price,
            "charge": pc.multiply(disc_price, pc.add(1.0, tax)),
            "l_discount": disc,
        }
    )
    work = work.filter(pc.less_equal(table["l_shipdate"], pa.scalar(Q1_SHIPDATE_MAX, pa.date32())))
    aggregations = [(c, "sum") for c in Q1_SUMS] + [("l_quantity", "count")]
    return work.group_by(list(Q1_KEYS)).aggregate(aggregations)


def q1_finish(partials: list[pa.Table]) -> pa.Table:
    """Combine per row group partials into Q1's result, sorted by the keys."""
    sums = [f"{c}_sum" for c in Q1_SUMS] + ["l_quantity_count"]
    combined = pa.concat_tables(partials).group_by(list(Q1_KEYS)).aggregate([(c, "sum") for c in sums])
    count = combined["l_quantity_count_sum"]
    result = pa.table(
        {
            "l_returnflag": combined["l_returnflag"],
            "l_linestatus": combined["l_linestatus"],
            "sum_qty": combined["l_quantity_sum_sum"],
            "sum_base_price": combined["l_extendedprice_sum_sum"],
            "sum_disc_price": combined["disc_price_sum_sum"],
            "sum_charge": combined["charge_sum_sum"],
            "avg_qty": pc.divide(combined["l_quantity_sum_sum"], count),
            "avg_price": pc.divide(combined["l_extendedprice_sum_sum"], count),
            "avg_disc": pc.divide(combined["l_discount_sum_sum"], count),
            "count_order": count,
        }
    )
    return result.sort_by([(k, "ascending") for k in Q1_KEYS])


def q1_task(path: str, group: int, columns: list[str]) -> pa.Table:
    """One ProcessPoolExecutor task: read one row group itself and aggregate it."""
    return q1_partial(pq.ParquetFile(path).read_row_group(group, columns=columns))


def map_task(spec: Spec, index: int, path: str, group: int) -> int:
    """One ProcessPoolExecutor task: read one row group itself, process it, write the result."""
    return apply(spec, pq.ParquetFile(path).read_row_group(group, columns=spec.columns), index, group)
