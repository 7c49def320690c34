"""Circuit breaker: when attempts keep failing, stop admitting chunks for a while.

closed -> (N consecutive failures, or a failure rate over a window) -> open for a cool-down
-> half-open: one chunk is let through; success closes the breaker, failure ends the run.
The clock is passed in, so tests drive it without sleeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from minibatch.states import Breaker


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 5  # consecutive failed attempts that open the breaker; 0 disables it
    rate: float = 0.5  # failure rate over the window that opens it
    window: int = 20  # attempts in the window
    cooldown: float = 30.0


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.state = Breaker.CLOSED
        self.reason = ""
        self.consecutive = 0
        self.recent: deque[bool] = deque(maxlen=max(settings.window, 1))
        self.open_until = 0.0
        self.probing = False

    @property
    def enabled(self) -> bool:
        return self.settings.failures > 0

    @property
    def tripped(self) -> bool:
        """Failed again after the cool-down: the run should end."""
        return self.state == Breaker.TRIPPED

    def allow(self, now: float) -> bool:
        """May a chunk be admitted now? In half-open state, exactly one."""
        if self.state == Breaker.OPEN and now >= self.open_until:
            self.state = Breaker.HALF_OPEN
        if self.state == Breaker.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return self.state == Breaker.CLOSED

    def record(self, success: bool, now: float, probe: bool = False) -> None:
        """An attempt's outcome; `probe` marks the one let through in half-open state."""
        if not self.enabled or self.state == Breaker.TRIPPED:
            return
        self.recent.append(success)
        self.consecutive = 0 if success else self.consecutive + 1
        if self.state == Breaker.HALF_OPEN and probe:
            self._after_probe(success)
        elif self.state == Breaker.CLOSED and not success and self._should_open():
            self.state = Breaker.OPEN
            self.open_until = now + self.settings.cooldown

    def cancel_probe(self) -> None:
        """The trial chunk ended without an outcome (lost with its worker, input changed)."""
        self.probing = False

    def _after_probe(self, success: bool) -> None:
        self.probing = False
        if success:
            self.state, self.consecutive = Breaker.CLOSED, 0
            self.recent.clear()
        else:
            self.state = Breaker.TRIPPED

    def _should_open(self) -> bool:
        s = self.settings
        if self.consecutive >= s.failures:
            self.reason = f"{self.consecutive} consecutive failed attempts"
            return True
        failed = self.recent.count(False)
        if len(self.recent) >= s.window and failed / len(self.recent) >= s.rate:
            self.reason = f"{failed} of the last {len(self.recent)} attempts failed"
            return True
        return False
