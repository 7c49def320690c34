"""What every `minibatch` command shares: the config, loaded once on first use, the
exceptions turned into one readable line and the spec's exit status, and common options."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from functools import cached_property
from typing import Any, NoReturn

import click

from minibatch.config import MAX_WORKERS, Config, ConfigError, load_config
from minibatch.units import parse_size

EXIT_DEAD_LETTERS, EXIT_USAGE, EXIT_LOCKED = 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class State:
    """The group's ctx.obj: loads the config once, on first use (so `--help` never needs it)."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.exit_code = 0  # a run's status, set before its summary is printed: see Group.invoke

    @cached_property
    def config(self) -> Config:
        from minibatch.log import configure_logging

        config = load_config(self.config_path)
        configure_logging(config.engine.log_format, config.engine.log_level)
        return config


class Group(click.Group):
    """Turns the library's exceptions into one readable line and the spec's exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        from minibatch.lock import JobLocked
        from minibatch.manifest import ManifestError

        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C outside a run (a run stops gracefully): not click's "Aborted!", 1
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # `minibatch history | head -1`: a closed pipe is not an error
            _closed_pipe(ctx.obj.exit_code if isinstance(ctx.obj, State) else 0)  # but a failed run is one
        except click.UsageError as exc:
            _usage_error(exc)
        except ConfigError as exc:
            click.echo("\n".join(f"error: {line}" for line in str(exc).splitlines()), err=True)
            sys.exit(EXIT_USAGE)
        except JobLocked as exc:
            click.echo(f"error: {exc}; try again once it has ended", err=True)
            sys.exit(EXIT_LOCKED)
        except ManifestError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # a state_dir or output we may not write, a full disk, ...
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:  # the top level's options: click's main would handle these its own way
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:  # `minibatch --help | true`: not exit 1
            _closed_pipe(0)
        except click.UsageError as exc:
            _usage_error(exc)


def _usage_error(exc: click.UsageError) -> NoReturn:
    """One `error:` line, as every other error, not click's "Usage:", "Try ...", "Error: ...";
    a bare `minibatch` is no error: its help."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError) and exc.ctx:
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
    click.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
    sys.exit(EXIT_USAGE)


def _closed_pipe(code: int) -> NoReturn:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush is no error either
    sys.exit(code)


def run_and_exit(command: click.Command) -> None:
    """Run the command line, then end the process without the interpreter's teardown once
    everything is written: destructors of Arrow's and DuckDB's thread pools and of every
    module's objects cost a 1-chunk `run-now` ~0.1-0.3 s of its ~1 s. Not when a thread that
    is not a daemon still runs (the interpreter would wait for it), a tracer or profiler is on,
    or the exit status is a message."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # closed when Python started (`2>&-`): written nowhere, not
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (a failure at the first log line)
    try:
        command.main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    code = 0 if code is None else code
    busy = any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
    traced = sys.gettrace() is not None or sys.getprofile() is not None  # coverage, cProfile write at exit
    if not isinstance(code, int) or busy or traced:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):  # closed by a reader (`| head`)
            stream.flush()
    if "multiprocessing.util" in sys.modules:  # its exit clean-up: the forkserver's /tmp/pymp-* directory
        sys.modules["multiprocessing.util"]._run_finalizers()
    os._exit(code)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    try:
        size = None if value is None else parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size == 0:  # was taken as "not given": the config's budget, silently
        raise click.BadParameter("must be more than 0")
    return size


def _params(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    from minibatch.params import ParamError, parse_assignments

    try:
        return parse_assignments(value)
    except ParamError as exc:
        raise click.BadParameter(str(exc)) from None


params_option = click.option(
    "--param", "params", multiple=True, callback=_params, metavar="NAME=VALUE",
    help="A job parameter, e.g. --param date=2026-11-01 (repeatable).",
)  # fmt: skip


def config_here(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    state = ctx.find_object(State)
    if value is not None and state is not None:  # `run-now JOB --config PATH` works too
        state.config_path = value


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """What every command that runs a job takes."""
    for option in reversed(
        [
            click.option(
                "--workers", type=click.IntRange(1, MAX_WORKERS), help="Worker processes (overrides config)."
            ),
            click.option(
                "--memory-limit",
                callback=_size,
                metavar="SIZE",
                help='Budget for chunk data in flight, e.g. "512MiB" (overrides config).',
            ),  # fmt: skip
            params_option,
            click.option("-q", "--quiet", is_flag=True, help="No progress display."),
            click.option(
                "--json", "as_json", is_flag=True, help="The summary as JSON (no progress display)."
            ),
        ]
    ):
        command = option(command)
    return command
