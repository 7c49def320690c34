"""The workload x engine matrix: which engines run what, over which data, chunked how."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from bench import datasets, jobs
from bench.datasets import Dataset, Synthetic
from bench.engines import BASELINES
from bench.queries import Q1_COLUMNS

UDF_TARGET_SECONDS = 0.040
UDF_COLUMNS = ("id", "text")
DASK_EXECUTOR = "minibatch-Nw-dask"  # the engine key of minibatch with executor = "dask"
DASK_WORKLOADS = ("dask_executor_udf", "dask_executor_map", "dask_executor_tiny")


@dataclass(frozen=True)
class Settings:
    workers: int
    runs: int
    quick: bool
    scale_factors: tuple[float, ...]
    data_dir: Path
    timeout: float
    only: tuple[str, ...] = ()  # workload name prefixes; empty: all
    engines: tuple[str, ...] = ()  # engine label prefixes (minibatch-2w, duckdb, ...); empty: all


@dataclass(frozen=True)
class Engine:
    key: str  # minibatch-1w | minibatch-Nw | minibatch-Nw-bounded | minibatch-help | python-* | a baseline
    label: str
    role: str  # mb1 | mbN | baseline | variant | reference

    @property
    def is_minibatch_run(self) -> bool:
        return self.key.startswith("minibatch-") and self.key != "minibatch-help"


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # q1 | map | udf | identity | fixed | mem
    dataset: Dataset | None
    engines: tuple[Engine, ...]
    columns: tuple[str, ...] | None = None
    chunk_bytes: int | None = None  # minibatch's chunk_bytes; None: its default
    unavailable: str | None = None  # why the whole workload cannot run
    what: str = ""
    dask_cluster: bool = False  # runs with a Dask LocalCluster of N workers up (dask_executor_*)

    @property
    def rows(self) -> int:
        return self.dataset.rows if self.dataset else 0

    @property
    def input_bytes(self) -> int:
        return self.dataset.arrow_bytes(self.columns) if self.dataset else 0


@dataclass(frozen=True)
class Calibration:
    rows: int  # strings hashed per chunk
    ms: float  # measured UDF time per chunk at that setting


# -- datasets ---------------------------------------------------------------------------------


def wide_spec(quick: bool) -> Synthetic:
    """8 files x 16 row groups; ~1 GB uncompressed (~69 Parquet bytes per row), ~100 MB quick."""
    return Synthetic(files=8, row_groups_per_file=16, rows_per_group=11_200 if quick else 112_000, seed=1)


def tiny_spec(quick: bool) -> Synthetic:
    """4 files of ~100-row row groups: 2,000 row groups (400 with --quick)."""
    return Synthetic(files=4, row_groups_per_file=100 if quick else 500, rows_per_group=100, seed=2)


ONE_CHUNK = Synthetic(files=1, row_groups_per_file=1, rows_per_group=100, seed=3)


def synthetic(data_dir: Path, prefix: str, spec: Synthetic) -> Dataset:
    name = f"{prefix}-{spec.files}x{spec.row_groups_per_file}x{spec.rows_per_group}"
    return datasets.synthetic(data_dir, name, spec)


# -- engines ----------------------------------------------------------------------------------


def minibatch_engines(workers: int) -> tuple[Engine, ...]:
    one = Engine("minibatch-1w", "minibatch-1w", "mb1")
    if workers == 1:
        return (one,)
    return (one, Engine("minibatch-Nw", f"minibatch-{workers}w", "mbN"))


def baseline(key: str, workers: int) -> Engine:
    return Engine(key, BASELINES[key].label.format(n=workers), "baseline")


def with_baselines(workers: int, keys: tuple[str, ...]) -> tuple[Engine, ...]:
    return minibatch_engines(workers) + tuple(baseline(k, workers) for k in keys)


# -- workloads --------------------------------------------------------------------------------


def one_chunk_per_group(dataset: Dataset, columns: tuple[str, ...] | None = None) -> int:
    """A chunk_bytes that makes every row group its own chunk (no coalescing, no splitting)."""
    sizes = group_bytes(dataset, columns)
    if 2 * min(sizes) <= max(sizes):
        raise ValueError(f"{dataset.name}: row groups too uneven for one chunk per row group")
    return max(sizes)


def group_bytes(dataset: Dataset, columns: tuple[str, ...] | None) -> list[int]:
    """Uncompressed bytes of each row group as minibatch's planner counts them."""
    if columns is None:
        return list(dataset.rg_bytes)
    sizes = []
    for path in dataset.files:
        meta = pq.read_metadata(path)
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            chosen = (group.column(j) for j in range(group.num_columns))
            sizes.append(sum(c.total_uncompressed_size for c in chosen if c.path_in_schema in columns))
    return sizes


