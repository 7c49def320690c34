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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from minibatch.checking import Checker, choice
from minibatch.planner import Chunk, FileMeta, RowGroup

if TYPE_CHECKING:
    import pyarrow as pa

SEGMENT = 4 * 2**20  # at most: a quarter of chunk_bytes when that is smaller (segment_size)
SAMPLE = 2**20
BLOCK = 16 * 2**20
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
Signature = tuple[tuple[str, str], ...]  # (column, Arrow type)


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
        if not isinstance(kind_name, str) or _type_or_none(kind_name) is None:
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
    return {"text": [text.format, list(text.schema), text.delimiter, text.header]} if text else {}


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
        handle.seek(max(0, stat.st_size - 65536))
        digest = hashlib.sha256(head + handle.read()).hexdigest()[:16]
        fingerprint = f"{stat.st_size}-{stat.st_mtime_ns}-{digest}"
        key = hashlib.sha256(json.dumps([path, fingerprint, text_facts(text), segment]).encode()).hexdigest()
        known = _cached(cache / f"{key[:32]}.json") if cache else None
        if known is not None:
            return FileMeta(path, fingerprint, stat.st_size, **known)
        meta = _scan(handle, path, text, segment, head, stat.st_size)
    if cache:
        _store(cache / f"{key[:32]}.json", meta)
    return replace(meta, fingerprint=fingerprint)


def _scan(handle: BinaryIO, path: str, text: TextFormat, segment: int, head: bytes, size: int) -> FileMeta:
    compression = _compression(path)
    signature = text.schema or _infer(_sample(handle, compression), text)
    if compression:
        groups, lines, first = [RowGroup(size, size, 3 * size)], [1], 0
    else:
        first, lines_before = _data_start(head, text)
        bounds, lines = _segments(handle, first, size, text, lines_before, segment)
        groups = [RowGroup(b - a, b - a, 2 * (b - a)) for a, b in zip(bounds, bounds[1:], strict=False)]
    return FileMeta(path, "", size, tuple(groups), signature, first, tuple(lines))


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


def _compression(path: str) -> str | None:
    return next((name for ext, name in COMPRESSED.items() if path.endswith(ext)), None)


def _stream(handle: BinaryIO, compression: str | None) -> Any:
    import pyarrow as pa

    handle.seek(0)
    return (
        pa.CompressedInputStream(pa.PythonFile(cast(Any, handle), mode="r"), cast(Any, compression))
        if compression
        else handle
    )


def _sample(handle: BinaryIO, compression: str | None) -> bytes:
    data: bytes = _stream(handle, compression).read(SAMPLE)
    cut = data.rfind(b"\n")
    return data[: cut + 1] if cut >= 0 and len(data) == SAMPLE else data


def _data_start(head: bytes, text: TextFormat) -> tuple[int, int]:
    """Where records start (after a CSV's header line), and the lines before that."""
    if text.format != "csv" or not text.header:
        return 0, 0
    end = head.find(b"\n")
    if end < 0:
        raise ValueError("no newline in the first 64 KiB: not a CSV file with a header line")
    return end + 1, 1


def _segments(
    handle: BinaryIO, start: int, size: int, text: TextFormat, lines_before: int, segment: int = SEGMENT
) -> tuple[list[int], list[int]]:
    """Boundaries [start, ..., size] about `segment` apart at record starts, and each segment's
    first line number (1-based)."""
    quoted = text.format == "csv"
    bounds, lines = [start], [lines_before + 1]
    quotes = newlines = 0  # counted from `start` up to `pos`
    pos, target = start, start + segment
    handle.seek(start)
    while pos < size:
        block = handle.read(BLOCK)
        if not block:
            break
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


def _infer(sample: bytes, text: TextFormat) -> Signature:
    if not sample.strip():
        raise ValueError("the file is empty: no rows to infer a schema from")
    table = _parse(sample, text)
    return tuple((f.name, "string" if str(f.type) == "null" else str(f.type)) for f in table.schema)


