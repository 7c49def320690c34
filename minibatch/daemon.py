"""`minibatch daemon`: APScheduler fires jobs on their crontabs; systemd supervises it.

Runs go through `run_job`, the same path as `run-now` (the job lock included), in APScheduler's thread
pool. The scheduler's own loop sends the systemd watchdog pings, so a stuck scheduler gets the service
restarted. The main thread only waits for signals: SIGHUP reloads config.toml, SIGTERM/SIGINT stop
gracefully (twice: at once); it stops too when its state_dir is gone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from minibatch.config import Config, ConfigError, JobConfig
from minibatch.control import Active, ActiveRuns, Control, RunEnded, fire_params, key_of, record_refused
from minibatch.depends import busy_dependencies, unmet_dependencies
from minibatch.inputs import input_signature
from minibatch.lock import DAEMON_LOCK, JobLocked, job_lock, lock_held, lock_identity, lock_moved
from minibatch.log import get_logger
from minibatch.manifest import Manifest, manifest_path
from minibatch.metrics import Metrics
from minibatch.notify import Notifier, status_line
from minibatch.reconcile import inputs_read
from minibatch.records import new_run_id
from minibatch.runner import RunOptions, run_job
from minibatch.schedule import catch_up, log_skipped, longest_gap, parse_crontab
from minibatch.signals import CANCELLED, StopSignals
from minibatch.states import RunStatus
from minibatch.validate import reload_config

log = get_logger()
WATCH_REASON = "inputs changed"
METRICS_REFRESH = 30.0  # seconds between re-reads of dead letters and last successes


class Daemon:
    def __init__(self, config: Config, config_path: str | None, notifier: Notifier | None = None):
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier.from_env()
        self.metrics = Metrics()
        self.manifest = Manifest(manifest_path(config.engine.state_dir))
        self.wake = threading.Event()
        self.active = ActiveRuns(self.wake.set)  # run and backfill id -> its job and stop handle
        self.control = Control(self)
        self.api: Any = None  # api.ApiServer
        self.waiting: dict[tuple[str, str], dict[str, str]] = {}  # fires waiting for dependencies
        self.firing: Counter[str] = Counter()  # jobs whose fire (and its run) is under way
        self.lock = threading.Lock()
        self.pending_signals: list[int] = []
        self.stopping = False
        self.scheduler: Any = None
        self.seen_inputs: dict[str, tuple[Any, Any]] = {}  # job -> (fired on, last seen) signatures
        self.lock_file = lock_identity(config.engine.state_dir, DAEMON_LOCK)  # held by run_daemon

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self._install_signals()  # first: `docker stop` right after the metrics answer is a clean stop
        self.metrics.load_state(self.manifest.status())
        if addr := self.config.engine.metrics_addr:
            try:
                self.metrics.serve(addr)
            except OSError as exc:
                raise ConfigError([f"minibatch.metrics_addr: cannot listen on {addr}: {exc}"]) from None
        self._serve_api()
        workers = max(32, 4 * len(self.config.jobs))  # runs wait for worker slots in these threads
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(workers), "watchdog": ThreadPoolExecutor(1)},
        )
        self.scheduler.add_listener(self.skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self._schedule_jobs()
        self.restore_waiting()
        catch_up(self.manifest, self.config.jobs, self.scheduler, self.fire)
        self.submit(self._release_waiting)  # the fires it left whose dependencies are met: now
        self.scheduler.add_job(  # runs and retries from the shell change these too
            self._refresh_metrics, "interval", seconds=METRICS_REFRESH, id="minibatch-metrics",
            executor="watchdog", args=[True],
        )  # fmt: skip
        if self.notifier.watchdog_interval:
            self.scheduler.add_job(
                self._watchdog, "interval", seconds=self.notifier.watchdog_interval,
                id="minibatch-watchdog", executor="watchdog",
            )  # fmt: skip
        self.scheduler.start()
        self.notifier.ready(status_line(self.active, self.scheduler))
        self.notifier.watchdog()
        watched = sorted(name for name, job in self.config.jobs.items() if job.watch)
        log.info("daemon_started", jobs=sorted(self._scheduled()), watched=watched, pid=os.getpid())
        return self._wait_for_signals()

    def _wait_for_signals(self) -> int:
        stopping = gone = 0
        while True:
            self.wake.wait(timeout=60)
            self.wake.clear()
            with self.lock:
                received, self.pending_signals = self.pending_signals, []
            if not gone and (gone := lock_moved(self.config.engine.state_dir, DAEMON_LOCK, self.lock_file)):
                log.error("state_dir_gone", state_dir=str(self.config.engine.state_dir), error="stopping")
                received.append(signal.SIGTERM)  # systemd starts a daemon anew, on a new state_dir
            for signum in received:
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    stopping += 1
                    self._stop(immediate=stopping > 1)
            if stopping and not any(a.started for _, a in self.active.items()):  # queued ones never start
                self.scheduler.shutdown(wait=False)
                if self.api is not None:
                    self.api.stop()
                log.info("daemon_stopped")
                return 1 if gone else 0

    def _install_signals(self) -> None:
        def handle(signum: int, frame: object) -> None:
            self.pending_signals.append(signum)
            self.wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, handle)

    def _stop(self, immediate: bool) -> None:
        with self.lock:
            self.stopping = True
        self.notifier.stopping()
        log.warning(
            "daemon_stopping", immediate=immediate, running=sorted(a.job for _, a in self.active.items())
        )
        self.scheduler.pause()
        for _, active in self.active.items():
            active.stop.request()
            if immediate:
                active.stop.request()

    def reload(self) -> None:
        """SIGHUP: load config.toml again; an invalid one is logged and the old one kept."""
        self.notifier.reloading()
        try:
            config = reload_config(self.config_path, self.config.engine.state_dir)
        except ConfigError as exc:
            log.error("reload_rejected", errors=exc.errors)
            self.notifier.ready(status_line(self.active, self.scheduler))
            return
        self.config = config
        self._schedule_jobs()
        log.info("config_reloaded", jobs=sorted(self._scheduled()))
        self.notifier.ready(status_line(self.active, self.scheduler))

    # -- scheduling -------------------------------------------------------------------------

    def _scheduled(self) -> dict[str, Any]:
        return {name: job for name, job in self.config.jobs.items() if job.schedule}

    def _schedule_jobs(self) -> None:
        for existing in self.scheduler.get_jobs():  # one-off runs (catch-up, dependencies met) stay
            if existing.id.startswith(("cron:", "watch:")):
                existing.remove()
        intervals = {name: longest_gap(job.schedule, job.timezone) for name, job in self._scheduled().items()}
        self.metrics.set_jobs(self.config.jobs, {n: i for n, i in intervals.items() if i is not None})
        for name, job in self._scheduled().items():
            self.scheduler.add_job(
                self.fire, parse_crontab(job.schedule, job.timezone), args=[name], id=f"cron:{name}",
                coalesce=True, max_instances=1,
                misfire_grace_time=None if job.catchup == "once" else 1,
            )  # fmt: skip
        for name, job in self.config.jobs.items():
            if job.watch:
                if name not in self.seen_inputs:  # from what its runs read: what came while none ran fires
                    read = inputs_read(self.manifest, key_of(self.config, name, {}))
                    self.seen_inputs[name] = (read, input_signature(self.config.base_dir, job.inputs))
                self.scheduler.add_job(
                    self._watch, "interval", seconds=job.watch, args=[name], id=f"watch:{name}",
                    coalesce=True, max_instances=1,
                )  # fmt: skip

    def _watch(self, name: str) -> None:
        """Fire `name` when its input files changed and then stayed the same for one interval."""
        job = self.config.jobs.get(name)
        if job is None or self._running(name):
            return
        signature = input_signature(self.config.base_dir, job.inputs)
        fired_on, last_seen = self.seen_inputs.get(name, (signature, signature))
        self.seen_inputs[name] = (fired_on, signature)
        settled = set(signature) != set(fired_on) and signature == last_seen  # changed, then the same a while
        if settled and self.fire(name, WATCH_REASON):  # not when a run elsewhere held the lock: again
            self.seen_inputs[name] = (signature, signature)

    def restore_waiting(self) -> None:
        """Wait on with the fires an earlier daemon left waiting for their dependencies."""
        for row in self.manifest.named("waiting_fires"):
            log.info("still_waiting", job=row["job"], **json.loads(row["params"]))
            self.waiting[(row["job"], row["params"])] = json.loads(row["params"])

    def fire(self, name: str, reason: str = "schedule", now: datetime | None = None) -> bool:
        """Run `name` now, or make it wait for its dependencies; False if a run elsewhere held its lock."""
        job = self.config.jobs.get(name)
        if job is None:
            return True
        with self.lock:  # before the fire is recorded: a dependent's check reads them in that order
            self.firing[name] += 1
        try:
            return self._fire(job, reason, now or datetime.now(UTC))
        finally:
            with self.lock:
                self.firing[name] -= 1
            self._release_waiting()

    def _fire(self, job: JobConfig, reason: str, now: datetime) -> bool:
        if reason != WATCH_REASON:  # catch-up follows the schedule's fire times only
            self.manifest.record_fire(job.name, now)
        if job.name in self.control.paused():
            log.info("run_skipped_paused", job=job.name, reason=reason)
            return True
        params = fire_params(job, now)  # the logical date is the fire's, not the run's
        missing = self._unmet(job, params, now)
        if not (missing or params):  # the job's next fire (or a restart's resume) runs all it missed
            return self.run_in_daemon(job.name, reason, RunOptions(params=params))
        # A date is kept until its run ends (waiting for dependencies, for worker slots, running):
        # its next fire is another date, so a restart after a death here runs or resumes it.
        fired = json.dumps(params, sort_keys=True)
        self.manifest.named("wait_fire", job=job.name, params=fired, at=now)
        if not missing:
            return self.run_in_daemon(job.name, reason, RunOptions(params=params), waited=fired)
        with self.lock:  # each parameter set (each date) waits on its own
            self.waiting[(job.name, fired)] = params
        log.info("waiting_for_dependencies", job=job.name, waiting_for=missing, **params)
        return True

    def skipped(self, event: Any) -> None:
        """A fire APScheduler skipped: said, and recorded as fired (no dependent waits for it)."""
        if job := log_skipped(event):
            self.manifest.record_fire(job, datetime.now(UTC))
            self._release_waiting()

    def _unmet(self, job: JobConfig, params: dict[str, str], now: datetime | None = None) -> list[str]:
        def running() -> set[str]:  # under way, or fired and waiting for dependencies of its own
            with self.lock:
                firing = set(+self.firing) | {name for name, _ in self.waiting}
            return firing | {active.job for _, active in self.active.items()}

        busy = busy_dependencies(self.config, self.manifest, job, running, now or datetime.now(UTC))
        return unmet_dependencies(self.config, self.manifest, job, params, busy)

    def run_in_daemon(
        self, name: str, reason: str, options: RunOptions | None = None, waited: str | None = None
    ) -> bool:
        """One run in this thread (the scheduler's pool): fired, triggered over HTTP, or released
        from waiting (`waited`, a fire kept in the manifest: it waits on if it cannot start, and
        is kept until its run ends, unless the daemon's stop stopped it)."""
        options = options or RunOptions()
        options.run_id, options.stop = options.run_id or new_run_id(), options.stop or StopSignals()
        if waited is not None and not self._still_met(name, waited, options.params):
            return True
        with self.lock:  # the same parameter set (a key) runs once; its lock says so across processes
            key = key_of(self.config, name, options.params)
            running = key and self.active.running(key, but=options.run_id)
            if self.stopping or running:
                why = "stopping" if self.stopping else "already running"
                log.info("run_skipped", job=name, run_id=options.run_id, reason=why)
                self.active.remove(options.run_id)
                if waited is not None:  # its row is still in the manifest: a restart keeps it too
                    self.waiting[(name, waited)] = options.params
                return True
            active = Active(name, options.stop, key=key, started=True, params=options.params)
            self.active.add(options.run_id, active)
        done = True  # the fire is over: a restart does not run it again
        try:
            log.info("run_fired", job=name, reason=reason, run_id=options.run_id)
            listeners = [self.metrics, RunEnded(self.active, options.run_id)]
            summary = run_job(self.config, name, options, listeners)
            done = not (summary.stopped and self.stopping and options.stop.last != CANCELLED)  # else resumed
        except JobLocked as exc:
            log.warning("run_skipped_locked", job=name, run_id=options.run_id, holder_pid=exc.pid)
            done = False
            if waited is not None:  # a run elsewhere holds the lock: waits on for it to end
                with self.lock:
                    self.waiting[(name, waited)] = options.params
            return False
        except ConfigError as exc:  # refused before it began: a job module broken since the reload
            if record_refused(self.manifest, options.run_id, key or name, options.params, exc):
                self.metrics.runs.labels(name, RunStatus.FAILED).inc()
        except Exception:  # a broken run must not take the daemon down
            log.exception("run_crashed", job=name)
        finally:
            if waited is not None and done:
                with contextlib.suppress(Exception):  # (left in the manifest, a restart runs it again)
                    self.manifest.named("unwait_fire", job=name, params=waited)
            self.active.remove(options.run_id)  # (wakes a stopping daemon's wait)
            self._refresh_metrics()
            self._release_waiting()
        return True

    def _release_waiting(self) -> None:
        """Start the waiting fires now met, drop a paused or removed job's; none while stopping."""
        with self.lock:
            waiting = sorted(self.waiting.items())
        paused = self.control.paused() if waiting else set()
        for (name, fired), params in waiting:
            job = self.config.jobs.get(name)
            try:
                if self.stopping or (
                    job and name not in paused and (self._own_run(name, params) or self._unmet(job, params))
                ):
                    continue
            except Exception as exc:  # this one cannot be checked now (a reload): the others can
                log.warning("waiting_check_failed", job=name, error=str(exc), **params)
                continue
            with self.lock:
                if self.waiting.pop((name, fired), None) is None:  # another thread released it
                    continue
                if job is not None and name not in paused:  # under way from now: a dependent waits
                    self.firing[name] += 1
            if job is None or name in paused:
                self.manifest.named("unwait_fire", job=name, params=fired)
                event = "run_skipped_paused" if job else "run_skipped"
                log.info(event, job=name, reason="dependencies met", **params)
            else:
                self.submit(self._released, name, fired, params)

    def _still_met(self, name: str, fired: str, params: dict[str, str]) -> bool:
        """A released fire about to start: still met (else, or if unknown now, it waits on)."""
        job = self.config.jobs.get(name)
        try:
            if job is None or not self._unmet(job, params):
                return True
        except Exception as exc:
            log.warning("waiting_check_failed", job=name, error=str(exc), **params)
        with self.lock:
            self.waiting[(name, fired)] = params
        return False

    def _own_run(self, name: str, params: dict[str, str]) -> bool:
        """A run of this parameter set goes on, here or elsewhere: its end releases the fire."""
        key = key_of(self.config, name, params)
        if key is None:
            return False
        return self.active.running(key) or lock_held(self.config.engine.state_dir, key)

    def _released(self, name: str, fired: str, params: dict[str, str]) -> None:
        try:
            self.run_in_daemon(name, "dependencies met", RunOptions(params=params), waited=fired)
        finally:
            with self.lock:
                self.firing[name] -= 1
            self._release_waiting()

    def _refresh_metrics(self, release: bool = False) -> None:
        try:
            self.metrics.load_state(self.manifest.status())
            if release:  # dependencies met by no run here: one in a shell, a reload, a restart
                self._release_waiting()
        except Exception as exc:  # busy or unreadable now: the next refresh tries again
            log.warning("metrics_refresh_failed", error=str(exc))

    def _watchdog(self) -> None:
        self.notifier.watchdog()
        self.notifier.status(status_line(self.active, self.scheduler))

    def _running(self, name: str) -> bool:
        return any(active.job == name and active.kind == "run" for _, active in self.active.items())

    # -- what the HTTP API (control.py) uses -------------------------------------------------------

    def submit(self, target: Callable[..., object], *args: Any) -> None:
        """Run `target` in the scheduler's pool as soon as a thread is free, however late."""
        self.scheduler.add_job(target, args=list(args), misfire_grace_time=None)

    def next_fire(self, job: str) -> datetime | None:
        found = self.scheduler.get_job(f"cron:{job}") if self.scheduler else None
        return getattr(found, "next_run_time", None)  # none before the scheduler starts

    def _serve_api(self) -> None:
        if not self.config.engine.api_addr:
            return
        try:
            from minibatch.api import serve_api
        except ImportError as exc:  # the `api` extra is not installed
            log.warning("api_off", reason=f"{exc.name} is not installed (pip install 'minibatch[api]')")
            return
        self.api = serve_api(self.config.engine, self.control)


def run_daemon(config: Config, config_path: str | None) -> int:
    """Schedule until SIGTERM; `config_path` is read again on SIGHUP. Returns the exit status.
    One daemon per state_dir: two would fire every job twice (JobLocked: exit 3)."""
    with job_lock(config.engine.state_dir, DAEMON_LOCK):
        return Daemon(config, config_path).run()
