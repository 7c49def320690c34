"""minibatch: cron-scheduled batch jobs over Parquet chunks, with a DuckDB manifest.

The importable API; the `minibatch` command is a thin shell over it.
"""

from minibatch.config import Config, ConfigError, JobConfig, load_config
from minibatch.lock import JobLocked
from minibatch.runner import RunOptions, RunSummary, run_job
from minibatch.status import job_status, reset_job

__all__ = [
    "Config",
    "ConfigError",
    "JobConfig",
    "JobLocked",
    "RunOptions",
    "RunSummary",
    "job_status",
    "load_config",
    "reset_job",
    "run_job",
]
