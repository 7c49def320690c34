"""What `validate` (and every run) checks beyond parsing the config: that each job's function
imports and takes (table, ctx), that its SQL binds against its inputs' columns, and what the
inputs look like right now. A broken job fails here, in a second, not after its retries."""

from __future__ import annotations

import functools
import inspect
import os
import stat
import threading
from pathlib import Path
from typing import Any

from minibatch.config import Config, ConfigError, load_config
from minibatch.inputs import InputError, find_inputs
from minibatch.jobcode import JobCodeError, code_paths, forget_package, import_process
from minibatch.layout import OutputLayout
from minibatch.params import SAMPLE, in_utc, placeholders, sql_values


def validate_config(config: Config) -> list[str]:
    """Every check, for every job; raises one ConfigError for all errors, returns warnings."""
    check_imports(config)
    return check_inputs(config)


_IMPORTING = threading.Lock()


def check_imports(config: Config, names: list[str] | None = None) -> None:
    """Import the `process` of the named jobs (all by default) and check that it can be called
    as f(table, ctx); bind their `sql` to their first input's columns. One ConfigError for all."""
    errors: list[str] = []
    with _IMPORTING:  # runs in threads of one process (daemon, backfill) re-import job code
        for job in config.jobs.values():
            if names is not None and job.name not in names:
                continue
            if job.process:
                errors += _check_function(job.name, job.process, config)
            elif job.sql:
                errors += _check_sql(job.name, job.sql, job.columns, config)
            for key in ("sql", "reduce_sql"):
                if queries := _dropped_queries(getattr(job, key)):  # DuckDB returns the last one's rows
                    errors.append(f"jobs.{job.name}.{key}: only its last statement may be a query, "
                                  f"the rows of {queries} would be dropped")  # fmt: skip
    if errors:
        raise ConfigError(errors, config.path)


def _check_function(name: str, process: str, config: Config) -> list[str]:
    forget_package(process)  # the code as it is now, from this config's directory
    try:
        func = import_process(process, config.base_dir)
    except JobCodeError as exc:
        return [f"jobs.{name}.process: {exc}"]
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []  # a builtin or C function: nothing to check
    try:
        signature.bind(object(), object())
    except TypeError:
        return [
            f"jobs.{name}.process: {process} cannot be called as f(table, ctx): its signature is {signature}"
        ]
    return []


def _check_sql(name: str, sql: str, columns: tuple[str, ...] | None, config: Config) -> list[str]:
    """Bind the SQL against an empty `chunk` with the first input file's columns (DuckDB binds
    without running it). Without input yet, nothing to bind to."""
    import duckdb

    try:
        files = find_inputs(config.base_dir, config.jobs[name].inputs).files
    except InputError:
        return []  # reported by check_inputs
    for path in files[:1]:
        shared, lock = _binder()
        try:
            # A connection and a transaction of its own: what the SQL creates (a macro, say) is gone after.
            with lock, open(path, "rb") as handle, shared.cursor() as con:
                con.begin()
                rows = con.read_parquet(f"/proc/self/fd/{handle.fileno()}")
                if columns:
                    rows = rows.project(*[duckdb.ColumnExpression(c) for c in columns])
                rows.limit(0).create_view("chunk", replace=True)
                sample = {p: SAMPLE.get(p, "x") for p in config.jobs[name].params}  # $date binds a DATE
                con.sql(sql, params=sql_values(sql, sample))
                con.rollback()
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.ParserException | duckdb.BinderException | duckdb.CatalogException):
                first = str(exc).strip().splitlines()[0]
                return [f"jobs.{name}.sql: {first} (bound against the columns of {path})"]
            return []  # an unreadable input is the run's bad file, not the SQL's fault
        except OSError:
            return []
    return []


def _dropped_queries(sql: str | None) -> str | None:
    """Queries before the last statement (setup such as CREATE MACRO may come first), quoted;
    None for none, or for SQL that does not parse (binding says why)."""
    import duckdb

    try:
        statements = _binder()[0].extract_statements(sql) if sql else []
    except duckdb.Error:
        return None
    early = [s.query.strip() for s in statements[:-1] if s.type == duckdb.StatementType.SELECT]
    return ", ".join(repr(q) for q in early) or None


