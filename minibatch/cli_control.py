"""The control plane's commands: `backfill`, `cancel`, `pause`, `resume`.

Pauses are kept in the manifest, which the daemon reads at every fire: `pause` works the same
with the daemon running or not. A run is cancelled where it runs: inside the daemon through
its HTTP API (loopback), in a `run-now` or `backfill` process by SIGTERM, its graceful stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import datetime
from typing import Any, NoReturn

import click

from minibatch.backfill import MAX_PARALLEL
from minibatch.clibase import EXIT_USAGE, State, params_option

REPROCESS_HELP = (
    "Which dates to run: none = only dates never run; failed = and those whose last run did not "
    "succeed; all = every date, from scratch."
)


@click.command()
@click.argument("job")
@click.option("--from", "first", required=True, type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="First logical date.")  # fmt: skip
@click.option("--to", "last", required=True, type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="Last logical date (included).")  # fmt: skip
@click.option("--reprocess", type=click.Choice(["none", "failed", "all"]), default="none", show_default=True,
              help=REPROCESS_HELP)  # fmt: skip
@click.option("--max-parallel", type=click.IntRange(1, MAX_PARALLEL), default=1, show_default=True,
              help="Dates run at once; they share the job's workers and memory_limit.")  # fmt: skip
@click.option("--backwards", is_flag=True, help="Newest date first.")
@click.option("--dry-run", is_flag=True, help="Show the dates and what would run; run nothing.")
@params_option
@click.option("--json", "as_json", is_flag=True, help="The result as JSON.")
@click.pass_obj
def backfill(state: State, /, job: str, first: datetime, last: datetime, dry_run: bool, as_json: bool,
             **options: Any) -> None:  # fmt: skip
    """Run JOB for each logical date from --from to --to (the days its schedule fires, or
    every day), resumably: interrupt it and run the same command again to continue.

    Each date is its own run with its own checkpoint (`--param date=...`), so each date's
    output holds its rows exactly once. A summary table per date at the end. Exit status 1
    when a date failed.
    """
    from minibatch.backfill import BackfillRequest, backfill_json, plan, run_backfill
    from minibatch.signals import StopSignals
    from minibatch.status import manifest_for
    from minibatch.summary import print_table

    config = state.config
    request = BackfillRequest(job, first.date(), last.date(), **options)
    if dry_run:
        dates = plan(config, request, manifest_for(config))
        rows = [{"date": d.day, "action": d.action, "reason": d.reason} for d in dates]
        if as_json:
            click.echo(json.dumps(rows, indent=2, default=str))
        else:
            print_table(rows, [("date", "DATE"), ("action", "ACTION"), ("reason", "WHY")])
        return
    with StopSignals() as signals:
        result = run_backfill(config, request, signals, on_date=_progress)
    state.exit_code = result.exit_code
    shown = backfill_json(result, manifest_for(config))
    if as_json:
        click.echo(json.dumps(shown, indent=2, default=str))
    else:
        click.echo(f"backfill {result.backfill_id} of {job}: {result.status}")
        print_table(shown["dates"], BACKFILL_COLUMNS)
        if result.status == "stopped":
            click.echo("stopped: run the same command again to continue", err=True)
    sys.exit(result.exit_code)


BACKFILL_COLUMNS = [("date", "DATE"), ("status", "STATUS"), ("run_id", "RUN"), ("chunks_done", "CHUNKS"),
                    ("rows_out", "ROWS"), ("seconds", "SECONDS"), ("error", "ERROR")]  # fmt: skip


def _progress(backfill: Any, state: Any) -> None:
    done = sum(d.status not in ("pending", "running") for d in backfill.dates)
    run = f" (run {state.run_id})" if state.run_id else ""
    error = f": {state.error}" if state.error else ""
    click.echo(f"[{done}/{len(backfill.dates)}] {state.day} {state.status}{run}{error}", err=True)


@click.command()
@click.argument("run_id")
@click.pass_obj
def cancel(state: State, run_id: str) -> None:
    """Stop run RUN_ID gracefully: chunks in flight finish (within stop_grace), queued ones
    are handed back, the run is recorded `stopped` and its next run resumes it."""
    from minibatch.lock import DAEMON_LOCK, holder_pid
    from minibatch.status import actual_status, manifest_for

    manifest = manifest_for(state.config)
    rows = manifest.named("run_by_id", read_only=True, run_id=run_id)
    lock = None
    if not rows:  # a backfill's id: the backfill as a whole
        rows = manifest.named("backfill", read_only=True, id=run_id)
        lock = f"{rows[0]['job']}.backfill" if rows else None
    state_dir = state.config.engine.state_dir
    if not rows:
        if holder_pid(state_dir, DAEMON_LOCK) is not None:  # accepted by the daemon, not begun
            answer = api_call(state, "POST", f"/runs/{run_id}/cancel")
            click.echo(f"run {run_id} of {answer['job']}: {answer['status']} (asked the daemon)")
            return
        _fail(f"no run {run_id!r}")
    run = rows[0]
    # its pid, dead, may be another process's by now: the locks' holders say who runs what
    status = actual_status(state.config, {**run, "job": lock or run["job"]})
    if status != "running":
        _fail(f"run {run_id!r} of {run['job']} is not running (it is {status})")
    # the holder as this PID namespace numbers it (the pid recorded is its own namespace's)
    pid = holder_pid(state_dir, lock or run["job"])
    if not pid:
        _fail(f"run {run_id!r} of {run['job']} runs in a process this PID namespace cannot see "
              "(another container): cancel it there")  # fmt: skip
    if holder_pid(state_dir, DAEMON_LOCK) == pid:  # a run inside the daemon: not a signal to it all
        answer = api_call(state, "POST", f"/runs/{run_id}/cancel")
        click.echo(f"run {run_id} of {answer['job']}: {answer['status']} (asked the daemon, pid {pid})")
        return
    os.kill(pid, signal.SIGTERM)
    backfill = lock or f"{str(run['job']).partition('[')[0]}.backfill"
    mine = holder_pid(state_dir, backfill) == pid
    what = "its backfill (run the same command again to continue)" if mine else "it"
    click.echo(f"run {run_id} of {run['job']}: stopping {what} (SIGTERM to process {pid})")


@click.command()
@click.argument("job")
@click.pass_obj
def pause(state: State, job: str) -> None:
    """Pause JOB's schedule (kept across daemon restarts); run-now still runs it."""
    _set_paused(state, job, True)
    click.echo(f"{job}: paused; its schedule does not fire until `minibatch resume {job}`")


@click.command()
@click.argument("job")
@click.pass_obj
def resume(state: State, job: str) -> None:
    """Resume JOB's schedule from its next fire time (missed fires are not caught up)."""
    _set_paused(state, job, False)
    click.echo(f"{job}: resumed")


def _set_paused(state: State, job: str, paused: bool) -> None:
    from minibatch.control import set_paused
    from minibatch.status import manifest_for

    state.config.job(job)
    set_paused(manifest_for(state.config), job, paused)


def api_call(state: State, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request to the running daemon's HTTP API, on loopback; its JSON answer."""
    import urllib.error  # here, not at the top: ~50 ms that every other command would pay
    import urllib.request

    engine = state.config.engine
    if not engine.api_addr:
        _fail("the daemon's HTTP API is off (api_addr = \"\"): it is needed to reach the daemon's runs")
    host, _, port = engine.api_addr.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    if engine.api_token_file:
        request.add_header("Authorization", f"Bearer {engine.api_token_file.read_text().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        _fail(f"the daemon answered {exc.code}: {json.load(exc).get('detail', exc.reason)}")
    except OSError as exc:
        _fail(f"cannot reach the daemon's API at {engine.api_addr}: {exc}")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)
