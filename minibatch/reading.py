"""How a worker reads a chunk's rows from its file: pyarrow for a `process` job (whole row
groups, or a slice's own pages), DuckDB for a `sql` job (the file read by DuckDB itself).
Either way from a descriptor opened and checked against the chunk's fingerprint."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import pyarrow as pa
import pyarrow.parquet as pq

from minibatch.pageslice import read_rows
from minibatch.params import in_utc, sql_values
from minibatch.planner import Chunk, InputUnreadable, footer_fingerprint
from minibatch.records import fingerprint_stat
from minibatch.tasks import InputChanged, InputRemoved, JobSpec, Task
from minibatch.textinput import text_fingerprint
from minibatch.textread import TextRows, read_text_chunk

if TYPE_CHECKING:
    import duckdb

_footers: dict[tuple[str, str, int, int, int], tuple[pq.FileMetaData, list[str]]] = {}  # and INT96 columns
SQL_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "threads": 1,
    "enable_external_file_cache": False,
}
_local = threading.local()  # a DuckDB connection per thread (a Dask worker may have several)
FILES_PER_CONNECTION = 32  # files a thread's DuckDB reads before a fresh one: bounds its footer cache


def read_chunk(chunk: Chunk, columns: tuple[str, ...] | None) -> pa.Table:
    """The chunk's rows, read by the worker itself from the file (never sent through a pipe)."""
    with _open_input(chunk) as handle:
        table = _read_open(chunk, handle, list(columns) if columns else None)
    table.validate(full=True)  # untrusted input: fail here, not inside the job's code
    if table.num_rows != chunk.num_rows:  # a reader that stops early must not lose rows quietly
        raise ValueError(f"{chunk.path}: read {table.num_rows} rows of the chunk's {chunk.num_rows}")
    return table


