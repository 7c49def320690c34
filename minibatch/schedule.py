"""Crontab strings with the semantics cron users expect, on APScheduler 3's triggers.

APScheduler's CronTrigger differs from cron in three ways that this module corrects:
day-of-week 0 is Monday there (Sunday in cron); day-of-month and day-of-week are ANDed
(cron fires when either matches); and at a DST fall-back a time in the repeated hour fires
twice. Here fire times are computed on the local wall clock and then placed in the zone:
a wall time that occurs twice fires once (the first time), and one that a spring-forward
skips fires once, at the moment the clocks jump.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger

from minibatch.log import get_logger
from minibatch.signals import CANCELLED
from minibatch.states import RunStatus

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

log = get_logger()
SHORTCUTS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# cron counts Sunday as 0 (and 7); APScheduler counts Monday as 0, so days are passed by name.
DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
TICK = timedelta(microseconds=1)
LOOK_AHEAD = 100  # fire times looked at for a schedule's longest gap


class CronSchedule(BaseTrigger):
    """An APScheduler trigger for one crontab in one time zone."""

    def __init__(self, expr: str, timezone: str) -> None:
        self.expr = expr
        self.timezone = ZoneInfo(timezone)
        self._wall = _wall_triggers(expr)  # evaluated on naive wall-clock times (as UTC)

    def __str__(self) -> str:
        return f"cron[{self.expr}, {self.timezone.key}]"

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        start = previous_fire_time + TICK if previous_fire_time else now
        wall = start.astimezone(self.timezone).replace(tzinfo=None, fold=0)
        for _ in range(1000):  # a handful of steps at most; bounded for safety
            candidate = _next_wall(self._wall, wall)
            if candidate is None:
                return None
            fire = self._place(candidate)
            if fire >= start:
                return fire
            wall = candidate + TICK  # already passed (e.g. in a repeated hour): look further
        return None

    def _place(self, wall: datetime) -> datetime:
        """The instant a wall-clock time happens: the first of two, or the jump over a gap."""
        aware = wall.replace(tzinfo=self.timezone, fold=0)
        if aware.astimezone(UTC).astimezone(self.timezone).replace(tzinfo=None) == wall:
            return aware
        moment = wall.replace(tzinfo=self.timezone, fold=1).astimezone(UTC).replace(second=0, microsecond=0)
        while moment.astimezone(self.timezone).replace(tzinfo=None) <= wall:
            moment += timedelta(minutes=1)
        return moment.astimezone(self.timezone)


def _wall_triggers(expr: str) -> list[CronTrigger]:
    from apscheduler.triggers.cron import CronTrigger

    fields = SHORTCUTS.get(expr.strip().lower(), expr).split()
    if len(fields) != 5:
        raise ValueError(f"bad crontab {expr!r}: expected 5 fields (minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    try:
        days = [(day, _weekday_names(weekday))]
        if day != "*" and weekday != "*":
            days = [(day, "*"), ("*", _weekday_names(weekday))]
        return [
            CronTrigger(minute=minute, hour=hour, day=d, month=month, day_of_week=w, timezone=UTC)
            for d, w in days
        ]
    except ValueError as exc:
        raise ValueError(f"bad crontab {expr!r}: {exc}") from None


def _next_wall(triggers: list[CronTrigger], wall: datetime) -> datetime | None:
    now = wall.replace(tzinfo=UTC)
    fires = [f for t in triggers if (f := t.get_next_fire_time(None, now)) is not None]
    return min(fires).replace(tzinfo=None) if fires else None


def parse_crontab(expr: str, timezone: str) -> CronSchedule:
    """A trigger for a 5-field crontab or an @shortcut; ValueError naming the problem."""
    return CronSchedule(expr, timezone)


def _weekday_names(field: str) -> str:
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.lower().split(","):
        days.update(_weekday_item(item))
    return ",".join(DAY_NAMES[d] for d in sorted(days))


def _weekday_item(item: str) -> set[int]:
    span, _, step_text = item.partition("/")
    step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
    if step_text and step is None:
        raise ValueError(f"bad weekday step in {item!r}")
    if span == "*":
        first, last = 0, 6
    else:
        low, _, high = span.partition("-")
        first = _weekday_number(low)
        last = _weekday_number(high) if high else (6 if step else first)
    if first > last:
        raise ValueError(f"bad weekday range {item!r}")
    return {d % 7 for d in range(first, last + 1, step or 1)}


def _weekday_number(text: str) -> int:
    text = text.strip()
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text in DAY_NAMES:
        return DAY_NAMES.index(text)
    raise ValueError(f"bad weekday {text!r} (expected 0-7 or sun..sat)")


def next_fire_times(expr: str, timezone: str, count: int, now: datetime | None = None) -> list[datetime]:
    """The next `count` fire times of a crontab, in the job's timezone."""
    trigger = parse_crontab(expr, timezone)
    current = now or datetime.now(ZoneInfo(timezone))
    fires: list[datetime] = []
    previous = None
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, current)
        if fire is None:
            break
        fires.append(fire)
        previous = fire
    return fires


