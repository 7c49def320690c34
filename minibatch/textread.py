"""Reading a CSV or NDJSON chunk in a worker: its byte range (or a compressed file whole)
parsed into the job's input schema; records that do not parse are kept apart with their
line numbers (see textinput.py for how the ranges are cut)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from minibatch.planner import Chunk
from minibatch.textinput import TextFormat, compression_of, decompress, header_end
from minibatch.textschema import BOM, Signature, arrow_type, convert_options

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class TextRows:
    table: pa.Table
    malformed: pa.Table | None = None


def read_text_chunk(chunk: Chunk, handle: BinaryIO, text: TextFormat, signature: Signature) -> TextRows:
    """The chunk's records, read from `handle` (the caller opened and checked it), as a table
    of the job's schema, and the ones that did not parse."""
    compression = compression_of(chunk.path)
    if compression:
        data = decompress(handle.read(), compression)  # (a stream over `handle` would close it)
        header = text.format == "csv" and text.header
    else:
        handle.seek(chunk.row_start)
        data = handle.read(chunk.num_rows)
        header = False
        if len(data) != chunk.num_rows:  # a short read must not lose the range's last records
            raise ValueError(f"{chunk.path}: read {len(data)} bytes of the chunk's {chunk.num_rows}")
    if text.format == "ndjson":
        return _ndjson(data, signature, chunk.first_line, declared=bool(text.schema))
    return _csv(data, text, signature, chunk.first_line + (1 if header else 0), header)


def _csv(data: bytes, text: TextFormat, signature: Signature, first_line: int, header: bool) -> TextRows:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if header:  # a compressed file's, read whole (the caller counted its line)
        data = data[end + 1 :] if (end := header_end(data, text.delimiter)) >= 0 else b""
    names = [name for name, _ in signature]
    short: dict[int, str] = {}  # record number (1-based) -> why

    def handler(row: Any) -> Any:
        short[row.number] = f"{row.actual_columns} fields, expected {row.expected_columns}"
        return "skip"

    block = min(max(2**20, len(data) + 1), 2**31 - 1)  # one block: a record of any length fits

    def read(types: dict[str, Any]) -> pa.Table:  # not threaded: invalid rows come numbered, in order
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=block),
            parse_options=pacsv.ParseOptions(
                delimiter=text.delimiter, newlines_in_values=True, invalid_row_handler=handler
            ),
            convert_options=convert_options(types),
        )  # fmt: skip

    wrong: list[tuple[int, str]] = []
    try:  # typed at once: the fast path
        typed: pa.Table | None = read({n: arrow_type(kind) for n, kind in signature})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a value of the wrong type: as text
        typed = None
    if typed is None or _infinite(typed):  # ±inf: written so, or too big for its type (the text says)
        short.clear()
        typed, wrong = _typed(read({n: pa.string() for n in names}), signature)
    if not short and not wrong:
        return TextRows(typed)
    records = _records(data, text.delimiter)  # (first line, text) of each record: the slow path
    kept = [r for n, r in enumerate(records, 1) if n not in short]
    bad = [(first_line + records[n - 1][0], why, records[n - 1][1]) for n, why in short.items()]
    bad += [(first_line + kept[index][0], why, kept[index][1]) for index, why in wrong]
    return TextRows(typed, _malformed(bad))


def _infinite(table: pa.Table) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc

    return any(pa.types.is_floating(c.type) and pc.any(pc.is_inf(c)).as_py() for c in table.columns)


def _records(data: bytes, delimiter: str) -> list[tuple[int, str]]:
    """Each CSV record's first line (0-based, in `data`) and text, by pyarrow's rules: a quote
    opens a quoted field only at the field's start; empty lines are no records."""
    found: list[tuple[int, str]] = []
    lines = data.decode("utf-8", "replace").split("\n")
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        open_ = _open_quote(lines[i], delimiter, False)
        while open_ and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
            open_ = _open_quote(lines[i], delimiter, True)
        if text.rstrip("\r"):
            found.append((start, text))
        i += 1
    return found


