"""minibatch: cron-scheduled batch jobs over Parquet chunks, with a DuckDB manifest.

The importable API; the `minibatch` command is a thin shell over it. Its names are imported
on first use: a worker process imports `minibatch.worker`, which must not pull in the
coordinator's modules with it.
"""

from __future__ import annotations

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
    """The `minibatch` script. multiprocessing runs the script again in every worker it starts
    (as `__mp_main__`), so the script imports only this package; the CLI comes in here."""
    from minibatch.cli import entry as cli_entry

    cli_entry()
