"""Publishing a job's output unit by unit: partitions replaced whole, files near a target size.

A job with `partition_by` or `target_file_bytes` keeps each chunk's result as a part in its
hidden parts directory (the provenance resume and incremental runs need) and, when a run
succeeds, publishes units: each partition directory (or the output itself) is rebuilt in
staging and swapped in with one `renameat2(RENAME_EXCHANGE)`, so a reader sees the whole old
or the whole new unit, and a crash leaves one or the other (what staging holds is removed
by the next run, which rebuilds what is missing from the parts).

Each published file names, in its footer, the chunk results (sources) it holds; a source is
never split across files. A unit is rebuilt only when its sources changed: files whose
sources are all still current are kept (linked, byte for byte), files holding a source that
is gone or recomputed are rewritten, new sources go into new files, and files under half the
target are merged with them: rewritten row by row, never concatenated (PARQUET-1115).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from minibatch.hive import FILE_RE, SOURCES_KEY, nullable, units_of
from minibatch.layout import CHUNK_KEY, DEFINITION_KEY, OutputLayout, remove_published
from minibatch.userfiles import (
    WHOLE_PREFIX,
    Placed,
    fresh_dir,
    fsync_dir,
    keep_attributes,
    link_theirs,
    note_unit,
    ours,
    place,
    remove_tree,
    rescue,
)  # fmt: skip

RENAME_EXCHANGE = 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28


class PublishError(Exception):
    """A unit that cannot be replaced without touching what minibatch did not write."""


@dataclass(frozen=True)
class Slice:
    """One source's rows of one unit: row groups [first, first + count) of its part."""

    token: str  # chunk id, definition and size of the part: changes when the chunk's rows do
    path: Path
    first: int
    count: int
    nbytes: int  # compressed, from the footer: what the slice adds to a file


@dataclass(frozen=True)
class OutFile:
    name: str
    sources: frozenset[str]
    nbytes: int


