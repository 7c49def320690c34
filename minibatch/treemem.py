"""What a run's processes really hold: the memory of the coordinator and every process under it
(the forkserver, the workers), sampled by a thread, measured above the tree's idle baseline.

Each process counts its resident anonymous memory (resident minus file-backed and shared pages,
from /proc/PID/statm): the heap, Arrow's buffers, DuckDB's. That is what grows with the data,
and reading it costs microseconds; the PSS of /proc/PID/smaps_rollup costs ~2 ms a process.
Where /proc is missing (not Linux) nothing is measured and nothing is gated on it.
Runs in one process (the daemon's) share its forkserver: each counts only its own workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from minibatch.units import format_size

INTERVAL = 0.05  # seconds between samples
RESCAN = 1.0  # seconds between walks of the tree (a walk costs ~0.5 ms, a sample ~0.05 ms a process)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree(root: int, keep: Callable[[int, int], bool] | None = None) -> list[int]:
    """`root` and its descendants, as /proc lists them now; without each child (and what is
    below it) for which `keep(parent, child)` is false."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                children = (int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
                todo.extend(c for c in children if keep is None or keep(pid, c))
        except OSError:
            continue  # it ended meanwhile
    return pids


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def anonymous(pid: int) -> int:
    """Resident bytes of `pid` that are neither file-backed nor shared memory (0 once it ended)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return (int(fields[1]) - int(fields[2])) * PAGE


class TreeMemory:
    """Samples the tree of `root` (default: this process) from `start` to `stop`."""

    def __init__(self, root: int | None = None, interval: float = INTERVAL) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.available = os.path.exists(f"/proc/{self.root}/statm")
        self.idle = 0  # the tree's memory when sampling started, and each worker's as it started
        self.current = 0  # above idle, at the last sample
        self.peak = 0  # above idle, the most seen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pids: list[int] = []
        self._walked = -RESCAN
        self._lock = threading.Lock()  # a worker's start, and the sampler's sums, one at a time
        self._workers: Callable[[], Iterable[int]] = list
        self._servers: set[int] = set()  # the parents of this run's workers (the forkserver)

    def start(self, workers: Callable[[], Iterable[int]] = list) -> None:
        """`workers`: the pids of the run's worker processes now. Other processes started by the
        same servers are other runs' (a daemon runs several jobs at once): they are not counted."""
        if not self.available or self._thread is not None:
            return
        self._workers = workers
        self._pids, self._walked = self._walk(), time.monotonic()
        self.idle = sum(anonymous(pid) for pid in self._pids)
        self._thread = threading.Thread(target=self._sample_until_stopped, name="mb-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()

    def starting(self, start: Callable[[], int | None]) -> int | None:
        """Call `start`, which may start a worker (the pool starts them as work arrives) and
        return its pid, with the sampler held off: what the worker holds as it starts is idle,
        as for a worker started before the baseline, and no sample counts it before. (A worker
        replacing a dead one is not: it counts in full, seen within a second.)"""
        with self._lock:
            pid = start()
            if pid is not None and self._thread is not None:
                self.idle += anonymous(pid)
                self._pids.append(pid)
            return pid

    def sample(self) -> int:
        with self._lock:
            now = time.monotonic()
            if now - self._walked >= RESCAN:  # a new worker is seen within a second
                self._pids, self._walked = self._walk(), now
            self.current = max(0, sum(anonymous(pid) for pid in self._pids) - self.idle)
            self.peak = max(self.peak, self.current)
            return self.current

    def sampled_peak(self) -> int | None:
        """The peak above idle, with a sample taken now (None where nothing is measured)."""
        if not self.available:
            return None
        self.sample()
        return self.peak

    def _walk(self) -> list[int]:
        own = set(self._workers())
        # (a worker whose server died is re-parented: to this process, where it is PID 1 or a subreaper)
        self._servers.update(p for p in map(parent, own) if p is not None and p != self.root)
        return tree(self.root, lambda above, pid: above not in self._servers or pid in own)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def describe(limit: int, reserved: int, peak: int | None, idle: int | None) -> str:
    """The measured peak against the budget, for the summary and the report."""
    estimated = f"estimates reserved at most {format_size(reserved)}"
    if peak is None:
        return f"not measured; {estimated} of a {format_size(limit)} budget"
    if limit and peak > limit:
        verdict = f"OVER the {format_size(limit)} budget ({peak / limit:.1f}x)"
    else:
        verdict = f"of a {format_size(limit)} budget"
    return f"measured peak {format_size(peak)} above an idle {format_size(idle or 0)}, {verdict}; {estimated}"
