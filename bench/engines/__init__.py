"""The baseline engines. Each runs in a child process: `python -m bench.engines ENGINE SPEC.json`.

Kept free of heavy imports: the harness reads this registry, the child imports only its engine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Baseline:
    module: str
    requires: tuple[str, ...]
    label: str  # {n} is the worker/thread count

    def missing(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


BASELINES = {
    "duckdb": Baseline("bench.engines.with_duckdb", ("duckdb",), "duckdb ({n} threads)"),
    "polars": Baseline("bench.engines.with_polars", ("polars",), "polars ({n} threads)"),
    "pyarrow": Baseline("bench.engines.serial", ("pyarrow",), "pyarrow loop (1 process)"),
    "processpool": Baseline("bench.engines.processpool", ("pyarrow",), "ProcessPoolExecutor ({n})"),
    "dask": Baseline(
        "bench.engines.with_dask", ("dask", "distributed", "pandas"), "dask LocalCluster ({n}x1)"
    ),
}
