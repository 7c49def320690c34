"""`minibatch advise JOB`: `workers`, `chunk_bytes` and `memory_limit` for this machine, from
what the job's past runs measured (the manifest's attempts), each with the reason in a line.

Pure but for `this_machine` and `advise_job`: `measure` turns a run's attempts into a few
numbers, `recommend` turns those and the machine into advice (tested on made-up numbers too)."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from minibatch.admission import LEARN_FROM, MEMORY_FACTOR
from minibatch.manifest import Manifest
from minibatch.states import Outcome
from minibatch.units import format_seconds, format_size

RUNS = 5  # recent runs with work whose attempts say what a chunk needs
FIXED_TARGET = 0.05  # fixed costs worth having per chunk, as a share of its time
FIXED_TOO_MUCH = 0.15  # above this share, chunks are too small
FILE_COSTS = 0.002  # s: opening, footer, fsync and rename of a tiny chunk's files, at most
TAIL_TOO_MUCH = 0.15  # share of the workers' time spent waiting for the last chunks
HEADROOM = 1.25  # memory_limit above what the chunks in flight were measured to need
MACHINE_SHARE = 0.8  # of the machine's memory, what one job may plan to use
IO_WORKERS_PER_CORE = 4  # workers of a job that mostly waits (I/O, sleep): at most this a core


@dataclass(frozen=True)
class Machine:
    cores: int
    memory: int  # bytes: RAM, or the cgroup's limit when lower
    limit: str  # what bounds `memory`: "RAM" or "cgroup"


@dataclass(frozen=True)
class Measured:
    """What the latest run with work (and, for memory, the RUNS before it) measured."""

    run_id: str
    runs: int
    workers: int
    chunk_bytes: int
    memory_limit: int
    chunks: int  # attempts that ran in the latest run
    input_bytes: int  # planned bytes of those
    chunk_seconds: float  # median time a chunk took of its worker, waiting for it included
    fixed_seconds: float  # of that, what every chunk costs whatever its size
    busy: float  # share of the workers' time spent in chunks
    cpu: float | None  # cores a chunk keeps busy when it has them: CPU / (time - queued)
    queued: float  # share of the chunks' time their workers waited for a CPU
    tail: float  # share of the workers' time spent waiting for the run's last chunks
    chunk_memory: int  # p90 of what a worker grew while it ran a chunk, its first included
    memory_per_byte: float | None  # p90 of that per planned byte, chunks of >= LEARN_FROM
    peak_memory: int | None  # the latest run's tree, measured above idle
    idle_memory: int | None
    configured: int = 0  # the workers the run could have started (it starts them as work arrives)
    startup: int = 0  # what a worker keeps from its first chunk on, as admission learned it

    @property
    def fixed(self) -> float:
        return min(1.0, self.fixed_seconds / self.chunk_seconds) if self.chunk_seconds > 0 else 0.0


@dataclass(frozen=True)
class Advice:
    setting: str
    current: int
    advice: int
    why: str


class NoHistory(Exception):
    """The job has no finished chunk to learn from."""


def this_machine() -> Machine:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_value("cpu.max")
    if quota:
        cores = max(1, min(cores, math.ceil(quota)))
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    capped = _cgroup_value("memory.max")
    if capped and capped < ram:
        return Machine(cores, int(capped), "cgroup")
    return Machine(cores, ram, "RAM")


def _cgroup_value(name: str) -> float | None:
    """The tightest limit `name` of this process's cgroup v2 and its ancestors (None: none)."""
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
    except (OSError, StopIteration):
        return None
    found, group = None, Path("/sys/fs/cgroup") / line[3:].strip("/")
    while True:
        value = _read_limit(group / name)
        if value is not None:
            found = value if found is None else min(found, value)
        if group == Path("/sys/fs/cgroup"):
            return found
        group = group.parent


def _read_limit(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if not fields or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1]) if len(fields) == 2 else float(fields[0])


