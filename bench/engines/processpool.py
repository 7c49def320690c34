"""Baseline: concurrent.futures.ProcessPoolExecutor, one task per (file, row group).

Each task reads its row group itself (only the path and the row group index cross the pipe),
as minibatch's workers do.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq

from bench.engines import tasks
from bench.engines.spec import Spec


def run(spec: Spec) -> None:
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    groups = tasks.row_groups(spec.files)
    indexes, paths, numbers = zip(*groups, strict=True)
    with ProcessPoolExecutor(max_workers=spec.workers) as pool:
        if spec.kind == "q1":
            partials = list(pool.map(partial(tasks.q1_task, columns=spec.columns), paths, numbers))
            pq.write_table(tasks.q1_finish(partials), spec.result_path)
        else:
            list(pool.map(partial(tasks.map_task, spec), indexes, paths, numbers))
