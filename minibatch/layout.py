"""A job's output directory on disk: where parts, staged files and the reduced file live,
what is minibatch's (and so may be deleted), and atomic, durable file writes.

Files being written live in a sibling staging directory (same filesystem, so the final
rename is atomic; outside the output so neither pyarrow's nor DuckDB's globs see them).
Reduce jobs keep their chunk results in a sibling parts directory and publish one file.
minibatch deletes only files it wrote: parts named after chunk ids, its reduced file, its
staging directory. The staging directory is also its claim on the output.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.hive import FILE_RE, Shape, write_units
from minibatch.mounts import other_mount
from minibatch.owner import OWNER_NAME, OutputNotOwned, check, read_owner, take
from minibatch.userfiles import (
    NOTE_SUFFIX,
    PART_RE,
    REDUCED_NAME,
    WHOLE_PREFIX,
    fsync_dir,
    keep_attributes,
    ours,
    remove_tree,
    rescue,
)

if TYPE_CHECKING:
    import pyarrow as pa

HELD_MARK = ".minibatch-held"  # in a quarantine or malformed directory minibatch made
QUARANTINE_PREFIX = "quarantine-"  # a staged file of quarantined rows: never salvaged
MALFORMED_PREFIX = "malformed-"  # a staged file of text records that did not parse
STAGED_RE = re.compile(r"^part-(?P<chunk>[0-9a-f]{24})\.parquet\.[\w-]+\.\d+\.tmp$")
CHUNK_KEY = b"minibatch.chunk"  # Parquet key-value metadata of every part
DEFINITION_KEY = b"minibatch.definition"
INPUT_KEY = b"minibatch.input_schema"


@dataclass(frozen=True)
class OutputLayout:
    output: Path
    reduce: bool
    shape: Shape = Shape()
    quarantine: Path | None = None  # where rows that failed a check go, a part per chunk
    malformed: Path | None = None  # where text records that did not parse go, a part per chunk

    @classmethod
    def of(cls, job: Any) -> OutputLayout:
        """A job's (a JobConfig: not imported, config.py imports this module)."""
        malformed = job.output.with_name(job.output.name + ".malformed") if job.text else None
        return cls(job.output, job.reduce_sql is not None, job.shape, job.checks.quarantine, malformed)

    @property
    def held(self) -> list[Path]:
        """The directories of rows this job keeps out of its output (each a part per chunk)."""
        return [d for d in (self.quarantine, self.malformed) if d is not None]

    @property
    def held_dirs(self) -> list[Path]:
        """Those, and the default ones of a job that no longer quarantines, if minibatch made
        them: their parts go (stale rows there would be in two places once recomputed)."""
        made = [d for d in default_held(self.output) if (d / HELD_MARK).is_file()]
        return list(dict.fromkeys([*self.held, *made]))

    @property
    def hidden(self) -> bool:
        """Chunk results live beside the output, which holds what is published from them."""
        return self.reduce or self.shape.published

    @property
    def staging(self) -> Path:
        return self.output.parent / f".{self.output.name}.minibatch-staging"

    @property
    def reduced(self) -> Path:
        return self.output / REDUCED_NAME

    @property
    def parts(self) -> Path:
        """Where chunk results go: the output itself for map jobs."""
        return self.output.parent / f".{self.output.name}.minibatch-parts" if self.hidden else self.output

    def prepare(self) -> int:
        """Create the directories; remove what a killed run left in staging, except staged
        results, which the run may salvage (`staged_results`). Returns how many it removed."""
        for directory in (self.output, self.staging, self.parts):
            directory.mkdir(parents=True, exist_ok=True)
        self._rescue_leftovers()
        leftovers = [
            p for p in self.staging.iterdir() if not STAGED_RE.match(p.name) and p.name != OWNER_NAME
        ]
        for path in leftovers:
            _remove(path)
        return len(leftovers)

    def _rescue_leftovers(self) -> None:
        """A unit a dead publication swapped out: a user's files in it go back, beside (not over)
        what is there now, which the user may have changed since."""
        for path in self.staging.iterdir() if self.staging.is_dir() else []:
            note = self.staging / f"{path.name.removesuffix('.old')}{NOTE_SUFFIX}"
            if not (path.is_dir() and not path.is_symlink() and note.is_file()):
                continue
            unit, _, inode = note.read_text().partition("\n")
            swapped = inode.isdigit() and path.stat().st_ino == int(inode)  # else: the new one, unused
            if swapped and ".." not in Path(unit).parts and not Path(unit).is_absolute():
                whole = path.name.startswith(WHOLE_PREFIX)
                rescue(path, self.output / unit, anywhere=whole)
                keep_attributes(path, self.output / unit)  # the run died before it could

    def staged_results(self) -> dict[str, list[Path]]:
        """Results a worker wrote and fsynced that no coordinator published: chunk id -> files."""
        found: dict[str, list[Path]] = {}
        for path in sorted(self.staging.iterdir()) if self.staging.is_dir() else []:
            if match := STAGED_RE.match(path.name):
                found.setdefault(match["chunk"], []).append(path)
        return found

    def vacant(self) -> bool:
        """No directory of chunk results, or an empty one: what an unmounted share looks like."""
        return vacant(self.parts)

    def part_files(self) -> set[str]:
        """The parts minibatch wrote (by name); anything else in the directory is not ours."""
        return set(self.part_sizes())

    def part_sizes(self) -> dict[str, int]:
        """The parts minibatch wrote, by name, and their sizes."""
        with os.scandir(self.parts) as entries:
            return {e.name: e.stat().st_size for e in entries if PART_RE.match(e.name) and e.is_file()}

    def foreign_files(self) -> list[str]:
        """What in the output minibatch did not write, as paths in it (in partitions too): never
        deleted; reported, and a first claim's reason to refuse the output."""
        found: list[str] = []
        for directory, subdirs, files in os.walk(self.output):  # nothing when it is no directory
            here = Path(directory).relative_to(self.output)
            units = [d for d in subdirs if self.shape.partition_by and "=" in d and not d.startswith(".")]
            found += [str(here / name) for name in files if not ours(name)]
            found += [str(here / name) for name in subdirs if name not in units]
            subdirs[:] = units
        return sorted(found)

    def remove_other_shape(self) -> None:
        """What an earlier definition of the other kind left: a map job removes the reduced file
        and the parts directory of when it had `reduce_sql` (a reduce job replaces them)."""
        if self.hidden:
            return
        if os.path.lexists(self.reduced):  # (not unlink(missing_ok): EROFS on a read-only output)
            self.reduced.unlink()  # (published files go when the run succeeds: runner)
        old_parts = OutputLayout(self.output, reduce=True).parts
        if old_parts.is_dir() and not old_parts.is_symlink():
            for path in old_parts.iterdir():
                if PART_RE.match(path.name):
                    path.unlink(missing_ok=True)
            _rmdir_if_empty(old_parts)

    def remove_parts(self, names: Iterable[str]) -> None:
        names = [name for name in names if PART_RE.match(name)]
        for name in names:
            (self.parts / name).unlink(missing_ok=True)
        if names:
            fsync_dir(self.parts)

    def remove_held(self, keep: set[str]) -> set[str]:
        """Parts of quarantined or malformed rows, but those named in `keep`; what it removed."""
        removed = set()
        for held in self.held_dirs:
            for path in held.iterdir() if held.is_dir() else []:
                if PART_RE.match(path.name) and path.name not in keep:
                    path.unlink()
                    removed.add(path.name)
        return removed

    def visible_files(self) -> list[Path]:
        """The files readers of a published output see: its reduction, or its units' files."""
        return [self.reduced] if self.reduced.exists() else published_files(self.output)

    def remove_all(self, keep_claim: bool = False) -> None:
        """Remove what minibatch wrote for this job, and nothing else (`keep_claim`: the output
        stays minibatch's, for `--fresh`: the staging directory is emptied, not removed; so it
        does while files of the user's are left in it)."""
        self._rescue_leftovers()
        if self.parts.is_dir():
            self.remove_parts(self.part_files())
        self.reduced.unlink(missing_ok=True)
        remove_published(self.output)
        held_dirs = self.held_dirs
        self.remove_held(set())
        for held in held_dirs if not keep_claim else []:  # its mark is its claim (another config's)
            (held / HELD_MARK).unlink(missing_ok=True)
            _rmdir_if_empty(held)
        if self.hidden:
            _rmdir_if_empty(self.parts)
        if keep_claim or self.foreign_files():  # else the next run would find them not minibatch's
            for path in self.staging.iterdir() if self.staging.is_dir() else []:
                if path.name != OWNER_NAME:
                    _remove(path)
            return
        remove_tree(self.staging)
        _rmdir_if_empty(self.output)

    # -- ownership ----------------------------------------------------------------------------

    def claim(self, owner: str, state_dir: Path, known: Callable[[], bool] = lambda: True) -> None:
        """Make sure this output is `owner`'s to write (a job, or one parameter set of it, of the
        manifest in `state_dir`, which has run it: `known`). Its staging directory, which only
        minibatch creates, says it is minibatch's, and the owner file in it whose; otherwise the
        output must be absent, empty, or hold only what minibatch names its files. An output inside
        another claimed output is refused, and a staging, parts or default held-rows directory
        that is a symlink. Directories of held rows are claimed the same way, by their marks."""
        if problem := self.not_a_directory():
            raise OutputNotOwned(problem)
        for directory in (self.staging, self.parts, *default_held(self.output)):
            if directory.is_symlink():
                raise OutputNotOwned(f"{directory} is a symlink; minibatch keeps its own files there")
        for parent in self.output.parents:
            around = OutputLayout(parent, reduce=False)
            if around.staging.is_dir():
                holder = around.owner() or "an older run"
                raise OutputNotOwned(f"output {self.output} is inside the output {parent} of {holder}")
        if not self.staging.is_dir():
            self._check_foreign()
            try:
                self.staging.mkdir(parents=True)
            except FileExistsError:  # made just now by another claim, or a file
                if not self.staging.is_dir():
                    return  # not a directory: the run fails on it when it prepares
        take(self.staging / OWNER_NAME, self.output, owner, state_dir, known)
        for held in self.held:  # another config's quarantine there: each would delete the other's
            held.mkdir(parents=True, exist_ok=True)
            take(held / HELD_MARK, held, owner, state_dir, known, self._kind(held))
        self._one_filesystem()

    def _one_filesystem(self) -> None:  # results are renamed from staging: not onto a mounted volume
        if elsewhere := other_mount(self.staging, [self.output, self.parts, *self.held]):
            why = f"{elsewhere} is on another mount than {self.staging}, where results are staged"
            raise OutputNotOwned(f"{why} to be renamed into it: set output to a directory inside it")

    def not_a_directory(self) -> str | None:
        """Why the output cannot be a directory of parts (a file is in the way), or None."""
        if self.output.exists() and not self.output.is_dir():  # through a symlink, as writing goes
            return f"output {self.output} is a file, not a directory: move it or choose another output"
        return None

    def owner(self) -> str:
        """Whose output this is ("" when no run has said yet)."""
        return read_owner(self.staging / OWNER_NAME)[0]

    def check_owner(self, owner: str, state_dir: Path, known: Callable[[], bool] = lambda: True) -> None:
        """Refuse another job's output, and this job's of another state_dir (owner.py)."""
        if self.staging.is_symlink():  # `reset` would empty what it points to
            raise OutputNotOwned(f"{self.staging} is a symlink; minibatch keeps its own files there")
        check(self.staging / OWNER_NAME, self.output, owner, state_dir, known)
        for held in self.held_dirs:
            check(held / HELD_MARK, held, owner, state_dir, known, self._kind(held))

    def _kind(self, held: Path) -> str:
        return "quarantine" if held == self.quarantine else "malformed-rows directory"

    def _check_foreign(self) -> None:
        foreign = self.foreign_files()
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputNotOwned(
                f"output {self.output} exists, is not empty ({shown}) and was not created by "
                f"minibatch; empty it or choose another directory (to let minibatch write beside "
                f"these files, create the directory {self.staging})"
            )


