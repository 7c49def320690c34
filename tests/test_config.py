"""config.toml validation (SPEC: "config.toml") and crontab semantics (minibatch.schedule)."""

from __future__ import annotations

import sys
import textwrap
import time
import tomllib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minibatch.config import ConfigError, load_config, parse_config
from minibatch.crossjob import _clashes
from minibatch.layout import OutputLayout, default_held
from minibatch.schedule import next_fire_times, parse_crontab
from minibatch.validate import check_imports

EXAMPLE = Path(__file__).resolve().parent.parent / "config.toml"

GOOD_JOB = """
[jobs.a]
input = "data/*.parquet"
output = "out/a"
process = "mod:func"
"""


def _parse(text: str, base: Path = Path("/srv/mb")):
    return parse_config(tomllib.loads(textwrap.dedent(text)), base / "config.toml")


def _errors(text: str, base: Path = Path("/srv/mb")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(text, base)
    errors = info.value.errors
    assert errors, "a ConfigError must list its problems"
    assert all(isinstance(e, str) and e for e in errors)
    for error in errors:  # the message carries every error, one per line
        assert error in str(info.value)
    return errors


def _named(errors: list[str], where: str) -> list[str]:
    """The errors that name `where` ("jobs.a.retries", "minibatch.workers") as their subject."""
    return [e for e in errors if e.startswith(f"{where}:")]


def _job(**overrides: str | None) -> str:
    """A [jobs.a] table: the good job with keys replaced (value None drops the key)."""
    keys = {"input": '"data/*.parquet"', "output": '"out/a"', "process": '"mod:func"'}
    keys.update(overrides)
    body = "\n".join(f"{k} = {v}" for k, v in keys.items() if v is not None)
    return f"[jobs.a]\n{body}\n"


# ------------------------------------------------------------------ valid configs


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert config.path == EXAMPLE
    assert config.base_dir == EXAMPLE.parent
    assert {"carrier_delays", "long_haul", "late_flights"} <= set(config.jobs)
    delays = config.job("carrier_delays")
    assert delays.process == "jobs.flights:delays"
    assert delays.output == EXAMPLE.parent / "out" / "carrier_delays"
    assert delays.inputs == ("data/flights/*.parquet",)
    assert delays.schedule == "0 2 * * *"
    assert delays.timezone == "Europe/Berlin"
    assert config.engine.state_dir == EXAMPLE.parent / ".minibatch"
    for job in config.jobs.values():
        assert (job.process is None) != (job.sql is None)
        assert job.output.is_absolute()
        assert job.chunk_bytes >= 1 and job.timeout > 0


def test_example_config_imports(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    try:
        check_imports(load_config(EXAMPLE))
    finally:  # do not leave the example's `jobs` package cached for other tests; only it: DuckDB's
        for name in set(sys.modules) - before:  # extension, imported here first, aborts the process
            if name == "jobs" or name.startswith("jobs."):  # when it is imported a second time
                sys.modules.pop(name, None)


def test_values_and_defaults():
    config = _parse(
        """
        [minibatch]
        state_dir = "state"
        workers = 3
        memory_limit = "1GiB"
        timezone = "Europe/Berlin"
        log_format = "json"
        log_level = "DEBUG"
        metrics_addr = ""

        [jobs.a]
        input = ["data/*.parquet", "more/*.parquet"]
        output = "out/a"
        sql = "SELECT * FROM chunk"
        reduce_sql = "SELECT count(*) FROM parts"
        columns = ["x", "y"]
        chunk_bytes = "1MiB"
        schedule = "@daily"
        watch = "30s"
        retries = 0
        retry_backoff = "500ms"
        timeout = "1h30m"
        depends_on = ["b"]
        workers = 1
        memory_limit = "64MB"

        [jobs.b]
        input = "data/x.parquet"
        output = "/abs/out/b"
        process = "pkg.mod:fn"
        timezone = "UTC"
        """
    )
    engine = config.engine
    assert engine.state_dir == Path("/srv/mb/state")
    assert (engine.workers, engine.memory_limit) == (3, 2**30)
    assert (engine.log_format, engine.log_level, engine.metrics_addr) == ("json", "debug", "")
    a, b = config.job("a"), config.job("b")
    assert a.inputs == ("data/*.parquet", "more/*.parquet")
    assert a.output == Path("/srv/mb/out/a")
    assert a.columns == ("x", "y")
    assert (a.chunk_bytes, a.memory_limit, a.workers) == (2**20, 64 * 10**6, 1)
    assert (a.watch, a.retry_backoff, a.timeout, a.retries) == (30.0, 0.5, 5400.0, 0)
    assert a.timezone == "Europe/Berlin"  # inherited from [minibatch]
    assert a.depends_on == ("b",)
    # the documented defaults
    assert b.output == Path("/abs/out/b")
    assert (b.chunk_bytes, b.retries, b.retry_backoff, b.timeout) == (64 * 2**20, 2, 1.0, 3600.0)
    assert (b.workers, b.memory_limit, b.timezone) == (3, 2**30, "UTC")
    assert b.schedule is None and b.watch is None and b.columns is None


def test_engine_defaults_and_empty_config():
    config = _parse("")
    assert config.jobs == {}
    assert config.engine.state_dir == Path("/srv/mb/.minibatch")
    assert config.engine.workers >= 1
    assert config.engine.timezone == "UTC"


def test_unknown_job_lookup_is_a_config_error():
    config = _parse(GOOD_JOB)
    with pytest.raises(ConfigError, match="nope"):
        config.job("nope")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "config.toml"
    broken.write_text("[jobs.a\ninput = ")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert info.value.path == broken
    bad = tmp_path / "bad.toml"
    bad.write_text(_job(retries='"3"'))
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.path == bad
    assert _named(info.value.errors, "jobs.a.retries")
    assert str(bad) in str(info.value)


# --------------------------------------------------------------- each bad config


def test_unknown_engine_key():
    errors = _errors("[minibatch]\nworkerz = 2\n" + GOOD_JOB)
    assert _named(errors, "minibatch.workerz")
    assert "unknown" in errors[0]


def test_unknown_job_key():
    errors = _errors(_job(retires="3"))
    assert len(_named(errors, "jobs.a.retires")) == 1
    assert "unknown key" in _named(errors, "jobs.a.retires")[0]


def test_unknown_top_level_table():
    errors = _errors("[job.a]\nx = 1\n")
    assert any(e.startswith("job") and "unknown" in e for e in errors)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("retries", '"3"'),
        ("retries", "true"),
        ("retries", "1.5"),
        ("workers", '"2"'),
        ("workers", "true"),
        ("description", "5"),
        ("process", "5"),
        ("sql", "[1]"),
        ("columns", "5"),
        ("columns", "[1, 2]"),
        ("input", "5"),
        ("input", '["ok/*.parquet", 3]'),
        ("output", "5"),
        ("output", '["out/a"]'),
        ("depends_on", "5"),
        ("schedule", "5"),
        ("timezone", "1"),
        ("reduce_sql", "true"),
    ],
)
def test_wrong_type_names_job_and_key(key, value):
    errors = _errors(_job(**{key: value}))
    assert _named(errors, f"jobs.a.{key}"), errors


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("workers", '"2"'),
        ("workers", "0"),
        ("workers", "true"),
        ("memory_limit", '"12XB"'),
        ("memory_limit", "0"),
        ("memory_limit", "-1"),
        ("timezone", '"Mars/Olympus_Mons"'),
        ("timezone", '"Europe"'),
        ("timezone", '""'),
        ("log_format", '"xml"'),
        ("log_level", '"loud"'),
        ("stop_grace", '"soon"'),
        ("state_dir", "5"),
    ],
)
def test_bad_engine_values(key, value):
    errors = _errors(f"[minibatch]\n{key} = {value}\n" + GOOD_JOB)
    assert _named(errors, f"minibatch.{key}"), errors


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_bytes", '"12XB"'),
        ("chunk_bytes", '"64 mega"'),
        ("chunk_bytes", "0"),
        ("chunk_bytes", "-5"),
        ("chunk_bytes", "true"),
        ("memory_limit", '"lots"'),
        ("memory_limit", '"0MiB"'),
        ("worker_memory_limit", '"1ZiB"'),
    ],
)
def test_bad_size(key, value):
    errors = _errors(_job(**{key: value}))
    assert _named(errors, f"jobs.a.{key}"), errors


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("timeout", '"abc"'),
        ("timeout", '"10 minutes"'),
        ("timeout", "-1"),
        ("watch", '"often"'),
        ("watch", "true"),
        ("retry_backoff", '"1x"'),
        ("retry_backoff", '"-1s"'),
        ("stop_grace", '"later"'),
    ],
)
def test_bad_duration(key, value):
    errors = _errors(_job(**{key: value}))
    assert _named(errors, f"jobs.a.{key}"), errors


