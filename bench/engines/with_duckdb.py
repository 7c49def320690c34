"""Baseline: DuckDB over the files directly, with threads = the worker count."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from bench.engines.spec import Spec
from bench.jobs import TAX
from bench.queries import q1_over_files


def run(spec: Spec) -> None:
    con = duckdb.connect(":memory:", config={"threads": spec.workers})
    try:
        if spec.kind == "q1":
            Path(spec.out).mkdir(parents=True, exist_ok=True)
            pq.write_table(con.sql(q1_over_files(spec.files)).to_arrow_table(), spec.result_path)
        elif spec.kind == "map":
            Path(spec.out).parent.mkdir(parents=True, exist_ok=True)
            con.execute(_copy_map_light(spec))
        else:
            raise ValueError(f"no DuckDB version of {spec.kind!r}")
    finally:
        con.close()


def _copy_map_light(spec: Spec) -> str:
    listed = ", ".join(_quote(f) for f in spec.files)
    return (
        f"COPY (SELECT *, amount * {TAX!r}::DOUBLE AS amount_taxed FROM read_parquet([{listed}]) "
        f"WHERE amount > 0) TO {_quote(spec.out)} (FORMAT parquet, PER_THREAD_OUTPUT)"
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
