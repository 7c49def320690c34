"""What the daemon can be asked to do by other systems (the HTTP API, api.py): trigger a run,
cancel one, pause or resume a job's schedule, start a backfill, and say how things stand.

Errors are `ControlError`s carrying an HTTP status, so the API turns each into one
problem+json answer; the logic stays here, importable and testable without HTTP.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from minibatch.backfill import (
    BackfillRequest,
    backfill_json,
    check_request,
    continues,
    load,
    new_backfill_id,
    run_backfill,
)
from minibatch.config import Config, ConfigError, JobConfig
from minibatch.events import Event, Listener
from minibatch.lock import JobLocked, held_by, job_lock
from minibatch.log import get_logger
from minibatch.manifest import Manifest
from minibatch.params import DATE, logical_date, text
from minibatch.records import RunRecord, new_run_id
from minibatch.runner import RunOptions
from minibatch.signals import CANCELLED, StopSignals
from minibatch.states import RunStatus

log = get_logger()
TRIGGERS_PER_MINUTE = 6  # per job: a loop in some other system must not start runs back to back


class ControlError(Exception):
    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


class Host(Protocol):
    """The daemon, as seen from here."""

    config: Config
    manifest: Manifest
    active: ActiveRuns
    stopping: bool

    @property
    def metrics(self) -> Listener: ...  # what the daemon serves on /metrics
    def submit(self, target: Callable[..., object], *args: Any) -> None: ...
    def next_fire(self, job: str) -> datetime | None: ...
    def run_in_daemon(self, name: str, reason: str, options: RunOptions) -> bool: ...


@dataclass
class Active:
    job: str
    stop: StopSignals
    kind: str = "run"  # run | backfill | hooks (a run that ended, its hooks firing)
    key: str | None = None  # a run's checkpoint key
    started: bool = True  # False: accepted over HTTP, waiting for a thread of the pool
    params: dict[str, str] = field(default_factory=dict)


class ActiveRuns:
    """Runs and backfills in flight in the daemon, by id: what cancel and a daemon stop reach.
    `ended` is called as one leaves: a stopping daemon exits when the last has."""

    def __init__(self, ended: Callable[[], object] = lambda: None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Active] = {}
        self._ended = ended

    def add(self, item_id: str, item: Active) -> None:
        with self._lock:
            self._items[item_id] = item

    def remove(self, item_id: str) -> None:
        with self._lock:
            self._items.pop(item_id, None)
        self._ended()

    def get(self, item_id: str) -> Active | None:
        with self._lock:
            return self._items.get(item_id)

    def items(self) -> list[tuple[str, Active]]:
        with self._lock:
            return list(self._items.items())

    def running(self, key: str, but: str | None = None) -> bool:
        """A run (not a backfill, nor hooks after one) of checkpoint `key` is in flight, other than `but`."""
        return any(a.key == key and a.kind == "run" and i != but for i, a in self.items())


class RunEnded(Listener):
    """Marks a run ended as it ends, before its hooks fire: a hook may trigger the job again over
    the API (the job's lock is already free), and a stopping daemon still waits for its hooks."""

    def __init__(self, active: ActiveRuns, run_id: str | None) -> None:
        self.active, self.run_id = active, run_id

    def run_ended(self, event: Event) -> None:
        if self.run_id is not None and (entry := self.active.get(self.run_id)) is not None:
            entry.kind = "hooks"


class Control:
    def __init__(self, host: Host) -> None:
        self.host = host
        self._triggers: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._claims = threading.Lock()  # a check that nothing runs and the claim, as one step

    # -- reading ---------------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        return [self.job(name) for name in sorted(self.host.config.jobs)]

    def job(self, name: str) -> dict[str, Any]:
        job = self._job(name)
        paused = name in self.paused()
        last = self.host.manifest.runs(name, limit=1)
        return {
            "name": name, "description": job.description, "schedule": job.schedule, "timezone": job.timezone,
            "params": list(job.params), "paused": paused,
            "next_fire": None if paused else self.host.next_fire(name),
            "running": [i for i, a in self.host.active.items() if a.job == name and a.kind == "run"],
            "last_run": self._shown(last[0]) if last else None,
        }  # fmt: skip

    def runs(self, job: str | None, limit: int) -> list[dict[str, Any]]:
        if job is not None:
            self._job(job)
        shown = [self._shown(row) for row in self.host.manifest.runs(job, limit)]
        listed = {run["run_id"] for run in shown}
        waiting = [  # accepted, not begun (no row yet): the newest
            self._queued(run_id, active)
            for run_id, active in self.host.active.items()
            if active.kind == "run" and job in (None, active.job) and run_id not in listed
            and not self.host.manifest.named("run_by_id", run_id=run_id)
        ]  # fmt: skip
        return (waiting + shown)[:limit]

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self.host.manifest.named("run_by_id", run_id=run_id)
        if not rows:
            if (waiting := self.host.active.get(run_id)) is not None:  # accepted, not begun: no row yet
                return self._queued(run_id, waiting)
            raise ControlError(404, "Run not found", f"no run {run_id!r}")
        return self._shown(rows[0])

    @staticmethod
    def _queued(run_id: str, active: Active) -> dict[str, Any]:
        params = json.dumps(active.params)
        return run_json({"run_id": run_id, "job": active.key, "status": "queued", "params": params})

    def _shown(self, row: dict[str, Any]) -> dict[str, Any]:
        """A run as run_json shows it, `crashed` if its process died running it (a daemon
        SIGKILLed: its runs' rows still say `running`)."""
        from minibatch.status import actual_status

        return {**run_json(row), "status": actual_status(self.host.config, row)}

    def report(self, run_id: str) -> str:
        from minibatch.report import render_report

        run = self.run(run_id)
        return render_report(self.host.manifest, run["job"], run_id)

    def paused(self) -> set[str]:
        return {row["job"] for row in self.host.manifest.named("paused")}

    # -- acting ----------------------------------------------------------------------------------

    def trigger(self, name: str, params: dict[str, str], fresh: bool, retry_dead: bool) -> dict[str, Any]:
        """Start a run of `name` in the daemon; its id, at once (202)."""
        self._job(name)  # 404 for an unknown job
        self._check_not_stopping()
        try:
            bound = self.host.config.bound(name, params)
        except ConfigError as exc:
            raise ControlError(422, "Bad parameters", "; ".join(exc.errors)) from None
        # bound once: its logical date (from now) must not move to the next one while it waits
        key, params = bound.key, {param: text(value) for param, value in bound.values}
        self._rate_limit(name)
        run_id, stop = new_run_id(), StopSignals()
        with self._claims:  # two requests at once: one is accepted, the other told so
            if self.host.active.running(key):
                raise ControlError(409, "Already running", f"job {key!r} is running")
            lock = self._take(key, run_id, f"job {key!r} is running")
            self.host.active.add(
                run_id, Active(name, stop, key=key, started=False, params=params)
            )  # cancellable from now on
        options = RunOptions(
            params=params, fresh=fresh, retry_dead=retry_dead, run_id=run_id, stop=stop, lock=lock
        )
        self._submit(lock, self.host.run_in_daemon, name, "api", options)
        log.info("run_requested", job=name, run_id=run_id, params=params or None)
        return {"run_id": run_id, "job": key, "status": "queued", "url": f"/runs/{run_id}"}

    def cancel(self, run_id: str) -> dict[str, Any]:
        """A graceful stop of one run (or backfill) of this daemon: in-flight chunks finish
        within stop_grace, queued ones are handed back; the run is recorded `stopped`."""
        active = self.host.active.get(run_id)
        active = None if active is not None and active.kind == "hooks" else active  # it has ended
        if active is None:
            rows = self.host.manifest.named("run_by_id", run_id=run_id)
            if not rows:
                raise ControlError(404, "Run not found", f"no run {run_id!r} in this daemon")
            found = self.host.manifest.named("backfill_of_run", run_id=run_id)
            active = self.host.active.get(found[0]["backfill_id"]) if found else None
            status = self._shown(rows[0])["status"]
            if active is None or status != RunStatus.RUNNING:
                raise ControlError(
                    409, "Run not running here", f"run {run_id!r} is {status}, not running in this daemon"
                )  # else a date of a backfill here: the backfill stops, as its process would on SIGTERM
        active.stop.request(CANCELLED)
        log.info("run_cancel_requested", job=active.job, run_id=run_id)
        return {"run_id": run_id, "job": active.job, "status": "stopping"}

    def pause(self, name: str, paused: bool) -> dict[str, Any]:
        self._job(name)
        set_paused(self.host.manifest, name, paused)
        log.info("job_paused" if paused else "job_resumed", job=name)
        return self.job(name)

    def backfill(self, request: BackfillRequest) -> dict[str, Any]:
        self._check_not_stopping()
        try:
            check_request(self.host.config, request)
        except ConfigError as exc:
            raise ControlError(422, "Bad backfill", "; ".join(exc.errors)) from None
        spec: dict[str, Any] = {"job": request.job, "first": request.first, "last": request.last}
        with self._claims:
            running = [
                a for _, a in self.host.active.items() if a.kind == "backfill" and a.job == request.job
            ]
            if running:
                raise ControlError(409, "Already running", f"a backfill of job {request.job!r} is running")
            found = self.host.manifest.named(
                "unfinished_backfill", params=json.dumps(request.params, sort_keys=True), **spec
            )
            old = load(self.host.manifest, found[0]["backfill_id"]) if found else None
            backfill_id = old.backfill_id if old and continues(old, request) else new_backfill_id()
            detail = f"a backfill of job {request.job!r} is running"
            lock = self._take(f"{request.job}.backfill", backfill_id, detail)
            stop = StopSignals()
            self.host.active.add(backfill_id, Active(request.job, stop, "backfill", started=False))
        self._submit(lock, self._run_backfill, request, backfill_id, stop, lock)
        return {
            "backfill_id": backfill_id,
            "job": request.job,
            "status": "queued",
            "url": f"/backfills/{backfill_id}",
        }

    def backfill_info(self, backfill_id: str) -> dict[str, Any]:
        backfill = load(self.host.manifest, backfill_id)
        if backfill is None:
            raise ControlError(404, "Backfill not found", f"no backfill {backfill_id!r}")
        shown = backfill_json(backfill, self.host.manifest)
        lock = f"{backfill.request.job}.backfill"
        if shown["status"] == "running" and not held_by(self.host.config.engine.state_dir, lock, backfill_id):
            # its process died (a daemon SIGKILLed): the same request continues it
            shown["status"] = RunStatus.CRASHED
            for day in shown["dates"]:
                day["status"] = RunStatus.CRASHED if day["status"] == "running" else day["status"]
        return shown

    def _run_backfill(
        self, request: BackfillRequest, backfill_id: str, stop: StopSignals, lock: contextlib.ExitStack
    ) -> None:
        self.host.active.add(backfill_id, Active(request.job, stop, "backfill"))
        try:
            run_backfill(
                self.host.config,
                request,
                stop,
                backfill_id=backfill_id,
                lock=lock,
                listeners=[self.host.metrics],
            )
        except JobLocked as exc:
            log.warning(
                "backfill_skipped_locked", job=request.job, backfill_id=backfill_id, holder_pid=exc.pid
            )
        except Exception:  # a broken backfill must not take the daemon down
            log.exception("backfill_crashed", job=request.job, backfill_id=backfill_id)
        finally:
            self.host.active.remove(backfill_id)

    # -- checks ----------------------------------------------------------------------------------

    def _job(self, name: str) -> JobConfig:
        job = self.host.config.jobs.get(name)
        if job is None:
            raise ControlError(404, "Job not found", f"no job {name!r} in this daemon's config")
        return job

    def _check_not_stopping(self) -> None:
        if self.host.stopping:  # its pool takes no new work: a run queued now would never end
            raise ControlError(503, "Stopping", "the daemon is stopping; it starts no new runs")

    def _take(self, lock: str, tag: str, detail: str) -> contextlib.ExitStack:
        """Take the lock of what is accepted, held until it ends: a run starting elsewhere after
        the 202 is refused (exit 3), where it used to win the lock and the accepted run was lost."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(job_lock(self.host.config.engine.state_dir, lock, tag=tag))
        except JobLocked:
            raise ControlError(409, "Already running", detail) from None
        return held

    def _submit(self, lock: contextlib.ExitStack, target: Callable[..., object], *args: Any) -> None:
        """Run `target` in the daemon's pool, and let go of the lock it was accepted with after."""

        def then_release(*args: Any) -> None:
            with lock:
                target(*args)

        try:
            self.host.submit(then_release, *args)
        except BaseException:
            lock.close()
            raise

    def _rate_limit(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._triggers.get(name, []) if now - t < 60]
            if len(recent) >= TRIGGERS_PER_MINUTE:
                wait = int(60 - (now - recent[0])) + 1
                detail = (
                    f"job {name!r} was triggered {len(recent)} times in the last minute; try again in {wait}s"
                )
                raise ControlError(429, "Too many triggers", detail, {"Retry-After": str(wait)})
            self._triggers[name] = [*recent, now]


def set_paused(manifest: Manifest, job: str, paused: bool) -> None:
    """Pause or resume a job's schedule. A resumed job's fires missed while it was paused count
    as fired now: a daemon's start (it may have been down all along) does not catch them up."""
    if not paused:
        manifest.named("fired_if_paused", job=job, at=datetime.now(UTC))
    manifest.named("pause" if paused else "unpause", job=job)


def run_json(row: dict[str, Any]) -> dict[str, Any]:
    """A run as the API shows it: its counters, parameters and where its report is."""
    keys = ("run_id", "job", "status", "started_at", "ended_at", "chunks_total", "chunks_done",
            "chunks_reused", "chunks_dead", "chunks_skipped", "bad_files", "rows_in", "rows_out", "bytes_out",
            "error", "peak_memory", "memory_limit")  # fmt: skip
    out = {key: row.get(key) for key in keys}
    out["params"] = json.loads(row["params"]) if row.get("params") else {}
    out["report"] = f"/runs/{row['run_id']}/report"
    return out


def key_of(config: Config, name: str, params: dict[str, str]) -> str | None:
    """The checkpoint a run of `name` with `params` is (None: the run will say what is wrong)."""
    try:
        return config.bound(name, params).key
    except ConfigError:
        return None


def fire_params(job: JobConfig, now: datetime) -> dict[str, str]:
    """A scheduled fire's parameters: the logical date of the interval that just ended."""
    if DATE not in job.params or not job.schedule:
        return {}
    from minibatch.schedule import parse_crontab

    return {DATE: logical_date(parse_crontab(job.schedule, job.timezone), now).isoformat()}


def record_refused(
    manifest: Manifest, run_id: str, key: str, params: dict[str, str], exc: ConfigError
) -> bool:
    """A run refused before it began (its job module broken since the last reload), recorded
    failed for history, the API and the alerts to see; False if it began (recorded crashed)."""
    log.error("run_refused", job=key, run_id=run_id, errors=exc.errors)
    if manifest.named("run_by_id", run_id=run_id):
        return False
    record = RunRecord.refused(run_id, key, params, "; ".join(exc.errors))
    manifest.start_run(record)
    manifest.commit(record, [])
    return True