def tpch_workloads(settings: Settings) -> list[Workload]:
    engines = with_baselines(settings.workers, ("duckdb", "polars", "pyarrow", "processpool", "dask"))
    out = []
    for sf in settings.scale_factors:
        name = f"tpch_q1_sf{sf:g}"
        dataset = datasets.tpch_lineitem(settings.data_dir, sf) if selected(settings, name) else None
        missing = "tpchgen-cli is not installed" if datasets.tpchgen_path() is None else None
        what = "TPC-H Q1 on lineitem (7 columns); minibatch: chunk SQL + reduce_sql"
        out.append(Workload(name, "q1", dataset, engines, Q1_COLUMNS, None, missing, what))
    return out


def wide_workloads(settings: Settings, calibration: Calibration | None) -> list[Workload]:
    wide = synthetic(settings.data_dir, "wide", wide_spec(settings.quick))
    per_group = one_chunk_per_group(wide)
    keys = ("pyarrow", "processpool", "duckdb", "polars", "dask")
    n = settings.workers
    bounded = Engine("minibatch-Nw-bounded", f"minibatch-{n}w, memory_limit = 2 chunks", "variant")
    return [
        Workload(
            "map_light",
            "map",
            wide,
            with_baselines(n, keys),
            None,
            per_group,
            what="filter amount > 0, add a column, one Parquet file per row group",
        ),
        Workload(
            "udf_heavy",
            "udf",
            wide,
            with_baselines(n, ("pyarrow", "processpool", "dask")),
            UDF_COLUMNS,
            one_chunk_per_group(wide, UDF_COLUMNS),
            what=udf_what(calibration),
        ),
        Workload(
            "mem_bounded",
            "mem",
            wide,
            (Engine("minibatch-Nw", f"minibatch-{n}w, memory_limit large", "mbN"), bounded),
            None,
            per_group,
            what="map_light with memory_limit = chunk_bytes x 2 x 2 versus unbounded",
        ),
    ]


def tiny_workloads(settings: Settings) -> list[Workload]:
    tiny = synthetic(settings.data_dir, "tiny", tiny_spec(settings.quick))
    one = synthetic(settings.data_dir, "one-chunk", ONE_CHUNK)
    references = (
        Engine("minibatch-help", "minibatch --help", "reference"),
        Engine("python-bare", "python -c pass", "reference"),
        Engine("python-imports", "python: import pyarrow.parquet, duckdb", "reference"),
    )
    return [
        Workload(
            "tiny_identity",
            "identity",
            tiny,
            with_baselines(settings.workers, ("pyarrow", "processpool", "dask")),
            None,
            one_chunk_per_group(tiny),
            what=f"identity over {tiny.row_groups:,} row groups of 100 rows, one chunk each",
        ),
        Workload(
            "fixed_cost",
            "fixed",
            one,
            minibatch_engines(settings.workers) + references,
            None,
            None,
            what="run-now of a 1-chunk job (100 rows), whole command; start-up references",
        ),
    ]


