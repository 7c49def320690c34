"""Crontab semantics against known fire-time sequences, DST transitions included."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minibatch.schedule import next_fire_times

BERLIN = ZoneInfo("Europe/Berlin")
NY = ZoneInfo("America/New_York")


def fires(expr: str, tz: ZoneInfo, start: datetime, n: int) -> list[str]:
    return [f.isoformat() for f in next_fire_times(expr, tz.key, n, now=start)]


CASES = [
    # spring forward in Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST
    ("30 2 * * *", BERLIN, datetime(2026, 3, 29, 0, 0, tzinfo=BERLIN),
     ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    ("0 * * * *", BERLIN, datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN),
     ["2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]),
    ("*/30 1-3 * * *", BERLIN, datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN),
     ["2026-03-29T01:00:00+01:00", "2026-03-29T01:30:00+01:00", "2026-03-29T03:00:00+02:00",
      "2026-03-29T03:30:00+02:00"]),
    # fall back in Berlin, 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:xx happens twice
    ("30 2 * * *", BERLIN, datetime(2026, 10, 25, 0, 0, tzinfo=BERLIN),
     ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]),
    ("0 * * * *", BERLIN, datetime(2026, 10, 25, 0, 30, tzinfo=BERLIN),
     ["2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00"]),
    # New York, 2026-11-01 fall back at 02:00 EDT -> 01:00 EST
    ("30 1 * * *", NY, datetime(2026, 11, 1, 0, 0, tzinfo=NY),
     ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
    # weekday 0 and 7 are Sunday; 2026-11-28 is a Saturday
    ("0 2 * * 0", ZoneInfo("UTC"), datetime(2026, 11, 28, tzinfo=ZoneInfo("UTC")),
     ["2026-11-29T02:00:00+00:00", "2026-12-06T02:00:00+00:00"]),
    ("0 2 * * 7", ZoneInfo("UTC"), datetime(2026, 11, 28, tzinfo=ZoneInfo("UTC")),
     ["2026-11-29T02:00:00+00:00", "2026-12-06T02:00:00+00:00"]),
    ("0 9 * * mon-fri", ZoneInfo("UTC"), datetime(2026, 11, 27, 10, tzinfo=ZoneInfo("UTC")),
     ["2026-11-30T09:00:00+00:00", "2026-12-01T09:00:00+00:00"]),
    ("0 9 * * 5-7", ZoneInfo("UTC"), datetime(2026, 11, 26, 10, tzinfo=ZoneInfo("UTC")),
     ["2026-11-27T09:00:00+00:00", "2026-11-28T09:00:00+00:00", "2026-11-29T09:00:00+00:00",
      "2026-12-04T09:00:00+00:00"]),
    # day-of-month OR day-of-week, as in cron: the 1st, and every Monday
    ("0 0 1 * 1", ZoneInfo("UTC"), datetime(2026, 11, 28, tzinfo=ZoneInfo("UTC")),
     ["2026-11-30T00:00:00+00:00", "2026-12-01T00:00:00+00:00", "2026-12-07T00:00:00+00:00"]),
    ("15,45 */6 * jan,feb *", ZoneInfo("UTC"), datetime(2026, 12, 31, 23, tzinfo=ZoneInfo("UTC")),
     ["2027-01-01T00:15:00+00:00", "2027-01-01T00:45:00+00:00", "2027-01-01T06:15:00+00:00"]),
    ("@weekly", ZoneInfo("UTC"), datetime(2026, 11, 28, tzinfo=ZoneInfo("UTC")),
     ["2026-11-29T00:00:00+00:00", "2026-12-06T00:00:00+00:00"]),
    ("@hourly", ZoneInfo("UTC"), datetime(2026, 11, 28, 10, 5, tzinfo=ZoneInfo("UTC")),
     ["2026-11-28T11:00:00+00:00", "2026-11-28T12:00:00+00:00"]),
    ("@monthly", BERLIN, datetime(2026, 11, 28, tzinfo=BERLIN),
     ["2026-12-01T00:00:00+01:00", "2027-01-01T00:00:00+01:00"]),
]  # fmt: skip


@pytest.mark.parametrize(("expr", "tz", "start", "expected"), CASES, ids=[c[0] for c in CASES])
def test_known_fire_times(expr: str, tz: ZoneInfo, start: datetime, expected: list[str]) -> None:
    assert fires(expr, tz, start, len(expected)) == expected


@settings(max_examples=60, deadline=None)
@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Sydney", "UTC"]),
    day=st.integers(0, 364),
)
def test_daily_job_fires_once_per_local_day_across_the_year(
    minute: int, hour: int, zone: str, day: int
) -> None:
    """Whatever DST does, a daily job fires exactly once on each local date, strictly later each time."""
    tz = ZoneInfo(zone)
    start = datetime(2026, 1, 1, tzinfo=tz) + timedelta(days=day)
    times = next_fire_times(f"{minute} {hour} * * *", zone, 5, now=start)
    dates = [t.astimezone(tz).date() for t in times]
    assert len(set(dates)) == 5
    assert all(a < b for a, b in zip(times, times[1:], strict=False))
    assert all((b - a).total_seconds() <= 25 * 3600 for a, b in zip(times, times[1:], strict=False))


def test_a_fire_apscheduler_skips_is_logged_with_its_job() -> None:
    """Hostile review: a fire skipped because the job's run of the last one went on, or missed
    after a suspend, was logged by APScheduler alone, naming no job."""
    import threading

    import structlog
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
    from apscheduler.schedulers.background import BackgroundScheduler

    from minibatch.schedule import log_skipped

    release = threading.Event()
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_listener(log_skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
    with structlog.testing.capture_logs() as logs:
        scheduler.add_job(release.wait, "interval", seconds=0.05, id="cron:busy", max_instances=1)
        past = datetime.now(ZoneInfo("UTC")) - timedelta(seconds=30)
        scheduler.add_job(print, "date", run_date=past, id="cron:late", misfire_grace_time=1)
        scheduler.start()
        try:
            deadline = datetime.now() + timedelta(seconds=10)
            while not {"run_skipped", "missed_runs_skipped"} <= {e["event"] for e in logs}:
                assert datetime.now() < deadline, logs
                release.wait(0.02)
        finally:
            release.set()
            scheduler.shutdown(wait=True)
    said = {(e["event"], e.get("job")) for e in logs}
    assert {("run_skipped", "busy"), ("missed_runs_skipped", "late")} <= said