@pytest.mark.parametrize(
    "schedule",
    [
        "* * * *",
        "0 2 * * * *",
        "",
        "every day",
        "61 * * * *",
        "0 24 * * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "0 0 * * funday",
        "0 0 * * 5-1",
        "0 0 * * */0",
        "@sometimes",
    ],
)
def test_bad_crontab(schedule):
    errors = _errors(_job(schedule=f'"{schedule}"'))
    assert _named(errors, "jobs.a.schedule"), errors


@pytest.mark.parametrize("timezone", ["Mars/Olympus_Mons", "Europe", "", "UTC ", "/etc/localtime"])
def test_bad_timezone(timezone):
    errors = _errors(_job(timezone=f'"{timezone}"'))
    assert _named(errors, "jobs.a.timezone"), errors


def test_negative_retries():
    assert _named(_errors(_job(retries="-1")), "jobs.a.retries")


@pytest.mark.parametrize("key", ["input", "output"])
def test_missing_input_or_output(key):
    errors = _errors(_job(**{key: None}))
    named = _named(errors, f"jobs.a.{key}")
    assert named and "missing" in named[0]


def test_empty_output_is_an_error():
    assert _named(_errors(_job(output='""')), "jobs.a.output")


def test_empty_input_list_is_an_error():
    assert _named(_errors(_job(input="[]")), "jobs.a.input")