def read_text(task: Task) -> TextRows:
    """A CSV or NDJSON chunk's records in the job's input schema (decided at planning)."""
    assert task.job.text is not None and task.job.input_schema is not None
    signature = tuple((name, kind) for name, kind in json.loads(task.job.input_schema))
    with _open_input(task.chunk) as handle:  # one descriptor, checked before and after the read
        before = os.fstat(handle.fileno())
        _check_unchanged(task.chunk, before)
        if text_fingerprint(handle.fileno(), before) != task.chunk.fingerprint:  # cp -p, rsync -t
            raise InputChanged(f"{task.chunk.path} changed since it was planned (its first or last 64 KiB)")
        rows = read_text_chunk(task.chunk, handle, task.job.text, signature)
        after = os.fstat(handle.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise InputChanged(f"{task.chunk.path} changed while it was read")
    if task.job.columns:
        rows.table = rows.table.select(list(task.job.columns))
    return rows


def sql_on_table(job: JobSpec, table: pa.Table) -> pa.Table:
    """The job's SQL with `chunk` the rows of `table` (a text chunk, parsed)."""
    held = _local.sql = getattr(_local, "sql", None) or _HeldInput()
    held.con.register("chunk", table)
    try:
        result = held.con.sql(
            cast(str, job.sql), params=sql_values(job.sql, dict(job.params))
        ).to_arrow_table()
    finally:
        held.con.unregister("chunk")
    return cast(pa.Table, result)


def _read_open(chunk: Chunk, handle: Any, cols: list[str] | None) -> pa.Table:
    stat = os.fstat(handle.fileno())
    _check_unchanged(chunk, stat)
    metadata, int96 = _footer(chunk, handle, stat)
    parquet = pq.ParquetFile(handle, metadata=metadata)  # Spark's INT96: ns, exact where it fits
    table = _rows(parquet, chunk, cols, handle.fileno())
    if top := [n for n in table.column_names if any(leaf == n or leaf.startswith(f"{n}.") for leaf in int96)]:
        micro = _rows(
            pq.ParquetFile(handle, metadata=metadata, coerce_int96_timestamp_unit="us"), chunk, top, None
        )
        _check_int96(chunk, table, micro)
    return table


def _rows(parquet: pq.ParquetFile, chunk: Chunk, cols: list[str] | None, fd: int | None) -> pa.Table:
    groups = range(chunk.rg_start, chunk.rg_end)
    group_rows = sum(parquet.metadata.row_group(i).num_rows for i in groups)
    if chunk.row_start == chunk.rg_row_offset and chunk.num_rows == group_rows:
        return parquet.read_row_groups(list(groups), columns=cols)
    if fd is None:  # (slicing pages makes a reader of its own, without the INT96 unit)
        arrow = parquet.schema_arrow
        return _read_batches(parquet, chunk, cols, pa.schema([arrow.field(c) for c in cols or arrow.names]))
    return _read_slice(parquet, chunk, cols, fd)


def _check_int96(chunk: Chunk, table: pa.Table, micro: pa.Table) -> None:
    """pyarrow reads INT96 as timestamp[ns] and wraps what lies outside 1677-2262 (9999-12-31, a
    usual "valid to", came out as 1816), at any depth in a struct or list: each value is checked
    against the same read as microseconds, which hold any (a wrapped one is centuries off)."""
    import pyarrow.compute as pc

    for name in micro.column_names:
        for ns, us in zip(_timestamps(table[name]), _timestamps(micro[name]), strict=True):
            if ns.type.unit != "ns" or us.type.unit != "us":  # not INT96: read alike both times
                continue
            off = pc.max(
                pc.abs(pc.subtract(pc.divide(ns.cast(pa.int64()), 1000), us.cast(pa.int64())))
            ).as_py()
            if off is not None and off > 1:
                raise ValueError(
                    f"{chunk.path}: column {name!r} holds an INT96 timestamp outside 1677-2262, the range of "
                    "timestamp[ns] pyarrow reads it as; a job with `sql` reads it exactly"
                )


def _timestamps(column: Any) -> Iterator[Any]:
    """The timestamp arrays in a column, at any depth, in the same order for the same type."""
    array: Any = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_timestamp(array.type):
        yield array
    elif pa.types.is_struct(array.type):
        for i in range(array.type.num_fields):
            yield from _timestamps(array.field(i))
    elif pa.types.is_map(array.type):
        yield from _timestamps(array.keys)
        yield from _timestamps(array.items)
    elif isinstance(array.type, pa.ListType | pa.LargeListType | pa.FixedSizeListType):
        yield from _timestamps(array.flatten())


def _footer(chunk: Chunk, handle: Any, stat: os.stat_result) -> tuple[pq.FileMetaData, list[str]]:
    """The file's parsed footer, checked against the plan's, and its INT96 columns, kept per
    file and version (inode, ctime: any write changes it): small chunks of a file with many row
    groups would otherwise spend most of their time parsing the same footer."""
    key = (chunk.path, chunk.fingerprint, stat.st_dev, stat.st_ino, stat.st_ctime_ns)
    found = _footers.get(key)
    if found is None:
        _check_footer(chunk, handle, stat)
        if len(_footers) >= 16:
            _footers.clear()
        metadata = pq.read_metadata(handle)
        columns = map(metadata.schema.column, range(metadata.num_columns))
        found = _footers[key] = metadata, [c.path for c in columns if c.physical_type == "INT96"]
    return found


def _check_footer(chunk: Chunk, handle: Any, stat: os.stat_result) -> None:
    """Size and mtime say too little: `cp -p`, `rsync -t` and `touch -r` keep both for a file
    that is another. Its footer then differs (other rows, other row groups or statistics)."""
    try:
        same = footer_fingerprint(handle, stat) == chunk.fingerprint
    except ValueError:  # no longer Parquet at all
        same = False
    if not same:
        raise InputChanged(f"{chunk.path} changed since it was planned (its footer is not the one planned)")


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
    columns, damaged = read_rows(fd, key, chunk.rg_start, start, start + chunk.num_rows, names)
    if damaged:  # pages that did not decode: the whole group's read raises, as it would unsliced
        whole = parquet.read_row_group(chunk.rg_start, columns=damaged).slice(start, chunk.num_rows)
        columns.update(zip(damaged, whole.columns, strict=True))
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


@contextlib.contextmanager
def _open_input(chunk: Chunk) -> Iterator[BinaryIO]:
    """The chunk's file, open; the OS's errors opening or reading it (its mode, a share's
    credentials, an I/O error) are InputUnreadable: the machine's fault, not the chunk's."""
    try:
        handle = open(chunk.path, "rb")  # noqa: SIM115 (closed below, its errors told apart)
    except FileNotFoundError:
        raise _removed(chunk) from None
    except OSError as exc:
        raise InputUnreadable(chunk.path, exc) from None
    with handle:
        try:
            yield handle
        except OSError as exc:
            if exc.errno is None:  # pyarrow's parse errors: the data's fault
                raise
            raise InputUnreadable(chunk.path, exc) from None


def _check_unchanged(chunk: Chunk, stat: os.stat_result) -> None:
    if (stat.st_size, stat.st_mtime_ns) != fingerprint_stat(chunk.fingerprint):
        raise InputChanged(f"{chunk.path} changed since it was planned")


def sql_on_file(job: JobSpec, chunk: Chunk) -> pa.Table:
    """Run the job's SQL with `chunk` a view of the chunk's rows, read by DuckDB from the file.

    DuckDB reads the descriptor we opened and checked (/proc/self/fd/N), never the path: it
    would expand `[`, `*` and `?` in a file's name as a glob, and a path may change under us."""
    from duckdb import ColumnExpression, IOException

    lowered = (name.lower() for name, _ in json.loads(job.input_schema or "[]"))
    if "file_row_number" in lowered:  # the name of DuckDB's own row numbers, which pick the chunk's rows
        return sql_on_table(job, read_chunk(chunk, job.columns))
    held = _local.sql = getattr(_local, "sql", None) or _HeldInput()
    fd = held.open(chunk)
    before = os.fstat(fd)
    _check_unchanged(chunk, before)
    rows = held.con.sql(f"FROM {parquet_scan([f'/proc/self/fd/{fd}'], file_row_number=1)}")
    rows = rows.filter(f"file_row_number BETWEEN {int(chunk.row_start)} AND {int(chunk.row_end) - 1}")
    names = list(job.columns) if job.columns else [c for c in rows.columns if c != "file_row_number"]
    rows.project(*[ColumnExpression(name) for name in names]).create_view("chunk", replace=True)
    try:
        result = held.con.sql(
            cast(str, job.sql), params=sql_values(job.sql, dict(job.params))
        ).to_arrow_table()
    except IOException as exc:  # "Could not read from file "/proc/self/fd/4": Input/output error"
        if f'"/proc/self/fd/{fd}"' not in str(exc):  # a file the job's SQL reads itself
            raise
        raise InputUnreadable(chunk.path, str(exc).rpartition(": ")[2]) from None
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise InputChanged(f"{chunk.path} changed while it was read")
    return cast(pa.Table, result)


def parquet_scan(files: list[str], **options: int) -> str:
    """DuckDB's `read_parquet` of exactly these files (no glob characters in them: checked by
    the caller), as SQL. Always with can_have_nan: Parquet's min/max statistics leave NaN out,
    and DuckDB would prune by them the row groups whose only matching rows are NaN
    (`isnan(x)`, `x > 5`, `x <> 1`), losing those rows."""
    listed = ", ".join("'" + name.replace("'", "''") + "'" for name in files)
    settings = "".join(f", {key} = {int(value)}" for key, value in options.items())
    return f"read_parquet([{listed}]{settings}, can_have_nan = 1)"


class _HeldInput:
    """A thread's DuckDB, and the input file it keeps open from chunk to chunk so its footer is parsed
    once (parquet_metadata_cache). DuckDB keys that by the name /proc/self/fd/N, checks only the mtime
    in seconds, and a closed N may name another file: so a file is held under a number above all this
    DuckDB has seen (F_DUPFD), and after FILES_PER_CONNECTION files a fresh DuckDB starts over."""

    def __init__(self) -> None:
        self.fd, self.key = -1, ("", "", 0, 0, 0)
        self.con, self.next_fd, self.files = _sql_connection(), 3, 0

    def open(self, chunk: Chunk) -> int:
        """The descriptor of the file the chunk's path names now: the one held if it is the same
        file (device, inode, ctime) and the chunk was planned with the same fingerprint, else a new
        one, its footer checked against the plan's."""
        with _open_input(chunk) as handle:
            stat = os.fstat(handle.fileno())
            key = (chunk.path, chunk.fingerprint, stat.st_dev, stat.st_ino, stat.st_ctime_ns)
            if key != self.key:
                _check_unchanged(chunk, stat)
                _check_footer(chunk, handle, stat)
                self.release()
                if self.files >= FILES_PER_CONNECTION or self.next_fd >= _open_files_limit():
                    self.con.close()  # (a number at the limit is EINVAL, not a file unreadable)
                    self.con, self.next_fd, self.files = _sql_connection(), 3, 0
                self.fd = fcntl.fcntl(handle.fileno(), fcntl.F_DUPFD_CLOEXEC, self.next_fd)
                self.next_fd, self.key, self.files = self.fd + 1, key, self.files + 1
        return self.fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd, self.key = -1, ("", "", 0, 0, 0)


def _open_files_limit() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 2**31 - 1


def _sql_connection() -> duckdb.DuckDBPyConnection:
    import duckdb  # here, not at the top: a worker of a job without SQL never needs it

    return in_utc(duckdb.connect(":memory:", config=SQL_CONFIG).execute("SET parquet_metadata_cache = true"))


def _removed(chunk: Chunk) -> InputRemoved:
    """A removed input file is changed input, not an error of the chunk."""
    return InputRemoved(f"{chunk.path} was removed since it was planned")


def release_held() -> None:
    """Close the input this thread's DuckDB holds open (an idle worker may see it deleted)."""
    if hasattr(_local, "sql"):
        _local.sql.release()
