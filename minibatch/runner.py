"""One run of one job: plan -> reconcile -> execute -> reduce -> record; listeners are told.

`run_job` is the entry point of `run-now`, `retry`, the daemon and the importable API: it
takes the job's lock, runs it, records a run that broke as `crashed` while still holding the
lock, and emits `run_ended` after releasing it (hooks listen for that)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from minibatch.admission import LEARN_FROM, MEMORY_FACTOR, MemoryModel, frees_at_once, shared_workers
from minibatch.checks import record_counts, too_many_bad
from minibatch.clock import SYSTEM, Clock
from minibatch.config import Config, ConfigError, JobConfig
from minibatch.crossjob import check_rendered
from minibatch.events import Emitter, Listener, LogListener
from minibatch.execute import Execution, Executor, open_pool
from minibatch.hooks import HookListener
from minibatch.inputs import InputError, Inputs, find_inputs, recheck
from minibatch.layout import OutputLayout, remove_published
from minibatch.ledger import Ledger
from minibatch.lock import job_lock
from minibatch.manifest import Manifest, manifest_path
from minibatch.owner import OutputNotOwned
from minibatch.params import params_json
from minibatch.planner import BadFile, FileMeta, InputUnreadable, plan_chunks, scan_inputs
from minibatch.reconcile import (
    Reconciled,
    check_definition,
    drop_removed,
    earlier_inputs,
    fit_schema,
    job_definition,
    reconcile,
    removed_and_changed,
    report_bad_files,
    results_lost,
)
from minibatch.records import ChunkRecord, RunRecord, new_run_id
from minibatch.reduce import OutputFailed, ReduceStopped, publish_if_needed
from minibatch.results import ResultStore
from minibatch.signals import CANCELLED, StopSignals
from minibatch.states import EventKind, RunStatus
from minibatch.tasks import JobSpec, Pool, dictionary_limit
from minibatch.textinput import read_text_meta, segment_size
from minibatch.treemem import TreeMemory
from minibatch.validate import check_imports


@dataclass
class RunOptions:
    workers: int | None = None
    memory_limit: int | None = None
    fresh: bool = False
    retry_dead: bool = False
    stop: StopSignals | None = None  # the daemon's handle to stop this run from another thread
    params: dict[str, str] = field(default_factory=dict)  # NAME -> VALUE, as given (params.py)
    run_id: str | None = None  # chosen by the caller (the HTTP API answers with it at once)
    lock: contextlib.ExitStack | None = None  # the job's lock, taken by the caller (the API, as it accepts)
    pool_factory: Callable[[int], Pool] | None = None  # default: the job's executor
    clock: Clock = SYSTEM


@dataclass
class RunSummary:
    record: RunRecord
    dead: list[ChunkRecord] = field(default_factory=list)
    bad_files: list[BadFile] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0
    definition_changed: list[str] = field(default_factory=list)  # what changed, when it did
    checks: dict[str, tuple[str, int]] = field(default_factory=dict)  # check -> (action, rows failed)

    @property
    def exit_code(self) -> int:
        return 1 if self.record.status == RunStatus.FAILED else 0


def run_job(
    config: Config, name: str, options: RunOptions | None = None, listeners: list[Listener] | None = None
) -> RunSummary:
    """Run job `name` now, resuming its checkpoint. Raises JobLocked, ConfigError."""
    options = options or RunOptions()
    run_id = options.run_id or new_run_id()
    options = replace(options, run_id=run_id)  # its lock names it
    job = config.bound(name, options.params)
    job = replace(
        job, workers=options.workers or job.workers, memory_limit=options.memory_limit or job.memory_limit
    )
    if options.pool_factory is None and job.executor == "local":
        from minibatch.pool import warm_up

        warm_up(job.sql is not None or bool(job.checks.rows), frees_at_once(job))  # imports while we plan
    check_imports(config, [name])
    # the bar stops before the last log line; hooks fire after both
    emitter = Emitter([*(listeners or []), LogListener(), HookListener(config, job, options.stop)])
    run: Run | None = None
    # Signals are ours from here: a stop while planning ends the run as cleanly as one later.
    with options.stop or StopSignals() as signals:
        try:
            local = options.pool_factory is None and job.executor == "local"
            share = shared_workers(config.engine.state_dir, job, config.job(name).workers, local, signals)
            lock = options.lock or job_lock(config.engine.state_dir, job.key, tag=run_id)
            with lock, share as job:
                run = Run(config, job, options, emitter, signals)
                try:
                    summary = run.execute()
                except Exception as exc:
                    run.record_crash(exc)  # still under the lock: before any next run reads it
                    raise
        except Exception:
            if run is not None and run.started:  # it broke: tell on_failure before the error surfaces
                run.events(EventKind.RUN_ENDED, record=run.record)
            raise
    run.events(EventKind.RUN_ENDED, record=summary.record)  # after the lock: a hook may start a run
    return summary


class Run:
    def __init__(
        self, config: Config, job: JobConfig, options: RunOptions, emitter: Emitter, signals: StopSignals
    ) -> None:
        self.config, self.job, self.options, self.signals = config, job, options, signals
        self.manifest = Manifest(manifest_path(config.engine.state_dir))
        self.layout = OutputLayout.of(job)
        self.definition = job_definition(job, config.base_dir)
        self.started = False  # recorded in the manifest: a crash from here on is the run's
        self.record = RunRecord(
            run_id=options.run_id or new_run_id(), job=job.key, pid=os.getpid(),
            started_at=options.clock.time(), workers=job.workers, memory_limit=job.memory_limit,
            settings=job.to_json(), params=params_json(job.values), parts_dir=str(self.layout.parts),
        )  # fmt: skip
        self.events = emitter.bind(job.name, self.record.run_id)
        self.store = ResultStore(self.layout, self.definition.key, self.events)
        self.ledger = Ledger(self.manifest, self.record, self.store.make_durable, self.events, options.clock)
        self.summary = RunSummary(record=self.record)
        self.removed_chunks = self.dropped = 0  # planned chunks of files removed under the run
        self.gone: set[str] = set()  # input files removed under the run: their results go too
        self.input_schema: str | None = None  # JSON, decided at planning
        self.reduced_key: str | None = None  # what the output is the reduction of, at start
        self.learned: tuple[float | None, int | None] = (None, None)  # per byte, a start-up: earlier runs

    def record_crash(self, exc: Exception) -> None:
        if isinstance(exc, ConfigError) and not self.started:  # refused before it began: no run
            return
        self.record.status, self.record.error = RunStatus.CRASHED, f"{type(exc).__name__}: {exc}"
        self.record.ended_at = self.options.clock.time()
        with contextlib.suppress(Exception):  # the manifest may be what broke
            self.ledger.wait()
            self.manifest.commit(self.record, [])

    def execute(self) -> RunSummary:
        if self.signals.requested:  # stopped while it waited for a worker slot: it changes nothing
            self.manifest.start_run(self.record)
            self.started = self.summary.stopped = True
            self._finish()
            return self.summary
        inputs = self._check_paths()
        usable = not (inputs.missing or inputs.unreadable or self.lost)  # else it fails, deletes nothing
        self.record.parts_dir = self.record.parts_dir if usable else None  # it writes nowhere
        self.record.mounts = json.dumps(inputs.mounts) if usable else None
        with self.manifest.session():  # each open of the file costs tens of milliseconds
            state = self._start(usable)
        leftovers = 0 if self.lost else self.layout.prepare()
        if usable:
            self.layout.remove_other_shape()
        self.events(
            EventKind.RUN_STARTED, workers=self.job.workers, memory_limit=self.job.memory_limit,
            temp_files_removed=leftovers, **({"params": self.record.params} if self.job.values else {}),
        )  # fmt: skip
        work = Reconciled([], [], 0, [])
        if not usable:
            self._refuse(inputs)
        elif (scanned := self._scan(inputs.files)) is not None:  # footers, outside a session: others wait
            with self.manifest.session():
                work = self._plan(*scanned, state)
        if work.todo:
            self._execute_chunks(work)
        self._finish()
        return self.summary

    def _start(self, usable: bool) -> dict[str, Any]:
        self.manifest.start_run(self.record)
        self.started = True
        if not usable:  # it fails and changes nothing: not even the records of an old definition
            return {}
        if self.options.fresh:
            self.manifest.reset(self.job.key)
            self.layout.remove_all(keep_claim=True)
        if self.options.retry_dead:
            self.manifest.revive_dead(self.job.key)
        state = check_definition(self.manifest, self.job.key, self.definition, self.events)
        self.summary.definition_changed = self.definition.changed
        if self.layout.hidden:
            self.reduced_key = self.manifest.reduce_key(self.job.key)
        return state

    def _check_paths(self) -> Inputs:
        """Before anything changes: refuse an output that is not ours, and inputs that loop or
        reach the output (configuration errors, not runs)."""
        try:
            check_rendered(self.job, self.config.jobs, self.config.path, self.config.engine.state_dir)
            ran = lambda: bool(self.manifest.named("has_run", key=self.job.key))  # noqa: E731
            self.lost = results_lost(self.manifest, self.job, self.layout, self.options.fresh)
            if not self.lost:
                self.layout.claim(self.job.key, self.config.engine.state_dir, ran)
            forbidden = [self.layout.output, self.layout.parts, self.layout.staging]
            read, mounts = earlier_inputs(self.manifest, self.job.key, self.options.fresh)
            return find_inputs(self.config.base_dir, self.job.inputs, forbidden, read, mounts)
        except (OutputNotOwned, InputError) as exc:
            raise ConfigError([f"jobs.{self.job.name}: {exc}"], self.config.path) from None

    def _refuse(self, inputs: Inputs) -> None:
        """A glob matching nothing, a match that cannot be read (a dangling symlink), an output holding none
        of its results: an unmounted share, a renamed folder, a typo, not an empty day. Delete nothing."""
        why = [f"input glob {glob!r} matches no file (in {self.config.base_dir})" for glob in inputs.missing]
        why += [f"input {unreadable}" for unreadable in inputs.unreadable]
        error = self.record.error = "; ".join(filter(None, [*why, self.lost, "nothing was deleted"]))
        if why:
            self.events(EventKind.NO_INPUT_FILES, input=[*inputs.missing, *inputs.unreadable], error=error)
        if self.lost:
            self.events(EventKind.OUTPUT_GONE, output=str(self.layout.parts), error=error)

    # -- planning -------------------------------------------------------------------------------

    def _scan(self, paths: list[str]) -> tuple[list[FileMeta], list[BadFile]] | None:
        text, cache = self.job.text, self.config.engine.state_dir / "text-plans"
        segment = segment_size(self.job.chunk_bytes)
        read = (lambda path: read_text_meta(path, text, segment, cache)) if text else None
        try:
            scanned = scan_inputs(paths, self.job.columns, stop=lambda: self.signals.requested, read=read)
        except InputUnreadable as exc:  # not a bad file: its results stay, and the run fails
            self._refuse(Inputs(files=[], missing=[], unreadable=[str(exc)]))
            return None
        self.summary.stopped = self.signals.requested  # a partial plan must not decide what is stale
        return None if self.summary.stopped else scanned

    def _plan(self, files: list[FileMeta], bad: list[BadFile], state: dict[str, Any]) -> Reconciled:
        work = self._reconcile(files, bad, state)
        if work.todo:  # what chunks of this job grew in earlier runs, for their estimates
            self.learned = self.manifest.learned_memory(self.job.name, LEARN_FROM)
        self.ledger.flush()  # the plan's totals, and any adopted chunks, are visible to `status` now
        return work

    def _reconcile(self, files: list[FileMeta], bad: list[BadFile], state: dict[str, Any]) -> Reconciled:
        stored = state.get("input_schema") or self.store.known_input_signature()
        declared = bool(self.job.text and self.job.text.schema)
        fit = fit_schema(self.manifest, self.job.key, stored, files, self.job.columns, bool(bad), declared)
        files, self.input_schema = fit.good, fit.signature
        failing = fit.bad if fit.stuck else []  # misfits of a schema kept for an unreadable input
        args = (self.manifest, self.job.key, self.record.run_id, bad + fit.bad, self.events, failing)
        new_bad = report_bad_files(*args)
        self.summary.bad_files, self.record.bad_files = new_bad, len(new_bad)
        # a chunk whose decoded rows alone would fill half the budget is split (a stable rule: the configured
        # budget, not a run's share, --memory-limit or the learned factor: a moved plan recomputes)
        budget = self.config.job(self.job.name).memory_limit
        chunks = plan_chunks(files, self.job.chunk_bytes, int(budget // MEMORY_FACTOR))
        self.record.chunks_total = len(chunks)
        work = reconcile(chunks, self.manifest, self.store, self.ledger, self.events)
        self.store.load_schema(self.ledger.outputs.values(), state.get("output_schema"))
        self.record.chunks_skipped = work.skipped
        self.record.chunks_reused = len(self.ledger.outputs)  # by earlier runs, adopted ones included
        self.events(
            EventKind.RUN_PLANNED, files=len(files), chunks=len(chunks), todo=len(work.todo),
            bytes=sum(c.nbytes for c in work.todo),
        )  # fmt: skip
        return work

    # -- execution ------------------------------------------------------------------------------

    def _execute_chunks(self, work: Reconciled) -> None:
        spec = JobSpec(
            name=self.job.name, process=self.job.process, sql=self.job.sql, columns=self.job.columns,
            base_dir=str(self.config.base_dir), parts_dir=str(self.layout.parts),
            staging_dir=str(self.layout.staging), definition=self.definition.key,
            source=self.definition.facts.get("source"), input_schema=self.input_schema,
            params=self.job.values, checks=self.job.checks.rows, text=self.job.text,
            shape=self.job.shape.of_parts(self.job.reduce_sql),
            dictionary_limit=dictionary_limit(self.job.memory_limit, self.job.workers),
        )  # fmt: skip
        # the local pool's processes are this one's children: measure them (Dask's are remote)
        local = self.options.pool_factory is None and self.job.executor == "local"
        executor = Executor(
            self.job, spec, self.record.run_id, store=self.store, ledger=self.ledger, events=self.events,
            signals=self.signals, pool_factory=self.options.pool_factory or partial(open_pool, self.job),
            clock=self.options.clock, memory=TreeMemory() if local else None,
            model=MemoryModel(self.learned[0], spec.dictionary_limit, self.learned[1]),
        )  # fmt: skip
        out = executor.run(work.todo, work.salvaged)
        self.record.workers = out.workers  # fewer when chunks are few
        self.record.peak_in_flight = out.peak_in_flight
        self.record.peak_memory, self.record.idle_memory = out.peak_memory, out.idle_memory
        if out.peak_memory is not None and out.peak_memory > self.job.memory_limit:
            self.events(
                EventKind.MEMORY_OVER_BUDGET, peak_memory=out.peak_memory, idle_memory=out.idle_memory,
                memory_limit=self.job.memory_limit,
            )  # fmt: skip
        self.record.busy_seconds = out.busy_seconds
        self.summary.stopped = out.stopped
        self.record.error = out.error or self._input_changed(out, {chunk.path for chunk in work.planned})
        if self.gone:
            self.dropped = drop_removed(work.planned, self.gone, self.store, self.ledger, self.events)

    def _input_changed(self, out: Execution, planned: set[str]) -> str | None:
        """Input changed under the run: a failure (a removed file is not: reconcile.removed_and_changed)."""
        changed = out.changed
        if out.removed:
            try:
                now, lost = recheck(self.config.base_dir, self.job.inputs, out.removed, self.record.mounts)
            except InputError as exc:
                return str(exc)
            if lost:
                return lost
            self.gone, changed = removed_and_changed(out.changed, set(out.removed), planned, now)
            self.removed_chunks = sum(n for path, n in out.removed.items() if path in self.gone)
        if not changed:
            return None
        names = ", ".join(sorted(changed)[:3]) + (" ..." if len(changed) > 3 else "")
        return f"input changed during the run ({names}); the next run processes the new version"

    def _keep_schema(self) -> None:
        """Store a newly decided output schema: an empty reduce needs it when no part exists."""
        schema = self.store.schema or self.store.empty_schema
        if schema is not None and self.record.chunks_done:
            self.manifest.set_schemas(self.job.key, None, schema.serialize().to_pybytes())

    # -- the end --------------------------------------------------------------------------------

    def _finish(self) -> None:
        self.ledger.wait()
        record = self.record
        if self.summary.stopped:
            record.status = RunStatus.STOPPED
        elif record.chunks_dead or record.bad_files or record.error:
            record.status = RunStatus.FAILED
        else:
            record.status = RunStatus.SUCCEEDED
            self._check_complete()
        if record.status == RunStatus.SUCCEEDED and self.job.checks.max_bad_fraction is not None:
            self.ledger.flush()  # judged on every done chunk: a rerun must not pass what one failed
            (done,) = self.manifest.named("done_rows", read_only=True, job=self.job.key)
            if bad := too_many_bad(done["rows_bad"], done["rows_out"], self.job.checks.max_bad_fraction):
                self._fail(bad, EventKind.CHECKS_FAILED)
        reduced = None
        if record.status == RunStatus.SUCCEEDED and self.layout.hidden:
            reduced = self._publish_if_needed()
        elif record.status == RunStatus.SUCCEEDED:  # partitions of before: after the parts are in
            remove_published(self.layout.output)
        record.ended_at = self.options.clock.time()
        if record.status == RunStatus.STOPPED and self.signals.last == CANCELLED:
            record.error = f"{CANCELLED}: {record.error}" if record.error else CANCELLED  # kept at start
        wall = max(record.ended_at - record.started_at, 1e-9)
        record.utilisation = record.busy_seconds / (max(record.workers, 1) * wall)
        record.rows_per_second, record.mb_per_second = record.rows_in / wall, record.bytes_in / 1e6 / wall
        self.summary.seconds = wall  # the same wall time as `history` and the report
        self.summary.dead = self.ledger.dead
        with self.manifest.session():
            if reduced is not None:
                self.manifest.record_reduce(self.job.key, reduced)
            self._keep_schema()
            checks = record_counts(self.manifest, self.job.key, record.run_id, self.job.checks, self.ledger)
            self.ledger.flush()
        self.events(
            EventKind.RUN_FINISHED, status=record.status, chunks_done=record.chunks_done,
            chunks_dead=record.chunks_dead, rows=record.rows_out, rows_bad=record.rows_bad,
            seconds=round(wall, 3), peak_memory=record.peak_memory, **({"checks": checks} if checks else {}),
        )  # fmt: skip
        self.summary.checks = checks

    def _check_complete(self) -> None:
        """Success means every planned chunk is done (or a dead letter of an earlier run)."""
        r = self.record
        holes = r.chunks_total - (r.chunks_done + r.chunks_reused + r.chunks_skipped + self.removed_chunks)
        if holes > 0:
            self._fail(f"{holes} of {r.chunks_total} planned chunks are not done", EventKind.RUN_INCOMPLETE)

    def _publish_if_needed(self) -> str | None:
        """What readers see, if it changed; the key of it (recorded with the last commit)."""
        try:
            return publish_if_needed(
                self.job, self.layout, self.ledger.outputs, self.record.chunks_total - self.dropped,
                self.definition.key, self.reduced_key, self.store.schema or self.store.empty_schema,
                self.events, self.signals.arrived,
            )  # fmt: skip
        except ReduceStopped:  # published nothing: the next run reduces again
            self.record.status, self.summary.stopped = RunStatus.STOPPED, True
        except OutputFailed as exc:
            self._fail(str(exc), exc.kind)
        return None

    def _fail(self, error: str, kind: EventKind = EventKind.REDUCE_FAILED) -> None:
        self.record.status, self.record.error = RunStatus.FAILED, error
        self.events(kind, error=error)