def dask_workloads(settings: Settings, calibration: Calibration | None) -> list[Workload]:
    """The same minibatch job with executor = "local" and "dask", side by side."""
    wide = synthetic(settings.data_dir, "wide", wide_spec(settings.quick))
    tiny = synthetic(settings.data_dir, "tiny", tiny_spec(settings.quick))
    n = settings.workers
    engines = (
        Engine("minibatch-Nw", f"minibatch-{n}w, executor = local", "mbN"),
        Engine(DASK_EXECUTOR, f"minibatch-{n}w, executor = dask", "variant"),
    )
    unavailable = None if importlib.util.find_spec("distributed") else "distributed is not installed"
    per_group = one_chunk_per_group(wide)
    cases = (
        ("udf", wide, UDF_COLUMNS, one_chunk_per_group(wide, UDF_COLUMNS), udf_what(calibration)),
        ("map", wide, None, per_group, "map_light: filter, add a column, one Parquet file per row group"),
        ("identity", tiny, None, one_chunk_per_group(tiny), f"identity over {tiny.row_groups:,} tiny chunks"),
    )
    on = f"; executor = local versus dask on a LocalCluster of {n} single-threaded worker processes"
    return [
        Workload(name, kind, data, engines, cols, chunk, unavailable, what + on, dask_cluster=True)
        for name, (kind, data, cols, chunk, what) in zip(DASK_WORKLOADS, cases, strict=True)
    ]


def udf_what(calibration: Calibration | None) -> str:
    if calibration is None:
        return ""
    return (
        f"pure-Python UDF hashing {calibration.rows:,} strings per row group "
        f"(calibrated to {calibration.ms:.0f} ms per row group on this machine)"
    )


def build(settings: Settings, calibration: Calibration | None) -> list[Workload]:
    workloads = tpch_workloads(settings)
    if any(selected(settings, n) for n in ("map_light", "udf_heavy", "mem_bounded")):
        workloads += wide_workloads(settings, calibration)
    if any(selected(settings, n) for n in ("tiny_identity", "fixed_cost")):
        workloads += tiny_workloads(settings)
    if any(selected(settings, n) for n in DASK_WORKLOADS):
        workloads += dask_workloads(settings, calibration)
    return [w for w in workloads if selected(settings, w.name)]


def selected(settings: Settings, name: str) -> bool:
    return not settings.only or any(name.startswith(prefix) for prefix in settings.only)


def needs_calibration(settings: Settings) -> bool:
    return selected(settings, "udf_heavy") or selected(settings, "dask_executor_udf")


# -- UDF calibration --------------------------------------------------------------------------


def calibrate_udf(settings: Settings) -> Calibration:
    """How many strings udf_heavy must hash to take ~40 ms on this machine (cached per machine)."""
    wide = synthetic(settings.data_dir, "wide", wide_spec(settings.quick))
    table = pq.ParquetFile(wide.files[0]).read_row_group(0, columns=list(UDF_COLUMNS))
    cache = settings.data_dir / "udf-calibration.json"
    key = {"cpu": cpu_model(), "python": platform.python_version(), "jobs": _jobs_hash()}
    if cache.exists() and (saved := json.loads(cache.read_text())).get("key") == key:
        return Calibration(saved["rows"], saved["ms"])
    probe = 2_000
    per_row = _best_time(lambda: jobs.udf_heavy(table, rows=probe)) / probe
    rows = max(1, round(UDF_TARGET_SECONDS / per_row))
    ms = 1000 * _best_time(lambda: jobs.udf_heavy(table, rows=rows))
    cache.write_text(json.dumps({"key": key, "rows": rows, "ms": ms}))
    return Calibration(rows, ms)


def _best_time(func: Callable[[], object], repeat: int = 5) -> float:
    """Median of `repeat` timings (the machine is shared: one slow run should not count)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _jobs_hash() -> str:
    return hashlib.sha256(Path(jobs.__file__).read_bytes()).hexdigest()[:12]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