def _parse(data: bytes, text: TextFormat) -> pa.Table:
    """A sample, its types inferred (a CSV's column names from its header line)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    if text.format == "ndjson":
        return pajson.read_json(io.BytesIO(data))
    options = pacsv.ParseOptions(delimiter=text.delimiter, newlines_in_values=True)
    return pacsv.read_csv(io.BytesIO(data), parse_options=options)


# -- reading ------------------------------------------------------------------------------------


@dataclass
class TextRows:
    table: pa.Table
    malformed: pa.Table | None = None


def read_text_chunk(chunk: Chunk, text: TextFormat, signature: Signature) -> TextRows:
    """The chunk's records as a table of the job's schema, and the ones that did not parse."""
    with open(chunk.path, "rb") as handle:
        compression = _compression(chunk.path)
        if compression:
            data = _stream(handle, compression).read()
            header = text.format == "csv" and text.header
        else:
            handle.seek(chunk.row_start)
            data = handle.read(chunk.num_rows)
            header = False
    if text.format == "ndjson":
        return _ndjson(data, signature, chunk.first_line)
    return _csv(data, text, signature, chunk.first_line + (1 if header else 0), header)


def _csv(data: bytes, text: TextFormat, signature: Signature, first_line: int, header: bool) -> TextRows:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if header:  # a compressed file's, read whole (the caller counted its line)
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    names = [name for name, _ in signature]
    short: dict[int, str] = {}  # record number (1-based) -> why

    def handler(row: Any) -> Any:
        short[row.number] = f"{row.actual_columns} fields, expected {row.expected_columns}"
        return "skip"

    def read(types: dict[str, Any]) -> pa.Table:
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=False),  # numbered, in order
            parse_options=pacsv.ParseOptions(
                delimiter=text.delimiter, newlines_in_values=True, invalid_row_handler=handler
            ),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )  # fmt: skip

    wrong: list[tuple[int, str]] = []
    try:  # typed at once: the fast path
        typed = read({n: _arrow_type(kind) for n, kind in signature})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a value of the wrong type: as text
        short.clear()
        typed, wrong = _typed(read({n: pa.string() for n in names}), signature)
    if not short and not wrong:
        return TextRows(typed)
    records = _records(data, text.delimiter)  # (first line, text) of each record: the slow path
    kept = [r for n, r in enumerate(records, 1) if n not in short]
    bad = [(first_line + records[n - 1][0], why, records[n - 1][1]) for n, why in short.items()]
    bad += [(first_line + kept[index][0], why, kept[index][1]) for index, why in wrong]
    return TextRows(typed, _malformed(bad))


def _records(data: bytes, delimiter: str) -> list[tuple[int, str]]:
    """Each CSV record's first line (0-based, in `data`) and text: lines joined while a quoted
    field is open (the quote count's parity, as in `_segments`)."""
    found: list[tuple[int, str]] = []
    start, quotes = 0, 0
    pieces: list[str] = []
    for number, line in enumerate(data.decode("utf-8", "replace").split("\n")):
        if not pieces:
            start = number
        pieces.append(line)
        quotes += line.count('"')
        if quotes % 2 == 0:
            if "".join(pieces).strip():
                found.append((start, "\n".join(pieces)))
            pieces, quotes = [], 0
    return found


def _typed(table: pa.Table, signature: Signature) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Strings cast to the schema's types; the rows a value of which does not cast are left
    out and returned (row index, why)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wrong: dict[int, str] = {}
    columns: list[Any] = []
    for name, kind in signature:
        target = _arrow_type(kind)
        column: Any = table[name]
        if not pa.types.is_string(target):
            column = pc.if_else(pc.equal(column, pa.scalar("")), pa.scalar(None, pa.string()), column)
        try:
            columns.append(pc.cast(column, target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = column.to_pylist()
            cast = []
            for i, value in enumerate(values):
                try:
                    cast.append(pa.scalar(value, pa.string()).cast(target).as_py())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    wrong.setdefault(i, f"{name}: {value!r} is not {kind}")
                    cast.append(None)
            columns.append(pa.array(cast, target))
    typed = pa.table(columns, names=[name for name, _ in signature])
    if wrong:
        keep = pa.array([i not in wrong for i in range(table.num_rows)])
        typed = typed.filter(keep)
    return typed, sorted(wrong.items())


def _ndjson(data: bytes, signature: Signature, first_line: int) -> TextRows:
    import pyarrow as pa
    import pyarrow.json as pajson

    schema = pa.schema([(name, _arrow_type(kind)) for name, kind in signature])
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        return TextRows(pajson.read_json(io.BytesIO(data), parse_options=options))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # a broken line: sort them out one by one (only in this case: it is slow)
    good, bad = [], []
    for number, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            json.loads(line)
            pajson.read_json(io.BytesIO(line), parse_options=options)
            good.append(line)
        except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            bad.append((first_line + number, str(exc).splitlines()[0][:200], line.decode("utf-8", "replace")))
    table = (
        pajson.read_json(io.BytesIO(b"\n".join(good)), parse_options=options)
        if good
        else schema.empty_table()
    )
    return TextRows(table, _malformed(bad))


def _malformed(bad: list[tuple[int, str, str]]) -> pa.Table | None:
    import pyarrow as pa

    if not bad:
        return None
    lines, errors, texts = zip(*sorted(bad), strict=True)
    return pa.table({"_line": pa.array(lines, pa.int64()), "_error": list(errors), "_text": list(texts)})


def _arrow_type(kind: str) -> pa.DataType:
    found = _type_or_none(kind)
    if found is None:
        raise ValueError(f"unknown Arrow type {kind!r}")
    return found


def _type_or_none(kind: str) -> pa.DataType | None:
    import pyarrow as pa

    try:
        found: pa.DataType = pa.type_for_alias(cast(Any, kind))
        return found
    except (ValueError, KeyError):
        return None