def test_empty_input_string_is_an_error():
    assert _named(_errors(_job(input='""')), "jobs.a.input")


def test_both_process_and_sql():
    errors = _errors(_job(sql='"SELECT 1"'))
    assert _named(errors, "jobs.a.process") or _named(errors, "jobs.a.sql")


def test_neither_process_nor_sql():
    errors = _errors(_job(process=None))
    assert _named(errors, "jobs.a.process") or _named(errors, "jobs.a.sql")


def test_empty_sql():
    assert _named(_errors(_job(process=None, sql='"   "')), "jobs.a.sql")


@pytest.mark.parametrize(
    "process",
    ["mod", "mod:", ":func", "mod:func:x", "mod.func", "1mod:func", "mod:fu-nc", "mod func:f", ""],
)
def test_malformed_process(process):
    assert _named(_errors(_job(process=f'"{process}"')), "jobs.a.process")


@pytest.mark.parametrize("process", ["mod:func", "pkg.sub.mod:func", "_m:_f", "jobs.flights:delays"])
def test_well_formed_process(process):
    assert _parse(_job(process=f'"{process}"')).job("a").process == process


def test_depends_on_unknown_job():
    errors = _errors(_job(depends_on='["ghost"]'))
    named = _named(errors, "jobs.a.depends_on")
    assert named and "ghost" in named[0]


def test_dependency_cycle():
    second = _job(depends_on='["a"]', output='"out/b"').replace("[jobs.a]", "[jobs.b]")
    text = _job(depends_on='["b"]') + second
    errors = _errors(text)
    cycle = [e for e in errors if "cycle" in e]
    assert len(cycle) == 1
    assert cycle[0].startswith(("jobs.a.depends_on:", "jobs.b.depends_on:"))
    assert "a -> b -> a" in cycle[0] or "b -> a -> b" in cycle[0]


def test_self_dependency_cycle():
    errors = _errors(_job(depends_on='["a"]'))
    named = _named(errors, "jobs.a.depends_on")
    assert named and "cycle" in named[0]


def test_long_cycle_and_acyclic_chain():
    jobs = "".join(
        _job(depends_on=f'["{dep}"]', output=f'"out/{name}"').replace("jobs.a", f"jobs.{name}")
        for name, dep in [("a", "b"), ("b", "c"), ("c", "d"), ("d", "b")]
    )
    errors = _errors(jobs)
    assert [e for e in errors if "cycle" in e and "b -> c -> d -> b" in e]
    chain = "".join(
        _job(depends_on=f"[{deps}]", output=f'"out/{name}"').replace("jobs.a", f"jobs.{name}")
        for name, deps in [("a", '"b", "c"'), ("b", '"c"'), ("c", "")]
    )
    assert _parse(chain).job("a").depends_on == ("b", "c")  # a diamond is no cycle


