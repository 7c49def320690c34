"""What `status` and `reset` need: the manifest's view of each job, live runs included."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow.parquet as pq

from minibatch.config import Config, ConfigError, JobConfig
from minibatch.crossjob import check_rendered
from minibatch.layout import OutputLayout
from minibatch.lock import held_by, job_lock
from minibatch.manifest import Manifest, manifest_path
from minibatch.owner import OutputNotOwned
from minibatch.params import DATE
from minibatch.states import RunStatus


def manifest_for(config: Config) -> Manifest:
    return Manifest(manifest_path(config.engine.state_dir))


def job_status(config: Config, job: str | None = None) -> list[dict[str, Any]]:
    """One entry per job: its latest run, with done / dead / pending chunks."""
    rows = {row["job_name"]: row for row in manifest_for(config).status(job)}
    names = [job] if job else sorted(config.jobs)
    return [_entry(config, name, rows.get(name)) for name in names]


def _entry(config: Config, name: str, row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {"job": name, "status": "never run"}
    status = actual_status(config, row)
    total = row["chunks_total"] or 0
    done = row["done_total"]  # the checkpoint as it stands, not the run's own counters
    dead = row["dead_total"]
    ended, started = row["ended_at"], row["started_at"]
    return {
        "job": name,
        "params": json.loads(row["params"]) if row["params"] else None,  # its latest parameter set's
        "run_id": row["run_id"],
        "status": status,
        "pid": row["pid"],
        "started_at": started.isoformat() if started else None,
        "ended_at": ended.isoformat() if ended else None,
        "seconds": (ended - started).total_seconds() if ended and started else None,
        "chunks_total": total,
        "chunks_done": done,
        "chunks_dead": dead,
        "chunks_pending": max(total - done - dead, 0),
        "bad_files": row["bad_files"],
        "rows_in": row["rows_in"],
        "rows_out": row["rows_out"],
        "bytes_in": row["bytes_in"],
        "bytes_out": row["bytes_out"],
        "rows_out_total": row["rows_out_total"],
        **_output(config, name, row),
        "bad_files_total": row["bad_files_total"],  # known bad files, later runs skip them
        "last_success_at": row["last_success_at"].isoformat() if row["last_success_at"] else None,
        "error": row["error"],
    }


def _output(config: Config, name: str, row: dict[str, Any]) -> dict[str, Any]:
    """What readers of the output see: every done chunk's rows, or a reduce job's reduction."""
    job = config.jobs.get(name)
    if job and job.params and row["params"]:
        with contextlib.suppress(ConfigError):
            job = config.bound(name, json.loads(row["params"]))
    layout = OutputLayout.of(job) if job else None
    if layout is None or not layout.hidden:
        return {"output_rows": row["rows_out_total"], "output_bytes": row["bytes_out_total"]}
    rows = size = 0
    for path in layout.visible_files():
        with contextlib.suppress(OSError):  # replaced or removed meanwhile
            rows, size = rows + pq.read_metadata(path).num_rows, size + path.stat().st_size
    return {"output_rows": rows, "output_bytes": size}


def actual_status(config: Config, row: dict[str, Any]) -> str:
    """A run recorded as running whose process no longer holds the job's lock has crashed,
    unless it ended between the row's read and the lock's (a run records its end, then lets go)."""
    if row["status"] == RunStatus.RUNNING and not held_by(
        config.engine.state_dir, row["job"], row.get("run_id") or row.get("backfill_id", ""), row["pid"]
    ):
        now = (
            manifest_for(config).named("run_by_id", read_only=True, run_id=row["run_id"])
            if "run_id" in row
            else []
        )
        return str(now[0]["status"]) if now and now[0]["status"] != RunStatus.RUNNING else RunStatus.CRASHED
    return str(row["status"])


def run_history(config: Config, job: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """Past runs, newest first, with their throughput."""
    entries = []
    for row in manifest_for(config).runs(job, limit):
        status = actual_status(config, row)
        ended, started = row["ended_at"], row["started_at"]
        entries.append(
            {
                "run_id": row["run_id"],
                "job": row["job"],
                "status": status,
                "started_at": started.isoformat(),
                "ended_at": ended.isoformat() if ended else None,
                "seconds": (ended - started).total_seconds() if ended else None,
                **{key: row[key] for key in HISTORY_KEYS},
            }
        )
    return entries


HISTORY_KEYS = (
    "chunks_total", "chunks_done", "chunks_reused", "chunks_dead", "chunks_skipped", "bad_files",
    "rows_in", "rows_out", "rows_bad", "busy_seconds",
    "bytes_in", "bytes_out", "rows_per_second", "mb_per_second", "utilisation", "peak_in_flight",
    "peak_memory", "idle_memory", "memory_limit", "workers", "error",
)  # fmt: skip


def reset_job(config: Config, name: str, params: dict[str, str] | None = None) -> None:
    """Forget a job's checkpoint and remove its output (refused while the job runs)."""
    job = bound_job(config, name, params or {})
    layout = OutputLayout.of(job)
    with job_lock(config.engine.state_dir, job.key):
        try:
            check_rendered(job, config.jobs, config.path, config.engine.state_dir)
            ran = lambda: bool(manifest_for(config).named("has_run", key=job.key))  # noqa: E731
            layout.check_owner(job.key, config.engine.state_dir, ran)  # a parameter set's may be another's
        except OutputNotOwned as exc:
            raise ConfigError([f"jobs.{name}: {exc}; nothing was deleted"], config.path) from None
        manifest_for(config).reset(job.key)
        layout.remove_all()


def dead_letters(config: Config, name: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A job's dead-lettered chunks, by file and rows."""
    return manifest_for(config).dead_letters(bound_job(config, name, params or {}).key)


def bound_job(config: Config, name: str, params: dict[str, str]) -> JobConfig:
    """The job with the parameter set a command names: given in full, never a default date."""
    job = config.job(name)
    if DATE in job.params and DATE not in params:
        problem = f"job {name!r} has a checkpoint per date: give --param date=YYYY-MM-DD"
        raise ConfigError([problem], config.path)
    return config.bound(name, params)
