"""What runs inside a worker process: read one chunk, run the job on it, publish its result.

Preloaded by the forkserver, so pyarrow is imported once, before any fork (DuckDB too, for a
job that needs it in its workers: see pool.warm_up).
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import resource
import secrets
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pyarrow as pa

from minibatch.checks import apply_checks
from minibatch.hive import nullable
from minibatch.jobcode import forget_package, import_process, source_digest
from minibatch.layout import MALFORMED_PREFIX, QUARANTINE_PREFIX, staged_name, with_provenance, write_durably
from minibatch.planner import InputUnreadable
from minibatch.reading import read_chunk, read_text, release_held, sql_on_file, sql_on_table
from minibatch.results import check_schema, conform
from minibatch.states import ErrorKind
from minibatch.streams import ForgivingStream
from minibatch.tasks import (
    CodeChanged,
    InputChanged,
    InputRemoved,
    JobSpec,
    OutputUnwritable,
    Task,
    TaskError,
    TaskResult,
    said,
)
from minibatch.treemem import PAGE


@dataclass(frozen=True)
class ChunkContext:
    """The `ctx` argument of a job's function."""

    job: str
    run_id: str
    file: str
    row_start: int
    row_end: int
    attempt: int
    chunk_id: str
    params: dict[str, Any] = field(default_factory=dict)  # the run's parameters (`date`: a date)


EXIT_ORPHANED = 70  # a worker whose coordinator died
RELEASE_AFTER = 8 * 2**20  # chunk bytes from which a worker returns Arrow's freed memory at once
LAZY_FREE_MS = 1000  # jemalloc's decay of freed pages, Arrow's own (measured: 200 ms held as much)

_functions: dict[str, tuple[Any, str | None, int | None]] = {}  # key -> (func, file, mtime)
_loaded: dict[str, str] = {}  # a top-level package in sys.modules -> the directory it came from
_project: list[Any] = ["", 0]  # whose job code runs in this process now, and in how many tasks
_waiting: Counter[str] = Counter()  # tasks waiting for their directory's turn, by directory
_import_lock = threading.Condition()


def run_task(task: Task) -> TaskResult:
    if task.job.process is not None:
        with _job_code(task.job):  # a first import is the worker's start-up, not this chunk's compute
            pass
    start_rss = _reset_peak_rss()
    cpu, queued = time.process_time(), _queued()
    started = time.perf_counter()
    chunk = task.chunk
    read = started
    result: pa.Table | None
    malformed = None
    if task.job.text is not None:
        rows = read_text(task)
        read, malformed = time.perf_counter(), rows.malformed
        if task.job.sql is not None:
            result = sql_on_table(task.job, rows.table)
        else:
            result = _call(task.job, rows.table, _context(task))
        rows_in, bytes_in = rows.table.num_rows, chunk.nbytes
    elif task.job.sql is not None:
        result = sql_on_file(task.job, chunk)  # DuckDB reads the rows itself: no Arrow round trip
        rows_in, bytes_in = chunk.num_rows, chunk.nbytes
    else:
        table = read_chunk(chunk, task.job.columns)
        read = time.perf_counter()
        result = _call(task.job, table, _context(task))
        rows_in, bytes_in = table.num_rows, table.nbytes
    if result is not None and (twice := sorted(n for n, k in Counter(result.column_names).items() if k > 1)):
        raise ValueError(f"the result has more than one column named {', '.join(map(repr, twice))}: "
                         "readers of the output could not tell them apart; rename them")  # fmt: skip
    checked = apply_checks(result, task.job.checks) if result is not None else None
    result = checked.table if checked is not None else result
    if result is not None and task.schema is not None:
        result = conform(result, task.schema)
        check_schema(result.schema, task.schema)
    computed = time.perf_counter()
    bytes_out, staged = 0, None
    if result is not None and result.num_rows:
        bytes_out, staged = _write(task, result)
    held = checked.quarantined if checked is not None else None
    held = conform(held, task.schema) if held is not None and task.schema is not None else held
    held_staged = _write(task, held, QUARANTINE_PREFIX)[1] if held is not None else None
    malformed_staged = _write(task, malformed, MALFORMED_PREFIX)[1] if malformed is not None else None
    ended = time.perf_counter()
    return TaskResult(
        rows_in=rows_in,
        rows_out=result.num_rows if result is not None else 0,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        output_file=task.output_name if bytes_out else None,
        seconds=ended - started,
        schema=result.schema if result is not None else None,
        staged=staged,
        read_seconds=read - started,
        compute_seconds=computed - read,
        write_seconds=ended - computed,
        peak_rss=_peak_rss(start_rss),
        start_rss=start_rss,
        cpu_seconds=time.process_time() - cpu,
        queued_seconds=_queued() - queued,
        rows_bad=(checked.bad if checked is not None else 0) + (malformed.num_rows if malformed else 0),
        check_failures=tuple(checked.failed.items()) if checked is not None else (),
        quarantine_staged=held_staged,
        malformed_staged=malformed_staged,
    )


