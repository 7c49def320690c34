"""minibatch as its users run it: a config.toml in a directory, and the real CLI in a subprocess.

Nothing here imports minibatch: the benchmark measures whatever package is installed when it
runs, through its command line only.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.queries import Q1_CHUNK, Q1_REDUCE

JOB_NAME = "bench"
JOBS_MODULE = "benchjobs"
UNBOUNDED = 16 * 2**30  # memory_limit when a workload does not bound it
FUNCTIONS = {"map": "map_light", "udf": "udf_heavy", "identity": "identity"}


@dataclass(frozen=True)
class MinibatchJob:
    kind: str  # q1 | map | udf | identity
    files: tuple[str, ...]
    workers: int
    columns: tuple[str, ...] | None = None
    chunk_bytes: int | None = None  # None: minibatch's default
    memory_limit: int = UNBOUNDED
    udf_rows: int = 0
    dask_scheduler: str | None = None  # set: executor = "dask" on the cluster at this address


def write_workdir(workdir: Path, job: MinibatchJob) -> Path:
    """config.toml (+ benchjobs.py for process jobs) in `workdir`; returns the config's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    if job.kind != "q1":
        (workdir / f"{JOBS_MODULE}.py").write_text(jobs_module_source(job.udf_rows))
    config = workdir / "config.toml"
    config.write_text(config_text(job))
    return config


def jobs_module_source(udf_rows: int) -> str:
    source = (Path(__file__).parent / "jobs.py").read_text()
    return re.sub(r"^UDF_ROWS = .*$", f"UDF_ROWS = {udf_rows}", source, count=1, flags=re.MULTILINE)


def config_text(job: MinibatchJob) -> str:
    engine = {
        "state_dir": "state",
        "workers": job.workers,
        "memory_limit": job.memory_limit,
        "log_level": "warning",
        "metrics_addr": "",
    }
    if job.dask_scheduler:
        engine |= {"executor": "dask", "dask_scheduler": job.dask_scheduler}
    spec: dict[str, object] = {"input": list(job.files), "output": "out"}
    if job.kind == "q1":
        spec |= {"sql": Q1_CHUNK.strip(), "reduce_sql": Q1_REDUCE.strip()}
    else:
        spec["process"] = f"{JOBS_MODULE}:{FUNCTIONS[job.kind]}"
    if job.columns:
        spec["columns"] = list(job.columns)
    if job.chunk_bytes:
        spec["chunk_bytes"] = job.chunk_bytes
    return f"[minibatch]\n{_toml_pairs(engine)}\n[jobs.{JOB_NAME}]\n{_toml_pairs(spec)}"


def _toml_pairs(table: dict[str, object]) -> str:
    # JSON strings, numbers and arrays of strings are valid TOML values.
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


def output_dir(config: Path) -> Path:
    return config.parent / "out"


def run_now_command(config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "minibatch",
        "--config",
        str(config),
        "run-now",
        JOB_NAME,
        "--fresh",
        "--quiet",
    ]


def help_command() -> list[str]:
    return [sys.executable, "-m", "minibatch", "--help"]


@dataclass(frozen=True)
class Summary:
    seconds: float | None  # the run's own time, as its summary prints it
    chunks: int | None  # chunks computed by this run


def parse_summary(stdout: str) -> Summary:
    """What `run-now` printed; None where the summary's format is not recognised."""
    seconds = re.search(r"time: ([0-9.]+)s", stdout)
    chunks = re.search(r"chunks: (\d+) done now", stdout)
    return Summary(
        seconds=float(seconds.group(1)) if seconds else None,
        chunks=int(chunks.group(1)) if chunks else None,
    )
