"""Baseline: a plain single-process pyarrow loop over every row group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.engines import tasks
from bench.engines.spec import Spec


def run(spec: Spec) -> None:
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if spec.kind == "q1":
        partials = [tasks.q1_partial(table) for _, _, table in _groups(spec)]
        pq.write_table(tasks.q1_finish(partials), spec.result_path)
        return
    for index, group, table in _groups(spec):
        tasks.apply(spec, table, index, group)


def _groups(spec: Spec) -> Iterator[tuple[int, int, pa.Table]]:
    """(file index, row group, table) for every row group, each file opened once."""
    for index, path in enumerate(spec.files):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield index, group, parquet.read_row_group(group, columns=spec.columns)
