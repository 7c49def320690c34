"""The benchmark's input data: generated once with fixed seeds, cached under the data dir.

A dataset directory is complete when it holds `_complete.json` with the parameters it was
made with; anything else (a half-written directory, other parameters) is made again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import numpy as np

MARKER = "_complete.json"
ARROW_BYTES = "_arrow_bytes.json"
WIDE_SEED = 20240601
TINY_SEED = 7
CATEGORIES = [f"category_{i:02d}" for i in range(20)]
TEXT_ALPHABET = b"abcdefghijklmnopqrstuvwxyz      "  # spaces make word-like text
TS_START_US = 1_704_067_200 * 10**6  # 2024-01-01T00:00:00Z
TS_SPAN_US = 365 * 86_400 * 10**6


@dataclass(frozen=True)
class Dataset:
    """Parquet files plus what their footers say (rows, row groups, uncompressed bytes per column)."""

    name: str
    files: tuple[str, ...]
    rows: int
    row_groups: int
    column_bytes: dict[str, int] = field(default_factory=dict)
    disk_bytes: int = 0
    rg_bytes: tuple[int, ...] = ()  # uncompressed bytes of each row group, all columns

    def parquet_bytes(self, columns: tuple[str, ...] | None = None) -> int:
        """Uncompressed Parquet page bytes of the given columns (all by default), from the footers."""
        names = columns or tuple(self.column_bytes)
        return sum(self.column_bytes[c] for c in names)

    def arrow_bytes(self, columns: tuple[str, ...] | None = None) -> int:
        """Decoded (Arrow, in memory) bytes of the given columns: what every engine must process.

        Measured by reading every row group once; cached beside the files.
        """
        cache = Path(self.files[0]).parent / ARROW_BYTES
        known = json.loads(cache.read_text()) if cache.exists() else {}
        key = ",".join(columns) if columns else "*"
        if key not in known:
            known[key] = sum(_decoded_bytes(path, columns) for path in self.files)
            cache.write_text(json.dumps(known))
        return int(known[key])


def _decoded_bytes(path: str, columns: tuple[str, ...] | None) -> int:
    parquet = pq.ParquetFile(path)
    cols = list(columns) if columns else None
    return sum(parquet.read_row_group(i, columns=cols).nbytes for i in range(parquet.num_row_groups))


@dataclass(frozen=True)
class Synthetic:
    """Parameters of a generated table: files x row groups x rows, from one seed."""

    files: int
    row_groups_per_file: int
    rows_per_group: int
    seed: int


def load(name: str, directory: Path) -> Dataset:
    files = sorted(str(p) for p in directory.rglob("*.parquet"))
    rows = groups = disk = 0
    column_bytes: dict[str, int] = {}
    rg_bytes: list[int] = []
    for path in files:
        meta = pq.read_metadata(path)
        rows += meta.num_rows
        groups += meta.num_row_groups
        disk += Path(path).stat().st_size
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            rg_bytes.append(group.total_byte_size)
            for j in range(group.num_columns):
                column = group.column(j)
                top = column.path_in_schema.split(".")[0]
                column_bytes[top] = column_bytes.get(top, 0) + column.total_uncompressed_size
    return Dataset(name, tuple(files), rows, groups, column_bytes, disk, tuple(rg_bytes))


def _cached(directory: Path, params: dict[str, object]) -> bool:
    marker = directory / MARKER
    return marker.exists() and json.loads(marker.read_text()) == params


def _build(directory: Path, params: dict[str, object], make: Callable[[Path], None]) -> None:
    """Run `make(tmp_dir)` in a sibling temp directory, then move it into place."""
    temp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    temp.mkdir(parents=True)
    started = time.monotonic()
    make(temp)
    (temp / MARKER).write_text(json.dumps(params))
    temp.rename(directory)
    print(f"  {directory.name}: generated in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


# -- TPC-H lineitem ---------------------------------------------------------------------------


def tpchgen_path() -> str | None:
    """tpchgen-cli next to this interpreter (an unactivated venv), else on PATH."""
    beside = Path(sys.executable).parent / "tpchgen-cli"
    return str(beside) if beside.exists() else shutil.which("tpchgen-cli")


def tpchgen_version() -> str | None:
    exe = tpchgen_path()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().removeprefix("tpchgen-cli").strip() or None


def tpch_lineitem(data_dir: Path, sf: float) -> Dataset | None:
    """TPC-H lineitem at scale factor `sf` in 4 files (string columns are string_view)."""
    exe = tpchgen_path()
    name = f"tpch-sf{sf:g}"
    directory = data_dir / name
    params = {"sf": sf, "parts": 4, "generator": tpchgen_version()}
    if exe is None:
        return None
    if not _cached(directory, params):
        print(f"generating {name} with tpchgen-cli ...", file=sys.stderr, flush=True)
        _build(directory, params, lambda temp: _run_tpchgen(exe, sf, temp))
    return load(name, directory / "lineitem")


def _run_tpchgen(exe: str, sf: float, out: Path) -> None:
    cmd = [exe, "parquet", "-s", f"{sf:g}", "--tables=lineitem", "--parts=4", f"--output-dir={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# -- synthetic tables -------------------------------------------------------------------------


def synthetic(data_dir: Path, name: str, spec: Synthetic) -> Dataset:
    directory = data_dir / name
    params = {"files": spec.files, "groups": spec.row_groups_per_file, "rows": spec.rows_per_group}
    params |= {"seed": spec.seed, "version": 1}
    if not _cached(directory, params):
        print(f"generating {name} ...", file=sys.stderr, flush=True)
        _build(directory, params, lambda temp: _write_synthetic(temp, spec))
    return load(name, directory)


def _write_synthetic(directory: Path, spec: Synthetic) -> None:
    per_file = spec.row_groups_per_file * spec.rows_per_group
    for index in range(spec.files):
        path = directory / f"part-{index:03d}.parquet"
        with pq.ParquetWriter(path, _SCHEMA) as writer:
            for group in range(spec.row_groups_per_file):
                first_id = index * per_file + group * spec.rows_per_group
                seed = (spec.seed, index, group)
                writer.write_table(synthetic_rows(first_id, spec.rows_per_group, seed))


_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("ts", pa.timestamp("us")),
        ("category", pa.string()),
        ("amount", pa.float64()),
        ("text", pa.string()),
    ]
)


def synthetic_rows(first_id: int, n: int, seed: tuple[int, ...]) -> pa.Table:
    """`n` rows of the wide table: ids from `first_id`, everything else from `seed`."""
    import numpy as np

    rng = np.random.default_rng(list(seed))
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    ts = (TS_START_US + rng.integers(0, TS_SPAN_US, n)).astype("datetime64[us]")
    category = pa.DictionaryArray.from_arrays(
        pa.array(rng.integers(0, len(CATEGORIES), n).astype(np.int32)), pa.array(CATEGORIES)
    ).cast(pa.string())
    amount = np.round(rng.normal(40.0, 60.0, n), 2)
    return pa.Table.from_arrays(
        [pa.array(ids), pa.array(ts), category, pa.array(amount), _random_text(rng, n)],
        schema=_SCHEMA,
    )


def _random_text(rng: np.random.Generator, n: int) -> pa.Array:
    """`n` strings of 30-50 random letters and spaces (about 40 characters)."""
    import numpy as np

    lengths = rng.integers(30, 51, n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    alphabet = np.frombuffer(TEXT_ALPHABET, dtype=np.uint8)
    data = alphabet[rng.integers(0, len(alphabet), int(offsets[-1]))]
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))
