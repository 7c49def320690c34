"""Issue 16: a CSV to Parquet, minibatch against DuckDB's COPY and Polars' sink_parquet; and
the files a map job leaves with and without target_file_bytes.

    python -m bench.text_bench [--mb 1024] [--workers 2] [--runs 1] [--data DIR]

Generates one CSV of about `--mb` MB (int, float, short and long strings, dates, a quoted
field with a newline every 1,000 rows), then runs, each as a fresh process, timed from start to
exit with the peak RSS of its process tree (bench.measure):
  minibatch   run-now of a job with format = "csv", sql = "SELECT * FROM chunk", memory_limit
              1 GiB, chunk_bytes 64 MB; without, then with target_file_bytes = 128 MB
  duckdb      COPY (SELECT * FROM read_csv(...)) TO '...' (FORMAT parquet), threads = workers
  polars      pl.scan_csv(...).sink_parquet(...), POLARS_MAX_THREADS = workers
Every output is checked against DuckDB's read_csv of the file: row count and sums of every
numeric column and of the strings' lengths. Then the same data through a map job with 4 MB
chunks, without and with target_file_bytes: the number and sizes of the files readers see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import textwrap
from pathlib import Path

from bench.measure import run

CHECK = (
    "SELECT count(*), sum(id), round(sum(amount), 3), sum(length(name)), sum(length(note)), "
    "count(DISTINCT day) FROM {source}"
)


def make_csv(path: Path, megabytes: int) -> None:
    """About `megabytes` MB of CSV, written in blocks (never the whole file in memory)."""
    if path.exists() and path.stat().st_size >= megabytes * 10**6:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    row = 0
    with open(path, "w") as handle:
        handle.write("id,amount,name,note,day\n")
        while handle.tell() < megabytes * 10**6:
            lines = []
            for i in range(row, row + 50_000):
                note = (
                    f'"a note, with a\nnewline {i}"' if i % 1000 == 0 else f"note number {i * 7919 % 100_003}"
                )
                lines.append(f"{i},{i % 9973 / 7:.4f},name-{i % 50_000},{note},2026-11-{1 + i % 28:02d}\n")
            handle.write("".join(lines))
            row += 50_000


def expected(csv: Path) -> tuple:
    import duckdb

    source = f"read_csv('{csv}', header = true)"
    return tuple(duckdb.sql(CHECK.format(source=source)).fetchall()[0])


def produced(folder: Path) -> tuple:
    import duckdb

    return tuple(duckdb.sql(CHECK.format(source=f"read_parquet('{folder}/**/*.parquet')")).fetchall()[0])


def minibatch_cmd(root: Path, csv: Path, workers: int, extra: str, chunk: str = "64MB") -> list[str]:
    (root / "config.toml").write_text(
        textwrap.dedent(f"""
        [minibatch]
        state_dir = ".state"
        workers = {workers}
        memory_limit = "1GiB"
        log_level = "warning"
        api_addr = ""
        [jobs.csv]
        input = "{csv}"
        output = "out"
        sql = "SELECT * FROM chunk"
        format = "csv"
        chunk_bytes = "{chunk}"
        {extra}
        """)
    )
    return [
        sys.executable,
        "-m",
        "minibatch",
        "--config",
        str(root / "config.toml"),
        "run-now",
        "csv",
        "--fresh",
        "--json",
    ]


def duckdb_cmd(csv: Path, out: Path, workers: int) -> list[str]:
    code = (
        f"import duckdb; con = duckdb.connect(config={{'threads': {workers}}}); "
        f"con.execute(\"COPY (SELECT * FROM read_csv('{csv}', header = true)) TO '{out}/data.parquet' "
        f'(FORMAT parquet)")'
    )
    return [sys.executable, "-c", code]


def polars_cmd(csv: Path, out: Path) -> list[str]:
    code = f"import polars as pl; pl.scan_csv('{csv}').sink_parquet('{out}/data.parquet')"
    return [sys.executable, "-c", code]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("bench/.data/text"))
    args = parser.parse_args(argv)
    data = args.data.resolve()
    csv = data / "input" / f"{args.mb}mb.csv"
    make_csv(csv, args.mb)
    want = expected(csv)
    print(f"CSV {csv.stat().st_size / 1e6:,.0f} MB, {want[0]:,} rows", file=sys.stderr)
    env = {**os.environ, "POLARS_MAX_THREADS": str(args.workers)}
    engines = {
        "minibatch, a file per chunk": lambda out: minibatch_cmd(out, csv, args.workers, ""),
        "minibatch, target_file_bytes 128 MB": lambda out: minibatch_cmd(
            out, csv, args.workers, 'target_file_bytes = "128MB"'
        ),
        "duckdb COPY": lambda out: duckdb_cmd(csv, out / "out", args.workers),
        "polars sink_parquet": lambda out: polars_cmd(csv, out / "out"),
    }
    rows = []
    for name, command in engines.items():
        walls, peaks = [], []
        for attempt in range(args.runs):
            out = data / name.replace(" ", "_").replace(",", "") / str(attempt)
            shutil.rmtree(out, ignore_errors=True)
            (out / "out").mkdir(parents=True)
            sample = run(command(out), cwd=out, env=env)
            if not sample.ok:
                print(f"{name} failed: {sample.stderr[-2000:]}", file=sys.stderr)
                return 1
            got = produced(out / "out")
            if got != want:
                print(f"{name}: WRONG OUTPUT {got} != {want}", file=sys.stderr)
                return 1
            walls.append(sample.wall)
            peaks.append(sample.peak_rss)
            if name.startswith("minibatch"):
                r = {k: v / 2**20 if "memory" in k else v for k, v in json.loads(sample.stdout).items()}
                print(f"{name}: measured {r['peak_memory']:,.0f} MiB above an idle {r['idle_memory']:,.0f} "
                      f"MiB; budget {r['memory_limit']:,.0f} MiB; {r['chunks_total']} chunks, {r['workers']} "
                      "workers", file=sys.stderr)  # fmt: skip
        rows.append((name, statistics.median(walls), max(peaks)))
    base = rows[0][1]
    print(
        f"\n{want[0]:,} rows, {csv.stat().st_size / 1e6:,.0f} MB of CSV, {args.workers} workers; "
        "every output checked\n"
    )
    print("| engine | seconds | peak RSS MiB | minibatch ÷ this |")
    print("| --- | ---: | ---: | ---: |")
    for name, wall, peak in rows:
        print(f"| {name} | {wall:.1f} | {peak / 2**20:,.0f} | {base / wall:.2f} |")
    print("\nFiles readers see after a map job with chunk_bytes = 4 MB:\n")
    print("| output | files | median MB | smallest MB |")
    print("| --- | ---: | ---: | ---: |")
    for label, extra in (
        ("a part per chunk", ""),
        ('target_file_bytes = "128MB"', 'target_file_bytes = "128MB"'),
    ):
        out = data / "files" / ("plain" if not extra else "target")
        shutil.rmtree(out, ignore_errors=True)
        (out / "out").mkdir(parents=True)
        sample = run(minibatch_cmd(out, csv, args.workers, extra, chunk="4MB"), cwd=out, env=env)
        assert sample.ok, sample.stderr[-2000:]
        assert produced(out / "out") == want
        sizes = sorted(p.stat().st_size for p in (out / "out").rglob("*.parquet"))
        print(f"| {label} | {len(sizes)} | {statistics.median(sizes) / 1e6:.1f} | {sizes[0] / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
