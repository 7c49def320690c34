"""One emitter for what happens in a run; logs, progress and metrics listen.

A listener's failure is logged and never fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minibatch.log import get_logger


@dataclass(frozen=True)
class Event:
    name: str  # run_started | chunk_started | chunk_done | chunk_retry | chunk_dead | ...
    job: str
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)


class Listener:
    """Base class: override `on_event`; the default ignores everything."""

    def on_event(self, event: Event) -> None:
        return None


class Emitter:
    def __init__(self, listeners: list[Listener] | None = None) -> None:
        self.listeners = list(listeners or [])

    def emit(self, name: str, job: str, run_id: str, **data: Any) -> None:
        event = Event(name, job, run_id, data)
        for listener in self.listeners:
            try:
                listener.on_event(event)
            except Exception:  # a broken listener must not break the run
                get_logger(job=job, run_id=run_id).exception(
                    "listener_failed", listener=type(listener).__name__
                )


# Events worth a log line, with the level to log them at.
LOGGED = {
    "run_started": "info",
    "run_planned": "info",
    "no_input_files": "error",
    "bad_file": "error",
    "known_bad_file": "warning",
    "dead_letters_skipped": "warning",
    "stale_outputs_removed": "info",
    "chunk_done": "debug",
    "chunk_retry": "warning",
    "chunk_dead": "error",
    "stop_requested": "warning",
    "breaker_open": "error",
    "breaker_tripped": "error",
    "reduce_done": "info",
    "reduce_failed": "error",
    "chunk_input_changed": "warning",
    "definition_changed": "warning",
    "part_not_adopted": "warning",
    "foreign_files_in_output": "warning",
    "run_incomplete": "error",
    "run_finished": "info",
}


class LogListener(Listener):
    def on_event(self, event: Event) -> None:
        level = LOGGED.get(event.name)
        if level is None:
            return
        log = get_logger(job=event.job, run_id=event.run_id)
        getattr(log, level)(event.name, **event.data)
