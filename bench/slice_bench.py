"""Issue 13: one huge row group read whole versus read in the planner's 2 MiB slices.

    python -m bench.slice_bench [--runs 7] [--rows 2450000] [--threads 1] [--data DIR]

Writes one file of ONE row group (~76 MiB uncompressed: int64, float64, string, a small-range
int64 with nulls) with and without a page index, plans it with chunk_bytes = 2 MiB (38 slices),
then times, in interleaved runs (rotating who goes first): `whole` = reading.read_chunk of the
group as one chunk, `old` = every slice decoded from the group's start (the reader before
issue 13, kept as reading._read_batches, validated like read_chunk), `new` = reading.read_chunk of
every slice (pageslice). Each new slice is checked to equal the group's rows exactly. Prints medians of wall
and of CPU seconds (the machine may be shared: CPU time is the steadier measure).

Then end to end, what the issue measured ("the run takes 2.2 x the unsliced run"): `minibatch
run-now` of an identity job over the file without a page index, with chunk_bytes = 2 MiB and as
one chunk, `--workers` processes (default 2), the two alternating; medians of the wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from minibatch import pageslice, reading
from minibatch.planner import Chunk, plan_chunks, read_file_meta

CHUNK_BYTES = 2 * 2**20
E2E = """[minibatch]
workers = {workers}
memory_limit = "4GiB"
log_level = "warning"

[jobs.job]
input = "{input}"
output = "out"
process = "slicejobs:same"
chunk_bytes = "{chunk}"
"""


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
    parser.add_argument("--workers", type=int, default=2, help="worker processes end to end")
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
    runs = end_to_end(path, args.runs, args.workers)
    print(
        f"end to end, `minibatch run-now` with {args.workers} workers, median of {args.runs}: sliced "
        f"{runs['sliced']:.3f} s, one chunk {runs['whole']:.3f} s; "
        f"sliced/whole {runs['sliced'] / runs['whole']:.2f}"
    )


def end_to_end(path: Path, runs: int, workers: int) -> dict[str, float]:
    """Median wall seconds of the real command over `path`: in 2 MiB slices, and as one chunk."""
    configs = {}
    for name, chunk in (("sliced", "2MiB"), ("whole", "1GiB")):
        work = path.parent.with_name(f"{path.parent.name}-e2e") / name
        work.mkdir(parents=True, exist_ok=True)
        (work / "slicejobs.py").write_text("def same(table, ctx):\n    return table\n")
        (work / "config.toml").write_text(E2E.format(workers=workers, input=path.absolute(), chunk=chunk))
        configs[name] = work / "config.toml"
    times: dict[str, list[float]] = {name: [] for name in configs}
    for run in range(runs):
        for name in list(configs)[:: 1 if run % 2 == 0 else -1]:
            command = [sys.executable, "-m", "minibatch", "--config", str(configs[name]), "run-now", "job"]
            started = time.perf_counter()
            subprocess.run([*command, "--fresh", "--quiet"], check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


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
