"""SQL chunks keep their file open and DuckDB's footer cache on (issue 13, item 5): never stale.

DuckDB caches a Parquet footer under the name it read, /proc/self/fd/N, and checks it only
against the file's size and mtime in seconds. Once N is closed, the next file opened gets the
same N; a file rewritten in place keeps its inode. These tests put exactly those cases to a
worker thread and check every answer against the file's current content.
"""

from __future__ import annotations

import gc
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch import reading
from minibatch.planner import Chunk, plan_chunks, read_file_meta
from minibatch.tasks import InputChanged, JobSpec

SQL = "SELECT sum(x) AS total, count(*) AS n FROM chunk WHERE x >= 1000"
JOB = JobSpec(name="j", process=None, sql=SQL, columns=None, base_dir="/", parts_dir="/", staging_dir="/")
MTIME_NS = 1_700_000_000_000_000_000  # one mtime for every file: only their content differs


def parquet_bytes(start: int, rows: int = 100) -> bytes:
    """Fixed-width columns, no compression: the same size whatever the values (not the stats)."""
    buf = io.BytesIO()
    table = pa.table({"x": pa.array(range(start, start + rows), pa.int64())})
    pq.write_table(table, buf, row_group_size=25, compression="none", use_dictionary=False)
    return buf.getvalue()


def write(path: Path, data: bytes, in_place: bool = False) -> None:
    with open(path, "r+b" if in_place else "wb") as f:
        f.write(data)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))


def chunks(path: Path) -> list[Chunk]:
    meta = read_file_meta(str(path), None)
    return plan_chunks([meta], min(g.nbytes for g in meta.row_groups))  # one chunk per row group


def answer(chunk: Chunk) -> tuple[int | None, int]:
    row = reading.sql_on_file(JOB, chunk).to_pylist()[0]
    return row["total"], row["n"]


def expected(start: int, chunk: Chunk) -> tuple[int | None, int]:
    xs = [x for x in range(start + chunk.row_start, start + chunk.row_end) if x >= 1000]
    return (sum(xs) if xs else None), len(xs)


@pytest.fixture(autouse=True)
def fresh_thread_state() -> None:
    """Each test starts as a new worker thread would: no connection, no file held."""
    held = getattr(reading._local, "sql", None)
    if held is not None:
        held.release()
        held.con.close()
        del reading._local.sql


def test_another_file_under_the_same_descriptor_number_is_read_afresh(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write(a, parquet_bytes(0))
    write(b, parquet_bytes(1000))
    assert a.stat().st_size == b.stat().st_size
    numbers = []
    for path, start in [(a, 0), (b, 1000), (a, 0), (b, 1000), (a, 0)]:
        gc.collect()  # an earlier test's garbage closing its files mid-loop would change the number
        with open(path, "rb") as probe:  # the number a plain open gets: the same one each time
            numbers.append(probe.fileno())
        for chunk in chunks(path):
            assert answer(chunk) == expected(start, chunk)
    assert len(set(numbers[1:])) == 1  # (the first: before this thread's DuckDB settled its own files)


def test_a_file_rewritten_in_place_same_size_and_mtime_is_read_afresh(tmp_path: Path) -> None:
    """Same inode, size and mtime: only the footer's statistics differ. A footer cached under the
    reused name would skip every row group of the new content (its old max is below 1000)."""
    path = tmp_path / "a.parquet"
    write(path, parquet_bytes(0))
    for chunk in chunks(path):
        assert answer(chunk) == expected(0, chunk)
    inode = path.stat().st_ino
    write(path, parquet_bytes(1000), in_place=True)
    assert path.stat().st_ino == inode
    for chunk in chunks(path):  # planned again: the fingerprint holds the footer's hash
        assert answer(chunk) == expected(1000, chunk)


def test_a_file_replaced_under_its_name_is_not_read_through_the_held_descriptor(tmp_path: Path) -> None:
    path, other = tmp_path / "a.parquet", tmp_path / "new.parquet"
    write(path, parquet_bytes(0))
    first = chunks(path)
    assert answer(first[0]) == expected(0, first[0])
    write(other, parquet_bytes(2000))
    os.replace(other, path)
    for chunk in chunks(path):
        assert answer(chunk) == expected(2000, chunk)


def test_a_chunk_planned_before_a_change_still_fails_as_changed_input(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write(path, parquet_bytes(0))
    old = chunks(path)
    assert answer(old[0]) == expected(0, old[0])
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(InputChanged):
        answer(old[1])


def test_chunks_of_one_file_share_its_descriptor_and_numbers_are_never_reused(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.parquet" for i in range(3)]
    for i, path in enumerate(paths):
        write(path, parquet_bytes(1000 * i))
    held_numbers = []
    for path in paths:
        seen = set()
        for chunk in chunks(path):
            answer(chunk)
            seen.add(reading._local.sql.fd)
        assert len(seen) == 1  # every chunk of the file through one descriptor: one footer parse
        held_numbers += seen
    assert held_numbers == sorted(set(held_numbers))  # rising: no name means two files to DuckDB


def test_a_fresh_connection_after_enough_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "FILES_PER_CONNECTION", 2)
    made = []
    connect = reading._sql_connection
    monkeypatch.setattr(reading, "_sql_connection", lambda: made.append(1) or connect())
    for i in range(5):
        path = tmp_path / f"{i}.parquet"
        write(path, parquet_bytes(1000 * i))
        chunk = chunks(path)[0]
        assert answer(chunk) == expected(1000 * i, chunk)
    assert len(made) == 3  # files 1-2, 3-4, 5


def test_release_closes_the_held_file(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write(path, parquet_bytes(0))
    answer(chunks(path)[0])
    fd = reading._local.sql.fd
    assert os.path.samefile(f"/proc/self/fd/{fd}", path)
    reading._local.sql.release()
    assert reading._local.sql.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
