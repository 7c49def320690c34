"""Run one command as a subprocess: wall time, and peak RSS of its whole process tree.

The tree (the process and all its descendants, recursively: minibatch's forkserver and
workers, Dask's nannies and workers, a ProcessPoolExecutor's processes) is sampled with
psutil every ~20 ms; its RSS is the sum over the processes alive at that moment. Processes
outside the tree can be added to the sum with their own trees (a Dask cluster the command uses).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SAMPLE_INTERVAL = 0.02
STRAY_GRACE = 2.0  # seconds descendants get to exit on their own after the command did


@dataclass
class Sample:
    """One run of one command."""

    wall: float
    peak_rss: int
    returncode: int
    stdout: str
    stderr: str
    strays: list[str] = field(default_factory=list)  # what was still running STRAY_GRACE s after exit

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class TreeSampler:
    """A thread that records the peak summed RSS of a process and its descendants (and of `also`'s)."""

    pid: int
    also: tuple[int, ...] = ()
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            root = psutil.Process(self.pid)
            others = [psutil.Process(pid) for pid in self.also]
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(root) + sum(tree_rss(p) for p in others))
            self._stop.wait(SAMPLE_INTERVAL)


def tree_rss(root: psutil.Process) -> int:
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 1800.0,
    also_sampled: tuple[int, ...] = (),
) -> Sample:
    """Run `cmd` in its own session; time it from start to exit and sample its tree's RSS.

    `also_sampled`: processes whose trees' RSS is added to the command's (they run meanwhile)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        with TreeSampler(proc.pid, also_sampled) as sampler:
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_session(proc.pid)
                code = proc.wait()
            wall = time.perf_counter() - started
        strays = reap_session(proc.pid)
        out.seek(0)
        err.seek(0)
        return Sample(wall, sampler.peak, code, out.read(), err.read(), strays)


def _session_members(sid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == sid:
                members.append(process)
    return members


def reap_session(sid: int) -> list[str]:
    """Wait a little for what the command left running, then kill it; return what was left."""
    deadline = time.monotonic() + STRAY_GRACE
    while (left := _session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    names = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            names.append(" ".join(process.cmdline())[:120])
            process.kill()
    return names


def _kill_session(sid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