def default_held(output: Path) -> list[Path]:
    """Where a job's quarantined and malformed rows go by default."""
    return [output.with_name(f"{output.name}.{kind}") for kind in ("quarantine", "malformed")]


def part_name(chunk_id: str) -> str:
    return f"part-{chunk_id}.parquet"


def staged_name(output_name: str, run_id: str, attempt: int) -> str:
    """A staged result's name: unique per run and attempt, so no two writers share one."""
    return f"{output_name}.{run_id}.{attempt}.tmp"


def write_atomically(table: pa.Table, target: Path, staging: Path) -> int:
    """Write `table` to `target` so readers see either nothing or the whole file; returns bytes.

    The file's data is fsynced before the rename; the directory entry is made durable by
    `fsync_dir(target.parent)`, which the caller owes before recording the file as done.
    """
    temp = staging / f"{target.name}.{os.getpid()}.tmp"
    size = write_durably(table, temp)
    publish(temp, target)
    return size


def write_durably(table: pa.Table, path: Path, shape: Shape | None = None, **options: Any) -> int:
    """Write and fsync a Parquet file (removed again if writing fails); returns its size. With
    a `shape` that publishes, its row groups are grouped by unit (hive.write_units). `options`:
    the Parquet writer's."""
    import pyarrow.parquet as pq

    try:
        with open(path, "wb") as handle:
            if shape is not None and shape.published:
                write_units(table, shape, handle, **options)
            else:
                pq.write_table(table, handle, **options)
            handle.flush()
            os.fsync(handle.fileno())
            return handle.tell()
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def with_provenance(
    table: pa.Table, chunk_id: str, definition: str | None, input_schema: str | None = None
) -> pa.Table:
    """The chunk id, job definition and input schema in the part's footer: what adoption
    checks and what `repair` restores the job's input schema from."""
    metadata = dict(table.schema.metadata or {})
    metadata[CHUNK_KEY] = chunk_id.encode()
    metadata[DEFINITION_KEY] = (definition or "").encode()
    if input_schema:
        metadata[INPUT_KEY] = input_schema.encode()
    return table.replace_schema_metadata(metadata)


