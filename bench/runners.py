"""How each engine row becomes a command line: its working directory, environment and output."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench import minibatch_cli
from bench.dask_cluster import Cluster
from bench.engines import BASELINES
from bench.engines.spec import Spec
from bench.minibatch_cli import MinibatchJob
from bench.workloads import DASK_EXECUTOR, Engine, Settings, Workload

REPO = Path(__file__).resolve().parent.parent
IMPORTS_PROBE = "import pyarrow.parquet, duckdb"


@dataclass(frozen=True)
class Prepared:
    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    out_dir: Path | None  # what the command writes (checked after each run); None: nothing
    clear_before: bool  # the harness empties out_dir before each run (minibatch uses --fresh)
    also_sampled: tuple[int, ...] = ()  # processes whose trees count in the peak RSS (a Dask cluster)


def child_env() -> dict[str, str]:
    """The environment of every command: ours, without a MINIBATCH_CONFIG that would redirect it."""
    return {k: v for k, v in os.environ.items() if k != "MINIBATCH_CONFIG"}


def unavailable(engine: Engine) -> str | None:
    if engine.key in BASELINES and (missing := BASELINES[engine.key].missing()):
        return f"n/a ({', '.join(missing)} not installed)"
    return None


def prepare(
    engine: Engine,
    workload: Workload,
    settings: Settings,
    workdir: Path,
    udf_rows: int,
    cluster: Cluster | None = None,
) -> Prepared:
    """`cluster`: the Dask LocalCluster the dask_executor row runs on."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env()
    if engine.key in BASELINES:
        return _baseline(engine, workload, settings, workdir, udf_rows, env)
    if engine.key == "minibatch-help":
        return Prepared(minibatch_cli.help_command(), workdir, env, None, False)
    if engine.key == "python-bare":
        return Prepared([sys.executable, "-c", "pass"], workdir, env, None, False)
    if engine.key == "python-imports":
        return Prepared([sys.executable, "-c", IMPORTS_PROBE], workdir, env, None, False)
    return _minibatch(engine, workload, settings, workdir, udf_rows, env, cluster)


def _minibatch(
    engine: Engine,
    workload: Workload,
    settings: Settings,
    workdir: Path,
    udf_rows: int,
    env: dict[str, str],
    cluster: Cluster | None,
) -> Prepared:
    assert workload.dataset is not None
    kind = {"mem": "map", "fixed": "identity"}.get(workload.kind, workload.kind)
    workers = 1 if engine.key == "minibatch-1w" else settings.workers
    job = MinibatchJob(
        kind=kind,
        files=workload.dataset.files,
        workers=workers,
        columns=workload.columns,
        chunk_bytes=workload.chunk_bytes,
        udf_rows=udf_rows,
    )
    if engine.key == "minibatch-Nw-bounded":
        assert workload.chunk_bytes is not None
        job = replace(job, memory_limit=workload.chunk_bytes * 2 * 2)
    sampled: tuple[int, ...] = ()
    if engine.key == DASK_EXECUTOR:  # the same job on the cluster, whose processes count in its RSS
        assert cluster is not None
        job, sampled = replace(job, dask_scheduler=cluster.address), (cluster.pid,)
    config = minibatch_cli.write_workdir(workdir, job)
    cmd = minibatch_cli.run_now_command(config)
    return Prepared(cmd, workdir, env, minibatch_cli.output_dir(config), False, sampled)


def _baseline(
    engine: Engine, workload: Workload, settings: Settings, workdir: Path, udf_rows: int, env: dict[str, str]
) -> Prepared:
    assert workload.dataset is not None
    out = workdir / "out"
    spec = Spec(
        kind=workload.kind,
        files=list(workload.dataset.files),
        out=str(out),
        workers=settings.workers,
        columns=list(workload.columns) if workload.columns else None,
        udf_rows=udf_rows,
        rows_per_file=max(workload.dataset.rows // max(workload.dataset.row_groups, 1), 1),
    )
    spec_path = workdir / "spec.json"
    spec.write(spec_path)
    env = env | {"POLARS_MAX_THREADS": str(settings.workers)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "bench.engines", engine.key, str(spec_path)]
    return Prepared(cmd, REPO, env, out, True)


def in_process_seconds(engine: Engine, stdout: str) -> float | None:
    """The engine's own measure of its work, if it printed one."""
    if engine.key in BASELINES:
        for line in reversed(stdout.strip().splitlines()):
            if line.startswith("{"):
                return float(json.loads(line)["in_process_seconds"])
        return None
    if engine.is_minibatch_run:
        return minibatch_cli.parse_summary(stdout).seconds
    return None