@pytest.mark.parametrize(
    ("inputs", "output"),
    [
        ('"data/*.parquet"', '"data/out"'),
        ('"data/*.parquet"', '"data"'),
        ('"data/**/*.parquet"', '"data/deep/er/out"'),
        ('"data/x.parquet"', '"data/out"'),
        ('["other/*.parquet", "data/2026-*/*.parquet"]', '"data/out"'),
        ('"data/*.parquet"', '"data/../data/out"'),
        ('"/srv/mb/data/*.parquet"', '"data/out"'),
        ('"data/*.parquet"', '"/srv/mb/data/out"'),
    ],
)
def test_output_inside_input_glob_directory(inputs, output):
    errors = _errors(_job(input=inputs, output=output))
    named = _named(errors, "jobs.a.output")
    assert named and "inside" in named[0]


@pytest.mark.parametrize(
    ("inputs", "output"),
    [
        ('"data/*.parquet"', '"out/a"'),
        ('"data/flights/*.parquet"', '"data/results"'),
        ('"data/*.parquet"', '"database"'),
    ],
)
def test_output_beside_inputs_is_fine(inputs, output):
    _parse(_job(input=inputs, output=output))


@pytest.mark.parametrize("name", ["bad name", "a.b", "x" * 65, "jöb", "a/b", "a;drop"])
def test_bad_job_name(name):
    errors = _errors(_job().replace("[jobs.a]", f'[jobs."{name}"]'))
    assert any(e.startswith("jobs.") and name in e for e in errors), errors


@pytest.mark.parametrize("name", ["a", "A-b_9", "x" * 64])
def test_good_job_name(name):
    assert name in _parse(_job().replace("[jobs.a]", f'[jobs."{name}"]')).jobs


def test_job_that_is_not_a_table():
    assert _named(_errors("[jobs]\na = 5\n"), "jobs.a")


def test_every_error_is_reported_at_once():
    errors = _errors(
        """
        [minibatch]
        workerz = 1
        memory_limit = "12XB"

        [jobs.a]
        input = "data/*.parquet"
        output = "out/a"
        process = "mod:func"
        sql = "SELECT 1"
        chunk_bytes = "huge"
        timeout = "abc"
        schedule = "* * * *"
        timezone = "Nowhere/Land"
        depends_on = ["b", "ghost"]
        colour = "blue"

        [jobs.b]
        input = "data/*.parquet"
        output = "data/b"
        process = "not a process"
        retries = "3"
        depends_on = ["a"]

        [jobs."no good"]
        input = "x"
        """
    )
    expected = [
        "minibatch.workerz",
        "minibatch.memory_limit",
        "jobs.a.chunk_bytes",
        "jobs.a.timeout",
        "jobs.a.schedule",
        "jobs.a.timezone",
        "jobs.a.colour",
        "jobs.b.output",
        "jobs.b.process",
        "jobs.b.retries",
    ]
    for where in expected:
        assert _named(errors, where), f"{where} missing from {errors}"
    assert _named(errors, "jobs.a.process") or _named(errors, "jobs.a.sql")
    assert any("ghost" in e and e.startswith("jobs.a.depends_on:") for e in errors)
    assert any("cycle" in e for e in errors)
    assert any("no good" in e for e in errors)
    assert len(errors) >= len(expected) + 3


# ------------------------------------------------------------------ check_imports


