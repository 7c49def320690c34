"""Crontab strings with the semantics cron users expect, on top of APScheduler 3's CronTrigger."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

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


def parse_crontab(expr: str, timezone: str) -> BaseTrigger:
    """A trigger for a 5-field crontab or an @shortcut; ValueError naming the problem.

    As in cron, when both day-of-month and day-of-week are restricted a day matching either
    fires (APScheduler alone would require both).
    """
    from apscheduler.triggers.combining import OrTrigger
    from apscheduler.triggers.cron import CronTrigger

    fields = SHORTCUTS.get(expr.strip().lower(), expr).split()
    if len(fields) != 5:
        raise ValueError(f"bad crontab {expr!r}: expected 5 fields (minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    try:
        days = [(day, _weekday_names(weekday))]
        if day != "*" and weekday != "*":
            days = [(day, "*"), ("*", _weekday_names(weekday))]
        triggers = [
            CronTrigger(minute=minute, hour=hour, day=d, month=month, day_of_week=w, timezone=timezone)
            for d, w in days
        ]
    except ValueError as exc:
        raise ValueError(f"bad crontab {expr!r}: {exc}") from None
    return triggers[0] if len(triggers) == 1 else OrTrigger(triggers)


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
        previous, current = fire, fire + timedelta(microseconds=1)
    return fires
