"""Progress of a run: bars on a terminal, a log line every few seconds elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any

from minibatch.events import Event, Listener
from minibatch.log import get_logger
from minibatch.units import format_size

LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


class _Counts:
    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.dead = 0
        self.retried = 0
        self.rows = 0
        self.bytes = 0
        self.in_flight = 0
        self.budget = 0
        self.started = time.monotonic()

    def eta(self) -> float | None:
        """Seconds left at the rate so far, once something has finished."""
        finished = self.done + self.dead
        if not finished or not self.total:
            return None
        return (time.monotonic() - self.started) / finished * (self.total - finished)


class _Counting(Listener):
    """Keeps the counts the displays show."""

    def __init__(self) -> None:
        self.counts = _Counts()

    def on_any(self, event: Event) -> None:
        self.counts.in_flight = event.data.get("in_flight", self.counts.in_flight)

    def run_started(self, event: Event) -> None:
        self.counts.budget = event.data.get("memory_limit", 0)

    def run_planned(self, event: Event) -> None:
        self.counts.total = event.data["todo"]

    def chunk_done(self, event: Event) -> None:
        self.counts.done += 1
        self.counts.rows += event.data.get("rows", 0)
        self.counts.bytes += event.data.get("bytes_in", 0)

    def chunk_dead(self, event: Event) -> None:
        self.counts.dead += 1

    def chunk_retry(self, event: Event) -> None:
        self.counts.retried += 1


class LogProgress(_Counting):
    """For systemd, pipes and CI: no bars, a `progress` line every few seconds."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        super().__init__()
        self.every = every
        self.last = time.monotonic()

    def chunk_started(self, event: Event) -> None:
        self._tick(event)

    def chunk_done(self, event: Event) -> None:
        super().chunk_done(event)
        self._tick(event)

    def chunk_retry(self, event: Event) -> None:
        super().chunk_retry(event)
        self._tick(event)

    def chunk_dead(self, event: Event) -> None:
        super().chunk_dead(event)
        self._tick(event)

    def _tick(self, event: Event) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        c = self.counts
        elapsed = max(now - c.started, 1e-9)
        eta = c.eta()
        get_logger(job=event.job, run_id=event.run_id).info(
            "progress", done=c.done, total=c.total, dead=c.dead, retried=c.retried,
            rows_per_s=round(c.rows / elapsed), mb_per_s=round(c.bytes / elapsed / 1e6, 1),
            in_flight=format_size(c.in_flight), budget=format_size(c.budget),
            eta_s=None if eta is None else round(eta),
        )  # fmt: skip


class BarProgress(_Counting):
    """A rich progress bar on the terminal (stderr)."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().__init__()
        # What matters most comes first: at 80 columns the rates are what gets cut, not the
        # total or the time left.
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            console=console or Console(stderr=True),
            transient=True,
        )
        self.progress.console.soft_wrap = True  # log lines routed above the bar stay whole (JSON)
        self.task: Any = None
        self.job = ""

    def run_planned(self, event: Event) -> None:
        super().run_planned(event)
        self.job = event.job
        if event.data["todo"]:
            self.progress.start()
            self.task = self.progress.add_task(event.job, total=self.counts.total, rate="")

    def chunk_started(self, event: Event) -> None:
        self._update()

    def chunk_done(self, event: Event) -> None:
        super().chunk_done(event)
        self._update()

    def chunk_retry(self, event: Event) -> None:
        super().chunk_retry(event)
        self._update()

    def chunk_dead(self, event: Event) -> None:
        super().chunk_dead(event)
        self._update()

    def reduce_done(self, event: Event) -> None:
        self._stop()

    def run_finished(self, event: Event) -> None:
        self._stop()

    def _update(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.counts.done + self.counts.dead, rate=self._rate())

    def _stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None

    def _rate(self) -> str:
        """Rates, dead letters and memory in flight, in what room the line has left: the total
        and the time left come first and are never cut (an 80-column terminal)."""
        c = self.counts
        elapsed = max(time.monotonic() - c.started, 1e-9)
        parts = [f"{c.dead} dead" if c.dead else "", f"{c.retried} retried" if c.retried else ""]
        parts += [f"{c.rows / elapsed:,.0f} rows/s", f"{format_size(c.bytes / elapsed)}/s"]
        parts += [f"in flight {format_size(c.in_flight)}/{format_size(c.budget)}"]
        room = self.progress.console.width - len(self.job) - 52  # bar, counts and times take 52
        text = ""
        for part in filter(None, parts):
            if len(text) + len(part) + 1 <= room:
                text = f"{text} {part}".strip()
        return text


def progress_listener(quiet: bool = False) -> Listener | None:
    if quiet:
        return None
    return BarProgress() if sys.stderr.isatty() else LogProgress()
