"""`depends_on`: whether a fire's dependencies are met, for the daemon.

A dependency is met by a success the job has not yet finished a run over (a dated one: by
its success for the same date), and never while it runs or is about to: its `running` row
comes a moment after its fire, and two jobs fired in the same minute start in any order.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from minibatch.config import Config, ConfigError, JobConfig
from minibatch.lock import keys_of, lock_held
from minibatch.manifest import Manifest
from minibatch.params import DATE
from minibatch.schedule import fire_after
from minibatch.states import RunStatus

FIRE_LATENCY = timedelta(minutes=1)  # a fire time to its fire beginning, at most (threads free)


def unmet_dependencies(
    config: Config, manifest: Manifest, job: JobConfig, params: dict[str, str], busy: set[str] | None = None
) -> list[str]:
    """The dependencies not met for this fire (see the module's doc); `busy` are running or
    about to (`busy_dependencies`)."""
    day = params.get(DATE)
    dated = [d for d in job.depends_on if day and d in config.jobs and DATE in config.jobs[d].params]
    plain = [d for d in job.depends_on if d not in dated]
    finished = [RunStatus.SUCCEEDED, RunStatus.FAILED]  # a stopped run resumes on what it began with
    rows = manifest.named(
        "unmet_dependencies", job=job.name, deps=plain, succeeded=RunStatus.SUCCEEDED, finished=finished
    ) if plain else []  # fmt: skip
    missing = [row["dep"] for row in rows if not row["ok"]]
    for dep in dated:
        try:
            key = config.bound(dep, {DATE: str(day)}).key
        except ConfigError:  # another parameter without a default (a reload): never met
            missing.append(dep)
            continue
        if not manifest.named("succeeded_run", key=key, succeeded=RunStatus.SUCCEEDED):
            missing.append(dep)
    return [d for d in job.depends_on if d in missing or d in (busy or set())]


def busy_dependencies(
    config: Config, manifest: Manifest, job: JobConfig, running: Callable[[], set[str]], now: datetime
) -> set[str]:
    """`job`'s dependencies that run now or are about to: whose scheduled fire has come but not
    begun, which `running()` names (in flight in the daemon), or which hold their job lock (or
    one of their parameter sets does: `run-now D --param ...` elsewhere)."""
    deps = [d for d in job.depends_on if d in config.jobs]
    last = manifest.last_fires()  # before running(): a fire counts as running before it is recorded
    busy = {d for d in deps if _due(config.jobs[d], last.get(d), now)}
    in_flight = running()
    state_dir = config.engine.state_dir
    held = {d for d in deps if any(lock_held(state_dir, key) for key in keys_of(state_dir, d))}
    return busy | held | {d for d in deps if d in in_flight}


def _due(job: JobConfig, last_fire: datetime | None, now: datetime) -> bool:
    """A fire time has come and gone unrecorded within FIRE_LATENCY: APScheduler is starting it.
    Later than that it was skipped (the run of an earlier fire went on, the daemon was
    suspended) or belongs to an older schedule: waiting for it would wait for the next one."""
    if not job.schedule or last_fire is None:
        return False
    due = fire_after(job.schedule, job.timezone, last_fire)
    return due is not None and timedelta(0) <= now - due < FIRE_LATENCY
