"""What the coordinator, the pools and the workers hand each other: plain values, and the
`Pool` protocol the executor drives. Nothing here imports pyarrow or DuckDB."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from minibatch.checks import Check
from minibatch.hive import Shape
from minibatch.planner import Chunk
from minibatch.states import ErrorKind
from minibatch.textinput import TextFormat

if TYPE_CHECKING:
    import pyarrow as pa

ARROW_DICTIONARY_LIMIT = 2**20  # bytes: the Parquet writer's default dictionary page limit


def dictionary_limit(memory_limit: int, workers: int) -> int:
    """The dictionary page limit a worker writes its parts with. Dictionary-encoding a column of
    many distinct values holds ~32 x the limit until it falls back to plain pages (measured:
    +32 MiB for an int64 column at Arrow's 1 MiB, +3.7 MiB at 64 KiB), so it is 1/64 of a
    worker's share of memory_limit, from 64 KiB up to Arrow's 1 MiB (a share of 64 MiB)."""
    return min(ARROW_DICTIONARY_LIMIT, max(64 * 1024, memory_limit // max(workers, 1) // 64))


@dataclass(frozen=True)
class JobSpec:
    """The parts of a job's config a worker needs; small, sent with every task."""

    name: str
    process: str | None
    sql: str | None
    columns: tuple[str, ...] | None
    base_dir: str
    parts_dir: str
    staging_dir: str
    definition: str | None = None  # written into every part's footer, checked on adoption
    input_schema: str | None = None  # the job's input schema (JSON), also in every footer
    params: tuple[tuple[str, Any], ...] = ()  # the run's parameters, bound into its SQL
    shape: Shape = Shape()  # partition_by: a part's row groups are grouped by partition
    checks: tuple[Check, ...] = ()  # on each chunk's result rows (checks.py)
    text: TextFormat | None = None  # CSV or NDJSON input (textinput.py)
    source: str | None = None  # the digest of the `process` module's source the definition counts
    dictionary_limit: int = ARROW_DICTIONARY_LIMIT  # the Parquet writer's, for the parts


class OutputUnwritable(Exception):
    """A result that could not be written to staging or published (the output's directory
    removed, made read-only, a file size limit, an I/O error): the machine's fault, not the
    chunk's, whatever the errno."""

    def __init__(self, path: object, exc: OSError) -> None:
        super().__init__(f"{path}: cannot be written ({exc.strerror or exc})")


class CodeChanged(Exception):
    """The job's module is not the source the run's definition counted: it was edited during
    the run. Not the chunk's fault; its result would be labelled with the wrong definition."""


@dataclass(frozen=True)
class Task:
    task_id: int
    chunk: Chunk
    job: JobSpec
    run_id: str
    attempt: int
    output_name: str  # the part's name once the coordinator publishes it
    staged_name: str = ""  # where the worker writes it, in the staging directory
    schema: pa.Schema | None = None  # the output's schema, once known: results must match it


@dataclass(frozen=True)
class TaskResult:
    rows_in: int
    rows_out: int
    bytes_in: int
    bytes_out: int
    output_file: str | None
    seconds: float
    schema: pa.Schema | None = None
    staged: str | None = None  # written, fsynced, not visible: only the coordinator publishes
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    peak_rss: int | None = None  # bytes, this attempt's high-water mark of the worker
    start_rss: int | None = None  # bytes, the worker's resident memory when the attempt started
    cpu_seconds: float | None = None  # the worker's CPU time (all its threads) during the attempt
    queued_seconds: float | None = None  # its main thread's time runnable but waiting for a CPU
    rows_bad: int = 0  # dropped or quarantined by checks (not in rows_out)
    check_failures: tuple[tuple[str, int], ...] = ()  # check name -> rows that failed it
    quarantine_staged: str | None = None  # the quarantined rows, staged like the result
    malformed_staged: str | None = None  # text records that did not parse, with line numbers


DETERMINISTIC = {  # errors no retry mends
    "TypeError", "NameError", "AttributeError", "SyntaxError", "ImportError", "ModuleNotFoundError",
    "JobCodeError", "ParserException", "BinderException", "CatalogException", "CheckFailed", "PartitionError",
}  # fmt: skip
FIXES = {  # what the user does about an error of the machine's (ErrorKind.ENVIRONMENT)
    "InputUnreadable": "make it readable and run again",
    "CodeChanged": "run again with the new code",
    "OutputUnwritable": "make the output writable (its directory, space, permissions, file size limit)",
}


@dataclass(frozen=True)
class TaskError:
    kind: ErrorKind
    type: str
    message: str
    traceback: str

    def __post_init__(self) -> None:
        # Stored as UTF-8 in the manifest: a lone surrogate (from os.fsdecode of a non-UTF-8
        # name, say) failed every commit of the run, so the chunk could never be dead-lettered.
        for name in ("message", "traceback"):
            object.__setattr__(self, name, getattr(self, name).encode("utf-8", "backslashreplace").decode())


def said(exc: BaseException) -> str:
    """What an exception says, even when its __str__ raises (a worker died of that)."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() of the {type(exc).__name__} raised {type(inner).__name__}>"


class InputChanged(Exception):
    """The input file is no longer the one the chunk was planned from."""


class InputRemoved(InputChanged):
    """The input file is gone: its results go too, so its chunks are not a hole."""


class SchemaMismatch(Exception):
    """A chunk's result does not fit the schema of the job's output."""


# -- what a pool reports --------------------------------------------------------------------


@dataclass
class Started:
    task_id: int
    pid: int
    slot: int
    at: float  # unix time the worker started the task


@dataclass
class Finished:
    task_id: int
    result: TaskResult


@dataclass
class Failed:
    task_id: int
    error: TaskError


@dataclass
class Lost:
    """Sent to a worker that died before starting it: resubmit without charging an attempt."""

    task_id: int


PoolEvent = Started | Finished | Failed | Lost


class PoolBroken(Exception):
    """The pool cannot go on (e.g. the Dask scheduler is gone); the run fails, the next resumes."""


class Pool(Protocol):
    """What the executor drives: `pool.WorkerPool`, `pool.InlinePool` or `dask_pool.DaskPool`.
    A handle names what `overdue` found and `kill` stops: a slot, or a task on Dask."""

    @property
    def size(self) -> int: ...  # the workers (or cluster threads) it has
    def pids(self) -> list[int]: ...  # its worker processes on this machine
    def has_room(self) -> bool: ...
    def would_start(self) -> bool: ...  # whether the next submit starts a worker
    def submit(self, task: Task) -> int | None: ...  # the pid of a process started for it, if any
    def poll(self, timeout: float | None, extra: Iterable[Any] = ()) -> list[PoolEvent]: ...
    def overdue(self, timeout: float, now: float | None = None) -> list[int]: ...
    def kill(self, handle: int, error: TaskError) -> list[PoolEvent]: ...
    def stop_starting(self) -> None: ...
    def terminate(self) -> None: ...
