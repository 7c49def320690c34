"""One emitter for what happens in a run; logs, progress, metrics and hooks listen.

A listener overrides the named methods of the events it cares about (each default does
nothing), as dramatiq's middleware does; `on_any` sees every event. A listener's failure is
logged and never fails the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minibatch.log import get_logger
from minibatch.states import EventKind


@dataclass(frozen=True)
class Event:
    kind: EventKind
    job: str
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)


class Listener:
    def on_any(self, event: Event) -> None: ...
    def run_started(self, event: Event) -> None: ...
    def run_planned(self, event: Event) -> None: ...
    def chunk_started(self, event: Event) -> None: ...
    def chunk_done(self, event: Event) -> None: ...
    def chunk_retry(self, event: Event) -> None: ...
    def chunk_dead(self, event: Event) -> None: ...
    def reduce_done(self, event: Event) -> None: ...
    def run_finished(self, event: Event) -> None: ...
    def run_ended(self, event: Event) -> None: ...


_NAMED: dict[EventKind, Callable[[Listener, Event], None]] = {
    EventKind.RUN_STARTED: lambda listener, event: listener.run_started(event),
    EventKind.RUN_PLANNED: lambda listener, event: listener.run_planned(event),
    EventKind.CHUNK_STARTED: lambda listener, event: listener.chunk_started(event),
    EventKind.CHUNK_DONE: lambda listener, event: listener.chunk_done(event),
    EventKind.CHUNK_RETRY: lambda listener, event: listener.chunk_retry(event),
    EventKind.CHUNK_DEAD: lambda listener, event: listener.chunk_dead(event),
    EventKind.REDUCE_DONE: lambda listener, event: listener.reduce_done(event),
    EventKind.RUN_FINISHED: lambda listener, event: listener.run_finished(event),
    EventKind.RUN_ENDED: lambda listener, event: listener.run_ended(event),
}


class Emitter:
    def __init__(self, listeners: list[Listener] | None = None) -> None:
        self.listeners = list(listeners or [])

    def emit(self, kind: EventKind, job: str, run_id: str, **data: Any) -> None:
        event = Event(kind, job, run_id, data)
        named = _NAMED.get(kind)
        for listener in self.listeners:
            try:
                listener.on_any(event)
                if named is not None:
                    named(listener, event)
            except Exception:  # a broken listener must not break the run
                get_logger(job=job, run_id=run_id).exception(
                    "listener_failed", listener=type(listener).__name__
                )

    def bind(self, job: str, run_id: str) -> RunEvents:
        return RunEvents(self, job, run_id)


@dataclass(frozen=True)
class RunEvents:
    """An emitter bound to one run: what the runner, executor and ledger emit through."""

    emitter: Emitter
    job: str
    run_id: str

    def __call__(self, kind: EventKind, **data: Any) -> None:
        self.emitter.emit(kind, self.job, self.run_id, **data)


# Events worth a log line, with the level to log them at.
LOGGED: dict[EventKind, str] = {
    EventKind.RUN_STARTED: "info",
    EventKind.RUN_PLANNED: "info",
    EventKind.NO_INPUT_FILES: "error",
    EventKind.OUTPUT_GONE: "error",
    EventKind.BAD_FILE: "error",
    EventKind.KNOWN_BAD_FILE: "warning",
    EventKind.DEAD_LETTERS_SKIPPED: "warning",
    EventKind.STALE_OUTPUTS_REMOVED: "info",
    EventKind.CHUNK_DONE: "debug",
    EventKind.CHUNK_RETRY: "warning",
    EventKind.CHUNK_DEAD: "error",
    EventKind.STOP_REQUESTED: "warning",
    EventKind.BREAKER_OPEN: "error",
    EventKind.BREAKER_TRIPPED: "error",
    EventKind.REDUCE_DONE: "info",
    EventKind.REDUCE_FAILED: "error",
    EventKind.OUTPUT_PUBLISHED: "info",
    EventKind.PUBLISH_FAILED: "error",
    EventKind.CHECKS_FAILED: "error",
    EventKind.CHUNK_INPUT_CHANGED: "warning",
    EventKind.DEFINITION_CHANGED: "warning",
    EventKind.PART_NOT_ADOPTED: "warning",
    EventKind.FOREIGN_FILES_IN_OUTPUT: "warning",
    EventKind.RUN_INCOMPLETE: "error",
    EventKind.RUN_HALTED: "error",
    EventKind.MEMORY_OVER_BUDGET: "warning",
    EventKind.RUN_FINISHED: "info",
}


class LogListener(Listener):
    def on_any(self, event: Event) -> None:
        level = LOGGED.get(event.kind)
        if level is None:
            return
        log = get_logger(job=event.job, run_id=event.run_id)
        data = {k: v for k, v in event.data.items() if k != "record"}  # the run's record: not a log field
        getattr(log, level)(str(event.kind), **data)
