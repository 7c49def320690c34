"""The circuit breaker (minibatch/breaker.py), driven by an injected clock, and the retry
backoff (minibatch.execute.backoff) as a property."""

from __future__ import annotations

import os
import signal
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st

from minibatch.admission import BACKOFF_CAP, backoff
from minibatch.breaker import BreakerSettings, CircuitBreaker

from conftest import Project


def breaker(failures: int = 3, rate: float = 0.5, window: int = 10, cooldown: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker(BreakerSettings(failures=failures, rate=rate, window=window, cooldown=cooldown))


def opened(now: float = 100.0, cooldown: float = 30.0) -> CircuitBreaker:
    """A breaker opened at `now` by three consecutive failures."""
    b = breaker(failures=3, cooldown=cooldown)
    for _ in range(3):
        b.record(False, now)
    assert b.state == "open"
    return b


def test_opens_after_n_consecutive_failures() -> None:
    b = breaker(failures=3)
    b.record(False, 1.0)
    b.record(False, 2.0)
    assert b.state == "closed" and b.allow(2.0)
    b.record(False, 3.0)
    assert b.state == "open" and not b.tripped
    assert "3 consecutive" in b.reason
    assert b.open_until == 3.0 + 30.0
    assert not b.allow(3.0)


def test_a_success_resets_the_consecutive_count() -> None:
    b = breaker(failures=3, window=100)
    for now in range(30):
        b.record(now % 3 == 2, float(now))  # F F S F F S ...: never three in a row
    assert b.state == "closed" and b.allow(30.0)


def test_opens_on_the_failure_rate_over_a_full_window() -> None:
    b = breaker(failures=5, rate=0.5, window=10)
    outcomes = [True, False] * 5  # alternating: never two failures in a row, 5 of 10 failed
    for i, success in enumerate(outcomes[:-1]):
        b.record(success, float(i))
        assert b.state == "closed", f"opened after {i + 1} attempts: the window is not full yet"
    b.record(outcomes[-1], 9.0)
    assert b.consecutive == 1
    assert b.state == "open"
    assert "5 of the last 10" in b.reason


def test_failure_rate_below_threshold_stays_closed() -> None:
    b = breaker(failures=5, rate=0.5, window=10)
    for i in range(60):
        b.record(i % 3 != 0, float(i))  # one failure in three
    assert b.state == "closed" and b.allow(60.0)


def test_stays_closed_on_successes() -> None:
    b = breaker()
    for i in range(100):
        assert b.allow(float(i))
        b.record(True, float(i))
    assert b.state == "closed" and b.consecutive == 0


def test_open_refuses_until_the_cooldown_has_passed() -> None:
    b = opened(now=100.0, cooldown=30.0)
    for now in (100.0, 110.0, 129.999):
        assert not b.allow(now)
        assert b.state == "open"
    assert b.allow(130.0)
    assert b.state == "half_open"


def test_half_open_lets_exactly_one_probe_through() -> None:
    b = opened(now=100.0, cooldown=30.0)
    assert b.allow(131.0)
    assert not b.allow(131.0)
    assert not b.allow(500.0)  # however long it waits, one probe at a time


def test_probe_success_closes_the_breaker() -> None:
    b = opened(now=100.0, cooldown=30.0)
    assert b.allow(131.0)
    b.record(True, 132.0, probe=True)
    assert b.state == "closed" and not b.tripped
    assert b.allow(132.0) and b.allow(132.0)
    b.record(False, 133.0)  # the history before the probe is forgotten
    b.record(False, 134.0)
    assert b.state == "closed"
    b.record(False, 135.0)
    assert b.state == "open"


def test_probe_failure_trips_the_breaker() -> None:
    b = opened(now=100.0, cooldown=30.0)
    assert b.allow(131.0)
    b.record(False, 132.0, probe=True)
    assert b.tripped
    assert not b.allow(132.0) and not b.allow(10_000.0)
    b.record(True, 133.0, probe=True)  # nothing un-trips it
    assert b.tripped


def test_a_straggler_result_while_half_open_does_not_decide() -> None:
    b = opened(now=100.0, cooldown=30.0)
    assert b.allow(131.0)
    b.record(False, 131.5)  # a task admitted before the breaker opened, not the probe
    assert b.state == "half_open" and not b.tripped
    b.record(True, 132.0, probe=True)
    assert b.state == "closed"


def test_failures_zero_disables_the_breaker() -> None:
    b = breaker(failures=0, rate=0.1, window=2)
    assert not b.enabled
    for i in range(50):
        b.record(False, float(i))
        assert b.allow(float(i))
    assert b.state == "closed" and not b.tripped


# ---------------------------------------------------------------- backoff


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(1, 1000),
    base=st.floats(0, 3600, allow_nan=False),
    cap=st.floats(0, 3600, allow_nan=False),
)
def test_backoff_is_full_jitter_within_the_exponential_bound(attempt: int, base: float, cap: float) -> None:
    delay = backoff(attempt, base, cap)
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


@given(attempt=st.integers(1, 1000), base=st.floats(0, 3600, allow_nan=False))
def test_backoff_default_cap(attempt: int, base: float) -> None:
    assert 0 <= backoff(attempt, base) <= BACKOFF_CAP


def test_backoff_survives_a_very_high_attempt_number() -> None:
    assert 0 <= backoff(1100, 1.0) <= BACKOFF_CAP


# ---------------------------------------------------------------- the breaker inside a real run

PROBE_JOB = """
import os

def f(table, ctx):
    if os.path.basename(ctx.file) == "a.parquet":
        # rewrite b.parquet's mtime, so that b's chunk (the half-open probe) is refused as changed input
        b = os.path.join(os.path.dirname(ctx.file), "b.parquet")
        st = os.stat(b)
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        raise RuntimeError("boom")
    return table
"""


def test_run_finishes_when_the_half_open_probe_hits_changed_input(project: Project) -> None:
    (project.root / "myjobs" / "probe.py").write_text(PROBE_JOB)
    project.write_config(
        """
        [jobs.h]
        input = "data/*.parquet"
        output = "out/h"
        process = "myjobs.probe:f"
        workers = 1
        retries = 1
        retry_backoff = "2s"
        breaker_failures = 1
        breaker_cooldown = "1ms"
        """
    )
    for name in ("a", "b", "c"):
        project.write_input(f"{name}.parquet", 0, 10)
    run = project.start("run-now", "h", "--quiet")
    try:
        run.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        raise TimeoutError("run-now hung: the breaker never admitted another chunk") from None
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode in (0, 1)
