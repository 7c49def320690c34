"""Prometheus metrics for the daemon: a listener on run events, served over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from minibatch.events import Event, Listener
from minibatch.states import Outcome, RunStatus

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics(Listener):
    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
            disable_created_metrics,
        )

        disable_created_metrics()  # type: ignore[no-untyped-call]  # noise on dashboards
        self.registry = CollectorRegistry()
        r = self.registry
        self.chunks = Counter("minibatch_chunks", "Chunk attempts by outcome (done, retried, dead)",
                              ["job", "status"], registry=r)  # fmt: skip
        self.rows = Counter("minibatch_rows", "Rows written by finished chunks", ["job"], registry=r)
        self.bytes_in = Counter("minibatch_input_bytes", "Uncompressed bytes read", ["job"], registry=r)
        self.chunk_seconds = Histogram("minibatch_chunk_duration_seconds", "Seconds per finished chunk",
                                       ["job"], buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.check_rows = Counter("minibatch_check_failed_rows", "Rows failing a check, by check and action",
                                  ["job", "check", "action"], registry=r)  # fmt: skip
        self.runs = Counter("minibatch_runs", "Finished runs by status", ["job", "status"], registry=r)
        self.run_seconds = Histogram("minibatch_run_duration_seconds", "Seconds per run", ["job"],
                                     buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.last_success = Gauge("minibatch_last_success_timestamp_seconds",
                                  "Unix time the job last succeeded", ["job"], registry=r)  # fmt: skip
        self.running = Gauge(
            "minibatch_running", "1 while a run of the job is in progress", ["job"], registry=r
        )

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, ["job"], registry=r)

        self.in_flight = gauge("minibatch_bytes_in_flight", "Estimated bytes of chunks in flight")
        self.budget = gauge("minibatch_memory_budget_bytes", "The job's memory_limit")
        self.peak_memory = gauge(
            "minibatch_memory_peak_bytes", "Measured: the most the last run's processes held above idle"
        )
        self.dead_letters = gauge("minibatch_dead_letters", "Dead-lettered chunks awaiting retry")
        self.interval = gauge(
            "minibatch_schedule_interval_seconds", "Longest gap between the job's coming fire times, seconds"
        )
        ProcessCollector(registry=r)  # the daemon's own memory, CPU and start time

    def on_any(self, event: Event) -> None:
        if "in_flight" in event.data:
            self.in_flight.labels(event.job).set(event.data["in_flight"])

    def run_started(self, event: Event) -> None:
        self.running.labels(event.job).set(1)
        self.budget.labels(event.job).set(event.data.get("memory_limit", 0))

    def chunk_done(self, event: Event) -> None:
        self.chunks.labels(event.job, Outcome.DONE).inc()
        self.rows.labels(event.job).inc(event.data.get("rows", 0))
        self.bytes_in.labels(event.job).inc(event.data.get("bytes_in", 0))
        self.chunk_seconds.labels(event.job).observe(event.data.get("seconds", 0.0))

    def chunk_retry(self, event: Event) -> None:
        self.chunks.labels(event.job, Outcome.RETRIED).inc()

    def chunk_dead(self, event: Event) -> None:
        self.chunks.labels(event.job, Outcome.DEAD).inc()

    def run_finished(self, event: Event) -> None:
        job, status = event.job, event.data["status"]
        self.running.labels(job).set(0)
        self.in_flight.labels(job).set(0)
        self.runs.labels(job, status).inc()
        self.run_seconds.labels(job).observe(event.data.get("seconds", 0.0))
        for check, (action, rows) in event.data.get("checks", {}).items():
            self.check_rows.labels(job, check, action).inc(rows)
        if event.data.get("peak_memory") is not None:
            self.peak_memory.labels(job).set(event.data["peak_memory"])
        if status == RunStatus.SUCCEEDED:
            self.last_success.labels(job).set(time.time())

    def run_ended(self, event: Event) -> None:
        record = event.data.get("record")
        if record is not None and record.status == RunStatus.CRASHED:  # broke: no run_finished
            self.running.labels(event.job).set(0)
            self.in_flight.labels(event.job).set(0)
            self.runs.labels(event.job, record.status).inc()

    def load_state(self, status: list[dict[str, Any]]) -> None:
        """Series that outlive the daemon, from the manifest (`Manifest.status()` rows)."""
        for row in status:  # a job with parameters: its latest parameter set's
            self.dead_letters.labels(row["job_name"]).set(row["dead_total"])
            if row["last_success_at"] is not None:
                self.last_success.labels(row["job_name"]).set(row["last_success_at"].timestamp())

    def set_jobs(self, jobs: Iterable[str], intervals: dict[str, float]) -> None:
        """Every job's series from the start, at 0, so that rate() and increase() see the first
        event; schedule intervals of jobs no longer scheduled are dropped (after a reload)."""
        for job in jobs:
            for outcome in (Outcome.DONE, Outcome.RETRIED, Outcome.DEAD):
                self.chunks.labels(job, outcome)
            for status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED):
                self.runs.labels(job, status)
            for family in (self.rows, self.bytes_in, self.chunk_seconds, self.run_seconds, self.running):
                family.labels(job)
        self.interval.clear()
        for job, seconds in intervals.items():
            self.interval.labels(job).set(seconds)

    def serve(self, addr: str) -> None:
        """Serve /metrics at "host:port" in a background thread."""
        from prometheus_client import start_http_server

        host, _, port = addr.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry)
