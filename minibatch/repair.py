"""`minibatch repair`: a way back from a manifest that cannot be read.

The outputs are the source of truth for finished work: every part names its chunk and job
definition in its footer, and a run adopts the parts it finds for the chunks it plans (after
checking each footer). So a damaged manifest is set aside, never deleted, and a new one is
started; the next run of each job adopts its outputs and computes only what is missing. What
only the manifest knew is lost: run history, attempts, dead letters (those chunks are tried
again) and the daemon's last fire times.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minibatch.config import Config
from minibatch.lock import job_lock
from minibatch.manifest import Manifest, ManifestError, manifest_path

TABLES = ("runs", "chunks", "attempts", "bad_files", "job_state", "reduce_state", "schedule_state")


@dataclass(frozen=True)
class Repair:
    path: Path
    broken: Path | None  # where the damaged file went; None: nothing needed repair
    reason: str


def repair(config: Config) -> Repair:
    """Set a damaged manifest aside and start a new one, while no job of this config runs."""
    path = manifest_path(config.engine.state_dir)
    with _all_job_locks(config):
        problem = _problem(path)
        if problem is None:
            reason = "it does not exist" if not path.exists() else "it reads without error"
            return Repair(path, None, reason)
        broken = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(broken)
        wal = path.with_name(path.name + ".wal")
        if wal.exists():
            wal.rename(broken.with_name(broken.name + ".wal"))
        Manifest(path).status()  # creates the new, empty manifest
        return Repair(path, broken, problem)


def _problem(path: Path) -> str | None:
    """Why the manifest cannot be used, reading every table through (None: it can be)."""
    import duckdb

    if not path.exists():
        return None
    try:
        with Manifest(path, deadline=5.0).connect() as con:
            for table in TABLES:
                con.execute(f"SELECT * FROM {table}").fetchall()
    except (ManifestError, duckdb.Error) as exc:  # a damaged catalog may say "no such table"
        return str(exc)
    return None


@contextlib.contextmanager
def _all_job_locks(config: Config) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name in sorted(config.jobs):
            stack.enter_context(job_lock(config.engine.state_dir, name))
        yield
