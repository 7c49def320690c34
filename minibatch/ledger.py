"""A run's ledger: what finished, on its way into the manifest.

Invariants this module owns:
- a chunk is recorded done only after its result is durable: `make_durable` (the result
  store's directory fsync) runs before every commit that records results;
- commits stay in order: each waits for the one before and raises its error;
- the run's counters are the sums of what it recorded (chunks done and dead, rows, bytes).

Commits run in a background thread about once a second while the coordinator keeps feeding
workers (a commit takes tens of ms; tiny chunks finish faster).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from minibatch.clock import SYSTEM, Clock
from minibatch.events import RunEvents
from minibatch.manifest import Manifest
from minibatch.planner import Chunk
from minibatch.records import AttemptRecord, ChunkRecord, RunRecord
from minibatch.states import ChunkStatus, EventKind, RunStatus
from minibatch.tasks import TaskError, TaskResult

FLUSH_INTERVAL = 1.0  # seconds between commits of finished chunks


class Ledger:
    def __init__(
        self,
        manifest: Manifest,
        record: RunRecord,
        make_durable: Callable[[], None],
        events: RunEvents,
        clock: Clock = SYSTEM,
    ) -> None:
        self.manifest = manifest
        self.record = record
        self.make_durable = make_durable
        self.events = events
        self.clock = clock
        self.outputs: dict[str, str | None] = {}  # chunk id -> part file of every done chunk
        self.dead: list[ChunkRecord] = []  # dead-lettered by this run
        self.check_failures: Counter[str] = Counter()  # check name -> rows that failed it, this run
        self._chunks: list[ChunkRecord] = []
        self._attempts: list[AttemptRecord] = []
        self._committer: _Committer | None = None
        self.last_flush = clock.monotonic()

    # -- what finished --------------------------------------------------------------------------

    def reused(self, outputs: dict[str, str | None]) -> None:
        """Chunks done by earlier runs (recorded there)."""
        self.outputs.update(outputs)

    def adopted(self, chunk: Chunk, name: str, rows: int, nbytes: int) -> None:
        """A result a killed run published but did not record: recorded now, as that run's work."""
        self._chunks.append(self._chunk(chunk, ChunkStatus.DONE, 1, rows_in=chunk.num_rows, rows_out=rows,
                                        output_file=name, bytes_out=nbytes))  # fmt: skip
        self.outputs[chunk.chunk_id] = name

    def done(self, chunk: Chunk, attempts: int, result: TaskResult, in_flight: int) -> None:
        record = self._chunk(
            chunk, ChunkStatus.DONE, attempts, rows_in=result.rows_in, rows_out=result.rows_out,
            bytes_in=result.bytes_in, bytes_out=result.bytes_out, output_file=result.output_file,
            seconds=result.seconds, rows_bad=result.rows_bad,
        )  # fmt: skip
        r = self.record
        r.chunks_done += 1
        r.rows_in, r.rows_out = r.rows_in + record.rows_in, r.rows_out + record.rows_out
        r.bytes_in, r.bytes_out = r.bytes_in + record.bytes_in, r.bytes_out + record.bytes_out
        r.rows_bad += result.rows_bad
        self.check_failures.update(dict(result.check_failures))
        self._chunks.append(record)
        self.outputs[chunk.chunk_id] = record.output_file
        self.events(
            EventKind.CHUNK_DONE, chunk=chunk.chunk_id, label=chunk.label, rows=record.rows_out,
            bytes_in=record.bytes_in, seconds=round(record.seconds, 3), in_flight=in_flight,
        )  # fmt: skip

    def dead_letter(self, chunk: Chunk, attempts: int, error: TaskError, in_flight: int) -> None:
        record = self._chunk(
            chunk, ChunkStatus.DEAD, attempts, error_type=error.type, error_message=error.message,
            traceback=error.traceback,
        )  # fmt: skip
        self.record.chunks_dead += 1
        self._chunks.append(record)
        self.dead.append(record)
        self.events(
            EventKind.CHUNK_DEAD, chunk=chunk.chunk_id, label=chunk.label, attempts=attempts,
            error=f"{error.type}: {error.message}", in_flight=in_flight,
        )  # fmt: skip

    def inherit(self, rows: list[dict[str, Any]]) -> None:
        """Dead letters a stopped or crashed run left without failing for them (the manifest
        calls them this run's already): this run names them, and fails for them."""
        for row in rows:
            record = ChunkRecord(
                job=self.record.job, status=ChunkStatus.DEAD, run_id=self.record.run_id, **row
            )
            self.record.chunks_dead += 1
            self.dead.append(record)

    def attempt(self, record: AttemptRecord) -> None:
        self._attempts.append(record)

    def _chunk(self, chunk: Chunk, status: ChunkStatus, attempts: int, **values: Any) -> ChunkRecord:
        return ChunkRecord(
            job=self.record.job, chunk_id=chunk.chunk_id, file=chunk.path, fingerprint=chunk.fingerprint,
            row_start=chunk.row_start, row_end=chunk.row_end, status=status, run_id=self.record.run_id,
            attempts=attempts, finished_at=self.clock.time(), **values,
        )  # fmt: skip

    # -- into the manifest ----------------------------------------------------------------------

    def next_flush(self) -> float:
        """The monotonic time of the next commit, for the coordinator's wait."""
        return self.last_flush + FLUSH_INTERVAL

    def tick(self) -> None:
        """Commit in the background if a second has passed since the last commit."""
        if self.clock.monotonic() >= self.next_flush():
            self.flush(wait=False)
            self.last_flush = self.clock.monotonic()

    def flush(self, wait: bool = True) -> None:
        """Record what finished: first make the results durable, then commit them.

        With `wait=False` the commit runs in a thread; while one is still going, a flush that
        need not wait is skipped (its records go with the next one)."""
        if not wait and self._committer is not None and self._committer.is_alive():
            return
        self.wait()
        chunks, attempts = self._chunks, self._attempts
        self._chunks, self._attempts = [], []
        run = replace(self.record)  # a snapshot: the coordinator goes on counting
        if run.ended_at is None:  # not `succeeded` before its output is published: killed, it resumes
            run.status = RunStatus.RUNNING

        def commit() -> None:
            if any(c.output_file for c in chunks):
                self.make_durable()
            self.manifest.commit(run, chunks, attempts)

        if wait:
            commit()
        else:
            self._committer = _Committer(commit)

    def wait(self) -> None:
        """Wait for a background commit; raise what it raised."""
        if self._committer is not None:
            committer, self._committer = self._committer, None
            committer.join()


class _Committer(threading.Thread):
    """One background commit; `join()` re-raises what it raised."""

    def __init__(self, commit: Callable[[], None]) -> None:
        super().__init__(name="minibatch-commit")  # not a daemon: exiting waits for the commit
        self.commit = commit
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.commit()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error