def _reset_peak_rss() -> int | None:
    """Start this attempt's high-water mark afresh (Linux: "5" resets VmHWM to the resident
    memory now, which is returned: what the attempt grew is its peak minus this)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the process's since it started
    try:
        with open("/proc/self/statm", "rb") as f:  # cheaper than /proc/self/status
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return None


def _queued() -> float:
    """Seconds this thread has waited for a CPU while runnable (0 where Linux does not say): a
    chunk's time minus that is what it would take on a machine of its own."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _peak_rss(start: int | None) -> int | None:
    # No less than its start: Linux 6.2+ counts RSS per CPU, and two reads differ by ~160 KiB
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return max(int(line.split()[1]) * 1024, start or 0)
    except OSError:
        pass
    return None


def _context(task: Task) -> ChunkContext:
    return ChunkContext(
        job=task.job.name,
        run_id=task.run_id,
        file=task.chunk.path,
        row_start=task.chunk.row_start,
        row_end=task.chunk.row_end,
        attempt=task.attempt,
        chunk_id=task.chunk.chunk_id,
        params=dict(task.job.params),
    )


def _write(task: Task, result: pa.Table, prefix: str = "") -> tuple[int, str]:
    """Stage the result durably; the coordinator publishes it (a worker never does: the fence)."""
    # Each execution its own file: Dask may run one attempt twice (a worker it gave up on still
    # runs it), and a late writer must not rewrite the file the coordinator has published.
    run = f"{task.run_id}-{secrets.token_hex(4)}"
    name = prefix + (
        staged_name(task.output_name, run, task.attempt)
        if task.staged_name
        else f"{task.output_name}.{os.getpid()}.tmp"
    )
    staged = Path(task.job.staging_dir) / name
    table = with_provenance(nullable(result), task.chunk.chunk_id, task.job.definition, task.job.input_schema)
    shape = None if prefix else task.job.shape
    try:
        size = write_durably(table, staged, shape, dictionary_pagesize_limit=task.job.dictionary_limit)
        return size, str(staged)
    except OSError as exc:  # the result is computed: writing it fails only for the machine
        raise OutputUnwritable(staged.parent, exc) from exc


def _call(job: JobSpec, table: pa.Table, ctx: ChunkContext) -> pa.Table | None:
    with _job_code(job) as function:
        result = function(table, ctx)
    if result is None or isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    return pa.table(result)


@contextlib.contextmanager
def _job_code(job: JobSpec) -> Iterator[Any]:
    """The job's function, while it runs. A Dask worker outlives runs and serves several
    configs: a module cached under the same name may be another directory's or an older
    version of this one, and what the function imports as it runs must come from its own
    directory, so a task of another directory waits until this one's are done (and, while one
    waits, this directory's next tasks wait for their turn after it)."""
    assert job.process is not None
    with _import_lock:  # a Dask worker's threads share sys.modules and sys.path
        _waiting[job.base_dir] += 1
        try:
            while not _may_enter(job.base_dir):
                _import_lock.wait()
        finally:
            _waiting[job.base_dir] -= 1
            _import_lock.notify_all()  # one fewer waiting may let another in (also if it fails below)
        function = _function(job)
        _project[:] = [job.base_dir, (_project[1] if _project[0] == job.base_dir else 0) + 1]
    try:
        yield function
    finally:
        with _import_lock:
            _project[1] = int(_project[1]) - 1
            _import_lock.notify_all()


def _may_enter(directory: str) -> bool:
    if _project[0] == directory:
        return not any(n for other, n in _waiting.items() if other != directory)
    return not _project[1]


def _function(job: JobSpec) -> Any:
    """Imported once per process, and again when its file, its definition (`version`) or the
    directory whose package is loaded changed (called under _import_lock)."""
    assert job.process is not None
    key = f"{job.base_dir}:{job.process}:{job.definition}"
    module_name = job.process.partition(":")[0]
    root = module_name.split(".")[0]
    cached = _functions.get(key)
    if cached is not None and _loaded.get(root) == job.base_dir and _mtime(cached[1]) == cached[2]:
        return cached[0]
    forget_package(job.process)  # the package and its helpers, afresh from this job's directory
    _loaded[root] = job.base_dir
    func = import_process(job.process, Path(job.base_dir))
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if job.source is not None and source_digest(path) != job.source:
        raise CodeChanged(f"the job's module {path} changed during the run; the next run computes with it")
    _functions[key] = (func, path, _mtime(path))
    return func


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _out_of_memory(exc: BaseException) -> bool:
    duckdb = sys.modules.get("duckdb")  # not imported, then not DuckDB's
    return isinstance(exc, MemoryError | pa.ArrowMemoryError) or (
        duckdb is not None and isinstance(exc, duckdb.OutOfMemoryException)
    )


