"""minibatch: cron-scheduled batch jobs over Parquet chunks, with a DuckDB manifest.

The importable API; the `minibatch` command is a thin shell over it. Its names are imported
on first use: a worker process imports `minibatch.worker`, which must not pull in the
coordinator's modules with it.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minibatch.config import Config, ConfigError, JobConfig, load_config
    from minibatch.lock import JobLocked
    from minibatch.runner import RunOptions, RunSummary, run_job
    from minibatch.status import job_status, reset_job

_API = {
    "Config": "config",
    "ConfigError": "config",
    "JobConfig": "config",
    "load_config": "config",
    "JobLocked": "lock",
    "RunOptions": "runner",
    "RunSummary": "runner",
    "run_job": "runner",
    "job_status": "status",
    "reset_job": "status",
}

__all__ = [
    "Config",
    "ConfigError",
    "JobConfig",
    "JobLocked",
    "RunOptions",
    "RunSummary",
    "__version__",
    "job_status",
    "load_config",
    "reset_job",
    "run_job",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # the one source of truth is pyproject.toml's, as installed
        from importlib import metadata

        try:
            return metadata.version("minibatch")
        except metadata.PackageNotFoundError:  # a source tree, not installed
            return "0+unknown"
    if name in _API:
        return getattr(import_module(f"minibatch.{_API[name]}"), name)
    raise AttributeError(f"module 'minibatch' has no attribute {name!r}")


def entry() -> None:
    """The `minibatch` script and `python -m minibatch`. multiprocessing runs the script again
    in every worker it starts (as `__mp_main__`), so the script imports only this package; the
    CLI comes in here."""
    try:
        cli = _load_cli()
    except KeyboardInterrupt:  # Ctrl-C while the command loads: nothing has started
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    cli.entry()


def _load_cli() -> Any:  # the minibatch.cli module
    """minibatch.cli, with structlog loaded while rich is hidden. structlog imports rich, when
    installed, for pretty tracebacks in development consoles (~0.13 s of every command's
    start-up); the CLI's logs render exceptions without it (format_exc_info). structlog never
    looks for rich again, so only the CLI does this, before any thread starts: a program that
    imports the API keeps rich tracebacks in its own structlog logs. The progress bar imports
    rich itself."""
    hidden = "rich" not in sys.modules
    if hidden:
        sys.modules["rich"] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        if hidden:
            del sys.modules["rich"]
    return import_module("minibatch.cli")
