"""What a job with hidden parts publishes: `reduce_sql` over every chunk result (one file,
or partitions), or the results laid out in partitions and right-sized files."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.checks import check_output
from minibatch.compact import Published, PublishError, publish_parts, read_slices
from minibatch.hive import PartitionError
from minibatch.layout import OutputLayout, remove_published, with_provenance, write_atomically, write_durably
from minibatch.params import in_utc, sql_values
from minibatch.states import EventKind
from minibatch.tasks import said
from minibatch.userfiles import PART_RE, fsync_dir

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from minibatch.config import JobConfig
    from minibatch.events import RunEvents


class OutputFailed(Exception):
    def __init__(self, message: str, kind: EventKind = EventKind.REDUCE_FAILED) -> None:
        super().__init__(message)
        self.kind = kind


class ReduceStopped(OutputFailed):
    """A stop (SIGTERM, SIGINT) interrupted `reduce_sql`: nothing was published; the next run
    reduces again."""


def publish_if_needed(
    job: JobConfig,
    layout: OutputLayout,
    outputs: dict[str, str | None],
    planned: int,
    definition: str,
    previous: str | None,
    empty: pa.Schema | None,
    events: RunEvents,
    stop: Callable[[], bool] | None = None,
) -> str | None:
    """Reduce over, or publish, the complete set of parts, unless the output already is that;
    returns the key of what it published. Raises OutputFailed (ReduceStopped once `stop()`)."""
    sql = job.reduce_sql
    missing = planned - len(outputs)
    if missing and sql:  # dead letters skipped, or input that changed under the run
        raise OutputFailed(f"reduce_sql not run: {missing} of {planned} chunks are not done")
    parts = sorted(layout.parts / name for name in outputs.values() if name)
    # a reduction is laid out by partition_by (its parts are written whole: the definition does not say)
    layout_of = f"{sql}\n{job.shape!r}" if sql and job.shape.published else sql or repr(job.shape)
    key = reduce_key(layout_of, definition, parts)
    then = (previous or "").split("#")  # parts key, what readers saw, the result's rows
    if then[:2] == [key, _seen(layout)]:  # and readers still see what was published
        return None
    units: Published | None
    rows = ""
    try:
        if sql is None:
            units = publish_parts(layout, read_slices(parts), job.workers)
        else:
            result = _reduce(sql, parts, empty, job, stop)
            _check_result(result, job, _previous_rows(then, layout), events)
            units = _publish_result(result, layout, key)
            rows = str(result.num_rows)
            events(EventKind.REDUCE_DONE, parts=len(parts), rows=result.num_rows)
    except PublishError as exc:  # a unit it may not replace (a user's file in its place)
        raise OutputFailed(f"output not published: {exc}", EventKind.PUBLISH_FAILED) from None
    if units is not None:
        events(EventKind.OUTPUT_PUBLISHED, **units.summary())
    return f"{key}#{_seen(layout)}#{rows}"


def _previous_rows(then: list[str], layout: OutputLayout) -> int | None:
    """The rows of the result published before, as recorded then: what readers see now may have
    lost files (the output is published again). A manifest from before that was recorded: what
    readers see."""
    if len(then) > 2 and then[2]:
        return int(then[2])
    return published_rows(layout)


def _seen(layout: OutputLayout) -> str:
    """What readers of the output see, by file name and size (a stat each): a file or partition
    removed from it since it was published changes this, and the next run publishes again."""
    seen = sorted(f"{path}:{path.stat().st_size}" for path in layout.visible_files())
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()[:16]


def _check_result(result: pa.Table, job: JobConfig, before: int | None, events: RunEvents) -> None:
    """Output checks (`before`: the rows of the result they compare with); a `fail` one keeps
    the earlier result published and fails the run."""
    problems = check_output(result, job.checks, before)
    for action, problem in problems:
        events(EventKind.CHECKS_FAILED, error=problem, action=action)
    failed = [problem for action, problem in problems if action == "fail"]
    if failed:
        raise OutputFailed("; ".join(failed) + "; the result was not published", EventKind.CHECKS_FAILED)


def published_rows(layout: OutputLayout) -> int | None:
    """Rows of the reduce result readers see now (None before the first)."""
    import pyarrow.parquet as pq

    files = layout.visible_files()
    return sum(pq.read_metadata(path).num_rows for path in files) if files else None


def _reduce(
    sql: str, parts: list[Path], empty: pa.Schema | None, job: JobConfig, stop: Callable[[], bool] | None
) -> pa.Table:
    try:
        return reduce_table(sql, parts, None if parts else empty, dict(job.values), stop)
    except ReduceStopped:
        raise
    except Exception as exc:  # the user's SQL: its error ends the run as failed, readably
        why = (
            ""
            if parts or empty
            else " (no chunk has run yet to give the output's columns: no input has rows)"
        )
        raise OutputFailed(f"reduce_sql failed: {type(exc).__name__}: {exc}{why}") from None


def _publish_result(result: pa.Table, layout: OutputLayout, key: str) -> Published | None:
    """_publish_reduced; a result partition_by cannot lay out, or an output that cannot be
    written, fails the run readably (what was published before stays)."""
    import pyarrow as pa

    try:
        return _publish_reduced(result, layout, key)
    except (PartitionError, pa.ArrowException) as exc:  # a list column's values as directory names...
        raise OutputFailed(f"reduce_sql's result not published: {type(exc).__name__}: {said(exc)}") from None
    except OSError as exc:
        raise OutputFailed(f"output not published: {said(exc)}", EventKind.PUBLISH_FAILED) from None


def _publish_reduced(result: pa.Table, layout: OutputLayout, key: str) -> Published | None:
    if layout.shape.partition_by:
        staged = layout.staging / f"reduced-{key[:24]}.parquet"
        write_durably(with_provenance(result, key[:24], key), staged, layout.shape)
        try:
            return publish_parts(layout, read_slices([staged]), whole=True)  # rows move between partitions
        finally:
            staged.unlink(missing_ok=True)
    write_atomically(result, layout.reduced, layout.staging)
    remove_published(layout.output)  # files of partition_by or target_file_bytes, from before
    for other in layout.output.iterdir():
        if PART_RE.match(other.name):  # a map job's parts, from before reduce_sql was set
            other.unlink(missing_ok=True)
    fsync_dir(layout.output)
    return None


def reduce_table(
    sql: str,
    parts: list[Path],
    empty: pa.Schema | None,
    params: dict[str, Any],
    stop: Callable[[], bool] | None = None,
) -> pa.Table:
    """`sql` with the parts as table `parts`; ReduceStopped once `stop()` says so while it runs.

    DuckDB reads the part files itself where it sees them as Arrow would (`_native_parts`);
    otherwise they reach it as a pyarrow dataset of exact paths, whose import costs 0.3-0.5 s
    where pandas is installed (pyarrow's dataset module imports it). With no part, `parts` is
    an empty table of the schema `empty`, so that `SELECT count(*) FROM parts` says 0."""
    import duckdb
    import pyarrow as pa

    con = in_utc(duckdb.connect(":memory:"))
    try:
        if not parts:
            con.register("parts", (empty or pa.schema([("_", pa.null())])).empty_table())
        elif not _native_parts(con, parts):
            import pyarrow.dataset as ds

            con.register("parts", ds.dataset([str(p) for p in parts], format="parquet"))
        with _interrupted(con, stop):
            result: pa.Table = con.sql(sql, params=sql_values(sql, params)).to_arrow_table()
        return result
    except duckdb.InterruptException:
        raise ReduceStopped("stopped while reduce_sql ran: nothing was published") from None
    finally:
        con.close()


@contextlib.contextmanager
def _interrupted(con: duckdb.DuckDBPyConnection, stop: Callable[[], bool] | None) -> Iterator[None]:
    """Interrupt `con`'s query once `stop()` holds (asked every 50 ms): a reduce can take
    minutes, and a stop must not wait for it (systemd kills what outlives its timeout)."""
    if stop is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            if stop():
                con.interrupt()
                return

    watcher = threading.Thread(target=watch, daemon=True, name="reduce-stop")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


GLOB = frozenset("*?[]{}")  # what DuckDB could expand in a path


def _native_parts(con: duckdb.DuckDBPyConnection, parts: list[Path]) -> bool:
    """Make `parts` a view of DuckDB's own Parquet reader over the files if it gives back the
    Arrow types the files declare (so through Arrow DuckDB would see the same columns; a
    duration or a second-precision timestamp, for one, it does not) and no path could be
    globbed. (Scanning an Arrow object, even an empty one, makes DuckDB import pandas.)"""
    import pyarrow.parquet as pq

    from minibatch.reading import parquet_scan

    paths = [str(p) for p in parts]
    if any(GLOB & set(path) or not path.startswith("/") for path in paths):
        return False
    declared = pq.read_schema(paths[0])
    con.execute(f"CREATE VIEW parts AS FROM {parquet_scan(paths, hive_partitioning=0)}")
    seen = con.sql("FROM parts LIMIT 0").to_arrow_table().schema
    if [(f.name, _kept(f.type)) for f in seen] != [(f.name, _kept(f.type)) for f in declared]:
        con.execute("DROP VIEW parts")
        return False
    return True


def _kept(t: pa.DataType) -> pa.DataType:
    """What DuckDB keeps of an Arrow type it reads: not its encoding (dictionary), its offsets'
    width or layout (large, view), the name of its time zone or its nested fields' names."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _kept(t.value_type)
    name = str(t)  # by name: the view types are newer than pyarrow 14
    if name in ("large_string", "string_view"):
        return pa.string()
    if name in ("large_binary", "binary_view"):
        return pa.binary()
    if pa.types.is_timestamp(t) and t.tz is not None:
        return pa.timestamp(t.unit, "UTC")
    if pa.types.is_map(t):
        return pa.map_(_kept(t.key_type), _kept(t.item_type))
    if name.startswith(("list<", "large_list<", "list_view<", "large_list_view<")):
        return pa.list_(_kept(t.value_type))  # type: ignore[attr-defined]
    if pa.types.is_struct(t):
        return pa.struct([(field.name, _kept(field.type)) for field in t])
    return t


def reduce_key(sql: str, definition: str, parts: list[Path]) -> str:
    """What a reduction is built from: the SQL, the job's definition and the part files."""
    files = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(parts)]
    text = "\n".join([sql, definition, *files])
    return hashlib.sha256(text.encode()).hexdigest()
