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
        self.failed = 0
        self.retried = 0
        self.rows = 0
        self.bytes = 0
        self.in_flight = 0
        self.budget = 0
        self.started = time.monotonic()

    def update(self, event: Event) -> None:
        data = event.data
        self.in_flight = data.get("in_flight", self.in_flight)
        if event.name == "run_started":
            self.budget = data.get("memory_limit", 0)
        elif event.name == "run_planned":
            self.total = data["todo"]
        elif event.name == "chunk_done":
            self.done += 1
            self.rows += data.get("rows", 0)
            self.bytes += data.get("bytes_in", 0)
        elif event.name == "chunk_dead":
            self.failed += 1
        elif event.name == "chunk_retry":
            self.retried += 1

    def eta(self) -> float | None:
        """Seconds left at the rate so far, once something has finished."""
        finished = self.done + self.failed
        if not finished or not self.total:
            return None
        return (time.monotonic() - self.started) / finished * (self.total - finished)


class LogProgress(Listener):
    """For systemd, pipes and CI: no bars, a `progress` line every few seconds."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.counts = _Counts()
        self.every = every
        self.last = time.monotonic()

    def on_event(self, event: Event) -> None:
        self.counts.update(event)
        now = time.monotonic()
        if event.name.startswith("chunk_") and now - self.last >= self.every:
            self.last = now
            c = self.counts
            elapsed = max(now - c.started, 1e-9)
            eta = c.eta()
            get_logger(job=event.job, run_id=event.run_id).info(
                "progress",
                done=c.done,
                total=c.total,
                dead=c.failed,
                retried=c.retried,
                rows_per_s=round(c.rows / elapsed),
                mb_per_s=round(c.bytes / elapsed / 1e6, 1),
                in_flight=format_size(c.in_flight),
                budget=format_size(c.budget),
                eta_s=None if eta is None else round(eta),
            )


class BarProgress(Listener):
    """A rich progress bar on the terminal (stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.counts = _Counts()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task: Any = None

    def on_event(self, event: Event) -> None:
        self.counts.update(event)
        if event.name == "run_planned" and event.data["todo"]:
            self.progress.start()
            self.task = self.progress.add_task(event.job, total=self.counts.total, rate="")
        elif self.task is not None and event.name in (
            "chunk_started",
            "chunk_done",
            "chunk_retry",
            "chunk_dead",
        ):
            self.progress.update(
                self.task, completed=self.counts.done + self.counts.failed, rate=self._rate()
            )
        elif event.name in ("reduce_done", "run_finished") and self.task is not None:
            self.progress.stop()
            self.task = None

    def _rate(self) -> str:
        c = self.counts
        elapsed = max(time.monotonic() - c.started, 1e-9)
        failed = f" [red]{c.failed} dead[/]" if c.failed else ""
        retried = f" [yellow]{c.retried} retried[/]" if c.retried else ""
        return (
            f"{c.rows / elapsed:,.0f} rows/s {format_size(c.bytes / elapsed)}/s "
            f"in flight {format_size(c.in_flight)}/{format_size(c.budget)}{retried}{failed}"
        )


def progress_listener(quiet: bool = False) -> Listener | None:
    if quiet:
        return None
    return BarProgress() if sys.stderr.isatty() else LogProgress()
