"""One run per job across processes: an flock the kernel releases when its holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class JobLocked(Exception):
    def __init__(self, job: str, pid: int | None) -> None:
        self.job = job
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"job {job!r} is already running in {holder}")


def lock_path(state_dir: Path, job: str) -> Path:
    return state_dir / "locks" / f"{job}.lock"


@contextlib.contextmanager
def job_lock(state_dir: Path, job: str) -> Iterator[None]:
    path = lock_path(state_dir, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobLocked(job, holder_pid(state_dir, job)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def holder_pid(state_dir: Path, job: str) -> int | None:
    """The pid written by the lock's holder, if the holder is alive."""
    try:
        pid = int(lock_path(state_dir, job).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid
