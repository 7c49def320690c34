"""config.toml -> frozen dataclasses, validated in one place that collects every error."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minibatch.breaker import BreakerSettings
from minibatch.checking import Checker, Hook, choice, parse_hook, positive_size, state_dir_in, timezone_name
from minibatch.checks import Checks, parse_checks
from minibatch.crossjob import check_dependencies, check_outputs_apart
from minibatch.hive import Shape, parse_shape
from minibatch.inputs import glob_root
from minibatch.params import ParamError, bind, checkpoint_key, job_params, render
from minibatch.textinput import TextFormat, parse_text
from minibatch.units import parse_duration, parse_size

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PROCESS_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_WORKERS = 256  # processes of one run (each holds a lock file and a process slot)


class ConfigError(Exception):
    """Every problem found in a config file, one per line."""

    def __init__(self, errors: list[str], path: Path | None = None) -> None:
        self.errors = errors
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__("\n".join(f"{where}{e}" for e in errors))


@dataclass(frozen=True)
class EngineConfig:
    state_dir: Path
    workers: int
    memory_limit: int
    timezone: str = "UTC"
    log_format: str = "console"
    log_level: str = "info"
    metrics_addr: str = "127.0.0.1:9464"
    api_addr: str = "127.0.0.1:9465"  # the daemon's HTTP API (api.py); "" is off
    api_token_file: Path | None = None  # a bearer token, required for a bind beyond loopback
    stop_grace: float = 30.0
    worker_memory_limit: int | None = None
    on_failure: Hook | None = None
    on_success: Hook | None = None
    executor: str = "local"  # local | dask
    dask_scheduler: str | None = None


@dataclass(frozen=True)
class JobConfig:
    name: str
    inputs: tuple[str, ...]
    output: Path
    process: str | None = None
    sql: str | None = None
    reduce_sql: str | None = None
    description: str = ""
    columns: tuple[str, ...] | None = None
    chunk_bytes: int = 64 * 2**20
    schedule: str | None = None
    timezone: str = "UTC"
    watch: float | None = None
    retries: int = 2
    retry_backoff: float = 1.0
    timeout: float = 3600.0
    depends_on: tuple[str, ...] = ()
    workers: int = 1
    memory_limit: int = 2**30
    stop_grace: float = 30.0
    worker_memory_limit: int | None = None
    breaker: BreakerSettings = BreakerSettings()
    catchup: str = "once"  # once | skip: what to do about fire times missed while down
    on_failure: Hook | None = None
    on_success: Hook | None = None
    executor: str = "local"  # local | dask: where chunks run
    dask_scheduler: str | None = None  # "tcp://host:8786" for executor = "dask"
    version: str | None = None  # set: the module's source no longer decides what is stale
    params: tuple[str, ...] = ()  # its parameters' names, `date` first (see params.py)
    param_defaults: tuple[tuple[str, str], ...] = ()
    output_template: str | None = None  # the output as configured, when it has {placeholders}
    values: tuple[tuple[str, Any], ...] = ()  # the parameter set bound for a run (params.bound)
    shape: Shape = Shape()  # partition_by, target_file_bytes, row_group_rows (hive.py)
    checks: Checks = Checks()  # checks, max_bad_fraction, quarantine, output_checks (checks.py)
    text: TextFormat | None = None  # format = "csv" | "ndjson" (textinput.py); None: Parquet

    def bind(self, base_dir: Path, given: Mapping[str, str], now: datetime) -> JobConfig:
        """This job with one parameter set bound: input globs and output rendered, and its key."""
        if not self.params:
            if given:
                raise ParamError(f"job {self.name!r} has no parameters (it uses no {{name}} or $name)")
            return self
        from minibatch.schedule import parse_crontab

        schedule = parse_crontab(self.schedule, self.timezone) if self.schedule else None
        values = bind(self.params, dict(self.param_defaults), given, schedule, now, self.name)
        assert self.output_template is not None
        return replace(
            self,
            inputs=tuple(render(pattern, values) for pattern in self.inputs),
            output=(output := (base_dir / render(self.output_template, values)).resolve()),
            values=tuple(values.items()),
            checks=self.checks.beside(output),
        )

    @property
    def key(self) -> str:
        """The checkpoint this job (with its bound parameters) resumes: manifest, lock, claim."""
        return checkpoint_key(self.name, dict(self.values))

    def to_json(self) -> str:
        """The settings a run used, for the manifest and the run report."""
        import dataclasses
        import json

        settings = dataclasses.asdict(self)
        for hook in ("on_failure", "on_success"):  # webhook URLs and commands may hold tokens
            settings[hook] = "set" if settings[hook] else None
        return json.dumps(settings, default=str)


@dataclass(frozen=True)
class Config:
    path: Path
    base_dir: Path
    engine: EngineConfig
    jobs: dict[str, JobConfig] = field(default_factory=dict)

    def job(self, name: str) -> JobConfig:
        if name not in self.jobs:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise ConfigError([f"unknown job {name!r} (jobs in this config: {known})"], self.path)
        return self.jobs[name]

    def bound(self, name: str, params: Mapping[str, str]) -> JobConfig:
        """Job `name` with one parameter set bound (see JobConfig.bind); ConfigError if bad."""
        try:
            return self.job(name).bind(self.base_dir, params, datetime.now(UTC))
        except ParamError as exc:
            raise ConfigError([str(exc)], self.path) from None


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


ENGINE_KEYS = {
    "state_dir", "workers", "memory_limit", "timezone", "log_format",
    "log_level", "metrics_addr", "stop_grace", "worker_memory_limit", "on_failure", "on_success",
    "executor", "dask_scheduler", "api_addr", "api_token_file",
}  # fmt: skip
JOB_KEYS = {
    "description", "input", "output", "process", "sql", "reduce_sql", "columns", "chunk_bytes", "schedule",
    "timezone", "watch", "retries", "retry_backoff", "timeout", "depends_on", "workers", "memory_limit",
    "stop_grace", "worker_memory_limit", "breaker_failures", "breaker_rate", "breaker_window",
    "breaker_cooldown", "catchup", "on_failure", "on_success", "executor", "dask_scheduler", "version",
    "params", "partition_by", "target_file_bytes", "row_group_rows", "checks", "max_bad_fraction",
    "quarantine", "output_checks", "output_rows_change", "format", "schema", "csv_delimiter", "csv_header",
}  # fmt: skip
LOG_LEVELS, EXECUTORS = ("debug", "info", "warning", "error"), ("local", "dask")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file; raise ConfigError listing every problem."""
    config_path = Path(path or os.environ.get("MINIBATCH_CONFIG") or "config.toml").absolute()
    try:
        with config_path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {config_path}"]) from None
    except UnicodeDecodeError as exc:
        problem = f"cannot read config: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([problem], config_path) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"cannot read config: {exc}"], config_path) from None
    return parse_config(raw, config_path)


