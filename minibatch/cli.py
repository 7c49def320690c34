"""The `minibatch` command: parse, build library objects, call one function, map errors to exits."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import click

from minibatch.cli_control import backfill, cancel, pause, resume
from minibatch.clibase import (
    EXIT_LOCKED,
    EXIT_USAGE,
    Group,
    State,
    config_here,
    params_option,
    run_and_exit,
    run_options,
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="MINIBATCH_CONFIG",
    help="config.toml to use [default: $MINIBATCH_CONFIG, else ./config.toml]",
)
@click.version_option(package_name="minibatch")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """minibatch: run batch jobs over Parquet in a memory-bounded pool of worker processes.

    Jobs are defined in config.toml. Every finished chunk is recorded in a DuckDB manifest,
    so a stopped or crashed run resumes where it was.

    Exit status: 0 success; 1 some chunks were dead-lettered (or input files were bad);
    2 usage or configuration error; 3 the job is already running elsewhere.
    """
    ctx.obj = State(config_path)


for command in (backfill, cancel, pause, resume):
    main.add_command(command)


@main.command("run-now")
@click.argument("job")
@run_options
@click.option("--fresh", is_flag=True, help="Forget the checkpoint and rebuild the output.")
@click.pass_obj
def run_now(state: State, /, job: str, fresh: bool, **options: Any) -> None:
    """Run JOB now, resuming its checkpoint; print a summary at the end."""
    _run(state, job, fresh=fresh, **options)


@main.command()
@click.argument("job")
@run_options
@click.pass_obj
def retry(state: State, /, job: str, **options: Any) -> None:
    """Run JOB again, including the chunks and files that were dead-lettered."""
    _run(state, job, retry_dead=True, **options)


def _run(state: State, job: str, quiet: bool, as_json: bool, **options: Any) -> None:
    from minibatch.progress import progress_listener
    from minibatch.runner import RunOptions, run_job
    from minibatch.summary import print_summary, summary_json

    listener = progress_listener(quiet or as_json)
    summary = run_job(state.config, job, RunOptions(**options), [listener] if listener else [])
    state.exit_code = summary.exit_code
    if as_json:
        click.echo(json.dumps(summary_json(summary), indent=2, default=str))
    else:
        print_summary(summary)
    sys.exit(summary.exit_code)


@main.command()
@click.pass_obj
def daemon(state: State) -> None:
    """Run the scheduler in the foreground until SIGTERM (what systemd's unit starts).

    Fires every job with a `schedule` in its time zone, catches up runs missed while down,
    waits for `depends_on`, reloads config.toml on SIGHUP, speaks systemd's notify protocol,
    serves Prometheus metrics at `metrics_addr`, and logs to stdout.
    """
    from minibatch.daemon import run_daemon
    from minibatch.log import configure_logging
    from minibatch.validate import load_daemon_config

    config = load_daemon_config(state.config_path)
    configure_logging(config.engine.log_format, config.engine.log_level, stream=sys.stdout)
    sys.exit(run_daemon(config, state.config_path))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def validate(state: State, as_json: bool) -> None:
    """Check config.toml, import every job's function (and check its signature), prepare every
    job's SQL against its inputs' schema, and warn about input globs that match no file."""
    from minibatch.validate import validate_config

    config = state.config
    warnings = validate_config(config)
    if as_json:
        click.echo(
            json.dumps({"config": str(config.path), "jobs": sorted(config.jobs), "warnings": warnings})
        )
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{config.path}: OK, {len(config.jobs)} job(s): {', '.join(sorted(config.jobs))}")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_jobs(state: State, as_json: bool) -> None:
    """Jobs, their schedules and next fire times."""
    from minibatch.manifest import Manifest, manifest_path
    from minibatch.summary import job_rows, print_jobs

    manifest = Manifest(manifest_path(state.config.engine.state_dir))
    paused = {row["job"] for row in manifest.named("paused", read_only=True)}
    if as_json:
        click.echo(json.dumps(job_rows(state.config, paused), indent=2))
    else:
        print_jobs(state.config, paused)


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@params_option
@click.pass_obj
def dead(state: State, job: str, as_json: bool, params: dict[str, str]) -> None:
    """JOB's dead-lettered chunks: file, rows, attempts and the last error."""
    from minibatch.status import dead_letters
    from minibatch.summary import print_dead

    rows = dead_letters(state.config, job, params)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_dead(job, rows)


@main.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(state: State, job: str | None, as_json: bool) -> None:
    """Last run of each job (or JOB): chunks done / dead / pending, rows, bytes, time."""
    from minibatch.status import job_status
    from minibatch.summary import print_status

    config = state.config
    if job is not None:
        config.job(job)
    rows = job_status(config, job)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_status(rows)


@main.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--limit", type=click.IntRange(1, 1_000_000), default=20, show_default=True, help="Runs to show."
)
@click.pass_obj
def history(state: State, job: str | None, as_json: bool, limit: int) -> None:
    """Past runs of every job (or JOB), newest first: start, duration, outcome, chunks, rows, rows/s."""
    from minibatch.status import run_history
    from minibatch.summary import print_history

    config = state.config
    if job is not None:
        config.job(job)
    rows = run_history(config, job, limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    elif rows:
        print_history(rows)
    else:
        click.echo(f"no runs recorded for {job}" if job else "no runs recorded")


@main.command()
@click.argument("job")
@click.option("--run", "run_id", metavar="ID", help="The run to show (default: the latest).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Where to write it (default: under state_dir)."
)
@click.pass_obj
def report(state: State, job: str, run_id: str | None, output: str | None) -> None:
    """Write one self-contained HTML page about a run of JOB: a timeline of chunks per worker,
    throughput, bytes in flight vs the memory budget, stragglers, failures and settings.

    It opens offline in any browser. Prints the file's path.
    """
    from minibatch.report import ReportError, report_run

    config = state.config
    config.job(job)
    try:
        click.echo(report_run(config.engine.state_dir, job, run_id, output))
    except ReportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


@main.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def advise(state: State, job: str, as_json: bool) -> None:
    """Recommend workers, chunk_bytes and memory_limit for JOB on this machine, from what its
    past runs measured (memory per input byte, CPU use, fixed costs per chunk, stragglers),
    each with its reason and the lines to put in config.toml."""
    from minibatch.advise import NoHistory, advise_job
    from minibatch.status import manifest_for
    from minibatch.summary import advice_text

    config = state.config
    config.job(job)
    try:
        report = advise_job(manifest_for(config), job)
    except NoHistory as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(report, indent=2) if as_json else advice_text(report))


