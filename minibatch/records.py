"""Rows of the manifest's tables as the code holds them (see README "The manifest")."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minibatch.states import ChunkStatus, Outcome, RunStatus

if TYPE_CHECKING:
    from minibatch.tasks import TaskError, TaskResult


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class ChunkRecord:
    job: str
    chunk_id: str
    file: str
    fingerprint: str
    row_start: int
    row_end: int
    status: ChunkStatus
    run_id: str
    attempts: int
    rows_in: int = 0
    rows_out: int = 0
    rows_bad: int = 0  # dropped or quarantined by checks, malformed
    bytes_in: int = 0
    bytes_out: int = 0
    output_file: str | None = None
    seconds: float = 0.0
    finished_at: float = 0.0  # unix time; stored as TIMESTAMPTZ
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None


@dataclass
class RunRecord:
    run_id: str
    job: str
    pid: int
    started_at: float
    status: RunStatus = RunStatus.RUNNING
    ended_at: float | None = None
    chunks_total: int = 0
    chunks_done: int = 0  # done in this run
    chunks_reused: int = 0  # done by earlier runs
    chunks_dead: int = 0  # dead-lettered in this run
    chunks_skipped: int = 0  # dead letters of earlier runs, not retried
    bad_files: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_bad: int = 0  # dropped or quarantined by checks
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    workers: int = 0
    memory_limit: int = 0
    peak_in_flight: int = 0
    peak_memory: int | None = None  # measured above idle_memory, the most at once
    idle_memory: int | None = None  # measured, the process tree before the first chunk
    params: str | None = None  # JSON {name: value} of a parameterised run
    busy_seconds: float = 0.0
    utilisation: float | None = None
    rows_per_second: float | None = None
    mb_per_second: float | None = None
    settings: str | None = None  # JSON
    parts_dir: str | None = None  # where its chunk results go (the output, or beside it)
    mounts: str | None = None  # JSON: the mount points above its inputs (a refused run: None)

    @classmethod
    def refused(cls, run_id: str, job: str, params: dict[str, str], error: str) -> RunRecord:
        """A run refused before it began, as the daemon records it (a shell is told at once)."""
        now = time.time()
        return cls(
            run_id=run_id, job=job, pid=os.getpid(), started_at=now, ended_at=now, status=RunStatus.FAILED,
            error=error, params=json.dumps(params) if params else None,
        )  # fmt: skip


@dataclass
class AttemptRecord:
    job: str
    run_id: str
    chunk_id: str
    attempt: int
    label: str
    slot: int | None
    pid: int | None
    admitted_at: float  # unix times; stored as TIMESTAMPTZ
    started_at: float | None
    ended_at: float
    outcome: Outcome
    reserved_bytes: int
    read_seconds: float | None = None
    compute_seconds: float | None = None
    write_seconds: float | None = None
    rows_in: int | None = None
    rows_out: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    peak_rss: int | None = None
    start_rss: int | None = None
    chunk_bytes: int | None = None  # the planner's size of the chunk (the footer's)
    chunk_size: int | None = None  # its size in Arrow, as the planner estimated it
    cpu_seconds: float | None = None
    queued_seconds: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None

    def measured(self, result: TaskResult | None, error: TaskError | None) -> AttemptRecord:
        """With what the worker measured, and why the attempt failed."""
        if result is not None:
            self.read_seconds, self.compute_seconds = result.read_seconds, result.compute_seconds
            self.write_seconds = result.write_seconds
            self.rows_in, self.rows_out = result.rows_in, result.rows_out
            self.bytes_in, self.bytes_out = result.bytes_in, result.bytes_out
            self.peak_rss, self.start_rss = result.peak_rss, result.start_rss
            self.cpu_seconds, self.queued_seconds = result.cpu_seconds, result.queued_seconds
        if error is not None:
            self.error_type, self.error_message = error.type, error.message
            self.traceback = error.traceback or None
        return self


def fingerprint_stat(fingerprint: str) -> tuple[int, int]:
    """(size, mtime_ns) of a fingerprint; mtime_ns is negative for files dated before 1970."""
    size, rest = fingerprint.split("-", 1)
    mtime_ns, _ = rest.rsplit("-", 1)
    return int(size), int(mtime_ns)