@pytest.fixture
def job_module(tmp_path, monkeypatch):
    """A module written into tmp_path (the config's directory) under a fresh name."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"mb_test_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("def good(table, ctx):\n    return table\n\nnot_callable = 3\n")
    broken = f"{name}_broken"
    (tmp_path / f"{broken}.py").write_text("raise RuntimeError('boom at import')\n")
    yield name, broken
    for module in (name, broken):
        sys.modules.pop(module, None)


def _config_with(tmp_path: Path, processes: dict[str, str]):
    text = "".join(
        _job(process=f'"{process}"', output=f'"out/{job}"').replace("jobs.a", f"jobs.{job}")
        for job, process in processes.items()
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def test_check_imports_finds_a_function_beside_the_config(tmp_path, job_module):
    name, _ = job_module
    check_imports(_config_with(tmp_path, {"ok": f"{name}:good"}))


def test_check_imports_reports_every_problem(tmp_path, job_module):
    name, broken = job_module
    missing_module = f"{name}_nowhere"
    config = _config_with(
        tmp_path,
        {
            "ok": f"{name}:good",
            "nofunc": f"{name}:missing",
            "notcallable": f"{name}:not_callable",
            "nomodule": f"{missing_module}:good",
            "raises": f"{broken}:good",
        },
    )
    with pytest.raises(ConfigError) as info:
        check_imports(config)
    errors = info.value.errors
    assert len(errors) == 4
    assert not _named(errors, "jobs.ok.process")
    assert "missing" in _named(errors, "jobs.nofunc.process")[0]
    assert "not_callable" in _named(errors, "jobs.notcallable.process")[0]
    assert missing_module in _named(errors, "jobs.nomodule.process")[0]
    assert "boom at import" in _named(errors, "jobs.raises.process")[0]
    # only the named jobs are imported
    check_imports(config, ["ok"])
    with pytest.raises(ConfigError) as info:
        check_imports(config, ["ok", "nofunc"])
    assert len(info.value.errors) == 1


# ------------------------------------------------------------------- crontabs

SATURDAY_NOON = datetime(2026, 11, 28, 12, 30, tzinfo=UTC)  # 2026-11-28 is a Saturday


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _fires(expr: str, count: int, tz: str = "UTC", now: datetime = SATURDAY_NOON):
    return [f.astimezone(UTC) for f in next_fire_times(expr, tz, count, now=now)]


def test_saturday_is_a_saturday():
    assert SATURDAY_NOON.strftime("%A") == "Saturday"


@pytest.mark.parametrize("weekday", ["0", "7", "sun", "SUN", "Sun", "0,7"])
def test_sunday_is_zero_and_seven(weekday):
    assert _fires(f"0 2 * * {weekday}", 3) == [
        _utc(2026, 11, 29, 2),
        _utc(2026, 12, 6, 2),
        _utc(2026, 12, 13, 2),
    ]


@pytest.mark.parametrize("weekday", ["1-5", "mon-fri", "MON-FRI", "1,2,3,4,5", "mon,tue,wed,thu,fri"])
def test_weekdays_monday_to_friday(weekday):
    assert _fires(f"0 2 * * {weekday}", 6) == [
        _utc(2026, 11, 30, 2),
        _utc(2026, 12, 1, 2),
        _utc(2026, 12, 2, 2),
        _utc(2026, 12, 3, 2),
        _utc(2026, 12, 4, 2),
        _utc(2026, 12, 7, 2),
    ]


@pytest.mark.parametrize(
    ("weekday", "days"),
    [
        ("6", [(11, 28), (12, 5), (12, 12)]),  # today 12:45 is still ahead
        ("5-7", [(11, 28), (11, 29), (12, 4)]),  # fri, sat, sun
        ("*/2", [(11, 28), (11, 29), (12, 1)]),  # 0,2,4,6: sun, tue, thu, sat
        ("1,3", [(11, 30), (12, 2), (12, 7)]),
        ("sat,sun", [(11, 28), (11, 29), (12, 5)]),
    ],
)
def test_weekday_forms(weekday, days):
    fires = _fires(f"45 12 * * {weekday}", 3)
    assert fires == [_utc(2026, month, day, 12, 45) for month, day in days]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("@daily", [_utc(2026, 11, 29), _utc(2026, 11, 30)]),
        ("@midnight", [_utc(2026, 11, 29), _utc(2026, 11, 30)]),
        ("@hourly", [_utc(2026, 11, 28, 13), _utc(2026, 11, 28, 14)]),
        ("@weekly", [_utc(2026, 11, 29), _utc(2026, 12, 6)]),
        ("@monthly", [_utc(2026, 12, 1), _utc(2027, 1, 1)]),
        ("@yearly", [_utc(2027, 1, 1), _utc(2028, 1, 1)]),
        ("@annually", [_utc(2027, 1, 1), _utc(2028, 1, 1)]),
        ("@DAILY", [_utc(2026, 11, 29), _utc(2026, 11, 30)]),
        ("*/20 * * * *", [_utc(2026, 11, 28, 12, 40), _utc(2026, 11, 28, 13)]),
        ("0 2 * * *", [_utc(2026, 11, 29, 2), _utc(2026, 11, 30, 2)]),
        ("0 0 1 * *", [_utc(2026, 12, 1), _utc(2027, 1, 1)]),
        ("0 0 29 2 *", [_utc(2028, 2, 29), _utc(2032, 2, 29)]),
        ("0 12 * jan mon", [_utc(2027, 1, 4, 12), _utc(2027, 1, 11, 12)]),
    ],
)
def test_known_fire_times(expr, expected):
    assert _fires(expr, len(expected)) == expected


def test_fire_times_follow_the_timezone():
    fires = next_fire_times("0 2 * * *", "Europe/Berlin", 2, now=SATURDAY_NOON)
    assert fires[0].utcoffset() is not None
    assert [f.astimezone(UTC) for f in fires] == [_utc(2026, 11, 29, 1), _utc(2026, 11, 30, 1)]
    assert fires[0].astimezone(ZoneInfo("Europe/Berlin")).hour == 2
    summer = datetime(2026, 6, 30, 12, tzinfo=UTC)
    assert _fires("0 2 * * *", 1, "Europe/Berlin", summer) == [_utc(2026, 7, 1, 0)]


def test_day_of_month_or_day_of_week():
    assert _fires("0 0 1 * 1", 3) == [_utc(2026, 11, 30), _utc(2026, 12, 1), _utc(2026, 12, 7)]


@pytest.mark.parametrize(
    "expr",
    ["0 2 * *", "* * * *", "0 2 * * * *", "", "   ", "@often", "0 2 * * 8", "0 2 * * mo",
     "0 2 * * 5-1", "0 2 * * */0", "0 2 * * 1/x", "60 * * * *", "0 2 * * -1"],
)  # fmt: skip
def test_rejected_crontabs(expr):
    with pytest.raises(ValueError, match="crontab|weekday"):
        parse_crontab(expr, "UTC")


# ------------------------------------------------------------------ outputs kept apart

PLACES = ["out/a", "out/a/b", "out/b", "out", "out/.a.minibatch-staging", "out/a.quarantine", "q", "q/a"]


def _one_job(name: str, output: str, quarantine: str | None, reduce: bool):
    extra = (
        f'checks = [{{ name = "c", sql = "x > 0", action = "quarantine" }}]\nquarantine = "{quarantine}"\n'
    )
    job = (
        _job(output=f'"{output}"')
        + (extra if quarantine else "")
        + ('reduce_sql = "FROM parts"\n' if reduce else "")
    )
    return _parse(job.replace("[jobs.a]", f"[jobs.{name}]")).jobs[name]


def _overlap(one, two) -> bool:
    """The rule, pair by pair: the oracle. Any place of one (output, staging, parts, held rows)
    nested in any of the other's, either way (a quarantine in another's staging went with its
    next run: hostile review)."""
    places = [
        [x.output, x.staging, x.parts, *x.held, *default_held(x.output)]
        for x in (OutputLayout.of(job) for job in (one, two))
    ]
    return any(a == b or a in b.parents or b in a.parents for a in places[0] for b in places[1])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from([None, *PLACES]), st.booleans()), max_size=5)
)
def test_overlapping_outputs_are_found_as_comparing_every_pair_finds_them(layouts) -> None:
    jobs = {}
    for i, (output, quarantine, reduce) in enumerate(layouts):
        try:
            jobs[f"j{i}"] = _one_job(f"j{i}", output, quarantine, reduce)
        except ConfigError:  # a job that clashes with itself
            continue
    names = sorted(jobs)
    pairs = {(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if _overlap(jobs[a], jobs[b])}
    assert {(a, b) for a, others in _clashes(jobs).items() for b in others} == pairs


def test_a_config_of_many_jobs_loads_quickly() -> None:
    """A review: outputs were compared pair by pair, slowly: 200 jobs took 6 s to load."""
    text = "".join(
        _job(output=f'"out/job{i:04d}"').replace("[jobs.a]", f"[jobs.j{i:04d}]") for i in range(1000)
    )
    started = time.process_time()
    assert len(_parse(text).jobs) == 1000
    assert time.process_time() - started < 2.0
