"""The DuckDB manifest: the only module that talks to DuckDB's file.

Its schema is `schema.sql`; every query it runs is a named query in `queries.sql`, with
parameters only. DuckDB lets one process hold the file for writing and no other process open
it meanwhile, so every user (a run's coordinator, `status`, another job's run) opens it
briefly and retries while someone else has it. Runs buffer records and commit them in batches
(see ledger.py).
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minibatch.log import get_logger
from minibatch.records import AttemptRecord, ChunkRecord, RunRecord
from minibatch.states import ChunkStatus, RunStatus

if TYPE_CHECKING:
    import duckdb

SCHEMA = (Path(__file__).with_name("schema.sql")).read_text()
BUSY_SAYS = 2.0  # seconds of waiting for the manifest before saying who holds it (a `duckdb` shell?)


def _named_queries(text: str) -> dict[str, str]:
    """`-- name: x` starts query x; it runs to the next name."""
    parts = re.split(r"^-- name: (\w+)\n", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


Q = _named_queries((Path(__file__).with_name("queries.sql")).read_text())
# One thread: each connection is short-lived, and DuckDB starts (and joins) a thread per core otherwise.
CONNECT_CONFIG: dict[str, str | bool | int | float | list[str]] = {"threads": 1}


def manifest_path(state_dir: Path) -> Path:
    return state_dir / "manifest.duckdb"


class ManifestError(Exception):
    """The manifest cannot be used (unreadable, corrupt, not a DuckDB file)."""


class ManifestBusy(ManifestError):
    """The manifest stayed locked by another process for longer than the deadline."""


CHUNK_COLUMNS = [f.name for f in fields(ChunkRecord)]
RUN_COLUMNS = [f.name for f in fields(RunRecord)]
ATTEMPT_COLUMNS = [f.name for f in fields(AttemptRecord)]
TIMESTAMPS = {"started_at", "ended_at", "finished_at", "admitted_at"}  # unix time in Python
_IN_PROCESS = threading.RLock()
MIGRATE_DEADLINE = 2.0  # seconds a reader waits to add new columns to an older manifest
ALIAS = "manifest"  # the attached file's name in the shared DuckDB
_instance: Any = None  # a DuckDBPyConnection
_attached: list[tuple[str, str]] = []  # (path, alias) of the files attached now, innermost last


def _shared(duckdb: Any) -> Any:  # a DuckDBPyConnection
    """This process's one in-memory DuckDB: starting one costs ~35 ms of CPU, attaching a file
    to it ~2 ms, and detaching lets go of the file as closing would. (Not fork-safe: workers
    come from a forkserver that never opens the manifest.)"""
    global _instance
    if _instance is None:
        _instance = duckdb.connect(":memory:", config=CONNECT_CONFIG)
    return _instance


def _detach(duckdb: Any, con: Any, alias: str = ALIAS, back_to: str = "memory") -> None:
    """Roll back what an error left open (outermost only: a transaction is the connection's) and
    detach, which checkpoints. Should that fail (damage, a full disk), the WAL keeps the commits:
    close the whole DuckDB, which always lets go of the file, as closing a connection did."""
    global _instance
    try:
        if back_to == "memory":
            with contextlib.suppress(duckdb.TransactionException):  # "no transaction is active"
                con.execute("ROLLBACK")
        con.execute(f"USE {back_to}; DETACH DATABASE IF EXISTS {alias}")
    except duckdb.Error:  # a closed or invalidated DuckDB fails the ROLLBACK too
        _instance = None
        _attached.clear()
        with contextlib.suppress(duckdb.Error):
            con.close()


def _current(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the file has this release's schema."""
    return bool(con.execute(Q["is_current"]).fetchall())


class Manifest:
    def __init__(self, path: Path, *, deadline: float = 60.0) -> None:
        self.path = path
        self.deadline = deadline
        self._initialised = False
        self._schema_checked = False  # a reader checks once, and adds new columns to an older file
        self._held: tuple[int, Any] | None = None  # (thread, connection) of an open session

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Several operations of this thread on one connection (an attach and a checkpoint each
        otherwise). Other processes wait meanwhile: keep sessions short."""
        if self._held is not None:
            yield
            return
        with self.connect() as con:
            self._held = (threading.get_ident(), con)
            try:
                yield
            finally:
                self._held = None

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection, one at a time per process (see `_shared`); waits, with
        jittered backoff, while another process holds the file."""
        import duckdb

        if self._held is not None and self._held[0] == threading.get_ident():
            yield self._held[1]  # inside this thread's session
            return
        with _IN_PROCESS:  # reentrant: this thread may connect again inside (another Manifest)
            con = _shared(duckdb)
            key = str(self.path.absolute())
            if _attached and _attached[-1][0] == key:  # this thread has the file already: share it
                yield con
                return
            back_to = _attached[-1][1] if _attached else "memory"
            alias = f"{ALIAS}_{len(_attached)}" if _attached else ALIAS
            try:
                self._attach(duckdb, con, read_only, alias, back_to)
                _attached.append((key, alias))
                yield con
            except (duckdb.ProgrammingError, duckdb.IntegrityError, duckdb.DataError):
                raise  # our own SQL's errors are bugs, not a damaged file
            except duckdb.Error as exc:
                raise _unusable(self.path, exc) from exc
            finally:
                if _attached and _attached[-1][1] == alias:
                    _attached.pop()
                _detach(duckdb, con, alias, back_to)

    def _attach(self, duckdb: Any, con: Any, read_only: bool, alias: str, back_to: str) -> None:
        if read_only and not self.path.exists():  # empty answers, and no file created
            con.execute(f"ATTACH ':memory:' AS {alias}; USE {alias}")
            con.execute(SCHEMA)
            return
        self._open(duckdb, con, read_only, alias)
        if not read_only or self._schema_checked:
            return
        self._schema_checked = True
        if _current(con):
            return
        _detach(duckdb, con, alias, back_to)  # a manifest from an older release: add the new columns
        deadline, self.deadline = self.deadline, min(self.deadline, MIGRATE_DEADLINE)
        try:  # briefly: a reader must not wait long for a writer (a `duckdb -readonly` shell)
            self._open(duckdb, con, False, alias)
        except (duckdb.Error, ManifestError, OSError):
            pass  # then history and report see what an older manifest has
        finally:
            self.deadline = deadline
            _detach(duckdb, con, alias, back_to)
        self._open(duckdb, con, read_only, alias)

    def _open(self, duckdb: Any, con: Any, read_only: bool, alias: str) -> None:
        """Attach the file to `con` as its default database, waiting while another process has it."""
        if self._initialised and not self.path.exists():  # not a new, empty one taken for the record
            raise ManifestError(f"manifest {self.path} is gone (its state_dir removed while minibatch ran?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start, said, delay = time.monotonic(), False, 0.005
        mode = "READ_ONLY" if read_only else "READ_WRITE"
        while True:
            try:
                con.execute(f"ATTACH ? AS {alias} ({mode})", [str(self.path)])
                break
            except duckdb.Error as exc:
                if not _locked(exc):  # "Corrupt database file", not a DuckDB file, ...
                    raise _unusable(self.path, exc) from exc
                waited = time.monotonic() - start
                if waited > self.deadline:
                    raise ManifestBusy(f"manifest {self.path} is busy: {exc}") from exc
                if waited > BUSY_SAYS and not said:
                    said = True
                    get_logger().warning("manifest_busy", manifest=str(self.path), holder=str(exc))
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.2)
        con.execute(f"USE {alias}")
        if not read_only and not self._initialised:
            con.execute(SCHEMA)
            self._initialised = True

    def start_run(self, run: RunRecord) -> None:
        with self.connect() as con:
            params = {"job": run.job, "crashed": RunStatus.CRASHED, "running": RunStatus.RUNNING}
            con.execute("BEGIN")
            con.execute(Q["mark_crashed"], params)
            _insert(con, "runs", RUN_COLUMNS, [run])
            con.execute(Q["sequence_run"], {"run_id": run.run_id})
            con.execute("COMMIT")

    def commit(
        self, run: RunRecord, chunks: Sequence[ChunkRecord], attempts: Sequence[AttemptRecord] = ()
    ) -> None:
        """Record finished chunks, their attempts and the run's counters in one transaction."""
        with self.connect() as con:
            con.execute("BEGIN")
            _insert(con, "chunks", CHUNK_COLUMNS, chunks)
            _insert(con, "attempts", ATTEMPT_COLUMNS, attempts)
            _save_run(con, run)
            con.execute("COMMIT")

    def chunk_states(self, job: str) -> dict[str, tuple[str, str | None]]:
        """chunk_id -> (status, output_file) for every chunk the manifest holds for a job."""
        with self.connect() as con:
            rows = con.execute(Q["chunk_states"], {"job": job}).fetchall()
        return {chunk_id: (status, output) for chunk_id, status, output in rows}

    def forget_chunks(self, job: str, chunk_ids: Sequence[str]) -> None:
        if chunk_ids:
            with self.connect() as con:
                con.execute(Q["forget_chunks"], {"job": job, "ids": list(chunk_ids)})

    def revive_dead(self, job: str) -> int:
        """Forget a job's dead letters and bad files so the next run tries them again."""
        with self.connect() as con:
            row = con.execute(Q["count_dead"], {"job": job, "dead": ChunkStatus.DEAD}).fetchone()
            con.execute(Q["forget_dead"], {"job": job, "dead": ChunkStatus.DEAD})
            con.execute(Q["forget_bad_files"], {"job": job})
        return int(row[0]) if row else 0

    def known_bad_files(self, job: str) -> set[tuple[str, str]]:
        with self.connect() as con:
            rows = con.execute(Q["known_bad_files"], {"job": job}).fetchall()
        return {(file, fingerprint) for file, fingerprint in rows}

    def record_bad_files(self, job: str, run_id: str, bad: Sequence[Any]) -> None:
        with self.connect() as con:
            for b in bad:
                params = {"file": b.path, "fingerprint": b.fingerprint, "size": b.size, "error": b.error}
                con.execute(Q["record_bad_file"], {"job": job, "run_id": run_id, **params})

    def reset(self, job: str) -> None:
        with self.connect() as con:
            for query in ("reset_chunks", "forget_bad_files", "reset_reduce", "reset_job_state"):
                con.execute(Q[query], {"job": job})

    def job_state(self, job: str) -> dict[str, Any] | None:
        with self.connect() as con:
            rows = _dicts(con.execute(Q["job_state"], {"job": job}))
        return rows[0] if rows else None

    def set_definition(self, job: str, definition: str, facts: str, forget: bool) -> None:
        """Record the job's current definition; with `forget`, drop every chunk record and the
        output schema of the old one in the same transaction (its results are no longer
        current). The input schema stays: the inputs did not change."""
        with self.connect() as con:
            con.execute("BEGIN")
            if forget:
                con.execute(Q["reset_chunks"], {"job": job})
                con.execute(Q["clear_output_schema"], {"job": job})
            con.execute(Q["set_definition"], {"job": job, "definition": definition, "facts": facts})
            con.execute("COMMIT")

    def set_schemas(self, job: str, input_schema: str | None, output_schema: bytes | None) -> None:
        """Store the schemas decided for the job (None leaves a stored one as it is)."""
        with self.connect() as con:
            params = {"job": job, "input_schema": input_schema, "output_schema": output_schema}
            con.execute(Q["set_schemas"], params)

    def reduce_key(self, job: str) -> str | None:
        with self.connect() as con:
            row = con.execute(Q["reduce_key"], {"job": job}).fetchone()
        return str(row[0]) if row else None

    def learned_memory(self, job: str, min_bytes: int) -> tuple[float | None, int | None]:
        with self.connect() as con:
            row = con.execute(Q["learned_memory"], {"job": job, "min_bytes": min_bytes}).fetchone()
        factor, startup = row or (None, None)  # (always a row: aggregates)
        return (None if factor is None else float(factor)), (None if startup is None else int(startup))

    def record_reduce(self, job: str, key: str) -> None:
        self.named("record_reduce", job=job, key=key)

    def last_fires(self) -> dict[str, datetime]:
        with self.connect() as con:
            rows = con.execute(Q["last_fires"]).fetchall()
        return {job: at for job, at in rows}

    def record_fire(self, job: str, at: datetime) -> None:
        self.named("record_fire", job=job, at=at)

    def status(self, job: str | None = None) -> list[dict[str, Any]]:
        """The latest run of each job (or of one), with its manifest-wide chunk counts."""
        params = {"job": job, "done": ChunkStatus.DONE, "dead": ChunkStatus.DEAD}
        params["succeeded"] = RunStatus.SUCCEEDED
        with self.connect(read_only=True) as con:
            return _dicts(con.execute(Q["status"], params))

    def runs(self, job: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Past runs, newest first."""
        return self.named("runs", read_only=True, job=job, limit=limit)

    def run(self, job: str, run_id: str | None = None) -> dict[str, Any] | None:
        """One run of `job`: `run_id`, or the latest."""
        rows = self.named("run", read_only=True, job=job, run_id=run_id)
        return rows[0] if rows else None

    def run_with_work(self, job: str) -> dict[str, Any] | None:
        """The latest run of `job` that computed, dead-lettered or failed something."""
        with self.connect(read_only=True) as con:
            rows = _dicts(con.execute(Q["run_with_work"], {"job": job, "succeeded": RunStatus.SUCCEEDED}))
        return rows[0] if rows else None

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        """A run's chunk attempts in the order they were admitted."""
        return self.named("attempts", read_only=True, run_id=run_id)

    def dead_letters(self, job: str) -> list[dict[str, Any]]:
        return self.named("dead_letters", read_only=True, job=job, dead=ChunkStatus.DEAD)

    def named(self, query: str, read_only: bool = False, **params: Any) -> list[dict[str, Any]]:
        """One named query of queries.sql (the control plane's: backfills, pauses); its rows."""
        with self.connect(read_only=read_only) as con:
            cursor = con.execute(Q[query], params)
            return _dicts(cursor) if cursor.description else []


def _locked(exc: Exception) -> bool:
    """DuckDB's "Could not set lock on file ...: Conflicting lock is held" (and not, say, a
    corrupt "block at location")."""
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text


def _unusable(path: Path, exc: Exception) -> ManifestError:
    """A damaged, unreadable or full manifest, as one readable line that says what to do."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "no space left" in detail.lower():
        hint = "the disk is full: free space and run again (what was recorded is kept)"
    else:
        hint = "if it is damaged, `minibatch repair` sets it aside and rebuilds it from the outputs"
    return ManifestError(f"cannot use the manifest {path}: {detail}; {hint}")


def _insert(con: duckdb.DuckDBPyConnection, table: str, columns: list[str], records: Sequence[Any]) -> None:
    """One INSERT that unnests a list per column. Parameters only, and no Arrow object handed
    to DuckDB (whose first use of one imports pandas when installed: ~0.2 s per process).
    A list per column binds ~10x faster than a VALUES row of parameters per record."""
    if not records:
        return
    kind = _SQL_TYPES[type(records[0])]
    select = ", ".join(
        "to_timestamp(unnest(?::DOUBLE[]))" if c in TIMESTAMPS else f"unnest(?::{kind[c]}[])" for c in columns
    )
    values = [[getattr(record, column) for record in records] for column in columns]
    con.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) SELECT {select}", values)


def _save_run(con: duckdb.DuckDBPyConnection, run: RunRecord) -> None:
    """An UPDATE of the run's row, which start_run inserted: DuckDB's INSERT OR REPLACE costs
    several times as much, and every commit of a run saves its counters."""
    values = [getattr(run, column) for column in _RUN_UPDATE_COLUMNS]
    row = con.execute(_RUN_UPDATE, [*values, run.run_id]).fetchone()
    if not row or not row[0]:  # a run that broke before it was recorded
        _insert(con, "runs", RUN_COLUMNS, [run])


def _sql_types(record_type: type) -> dict[str, str]:
    """A dataclass's fields as DuckDB types, from their annotations ("int | None" -> BIGINT)."""
    names = {"int": "BIGINT", "float": "DOUBLE", "str": "VARCHAR", "RunStatus": "VARCHAR",
             "ChunkStatus": "VARCHAR", "Outcome": "VARCHAR"}  # fmt: skip
    return {f.name: names[str(f.type).split(" |")[0]] for f in fields(record_type)}


_SQL_TYPES = {t: _sql_types(t) for t in (ChunkRecord, RunRecord, AttemptRecord)}
_RUN_UPDATE_COLUMNS = [c for c in RUN_COLUMNS if c != "run_id"]
_RUN_UPDATE = (
    "UPDATE runs SET "
    + ", ".join(
        f"{c} = to_timestamp(?::DOUBLE)" if c in TIMESTAMPS else f"{c} = ?::{_SQL_TYPES[RunRecord][c]}"
        for c in _RUN_UPDATE_COLUMNS
    )
    + " WHERE run_id = ?"
)


def _dicts(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
