"""Parquet footers -> chunks. `plan_chunks` is pure; `scan_inputs` only reads footers."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from minibatch.textschema import UNKNOWN

if TYPE_CHECKING:
    import pyarrow.parquet as pq

FOOTER_TAIL = 8  # 4-byte footer length + b"PAR1"
MAX_FOOTER = 128 * 2**20  # larger footers are corrupt or hostile; readers' own limits are lower
NO_CAP = 2**63


@dataclass(frozen=True)
class RowGroup:
    num_rows: int
    nbytes: int  # uncompressed, counting only the projected columns
    decoded: int = 0  # the same columns as Arrow will hold them, estimated; 0: unknown

    @property
    def size(self) -> int:
        return max(self.nbytes, self.decoded)


@dataclass(frozen=True)
class FileMeta:
    path: str
    fingerprint: str
    size: int
    row_groups: tuple[RowGroup, ...]
    signature: tuple[tuple[str, str], ...] = ()  # (name, Arrow type) of each top-level column
    first_row: int = 0  # a text file's: the byte its records start at (see textinput.py)
    lines: tuple[int, ...] = ()  # a text file's: each segment's first line number
    keyed: bool = False  # NDJSON's: columns are read by name, their order in the file is no matter

    @property
    def text(self) -> bool:  # a CSV or NDJSON file: its "row groups" are byte ranges, never split
        return bool(self.lines)


@dataclass(frozen=True)
class BadFile:
    path: str
    fingerprint: str
    size: int
    error: str


@dataclass(frozen=True)
class Chunk:
    """Rows [row_start, row_end) of one file, inside row groups [rg_start, rg_end)."""

    path: str
    fingerprint: str
    row_start: int
    row_end: int
    rg_start: int
    rg_end: int
    rg_row_offset: int  # file row index of row group rg_start's first row
    nbytes: int  # the footer's uncompressed bytes: what chunk_bytes counts
    decoded: int = 0  # estimated bytes as Arrow holds them (not part of the chunk's identity)
    first_line: int = 0  # a text chunk's first line number, for malformed rows (not identity)

    @property
    def size(self) -> int:
        """What memory estimates scale with: the decoded estimate, at least the footer's size."""
        return max(self.nbytes, self.decoded)

    @property
    def chunk_id(self) -> str:
        key = f"{self.path}\0{self.fingerprint}\0{self.row_start}\0{self.row_end}"
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def label(self) -> str:
        return f"{os.path.basename(self.path)}[{self.row_start}:{self.row_end}]"


def plan_chunks(files: Iterable[FileMeta], chunk_bytes: int, max_size: int | None = None) -> list[Chunk]:
    """Every row of every file in exactly one chunk of about `chunk_bytes` uncompressed bytes
    (the footer's) and, where rows allow, of at most `max_size` bytes as Arrow holds them."""
    cap = max_size or NO_CAP
    return [chunk for meta in files for chunk in _plan_file(meta, chunk_bytes, cap)]