def parse_config(raw: dict[str, Any], config_path: Path) -> Config:
    errors: list[str] = []
    base_dir = config_path.parent
    for key in sorted(set(raw) - {"minibatch", "jobs"}):
        errors.append(f"{key}: unknown top-level table (expected [minibatch] and [jobs.NAME])")
    engine = _engine(_table(raw, "minibatch", errors), base_dir, errors)
    jobs_raw = _table(raw, "jobs", errors)
    jobs: dict[str, JobConfig] = {}
    for name, table in jobs_raw.items():
        if not JOB_NAME_RE.match(name):
            errors.append(f"jobs.{name!r}: job names must match ^[A-Za-z0-9_-]{{1,64}}$")
        elif not isinstance(table, dict):
            errors.append(f"jobs.{name}: expected a table [jobs.{name}]")
        else:
            jobs[name] = _job(name, table, engine, base_dir, errors)
    check_dependencies(jobs, errors)
    check_outputs_apart(jobs, config_path, engine.state_dir, errors)
    if errors:
        raise ConfigError(errors, config_path)
    return Config(path=config_path, base_dir=base_dir, engine=engine, jobs=jobs)


def _table(raw: dict[str, Any], key: str, errors: list[str]) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        errors.append(f"{key}: expected a table [{key}]")
        return {}
    return value


