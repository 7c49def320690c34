"""Issue 13: one huge row group read whole versus read in the planner's 2 MiB slices.

    python -m bench.slice_bench [--runs 7] [--rows 2450000] [--threads 1] [--data DIR]

Writes one file of ONE row group (~76 MiB uncompressed: int64, float64, string, a small-range
int64 with nulls) with and without a page index, plans it with chunk_bytes = 2 MiB (38 slices),
then times, in interleaved runs (rotating who goes first): `whole` = reading.read_chunk of the
group as one chunk, `old` = every slice decoded from the group's start (the reader before
issue 13, kept as reading._read_batches, validated like read_chunk), `new` = reading.read_chunk of
every slice (pageslice). Each new slice is checked to equal the group's rows exactly. Prints medians of wall
and of CPU seconds (the machine may be shared: CPU time is the steadier measure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from minibatch import pageslice, reading
from minibatch.planner import Chunk, plan_chunks, read_file_meta

CHUNK_BYTES = 2 * 2**20


def make_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(13)
    small = rng.integers(0, 100, rows)
    return pa.table(
        {
            "id": pa.array(rng.integers(0, 1 << 40, rows)),
            "x": pa.array(rng.random(rows)),
            "name": pa.array([f"k{v}" for v in rng.integers(0, 1 << 30, rows)]),
            "small": pa.array(small, mask=small < 5),
        }
    )


def write_files(data: Path, rows: int) -> list[Path]:
    data.mkdir(parents=True, exist_ok=True)
    paths = [data / f"one_group_{rows}_{label}.parquet" for label in ("index", "noindex")]
    if not all(p.exists() for p in paths):
        table = make_table(rows)
        for path, index in zip(paths, (True, False), strict=True):
            pq.write_table(table, path, row_group_size=rows, write_page_index=index)
    return paths


def read_chunks(path: Path, chunks: list[Chunk]) -> None:
    """What workers do: reading.read_chunk (open, check, read, validate) for every chunk."""
    pageslice._groups.clear()  # each run starts cold, like a fresh worker
    reading._footers.clear()
    for chunk in chunks:
        reading.read_chunk(chunk, None)


def read_old(path: Path, chunks: list[Chunk]) -> None:
    """The reader before issue 13 (now reading._read_batches), validated like read_chunk."""
    reading._footers.clear()
    for chunk in chunks:
        with open(path, "rb") as handle:
            metadata, _ = reading._footer(chunk, handle, os.fstat(handle.fileno()))
            parquet = pq.ParquetFile(handle, metadata=metadata)
            reading._read_batches(parquet, chunk, None, parquet.schema_arrow).validate(full=True)


def check(path: Path, chunks: list[Chunk]) -> None:
    whole = pq.ParquetFile(path).read_row_group(0)
    for chunk in chunks:
        got = reading.read_chunk(chunk, None)
        expected = whole.slice(chunk.row_start - chunk.rg_row_offset, chunk.num_rows)
        assert got.equals(expected), f"{path.name} {chunk.label} differs"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rows", type=int, default=2_450_000)
    parser.add_argument("--threads", type=int, default=0, help="Arrow CPU threads (0: Arrow's default)")
    parser.add_argument("--data", type=Path, default=Path("bench/.data/slices"))
    args = parser.parse_args()
    if args.threads:
        pa.set_cpu_count(args.threads)
    for path in write_files(args.data, args.rows):
        meta = read_file_meta(str(path), None)
        plans = {
            "whole": plan_chunks([meta], 2**62),
            "old": plan_chunks([meta], CHUNK_BYTES),
            "new": plan_chunks([meta], CHUNK_BYTES),
        }
        methods = {"whole": read_chunks, "old": read_old, "new": read_chunks}
        check(path, plans["new"])
        wall, cpu = measure(methods, plans, path, args.runs)
        print(
            f"{path.name}: {meta.row_groups[0].nbytes / 2**20:.1f} MiB uncompressed, "
            f"{len(plans['new'])} slices"
        )
        for label, med in (("wall", wall), ("cpu", cpu)):
            ratios = ", ".join(f"{n}/whole {med[n] / med['whole']:.2f}" for n in methods if n != "whole")
            times = ", ".join(f"{n} {med[n]:.3f}" for n in methods)
            print(f"  {label} s, median of {args.runs}, arrow threads {pa.cpu_count()}: {times}; {ratios}")


def measure(
    methods: dict[str, Callable[[Path, list[Chunk]], None]],
    plans: dict[str, list[Chunk]],
    path: Path,
    runs: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU (this process's, all threads) seconds; runs interleaved, rotating."""
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            started, used = time.perf_counter(), time.process_time()
            methods[name](path, plans[name])
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - used)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


if __name__ == "__main__":
    main()
