"""CSV and NDJSON inputs (plain, .gz or .zst): planned as byte ranges, read by workers.

A plain file is cut at record boundaries into segments of about SEGMENT bytes (the planner
coalesces them into chunks of `chunk_bytes`): for NDJSON every newline is a boundary; for
CSV a newline is one only outside quotes, which a scan of the file that counts quote bytes
decides (RFC 4180 quotes are doubled inside fields, so the parity of the count says whether
a position is inside a quoted field). A compressed file cannot be entered in the middle and
is one chunk. Each segment's first line number is kept, for malformed rows' line numbers.

The schema is the job's `schema`, or inferred from the first SAMPLE bytes of each file: a
file whose schema differs from the job's is a bad file (planner.misfits), never a crash.
Rows that do not parse (wrong field count, a value of the wrong type, broken JSON) are
counted and written, with their line number and text, to the job's malformed directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, cast

from minibatch.checking import Checker, choice
from minibatch.planner import FileMeta, RowGroup
from minibatch.textschema import BOM, UNKNOWN, Signature, infer, type_or_none

SEGMENT = 4 * 2**20  # at most: a quarter of chunk_bytes when that is smaller (segment_size)
SAMPLE = 2**20
BLOCK = 16 * 2**20
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
QUOTE, NEWLINE = ord('"'), ord("\n")
INFERENCE = "inferred-2"  # how schemas are inferred: a change recomputes what was read under the old way


@dataclass(frozen=True)
class TextFormat:
    format: str  # csv | ndjson
    schema: Signature = ()  # (column, Arrow type); () to infer from a sample
    delimiter: str = ","
    header: bool = True


def parse_text(c: Checker) -> TextFormat | None:
    kind = choice(c, "format", ("parquet", "csv", "ndjson"), "parquet")
    schema = c.get("schema", dict, {})
    for name, kind_name in schema.items():
        if not isinstance(kind_name, str) or type_or_none(kind_name) is None:
            c.error(
                f"schema.{name}",
                f'expected an Arrow type such as "int64", "double", "string", got {kind_name!r}',
            )
    delimiter = c.get("csv_delimiter", str, ",")
    if len(delimiter) != 1 or delimiter in '"\r\n':
        c.error("csv_delimiter", f"must be one character, not a quote or newline, got {delimiter!r}")
    header = c.get("csv_header", bool, True)
    if kind == "parquet":
        for key in ("schema", "csv_delimiter", "csv_header"):
            if key in c.table:
                c.error(key, 'applies to text inputs: set format = "csv" or "ndjson"')
        return None
    if kind == "csv" and not header and not schema:
        c.error("csv_header", "a CSV without a header needs a schema naming its columns")
    return TextFormat(kind, tuple((str(k), str(v)) for k, v in schema.items()), delimiter, header)


def text_facts(text: TextFormat | None) -> dict[str, Any]:
    """What a chunk's rows depend on besides its bytes (absent for Parquet: keys stay)."""
    if not text:
        return {}
    facts: list[Any] = [text.format, list(text.schema), text.delimiter, text.header]
    return {"text": facts if text.schema else [*facts, INFERENCE]}


# -- planning -----------------------------------------------------------------------------------


