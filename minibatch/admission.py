"""What may run now: each chunk's estimated working memory, the budget that admits chunks
while their estimates fit, per-worker memory caps, and the backoff before a retry."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from minibatch.lock import worker_slots
from minibatch.planner import Chunk
from minibatch.units import MAX_SIZE

if TYPE_CHECKING:
    from minibatch.config import JobConfig
    from minibatch.signals import StopSignals
    from minibatch.treemem import TreeMemory

BACKOFF_CAP = 60.0
MEMORY_FACTOR = 2.0  # working memory of a chunk ~ its uncompressed input + its result
WRITE_HOLDS = 32  # x its dictionary page limit: what the Parquet writer may hold for one column
HOLD_CHUNKS = 8  # a worker's share of memory_limit, in chunks, from which freed pages may wait
SMALL_SHARE = 64 << 20  # a worker's share of memory_limit up to which freed pages never wait
LEARN_FROM = 1 << 20  # smaller chunks say more about a worker's fixed costs than about bytes
# Room kept for a start-up not learned yet (a job's first run): measured 8-18 MiB for a job of
# pyarrow alone (tests/test_budget.py), more for one that imports its own libraries.
STARTUP_GUESS = 32 << 20


@contextlib.contextmanager
def shared_workers(
    state_dir: Path, job: JobConfig, configured: int, local: bool, signals: StopSignals
) -> Iterator[JobConfig]:
    """The job with the workers it got of the job's worker slots (lock.worker_slots), and that
    share of its memory budget: all runs of a job together are one job's worth of the machine."""
    if not local:
        yield job
        return
    total = max(configured, job.workers)
    with worker_slots(state_dir, job.name, job.workers, total, lambda: signals.requested) as held:
        share = max(held, 1)
        yield replace(job, workers=share, memory_limit=job.memory_limit * share // job.workers)


def backoff(attempt: int, base: float, cap: float = BACKOFF_CAP, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before attempt number `attempt + 1`."""
    return (rng or random).uniform(0, min(cap, base * 2 ** min(attempt - 1, 64)))


class MemoryModel:
    """Bytes of working memory per byte of a chunk's size in Arrow (Chunk.size, the planner's
    estimate). What the job's own code holds beside its input is unknown, so the factor is
    learned: from earlier runs of the job (`learned`: what their attempts grew, see
    Manifest.learned_memory), and from this run's chunks as they finish.
    It only rises within a run. A worker's first chunk is not counted: it also pays the
    worker's start-up (imports, library pages).
    Until a factor is learned from earlier runs, writing the result counts too: dictionary-
    encoding a column of many distinct values holds up to WRITE_HOLDS x `dictionary_limit`
    (tasks.dictionary_limit), and no more than ~the chunk's size below that (measured: a 1.9 MiB
    slice of 3 columns grew its worker 4.4-6.4 MiB with a 64 KiB limit, where the factor alone
    says 3.7). For the whole run: dropping it once a chunk grew less let a first run start a
    second worker, whose start-up no estimate counted (wide data: 1.4 x the budget, not 0.8 x).
    `startup`: what a worker's first attempt grew beyond its chunk, learned from earlier runs;
    each worker started holds it in the budget for the run (MemoryBudget.hold). A first run,
    which knows none, holds STARTUP_GUESS for each worker started after the first until a first
    chunk has finished (without: 1.3-1.6 x the budget on a huge row group), then learns it from
    its own first chunks, less as its factor rises (see `learn`)."""

    def __init__(
        self, learned: float | None = None, dictionary_limit: int = 0, startup: int | None = None
    ) -> None:
        self.factor = MEMORY_FACTOR if learned is None else max(1.0, learned)
        self.write = WRITE_HOLDS * dictionary_limit if learned is None else 0
        self.startup = startup  # None: not learned yet
        self.started = 0  # workers started in this run
        self._workers: set[int] = set()
        self._firsts: list[tuple[int, int]] | None = [] if startup is None else None  # (grew, size)
        self._cap: int | None = None  # the tree measured above idle per worker, when learning
        self._held = 0  # start-up held for the workers started

    def estimate(self, chunk: Chunk) -> int:
        """Bytes to reserve for `chunk` while it runs."""
        return self._working(chunk.size)

    def _working(self, size: int) -> int:
        return int(size * self.factor) + min(size, self.write)

    def room_to_start(self) -> int:
        """What a chunk that starts a worker needs beside its own estimate."""
        return STARTUP_GUESS if self.startup is None else self.startup

    def start(self, workers: int) -> int:
        """`workers` started: the start-up to hold for them (the guess while it is unknown)."""
        self.started += workers
        return self._hold()

    def _hold(self) -> int:
        """What to hold beyond what is held (less than nothing once a start-up is learned below
        the guess, or a risen factor says more of the first chunks' growth was theirs). The
        guess is held for each worker but the first, whose start-up its first chunk shows (held
        for it too, two long chunks of a first run in 64 MiB ran one after the other)."""
        held, workers = self._held, self.started if self.startup is not None else max(self.started - 1, 0)
        self._held = workers * self.room_to_start()
        return self._held - held

    def failed(self, pid: int) -> None:
        """An attempt on worker `pid` failed: a first one is still its first (the next, imports
        done, would show no start-up)."""
        self._workers.add(pid)

    def learn(
        self, pid: int | None, size: int, start_rss: int | None, peak_rss: int | None,
        memory: TreeMemory | None = None,
    ) -> int:  # fmt: skip
        """What an attempt at a chunk of `size` (Chunk.size) grew its worker by. Returns the
        start-up to hold from now: a first run learns it as the most its workers' first chunks
        grew beyond their estimate at the factor learned so far, for every worker started, each
        no more than the tree's peak above idle per worker (`memory`, if measured) when a first
        chunk ended: an attempt's RSS counts the library pages a first chunk maps."""
        first = pid not in self._workers
        self._workers.add(pid or 0)
        if start_rss is None or peak_rss is None:
            return 0
        grew = peak_rss - start_rss
        if not first and size >= LEARN_FROM:
            self.factor = max(self.factor, grew / size)
        if self._firsts is None:
            return 0
        if first and pid is not None:  # (no pid: whose first it was is unknown)
            self._firsts.append((grew, size))
            tree = memory.sampled_peak() if memory is not None else None
            self._cap = None if tree is None else tree // max(self.started, 1)
        if not self._firsts:
            return 0
        startup = max(max(0, g - self._working(n)) for g, n in self._firsts)
        self.startup = startup if self._cap is None else min(startup, self._cap)
        return self._hold()


def frees_at_once(job: JobConfig) -> bool:
    """Whether workers hand freed pages back to the OS at once, not after a second: slower (the
    bench's map_light by ~24%), but a worker's allocator holds about a chunk's working set, 3-9 x
    chunk_bytes, which a share of memory_limit under HOLD_CHUNKS chunks cannot spare; nor can a
    share of up to SMALL_SHARE what its first Parquet write leaves (up to half of it:
    tasks.dictionary_limit; 2 MiB slices on one worker under 16 MiB: 1.8 x it, not 0.6 x)."""
    return job.memory_limit < job.workers * max(HOLD_CHUNKS * job.chunk_bytes, SMALL_SHARE + 1)


def worker_memory_cap(job: JobConfig) -> int:
    """Default per-worker address-space cap: a fair share of the budget plus the runtime's own."""
    if job.worker_memory_limit:
        return job.worker_memory_limit
    return min(2 * 2**30 + 4 * job.memory_limit // job.workers, MAX_SIZE)


class MemoryBudget:
    """Admission: reserve a chunk's estimated bytes before submit, release when it completes.
    A worker's start-up is held for the run: what a worker grows as it starts, it keeps (a
    review's job whose workers kept 150 MiB each: two under a 250 MiB budget, 1.3-1.4 x it when
    only a worker's first chunk reserved it). One chunk is admitted whenever none runs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0  # bytes reserved: chunks running and workers' start-ups
        self.chunks = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return self.chunks == 0 or self.in_flight + nbytes <= self.limit

    def hold(self, nbytes: int) -> None:
        self.in_flight += nbytes
        self.peak = max(self.peak, self.in_flight)

    def reserve(self, nbytes: int) -> None:
        self.chunks += 1
        self.hold(nbytes)

    def release(self, nbytes: int) -> None:
        self.chunks -= 1
        self.in_flight -= nbytes
