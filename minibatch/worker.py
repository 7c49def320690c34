"""What runs inside a worker process: read one chunk, run the job on it, publish its result.

Preloaded by the forkserver, so pyarrow and DuckDB are imported once, before any fork.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, BinaryIO, cast

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from minibatch.jobcode import forget_package, import_process
from minibatch.layout import with_provenance, write_durably
from minibatch.pageslice import read_rows
from minibatch.planner import Chunk, fingerprint_stat
from minibatch.results import check_schema, conform
from minibatch.states import ErrorKind
from minibatch.tasks import InputChanged, InputRemoved, JobSpec, Task, TaskError, TaskResult
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


EXIT_ORPHANED = 70  # a worker whose coordinator died
RELEASE_AFTER = 8 * 2**20  # chunk bytes from which a worker returns Arrow's freed memory at once

_functions: dict[str, tuple[Any, str | None, int | None]] = {}  # key -> (func, file, mtime)
_import_lock = threading.Lock()
_footers: dict[tuple[str, str], pq.FileMetaData] = {}
SQL_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "threads": 1,
    "enable_external_file_cache": False,
}
_local = threading.local()  # a DuckDB connection per thread (a Dask worker may have several)
FILES_PER_CONNECTION = 32  # files a thread's DuckDB reads before a fresh one: bounds its footer cache


def run_task(task: Task) -> TaskResult:
    if task.job.process is not None:
        _function(task.job)  # a first import is the worker's start-up, not this chunk's compute
    start_rss = _reset_peak_rss()
    cpu, queued = time.process_time(), _queued()
    started = time.perf_counter()
    chunk = task.chunk
    read = started
    result: pa.Table | None
    if task.job.sql is not None:
        result = _sql_on_file(task.job, chunk)  # DuckDB reads the rows itself: no Arrow round trip
        rows_in, bytes_in = chunk.num_rows, chunk.nbytes
    else:
        table = read_chunk(chunk, task.job.columns)
        read = time.perf_counter()
        result = _call(task.job, table, _context(task))
        rows_in, bytes_in = table.num_rows, table.nbytes
    if result is not None and task.schema is not None:
        result = conform(result, task.schema)
        check_schema(result.schema, task.schema)
    computed = time.perf_counter()
    bytes_out, staged = 0, None
    if result is not None and result.num_rows:
        bytes_out, staged = _write(task, result)
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
        peak_rss=_peak_rss(),
        start_rss=start_rss,
        cpu_seconds=time.process_time() - cpu,
        queued_seconds=_queued() - queued,
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


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
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
    )


def _write(task: Task, result: pa.Table) -> tuple[int, str]:
    """Stage the result durably; the coordinator publishes it (a worker never does: the fence)."""
    staged = Path(task.job.staging_dir) / (task.staged_name or f"{task.output_name}.{os.getpid()}.tmp")
    table = with_provenance(result, task.chunk.chunk_id, task.job.definition, task.job.input_schema)
    return write_durably(table, staged), str(staged)


def read_chunk(chunk: Chunk, columns: tuple[str, ...] | None) -> pa.Table:
    """The chunk's rows, read by the worker itself from the file (never sent through a pipe)."""
    with _open_input(chunk) as handle:
        table = _read_open(chunk, handle, list(columns) if columns else None)
    table.validate(full=True)  # untrusted input: fail here, not inside the job's code
    return table


def _read_open(chunk: Chunk, handle: Any, cols: list[str] | None) -> pa.Table:
    _check_unchanged(chunk, os.fstat(handle.fileno()))
    parquet = pq.ParquetFile(handle, metadata=_footer(chunk, handle))
    groups = range(chunk.rg_start, chunk.rg_end)
    group_rows = sum(parquet.metadata.row_group(i).num_rows for i in groups)
    if chunk.row_start == chunk.rg_row_offset and chunk.num_rows == group_rows:
        return parquet.read_row_groups(list(groups), columns=cols)
    return _read_slice(parquet, chunk, cols, handle.fileno())


def _footer(chunk: Chunk, handle: Any) -> pq.FileMetaData:
    """The file's parsed footer, kept per (file, fingerprint): small chunks of a file with many
    row groups would otherwise spend most of their time parsing the same footer."""
    key = (chunk.path, chunk.fingerprint)
    metadata = _footers.get(key)
    if metadata is None:
        if len(_footers) >= 16:
            _footers.clear()
        metadata = _footers[key] = pq.read_metadata(handle)
    return metadata