def _open_quote(line: str, delimiter: str, inside: bool) -> bool:
    """Whether a quoted field is still open at the end of `line` (open at its start: `inside`)."""
    pos = 0
    while True:
        if not inside and line.startswith('"', pos):
            inside, pos = True, pos + 1
        if inside:
            close = line.find('"', pos)
            while close != -1 and line.startswith('"', close + 1):  # "" is a quote inside
                close = line.find('"', close + 2)
            if close == -1:
                return True
            inside, pos = False, close + 1
        next_field = line.find(delimiter, pos)
        if next_field == -1:
            return False
        pos = next_field + 1


def _typed(table: pa.Table, signature: Signature) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Strings cast to the schema's types; the rows a value of which does not cast are left
    out and returned (row index, why)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wrong: dict[int, str] = {}
    columns: list[Any] = []
    for name, kind in signature:
        target = arrow_type(kind)
        column: Any = table[name]
        if not pa.types.is_string(target):  # (unquoted empty fields are NULL already)
            column = pc.if_else(pc.equal(column, pa.scalar("")), pa.scalar(None, pa.string()), column)
        try:
            columns.append(from_text(column, target))
            if pa.types.is_floating(target):  # a finite value too big for the type casts to ±inf
                too_big = pc.and_(
                    pc.is_inf(columns[-1]), pc.invert(pc.match_substring_regex(column, INFINITY))
                )
                for i in pc.indices_nonzero(pc.fill_null(too_big, False)).to_pylist():
                    wrong.setdefault(i, f"{name}: {column[i].as_py()!r} is out of the range of {kind}")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = column.to_pylist()
            cast = []
            for i, value in enumerate(values):
                try:
                    cast.append(from_text(pa.array([value], pa.string()), target)[0].as_py())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    wrong.setdefault(i, f"{name}: {value!r} is not {kind}")
                    cast.append(None)
            columns.append(pa.array(cast, target))
    typed = pa.table(columns, names=[name for name, _ in signature])
    if wrong:
        keep = pa.array([i not in wrong for i in range(table.num_rows)])
        typed = typed.filter(keep)
    return typed, sorted(wrong.items())


INFINITY = r"^\s*[+-]?(?i:inf|infinity)\s*$"  # what casts to ±inf as written
BLANK = re.compile(rb"\n[ \t\r\f\v]*(?:\n|\Z)")  # a blank line after the first


def _ndjson(data: bytes, signature: Signature, first_line: int, declared: bool) -> TextRows:
    import pyarrow as pa
    import pyarrow.json as pajson

    schema = pa.schema([(name, arrow_type(kind)) for name, kind in signature])
    # timestamps as text, then cast by CSV's rules: pyarrow's JSON reader turns an offset into a
    # zone-less column into UTC, and takes a zone-less time for a zoned column as UTC; it reads
    # no date or time of day from a string at all (every record was malformed)
    as_read = pa.schema([f.with_type(pa.string()) if _as_text(f.type) else f for f in schema])
    # a field an inferred schema does not have (first seen after the sample) makes its record
    # malformed, not dropped; a declared schema may name some fields only (skipping nested ones)
    options = pajson.ParseOptions(
        explicit_schema=as_read, unexpected_field_behavior="ignore" if declared else "error"
    )

    def parse(lines: bytes) -> pa.Table:
        table = pajson.read_json(io.BytesIO(lines), parse_options=options)
        table.validate(full=True)  # strings' UTF-8
        return _cast(table, schema)

    bare = b"null" in data and re.search(rb"(?m)^\s*null\s*$", data)  # pyarrow: a row of NULLs
    try:
        if not bare and _one_row_a_line(table := parse(data), data):
            return TextRows(table)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # a broken line: find it, below (only in this case: it is slower)
    bad: list[tuple[int, str, str]] = []
    objects = []  # each line a JSON object (json.loads: quick), then what pyarrow takes, by halves
    for number, line in enumerate(data.split(b"\n"), first_line):
        if not line.removeprefix(BOM).strip():
            continue
        try:  # a BOM: where pyarrow takes it, at a chunk's start, and where it does not, alike
            if not isinstance(json.loads(line.decode("utf-8-sig")), dict):
                raise ValueError("not a JSON object")
            objects.append((number, line.removeprefix(BOM)))  # (pyarrow takes one only at the start)
        except ValueError as exc:  # (UnicodeDecodeError too)
            bad.append((number, str(exc).splitlines()[0][:200], line.decode("utf-8", "replace")))
    good = _halves(objects, bad, parse)
    return TextRows(
        parse(b"\n".join(line for _, line in good)) if good else schema.empty_table(), _malformed(bad)
    )


