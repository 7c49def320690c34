"""One run of one job: plan -> skip what is done -> execute -> commit -> reduce."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from minibatch.config import Config, ConfigError, JobConfig, check_imports
from minibatch.events import Emitter, Listener, LogListener
from minibatch.hooks import notify_run
from minibatch.jobcode import changed_facts, definition
from minibatch.lock import job_lock
from minibatch.manifest import AttemptRecord, ChunkRecord, Manifest, RunRecord
from minibatch.planner import (
    BadFile,
    Chunk,
    FileMeta,
    InputError,
    Inputs,
    find_inputs,
    input_signature,
    misfits,
    plan_chunks,
    scan_inputs,
)
from minibatch.results import OutputLayout, OutputNotOwned, fsync_dir, inspect_part, part_name, read_schema
from minibatch.signals import StopSignals

if TYPE_CHECKING:
    import pyarrow as pa

    from minibatch.worker import TaskError, TaskResult


@dataclass
class RunOptions:
    workers: int | None = None
    memory_limit: int | None = None
    fresh: bool = False
    retry_dead: bool = False
    stop: StopSignals | None = None  # the daemon's handle to stop this run from another thread


@dataclass
class RunSummary:
    record: RunRecord
    dead: list[ChunkRecord] = field(default_factory=list)
    bad_files: list[BadFile] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0
    definition_changed: list[str] = field(default_factory=list)  # what changed, when it did

    @property
    def exit_code(self) -> int:
        return 1 if self.record.status == "failed" else 0


def run_job(
    config: Config,
    name: str,
    options: RunOptions | None = None,
    listeners: list[Listener] | None = None,
) -> RunSummary:
    """Run job `name` now, resuming its checkpoint. Raises JobLocked, ConfigError."""
    from minibatch.pool import warm_up

    warm_up()  # the forkserver imports pyarrow and DuckDB while we plan
    options = options or RunOptions()
    job = config.job(name)
    job = replace(
        job,
        workers=options.workers or job.workers,
        memory_limit=options.memory_limit or job.memory_limit,
    )
    check_imports(config, [name])
    emitter = Emitter([*(listeners or []), LogListener()])  # the bar stops before the last log line
    run: Run | None = None
    # Signals are ours from here: a stop while planning ends the run as cleanly as one later.
    with options.stop or StopSignals() as signals:
        try:
            with job_lock(config.engine.state_dir, name):
                run = Run(config, job, options, emitter, signals)
                try:
                    summary = run.execute()
                except Exception as exc:
                    run.record_crash(exc)  # still under the lock: before any next run reads it
                    raise
        except Exception:
            if run is not None and run.started:  # it broke: tell on_failure before the error surfaces
                notify_run(config, job, run.record)
            raise
    notify_run(config, job, summary.record)  # after the lock: a hook may start the next run
    return summary


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class Run:
    def __init__(
        self, config: Config, job: JobConfig, options: RunOptions, emitter: Emitter, signals: StopSignals
    ) -> None:
        self.config = config
        self.job = job
        self.options = options
        self.emitter = emitter
        self.signals = signals
        self.manifest = Manifest(config.engine.state_dir / "manifest.duckdb")
        self.layout = OutputLayout(job.output, reduce=job.reduce_sql is not None)
        self.definition, self.definition_facts = definition(
            job.process, job.sql, job.columns, job.version, config.base_dir
        )
        self.started = False  # recorded in the manifest: a crash from here on is the run's
        self.record = RunRecord(
            run_id=new_run_id(),
            job=job.name,
            pid=os.getpid(),
            started_at=time.time(),
            workers=job.workers,
            memory_limit=job.memory_limit,
            settings=job.to_json(),
        )
        self.summary = RunSummary(record=self.record)
        self.pending_records: list[ChunkRecord] = []
        self.pending_attempts: list[AttemptRecord] = []
        self._committer: _Committer | None = None
        self.removed_chunks = 0  # planned, but their input file was removed under the run
        self.salvaged: list[tuple[Chunk, TaskResult]] = []  # staged by a killed run's workers
        self.done_outputs: dict[str, str | None] = {}  # chunk_id -> part file, for reduce
        self.schema: pa.Schema | None = None  # the output's, read from a finished part
        self.empty_schema: pa.Schema | None = None  # of results without rows: an empty reduce's
        self.state: dict[str, Any] = {}  # the manifest's job_state row

    def record_crash(self, exc: Exception) -> None:
        self.record.status, self.record.error = "crashed", f"{type(exc).__name__}: {exc}"
        self.record.ended_at = time.time()
        with contextlib.suppress(Exception):  # the manifest may be what broke
            self.wait_for_commit()
            self.manifest.commit(self.record, [])

    def emit(self, name: str, **data: object) -> None:
        self.emitter.emit(name, self.job.name, self.record.run_id, **data)

    def execute(self) -> RunSummary:
        inputs = self._check_paths()
        self.manifest.start_run(self.record)
        self.started = True
        if self.options.fresh:
            self.manifest.reset(self.job.name)
            self.layout.remove_all(keep_claim=True)
        if self.options.retry_dead:
            self.manifest.revive_dead(self.job.name)
        leftovers = self.layout.prepare()
        self.emit(
            "run_started",
            workers=self.job.workers,
            memory_limit=self.job.memory_limit,
            temp_files_removed=leftovers,
        )
        if inputs.missing:
            self._inputs_missing(inputs.missing)
        else:
            todo = self._plan(inputs.files)
            self.flush()  # the plan's totals, and any adopted chunks, are visible to `status` now
            if todo:
                self._execute_chunks(todo)
        self._finish()
        return self.summary

    def _check_paths(self) -> Inputs:
        """Before anything changes: refuse an output that is not ours, and inputs that loop or
        reach the output (configuration errors, not runs)."""
        try:
            self.layout.claim(self.job.name)
            forbidden = [self.layout.output, self.layout.parts, self.layout.staging]
            return find_inputs(self.config.base_dir, self.job.inputs, forbidden)
        except (OutputNotOwned, InputError) as exc:
            raise ConfigError([f"jobs.{self.job.name}: {exc}"], self.config.path) from None

    def _inputs_missing(self, patterns: list[str]) -> None:
        """A glob that matches nothing is an unmounted share, a renamed folder or a typo far more
        often than an empty day: fail, and delete nothing."""
        quoted = ", ".join(repr(p) for p in patterns)
        self.record.error = (
            f"input glob {quoted} matches no file (in {self.config.base_dir}); nothing was deleted"
        )
        self.emit("no_input_files", input=patterns, error=self.record.error)

    # -- planning ---------------------------------------------------------------------------

    def _plan(self, paths: list[str]) -> list[Chunk]:
        self._check_definition()
        files, bad = scan_inputs(paths, self.job.columns, stop=lambda: self.signals.requested)
        if self.signals.requested:  # a partial plan must not decide what is stale
            self.summary.stopped = True
            return []
        files, misfit = self._fit_schema(files)
        self._report_bad_files(bad + misfit)
        chunks = plan_chunks(files, self.job.chunk_bytes)
        self.record.chunks_total = len(chunks)
        todo = self._reconcile(chunks)
        self.emit(
            "run_planned",
            files=len(files),
            chunks=len(chunks),
            todo=len(todo),
            bytes=sum(c.nbytes for c in todo),
        )
        return todo

    def _check_definition(self) -> None:
        """Results of another definition of the job (sql, process or its source, columns,
        version) are not current: forget them, so that this run computes them again."""
        import json

        state = self.manifest.job_state(self.job.name) or {}
        stored = state.get("definition")
        changed = stored is not None and stored != self.definition
        if changed:
            what = changed_facts(state.get("definition_facts"), self.definition_facts)
            self.summary.definition_changed = what or ["definition"]
            self.emit("definition_changed", changed=self.summary.definition_changed)
        if changed or stored is None:
            facts = json.dumps(self.definition_facts, sort_keys=True)
            self.manifest.set_definition(self.job.name, self.definition, facts, forget=changed)
        self.state = self.manifest.job_state(self.job.name) or {}

    def _fit_schema(self, files: list[FileMeta]) -> tuple[list[FileMeta], list[BadFile]]:
        """Files whose columns differ from the job's input schema are bad files: the schema is
        the one stored by earlier runs, else the one most files have."""
        import json

        stored = self.state.get("input_schema")
        signature = input_signature(files, tuple(map(tuple, json.loads(stored))) if stored else None)
        if signature is None:
            return files, []
        if not stored:
            self.manifest.set_schemas(self.job.name, json.dumps(signature), None)
        good, bad = [], []
        for meta in files:
            problem = misfits(meta, signature, self.job.columns)
            if problem is None:
                good.append(meta)
            else:
                bad.append(BadFile(meta.path, meta.fingerprint, meta.size, problem))
        return good, bad

    def _report_bad_files(self, bad: list[BadFile]) -> None:
        known = self.manifest.known_bad_files(self.job.name)
        new = [b for b in bad if (b.path, b.fingerprint) not in known]
        for item in bad:
            name = "bad_file" if item in new else "known_bad_file"
            self.emit(name, file=item.path, error=item.error)
        if new:
            self.manifest.record_bad_files(self.job.name, self.record.run_id, new)
        self.summary.bad_files = new
        self.record.bad_files = len(new)

    def _reconcile(self, chunks: list[Chunk]) -> list[Chunk]:
        """Chunks still to compute. Records of chunks no longer planned, or whose result file
        is gone, are forgotten; results renamed into place but not recorded are adopted;
        parts no finished chunk owns are removed (only parts: other files are not ours)."""
        states = self.manifest.chunk_states(self.job.name)
        on_disk = self.layout.part_files()
        planned = {c.chunk_id for c in chunks}
        done = {
            chunk_id: output
            for chunk_id, (status, output) in states.items()
            if status == "done" and chunk_id in planned and (output is None or output in on_disk)
        }
        dead = {
            chunk_id for chunk_id, (status, _) in states.items() if status == "dead" and chunk_id in planned
        }
        forget = [chunk_id for chunk_id in states if chunk_id not in done and chunk_id not in dead]
        self.manifest.forget_chunks(self.job.name, forget)
        self.done_outputs.update(done)
        known = done.keys() | dead
        self._adopt([c for c in chunks if c.chunk_id not in known and part_name(c.chunk_id) in on_disk])
        self._remove_strays(on_disk, forget)
        self._read_schema()
        if dead:
            self.emit("dead_letters_skipped", chunks=len(dead), hint=f"minibatch retry {self.job.name}")
        if foreign := self.layout.foreign_files():
            self.emit("foreign_files_in_output", output=str(self.layout.output), files=foreign[:10])
        self.record.chunks_skipped = len(dead)
        self.record.chunks_reused = len(self.done_outputs)  # by earlier runs, adopted ones included
        todo = [c for c in chunks if c.chunk_id not in dead and c.chunk_id not in self.done_outputs]
        self.salvaged = self._salvage(todo)
        return todo

    def _salvage(self, todo: list[Chunk]) -> list[tuple[Chunk, TaskResult]]:
        """Results that workers of a killed or stopped run staged and no coordinator published.
        Those of chunks still to do that pass the footer check go to the executor, which
        publishes them like fresh results; the rest are removed."""
        from minibatch.worker import TaskResult

        wanted = {c.chunk_id: c for c in todo}
        salvaged = []
        for chunk_id, paths in self.layout.staged_results().items():
            chunk, keep, rows = wanted.get(chunk_id), None, 0
            for path in reversed(paths) if chunk else []:
                try:
                    rows, keep = inspect_part(path, chunk_id, self.definition), path
                    break
                except ValueError:
                    continue
            for path in paths:
                if path != keep:
                    path.unlink(missing_ok=True)
            if chunk is not None and keep is not None:
                size, schema = keep.stat().st_size, read_schema(keep)
                result = TaskResult(
                    chunk.num_rows, rows, chunk.nbytes, size, part_name(chunk_id), 0.0, schema, str(keep)
                )
                salvaged.append((chunk, result))
        return salvaged

    def _adopt(self, chunks: list[Chunk]) -> None:
        """Results a killed run's coordinator renamed into place before it could record them.
        Each must pass a footer check and name this chunk and this definition."""
        for chunk in chunks:
            name = part_name(chunk.chunk_id)
            path = self.layout.parts / name
            try:
                rows = inspect_part(path, chunk.chunk_id, self.definition)
            except ValueError as exc:  # a stray, removed below: the chunk is computed again
                self.emit("part_not_adopted", file=str(path), reason=str(exc))
                continue
            self.pending_records.append(
                self._record(
                    chunk,
                    "done",
                    1,
                    rows_in=chunk.num_rows,
                    rows_out=rows,
                    output_file=name,
                    bytes_out=path.stat().st_size,
                )
            )
            self.done_outputs[chunk.chunk_id] = name

    def _read_schema(self) -> None:
        import pyarrow as pa

        for name in self.done_outputs.values():
            if name:
                self.schema = read_schema(self.layout.parts / name)
                return
        stored = self.state.get("output_schema")
        if stored:
            self.empty_schema = pa.ipc.read_schema(pa.py_buffer(stored))

    def _remove_strays(self, on_disk: set[str], stale: list[str]) -> None:
        keep = {name for name in self.done_outputs.values() if name}
        strays = on_disk - keep
        self.layout.remove_parts(strays)
        if strays or stale:
            self.emit("stale_outputs_removed", files=len(strays), records=len(stale))

    def _record(self, chunk: Chunk, status: str, attempts: int, **values: Any) -> ChunkRecord:
        return ChunkRecord(
            job=self.job.name,
            chunk_id=chunk.chunk_id,
            file=chunk.path,
            fingerprint=chunk.fingerprint,
            row_start=chunk.row_start,
            row_end=chunk.row_end,
            status=status,
            run_id=self.record.run_id,
            attempts=attempts,
            finished_at=time.time(),
            **values,
        )

    # -- execution --------------------------------------------------------------------------

    def _execute_chunks(self, todo: list[Chunk]) -> None:
        from minibatch.execute import Executor

        executor = Executor(self, todo, self.signals, self.salvaged)
        executor.run()
        self.record.workers = executor.pool.size if executor.pool else 0  # fewer when chunks are few
        self.record.peak_in_flight = executor.budget.peak
        self.record.busy_seconds = executor.busy_seconds
        self.summary.stopped = executor.stopped
        self.record.error = executor.error or self._input_changed(executor.changed, executor.removed)
        self._keep_schema(executor.gate.schema or executor.empty_schema)

    def _input_changed(self, changed: set[str], removed: dict[str, int]) -> str | None:
        """Input rewritten under the run leaves its chunks neither done nor dead: not a success.
        A removed file is not a hole (its results go too), unless it is back by now."""
        changed = changed | {path for path in removed if os.path.exists(path)}
        self.removed_chunks = sum(n for path, n in removed.items() if path not in changed)
        if not changed:
            return None
        names = ", ".join(sorted(changed)[:3]) + (" ..." if len(changed) > 3 else "")
        return f"input changed during the run ({names}); the next run processes the new version"

    def _keep_schema(self, schema: pa.Schema | None) -> None:
        """Store a newly decided output schema: an empty reduce needs it when no part exists."""
        if schema is None or self.schema is not None or self.state.get("output_schema"):
            return
        self.manifest.set_schemas(self.job.name, None, schema.serialize().to_pybytes())
        if self.empty_schema is None:
            self.empty_schema = schema

    def chunk_done(self, chunk: Chunk, attempts: int, result: TaskResult, in_flight: int) -> None:
        record = self._record(
            chunk,
            "done",
            attempts,
            rows_in=result.rows_in,
            rows_out=result.rows_out,
            bytes_in=result.bytes_in,
            bytes_out=result.bytes_out,
            output_file=result.output_file,
            seconds=result.seconds,
        )
        self._count(record)
        self.done_outputs[chunk.chunk_id] = record.output_file
        self.emit(
            "chunk_done",
            chunk=chunk.chunk_id,
            label=chunk.label,
            rows=record.rows_out,
            bytes_in=record.bytes_in,
            seconds=round(record.seconds, 3),
            in_flight=in_flight,
        )

    def chunk_dead(self, chunk: Chunk, attempts: int, error: TaskError, in_flight: int) -> None:
        record = self._record(
            chunk,
            "dead",
            attempts,
            error_type=error.type,
            error_message=error.message,
            traceback=error.traceback,
        )
        self.record.chunks_dead += 1
        self.pending_records.append(record)
        self.summary.dead.append(record)
        self.emit(
            "chunk_dead",
            chunk=chunk.chunk_id,
            label=chunk.label,
            attempts=attempts,
            error=f"{error.type}: {error.message}",
            in_flight=in_flight,
        )

    def _count(self, record: ChunkRecord) -> None:
        self.record.chunks_done += 1
        self.record.rows_in += record.rows_in
        self.record.rows_out += record.rows_out
        self.record.bytes_in += record.bytes_in
        self.record.bytes_out += record.bytes_out
        self.pending_records.append(record)

    def flush(self, wait: bool = True) -> None:
        """Record finished chunks: first make their renames durable, then commit them.

        With `wait=False` the commit runs in a thread while the coordinator goes on feeding
        workers (a commit takes tens of ms; tiny chunks finish faster); while one is still
        going, a flush that need not wait is skipped. Commits stay in order: each flush first
        waits for the one before, and raises its error.
        """
        if not wait and self._committer is not None and self._committer.is_alive():
            return  # the manifest is slow or busy: these records go with the next flush
        self.wait_for_commit()
        records, attempts = self.pending_records, self.pending_attempts
        self.pending_records, self.pending_attempts = [], []
        run = replace(self.record)  # a snapshot: the loop goes on counting

        def commit() -> None:
            if any(r.output_file for r in records):
                fsync_dir(self.layout.parts)
            self.manifest.commit(run, records, attempts)

        if wait:
            commit()
            return
        self._committer = _Committer(commit)

    def wait_for_commit(self) -> None:
        if self._committer is not None:
            committer, self._committer = self._committer, None
            committer.join()

    # -- the end ----------------------------------------------------------------------------

    def _finish(self) -> None:
        self.wait_for_commit()
        record = self.record
        if self.summary.stopped:
            record.status = "stopped"
        elif record.chunks_dead or record.bad_files or record.error:
            record.status = "failed"
        else:
            record.status = "succeeded"
            self._check_complete()
        if record.status == "succeeded" and self.job.reduce_sql:
            self._reduce_if_needed()
        record.ended_at = time.time()
        wall = max(record.ended_at - record.started_at, 1e-9)
        record.utilisation = record.busy_seconds / (max(record.workers, 1) * wall)
        record.rows_per_second = record.rows_in / wall
        record.mb_per_second = record.bytes_in / 1e6 / wall
        self.summary.seconds = wall  # the same wall time as `history` and the report
        self.flush()
        self.emit(
            "run_finished",
            status=record.status,
            chunks_done=record.chunks_done,
            chunks_dead=record.chunks_dead,
            rows=record.rows_out,
            seconds=round(wall, 3),
        )

    def _check_complete(self) -> None:
        """Success means every planned chunk is done (or a dead letter of an earlier run)."""
        r = self.record
        holes = r.chunks_total - (r.chunks_done + r.chunks_reused + r.chunks_skipped + self.removed_chunks)
        if holes > 0:
            self._fail(f"{holes} of {r.chunks_total} planned chunks are not done", event="run_incomplete")

    def _reduce_if_needed(self) -> None:
        """Reduce over the complete set of parts, unless the output already is that reduction."""
        from minibatch.reduce import reduce_key, reduce_parts
        from minibatch.results import REDUCED_NAME

        missing = self.record.chunks_total - len(self.done_outputs)
        if missing:  # dead letters skipped, or input that changed under the run
            self._fail(f"reduce_sql not run: {missing} of {self.record.chunks_total} chunks are not done")
            return
        assert self.job.reduce_sql is not None
        parts = sorted(self.layout.parts / name for name in self.done_outputs.values() if name)
        key = reduce_key(self.job.reduce_sql, self.definition, parts)
        if key == self.manifest.reduce_key(self.job.name) and (self.layout.output / REDUCED_NAME).exists():
            return
        try:
            rows = reduce_parts(self.job.reduce_sql, parts, self.layout, self.schema or self.empty_schema)
        except Exception as exc:  # the user's SQL: its error ends the run as failed, readably
            self._fail(f"reduce_sql failed: {type(exc).__name__}: {exc}")
            return
        self.manifest.record_reduce(self.job.name, key)
        self.emit("reduce_done", parts=len(parts), rows=rows)

    def _fail(self, error: str, event: str = "reduce_failed") -> None:
        self.record.status = "failed"
        self.record.error = error
        self.emit(event, error=error)


class _Committer(threading.Thread):
    """One background commit; `join()` re-raises what it raised."""

    def __init__(self, commit: Callable[[], None]) -> None:
        super().__init__(name="minibatch-commit")  # not a daemon: exiting waits for the commit
        self.commit = commit
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.commit()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error