def segment_size(chunk_bytes: int) -> int:
    return max(2**16, min(SEGMENT, chunk_bytes // 4))


def read_text_meta(
    path: str, text: TextFormat, segment: int = SEGMENT, cache: Path | None = None
) -> FileMeta:
    """A text file's segments (as FileMeta row groups whose "rows" are bytes), its schema
    and a fingerprint of its size, mtime and first and last 64 KiB. With `cache` (a
    directory), the scan of a file seen before with this fingerprint is not done again."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        head = handle.read(65536)
        fingerprint = text_fingerprint(handle.fileno(), stat)
        key = hashlib.sha256(json.dumps([path, fingerprint, text_facts(text), segment]).encode()).hexdigest()
        known = _cached(cache / f"{key[:32]}.json") if cache else None
        keyed = text.format == "ndjson"
        if known is not None:
            return FileMeta(path, fingerprint, stat.st_size, **known, keyed=keyed)
        meta = _scan(handle, path, text, segment, head, stat.st_size)
    if cache:
        _store(cache / f"{key[:32]}.json", meta)
    return replace(meta, fingerprint=fingerprint, keyed=keyed)


def text_fingerprint(fd: int, stat: os.stat_result) -> str:
    """Size, mtime and a digest of the first and last 64 KiB of the file open as `fd`."""
    head = os.pread(fd, 65536, 0)
    tail = os.pread(fd, 65536, max(0, stat.st_size - 65536))
    return f"{stat.st_size}-{stat.st_mtime_ns}-{hashlib.sha256(head + tail).hexdigest()[:16]}"


def _scan(handle: BinaryIO, path: str, text: TextFormat, segment: int, head: bytes, size: int) -> FileMeta:
    compression = compression_of(path)
    sample, whole = _sample(handle, compression)
    # an empty day's export (a BOM alone, as Excel writes it): no column, no row: it fits any schema
    if whole and not sample.removeprefix(BOM).strip():
        return FileMeta(path, "", size, (), (), 0, ())
    signature = _by_header(sample, text) if text.schema else infer(sample, text.format, text.delimiter)
    if not whole and all(kind == UNKNOWN for _, kind in signature):
        raise ValueError(
            f"no whole record in the first {SAMPLE:,} bytes to infer a schema from: declare `schema`"
        )
    if compression:
        groups, lines, first = [RowGroup(size, size, 3 * size)], [1], 0
    else:
        first, lines_before = _data_start(head, text)
        bounds, lines = _segments(handle, first, size, text, lines_before, segment)
        groups = [RowGroup(b - a, b - a, 2 * (b - a)) for a, b in zip(bounds, bounds[1:], strict=False)]
    return FileMeta(path, "", size, tuple(groups), signature, first, tuple(lines))


def _by_header(sample: bytes, text: TextFormat) -> Signature:
    """The schema's columns in the order of the file's header (a CSV with one): the worker
    reads fields by position, so a file whose header names other columns is a bad file."""
    if text.format != "csv" or not text.header:
        return text.schema
    import pyarrow.csv as pacsv

    end = header_end(sample, text.delimiter)
    line = sample[: end + 1] if end >= 0 else sample + b"\n"
    options = pacsv.ParseOptions(delimiter=text.delimiter)
    header = pacsv.read_csv(io.BytesIO(line), parse_options=options).column_names
    types = dict(text.schema)
    if sorted(header) != sorted(types):
        raise ValueError(f"its header names columns {header}, the schema {list(types)}")
    return tuple((name, types[name]) for name in header)


def _cached(place: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(place.read_text())
    except (OSError, ValueError):
        return None
    return {
        "row_groups": tuple(RowGroup(*group) for group in raw["row_groups"]),
        "signature": tuple((name, kind) for name, kind in raw["signature"]),
        "first_row": raw["first_row"], "lines": tuple(raw["lines"]),
    }  # fmt: skip


def _store(place: Path, meta: FileMeta) -> None:
    """Best effort (a cache): written whole or not at all."""
    raw = {
        "row_groups": [[g.num_rows, g.nbytes, g.decoded] for g in meta.row_groups],
        "signature": meta.signature, "first_row": meta.first_row, "lines": meta.lines,
    }  # fmt: skip
    try:
        place.parent.mkdir(parents=True, exist_ok=True)
        temp = place.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(raw))
        os.replace(temp, place)
    except OSError:
        pass


def compression_of(path: str) -> str | None:
    return next((name for ext, name in COMPRESSED.items() if path.endswith(ext)), None)


def decompress(raw: bytes, compression: str) -> bytes:
    """A whole compressed file's text (read by the caller from a descriptor it keeps open)."""
    import pyarrow as pa

    data: bytes = pa.CompressedInputStream(pa.BufferReader(raw), cast(Any, compression)).read()
    return data


def open_stream(handle: BinaryIO, compression: str | None) -> Any:
    import pyarrow as pa

    handle.seek(0)
    return (
        pa.CompressedInputStream(pa.PythonFile(cast(Any, handle), mode="r"), cast(Any, compression))
        if compression
        else handle
    )


def _sample(handle: BinaryIO, compression: str | None) -> tuple[bytes, bool]:
    """The first SAMPLE bytes, cut after their last newline; and whether that is the whole file."""
    data: bytes = open_stream(handle, compression).read(SAMPLE)
    cut = data.rfind(b"\n")
    return (data[: cut + 1], False) if cut >= 0 and len(data) == SAMPLE else (data, len(data) < SAMPLE)


def _data_start(head: bytes, text: TextFormat) -> tuple[int, int]:
    """Where records start (after a CSV's header line), and the lines before that."""
    if text.format != "csv" or not text.header:
        return 0, 0
    end = header_end(head, text.delimiter)
    if end < 0 and len(head) < 65536:  # the whole file is its header, without a newline: no records
        return len(head), 1
    if end < 0:
        raise ValueError("no newline in the first 64 KiB: not a CSV file with a header line")
    return end + 1, head.count(b"\n", 0, end) + 1


def header_end(data: bytes, delimiter: str) -> int:
    """The newline that ends a CSV's header (-1: none): the first one outside quotes, since a
    quoted header field may hold a line break (Excel writes one for a multi-line cell). Only a
    quote that begins a field opens one (`len"` is a name with a quote in it)."""
    end = data.find(b"\n")
    if b'"' not in data[: max(end, 0)]:
        return end  # the usual header: no quote before its first newline
    quoted, start, sep, i = False, True, ord(delimiter), 0
    while i < len(data):
        byte = data[i]
        if quoted:
            if byte == QUOTE:
                quoted = data[i + 1 : i + 2] == b'"'  # "" inside: still quoted
                i += quoted
        elif byte == NEWLINE:
            return i
        elif byte == QUOTE and start:
            quoted = True
        start = not quoted and byte == sep
        i += 1
    return -1


def _segments(
    handle: BinaryIO, start: int, size: int, text: TextFormat, lines_before: int, segment: int = SEGMENT
) -> tuple[list[int], list[int]]:
    """Boundaries [start, ..., size] about `segment` apart at record starts, and each segment's
    first line number (1-based)."""
    quoted = text.format == "csv"
    plain = rb'[^"\r\n' + re.escape(text.delimiter.encode()) + rb"]"  # a byte inside a field
    stray = re.compile(rb'"(?<=' + plain + rb'")(?=' + plain + rb")")  # 5" floppy (quote first: fast)
    # Quotes taken two by two (an opening one, then its closing one, by the count) until an
    # opening one follows a field's byte: a field opens only at its first byte (5", a stray quote
    # at a field's end). Possessive: no backtracking, one pass at C speed.
    mid_field = re.compile(rb'(?:[^"]*+(?<!' + plain + rb')"[^"]*+")*+[^"]*+(?<=' + plain + rb')"')
    bounds, lines = [start], [lines_before + 1]
    quotes = newlines = 0  # counted from `start` up to `pos`
    pos, target = start, start + segment
    handle.seek(start)
    last = b"\n"  # the byte before the block
    while pos < size:
        block = handle.read(BLOCK)
        if not block:
            break
        if quoted and (stray.search(block) or _opens_mid_field(last + block, quotes, mid_field)):
            return [start, size], [lines_before + 1]  # quote counts mean nothing: never cut this file
        last = block[-1:]
        search = max(target - pos, 0)
        done = q = n = 0  # block[:done] is counted: q quotes, n newlines (each byte counted once)
        while search < len(block):
            cut = block.find(b"\n", search)
            if cut < 0:
                break
            q += block.count(b'"', done, cut) if quoted else 0
            n += block.count(b"\n", done, cut)
            done = cut
            if (quotes + q) % 2:  # inside a quoted field
                search = cut + 1
                continue
            bounds.append(pos + cut + 1)
            lines.append(lines_before + 1 + newlines + n + 1)
            search = cut + 1 + segment
        quotes += q + (block.count(b'"', done) if quoted else 0)
        newlines += n + block.count(b"\n", done)
        pos += len(block)
        target = max(target, bounds[-1] + segment)
    if bounds[-1] < size:
        bounds.append(size)
    else:
        lines.pop()
    return bounds, lines


def _opens_mid_field(data: bytes, before: int, mid_field: re.Pattern[bytes]) -> bool:
    """Whether a quote that follows a field's byte would open a quoted field by the count (an
    even number of quotes before it): a field opens only at its first byte, so the quote is a
    stray one in an unquoted field (`5",`) and the count is off from there. `data` is the block
    after the byte before it; `before` counts the quotes before the block."""
    pos = 1
    if b'"' not in data:
        return False
    if before % 2:  # inside a quoted field: its closing quote first
        pos = data.find(b'"', 1) + 1
        if not pos:
            return False
    return mid_field.match(data, pos) is not None
