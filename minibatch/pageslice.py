"""Rows [a, b) of one row group without decoding the rows before them (issue 13).

pyarrow 26 reads whole row groups only (Arrow C++ has no row-range read yet, apache/arrow#45284).
So for each top-level column this cuts out the data pages that hold the rows (plus the column
chunk's dictionary page) and hands pyarrow a small in-memory Parquet file: those pages and a
copy of the footer rewritten to one row group of just those rows. pyarrow decodes it with the
file's own schema and ARROW:schema metadata, so types and values are the ones a whole read gives.

Where each data page starts (its first row) comes from the page headers (read, not decoded),
and only for columns outside any list, whose pages hold one value (or null) a row: the number
the decoder itself goes by. A page index is not trusted for it (writers have got it wrong),
nor a list column's headers. A column whose pages cannot be placed (a list column; an
encrypted file; a column chunk in another file; more than MAX_PAGES pages) is left to the
caller, which decodes it from the group's start.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from minibatch import thrift
from minibatch.thrift import I64, LIST, STRUCT, Struct

DICTIONARY_PAGE, DATA_PAGE, DATA_PAGE_V2 = 2, 0, 3
REPEATED = 2
MAX_HEADER = 64 * 2**20
MAX_PAGES = 4096  # a column chunk's pages placed by reading each header (~0.1 ms a page)
DROPPED = (10, 12, 13, 14, 15, 16, 17)  # index page, statistics, encoding stats, bloom, sizes, geo
DICTIONARY_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY


class Unusable(ValueError):
    """The file's pages cannot be cut out safely: read the slice the slow way."""


class Damaged(ValueError):
    """The page headers contradict the footer: the whole group's read says what is wrong (a
    slice decoded from the group's start would stop before it shows)."""


DAMAGED = "damaged"  # a row group's layout, when its pages do not add up


@dataclass(frozen=True)
class Leaf:
    """One leaf column's chunk: its dictionary bytes [start, pages[0]), its data pages at
    `pages` with first rows `rows` (the last entry is the group's row count), ending at `end`."""

    start: int
    end: int
    pages: tuple[int, ...]
    rows: tuple[int, ...]
    repeated: bool


@dataclass(frozen=True)
class Group:
    """What a worker keeps of a row group it reads in slices (small: no data)."""

    footer: Struct  # the file's footer with only this row group
    fields: dict[str, tuple[int, ...]]  # top-level column name -> its leaves' indexes
    leaves: tuple[Leaf, ...]
    num_rows: int


_groups: dict[tuple[str, str, int], Group | str | None] = {}


def read_rows(
    fd: int, key: tuple[str, str], group: int, a: int, b: int, names: list[str]
) -> tuple[dict[str, pa.ChunkedArray[Any]], list[str]]:
    """Columns `names` of rows [a, b) of row group `group`, each one decoded from the whole
    pages that hold those rows (a page cut short would decode in part without a word: a file
    whose pages hold fewer values than their headers say gave shifted values). A column
    missing from the result is the caller's to read; the ones listed after it, whose pages
    did not decode, from the whole group (whose read says what is wrong, if anything is)."""
    layout = _layout(fd, key, group)
    if layout is None or not names:
        return {}, []
    if isinstance(layout, str):  # DAMAGED
        return {}, names
    windows: dict[tuple[int, int], list[str]] = {}
    for name in names:
        start = _start(layout, name, a, b)
        if start is not None:
            windows.setdefault((start, _stop(layout, name, b)), []).append(name)
    out: dict[str, pa.ChunkedArray[Any]] = {}
    damaged: list[str] = []
    for (start, stop), window_names in windows.items():
        try:
            table = _read_window(fd, layout, start, stop, window_names)
        except (Damaged, pa.ArrowException, OSError):
            damaged += window_names
            continue
        except (Unusable, thrift.ThriftError):
            continue
        out.update(zip(window_names, table.slice(a - start, b - a).columns, strict=True))
    return out, damaged


def _layout(fd: int, key: tuple[str, str], group: int) -> Group | str | None:
    cache_key = (*key, group)
    if cache_key in _groups:
        return _groups[cache_key]
    if len(_groups) >= 64:
        _groups.clear()
    try:
        layout: Group | str | None = _load(fd, group)
    except (Damaged, thrift.ThriftError, KeyError, IndexError, TypeError):  # headers that do not
        layout = DAMAGED  # parse, lack what every page has, or contradict the footer
    except (Unusable, ValueError, OSError):
        layout = None
    _groups[cache_key] = layout
    return layout


