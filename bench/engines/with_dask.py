"""Baseline: dask.dataframe on a distributed.LocalCluster of N single-threaded worker processes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, LocalCluster

from bench import jobs
from bench.engines.spec import Spec
from bench.queries import Q1_KEYS, Q1_SHIPDATE_MAX

UDF_META = pd.DataFrame({c: pd.Series(dtype="int64") for c in ("first_id", "rows", "checksum")})


@contextmanager
def cluster(workers: int) -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as local,
        Client(local) as client,
    ):
        yield client


def run(spec: Spec) -> None:
    with cluster(spec.workers):
        if spec.kind == "q1":
            Path(spec.out).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(_q1(spec), preserve_index=False), spec.result_path)
        elif spec.kind == "map":
            _map_light(spec)
        elif spec.kind == "udf":
            _udf(spec)
        elif spec.kind == "identity":
            _by_row_group(spec).to_parquet(spec.out, write_index=False)
        else:
            raise ValueError(f"no Dask version of {spec.kind!r}")


def _by_row_group(spec: Spec) -> dd.DataFrame:
    """One partition per row group, as the other engines chunk these workloads.

    Every column is read: Dask fuses the partitions of a column projection into bigger ones
    (FusedParquetIO), which would change the chunking; the UDF projects inside instead.
    """
    return dd.read_parquet(spec.files, split_row_groups=True)


def _q1(spec: Spec) -> pd.DataFrame:
    df = dd.read_parquet(spec.files, columns=spec.columns)
    df = df[df.l_shipdate <= Q1_SHIPDATE_MAX]
    decimals = ["l_quantity", "l_extendedprice", "l_discount", "l_tax"]
    df = df.assign(**{c: df[c].astype("float64") for c in decimals})
    df = df.assign(disc_price=df.l_extendedprice * (1 - df.l_discount))
    df = df.assign(charge=df.disc_price * (1 + df.l_tax))
    result = (
        df.groupby(list(Q1_KEYS))
        .agg(
            sum_qty=("l_quantity", "sum"),
            sum_base_price=("l_extendedprice", "sum"),
            sum_disc_price=("disc_price", "sum"),
            sum_charge=("charge", "sum"),
            avg_qty=("l_quantity", "mean"),
            avg_price=("l_extendedprice", "mean"),
            avg_disc=("l_discount", "mean"),
            count_order=("l_quantity", "count"),
        )
        .compute()
    )
    return result.reset_index().sort_values(list(Q1_KEYS))


def _map_light(spec: Spec) -> None:
    df = _by_row_group(spec)
    df = df[df.amount > 0]
    df.assign(amount_taxed=df.amount * jobs.TAX).to_parquet(spec.out, write_index=False)


def _udf(spec: Spec) -> None:
    df = _by_row_group(spec)
    udf = df.map_partitions(_udf_partition, spec.columns, spec.udf_rows, meta=UDF_META)
    udf.to_parquet(spec.out, write_index=False)


def _udf_partition(part: pd.DataFrame, columns: list[str] | None, rows: int) -> pd.DataFrame:
    part = part[columns] if columns else part
    result = jobs.udf_heavy(pa.Table.from_pandas(part, preserve_index=False), rows=rows)
    return UDF_META if result is None else result.to_pandas()