@dataclass
class Published:
    units_written: int = 0
    units_removed: int = 0
    units_unchanged: int = 0
    files_written: int = 0
    files_kept: int = 0
    rows_written: int = 0
    files: list[int] = field(default_factory=list)  # sizes of the files the output holds

    def summary(self) -> dict[str, int]:
        sizes = sorted(self.files)
        return {
            "units_written": self.units_written, "units_removed": self.units_removed,
            "units_unchanged": self.units_unchanged, "files_written": self.files_written,
            "files_kept": self.files_kept, "rows_written": self.rows_written, "files": len(sizes),
            "median_file_bytes": sizes[len(sizes) // 2] if sizes else 0,
        }  # fmt: skip


def read_slices(parts: Iterable[Path]) -> dict[str, list[Slice]]:
    """unit -> its slices, in part order, from the parts' footers."""
    import pyarrow.parquet as pq

    found: dict[str, list[Slice]] = {}
    for path in parts:
        metadata = pq.read_metadata(path)
        keys = metadata.metadata or {}
        token = f"{keys[CHUNK_KEY].decode()}:{keys[DEFINITION_KEY].decode()}:{path.stat().st_size}"
        for unit, (first, count) in units_of(keys).items():
            size = sum(_compressed(metadata.row_group(i)) for i in range(first, first + count))
            found.setdefault(unit, []).append(Slice(token, path, first, count, size))
    return found


def publish_parts(
    layout: OutputLayout, wanted: dict[str, list[Slice]], threads: int = 1, whole: bool = False
) -> Published:
    publisher = Publisher(layout, threads)
    return publisher.publish_whole(wanted) if whole else publisher.publish(wanted)


def plan_files(slices: list[Slice], target: int) -> list[list[Slice]]:
    """Slices grouped into files of about `target` bytes; a slice is never split."""
    files: list[list[Slice]] = []
    size = target
    for piece in slices:
        if size >= target:
            files.append([])
            size = 0
        files[-1].append(piece)
        size += piece.nbytes
    return files


class Publisher:
    def __init__(self, layout: OutputLayout, threads: int = 1) -> None:
        self.layout, self.shape, self.threads = layout, layout.shape, threads
        self.out = Published()

    def publish(self, wanted: dict[str, list[Slice]]) -> Published:
        existing = self.existing_units()
        for unit in sorted(wanted.keys() | existing.keys()):
            self._unit(unit, wanted.get(unit, []), existing.get(unit, []))
        # Files of another partition_by go last: a reader during a re-layout may see rows in
        # both layouts, never in neither (a new output directory avoids both).
        remove_published(self.layout.output, self.shape.partition_by)
        if self.shape.partition_by:  # a part per chunk, or a reduced file, of the earlier shape
            for path in self.layout.output.iterdir():
                if path.is_file() and ours(path.name):
                    path.unlink()
        fsync_dir(self.layout.output)
        return self.out

    def publish_whole(self, wanted: dict[str, list[Slice]]) -> Published:
        """Every partition at once (a reduction's, whose rows may move between partitions): the
        whole output is built beside it, what minibatch did not write linked in, and swapped in
        one step, so readers and a crash see the old result or the new one, never parts of both."""
        output = self.layout.output
        staged = (
            self.layout.staging
            / f"{WHOLE_PREFIX}{_digest(*sorted(p.token for v in wanted.values() for p in v))}"
        )
        staged = fresh_dir(staged)
        note = note_unit(staged, "", output)
        placed: Placed = {}
        link_theirs(output, staged, placed)
        files = []
        for unit, slices in sorted(wanted.items()):
            for path in [*reversed(Path(unit).parents[:-1]), Path(unit)]:  # a user's file or link in the way
                if os.path.lexists(staged / path) and not _real_dir(staged / path):
                    _refuse(staged, note, output / path)
            (staged / unit).mkdir(parents=True, exist_ok=True)
            files += [(staged / unit, unit, group) for group in plan_files(slices, self.shape.target)]
        with ThreadPoolExecutor(max(1, min(self.threads, len(files)))) as pool:
            for rows, size in pool.map(lambda job: self._write_file(*job), files):
                self.out.rows_written += rows
                self.out.files.append(size)
        self.out.files_written = len(files)
        for directory, _, _ in os.walk(staged, topdown=False):
            fsync_dir(Path(directory))
        self.out.units_written = len(wanted)
        self.out.units_removed = len(self.existing_units().keys() - wanted.keys())
        _swap_in(staged, output, note)
        rescue(staged, output, placed, anywhere=True)  # the old output, now here: what a user made meanwhile
        keep_attributes(staged, output)
        remove_tree(staged)
        note.unlink()
        return self.out

    # -- what the output holds ----------------------------------------------------------------

    def existing_units(self) -> dict[str, list[OutFile]]:
        depth = len(self.shape.partition_by)
        leaves = [""] if not depth else self._leaves(self.layout.output, depth, "")
        return {unit: self._files(self.layout.output / unit) for unit in leaves}

    def _leaves(self, directory: Path, depth: int, prefix: str) -> list[str]:
        column = self.shape.partition_by[len(self.shape.partition_by) - depth]
        found = []
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith(column + "="):
                unit = f"{prefix}{entry.name}"
                found += [unit] if depth == 1 else self._leaves(Path(entry.path), depth - 1, unit + "/")
        return found

    def _files(self, directory: Path) -> list[OutFile]:
        import pyarrow.parquet as pq

        files = []
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if FILE_RE.match(path.name):
                try:
                    sources = json.loads((pq.read_metadata(path).metadata or {})[SOURCES_KEY])
                except Exception:  # unreadable, or not saying: ours by name, rewritten
                    sources = []
                files.append(OutFile(path.name, frozenset(sources), path.stat().st_size))
        return files

    # -- one unit -------------------------------------------------------------------------------

    def _unit(self, unit: str, slices: list[Slice], files: list[OutFile]) -> None:
        current = {piece.token for piece in slices}
        if not current:
            if not unit and not files:
                return  # an output without rows, as it was
            if not unit or any(not ours(name) for name in os.listdir(self.layout.output / unit)):
                self._replace(unit, [], [])  # what minibatch did not write stays, swapped in alone
            else:
                self._remove_unit(unit)
            self.out.units_removed += 1
            return
        valid = [f for f in files if f.sources and f.sources <= current]
        small = [f for f in valid if f.nbytes < self.shape.target // 2]
        covered = set().union(*(f.sources for f in valid))
        changed = covered != current or len(valid) < len(files)
        if not changed and len(small) < 2:
            self.out.units_unchanged += 1
            self.out.files += [f.nbytes for f in files]
            return
        keep = [f for f in valid if f not in small]
        kept = set().union(*(f.sources for f in keep))
        todo = [piece for piece in slices if piece.token not in kept]
        self._replace(unit, keep, todo)

    def _replace(self, unit: str, keep: list[OutFile], todo: list[Slice]) -> None:
        target = self.layout.output / unit if unit else self.layout.output
        self._check_path(target)
        staged = self.layout.staging / f"unit-{_digest(unit, *sorted(p.token for p in todo))}"
        staged = fresh_dir(staged)
        note = note_unit(staged, unit, target)
        placed = self._carry_over(target, staged, {f.name for f in keep})
        groups = plan_files(todo, self.shape.target)
        with ThreadPoolExecutor(max(1, min(self.threads, len(groups)))) as pool:  # pyarrow frees the GIL
            for rows, size in pool.map(lambda group: self._write_file(staged, unit, group), groups):
                self.out.rows_written += rows
                self.out.files.append(size)
                self.out.files_written += 1
        fsync_dir(staged)
        _swap_in(staged, target, note)
        rescue(staged, target, placed)  # the old unit, now here: what a user made in it while we built
        keep_attributes(staged, target)
        remove_tree(staged)
        note.unlink()
        self.out.units_written += 1
        self.out.files_kept += len(keep)
        self.out.files += [f.nbytes for f in keep]

    def _check_path(self, target: Path) -> None:
        """A unit replaces only a directory, reached through directories: never a user's file
        or symlink named like a partition (the swap would carry it off)."""
        for path in [target, *target.relative_to(self.layout.output).parents][:-1]:
            where = self.layout.output / path if path != target else target
            if os.path.lexists(where) and (where.is_symlink() or not where.is_dir()):
                raise PublishError(f"{where} is not a directory minibatch made; move it away")

    def _carry_over(self, target: Path, staged: Path, keep: set[str]) -> Placed:
        """Kept files, and what minibatch did not write, go into the new unit as they are
        (`place`). A directory goes file by file (an earlier layout's partitions: their files
        go after). Returns what was placed."""
        placed: Placed = {}
        for entry in os.scandir(target) if _real_dir(target) else []:
            if entry.is_dir(follow_symlinks=False):
                (staged / entry.name).mkdir()
                link_theirs(Path(entry.path), staged / entry.name, placed, mine=False)
            elif entry.name in keep or not ours(entry.name):
                place(entry.path, staged / entry.name, placed)
        return placed

    def _write_file(self, directory: Path, unit: str, group: list[Slice]) -> tuple[int, int]:
        """One file of a unit: its rows and bytes (run in threads: it touches no shared state)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tokens = [piece.token for piece in group]
        path = directory / f"file-{_digest(unit, *tokens)[:24]}.parquet"
        drop = set(self.shape.partition_by)
        writer = None
        pending: list[pa.Table] = []
        written = 0
        rows = 0
        with open(path, "wb") as handle:
            for piece in group:
                groups = list(range(piece.first, piece.first + piece.count))
                table = pq.ParquetFile(piece.path).read_row_groups(groups)
                table = table.drop_columns([c for c in table.column_names if c in drop])
                # parts an older release wrote may differ in nullability: the file's is nullable
                table = nullable(table).replace_schema_metadata({SOURCES_KEY: json.dumps(tokens).encode()})
                writer = writer or pq.ParquetWriter(handle, table.schema)
                pending.append(table)
                rows += table.num_rows
                if rows >= self.shape.row_group_rows:  # full row groups out; the rest waits
                    merged = pa.concat_tables(pending)
                    whole = rows - rows % self.shape.row_group_rows
                    writer.write_table(merged.slice(0, whole), row_group_size=self.shape.row_group_rows)
                    pending, rows = [merged.slice(whole)], rows - whole
                written += table.num_rows
            assert writer is not None
            if rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=self.shape.row_group_rows)
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
            return written, handle.tell()

    def _remove_unit(self, unit: str) -> None:
        """A unit holding only minibatch's files goes in one rename (then out of sight)."""
        target = self.layout.output / unit
        if not unit or not _real_dir(target):
            return
        gone = fresh_dir(self.layout.staging / f"gone-{_digest(unit)}")
        gone.rmdir()  # the unit is renamed here
        note = note_unit(gone, unit, target)
        os.rename(target, gone)
        if not _real_dir(gone):  # a user's symlink or file put in its place meanwhile: back, unfollowed
            if not os.path.lexists(target):
                os.rename(gone, target)
            note.unlink()
            raise PublishError(f"{target} is not a directory minibatch made; move it away")
        rescue(gone, target)  # made since it was found to hold only minibatch's files
        remove_tree(gone)
        note.unlink()
        for parent in list(target.parents)[: len(self.shape.partition_by) - 1]:
            try:
                parent.rmdir()
            except OSError:
                break
        fsync_dir(target.parent if target.parent.exists() else self.layout.output)


def _real_dir(path: Path) -> bool:
    """A directory, not a symlink to one."""
    return os.path.lexists(path) and stat.S_ISDIR(os.lstat(path).st_mode)


def _refuse(staged: Path, note: Path, where: Path) -> NoReturn:
    remove_tree(staged)
    note.unlink()
    raise PublishError(f"{where} is not a directory minibatch made; move it away")


def _swap_in(staged: Path, target: Path, note: Path) -> None:
    """`exchange`, then what it swapped out must be a real directory: a symlink or file the
    user put in the unit's place meanwhile goes back there, never followed, and the run fails."""
    exchange(staged, target)
    if os.path.lexists(staged) and not _real_dir(staged):
        exchange(staged, target)
        _refuse(staged, note, target)


def exchange(staged: Path, target: Path) -> None:
    """Put the directory `staged` at `target` in one step; the old `target`, if any, ends up
    at `staged`. Both are made durable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(staged, target)
    elif _renameat2 is None or _renameat2(-100, bytes(staged), -100, bytes(target), RENAME_EXCHANGE):
        code = ctypes.get_errno() if _renameat2 else errno.ENOSYS
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
        # A file system without the exchange (some network ones): two renames; a crash
        # between leaves the unit missing until the next run rebuilds it from the parts.
        aside = staged.with_name(staged.name + ".old")
        os.rename(target, aside)
        os.rename(staged, target)
        os.rename(aside, staged)
    fsync_dir(target.parent)


def _compressed(group: Any) -> int:
    return sum(group.column(i).total_compressed_size for i in range(group.num_columns))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
