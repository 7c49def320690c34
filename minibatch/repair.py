"""Disaster recovery: `minibatch backup` copies the manifest consistently while runs go on;
`minibatch repair` is the way back from a manifest that cannot be read.

The outputs are the source of truth for finished work: every part names its chunk and job
definition in its footer, and a run adopts the parts it finds for the chunks it plans (after
checking each footer). So a damaged manifest is set aside, never deleted, and a new one is
started; the next run of each job adopts its outputs and computes only what is missing. What
only the manifest knew is lost: run history, attempts, dead letters (those chunks are tried
again) and the daemon's last fire times.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minibatch.config import Config
from minibatch.lock import ID_NAME, former_ids, job_lock, state_id, write_once
from minibatch.manifest import Manifest, ManifestBusy, ManifestError, manifest_path

IDENTITY_TABLE = "state_identity"  # in a backup: the ids of the state_dir it was taken from, current first
TABLES = ("runs", "chunks", "attempts", "bad_files", "job_state", "reduce_state", "schedule_state")


@dataclass(frozen=True)
class Repair:
    path: Path
    broken: Path | None  # where the damaged file went; None: nothing needed repair
    reason: str


def repair(config: Config) -> Repair:
    """Set a damaged manifest aside and start a new one, while no job of this config runs."""
    path = manifest_path(config.engine.state_dir)
    with _all_job_locks(config):
        problem = _problem(path)
        if problem is None:
            reason = "it does not exist" if not path.exists() else "it reads without error"
            return Repair(path, None, reason)
        broken = _set_aside(path, "broken")
        with Manifest(path).connect():  # the new, empty manifest (read-write: made with its tables)
            pass
        return Repair(path, broken, problem)


def restore(config: Config, copy: Path) -> Path:
    """Put a backup in place of the manifest, while no job of this config runs; the manifest
    it replaces (and its write-ahead log, which belongs to it) is set aside, not deleted."""
    path = manifest_path(config.engine.state_dir)
    staged = path.with_name(f".{path.name}.restoring")
    with _all_job_locks(config):
        if not copy.is_file():
            raise ManifestError(f"{copy} is not a manifest backup: no such file")
        # Checked as a copy: opening the backup itself would add this release's tables to it.
        wal = staged.with_name(staged.name + ".wal")
        shutil.copyfile(copy, staged)
        try:
            if (problem := _not_a_manifest(staged) or _problem(staged)) is not None:
                raise ManifestError(f"{copy} is not a manifest backup: {problem}")
            identities = _identities(staged)
            Manifest(staged).named("unverify_parts")  # outputs may hold what runs after the backup wrote
            if wal.exists():  # not checkpointed (a full disk?): the mark is not in the file
                raise ManifestError(f"{copy} not restored: its copy could not be written whole; try again")
        except BaseException:
            for leftover in (staged, wal):
                leftover.unlink(missing_ok=True)
            raise
        aside = _set_aside(path, "replaced") if path.exists() else path
        os.replace(staged, path)
        if identities:  # the outputs' owner files name the backed-up state_dir by them (owner.py);
            state = config.engine.state_dir  # those it claimed since with its own id stay its own
            had = [i for i in [*identities, state_id(state), *former_ids(state)] if i != identities[0]]
            write_once(state / ID_NAME, "\n".join([identities[0], *dict.fromkeys(had)]), replace=True)
        return aside


def _identities(path: Path) -> list[str]:
    """The minibatch-ids of the state_dir a backup was taken from, current first (none: an
    older release's backup; one: a release that kept only the current id)."""
    import duckdb

    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as con:
        try:
            rows = con.execute(f"SELECT * FROM {IDENTITY_TABLE}").fetchall()
        except duckdb.CatalogException:
            return []
    return [str(row[0]) for row in sorted(rows, key=lambda row: row[1] if len(row) > 1 else 0)]


def _not_a_manifest(path: Path) -> str | None:
    """Why the file is not a minibatch manifest of any release: not a DuckDB database (DuckDB
    would open a Parquet file, say, as an empty database in memory), or without its tables."""
    import duckdb

    with path.open("rb") as handle:
        if handle.read(12)[8:] != b"DUCK":
            return "not a DuckDB database file"
    try:
        with contextlib.closing(duckdb.connect(str(path), read_only=True)) as con:
            tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    except duckdb.Error as exc:
        return str(exc).strip().splitlines()[0]
    missing = sorted({"runs", "chunks", "job_state"} - tables)
    return f"a DuckDB database without minibatch's tables ({', '.join(missing)})" if missing else None


def _set_aside(path: Path, why: str) -> Path:
    """Rename the manifest (and its write-ahead log) out of the way; returns the new name."""
    stamp = f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}"
    names = (path.with_name(stamp + (f"-{n}" if n else "")) for n in itertools.count())
    aside = next(name for name in names if not name.exists())  # two restores in one second: two names
    path.rename(aside)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        wal.rename(aside.with_name(aside.name + ".wal"))
    return aside