def advise_job(manifest: Manifest, job: str, machine: Machine | None = None) -> dict[str, Any]:
    runs = [r for r in manifest.runs(job, limit=50) if r["chunks_done"]]  # finished a chunk
    attempts = [manifest.attempts(r["run_id"]) for r in runs[:RUNS]]
    if not runs or not _ran(attempts[0]):
        raise NoHistory(f"no run of {job} has finished a chunk yet: run it first (minibatch run-now {job})")
    factor, startup = manifest.learned_memory(job, LEARN_FROM)
    # (no factor: no later chunk showed what a chunk grew, so the start-up learned holds it too)
    measured = replace(measure(runs[0], attempts), startup=(startup or 0) if factor is not None else 0)
    machine = machine or this_machine()
    advice = recommend(measured, machine)
    return {
        "job": job,
        "machine": asdict(machine),
        "measured": asdict(measured),
        "advice": [asdict(a) for a in advice],
    }


def measure(run: dict[str, Any], attempts: list[list[dict[str, Any]]]) -> Measured:
    """`run`: the latest run with work; `attempts`: its attempts, then earlier runs'."""
    latest = _ran(attempts[0])
    workers = int(run["workers"] or 1)
    first, last = min(a["admitted_at"] for a in latest), max(a["ended_at"] for a in latest)
    span = max(_seconds(first, last), 1e-9)
    costs = [_cost(a, prev) for a, prev in _by_slot(latest)]
    busy = sum(_seconds(a["started_at"], a["ended_at"]) for a in latest)
    cpu, queued, work = _cpu(latest)
    ran = [a for runs in attempts for a in _ran(runs)]
    growth, every = _growth(ran), _growth(ran, first=True)
    return Measured(
        run_id=str(run["run_id"]),
        runs=sum(1 for runs in attempts if _ran(runs)),
        workers=workers,
        chunk_bytes=_setting(run, "chunk_bytes"),
        memory_limit=int(run["memory_limit"] or 0),
        configured=_setting(run, "workers"),
        chunks=len(latest),
        input_bytes=sum(a["chunk_bytes"] or 0 for a in latest),
        chunk_seconds=statistics.median(c for c, _ in costs),
        fixed_seconds=statistics.median(f for _, f in costs),
        busy=min(1.0, busy / (workers * span)),
        cpu=cpu / max(work - queued, 1e-9) if work else None,
        queued=queued / work if work else 0.0,
        tail=_tail(latest, workers, last, span),
        chunk_memory=int(_p90([g for g, _ in every])) if every else 0,
        memory_per_byte=_p90([g / b for g, b in growth if b >= LEARN_FROM]) or None,
        peak_memory=run["peak_memory"],
        idle_memory=run["idle_memory"],
    )


def _ran(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in attempts if a["started_at"] is not None and a["outcome"] == Outcome.DONE]