def _plan_file(meta: FileMeta, chunk_bytes: int, cap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    run: list[int] = []  # indexes of the row groups being coalesced
    run_bytes = run_size = 0
    offsets = _row_offsets(meta.row_groups, meta.first_row)
    for index, group in enumerate(meta.row_groups):
        size = group.size
        full = run_bytes + group.nbytes > chunk_bytes or run_size + size > cap
        if run and (group.num_rows == 0 or full):
            chunks.append(_coalesced(meta, run, offsets))
            run, run_bytes, run_size = [], 0, 0
        if group.num_rows == 0:
            continue  # no rows to cover, and no chunk spans it
        if (group.nbytes > chunk_bytes or size > cap) and not meta.text:
            chunks.extend(_split(meta, index, offsets[index], chunk_bytes, cap))
        else:
            run.append(index)
            run_bytes += group.nbytes
            run_size += size
    if run:
        chunks.append(_coalesced(meta, run, offsets))
    return chunks


def _row_offsets(groups: Sequence[RowGroup], first: int = 0) -> list[int]:
    offsets, total = [], first
    for group in groups:
        offsets.append(total)
        total += group.num_rows
    return offsets


def _coalesced(meta: FileMeta, run: list[int], offsets: list[int]) -> Chunk:
    first, last = run[0], run[-1]
    return Chunk(
        path=meta.path,
        fingerprint=meta.fingerprint,
        row_start=offsets[first],
        row_end=offsets[last] + meta.row_groups[last].num_rows,
        rg_start=first,
        rg_end=last + 1,
        rg_row_offset=offsets[first],
        nbytes=sum(meta.row_groups[i].nbytes for i in run),
        decoded=sum(meta.row_groups[i].size for i in run),
        first_line=meta.lines[first] if meta.text else 0,
    )


def _split(meta: FileMeta, index: int, offset: int, chunk_bytes: int, cap: int) -> list[Chunk]:
    group = meta.row_groups[index]
    wanted = max(math.ceil(group.nbytes / chunk_bytes), math.ceil(group.size / cap))
    pieces = max(1, min(wanted, group.num_rows))
    bounds = [offset + group.num_rows * i // pieces for i in range(pieces + 1)]
    return [
        Chunk(
            path=meta.path,
            fingerprint=meta.fingerprint,
            row_start=start,
            row_end=end,
            rg_start=index,
            rg_end=index + 1,
            rg_row_offset=offset,
            nbytes=group.nbytes * (end - start) // max(group.num_rows, 1),
            decoded=group.size * (end - start) // max(group.num_rows, 1),
        )
        for start, end in zip(bounds, bounds[1:], strict=False)
    ]


Signature = tuple[tuple[str, str], ...]


def input_signature(files: Sequence[FileMeta], stored: Signature | None) -> Signature | None:
    """The job's input schema: the one an earlier run stored, else the one most files have (on
    a tie, that of the first file in sorted order). Never which file a worker read first."""
    if stored:
        return stored
    counts = Counter(_columns(meta) for meta in files if not typeless(meta))
    if not counts:
        return None
    most = max(counts.values())
    return next(meta.signature for meta in files if counts[_columns(meta)] == most and not typeless(meta))


def typeless(meta: FileMeta) -> bool:
    """A CSV of a header alone: its columns, but no record to type them by (it votes for none);
    an empty text file, without even those."""
    return all(kind == UNKNOWN for _, kind in meta.signature)


def _columns(meta: FileMeta) -> Signature:
    return tuple(sorted(meta.signature)) if meta.keyed else meta.signature


def misfits(meta: FileMeta, signature: Signature, columns: Sequence[str] | None) -> str | None:
    """Why a file does not fit the job's input schema (only `columns` count when given), or None."""
    if not meta.signature:  # an empty text file
        return None
    have, want = dict(meta.signature), dict(signature)
    names = list(columns) if columns else [name for name, _ in signature]
    known = [n for n in names if n in want]
    problems = [
        f"{n} is {have[n]}, expected {want[n]}"
        for n in known
        if have.get(n, want[n]) not in (want[n], UNKNOWN)
    ]
    problems += [f"{n} ({want[n]}) missing" for n in known if n not in have]
    if not columns:
        problems += [f"{n} ({t}) unexpected" for n, t in meta.signature if n not in want]
        if not problems and not meta.keyed and [n for n, _ in meta.signature] != [n for n, _ in signature]:
            problems.append("the same columns in another order")
    if not problems:
        return None
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return "InputSchemaError: schema differs from the job's input schema: " + "; ".join(problems[:5]) + more


def scan_inputs(
    paths: Iterable[str], columns: Sequence[str] | None, stop: Callable[[], bool] = lambda: False,
    read: Callable[[str], FileMeta] | None = None,
) -> tuple[list[FileMeta], list[BadFile]]:  # fmt: skip
    """Read each file's footer; a file whose footer cannot be read is a BadFile, never a crash.
    Returns early, with what it read, once `stop()` is true."""
    good: list[FileMeta] = []
    bad: list[BadFile] = []  # `read`: a reader of other formats (textinput.read_text_meta)
    for path in paths:
        if stop():
            break
        try:
            good.append(read(path) if read else read_file_meta(path, columns))
        except Exception as exc:  # a reader's error makes the file bad, not the run
            if isinstance(exc, OSError) and exc.errno is not None:  # the OS's: pyarrow's have none
                raise InputUnreadable(path, exc) from None
            bad.append(_bad_file(path, exc))
    return good, bad


class InputUnreadable(Exception):
    """An input the OS will not let us read (its mode or owner changed, a share's credentials
    expired, an I/O error; at planning also removed since the glob). Not a bad file, whose
    fingerprint would change and whose results would go: the planner stops the run before it
    plans; a worker's chunk is the machine's fault, not charged."""

    def __init__(self, path: str, exc: OSError | str) -> None:
        printable = path.encode("utf-8", "backslashreplace").decode()
        why = exc if isinstance(exc, str) else exc.strerror or str(exc)
        super().__init__(f"{printable}: cannot be read ({why})")


def read_file_meta(path: str, columns: Sequence[str] | None) -> FileMeta:
    import pyarrow.parquet as pq

    try:
        path.encode()
    except UnicodeEncodeError:  # the manifest, logs and JSON could not hold it
        raise ValueError("the file name is not valid UTF-8; rename the file") from None
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        fingerprint = footer_fingerprint(handle, stat)
        metadata = pq.ParquetFile(handle).metadata
    return FileMeta(
        path=path,
        fingerprint=fingerprint,
        size=stat.st_size,
        row_groups=tuple(_row_groups(metadata, columns)),
        signature=tuple((f.name, str(f.type)) for f in metadata.schema.to_arrow_schema()),
    )


def _read_footer(handle: BinaryIO, size: int) -> bytes:
    if size < 12:
        raise ValueError(f"file is {size} bytes, too small to be Parquet")
    handle.seek(size - FOOTER_TAIL)
    tail = handle.read(FOOTER_TAIL)
    if tail[4:] != b"PAR1":
        raise ValueError("not a Parquet file (no PAR1 magic at the end)")
    length = int.from_bytes(tail[:4], "little")
    if length + 12 > size:
        raise ValueError(f"footer length {length} exceeds the file size {size}")
    if length > MAX_FOOTER:
        raise ValueError(f"footer length {length} exceeds the {MAX_FOOTER} bytes minibatch reads")
    handle.seek(size - FOOTER_TAIL - length)
    return handle.read(length)


def _row_groups(md: pq.FileMetaData, columns: Sequence[str] | None) -> Iterable[RowGroup]:
    indexes = _column_indexes(md, columns) if columns else range(md.num_columns)
    widths = [_width(md.schema.column(j)) for j in range(md.num_columns)]
    for i in range(md.num_row_groups):
        group = md.row_group(i)
        chunks = [(group.column(j), widths[j]) for j in indexes]
        nbytes = group.total_byte_size if not columns else sum(c.total_uncompressed_size for c, _ in chunks)
        yield RowGroup(group.num_rows, nbytes, sum(_decoded(c, width) for c, width in chunks))


WIDTHS = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}


def _width(column: pq.ColumnSchema) -> int | None:
    """Bytes a value takes in Arrow, for fixed-width types (None: variable, such as strings)."""
    if column.physical_type == "FIXED_LEN_BYTE_ARRAY":
        return int(column.length or 0)
    return WIDTHS.get(column.physical_type)


def _decoded(chunk: pq.ColumnChunkMetaData, width: int | None) -> int:
    """A column chunk's size in Arrow, estimated from its footer entry: dictionary and run-length
    encodings make the footer's uncompressed size a fraction of it (four 500-byte strings
    repeated: a few bytes a row in the footer, 504 in Arrow). Strings are costed at the mean
    length of their min and max statistics, plus an offset each."""
    footer = int(chunk.total_uncompressed_size)
    if width is not None:
        return max(footer, chunk.num_values * width)
    try:  # statistics are the writer's word: an estimate must never make a file unreadable
        stats = chunk.statistics if chunk.is_stats_set else None
        low, high = (stats.min, stats.max) if stats is not None and stats.has_min_max else (None, None)
    except Exception:
        return footer
    if not isinstance(low, str | bytes) or not isinstance(high, str | bytes):
        return footer
    return max(footer, chunk.num_values * ((len(low) + len(high)) // 2 + 4))


def _column_indexes(md: pq.FileMetaData, columns: Sequence[str]) -> list[int]:
    schema = md.schema
    tops = [schema.column(j).path.split(".")[0] for j in range(len(schema))]
    missing = [c for c in columns if c not in tops]
    if missing:
        raise ValueError(f"columns not in file: {', '.join(missing)}")
    return [j for j, top in enumerate(tops) if top in columns]


def footer_fingerprint(handle: BinaryIO, stat: os.stat_result) -> str:
    """The fingerprint of the Parquet file open as `handle` now (ValueError: not Parquet)."""
    return _fingerprint(stat.st_size, stat.st_mtime_ns, _read_footer(handle, stat.st_size))


def _fingerprint(size: int, mtime_ns: int, footer: bytes) -> str:
    digest = hashlib.sha256(footer).hexdigest()[:16]
    return f"{size}-{mtime_ns}-{digest}"


def _bad_file(path: str, exc: Exception) -> BadFile:
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            handle.seek(max(0, stat.st_size - 65536))
            tail = handle.read()
    except OSError as again:
        raise InputUnreadable(path, again) from None
    fingerprint = _fingerprint(stat.st_size, stat.st_mtime_ns, tail)
    printable = path.encode("utf-8", "backslashreplace").decode()
    error = f"{type(exc).__name__}: {exc}"
    return BadFile(path=printable, fingerprint=fingerprint, size=stat.st_size, error=error)
