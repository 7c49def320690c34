"""Command output on stdout: the end-of-run summary and the `status` / `list` tables."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from minibatch.config import Config
from minibatch.runner import RunSummary
from minibatch.treemem import describe
from minibatch.units import format_size


def summary_json(summary: RunSummary) -> dict[str, Any]:
    """`run-now --json`: the run's record, with its dead letters and new bad files."""
    return {
        **dataclasses.asdict(summary.record),
        "settings": None,  # history and the report have them; they are long
        "seconds": round(summary.seconds, 3),
        "exit_status": summary.exit_code,
        "definition_changed": summary.definition_changed,
        "dead": [
            {
                k: getattr(d, k)
                for k in ("file", "row_start", "row_end", "attempts", "error_type", "error_message")
            }
            for d in summary.dead
        ],
        "bad_files": [{"file": b.path, "error": b.error} for b in summary.bad_files],
    }


def print_dead(job: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo(f"{job} has no dead letters")
        return
    print_table(rows, DEAD_COLUMNS)
    click.echo(f"fix the cause, then: minibatch retry {job}")


DEAD_COLUMNS = [
    ("file", "FILE"),
    ("row_start", "FROM"),
    ("row_end", "TO"),
    ("attempts", "ATTEMPTS"),
    ("error_type", "ERROR"),
    ("error_message", "MESSAGE"),
]


def print_summary(summary: RunSummary) -> None:
    r = summary.record
    seconds = max(summary.seconds, 1e-9)
    click.echo(f"{r.job} run {r.run_id}: {r.status}" + (f" ({r.error})" if r.error else ""))
    click.echo(
        f"  chunks: {r.chunks_done} done now, {r.chunks_reused} already done, "
        f"{r.chunks_dead} dead-lettered, {r.chunks_skipped} dead letters skipped, "
        f"{r.chunks_total} planned"
    )
    click.echo(
        f"  rows: {r.rows_in:,} in, {r.rows_out:,} out; bytes: {format_size(r.bytes_in)} in, "
        f"{format_size(r.bytes_out)} written"
    )
    click.echo(
        f"  time: {summary.seconds:.2f}s, {r.rows_in / seconds:,.0f} rows/s, "
        f"{format_size(r.bytes_in / seconds)}/s"
    )
    if r.busy_seconds:
        memory = describe(r.memory_limit, r.peak_in_flight, r.peak_memory, r.idle_memory)
        click.echo(f"  workers: {r.workers}, {r.utilisation or 0:.0%} busy; memory: {memory}")
    if summary.definition_changed:
        what = ", ".join(summary.definition_changed)
        click.echo(f"  definition changed ({what}): results of the old definition were computed again")
    for item in summary.bad_files:
        click.echo(f"  bad input file: {item.path}: {item.error}")
    for dead in summary.dead:
        click.echo(
            f"  dead letter: {dead.file} rows {dead.row_start}-{dead.row_end} after "
            f"{dead.attempts} attempt(s): {dead.error_type}: {dead.error_message}"
        )
    if summary.dead:
        click.echo(f"  fix the cause, then: minibatch retry {r.job}")
    if summary.stopped:
        click.echo("  stopped by a signal; run again to resume")


STATUS_COLUMNS = [
    ("job", "JOB"),
    ("status", "STATUS"),
    ("chunks_done", "DONE"),
    ("chunks_dead", "DEAD"),
    ("chunks_pending", "PENDING"),
    ("bad_files_total", "BAD FILES"),
    ("output_rows", "OUTPUT ROWS"),
    ("output_bytes", "OUTPUT BYTES"),
    ("seconds", "SECONDS"),
    ("started_at", "STARTED"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("bytes_out", "output_bytes"):
        return format_size(value)
    if key == "seconds":
        return f"{value:.1f}"
    if key == "rows_per_second":
        return f"{value:,.0f}"
    if key == "started_at":
        return str(value)[:19]
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    cells = [[_cell(key, row.get(key)) for key, _ in columns] for row in rows]
    headers = [title for _, title in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def print_status(rows: list[dict[str, Any]]) -> None:
    print_table(rows, STATUS_COLUMNS)


HISTORY_COLUMNS = [
    ("run_id", "RUN"),
    ("job", "JOB"),
    ("started_at", "STARTED"),
    ("seconds", "SECONDS"),
    ("status", "STATUS"),
    ("chunks", "CHUNKS"),
    ("rows_in", "ROWS"),
    ("rows_per_second", "ROWS/S"),
]


def print_history(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        earlier = f", {row['chunks_reused']} earlier" if row["chunks_reused"] else ""
        dead = f", {row['chunks_dead']} dead" if row["chunks_dead"] else ""
        row["chunks"] = f"{row['chunks_done']}/{row['chunks_total']}{earlier}{dead}"
    print_table(rows, HISTORY_COLUMNS)


def job_rows(config: Config) -> list[dict[str, Any]]:
    """Each job with its schedule and next fire time (`list`)."""
    from minibatch.schedule import next_fire_times

    rows = []
    for job in config.jobs.values():
        fires = next_fire_times(job.schedule, job.timezone, 1) if job.schedule else []
        rows.append(
            {
                "job": job.name,
                "schedule": job.schedule or "-",
                "timezone": job.timezone,
                "watch": f"{job.watch:g}s" if job.watch else "-",
                "next": fires[0].isoformat() if fires else "-",
                "description": job.description,
            }
        )
    return rows


def print_jobs(config: Config) -> None:
    print_table(
        job_rows(config),
        [
            ("job", "JOB"),
            ("schedule", "SCHEDULE"),
            ("timezone", "TZ"),
            ("watch", "WATCH"),
            ("next", "NEXT RUN"),
            ("description", "DESCRIPTION"),
        ],
    )
