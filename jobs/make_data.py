"""Generate the example flights data: `python -m jobs.make_data [--rows N] [--files N] [DIR]`.

Deterministic (fixed seed), so every clone computes the same example output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CARRIERS = ["AA", "DL", "UA", "WN", "B6", "AS", "NK", "F9"]
AIRPORTS = ["ATL", "DFW", "DEN", "ORD", "LAX", "JFK", "LAS", "MCO", "SEA", "SFO"]


def flights(start_id: int, rows: int, month: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    first = dt.date(2024, month, 1)
    return pa.table(
        {
            "id": pa.array(range(start_id, start_id + rows), pa.int64()),
            "day": pa.array([first + dt.timedelta(days=rng.randrange(28)) for _ in range(rows)]),
            "carrier": pa.array([rng.choice(CARRIERS) for _ in range(rows)]),
            "origin": pa.array([rng.choice(AIRPORTS) for _ in range(rows)]),
            "dep_delay": pa.array([round(rng.expovariate(1 / 15) - 5, 1) for _ in range(rows)]),
            "distance": pa.array([rng.randrange(100, 3000) for _ in range(rows)], pa.int32()),
        }
    )


def generate(directory: Path, files: int = 6, rows: int = 50_000, row_group: int = 10_000) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for month in range(1, files + 1):
        table = flights((month - 1) * rows, rows, month, seed=month)
        pq.write_table(table, directory / f"flights-2024-{month:02d}.parquet", row_group_size=row_group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", nargs="?", default="data/flights", type=Path)
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--rows", type=int, default=50_000, help="rows per file")
    parser.add_argument("--row-group", type=int, default=10_000)
    args = parser.parse_args()
    generate(args.directory, args.files, args.rows, args.row_group)
    print(f"wrote {args.files} files of {args.rows:,} rows to {args.directory}")


if __name__ == "__main__":
    main()
