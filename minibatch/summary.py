"""Command output on stdout: the end-of-run summary, the `status` / `list` tables, the advice."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import click

from minibatch.advise import chunk_count, core_share
from minibatch.config import Config
from minibatch.runner import RunSummary
from minibatch.treemem import describe
from minibatch.units import format_seconds, format_size


def summary_json(summary: RunSummary) -> dict[str, Any]:
    """`run-now --json`: the run's record, with its dead letters and new bad files."""
    return {
        **dataclasses.asdict(summary.record),
        "settings": None,  # history and the report have them; they are long
        "seconds": round(summary.seconds, 3),
        "exit_status": summary.exit_code,
        "definition_changed": summary.definition_changed,
        "checks": {name: {"action": a, "rows_failed": n} for name, (a, n) in summary.checks.items()},
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
    if summary.checks:
        counts = ", ".join(f"{name} ({action}) {rows:,}" for name, (action, rows) in summary.checks.items())
        click.echo(f"  checks: {r.rows_bad:,} rows dropped or quarantined; rows failing each: {counts}")
    elif r.rows_bad:  # a text input's records that did not parse: a run of them all still "succeeds"
        click.echo(
            f"  malformed: {r.rows_bad:,} records did not parse, kept in the output's .malformed directory"
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
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
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
    ("rows_bad", "BAD ROWS"),
    ("rows_per_second", "ROWS/S"),
]


def print_history(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        earlier = f", {row['chunks_reused']} earlier" if row["chunks_reused"] else ""
        dead = f", {row['chunks_dead']} dead" if row["chunks_dead"] else ""
        row["chunks"] = f"{row['chunks_done']}/{row['chunks_total']}{earlier}{dead}"
    checked = any(row.get("rows_bad") for row in rows)  # a column only where checks dropped rows
    print_table(rows, [c for c in HISTORY_COLUMNS if checked or c[0] != "rows_bad"])


def job_rows(config: Config, paused: Collection[str] = ()) -> list[dict[str, Any]]:
    """Each job with its schedule and next fire time (`list`); a paused job's is "paused"."""
    from minibatch.schedule import next_fire_times

    rows = []
    for job in config.jobs.values():
        fires = next_fire_times(job.schedule, job.timezone, 1) if job.schedule else []
        following = "paused" if fires and job.name in paused else fires[0].isoformat() if fires else "-"
        rows.append(
            {
                "job": job.name,
                "schedule": job.schedule or "-",
                "timezone": job.timezone,
                "watch": f"{job.watch:g}s" if job.watch else "-",
                "next": following,
                "description": job.description,
            }
        )
    return rows


def print_jobs(config: Config, paused: Collection[str] = ()) -> None:
    print_table(
        job_rows(config, paused),
        [
            ("job", "JOB"),
            ("schedule", "SCHEDULE"),
            ("timezone", "TZ"),
            ("watch", "WATCH"),
            ("next", "NEXT RUN"),
            ("description", "DESCRIPTION"),
        ],
    )


def config_value(setting: str, value: int) -> str:
    """`value` as config.toml would say it."""
    if setting == "workers":
        return str(value)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value % size == 0:
            return f'"{value // size}{unit}"'
    return str(value)


def advice_text(report: dict[str, Any]) -> str:
    """The advice as `minibatch advise` prints it: settings, reasons, then what was measured."""
    m, machine = report["measured"], report["machine"]
    lines = [
        f"{report['job']}: advice from run {m['run_id']} ({chunk_count(m['chunks'])})"
        + (f" and {m['runs'] - 1} earlier" if m["runs"] > 1 else "")
        + f", for this machine: {machine['cores']} cores, "
        f"{format_size(machine['memory'])} of memory ({machine['limit']})",
        "",
    ]
    for a in report["advice"]:
        now, then = config_value(a["setting"], a["current"]), config_value(a["setting"], a["advice"])
        change = f"{now} -> {then}" if a["current"] != a["advice"] else f"{now} (keep)"
        lines += [f"  {a['setting']:<13} {change}", f"      {a['why']}"]
    lines += ["", "measured: " + _measured_line(m)]
    changes = [a for a in report["advice"] if a["current"] != a["advice"]]
    if changes:
        lines += ["", f"in config.toml, [jobs.{report['job']}]:"]
        lines += [f"  {a['setting']} = {config_value(a['setting'], a['advice'])}" for a in changes]
    return "\n".join(lines)


def _measured_line(m: dict[str, Any]) -> str:
    cpu = f"; a chunk keeps {core_share(m['cpu'])} busy, waited {m['queued']:.0%} for one" if m["cpu"] else ""
    per_byte = f" ({m['memory_per_byte']:.1f} bytes per input byte)" if m["memory_per_byte"] else ""
    return (
        f"{chunk_count(m['chunks'])} of {format_size(m['input_bytes'] / max(m['chunks'], 1))} on average, "
        f"{format_seconds(m['chunk_seconds'])} each of which {format_seconds(m['fixed_seconds'])} fixed; "
        f"workers busy {m['busy']:.0%} of the run{cpu}; {m['tail']:.0%} spent waiting for the last "
        f"chunks; a chunk grew its worker by {format_size(m['chunk_memory'])}{per_byte}"
    )