@main.command()
@click.argument("dest", type=click.Path())
@click.pass_obj
def backup(state: State, dest: str) -> None:
    """Copy the manifest to DEST (a file, or a directory to put a dated copy in), consistently,
    also while the daemon runs. `minibatch restore` puts a copy back."""
    from minibatch.repair import backup as backup_manifest

    click.echo(backup_manifest(state.config, dest))


@main.command()
@click.argument("copy", type=click.Path(path_type=pathlib.Path))
@click.pass_obj
def restore(state: State, copy: pathlib.Path) -> None:
    """Put a backup made by `minibatch backup` in place of the manifest (no job may be running).
    The manifest it replaces is set aside, not deleted; the next runs adopt what the outputs
    hold beyond the backup and compute only what is missing."""
    from minibatch.repair import restore as restore_manifest

    aside = restore_manifest(state.config, copy)
    click.echo(f"restored {copy}; the manifest it replaced is {aside}")


@main.command()
@click.pass_obj
def repair(state: State) -> None:
    """Set a damaged manifest aside and start a new one.

    The next run of each job adopts its finished results from its output (each part's footer
    names its chunk and is checked) and computes only what is missing. Lost with the old
    manifest: run history, attempts, dead letters (tried again) and last fire times.
    """
    from minibatch.manifest import ManifestBusy
    from minibatch.repair import repair as repair_manifest

    try:
        done = repair_manifest(state.config)
    except ManifestBusy as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo(
            "  it is in use by another process, not damaged: stop what holds it open and repair again",
            err=True,
        )
        sys.exit(EXIT_LOCKED)
    if done.broken is None:
        click.echo(f"{done.path}: nothing to repair ({done.reason})")
        return
    click.echo(f"{done.path}: could not be used ({done.reason})")
    click.echo(f"  set aside as {done.broken}; a new manifest was started")
    click.echo("  the next run of each job adopts its outputs and computes only what is missing")


@main.command()
@click.argument("job")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@params_option
@click.pass_obj
def reset(state: State, job: str, yes: bool, params: dict[str, str]) -> None:
    """Forget JOB's checkpoint and remove its output (of one parameter set: --param)."""
    from minibatch.status import reset_job

    config = state.config
    config.job(job)
    if not yes:
        if not sys.stdin.isatty():  # a pipe or a script cannot answer: it must say --yes
            click.echo(f"error: reset {job} deletes its output; without a terminal, pass --yes", err=True)
            sys.exit(EXIT_USAGE)
        try:
            sure = click.confirm(f"Remove the output of {job} and forget its checkpoint?")
        except click.Abort:  # Ctrl-D, Ctrl-C
            sure = False
        if not sure:  # a usage answer, not a failed run (exit 1)
            click.echo(f"\nerror: {job}: not confirmed; nothing removed", err=True)
            sys.exit(EXIT_USAGE)
    reset_job(config, job, params)
    click.echo(f"{job}: checkpoint forgotten, output removed")


for _command in main.commands.values():
    _command.params.append(
        click.Option(
            ["--config"],
            metavar="PATH",
            expose_value=False,
            callback=config_here,
            help="config.toml to use (also accepted before the command)",
        )  # fmt: skip
    )


def entry() -> None:
    """The command line, as `minibatch.entry` (the script, `python -m minibatch`) runs it."""
    run_and_exit(main)


if __name__ == "__main__":
    entry()