def fire_after(expr: str, timezone: str, last: datetime) -> datetime | None:
    """The first fire time after `last`, a recorded fire (which begins just after its fire time):
    the one a daemon that was down missed, or a dependency's that has not begun yet."""
    return parse_crontab(expr, timezone).get_next_fire_time(last, last)


def longest_gap(expr: str, timezone: str, now: datetime | None = None) -> float | None:
    """The longest gap between a schedule's next fire times, seconds (a weekday job: the
    weekend): what "overdue" means for alerts; None for a schedule that never fires."""
    fires = next_fire_times(expr, timezone, LOOK_AHEAD, now)
    gaps = [(b - a).total_seconds() for a, b in zip(fires, fires[1:], strict=False)]
    return max(gaps) if gaps else None


def log_skipped(event: Any) -> str | None:
    """APScheduler's own line for a fire it skipped names no job: say it as minibatch does.
    The job of a scheduled fire, else None."""
    from apscheduler.events import EVENT_JOB_MISSED

    kind, _, job = event.job_id.partition(":")
    if kind not in ("cron", "watch"):
        return None
    if event.code == EVENT_JOB_MISSED:
        log.info("missed_runs_skipped", job=job, missed_since=event.scheduled_run_time.isoformat())
    else:  # EVENT_JOB_MAX_INSTANCES: its run of an earlier fire goes on
        log.info("run_skipped", job=job, reason="already running")
    return job if kind == "cron" else None


def catch_up(
    manifest: Any, jobs: dict[str, Any], scheduler: Any, fire: Callable[..., Any], now: datetime | None = None
) -> None:
    """At the daemon's start: fire once each job that missed fire times while it was down, and
    each job whose latest run an earlier daemon (or its death) left unfinished (stopped by
    SIGTERM, crashed, or still `running` with no process), not waiting for its next fire (a day,
    for a daily job)."""
    now = now or datetime.now(UTC)
    last = manifest.last_fires()
    for name, job in ((n, j) for n, j in jobs.items() if j.schedule):
        if name not in last:
            manifest.record_fire(name, now)  # a baseline: nothing missed before now
            continue
        missed = fire_after(job.schedule, job.timezone, last[name])
        if missed is None or missed > now:
            continue
        if job.catchup == "once":
            log.info("catching_up", job=name, missed_since=missed.isoformat())
            scheduler.add_job(fire, args=[name, "catch-up"], id=f"{name}-catch-up", misfire_grace_time=None)
        else:
            log.info("missed_runs_skipped", job=name, missed_since=missed.isoformat())
            manifest.record_fire(name, now)
    queued = {job.id for job in scheduler.get_jobs()}
    done = [RunStatus.SUCCEEDED, RunStatus.FAILED]
    for row in manifest.named("unfinished_runs", done=done, cancelled=CANCELLED):
        job = jobs.get(row["job"])
        if job and (job.schedule or job.watch) and f"{job.name}-catch-up" not in queued:
            log.info("resuming", job=job.name, last_status=row["status"])
            scheduler.add_job(fire, args=[job.name, "resume"], misfire_grace_time=None)
