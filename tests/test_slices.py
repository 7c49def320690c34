"""Issue 13: a row group read in slices gives exactly its rows, in order, whatever the pages.

Each slice is read the way a worker reads it (worker.read_chunk: pageslice where the pages can be
placed, else decoding from the group's start), alone and in any order, from files written with
and without a page index, v1 and v2 pages, several page and batch sizes, with and without
dictionaries, with nulls, strings, lists and structs."""

from __future__ import annotations

import os
import random
import struct
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minibatch import pageslice, thrift, worker
from minibatch.planner import Chunk, plan_chunks, read_file_meta

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLAT = ["i", "f", "s", "d"]


def make_table(rows: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    ints = [None if rng.random() < 0.1 else rng.randrange(-(2**40), 2**40) for _ in range(rows)]
    words = [
        None if rng.random() < 0.1 else "w" * rng.randrange(0, 30) + str(rng.randrange(50))
        for _ in range(rows)
    ]
    lists = [
        None if rng.random() < 0.1 else [rng.randrange(9) for _ in range(rng.randrange(4))]
        for _ in range(rows)
    ]
    return pa.table(
        {
            "i": pa.array(ints, pa.int64()),
            "f": pa.array([rng.random() for _ in range(rows)]),
            "s": pa.array(words, pa.string()),
            "d": pa.array([str(rng.randrange(5)) for _ in range(rows)]).dictionary_encode(),
            "l": pa.array(lists, pa.list_(pa.int64())),
            "st": pa.array([{"a": x, "b": w} for x, w in zip(ints, words, strict=True)]),
        }
    )


def write(table: pa.Table, path: Path, options: dict[str, object]) -> None:
    pq.write_table(table, path, row_group_size=table.num_rows, **options)  # type: ignore[arg-type]


def chunk_of(path: Path, start: int, end: int) -> Chunk:
    meta = read_file_meta(str(path), None)
    return Chunk(str(path), meta.fingerprint, start, end, 0, 1, 0, meta.row_groups[0].nbytes)


def cuts(rows: int, pieces: int, seed: int) -> list[tuple[int, int]]:
    bounds = sorted({0, rows, *random.Random(seed).sample(range(1, rows), min(pieces - 1, rows - 1))})
    return list(zip(bounds, bounds[1:], strict=False))


write_options = st.fixed_dictionaries(
    {
        "write_page_index": st.booleans(),
        "data_page_version": st.sampled_from(["1.0", "2.0"]),
        "max_rows_per_page": st.sampled_from([1, 7, 64, 1000]),
        "write_batch_size": st.sampled_from([1, 5, 1024]),
        "data_page_size": st.sampled_from([64, 4096, 2**20]),
        "use_dictionary": st.booleans(),
        "compression": st.sampled_from(["none", "snappy", "zstd"]),
    }
)


@PROPERTY
@given(
    options=write_options,
    rows=st.integers(1, 600),
    pieces=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    columns=st.sampled_from([None, ["s"], ["l", "i"], ["st"], FLAT]),
)
def test_every_slice_is_exactly_its_rows(
    options: dict[str, object], rows: int, pieces: int, seed: int, columns: list[str] | None
) -> None:
    pageslice._groups.clear()
    table = make_table(rows, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.parquet"
        write(table, path, options)
        whole = pq.read_table(path, columns=columns)
        slices = cuts(rows, pieces, seed)
        random.Random(seed).shuffle(slices)  # chunks of a group run in any order, each alone
        for start, end in slices:
            if random.Random(start).random() < 0.3:
                pageslice._groups.clear()  # another worker process, or a resumed run
            got = worker.read_chunk(chunk_of(path, start, end), tuple(columns) if columns else None)
            assert got.schema == whole.schema
            assert got.to_pylist() == whole.slice(start, end - start).to_pylist(), (start, end)


@settings(PROPERTY, max_examples=15)
@given(options=write_options, rows=st.integers(2, 3000), chunk_bytes=st.integers(2000, 20000))
def test_planned_slices_of_a_group_together_are_the_group(
    options: dict[str, object], rows: int, chunk_bytes: int
) -> None:
    table = make_table(rows, rows).select(FLAT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.parquet"
        write(table, path, options)
        chunks = plan_chunks([read_file_meta(str(path), None)], chunk_bytes)
        assert [c.row_start for c in chunks[1:]] == [c.row_end for c in chunks[:-1]]
        assert all(c.num_rows > 0 for c in chunks)
        got = pa.concat_tables([worker.read_chunk(c, None) for c in chunks])
        assert got.to_pylist() == pq.read_table(path).to_pylist()


@pytest.mark.parametrize("index", [True, False])
def test_flat_columns_are_read_from_their_pages_not_from_the_group_start(tmp_path: Path, index: bool) -> None:
    """The fast path is taken (not the decode-from-the-start fallback) with or without an index."""
    table = make_table(5000, 1).select(FLAT)
    path = tmp_path / "one.parquet"
    write(table, path, {"write_page_index": index, "max_rows_per_page": 100})
    fd = os.open(path, os.O_RDONLY)
    try:
        columns, _ = pageslice.read_rows(fd, (str(path), "fp"), 0, 4321, 4400, FLAT)
    finally:
        os.close(fd)
    assert sorted(columns) == sorted(FLAT)
    assert pa.table(columns).select(FLAT).equals(table.slice(4321, 79).combine_chunks())


def test_a_list_column_in_v1_pages_without_an_index_falls_back_and_is_still_exact(tmp_path: Path) -> None:
    table = make_table(3000, 2)
    path = tmp_path / "one.parquet"
    write(table, path, {"max_rows_per_page": 50, "data_page_version": "1.0"})
    fd = os.open(path, os.O_RDONLY)
    try:
        columns, _ = pageslice.read_rows(fd, (str(path), "fp"), 0, 2500, 2600, ["l", "i"])
    finally:
        os.close(fd)
    assert list(columns) == ["i"]  # the list's v1 pages do not say where rows start
    got = worker.read_chunk(chunk_of(path, 2500, 2600), None)
    assert got.to_pylist() == table.slice(2500, 100).to_pylist()


def test_the_footer_round_trips_through_the_thrift_codec(tmp_path: Path) -> None:
    path = tmp_path / "one.parquet"
    write(make_table(100, 4), path, {"write_page_index": True})
    data = path.read_bytes()
    length = struct.unpack("<I", data[-8:-4])[0]
    footer = data[-8 - length : -8]
    fields, end = thrift.read_struct(footer)
    assert end == length
    assert bytes(thrift.write_struct(bytearray(), fields)) == footer


def test_an_encrypted_or_foreign_file_is_left_to_the_old_reader(tmp_path: Path) -> None:
    path = tmp_path / "not.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 64 + b"PARE")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pageslice.read_rows(fd, (str(path), "fp"), 0, 1, 2, ["a"]) == ({}, [])
    finally:
        os.close(fd)


def lie_in_the_page_index(path: Path, shift: int) -> None:
    """Rewrite the file's OffsetIndex so that every page after the first claims to start
    `shift` rows later (a real writer's bug: ClickHouse#83876). A whole read ignores it."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<I", data[-8:-4])
    footer, _ = thrift.read_struct(bytes(data[-8 - length : -8]))
    column = footer[4][1][1][0][1][1][1][0]
    offset, size = column[4][1], column[5][1]
    index, _ = thrift.read_struct(bytes(data[offset : offset + size]))
    for location in index[1][1][1][1:]:
        location[3] = (thrift.I64, location[3][1] + shift)
    rewritten = thrift.write_struct(bytearray(), index)
    assert len(rewritten) == size
    data[offset : offset + size] = rewritten
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_a_page_index_that_lies_about_rows_does_not_move_a_slice(tmp_path: Path, version: str) -> None:
    """Found by a hostile review: rows were placed by the index, and a slice returned rows 10..17
    for [12, 20) without an error. Rows are now placed by the pages' own headers."""
    path = tmp_path / "lying.parquet"
    options = {"data_page_version": version, "max_rows_per_page": 10, "write_page_index": True}
    pq.write_table(pa.table({"i": pa.array(range(100), pa.int64())}), path, use_dictionary=False, **options)
    lie_in_the_page_index(path, 2)
    pageslice._groups.clear()
    assert worker.read_chunk(chunk_of(path, 12, 20), None)["i"].to_pylist() == list(range(12, 20))


def test_a_reader_that_stops_early_fails_the_chunk_instead_of_losing_rows(shared_testdata: Path) -> None:
    """ARROW-GH-41317.parquet (column chunks of different lengths): a whole read raises, and a
    slice of it decoded batch by batch returned 0 rows and no error. Its pages' headers do not
    add up to its row group: the slice is read as the whole group is, and fails as it does."""
    with pytest.raises(ValueError, match="expected length 3 but got length 0"):
        worker.read_chunk(chunk_of(shared_testdata / "ARROW-GH-41317.parquet", 0, 1), None)


def test_a_group_whose_page_headers_contradict_its_footer_fails_as_a_whole_read_does(tmp_path: Path) -> None:
    """Corruption fuzzing: one byte turning a data page's header into a dictionary page's made
    the layout unusable, and the slice fell back to decoding from the group's start, which
    stopped early: row 20 (20.0) came back null, no error, where a whole read fails."""
    path = tmp_path / "flipped.parquet"
    table = pa.table(
        {"c": pa.array([float(i) if i % 3 else None for i in range(50)]), "k": pa.array(range(50))}
    )
    pq.write_table(table, path, compression="none", use_dictionary=False, max_rows_per_page=7)
    fd = os.open(path, os.O_RDONLY)
    try:
        third = pageslice._load(fd, 0).leaves[0].pages[2]
    finally:
        os.close(fd)
    raw = bytearray(path.read_bytes())
    raw[third + 1] = 0x04  # the page type, zigzag: DATA_PAGE (0) -> DICTIONARY_PAGE (2)
    path.write_bytes(bytes(raw))
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(path)
    with pytest.raises(pa.ArrowInvalid):
        worker.read_chunk(chunk_of(path, 20, 30), None)