def _load(fd: int, index: int) -> Group:
    size = os.fstat(fd).st_size
    tail = os.pread(fd, 8, size - 8)
    if len(tail) != 8 or tail[4:] != b"PAR1":  # b"PARE": an encrypted footer
        raise Unusable("not a plaintext footer")
    length = struct.unpack("<I", tail[:4])[0]
    footer, _ = thrift.read_struct(os.pread(fd, length, size - 8 - length))
    if 8 in footer:
        raise Unusable("encrypted columns")
    row_group = footer[4][1][1][index]
    footer = {**footer, 4: (LIST, (STRUCT, [row_group]))}
    fields, repeated = _fields(footer[2][1][1])
    chunks = row_group[1][1][1]
    num_rows = row_group[3][1]
    leaves = tuple(_leaf(fd, chunk, num_rows, rep) for chunk, rep in zip(chunks, repeated, strict=True))
    return Group(footer=footer, fields=fields, leaves=leaves, num_rows=num_rows)


def _fields(schema: list[Struct]) -> tuple[dict[str, tuple[int, ...]], list[bool]]:
    """Top-level name -> leaf indexes, and whether each leaf is inside a repeated element."""
    fields: dict[str, tuple[int, ...]] = {}
    repeated: list[bool] = []
    pos = 1

    def walk(element_repeated: bool) -> None:
        nonlocal pos
        element = schema[pos]
        pos += 1
        rep = element_repeated or (3 in element and element[3][1] == REPEATED)
        children = element[5][1] if 5 in element else 0
        if not children:
            repeated.append(rep)
        for _ in range(children):
            walk(rep)

    for _ in range(schema[0][5][1]):
        first, name = len(repeated), schema[pos][4][1].decode()
        walk(False)
        if name in fields:
            raise Unusable("two top-level columns of one name")
        fields[name] = tuple(range(first, len(repeated)))
    return fields, repeated


def _leaf(fd: int, chunk: Struct, num_rows: int, repeated: bool) -> Leaf:
    if 1 in chunk or 8 in chunk or 9 in chunk:
        raise Unusable("a column chunk in another file, or encrypted")
    meta = chunk[3][1]
    data = meta[9][1]
    dictionary = meta[11][1] if 11 in meta and meta[11][1] > 0 else data
    start = min(data, dictionary)
    end = start + meta[7][1]
    # Rows are placed only by the data pages' own headers, for columns outside any list: a
    # writer's page index has been wrong (ClickHouse#83876: element indexes as rows), and so
    # has a v2 header's num_rows in a list column (pyarrow < 12, apache/arrow#34086). A whole
    # read ignores both, so trusting them would return other rows than the slice's, silently.
    pages, rows, total = _scan(fd, start, end, repeated)
    if total is not None and total != num_rows:
        raise Damaged(f"its pages' headers hold {total} rows, its row group {num_rows}")
    rows.append(num_rows)
    if not pages or rows[0] != 0 or any(x >= y for x, y in zip(rows, rows[1:], strict=False)):
        raise Damaged("pages do not cover the group's rows in order")
    if not start <= pages[0] or any(x >= y for x, y in zip(pages, [*pages[1:], end], strict=False)):
        raise Damaged("pages outside their column chunk")
    return Leaf(start, end, tuple(pages), tuple(rows), repeated)


def _scan(fd: int, start: int, end: int, repeated: bool) -> tuple[list[int], list[int], int | None]:
    """Data pages' offsets and first rows from their headers, and the rows they hold in all; a
    repeated column's rows are not placed (its only known page start is its first page)."""
    pages: list[int] = []
    rows: list[int] = []
    pos, row = start, 0
    while pos < end:
        header, size = _header(fd, pos, end)
        kind = header[1][1]
        if kind in (DATA_PAGE, DATA_PAGE_V2):
            count = None if repeated else _page_rows(header)
            if count is None:
                return ([pos] if not pages else pages[:1]), [0], None
            if len(pages) >= MAX_PAGES:
                raise Unusable("too many pages to place by their headers")
            pages.append(pos)
            rows.append(row)
            row += count
        elif pages:
            raise Damaged("a dictionary page after data pages")
        pos += size + header[3][1]
    return pages, rows, row


def _header(fd: int, pos: int, end: int) -> tuple[Struct, int]:
    want = 1024
    while True:
        data = os.pread(fd, min(want, end - pos), pos)
        try:
            return thrift.read_struct(data)
        except thrift.ThriftError:
            if len(data) >= end - pos or want >= MAX_HEADER:
                raise
            want *= 16


def _page_rows(header: Struct) -> int:
    """Rows of a data page of a column outside any list: one value (or null) a row."""
    if header[1][1] == DATA_PAGE_V2:
        v2 = header[8][1]
        if v2[1][1] != v2[3][1]:
            raise Damaged("a v2 page whose num_rows is not its num_values")
        return int(v2[3][1])
    return int(header[5][1][1][1])