@functools.cache
def _binder() -> tuple[Any, threading.Lock]:
    """One in-memory DuckDB per process (a new one costs ~30 ms a run), used by one thread at a
    time: its `chunk` view is shared. No file cache: /proc/self/fd/N names another file each time."""
    import duckdb

    from minibatch.reading import SQL_CONFIG  # the settings the workers run the SQL with

    return in_utc(duckdb.connect(":memory:", config=SQL_CONFIG)), threading.Lock()


def check_inputs(config: Config) -> list[str]:
    """Warnings about inputs as they are now: a glob that matches no file (a run would fail).
    A symlink loop, or an input that reaches a job's own output, is an error."""
    warnings, errors = [], []
    for job in config.jobs.values():
        layout = OutputLayout.of(job)
        if problem := layout.not_a_directory():
            errors.append(f"jobs.{job.name}.output: {problem}")
        try:
            forbidden = [layout.output, layout.parts, layout.staging]
            found = find_inputs(config.base_dir, job.inputs, forbidden, read={})  # each file opened too
        except InputError as exc:
            errors.append(f"jobs.{job.name}.input: {exc}")
            continue
        missing = [p for p in found.missing if not placeholders(p)]  # a parameter set's: checked per run
        warnings += [f"jobs.{job.name}.input: {p!r} matches no file (yet)" for p in missing]
        warnings += [f"jobs.{job.name}.input: {bad} (a run would fail)" for bad in found.unreadable]
    if errors:
        raise ConfigError(errors, config.path)
    return warnings


def check_permissions(config: Config) -> None:
    """Like sshd's StrictModes: refuse config or job code that others could have changed.

    It runs before any job module is imported (importing one runs it), so the job code's
    files are found by walking the config directory, not by the import system."""
    paths = [config.path, config.base_dir]
    for job in config.jobs.values():
        if job.process:
            paths += code_paths(config.base_dir, job.process)
    paths.append(config.engine.state_dir)  # the manifest, locks and reports
    errors = [
        f"{path} is writable by group or others; refusing to run it (chmod go-w {path})"
        for path in dict.fromkeys(paths)
        if _writable_by_others(path)
    ]
    if errors:
        raise ConfigError(errors)


def _writable_by_others(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    except FileNotFoundError:  # the state_dir of a first start
        return False


def load_daemon_config(path: str | None) -> Config:
    """The config, its permissions checked before any job module is imported."""
    config = load_config(path)
    check_permissions(config)
    check_imports(config)
    return config


def reload_config(path: str | None, state_dir: Path) -> Config:
    """The daemon's config again (SIGHUP), checked in a fresh process (job modules imported in
    the daemon are stale). Its state_dir cannot change: the daemon's lock and manifest are the
    old one's, and a dependent would read the old manifest while its dependency ran on the new."""
    check_permissions(load_config(path))  # before any code of the new config runs
    validate_in_fresh_process(path)
    config = load_daemon_config(path)
    if config.engine.state_dir.resolve() != state_dir.resolve():  # (respelled: the same place)
        raise ConfigError([f"minibatch.state_dir: {config.engine.state_dir} is not {state_dir}, and a "
                           "reload cannot move the daemon's state: restart it"])  # fmt: skip
    return config


VALIDATE_TIMEOUT = 30.0  # seconds: the daemon waits for it, signals too (systemd stops in 45)


def validate_in_fresh_process(config_path: str | None) -> None:
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "minibatch",
        *(["--config", config_path] if config_path else []),
        "validate",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=VALIDATE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError([f"checking the config took over {VALIDATE_TIMEOUT:g}s (a job module that hangs "
                           "when imported?)"]) from None  # fmt: skip
    if result.returncode != 0:
        lines = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.strip()]
        raise ConfigError(lines or [f"validate exited with status {result.returncode}"])
