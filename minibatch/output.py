"""A job's output directory: atomic, durable publication under deterministic names.

Files being written live in a sibling staging directory (same filesystem, so the final
rename is atomic; outside the output so neither pyarrow's nor DuckDB's globs see them).
Reduce jobs keep their chunk results in a sibling parts directory and publish one file.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

REDUCED_NAME = "part-reduced.parquet"


@dataclass(frozen=True)
class OutputLayout:
    output: Path
    reduce: bool

    @property
    def staging(self) -> Path:
        return self.output.parent / f".{self.output.name}.minibatch-staging"

    @property
    def parts(self) -> Path:
        """Where chunk results go: the output itself for map jobs."""
        return self.output.parent / f".{self.output.name}.minibatch-parts" if self.reduce else self.output

    def prepare(self) -> int:
        """Create the directories; remove files a killed run left half-written. Returns how many."""
        for directory in (self.output, self.staging, self.parts):
            directory.mkdir(parents=True, exist_ok=True)
        leftovers = list(self.staging.iterdir())
        for path in leftovers:
            _remove(path)
        return len(leftovers)

    def part_files(self) -> set[str]:
        return {p.name for p in self.parts.iterdir() if p.name.endswith(".parquet") and p.is_file()}

    def remove_parts(self, names: set[str]) -> None:
        for name in names:
            (self.parts / name).unlink(missing_ok=True)
        if names:
            fsync_dir(self.parts)

    def remove_all(self) -> None:
        for directory in (self.output, self.staging, self.parts):
            shutil.rmtree(directory, ignore_errors=True)


def part_name(chunk_id: str) -> str:
    return f"part-{chunk_id}.parquet"


def write_atomically(table: pa.Table, target: Path, staging: Path) -> int:
    """Write `table` to `target` so readers see either nothing or the whole file; returns bytes.

    The file's data is fsynced before the rename; the directory entry is made durable by
    `fsync_dir(target.parent)`, which the caller owes before recording the file as done
    (the coordinator does it once per batch of chunks).
    """
    temp = staging / f"{target.name}.{os.getpid()}.tmp"
    size = write_durably(table, temp)
    publish(temp, target)
    return size


def write_durably(table: pa.Table, path: Path) -> int:
    """Write and fsync a Parquet file (removed again if writing fails); returns its size."""
    import pyarrow.parquet as pq

    try:
        with open(path, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
            return handle.tell()
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def publish(staged: Path, target: Path) -> None:
    """Rename a durable staged file into place (atomic: same filesystem)."""
    try:
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