def _read_slice(parquet: pq.ParquetFile, chunk: Chunk, cols: list[str] | None, fd: int) -> pa.Table:
    """Rows of part of one row group: each column decoded from the pages that hold the rows
    (pageslice), or, where its pages cannot be placed, from the group's start (_read_batches)."""
    schema = parquet.schema_arrow
    if cols is not None:
        schema = pa.schema([schema.field(c) for c in cols])
    names = schema.names
    if len(set(names)) != len(names):
        return _read_batches(parquet, chunk, cols, schema)
    start = chunk.row_start - chunk.rg_row_offset
    key = (chunk.path, chunk.fingerprint)
    columns = read_rows(fd, key, chunk.rg_start, start, start + chunk.num_rows, names)
    rest = [name for name in names if name not in columns]
    if rest:
        rest_schema = pa.schema([schema.field(name) for name in rest])
        columns.update(zip(rest, _read_batches(parquet, chunk, rest, rest_schema).columns, strict=True))
    return pa.Table.from_arrays([columns[name] for name in names], schema=schema)


def _read_batches(
    parquet: pq.ParquetFile, chunk: Chunk, cols: list[str] | None, schema: pa.Schema
) -> pa.Table:
    """Rows of part of one row group, decoding from its start batch by batch (memory near the
    chunk's, but a slice near the group's end decodes nearly all of it)."""
    skip = chunk.row_start - chunk.rg_row_offset
    wanted = chunk.num_rows
    batches = []
    for batch in parquet.iter_batches(
        batch_size=min(65536, max(wanted, 1)), row_groups=[chunk.rg_start], columns=cols
    ):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        piece = batch.slice(skip, wanted)
        skip = 0
        batches.append(piece)
        wanted -= piece.num_rows
        if wanted <= 0:
            break
    return pa.Table.from_batches(batches, schema=schema)


def _open_input(chunk: Chunk) -> BinaryIO:
    try:
        return open(chunk.path, "rb")
    except FileNotFoundError:
        raise _removed(chunk) from None


def _check_unchanged(chunk: Chunk, stat: os.stat_result) -> None:
    if (stat.st_size, stat.st_mtime_ns) != fingerprint_stat(chunk.fingerprint):
        raise InputChanged(f"{chunk.path} changed since it was planned")


def _call(job: JobSpec, table: pa.Table, ctx: ChunkContext) -> pa.Table | None:
    result = _function(job)(table, ctx)
    if result is None or isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    return pa.table(result)


def _function(job: JobSpec) -> Any:
    """The job's function, imported once per process and again when its file changed: a Dask
    worker outlives runs and serves several configs, so a module cached under the same name
    may be another directory's or an older version of this one."""
    assert job.process is not None
    key = f"{job.base_dir}:{job.process}"
    module_name = job.process.partition(":")[0]
    with _import_lock:  # a Dask worker's threads share sys.modules and sys.path
        cached = _functions.get(key)
        if cached is not None and _mtime(cached[1]) == cached[2]:
            return cached[0]
        forget_package(job.process)  # the package and its helpers, afresh from this job's directory
        func = import_process(job.process, Path(job.base_dir))
        path = getattr(sys.modules.get(module_name), "__file__", None)
        _functions[key] = (func, path, _mtime(path))
        return func


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _sql_on_file(job: JobSpec, chunk: Chunk) -> pa.Table:
    """Run the job's SQL with `chunk` a view of the chunk's rows, read by DuckDB from the file.

    DuckDB reads the descriptor we opened and checked (/proc/self/fd/N), never the path: it
    would expand `[`, `*` and `?` in a file's name as a glob, and a path may change under us."""
    held = _local.sql = getattr(_local, "sql", None) or _HeldInput()
    fd = held.open(chunk)
    before = os.fstat(fd)
    _check_unchanged(chunk, before)
    rows = held.con.read_parquet(f"/proc/self/fd/{fd}", file_row_number=True)
    rows = rows.filter(f"file_row_number BETWEEN {int(chunk.row_start)} AND {int(chunk.row_end) - 1}")
    names = list(job.columns) if job.columns else [c for c in rows.columns if c != "file_row_number"]
    rows.project(*[duckdb.ColumnExpression(name) for name in names]).create_view("chunk", replace=True)
    result = held.con.sql(cast(str, job.sql)).to_arrow_table()
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise InputChanged(f"{chunk.path} changed while it was read")
    return cast(pa.Table, result)