def publish(staged: Path, target: Path) -> None:
    """Rename a durable staged file into place (atomic: same filesystem)."""
    try:
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)


def published_files(output: Path) -> list[Path]:
    """The published files (compact.py) readers see: at the root and in `k=v` directories."""
    found = []
    for directory, subdirs, files in os.walk(output) if output.is_dir() else []:
        subdirs[:] = sorted(d for d in subdirs if "=" in d)
        found += [Path(directory) / name for name in sorted(files) if FILE_RE.match(name)]
    return found


def vacant(directory: Path) -> bool:
    """No such directory, or an empty one (a file in the way is not: the claim says so)."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return False


def remove_published(output: Path, columns: tuple[str, ...] | None = None) -> int:
    """Published files (see compact.py) not where `columns` puts them (all, without columns):
    at the output's root and in its `k=v` directories, never elsewhere. `k=v` directories
    left empty go too. Returns how many files it removed."""
    removed = 0
    for directory, subdirs, files in os.walk(output) if output.is_dir() else []:
        subdirs[:] = [d for d in subdirs if "=" in d]  # partition directories only
        parts = Path(directory).relative_to(output).parts
        placed = columns is not None and len(parts) == len(columns)
        placed = placed and all(p.startswith(f"{c}=") for p, c in zip(parts, columns or (), strict=False))
        for name in files:
            if FILE_RE.match(name) and not placed:
                os.unlink(os.path.join(directory, name))
                removed += 1
    for directory, _, _ in os.walk(output, topdown=False) if output.is_dir() else []:
        parts = Path(directory).relative_to(output).parts
        if parts and all("=" in p for p in parts):
            _rmdir_if_empty(Path(directory))
    return removed


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (files that are not ours stay) or gone
        path.rmdir()
