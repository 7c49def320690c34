"""Parquet footers -> chunks. `plan_chunks` is pure; `scan_inputs` only reads footers."""

from __future__ import annotations

import glob
import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import pyarrow.parquet as pq

FOOTER_TAIL = 8  # 4-byte footer length + b"PAR1"


@dataclass(frozen=True)
class RowGroup:
    num_rows: int
    nbytes: int  # uncompressed, counting only the projected columns


@dataclass(frozen=True)
class FileMeta:
    path: str
    fingerprint: str
    size: int
    row_groups: tuple[RowGroup, ...]


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
    nbytes: int

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


def plan_chunks(files: Iterable[FileMeta], chunk_bytes: int) -> list[Chunk]:
    """Every row of every file in exactly one chunk of about `chunk_bytes` uncompressed bytes."""
    return [chunk for meta in files for chunk in _plan_file(meta, chunk_bytes)]


def _plan_file(meta: FileMeta, chunk_bytes: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    run: list[int] = []  # indexes of the row groups being coalesced
    run_bytes = 0
    offsets = _row_offsets(meta.row_groups)
    for index, group in enumerate(meta.row_groups):
        if run and (group.num_rows == 0 or run_bytes + group.nbytes > chunk_bytes):
            chunks.append(_coalesced(meta, run, offsets))
            run, run_bytes = [], 0
        if group.num_rows == 0:
            continue  # no rows to cover, and no chunk spans it
        if group.nbytes > chunk_bytes:
            chunks.extend(_split(meta, index, offsets[index], chunk_bytes))
        else:
            run.append(index)
            run_bytes += group.nbytes
    if run:
        chunks.append(_coalesced(meta, run, offsets))
    return chunks


def _row_offsets(groups: Sequence[RowGroup]) -> list[int]:
    offsets, total = [], 0
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
    )


def _split(meta: FileMeta, index: int, offset: int, chunk_bytes: int) -> list[Chunk]:
    group = meta.row_groups[index]
    pieces = max(1, min(math.ceil(group.nbytes / chunk_bytes), group.num_rows))
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
        )
        for start, end in zip(bounds, bounds[1:], strict=False)
    ]


def expand_inputs(base_dir: Path, patterns: Iterable[str]) -> list[str]:
    """Absolute paths of the files the globs match, sorted, each once."""
    found: set[str] = set()
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(base_dir / pattern)
        found.update(os.path.abspath(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    return sorted(found)


def scan_inputs(paths: Iterable[str], columns: Sequence[str] | None) -> tuple[list[FileMeta], list[BadFile]]:
    """Read each file's footer; a file whose footer cannot be read is a BadFile, never a crash."""
    good: list[FileMeta] = []
    bad: list[BadFile] = []
    for path in paths:
        try:
            good.append(read_file_meta(path, columns))
        except Exception as exc:  # any reader error makes the file bad, not the run
            bad.append(_bad_file(path, exc))
    return good, bad


def read_file_meta(path: str, columns: Sequence[str] | None) -> FileMeta:
    import pyarrow.parquet as pq

    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        footer = _read_footer(handle, stat.st_size)
        metadata = pq.ParquetFile(handle).metadata
    fingerprint = _fingerprint(stat.st_size, stat.st_mtime_ns, footer)
    return FileMeta(
        path=path,
        fingerprint=fingerprint,
        size=stat.st_size,
        row_groups=tuple(_row_groups(metadata, columns)),
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
    handle.seek(size - FOOTER_TAIL - length)
    return handle.read(length)


def _row_groups(md: pq.FileMetaData, columns: Sequence[str] | None) -> Iterable[RowGroup]:
    indexes = _column_indexes(md, columns) if columns else None
    for i in range(md.num_row_groups):
        group = md.row_group(i)
        if indexes is None:
            nbytes = group.total_byte_size
        else:
            nbytes = sum(group.column(j).total_uncompressed_size for j in indexes)
        yield RowGroup(num_rows=group.num_rows, nbytes=nbytes)


def _column_indexes(md: pq.FileMetaData, columns: Sequence[str]) -> list[int]:
    schema = md.schema
    tops = [schema.column(j).path.split(".")[0] for j in range(len(schema))]
    missing = [c for c in columns if c not in tops]
    if missing:
        raise ValueError(f"columns not in file: {', '.join(missing)}")
    return [j for j, top in enumerate(tops) if top in columns]


def _fingerprint(size: int, mtime_ns: int, footer: bytes) -> str:
    digest = hashlib.sha256(footer).hexdigest()[:16]
    return f"{size}-{mtime_ns}-{digest}"


def _bad_file(path: str, exc: Exception) -> BadFile:
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            handle.seek(max(0, stat.st_size - 65536))
            tail = handle.read()
        fingerprint = _fingerprint(stat.st_size, stat.st_mtime_ns, tail)
        size = stat.st_size
    except OSError:
        fingerprint, size = "unreadable", 0
    return BadFile(path=path, fingerprint=fingerprint, size=size, error=f"{type(exc).__name__}: {exc}")