def _cpu(attempts: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Seconds of CPU, of waiting for one, and of work (read, compute, write) in the chunks."""
    timed = [a for a in attempts if a.get("cpu_seconds") is not None and a.get("queued_seconds") is not None]
    work = sum(
        (a["read_seconds"] or 0) + (a["compute_seconds"] or 0) + (a["write_seconds"] or 0) for a in timed
    )
    return sum(a["cpu_seconds"] for a in timed), sum(a["queued_seconds"] for a in timed), work


def _setting(run: dict[str, Any], key: str) -> int:
    return int(json.loads(run["settings"] or "{}").get(key) or 0)


def _by_slot(attempts: list[dict[str, Any]]) -> list[tuple[dict[str, Any], datetime | None]]:
    """Each attempt with the end of the one before it on the same worker slot."""
    pairs: list[tuple[dict[str, Any], datetime | None]] = []
    ends: dict[Any, datetime] = {}
    for a in sorted(attempts, key=lambda a: a["started_at"]):
        pairs.append((a, ends.get(a["slot"])))
        ends[a["slot"]] = a["ended_at"]
    return pairs


def _cost(a: dict[str, Any], prev_end: datetime | None) -> tuple[float, float]:
    """(the chunk's time on its slot, the part of it that does not grow with its size): the
    wait to be sent once admitted and the engine's bookkeeping around the job's read, compute
    and write, plus the fixed part of a file's read and write (a tiny chunk's are all fixed)."""
    ready = a["admitted_at"] if prev_end is None else max(a["admitted_at"], prev_end)
    dispatch = max(0.0, _seconds(ready, a["started_at"])) if prev_end is not None else 0.0
    took = _seconds(a["started_at"], a["ended_at"])
    io = (a["read_seconds"] or 0.0) + (a["write_seconds"] or 0.0)
    engine = max(0.0, took - io - (a["compute_seconds"] or 0.0))
    return dispatch + took, dispatch + engine + min(io, FILE_COSTS)


def _tail(attempts: list[dict[str, Any]], workers: int, last: datetime, span: float) -> float:
    ends: dict[Any, datetime] = {}
    for a in attempts:
        ends[a["slot"]] = max(ends.get(a["slot"], a["ended_at"]), a["ended_at"])
    idle = sum(_seconds(end, last) for end in ends.values()) + span * max(0, workers - len(ends))
    return idle / (workers * span)


def _growth(attempts: list[dict[str, Any]], first: bool = False) -> list[tuple[int, int]]:
    """(bytes a worker grew, planned bytes) of each attempt but each worker's first of a run,
    which also pays the worker's start-up (all of them with `first`, or when that leaves none).
    With `first` it is a worker's footprint: what it keeps after its first chunk stays."""
    measured = [a for a in attempts if a["peak_rss"] is not None and a["start_rss"] is not None]
    seen: set[tuple[str, Any]] = set()
    later = []
    for a in sorted(measured, key=lambda a: a["started_at"]):
        key = (a["run_id"], a["pid"])
        if key in seen:
            later.append(a)
        seen.add(key)
    chosen = measured if first else later or measured
    return [(max(0, a["peak_rss"] - a["start_rss"]), a["chunk_bytes"] or 0) for a in chosen]


def _p90(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


def recommend(m: Measured, machine: Machine) -> list[Advice]:
    workers = _workers(m, machine)
    chunk = _chunk_bytes(m, machine, workers.advice)
    return [workers, chunk, _memory_limit(m, machine, workers.advice, chunk.advice)]


def _workers(m: Measured, machine: Machine) -> Advice:
    cores, cpu, now = machine.cores, m.cpu, max(m.workers, m.configured)
    if not cpu:
        return Advice("workers", now, now, "these runs measured no CPU time (an older release)")
    ideal = max(1, min(round(cores / cpu), IO_WORKERS_PER_CORE * cores, m.chunks))
    fits = int(_usable(m, machine) / (HEADROOM * max(_chunk_need(m, m.chunk_bytes), 1)))
    advice = max(1, min(ideal, fits))
    keeps = f"a chunk keeps {core_share(cpu)} busy when it has them"
    if advice < now and ideal < now and fits >= ideal:
        waited = f"; {now} workers waited for a CPU {m.queued:.0%} of their time" if m.queued > 0.05 else ""
        busy = core_share(min(cores, advice * cpu))
        why = f"{keeps}{waited}: {advice} keep {busy} busy with {now - advice} fewer processes"
    elif advice < now:
        why = f"{keeps}, but {now} at once do not fit this machine's memory"
    elif advice > now:
        why = f"{keeps}: {advice} workers keep {cores} cores busy"
        why += f" (the run has {chunk_count(m.chunks)})" if advice == m.chunks else ""
    else:
        why = f"{keeps}, and the machine has {cores} cores"
    return Advice("workers", now, advice, why)


def core_share(n: float) -> str:
    return f"{n:.1f} cores" if n >= 1.05 else f"{n:.0%} of a core"


def _chunk_bytes(m: Measured, machine: Machine, workers: int) -> Advice:
    now, cap = m.chunk_bytes, _memory_cap(m, machine, workers)
    keep = Advice("chunk_bytes", now, now, f"fixed costs are {m.fixed:.0%} of a chunk's time")
    if not now or m.input_bytes <= now:
        return replace(keep, why=f"one chunk holds a run's input ({format_size(m.input_bytes)})")
    if m.fixed > FIXED_TOO_MUCH:
        fixed = min(m.fixed, 0.99)
        grow = fixed / (1 - fixed) * (1 - FIXED_TARGET) / FIXED_TARGET
        size = _nice(now * grow, cap=min(cap, max(now, m.input_bytes // (2 * workers))))  # 2 a worker
        then = m.fixed_seconds / (m.fixed_seconds + (m.chunk_seconds - m.fixed_seconds) * size / now)
        why = (
            f"fixed costs were {m.fixed:.0%} of a chunk's {format_seconds(m.chunk_seconds)} "
            f"({format_seconds(m.fixed_seconds)} a chunk: sending it, bookkeeping, opening and syncing "
            f"files); in chunks {size / now:.0f}× as large they are ~{then:.0%}"
        )
    elif m.tail > TAIL_TOO_MUCH and m.chunks < 4 * workers:
        size = _nice(m.input_bytes / (4 * workers), cap=min(cap, m.input_bytes / (4 * workers)))
        why = (
            f"{m.tail:.0%} of the workers' time went waiting for the last chunks: "
            f"{chunk_count(m.chunks)} for {workers} workers; 4 a worker even out the end of a run"
        )
    else:
        return (
            keep
            if now <= cap
            else Advice("chunk_bytes", now, _nice(cap, cap=cap), "larger chunks than the machine holds")
        )
    return Advice("chunk_bytes", now, size, why) if max(size, now) >= 2 * min(size, now) else keep


def _per_byte(m: Measured) -> float:
    return m.memory_per_byte or MEMORY_FACTOR


def _chunk_need(m: Measured, chunk: int) -> int:
    """A worker's share of the tree for chunks of `chunk` bytes: what a chunk grew it by or
    the latest run's measured peak per worker (warm-up and the coordinator's share included),
    plus the measured (or assumed) bytes per byte of what a chunk gains; or its start-up and
    its chunk, as admission holds them (a run of one worker measured less than two hold each),
    whichever is more."""
    measured = max(m.chunk_memory, (m.peak_memory or 0) // max(m.workers, 1))
    held = m.startup + _per_byte(m) * chunk
    return int(max(measured + _per_byte(m) * max(0, chunk - m.chunk_bytes), held))


def _usable(m: Measured, machine: Machine) -> int:
    """What a run of this job may plan to hold above its idle tree on this machine."""
    return max(0, int(machine.memory * MACHINE_SHARE) - (m.idle_memory or 0))


def _memory_cap(m: Measured, machine: Machine, workers: int) -> int:
    """The largest chunk that `workers` can hold at once in the machine's share for a job."""
    usable = _usable(m, machine)
    return max(1, int((usable / (workers * HEADROOM) - m.chunk_memory) / _per_byte(m)) + m.chunk_bytes)


def _memory_limit(m: Measured, machine: Machine, workers: int, chunk: int) -> Advice:
    need = int(workers * _chunk_need(m, chunk) * HEADROOM)
    usable = _usable(m, machine)
    peak = f"; the latest run peaked at {format_size(m.peak_memory)}" if m.peak_memory is not None else ""
    grew = f"a chunk grew its worker by {format_size(m.chunk_memory)} (p90)"
    if m.startup:
        grew = f"a worker keeps {format_size(m.startup)} from its first chunk on, {grew}"
    if m.memory_limit < need:
        advice = min(_round_up(need), _nice(usable, cap=usable))
        why = (
            f"{grew}: {workers} at once need {format_size(need)} with {HEADROOM - 1:.0%} to spare; "
            f"the budget of {format_size(m.memory_limit)} ran {m.busy * m.workers:.1f} at a time{peak}"
        )
        return Advice("memory_limit", m.memory_limit, advice, why)
    if m.memory_limit > usable:
        has = f"{machine.limit} {format_size(machine.memory)}"
        why = f"the budget is more than this machine has for a job ({has})"
        return Advice("memory_limit", m.memory_limit, _nice(usable, cap=usable), why)
    why = f"{grew}; {workers} at once need {format_size(need)} with {HEADROOM - 1:.0%} to spare{peak}"
    return Advice("memory_limit", m.memory_limit, m.memory_limit, why)


def _nice(size: float, cap: float = math.inf) -> int:
    """A power of two of at least 64 KiB: the nearest to `size` but not above `cap`."""
    exponent = math.log2(max(min(size, cap), 1))
    nearest = round(exponent) if 2 ** round(exponent) <= cap else math.floor(exponent)
    return 1 << max(16, nearest)


def _round_up(size: int) -> int:
    """`size` rounded up to an eighth of its power of two (500 MiB: 512, 600 MiB: 640)."""
    step = 1 << max(16, size.bit_length() - 4)
    return -(-size // step) * step


def chunk_count(n: int) -> str:
    return f"{n} chunk" if n == 1 else f"{n} chunks"