def _engine(table: dict[str, Any], base_dir: Path, errors: list[str]) -> EngineConfig:
    c = Checker(table, "minibatch", errors)
    c.unknown_keys(ENGINE_KEYS)
    log_format = choice(c, "log_format", ("console", "json"), "console")
    log_level = c.get("log_level", str, "info").lower()
    if log_level not in LOG_LEVELS:
        c.error("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    return EngineConfig(
        state_dir=state_dir_in(c, base_dir),
        workers=c.positive_int("workers", default_workers(), MAX_WORKERS),
        memory_limit=positive_size(c, "memory_limit", 2**30),
        timezone=timezone_name(c, "UTC"),
        log_format=log_format,
        log_level=log_level,
        metrics_addr=_addr(c, "metrics_addr", "127.0.0.1:9464"),
        **_api(c, base_dir),
        stop_grace=c.parsed("stop_grace", parse_duration, 30.0),
        worker_memory_limit=c.parsed("worker_memory_limit", parse_size, None),
        on_failure=_hook(c, "on_failure", None),
        on_success=_hook(c, "on_success", None),
        executor=choice(c, "executor", EXECUTORS, "local"),
        dask_scheduler=c.get("dask_scheduler", str),
    )


def _addr(c: Checker, key: str, default: str) -> str:
    addr = c.get(key, str, default)
    host, _, port = addr.rpartition(":")
    if addr and not (host and port.isdigit() and 0 < int(port) < 65536):
        c.error(key, f'expected "host:port" or "" (off), got {addr!r}')
        return default
    return str(addr)


def _api(c: Checker, base_dir: Path) -> dict[str, Any]:
    """api_addr and api_token_file: beyond loopback, the API answers only with the token."""
    addr = _addr(c, "api_addr", "127.0.0.1:9465")
    token = c.get("api_token_file", str)
    host = addr.rpartition(":")[0].strip("[]")
    if addr and not token and host not in ("127.0.0.1", "localhost", "::1"):
        c.error("api_addr", f"{addr} is reachable from other machines: set api_token_file (a bearer token)")
    return {"api_addr": addr, "api_token_file": base_dir / token if token else None}


def _job(
    name: str, table: dict[str, Any], engine: EngineConfig, base_dir: Path, errors: list[str]
) -> JobConfig:
    c = Checker(table, f"jobs.{name}", errors)
    c.unknown_keys(JOB_KEYS)
    inputs = c.string_list("input")
    if not inputs and ("input" not in table or inputs is not None):
        c.error("input", "missing (a glob or a list of globs of Parquet files)")
    output = c.get("output", str)
    if not output and ("output" not in table or output is not None):
        c.error("output", "missing (a directory the job owns)")
    output_path = (base_dir / output).resolve() if output else base_dir / f"out/{name}"
    _check_process_sql(c, table)
    params, defaults = job_params(c, inputs or (), output)
    _check_output_outside_inputs(c, inputs or (), output_path, base_dir)
    checks = parse_checks(c, output_path, base_dir, bool(params))
    if checks.quarantine is not None:  # written to like an output: never among the inputs
        _check_output_outside_inputs(c, inputs or (), checks.quarantine, base_dir, "quarantine")
    retries = c.get("retries", int, 2)
    if retries < 0:
        c.error("retries", f"must be 0 or more, got {retries}")
    return JobConfig(
        name=name,
        inputs=inputs or (),
        output=output_path,
        process=c.get("process", str),
        sql=c.get("sql", str),
        reduce_sql=c.get("reduce_sql", str),
        description=c.get("description", str, ""),
        columns=c.string_list("columns"),
        chunk_bytes=positive_size(c, "chunk_bytes", 64 * 2**20),
        schedule=_schedule(c),
        timezone=timezone_name(c, engine.timezone),
        watch=c.parsed("watch", parse_duration, None),
        retries=max(retries, 0),
        retry_backoff=c.parsed("retry_backoff", parse_duration, 1.0),
        timeout=c.positive_duration("timeout", 3600.0),  # 0 would time every chunk out
        depends_on=c.string_list("depends_on") or (),
        workers=c.positive_int("workers", engine.workers, MAX_WORKERS),
        memory_limit=positive_size(c, "memory_limit", engine.memory_limit),
        stop_grace=c.parsed("stop_grace", parse_duration, engine.stop_grace),
        worker_memory_limit=c.parsed("worker_memory_limit", parse_size, engine.worker_memory_limit),
        breaker=_breaker(c),
        catchup=choice(c, "catchup", ("once", "skip"), "once"),
        on_failure=_hook(c, "on_failure", engine.on_failure),
        on_success=_hook(c, "on_success", engine.on_success),
        version=_version(c),
        params=params,
        param_defaults=tuple(sorted(defaults.items())),
        output_template=output if params else None,
        shape=parse_shape(c),
        checks=checks,
        text=parse_text(c),
        **_executor(c, engine),
    )