def _problem(path: Path) -> str | None:
    """Why the manifest cannot be used, reading every table through (None: it can be)."""
    import duckdb

    if not path.exists():
        return None
    try:
        with Manifest(path, deadline=5.0).connect() as con:
            for table in TABLES:
                con.execute(f"SELECT * FROM {table}").fetchall()
    except ManifestBusy:  # held open by another process: not damage (cli says so, exit 3)
        raise
    except (ManifestError, duckdb.Error) as exc:  # a damaged catalog may say "no such table"
        return str(exc)
    return None


@contextlib.contextmanager
def _all_job_locks(config: Config) -> Iterator[None]:
    """Every job's lock, and every lock a run has made: a run of a parameter set holds its
    checkpoint's (`daily[date=2026-01-02]`), a backfill its own, a run its worker slots."""
    state_dir = config.engine.state_dir
    made = {path.name.removesuffix(".lock") for path in (state_dir / "locks").glob("*.lock")}
    with contextlib.ExitStack() as stack:
        for name in sorted(set(config.jobs) | made, key=lambda n: (".worker-" in n, n)):  # runs first: named
            stack.enter_context(job_lock(state_dir, name))
        yield


def backup(config: Config, dest: Path | str) -> Path:
    """A consistent copy of the manifest, taken while the daemon runs: DuckDB copies every table
    in one transaction while this process holds the file (a run's next commit waits for it).
    Written beside `dest` and renamed into place; never over an existing file. `dest` ending in
    a slash names a directory, which must be there (not made: a backup disk not mounted)."""
    import duckdb

    if str(dest).endswith("/") and not Path(dest).is_dir():
        raise FileNotFoundError(2, "no such directory", str(dest))
    if "?" in str(Path(dest).resolve()):  # DuckDB takes what follows for options: the copy went elsewhere
        raise OSError(errno.EINVAL, "DuckDB cannot write a database on a path with '?'", str(dest))
    dest = Path(dest)
    source = manifest_path(config.engine.state_dir)
    target = dest / f"manifest-{time.strftime('%Y%m%dT%H%M%S')}.duckdb" if dest.is_dir() else dest
    if target.exists():
        raise FileExistsError(17, "will not overwrite an existing file", str(target))
    temp = target.with_name(f".{target.name}.partial")
    temp.unlink(missing_ok=True)
    try:
        with Manifest(source).connect(read_only=True) as con:
            (name,) = con.execute("SELECT current_database()").fetchone() or ("manifest",)
            try:  # the destination's fault, not the manifest's (which the connection would blame)
                con.execute("ATTACH ? AS minibatch_backup (READ_WRITE)", [str(temp)])
            except duckdb.Error as exc:
                raise ManifestError(f"cannot write the backup {target}: {str(exc).splitlines()[0]}") from None
            try:
                con.execute(f'COPY FROM DATABASE "{name}" TO minibatch_backup')
                state = config.engine.state_dir  # for a restore into a state_dir made anew
                ids = [state_id(state), *former_ids(state)]  # a former id may name an output too
                con.execute(
                    f"CREATE OR REPLACE TABLE minibatch_backup.{IDENTITY_TABLE} (id VARCHAR, n INTEGER)"
                )
                con.executemany(
                    f"INSERT INTO minibatch_backup.{IDENTITY_TABLE} VALUES (?, ?)",
                    [(i, n) for n, i in enumerate(ids)],
                )
            finally:  # this process's DuckDB outlives the backup: let go of the copy either way
                con.execute("DETACH DATABASE IF EXISTS minibatch_backup")
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except (duckdb.Error, OSError):
        temp.unlink(missing_ok=True)
        raise
    return target
