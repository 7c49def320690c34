"""Chunk planning (SPEC: "Chunks"): pure planning properties, real Parquet footers, input globs."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minibatch.inputs import expand_inputs
from minibatch.planner import (
    BadFile,
    Chunk,
    FileMeta,
    RowGroup,
    plan_chunks,
    read_file_meta,
    scan_inputs,
)

# ---------------------------------------------------------------- strategies

# nbytes and chunk_bytes are drawn on a small and on a huge scale, so that both coalescing
# (many groups per chunk) and splitting (many chunks per group) are exercised.
byte_counts = st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 2**40))
chunk_sizes = st.one_of(st.integers(1, 64), st.integers(1, 4096), st.integers(1, 2**40))


def row_groups(min_rows: int = 0) -> st.SearchStrategy[tuple[RowGroup, ...]]:
    group = st.builds(RowGroup, num_rows=st.integers(min_rows, 1000), nbytes=byte_counts, decoded=byte_counts)
    return st.lists(group, min_size=0, max_size=12).map(tuple)


fingerprints = st.text("0123456789abcdef-", min_size=1, max_size=24)


@st.composite
def file_lists(draw, min_rows: int = 0) -> list[FileMeta]:
    count = draw(st.integers(0, 4))
    return [
        FileMeta(
            path=f"/data/in/part-{index}.parquet",
            fingerprint=draw(fingerprints),
            size=draw(st.integers(0, 2**40)),
            row_groups=draw(row_groups(min_rows)),
        )
        for index in range(count)
    ]


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _offsets(meta: FileMeta) -> list[int]:
    offsets, total = [], 0
    for group in meta.row_groups:
        offsets.append(total)
        total += group.num_rows
    return offsets + [total]


def _is_whole_groups(chunk: Chunk, offsets: list[int]) -> bool:
    return chunk.row_start == offsets[chunk.rg_start] and chunk.row_end == offsets[chunk.rg_end]


def _check_file_chunks(meta: FileMeta, chunks: list[Chunk], chunk_bytes: int, cap: int | None = None) -> None:
    cap = cap or 2**63
    offsets = _offsets(meta)
    total_rows = offsets[-1]
    for chunk in chunks:
        assert chunk.path == meta.path
        assert chunk.fingerprint == meta.fingerprint
        assert 0 <= chunk.rg_start < chunk.rg_end <= len(meta.row_groups), chunk
        assert offsets[chunk.rg_start] <= chunk.row_start <= chunk.row_end, chunk
        assert chunk.row_end <= offsets[chunk.rg_end], chunk
        assert chunk.rg_row_offset == offsets[chunk.rg_start], chunk
        assert chunk.num_rows == chunk.row_end - chunk.row_start
        assert chunk.num_rows >= 1, f"empty chunk {chunk}"  # empty row groups get no chunk
        groups = meta.row_groups[chunk.rg_start : chunk.rg_end]
        assert chunk.size <= 2 * cap or chunk.num_rows == 1, (chunk, cap)  # rows split evenly
        if len(groups) > 1:  # coalesced: whole row groups, never above chunk_bytes or the cap
            assert _is_whole_groups(chunk, offsets), chunk
            assert sum(g.nbytes for g in groups) <= chunk_bytes, chunk
            assert chunk.size == sum(g.size for g in groups) <= cap, chunk
            assert chunk.nbytes == sum(g.nbytes for g in groups)
            assert chunk.nbytes <= chunk_bytes
        elif not _is_whole_groups(chunk, offsets):  # split: a row range of one row group
            (group,) = groups
            assert group.nbytes > chunk_bytes or group.size > cap, (chunk, group)
            assert chunk.num_rows >= 1
    # every row of the file exactly once: the non-empty ranges tile [0, total_rows)
    ranges = sorted((c.row_start, c.row_end) for c in chunks if c.num_rows > 0)
    position = 0
    for start, end in ranges:
        assert start == position, f"gap or overlap at row {position}: {ranges}"
        position = end
    assert position == total_rows, f"rows {position}..{total_rows} not covered"
    # the plan keeps file order: chunks come in row order
    assert [(c.row_start, c.row_end) for c in chunks] == sorted((c.row_start, c.row_end) for c in chunks)


@PROPERTY
@given(files=file_lists(), chunk_bytes=chunk_sizes, cap=st.one_of(st.none(), chunk_sizes))
def test_plan_covers_every_row_exactly_once(files, chunk_bytes, cap):
    """... also when chunks are capped by their decoded size (`max_size`, from the budget)."""
    chunks = plan_chunks(files, chunk_bytes, cap)
    by_path: dict[str, list[Chunk]] = defaultdict(list)
    for chunk in chunks:
        by_path[chunk.path].append(chunk)
    assert set(by_path) <= {meta.path for meta in files}  # no chunk from nowhere
    # chunks never span files, and each file's chunks are contiguous in the plan
    paths_in_order = [c.path for c in chunks]
    collapsed = [p for i, p in enumerate(paths_in_order) if i == 0 or paths_in_order[i - 1] != p]
    assert collapsed == [m.path for m in files if m.path in by_path]
    for meta in files:
        _check_file_chunks(meta, by_path.get(meta.path, []), chunk_bytes, cap)
    # a row-set view of the same claim, on a bounded number of rows
    if sum(c.num_rows for c in chunks) <= 20_000:
        seen: list[tuple[str, int]] = [(c.path, row) for c in chunks for row in range(c.row_start, c.row_end)]
        expected = {(m.path, r) for m in files for r in range(_offsets(m)[-1])}
        assert len(seen) == len(set(seen)) == len(expected)
        assert set(seen) == expected


@PROPERTY
@given(files=file_lists(), chunk_bytes=chunk_sizes)
def test_plan_coalesces_greedily(files, chunk_bytes):
    """Two neighbouring chunks of small row groups would not fit together in chunk_bytes."""
    chunks = plan_chunks(files, chunk_bytes)
    metas = {m.path: m for m in files}
    for before, after in zip(chunks, chunks[1:], strict=False):
        if before.path != after.path:
            continue
        groups = metas[before.path].row_groups
        small = [g.nbytes <= chunk_bytes for g in groups[before.rg_start : after.rg_end]]
        if all(small) and before.rg_end == after.rg_start:
            assert before.nbytes + after.nbytes > chunk_bytes, (before, after)


@PROPERTY
@given(files=file_lists(min_rows=1), chunk_bytes=chunk_sizes)
def test_chunk_ids_unique_and_follow_fingerprint(files, chunk_bytes):
    chunks = plan_chunks(files, chunk_bytes)
    ids = [c.chunk_id for c in chunks]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, str) and i for i in ids)
    assert [c.chunk_id for c in plan_chunks(files, chunk_bytes)] == ids  # deterministic
    changed = [dataclasses.replace(m, fingerprint=m.fingerprint + "-new") for m in files]
    new_ids = [c.chunk_id for c in plan_chunks(changed, chunk_bytes)]
    assert len(new_ids) == len(ids)
    assert not set(new_ids) & set(ids)


@PROPERTY
@given(files=file_lists(), chunk_bytes=chunk_sizes)
@example(
    files=[FileMeta("/data/in/e.parquet", "fp", 10, (RowGroup(0, 100), RowGroup(0, 100)))],
    chunk_bytes=10,
)
def test_chunk_ids_unique_with_empty_row_groups(files, chunk_bytes):
    ids = [c.chunk_id for c in plan_chunks(files, chunk_bytes)]
    assert len(ids) == len(set(ids))


def test_plan_examples():
    meta = FileMeta(
        "/d/f.parquet",
        "fp",
        1,
        (RowGroup(10, 40), RowGroup(10, 40), RowGroup(10, 40), RowGroup(100, 250), RowGroup(5, 5)),
    )
    chunks = plan_chunks([meta], 100)
    assert [(c.row_start, c.row_end, c.rg_start, c.rg_end) for c in chunks] == [
        (0, 20, 0, 2),  # 40 + 40 fit, a third would not
        (20, 30, 2, 3),
        (30, 63, 3, 4),  # 250 bytes > 100: split into ceil(250/100) = 3 row ranges
        (63, 96, 3, 4),
        (96, 130, 3, 4),
        (130, 135, 4, 5),
    ]
    exact = FileMeta("/d/g.parquet", "fp", 1, (RowGroup(1, 40), RowGroup(1, 60), RowGroup(1, 100)))
    assert [(c.rg_start, c.rg_end, c.nbytes) for c in plan_chunks([exact], 100)] == [
        (0, 2, 100),  # exactly chunk_bytes still fits
        (2, 3, 100),  # a group of exactly chunk_bytes is not split
    ]
    assert plan_chunks([], 100) == []
    assert plan_chunks([FileMeta("/d/empty.parquet", "fp", 1, ())], 100) == []


def test_split_never_makes_more_pieces_than_rows():
    meta = FileMeta("/d/f.parquet", "fp", 1, (RowGroup(3, 10**9),))
    chunks = plan_chunks([meta], 1)
    assert [(c.row_start, c.row_end) for c in chunks] == [(0, 1), (1, 2), (2, 3)]


def test_planning_ten_thousand_row_groups_is_fast():
    rng = random.Random(7)
    groups = tuple(RowGroup(rng.randint(1, 50_000), rng.randint(0, 8 * 2**20)) for _ in range(10_000))
    files = [FileMeta(f"/d/{i}.parquet", f"fp{i}", 1, groups[i * 1000 : (i + 1) * 1000]) for i in range(10)]
    one_file = [FileMeta("/d/big.parquet", "fp", 1, groups)]
    for layout in (files, one_file):
        started = time.perf_counter()
        chunks = plan_chunks(layout, 4 * 2**20)
        ids = {c.chunk_id for c in chunks}
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, f"planning 10,000 row groups took {elapsed:.2f} s"
        assert len(ids) == len(chunks)
        assert sum(c.num_rows for c in chunks) == sum(g.num_rows for g in groups)


# ----------------------------------------------------------------- real files


def _table(rows: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "carrier": pa.array([rng.choice(["AA", "DL", "UA", "WN"]) for _ in range(rows)]),
            "delay": pa.array([rng.random() * 100 for _ in range(rows)], pa.float64()),
            "note": pa.array([f"note number {rng.random()}" for _ in range(rows)]),
            "pos": pa.array(
                [{"x": float(i), "y": float(-i)} for i in range(rows)],
                pa.struct([("x", pa.float64()), ("y", pa.float64())]),
            ),
        }
    )


def _write(path: Path, rows: int = 5000, group_rows: int = 1000, seed: int = 0) -> Path:
    pq.write_table(_table(rows, seed), path, row_group_size=group_rows)
    return path


def test_read_file_meta_full_and_projected(tmp_path):
    path = _write(tmp_path / "flights.parquet")
    md = pq.ParquetFile(path).metadata
    full = read_file_meta(str(path), None)
    assert full.path == str(path)
    assert full.size == path.stat().st_size
    assert len(full.row_groups) == md.num_row_groups == 5
    assert [g.num_rows for g in full.row_groups] == [1000] * 5
    assert [g.nbytes for g in full.row_groups] == [md.row_group(i).total_byte_size for i in range(5)]
    assert all(g.nbytes > 0 for g in full.row_groups)

    projected = read_file_meta(str(path), ["carrier", "delay"])
    assert projected.fingerprint == full.fingerprint  # same file, same fingerprint
    assert [g.num_rows for g in projected.row_groups] == [1000] * 5
    names = [md.schema.column(j).path for j in range(md.num_columns)]
    for i, (whole, part) in enumerate(zip(full.row_groups, projected.row_groups, strict=True)):
        group = md.row_group(i)
        expected = sum(
            group.column(j).total_uncompressed_size
            for j, name in enumerate(names)
            if name in ("carrier", "delay")
        )
        assert part.nbytes == expected
        assert 0 < part.nbytes < whole.nbytes

    nested = read_file_meta(str(path), ["pos"])  # a struct column counts all its leaves
    for i, group in enumerate(nested.row_groups):
        leaves = [j for j, name in enumerate(names) if name.startswith("pos.")]
        assert len(leaves) == 2
        rg = md.row_group(i)
        assert group.nbytes == sum(rg.column(j).total_uncompressed_size for j in leaves)


def test_scan_inputs_with_and_without_columns(tmp_path):
    paths = [str(_write(tmp_path / f"p{i}.parquet", rows=3000, seed=i)) for i in range(3)]
    good, bad = scan_inputs(paths, None)
    assert bad == []
    assert [m.path for m in good] == paths
    good_projected, bad = scan_inputs(paths, ["id"])
    assert bad == []
    for whole, part in zip(good, good_projected, strict=True):
        assert whole.fingerprint == part.fingerprint
        assert len(whole.row_groups) == len(part.row_groups) == 3
        assert sum(g.nbytes for g in part.row_groups) < sum(g.nbytes for g in whole.row_groups)
    chunks = plan_chunks(good_projected, 2**30)
    assert [(c.path, c.row_start, c.row_end) for c in chunks] == [(p, 0, 3000) for p in paths]


def test_fingerprint_changes_when_file_is_rewritten(tmp_path):
    path = _write(tmp_path / "f.parquet", seed=1)
    first = read_file_meta(str(path), None)
    assert read_file_meta(str(path), None).fingerprint == first.fingerprint  # stable
    _write(path, seed=2)  # new content
    second = read_file_meta(str(path), None)
    assert second.fingerprint != first.fingerprint
    # identical bytes, only a new modification time: still new input
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third = read_file_meta(str(path), None)
    assert third.fingerprint != second.fingerprint
    ids = {c.chunk_id for c in plan_chunks([second], 2**20)}
    assert not ids & {c.chunk_id for c in plan_chunks([third], 2**20)}


def test_scan_inputs_reports_bad_files_and_never_raises(tmp_path):
    # (a file the OS will not let it read is not a bad file: test_safety_inputs)
    good_path = _write(tmp_path / "good.parquet")
    blob = good_path.read_bytes()
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    text = tmp_path / "x.parquet"
    text.write_text("carrier,delay\nAA,12\nDL,3\n" * 20)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(blob[: len(blob) // 2])
    tail_only = tmp_path / "cut.parquet"  # footer magic intact, data and footer start missing
    tail_only.write_bytes(b"PAR1" + blob[-40:])
    garbled = tmp_path / "garbled.parquet"  # right length and magic, footer bytes destroyed
    footer_len = int.from_bytes(blob[-8:-4], "little")
    garbled.write_bytes(blob[: -8 - footer_len] + b"\xff" * footer_len + blob[-8:])
    tiny = tmp_path / "tiny.parquet"
    tiny.write_bytes(b"PAR1")
    bad_paths = [empty, text, truncated, tail_only, garbled, tiny]
    paths = [str(good_path)] + [str(p) for p in bad_paths]
    good, bad = scan_inputs(paths, None)
    assert [m.path for m in good] == [str(good_path)]
    assert [b.path for b in bad] == [str(p) for p in bad_paths]
    for item in bad:
        assert isinstance(item, BadFile)
        kind, _, message = item.error.partition(": ")
        assert kind and message.strip(), item.error  # "ValueError: not a Parquet file ..."
        assert item.fingerprint
    by_path = {b.path: b for b in bad}
    assert by_path[str(empty)].size == 0
    assert by_path[str(text)].size == text.stat().st_size
    assert by_path[str(truncated)].size == len(blob) // 2
    assert "Parquet" in by_path[str(text)].error or "PAR1" in by_path[str(text)].error

    # a bad file that changes is new input: its fingerprint changes too
    before = by_path[str(text)].fingerprint
    text.write_text("something else entirely\n")
    (after,) = scan_inputs([str(text)], None)[1]
    assert after.fingerprint != before

    # asking for a column the file does not have is reported, not raised
    good, bad = scan_inputs([str(good_path)], ["no_such_column"])
    assert good == []
    assert "no_such_column" in bad[0].error


def test_empty_row_groups_in_a_real_file_are_covered(tmp_path):
    table = _table(10)
    path = tmp_path / "sparse.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table.slice(0, 4))
        writer.write_table(table.slice(0, 0))
        writer.write_table(table.slice(4, 6))
    (meta,), bad = scan_inputs([str(path)], None)
    assert bad == []
    assert [g.num_rows for g in meta.row_groups] == [4, 0, 6]
    chunks = plan_chunks([meta], 1)
    rows = sorted((c.row_start, c.row_end) for c in chunks if c.num_rows)
    assert rows[0][0] == 0 and rows[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))


def test_real_file_with_empty_row_groups_has_unique_chunk_ids(tmp_path):
    table = _table(0)
    path = tmp_path / "empty_groups.parquet"
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table)
        writer.write_table(table)
    (meta,), _ = scan_inputs([str(path)], None)
    ids = [c.chunk_id for c in plan_chunks([meta], 1)]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------ input globs


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in [
        "data/b.parquet",
        "data/a.parquet",
        "data/c.csv",
        "data/sub/d.parquet",
        "data/sub/deeper/e.parquet",
        "other/f.parquet",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "data/dir.parquet").mkdir()  # a directory that matches the glob
    return tmp_path


def test_expand_inputs_sorted_unique_files_only(tree):
    found = expand_inputs(tree, ["data/*.parquet"])
    assert found == [str(tree / "data/a.parquet"), str(tree / "data/b.parquet")]
    both = expand_inputs(
        tree, ["data/b.parquet", "data/*.parquet", "data/a*.parquet", str(tree / "data/*.parquet")]
    )
    assert both == found
    recursive = expand_inputs(tree, ["data/**/*.parquet", "other/*.parquet", "data/*"])
    assert recursive == sorted(
        str(tree / rel)
        for rel in [
            "data/a.parquet",
            "data/b.parquet",
            "data/c.csv",
            "data/sub/d.parquet",
            "data/sub/deeper/e.parquet",
            "other/f.parquet",
        ]
    )
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in recursive)
    assert expand_inputs(tree, ["nothing/*.parquet"]) == []
    assert expand_inputs(tree, []) == []


def test_expand_inputs_dedups_equivalent_paths(tree):
    found = expand_inputs(tree, ["data/*.parquet", f"../{tree.name}/data/*.parquet"])
    assert found == [str(tree / "data/a.parquet"), str(tree / "data/b.parquet")]


@pytest.mark.parametrize(
    "column",
    [
        pa.array([("x" * 499) + str(i % 4) for i in range(20_000)]),  # dictionary: the footer says ~5 KB
        pa.array([i % 3 for i in range(20_000)], pa.int64()),  # run-length encoded
        pa.array([str(i) * (i % 7) for i in range(20_000)]),  # varied lengths
        pa.array([float(i) for i in range(20_000)]),  # plain
    ],
)
def test_a_row_groups_decoded_size_is_estimated_from_its_footer(tmp_path: Path, column: pa.Array) -> None:
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"c": column}), path)
    (group,) = read_file_meta(str(path), None).row_groups
    assert 0.75 * column.nbytes <= group.size <= 1.5 * column.nbytes, (group, column.nbytes)


def test_a_budget_splits_what_it_could_not_hold_and_leaves_other_plans_alone(tmp_path: Path) -> None:
    path = tmp_path / "one.parquet"
    table = pa.table({"c": [("x" * 499) + str(i % 4) for i in range(20_000)]})  # 10 MB in Arrow
    pq.write_table(table, path, row_group_size=5_000)
    meta = read_file_meta(str(path), None)
    assert len(plan_chunks([meta], 64 * 2**20)) == 1  # the footer says 20 KB: one chunk
    assert len(plan_chunks([meta], 64 * 2**20, 64 * 2**20)) == 1
    capped = plan_chunks([meta], 64 * 2**20, 2**20)  # ~2.5 MB a group: 3 slices each
    assert len(capped) == 12 and all(c.size <= 2**20 for c in capped)