def _version(c: Checker) -> str | None:
    value = c.get("version", (str, int))
    return None if value is None else str(value)


def _executor(c: Checker, engine: EngineConfig) -> dict[str, Any]:
    """executor / dask_scheduler of a job (or the engine's), checked together."""
    executor = choice(c, "executor", EXECUTORS, engine.executor)
    scheduler = c.get("dask_scheduler", str, engine.dask_scheduler)
    if executor == "dask":
        if not scheduler:
            c.error(
                "dask_scheduler", 'executor = "dask" needs the scheduler\'s address, e.g. "tcp://host:8786"'
            )
        elif not re.match(r"^[a-z+]+://\S+$", scheduler):
            c.error("dask_scheduler", f'expected an address like "tcp://host:8786", got {scheduler!r}')
        if importlib.util.find_spec("distributed") is None:
            c.error("executor", "\"dask\" needs Dask's distributed package: pip install 'minibatch[dask]'")
    return {"executor": executor, "dask_scheduler": scheduler}


def _hook(c: Checker, key: str, default: Hook | None) -> Hook | None:
    if key not in c.table:
        return default
    return parse_hook(c.table[key], f"{c.where}.{key}", c.errors)


def _breaker(c: Checker) -> BreakerSettings:
    default = BreakerSettings()
    rate = c.get("breaker_rate", (int, float), default.rate)
    if not 0 < rate <= 1:
        c.error("breaker_rate", f"must be in (0, 1], got {rate}")
        rate = default.rate
    failures = c.get("breaker_failures", int, default.failures)
    if failures < 0:
        c.error("breaker_failures", f"must be 0 (off) or more, got {failures}")
        failures = default.failures
    return BreakerSettings(
        failures=failures,
        rate=float(rate),
        window=c.positive_int("breaker_window", default.window),
        cooldown=c.parsed("breaker_cooldown", parse_duration, default.cooldown),
    )


def _check_process_sql(c: Checker, table: dict[str, Any]) -> None:
    process, sql = c.get("process", str), c.get("sql", str)
    if "process" in table and "sql" in table:
        c.error("process", "set exactly one of process / sql, not both")
    elif "process" not in table and "sql" not in table:
        c.error("process", 'missing: set process = "module:function" or sql = "SELECT ..."')
    if process is not None and not PROCESS_RE.match(process):
        c.error("process", f'expected "package.module:function", got {process!r}')
    if sql is not None and not sql.strip():
        c.error("sql", "is empty")


def _check_output_outside_inputs(c: Checker, inputs: tuple[str, ...], output: Path, base_dir: Path,
                                 key: str = "output") -> None:  # fmt: skip
    for pattern in inputs:
        root = glob_root(base_dir, pattern)
        if output == root or root in output.parents:
            c.error(key, f"{output} is inside the directory of input glob {pattern!r}")
        elif output in root.parents:
            c.error(key, f"{output} contains input glob {pattern!r} (reset would delete inputs)")


def _schedule(c: Checker) -> str | None:
    schedule = c.get("schedule", str)
    if schedule is None:
        return None
    from minibatch.schedule import parse_crontab  # APScheduler only when a job has a schedule

    try:
        parse_crontab(schedule, "UTC")
    except ValueError as exc:
        c.error("schedule", str(exc))
        return None
    return str(schedule)