def _start(layout: Group, name: str, a: int, b: int) -> int | None:
    """The last row at or before `a` where every leaf of column `name` starts a page. None when
    that is the group's first row and more rows than the slice's lie before it (a list column,
    whose rows are not placed; or leaves whose pages never start together): then the caller
    decodes from the group's start in batches, which costs the same and holds less memory."""
    leaves = [layout.leaves[i] for i in layout.fields.get(name, ())]
    if not leaves:
        return None
    starts = set.intersection(*(set(leaf.rows[:-1]) for leaf in leaves))
    start = max((row for row in starts if row <= a), default=0)
    # (a placed column is decoded to its pages' end even so: stopping inside a page would not
    # see one cut short; a list's rows are not placed, and its pages end only with the group)
    return None if start == 0 < a and a > b - a and any(leaf.repeated for leaf in leaves) else start


def _stop(layout: Group, name: str, b: int) -> int:
    """The row where the pages of column `name` that hold row b - 1 end (the latest of its leaves)."""
    return max(
        leaf.rows[bisect_right(leaf.rows, b - 1)] for leaf in (layout.leaves[i] for i in layout.fields[name])
    )


def _read_window(fd: int, layout: Group, start: int, end: int, names: list[str]) -> pa.Table:
    """Rows [start, end) of the columns `names`, decoded by pyarrow from a file of their pages
    (`start` a page start of each, `end` a page end of one)."""
    wanted = {i for name in names for i in layout.fields[name]}
    buf = bytearray(b"PAR1")
    row_group = layout.footer[4][1][1][0]
    chunks = []
    for i, chunk in enumerate(row_group[1][1][1]):
        meta = {k: v for k, v in chunk[3][1].items() if k not in DROPPED and k != 11}
        meta.update(_copy_pages(fd, buf, layout.leaves[i], start, end) if i in wanted else EMPTY)
        chunks.append({2: (I64, meta[9][1]), 3: (STRUCT, meta)})
    group = {k: v for k, v in row_group.items() if k in (2, 4)}
    group.update({1: (LIST, (STRUCT, chunks)), 3: (I64, end - start)})
    footer = {**layout.footer, 3: (I64, end - start), 4: (LIST, (STRUCT, [group]))}
    tail = thrift.write_struct(bytearray(), footer)
    buf += tail + struct.pack("<I", len(tail)) + b"PAR1"
    table = pq.ParquetFile(pa.BufferReader(bytes(buf))).read_row_group(0, columns=names)
    if table.num_rows != end - start:
        raise Damaged("the pages held other rows than their headers said")
    return table


EMPTY: Struct = {9: (I64, 4), 5: (I64, 0), 6: (I64, 0), 7: (I64, 0)}  # a column not read


def _copy_pages(fd: int, buf: bytearray, leaf: Leaf, start: int, end: int) -> Struct:
    """Append the leaf's pages of rows [start, end), after its dictionary page if one of them is
    dictionary-encoded (decoding a 1 MiB dictionary costs more than 100,000 plain values), to
    `buf`; return their column metadata."""
    first, last = bisect_left(leaf.rows, start), bisect_right(leaf.rows, end - 1)
    stop = leaf.pages[last] if last < len(leaf.pages) else leaf.end
    pages = os.pread(fd, stop - leaf.pages[first], leaf.pages[first])
    values, plain, indexed = _count(pages, last - first, leaf.rows[first : last + 1], leaf.repeated)
    meta: Struct = {}
    begin = len(buf)
    if indexed and leaf.start < leaf.pages[0]:
        meta[11] = (I64, begin)
        buf += os.pread(fd, leaf.pages[0] - leaf.start, leaf.start)
    meta[9] = (I64, len(buf))
    buf += pages
    return {**meta, 5: (I64, values), 6: (I64, plain), 7: (I64, len(buf) - begin)}


def _count(pages: bytes, expected: int, rows: tuple[int, ...], repeated: bool) -> tuple[int, int, bool]:
    """Values and uncompressed bytes of the data pages in `pages` (checked against where the
    layout says they start), and whether any of them is dictionary-encoded."""
    pos = values = plain = found = 0
    indexed = False
    while pos < len(pages):
        header, body = thrift.read_struct(pages, pos)
        kind = header[1][1]
        if kind in (DATA_PAGE, DATA_PAGE_V2):
            count = None if repeated else _page_rows(header)
            if found >= expected or (count is not None and count != rows[found + 1] - rows[found]):
                raise Damaged("a page's rows differ from the layout")
            found += 1
            page = header[8][1] if kind == DATA_PAGE_V2 else header[5][1]
            values += page[1][1]
            indexed = indexed or page[4 if kind == DATA_PAGE_V2 else 2][1] in DICTIONARY_ENCODINGS
        plain += body - pos + header[2][1]
        pos = body + header[3][1]
    if found != expected or pos != len(pages):
        raise Damaged("pages do not end where the layout says")
    return values, plain, indexed
