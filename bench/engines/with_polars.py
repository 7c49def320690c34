"""Baseline: Polars lazy scans (the harness sets POLARS_MAX_THREADS to the worker count)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from bench.engines.spec import Spec
from bench.jobs import TAX
from bench.queries import Q1_COLUMNS, Q1_KEYS, Q1_SHIPDATE_MAX


def run(spec: Spec) -> None:
    if spec.kind == "q1":
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        _q1(spec.files).collect().write_parquet(spec.result_path)
    elif spec.kind == "map":
        _map_light(spec)
    else:
        raise ValueError(f"no Polars version of {spec.kind!r}")


def _q1(files: list[str]) -> pl.LazyFrame:
    qty, price, disc, tax = (pl.col(c) for c in ("l_quantity", "l_extendedprice", "l_discount", "l_tax"))
    decimals = ["l_quantity", "l_extendedprice", "l_discount", "l_tax"]
    return (
        pl.scan_parquet(files)
        .select(Q1_COLUMNS)
        .filter(pl.col("l_shipdate") <= Q1_SHIPDATE_MAX)
        .with_columns(pl.col(decimals).cast(pl.Float64))
        .group_by(Q1_KEYS)
        .agg(
            sum_qty=qty.sum(),
            sum_base_price=price.sum(),
            sum_disc_price=(price * (1 - disc)).sum(),
            sum_charge=(price * (1 - disc) * (1 + tax)).sum(),
            avg_qty=qty.mean(),
            avg_price=price.mean(),
            avg_disc=disc.mean(),
            count_order=pl.len(),
        )
        .sort(Q1_KEYS)
    )


def _map_light(spec: Spec) -> None:
    (
        pl.scan_parquet(spec.files)
        .filter(pl.col("amount") > 0)
        .with_columns((pl.col("amount") * TAX).alias("amount_taxed"))
        .sink_parquet(
            pl.PartitionBy(spec.out, max_rows_per_file=spec.rows_per_file),
            compression="snappy",
            mkdir=True,
        )
    )