class _HeldInput:
    """A thread's DuckDB, and the input file it keeps open from chunk to chunk so its footer is parsed
    once (parquet_metadata_cache). DuckDB keys that by the name /proc/self/fd/N, checks only the mtime
    in seconds, and a closed N may name another file: so a file is held under a number above all this
    DuckDB has seen (F_DUPFD), and after FILES_PER_CONNECTION files a fresh DuckDB starts over."""

    def __init__(self) -> None:
        self.fd, self.key = -1, ("", "", 0, 0)
        self.con, self.next_fd, self.files = _sql_connection(), 3, 0

    def open(self, chunk: Chunk) -> int:
        """The descriptor of the file the chunk's path names now: the one held if it is the same
        file (device, inode) and the chunk was planned with the same fingerprint, else a new one."""
        with _open_input(chunk) as handle:
            stat = os.fstat(handle.fileno())
            key = (chunk.path, chunk.fingerprint, stat.st_dev, stat.st_ino)
            if key != self.key:
                self.release()
                if self.files >= FILES_PER_CONNECTION:
                    self.con.close()
                    self.con, self.next_fd, self.files = _sql_connection(), 3, 0
                self.fd = fcntl.fcntl(handle.fileno(), fcntl.F_DUPFD_CLOEXEC, self.next_fd)
                self.next_fd, self.key, self.files = self.fd + 1, key, self.files + 1
        return self.fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd, self.key = -1, ("", "", 0, 0)


def _sql_connection() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(":memory:", config=SQL_CONFIG).execute("SET parquet_metadata_cache = true")


def _removed(chunk: Chunk) -> InputRemoved:
    """A removed input file is changed input, not an error of the chunk."""
    return InputRemoved(f"{chunk.path} was removed since it was planned")


def describe_error(exc: BaseException) -> TaskError:
    if isinstance(exc, InputRemoved):
        kind = ErrorKind.INPUT_REMOVED
    elif isinstance(exc, InputChanged):
        kind = ErrorKind.INPUT_CHANGED
    elif isinstance(exc, MemoryError | pa.ArrowMemoryError | duckdb.OutOfMemoryException):
        kind = ErrorKind.MEMORY
    elif _environmental(exc):
        kind = ErrorKind.ENVIRONMENT
    else:
        kind = ErrorKind.ERROR
    message = str(exc)
    if kind == ErrorKind.MEMORY:
        message = f"out of memory in worker (worker_memory_limit reached): {message}"
    return TaskError(kind=kind, type=type(exc).__name__, message=message, traceback=traceback.format_exc())


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
ENVIRONMENT_TEXTS = ("no space left on device", "disk quota exceeded", "read-only file system")


def _environmental(exc: BaseException) -> bool:
    """The machine's fault, not the chunk's: a full disk, a quota, a read-only filesystem."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return True
    return any(text in str(exc).lower() for text in ENVIRONMENT_TEXTS)  # Arrow's IO errors


def set_memory_cap(limit: int | None) -> None:
    if limit:
        with contextlib.suppress(ValueError, OverflowError):  # beyond what the kernel caps: none
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the process that forked it dies."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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


def worker_main(conn: Connection, memory_cap: int | None, stopping: Any) -> None:
    """Serve tasks from the coordinator until it closes the pipe.

    Once `stopping` (an Event) is set, tasks still queued here are handed back unstarted.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the coordinator's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    _die_with_coordinator()
    set_memory_cap(memory_cap)
    pool = pa.default_memory_pool()
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
        # Hand freed memory back after a big chunk (measured: -50 MiB of tree peak on 16 MiB
        # chunks; after smaller ones (map_light: 7 MiB) reusing it is up to 15% faster) or idle.
        if task.chunk.size >= RELEASE_AFTER or not conn.poll():
            pool.release_unused()
        if not conn.poll() and hasattr(_local, "sql"):
            _local.sql.release()  # an idle worker holds no input open: it may be deleted meanwhile