def describe_error(exc: BaseException) -> TaskError:
    if isinstance(exc, InputRemoved):
        kind = ErrorKind.INPUT_REMOVED
    elif isinstance(exc, InputChanged):
        kind = ErrorKind.INPUT_CHANGED
    elif _out_of_memory(exc):
        kind = ErrorKind.MEMORY
    elif isinstance(exc, InputUnreadable | CodeChanged | OutputUnwritable) or _environmental(exc):
        kind = ErrorKind.ENVIRONMENT
    else:
        kind = ErrorKind.ERROR
    message = said(exc)
    if kind == ErrorKind.MEMORY:
        message = f"out of memory in worker (worker_memory_limit reached): {message}"
    return TaskError(kind=kind, type=type(exc).__name__, message=message, traceback=traceback.format_exc())


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
ENVIRONMENT_TEXTS = ("no space left on device", "disk quota exceeded", "read-only file system")


def _environmental(exc: BaseException) -> bool:
    """The machine's fault, not the chunk's: a full disk, a quota, a read-only filesystem."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return True
    # Arrow's IO errors (OSErrors without an errno) and DuckDB's say it in words; the job's own
    # errors may too (a value quoted), and a full disk that is not would halt every run for good
    io_error = isinstance(exc, OSError) or type(exc).__name__ == "IOException"
    return io_error and any(text in said(exc).lower() for text in ENVIRONMENT_TEXTS)


def set_memory_cap(limit: int | None) -> None:
    if limit:
        with contextlib.suppress(ValueError, OverflowError):  # beyond what the kernel caps: none
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the process that forked it dies."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _die_with_coordinator() -> None:
    """Exit the moment the coordinator dies. PR_SET_PDEATHSIG watches the forkserver, our real
    parent; multiprocessing's parent sentinel is a pipe only the coordinator holds open."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch(sentinel: int) -> None:
        wait([sentinel])
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, args=(parent.sentinel,), daemon=True, name="lifeline").start()


def _memory_pool(free_at_once: bool) -> pa.MemoryPool:
    """Arrow's pool (jemalloc: see allocator.py). Freed pages go back to the OS at once when the
    budget is tight (admission.frees_at_once), else after a second: then the next chunk reuses
    them (map_light 18% faster than with mimalloc, Arrow's default). This reaches the arenas made
    from now on (Arrow's threads); the main one is the forkserver's: see allocator_at_once."""
    pool = pa.default_memory_pool()
    if pool.backend_name == "jemalloc":
        pa.jemalloc_set_decay_ms(0 if free_at_once else LAZY_FREE_MS)
    return pool


def worker_main(conn: Connection, memory_cap: int | None, stopping: Any, free_at_once: bool = False) -> None:
    """Serve tasks from the coordinator until it closes the pipe.

    Once `stopping` (an Event) is set, tasks still queued here are handed back unstarted.
    """
    # Stop signals to the whole process group are the coordinator's (see server_signals), and
    # ignored, not handled, so that the programs a job runs ignore them too and finish the chunk.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.stdout is not None and sys.stderr is not None:  # (None: closed when Python started)
        sys.stdout, sys.stderr = ForgivingStream(sys.stdout, 1), ForgivingStream(sys.stderr, 2)
    _die_with_parent()
    _die_with_coordinator()
    set_memory_cap(memory_cap)
    pool = _memory_pool(free_at_once)
    while True:
        try:
            task: Task | None = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        if stopping.is_set():
            conn.send(("unstarted", task.task_id, None))
            continue
        conn.send(("start", task.task_id, time.time()))
        try:
            reply: tuple[str, int, Any] = ("done", task.task_id, run_task(task))
        except BaseException as exc:  # the process boundary: every failure becomes data
            reply = ("error", task.task_id, describe_error(exc))
        conn.send(reply)
        if reply[0] == "error" and reply[2].kind == ErrorKind.MEMORY:
            return  # an allocation failed half-way: Arrow's or DuckDB's state may be torn; a fresh worker
        # Hand freed memory back after a big chunk (measured: -50 MiB of tree peak on 16 MiB
        # chunks; after smaller ones (map_light: 7 MiB) reusing it is up to 15% faster) or idle.
        if task.chunk.size >= RELEASE_AFTER or not conn.poll():
            pool.release_unused()
        if not conn.poll():
            release_held()  # an idle worker holds no input open: it may be deleted meanwhile