def _as_text(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind))


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The JSON reader's table in the schema's types (dates and times read as text: `from_text`).
    A number too big for its float type, which the reader made ±inf (JSON writes no infinity),
    fails as CSV's does: ArrowInvalid."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for field in schema:
        column: Any = table[field.name]
        try:  # (a record's line is found by halving the block: say which field)
            column = from_text(column, field.type) if pa.types.is_string(column.type) else column
        except pa.ArrowInvalid as exc:
            raise pa.ArrowInvalid(f"{field.name}: {exc}") from None
        column = pc.cast(column, field.type)
        if pa.types.is_floating(field.type) and pc.any(pc.is_inf(column)).as_py():
            raise pa.ArrowInvalid(f"{field.name}: a number out of the range of {field.type}")
        columns.append(column)
    return pa.table(columns, schema=schema)


def from_text(column: Any, target: pa.DataType) -> Any:
    """Strings cast to `target`; a time of day by way of a timestamp on 1970-01-01 (pyarrow casts
    no string to a time). Raises ArrowInvalid for a value that is not one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_time(target):
        if pc.any(pc.invert(pc.fill_null(pc.match_substring_regex(column, TIME_OF_DAY), True))).as_py():
            raise pa.ArrowInvalid(f"a value that is not {target}")
        stamp = pc.binary_join_element_wise(pa.scalar("1970-01-01T"), column, "")
        column = pc.cast(stamp, pa.timestamp(target.unit))
    return pc.cast(column, target)


TIME_OF_DAY = r"^\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?$"


def _one_row_a_line(table: pa.Table, data: bytes) -> bool:
    """pyarrow takes `{"id": 1} {"id": 2}` on one line as two records: a malformed line."""
    end = len(data) - data.endswith(b"\n")  # (what follows the last newline is no line)
    first = data.find(b"\n", 0, end)
    lines = data.count(b"\n", 0, end) + 1
    if not data[: first if first >= 0 else end].strip() or BLANK.search(data, 0, end):  # rare
        lines = sum(1 for line in data[:end].split(b"\n") if line.strip())  # the lines not blank
    return table.num_rows == lines


def _halves(
    lines: list[tuple[int, bytes]], bad: list[tuple[int, str, str]], parse: Callable[[bytes], Any]
) -> list[tuple[int, bytes]]:
    """The lines `parse` takes, found by halving the block it refuses: a few bad lines among
    many cost a few dozen parses of blocks, not one per line (pyarrow's ~0.2 ms each)."""
    import pyarrow as pa

    if not lines:
        return []
    try:
        parse(b"\n".join(line for _, line in lines))
        return lines
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if len(lines) == 1:
            number, line = lines[0]
            bad.append((number, str(exc).splitlines()[0][:200], line.decode("utf-8", "replace")))
            return []
    middle = len(lines) // 2
    return _halves(lines[:middle], bad, parse) + _halves(lines[middle:], bad, parse)


def _malformed(bad: list[tuple[int, str, str]]) -> pa.Table | None:
    import pyarrow as pa

    if not bad:
        return None
    lines, errors, texts = zip(*sorted(bad), strict=True)
    return pa.table({"_line": pa.array(lines, pa.int64()), "_error": list(errors), "_text": list(texts)})
