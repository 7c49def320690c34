"""`minibatch backfill JOB --from D --to D`: run a job for each logical date of a range,
resumably. The backfill and each of its dates are recorded in the manifest, so one
interrupted (a stop, a crash, SIGKILL) continues where it was when started again with the
same job, range and parameters; each date's run resumes its own checkpoint, so each date's
output holds its rows exactly once.

A backfill's runs together use the job's `workers` and `memory_limit`, split between its
`max_parallel` dates: a backfill is one job's worth of the machine, never N pools. A date's
run holds that date's job lock, so a scheduled run of the same date never runs beside it:
whichever comes second waits (the backfill) or is skipped (the scheduled run).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

from minibatch.config import Config, ConfigError, JobConfig
from minibatch.events import Listener
from minibatch.layout import OutputLayout
from minibatch.lock import JobLocked, job_lock
from minibatch.log import get_logger
from minibatch.manifest import Manifest, manifest_path
from minibatch.params import DATE, schedule_dates
from minibatch.reconcile import job_definition
from minibatch.records import new_run_id
from minibatch.runner import RunOptions, run_job
from minibatch.signals import StopSignals
from minibatch.states import RunStatus

log = get_logger()
REPROCESS = ("none", "failed", "all")
MAX_PARALLEL = 10**6  # runs at once (more than the dates: as many as the dates); an INTEGER in the manifest
MAX_DAYS = 36525  # a century: a typo'd year would plan millions of dates (seconds of CPU per 20,000)
FIRST_SCHEDULED = date(1970, 1, 2)  # APScheduler's cron clamps earlier fire times to the epoch
LOCK_POLL = 1.0  # seconds between looks at a date's lock held by another run
FINISHED = ("succeeded", "skipped")


@dataclass(frozen=True)
class BackfillRequest:
    job: str
    first: date
    last: date
    params: dict[str, str] = field(default_factory=dict)  # the other parameters
    reprocess: str = "none"  # none: dates never run; failed: and those not succeeded; all: every date, fresh
    max_parallel: int = 1
    backwards: bool = False


@dataclass
class DateState:
    day: date
    action: str  # run | fresh | skip
    status: str = "pending"  # pending | running | succeeded | failed | stopped | skipped
    run_id: str | None = None
    error: str | None = None
    reason: str = ""  # why a date is skipped or reprocessed (the dry run's table)


@dataclass
class Backfill:
    backfill_id: str
    request: BackfillRequest
    dates: list[DateState]
    resumed: bool = False
    status: str = "running"

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "failed" else 0


def check_request(config: Config, request: BackfillRequest) -> JobConfig:
    """The job, or ConfigError naming what is wrong with the request."""
    job = config.job(request.job)
    problems = _range_problems(job, request)
    if DATE not in job.params:
        problems.append(f"job {job.name!r} has no {{date}} parameter: nothing to backfill by date")
    if request.reprocess not in REPROCESS:
        problems.append(f"--reprocess: expected one of {', '.join(REPROCESS)}, got {request.reprocess!r}")
    if not 1 <= request.max_parallel <= MAX_PARALLEL:
        problems.append(
            f"--max-parallel must be from 1 to at most {MAX_PARALLEL}, got {request.max_parallel}"
        )
    if DATE in request.params:
        problems.append("--param date: the backfill gives each run its date")
    if not problems:  # its parameters, checked as a run's are (not a crash of the backfill later)
        try:
            _bind(config, request, request.first)
        except ConfigError as exc:
            problems += exc.errors
    if problems:
        raise ConfigError(problems, config.path)
    return job


def _range_problems(job: JobConfig, request: BackfillRequest) -> list[str]:
    first, last = request.first, request.last
    if first > last:
        return [f"--from {first} is after --to {last}"]
    problems = []
    if (days := (last - first).days + 1) > MAX_DAYS:
        problems.append(
            f"--from {first} --to {last} is {days} days; "
            f"at most {MAX_DAYS} (a century) in one backfill: split it"
        )
    if job.schedule and first < FIRST_SCHEDULED:  # the cron calendar would start there, silently
        problems.append(
            f"--from {first}: before {FIRST_SCHEDULED}, where a schedule's fire times start; for those "
            "dates use a copy of the job without a schedule"
        )
    return problems


def plan(config: Config, request: BackfillRequest, manifest: Manifest) -> list[DateState]:
    """The dates to cover and what to do with each, from their latest runs."""
    job = check_request(config, request)
    from minibatch.schedule import parse_crontab

    schedule = parse_crontab(job.schedule, job.timezone) if job.schedule else None
    days = schedule_dates(schedule, request.first, request.last)
    if request.backwards:
        days.reverse()
    latest = {row["job"]: row for row in manifest.named("latest_runs", job=job.name)}
    restored = {row["job"] for row in manifest.named("all_unverified_parts")}
    current = job_definition(_bind(config, request, days[0]), config.base_dir).key if days else ""
    states = []
    for day in days:
        bound = _bind(config, request, day)
        last = latest.get(bound.key, {})
        state = _decide(day, last.get("status"), request.reprocess)
        parts = str(OutputLayout.of(bound).parts)
        if state.action == "skip" and last["status"] == RunStatus.SUCCEEDED and last["definition"] is None:
            state = DateState(day, "run", reason="checkpoint forgotten")  # `reset` since (a run records one)
        elif state.action == "skip" and bound.key in restored:  # its run checks each part's footer
            state = DateState(day, "run", reason="restored from a backup")
        elif state.action == "skip" and last.get("definition") not in (None, current):
            state = DateState(day, "run", reason="definition changed")  # (a run recomputes it anyway)
        elif state.action == "skip" and last.get("parts_dir") not in (None, parts):
            state = DateState(day, "run", reason="output moved")
        states.append(state)
    return states


def _decide(day: date, last: str | None, reprocess: str) -> DateState:
    if reprocess == "all":
        return DateState(day, "fresh", reason="reprocess all" if last else "never run")
    if last is None:
        return DateState(day, "run", reason="never run")
    if last == RunStatus.SUCCEEDED or (reprocess == "none" and last == RunStatus.FAILED):
        return DateState(day, "skip", "skipped", reason=f"last run {last}")
    # stopped, killed or crashed: not a result to leave alone but a checkpoint to resume
    return DateState(day, "run", reason=f"last run {last}")


def _bind(config: Config, request: BackfillRequest, day: date) -> JobConfig:
    return config.bound(request.job, _given(request, day))


def _given(request: BackfillRequest, day: date) -> dict[str, str]:
    return {**request.params, DATE: day.isoformat()}


def run_backfill(
    config: Config,
    request: BackfillRequest,
    stop: StopSignals | None = None,
    on_date: Callable[[Backfill, DateState], None] | None = None,
    backfill_id: str | None = None,
    lock: contextlib.ExitStack | None = None,
    listeners: list[Listener] | None = None,
) -> Backfill:
    """Run (or continue) a backfill to its end or a stop (`lock`: its lock, taken by the caller;
    `listeners`: its dates' runs', the daemon's metrics). Raises ConfigError, JobLocked."""
    manifest = Manifest(manifest_path(config.engine.state_dir))
    check_request(config, request)
    name: Callable[[str], None] | None = None
    if lock is None:
        lock = contextlib.ExitStack()
        name = lock.enter_context(job_lock(config.engine.state_dir, f"{request.job}.backfill"))
    with lock:
        backfill = _start(config, request, manifest, backfill_id)
        if name is not None:
            name(backfill.backfill_id)  # what `status` and `cancel` tell it by
        log.info(
            "backfill_started", job=request.job, backfill_id=backfill.backfill_id, resumed=backfill.resumed,
            dates=len(backfill.dates), todo=sum(d.status not in FINISHED for d in backfill.dates),
        )  # fmt: skip
        _Driver(config, backfill, manifest, stop or StopSignals(), on_date, listeners or []).run()
        manifest.named("end_backfill", id=backfill.backfill_id, status=backfill.status)
        log.info(
            "backfill_finished", job=request.job, backfill_id=backfill.backfill_id, status=backfill.status
        )
    return backfill


def _start(config: Config, request: BackfillRequest, manifest: Manifest, backfill_id: str | None) -> Backfill:
    """Continue the unfinished backfill of the same job, range and parameters (with this
    --max-parallel), or record a new one: also when --reprocess or --backwards changed, which
    decide its dates (the old one is then `superseded`)."""
    spec: dict[str, Any] = {
        "job": request.job,
        "first": request.first,
        "last": request.last,
        "params": _json(request),
    }
    with manifest.session():
        found = manifest.named("unfinished_backfill", **spec)
        old = load(manifest, found[0]["backfill_id"]) if found else None
        if old and continues(old, request):
            manifest.named(
                "resume_backfill", id=old.backfill_id, pid=os.getpid(), max_parallel=request.max_parallel
            )
            old.request, old.resumed = replace(old.request, max_parallel=request.max_parallel), True
            return old
        if old:
            manifest.named("end_backfill", id=old.backfill_id, status="superseded")
            log.info("backfill_superseded", job=request.job, backfill_id=old.backfill_id)
        dates = plan(config, request, manifest)
        backfill = Backfill(backfill_id or new_backfill_id(), request, dates)
        manifest.named(
            "insert_backfill", id=backfill.backfill_id, reprocess=request.reprocess, pid=os.getpid(),
            max_parallel=request.max_parallel, backwards=request.backwards, **spec,
        )  # fmt: skip
        manifest.named(
            "insert_backfill_dates", id=backfill.backfill_id, dates=[d.day for d in dates],
            positions=list(range(len(dates))), actions=[d.action for d in dates],
            statuses=[d.status for d in dates],
        )  # fmt: skip
    return backfill


def continues(old: Backfill, request: BackfillRequest) -> bool:
    """Whether `request` continues the unfinished `old` (what decides its dates is the same)."""
    return (old.request.reprocess, old.request.backwards) == (request.reprocess, request.backwards)


def _json(request: BackfillRequest) -> str:
    return json.dumps(request.params, sort_keys=True)


def new_backfill_id() -> str:
    return "bf-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def load(manifest: Manifest, backfill_id: str) -> Backfill | None:
    rows = manifest.named("backfill", id=backfill_id)
    if not rows:
        return None
    row = rows[0]
    request = BackfillRequest(
        job=row["job"], first=row["first_date"], last=row["last_date"], params=json.loads(row["params"]),
        reprocess=row["reprocess"], max_parallel=row["max_parallel"], backwards=row["backwards"],
    )  # fmt: skip
    dates = [
        DateState(d["logical_date"], d["action"], d["status"], d["run_id"], d["error"])
        for d in manifest.named("backfill_dates", id=backfill_id)
    ]
    return Backfill(backfill_id, request, dates, status=row["status"])


class _Driver:
    """Runs a backfill's open dates, `max_parallel` at a time, each in a thread of its own."""

    def __init__(
        self, config: Config, backfill: Backfill, manifest: Manifest, stop: StopSignals,
        on_date: Callable[[Backfill, DateState], None] | None, listeners: list[Listener],
    ) -> None:  # fmt: skip
        self.config, self.backfill, self.manifest, self.stop = config, backfill, manifest, stop
        self.listeners = listeners
        self.on_date = on_date or (lambda backfill, state: None)
        self.active: dict[date, StopSignals] = {}
        job = config.job(backfill.request.job)
        # no more shares than dates to run at once: --max-parallel 100 over 3 dates is 3
        parallel = self.parallel = max(1, min(backfill.request.max_parallel, len(backfill.dates)))
        self.workers = max(1, job.workers // parallel)
        self.memory_limit = max(1, job.memory_limit // parallel)

    def run(self) -> None:
        todo = [d for d in self.backfill.dates if d.status not in FINISHED]
        held: dict[date, float] = {}  # dates whose lock another run holds: when to try again
        running: dict[Future[bool], DateState] = {}
        forwarded, parallel = 0, self.parallel
        with ThreadPoolExecutor(parallel, "backfill") as pool:
            while (todo or running) and not (self.stop.requested and not running):
                ready = [d for d in todo if held.get(d.day, 0) <= time.monotonic()]
                while ready and not self.stop.requested and len(running) < parallel:
                    state = ready.pop(0)
                    todo.remove(state)
                    running[pool.submit(self._run_date, state)] = state
                if not running:  # only dates held elsewhere are left
                    time.sleep(0.2)
                finished = wait(list(running), 0.2, FIRST_COMPLETED)[0] if running else set()
                for future in finished:
                    state = running.pop(future)
                    if future.result():
                        self.on_date(self.backfill, state)
                    else:  # held by a scheduled or manual run of that date: the other dates first
                        held[state.day] = time.monotonic() + LOCK_POLL
                        todo.append(state)
                while forwarded < self.stop.count:  # a stop (or a second one) reaches every run
                    forwarded += 1
                    for signals in list(self.active.values()):
                        signals.request()
        statuses = {d.status for d in self.backfill.dates}
        if "failed" in statuses:
            self.backfill.status = "failed"
        elif statuses <= set(FINISHED):
            self.backfill.status = "succeeded"
        else:
            self.backfill.status = "stopped"

    def _run_date(self, state: DateState) -> bool:
        """Run one date to its end; False when another run of the date holds its lock."""
        request = self.backfill.request
        stop = StopSignals()
        options = RunOptions(
            workers=self.workers, memory_limit=self.memory_limit, params=_given(request, state.day),
            fresh=state.action == "fresh", retry_dead=request.reprocess != "none", run_id=new_run_id(),
            stop=stop,
        )  # fmt: skip
        self._record(state, "running", options.run_id)
        self.active[state.day] = stop
        try:
            summary = run_job(self.config, request.job, options, self.listeners)
        except JobLocked:
            self._record(state, "pending", None)
            return False
        except Exception as exc:  # a broken date must not end the others
            self._record(state, "failed", options.run_id, f"{type(exc).__name__}: {exc}")
            return True
        finally:
            self.active.pop(state.day, None)
        status = "stopped" if summary.stopped else str(summary.record.status)
        status = "failed" if status == RunStatus.CRASHED else status
        self._record(state, status, None, summary.record.error)
        return True

    def _record(self, state: DateState, status: str, run_id: str | None, error: str | None = None) -> None:
        state.status, state.run_id, state.error = status, run_id or state.run_id, error
        self.manifest.named(
            "set_backfill_date", id=self.backfill.backfill_id, date=state.day, status=status, run_id=run_id,
            error=error,
        )  # fmt: skip


def backfill_json(backfill: Backfill, manifest: Manifest | None = None) -> dict[str, Any]:
    """What `--json` and GET /backfills/{id} show."""
    counts = (
        {row["logical_date"]: row for row in manifest.named("backfill_dates", id=backfill.backfill_id)}
        if manifest
        else {}
    )
    request = backfill.request
    return {
        "backfill_id": backfill.backfill_id, "job": request.job, "status": backfill.status,
        "from": request.first.isoformat(), "to": request.last.isoformat(), "params": request.params,
        "reprocess": request.reprocess, "max_parallel": request.max_parallel, "backwards": request.backwards,
        "dates": [
            {"date": d.day.isoformat(), "action": d.action, "status": d.status, "run_id": d.run_id,
             "error": d.error, **_counts(counts.get(d.day))}
            for d in backfill.dates
        ],
    }  # fmt: skip


def _counts(row: dict[str, Any] | None) -> dict[str, Any]:
    if not row:
        return {}
    return {k: row[k] for k in ("chunks_done", "chunks_total", "rows_out", "seconds")}
