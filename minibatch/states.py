"""The words minibatch uses for what happened, one per meaning, across code, manifest, CLI,
JSON, metrics and docs. The manifest's CHECK constraints (schema.sql) list the same values.

"failed" is only ever a run's outcome; a chunk that will not be tried again is "dead"
(dead-lettered); an attempt that failed and will be tried again is "retried".
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # dead letters, bad files, changed input, a failed reduce, ...
    STOPPED = "stopped"  # by a signal or the daemon: resumes next time
    CRASHED = "crashed"  # broke with an error, or found still `running` by a later run


class ChunkStatus(StrEnum):
    DONE = "done"
    DEAD = "dead"  # dead-lettered: skipped until `minibatch retry`


class Outcome(StrEnum):
    """How one attempt at a chunk ended."""

    DONE = "done"
    RETRIED = "retried"
    DEAD = "dead"
    INPUT_CHANGED = "input_changed"  # the file changed or went: no charge, no result


class ErrorKind(StrEnum):
    """Why an attempt failed, as the worker or the pool saw it."""

    ERROR = "error"  # the job's code or SQL raised
    MEMORY = "memory"  # the worker's memory cap was hit
    INPUT_CHANGED = "input_changed"
    INPUT_REMOVED = "input_removed"
    DIED = "died"  # the worker process died mid-chunk
    TIMEOUT = "timeout"
    ENVIRONMENT = "environment"  # a full disk, a quota, a read-only filesystem: not the chunk's


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"  # cooling down: nothing admitted
    HALF_OPEN = "half_open"  # one trial chunk let through
    TRIPPED = "tripped"  # the trial failed too: the run ends


class EventKind(StrEnum):
    """What a run tells its listeners (logs, progress, metrics, hooks)."""

    RUN_STARTED = "run_started"
    NO_INPUT_FILES = "no_input_files"
    OUTPUT_GONE = "output_gone"
    DEFINITION_CHANGED = "definition_changed"
    BAD_FILE = "bad_file"
    KNOWN_BAD_FILE = "known_bad_file"
    PART_NOT_ADOPTED = "part_not_adopted"
    STALE_OUTPUTS_REMOVED = "stale_outputs_removed"
    FOREIGN_FILES_IN_OUTPUT = "foreign_files_in_output"
    DEAD_LETTERS_SKIPPED = "dead_letters_skipped"
    RUN_PLANNED = "run_planned"
    CHUNK_STARTED = "chunk_started"
    CHUNK_DONE = "chunk_done"
    CHUNK_RETRY = "chunk_retry"
    CHUNK_DEAD = "chunk_dead"
    CHUNK_INPUT_CHANGED = "chunk_input_changed"
    STOP_REQUESTED = "stop_requested"
    BREAKER_OPEN = "breaker_open"
    BREAKER_CLOSED = "breaker_closed"
    BREAKER_HALF_OPEN = "breaker_half_open"
    BREAKER_TRIPPED = "breaker_tripped"
    REDUCE_DONE = "reduce_done"
    REDUCE_FAILED = "reduce_failed"
    OUTPUT_PUBLISHED = "output_published"
    PUBLISH_FAILED = "publish_failed"
    CHECKS_FAILED = "checks_failed"
    RUN_INCOMPLETE = "run_incomplete"
    RUN_HALTED = "run_halted"  # a full disk or the like: nothing more admitted
    MEMORY_OVER_BUDGET = "memory_over_budget"  # measured: the processes held more than memory_limit
    RUN_FINISHED = "run_finished"  # recorded, still under the job's lock
    RUN_ENDED = "run_ended"  # the lock released: hooks may start the next run
