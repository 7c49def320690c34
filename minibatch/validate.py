"""What `validate` (and every run) checks beyond parsing the config: that each job's function
imports, and what the inputs look like right now."""

from __future__ import annotations

from minibatch.config import Config, ConfigError
from minibatch.jobcode import JobCodeError, forget_package, import_process
from minibatch.layout import OutputLayout
from minibatch.planner import InputError, find_inputs


def check_imports(config: Config, names: list[str] | None = None) -> None:
    """Import the `process` of the named jobs (all by default); raise one ConfigError for all."""
    errors: list[str] = []
    for job in config.jobs.values():
        if job.process and (names is None or job.name in names):
            forget_package(job.process)  # the code as it is now, from this config's directory
            try:
                import_process(job.process, config.base_dir)
            except JobCodeError as exc:
                errors.append(f"jobs.{job.name}.process: {exc}")
    if errors:
        raise ConfigError(errors, config.path)


def check_inputs(config: Config) -> list[str]:
    """Warnings about inputs as they are now: a glob that matches no file (a run would fail).
    A symlink loop, or an input that reaches a job's own output, is an error."""
    warnings, errors = [], []
    for job in config.jobs.values():
        layout = OutputLayout(job.output, reduce=job.reduce_sql is not None)
        try:
            found = find_inputs(config.base_dir, job.inputs, [layout.output, layout.parts, layout.staging])
        except InputError as exc:
            errors.append(f"jobs.{job.name}.input: {exc}")
            continue
        warnings += [f"jobs.{job.name}.input: {p!r} matches no file (yet)" for p in found.missing]
    if errors:
        raise ConfigError(errors, config.path)
    return warnings
