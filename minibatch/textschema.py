"""The schema of a CSV or NDJSON input, inferred from a sample (or named in the job's
`schema`): Arrow's inference, corrected where a number would change a value as written."""

from __future__ import annotations

import io
import json
import re
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import pyarrow as pa

Signature = tuple[tuple[str, str], ...]  # (column, Arrow type)
UNKNOWN = "null"  # the type of a column no record of the sample has: it fits any
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark: not data, wherever a file (or a joined one) has it


def infer(sample: bytes, fmt: str, delimiter: str) -> Signature:
    if not sample.strip():
        raise ValueError("the file is empty: no rows to infer a schema from")
    table = _parse(sample, fmt, delimiter)
    if not table.num_rows:  # a CSV's header alone: its columns, of no known type
        return tuple((name, UNKNOWN) for name in table.column_names)
    found = tuple((f.name, "string" if str(f.type) == "null" else str(f.type)) for f in table.schema)
    for name, kind in found:
        if kind == "binary":
            raise ValueError(f"column {name!r} holds bytes that are not UTF-8 text")
        if type_or_none(kind) is None:
            raise ValueError(
                f"column {name!r} holds {kind} values: nested values are not supported (flatten them)"
            )
    if len({name for name, _ in found}) < len(found):  # `a,a`: pyarrow names them a, a later
        return found
    numeric = [name for name, kind in found if kind in ("int64", "double")]
    # NDJSON: pyarrow infers a zone-less timestamp for "...Z" and "...+02:00" (CSV a zoned one)
    stamps = [
        n for n, kind in found if fmt == "ndjson" and kind.startswith("timestamp[") and "tz=" not in kind
    ]
    raw = _raw_values(sample, fmt, delimiter, numeric + stamps) if numeric or stamps else {}
    exact = _exact_types({name: raw[name] for name in numeric})
    kinds = dict(found)
    for name in stamps:
        if any(isinstance(v, str) and OFFSET.search(v) for v in raw[name]):
            exact[name] = kinds[name][:-1] + ", tz=UTC]"
    return tuple((name, exact.get(name, kind)) for name, kind in found)


INTEGER = re.compile(r"[+-]?\d+")
OFFSET = re.compile(r"[T ]\d\d(:\d\d(:\d\d(\.\d+)?)?)?\s*(Z|[+-]\d\d(:?\d\d)?)$")  # a time with its zone


def _exact_types(values: dict[str, list[Any]]) -> dict[str, str]:
    """decimal128(38, 0), DuckDB's HUGEINT, for integer columns beyond int64, which pyarrow
    infers as double (distinct 20-digit ids became one value). Numbers with leading zeros stay
    numbers (00501 is 501), as before: text for the files whose sample shows them would split
    a job's files into two schemas. A `schema` keeps them."""
    exact = {}
    for name, column in values.items():
        if column and all(
            isinstance(v, int) or (isinstance(v, str) and INTEGER.fullmatch(v)) for v in column
        ):
            digits = max(len(str(abs(int(v)))) for v in column)
            if any(not -(2**63) <= int(v) < 2**63 for v in column) and digits <= 38:
                exact[name] = "decimal128(38, 0)"
    return exact


def _raw_values(sample: bytes, fmt: str, delimiter: str, names: list[str]) -> dict[str, list[Any]]:
    """The sample's non-null values of `names` as written: CSV fields as text, JSON numbers as
    Python reads them (integers exact)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if fmt == "ndjson":
        values: dict[str, list[Any]] = {name: [] for name in names}
        for line in sample.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                for name in names:
                    if (v := record.get(name)) is not None and not isinstance(v, bool):
                        values[name].append(v)
        return values
    raw = pacsv.read_csv(
        io.BytesIO(sample),
        parse_options=_sample_options(delimiter),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, include_columns=names
        ),
    )
    return {name: [v.strip() for v in raw[name].to_pylist() if v] for name in names}


def _parse(data: bytes, fmt: str, delimiter: str) -> pa.Table:
    """A sample, its types inferred (a CSV's column names from its header line)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    if fmt == "ndjson":
        try:
            return pajson.read_json(io.BytesIO(data))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        # a broken line, or a value of another type than the lines before it had: infer from the
        # others (those are then read as malformed, not the whole file refused)
        if not (objects := _consistent(data.split(b"\n"))):  # (pyarrow: "Empty JSON file")
            raise ValueError("no JSON object in the sample to infer a schema from")
        return pajson.read_json(io.BytesIO(b"\n".join(objects)))
    data += b"" if data.endswith(b"\n") else b"\n"  # (pyarrow: a header alone without one is "empty")
    options = convert_options(None)
    table = pacsv.read_csv(
        io.BytesIO(data), parse_options=_sample_options(delimiter), convert_options=options
    )
    if not table.num_rows:  # a header alone, or every record passed over: say why, as pyarrow does
        strict = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
        pacsv.read_csv(io.BytesIO(data), parse_options=strict, convert_options=options)
    return table


def _consistent(lines: list[bytes]) -> list[bytes]:
    """The JSON objects whose fields are each of the kind of that field's first value (numbers
    one kind: integers become doubles)."""
    kinds: dict[str, str] = {}
    kept = []
    for line in lines:
        line = line.removeprefix(BOM)  # files with a BOM each, joined: pyarrow takes none mid-way
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            mine = {key: _json_kind(value) for key, value in record.items() if value is not None}
            if all(kinds.get(key, kind) == kind for key, kind in mine.items()):
                kinds.update(mine)
                kept.append(line)
    return kept


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


def _sample_options(delimiter: str) -> Any:
    """A record with too few or too many fields is passed over: a malformed one, or the last,
    cut short by the sample's end inside a quoted field that holds newlines."""
    import pyarrow.csv as pacsv

    return pacsv.ParseOptions(
        delimiter=delimiter, newlines_in_values=True, invalid_row_handler=lambda _: "skip"
    )


def convert_options(types: dict[str, Any] | None) -> Any:
    """As DuckDB reads CSV: an unquoted empty field is NULL, and nothing else ("NA" is text)."""
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(
        column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False
    )


def arrow_type(kind: str) -> pa.DataType:
    found = type_or_none(kind)
    if found is None:
        raise ValueError(f"unknown Arrow type {kind!r}")
    return found


def type_or_none(kind: str) -> pa.DataType | None:
    """An Arrow type from its name: an alias ("int64", "date32"), or a zoned timestamp."""
    import pyarrow as pa

    if zoned := re.fullmatch(r"timestamp\[(s|ms|us|ns), tz=([^\]]+)\]", kind):
        return pa.timestamp(cast(Any, zoned[1]), tz=zoned[2])
    if decimal := re.fullmatch(r"decimal128\((\d+), ?(\d+)\)", kind):
        precision, scale = int(decimal[1]), int(decimal[2])
        return pa.decimal128(precision, scale) if 1 <= precision <= 38 and scale <= precision else None
    try:
        found: pa.DataType = pa.type_for_alias(cast(Any, kind))
        return found
    except (ValueError, KeyError):
        return None
