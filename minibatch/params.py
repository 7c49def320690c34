"""Job parameters: named placeholders in a job's `input` and `output` (`{date:%Y-%m-%d}`),
bound values in its SQL (`$date`, never pasted into the text), the logical date of a
scheduled fire, and the checkpoint key of one parameter set.

`date` is the first parameter: a scheduled fire binds it to its *logical date*, as Airflow
does, the start of the interval that just ended (a daily 00:30 fire on 2 November processes
1 November). Each parameter set is its own checkpoint: `daily[date=2026-11-01]`.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from minibatch.checking import Checker

if TYPE_CHECKING:
    import duckdb

    from minibatch.schedule import CronSchedule

DATE = "date"
UTC_NAMES = {  # zones that are UTC all year, by their IANA names and links
    *("UTC", "Etc/UTC", "Etc/UCT", "UCT", "Universal", "Etc/Universal", "Zulu", "Etc/Zulu"),
    *(
        "GMT",
        "Etc/GMT",
        "GMT0",
        "Etc/GMT0",
        "GMT+0",
        "Etc/GMT+0",
        "GMT-0",
        "Etc/GMT-0",
        "Greenwich",
        "Etc/Greenwich",
    ),
}
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")  # all three: fullmatch (`$` allows a newline)
# Values end up in paths, file names and lock names: no separators, no leading dot.
VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
MAX_KEY = 200  # a checkpoint key is a lock file's name
SQL_PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
SAMPLE = {DATE: date(2026, 1, 31)}  # to check templates at load time

Values = dict[str, Any]  # name -> date (for `date`) or str


class ParamError(ValueError):
    """A parameter that is unknown, missing or malformed: a usage error."""


def placeholders(template: str) -> list[str]:
    """The parameter names a template uses; ValueError for anything but `{name}` or `{name:spec}`."""
    names = []
    for _, field, _, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not NAME_RE.fullmatch(field) or conversion:
            expected = "expected {name} or {name:format}"
            raise ValueError(f"bad placeholder {{{field}}} in {template!r}: {expected}")
        names.append(field)
    return names


def sql_params(sql: str | None) -> list[str]:
    """The `$name` parameters a query binds (DuckDB's named parameters): not one inside a
    string literal or a comment, which DuckDB does not see (and it refuses values it does not use)."""
    text = sql or ""
    if "$" in text and any(mark in text for mark in ("'", "--", "/*")):
        text = _code_only(text)
    return list(dict.fromkeys(SQL_PARAM_RE.findall(text)))


def _code_only(sql: str) -> str:
    """The SQL with its string literals and comments blanked, by DuckDB's own tokenizer."""
    import duckdb  # noqa: F811 (only for SQL that has some)

    try:
        tokens = duckdb.tokenize(sql)
    except duckdb.Error:
        return sql  # (DuckDB will say what is wrong with it)
    ends = [start for start, _ in tokens[1:]] + [len(sql)]
    blank = (duckdb.token_type.string_const, duckdb.token_type.comment)
    return "".join(
        " " if kind in blank else sql[start:end] for (start, kind), end in zip(tokens, ends, strict=True)
    )


def sql_values(sql: str | None, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The values a query binds: DuckDB refuses any it does not use."""
    used = {name: values[name] for name in sql_params(sql) if name in values}
    return used or None


def in_utc(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that runs a job's SQL (chunks, checks, the reduce), set to UTC: its
    default is the process's TZ, and the day of an instant must not depend on which process,
    a daemon's or a shell's, computed the chunk. A default that is UTC by another name is kept:
    DuckDB labels TIMESTAMPTZ results with it, and outputs written so far carry that label.
    (Without ICU, DuckDB is in UTC already.)"""
    import duckdb  # noqa: F811 (at run time too)

    with contextlib.suppress(duckdb.Error):
        if con.execute("SELECT current_setting('TimeZone')").fetchall()[0][0] not in UTC_NAMES:
            con.execute("SET TimeZone = 'UTC'")
    return con


def parse_value(name: str, text: str) -> date | str:
    if name == DATE:
        try:
            if DATE_RE.fullmatch(text):
                return date.fromisoformat(text)
        except ValueError:
            pass
        raise ParamError(f"parameter date: expected a date YYYY-MM-DD, got {text!r}")
    if not VALUE_RE.fullmatch(text):
        raise ParamError(
            f"parameter {name}: {text!r} is not allowed (letters, digits and . _ : + -, not starting "
            "with a dot; values become parts of paths)"
        )
    return text


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["date=2026-11-01", "region=eu"]` -> a dict; ParamError for an item without `=` or a
    name given twice."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ParamError(f"--param {item!r}: expected NAME=VALUE")
        name, value = name.strip(" "), value.strip(" ")  # not newlines: `$(cmd)` gone wrong is refused
        if name in out:  # one run takes one value: `backfill` runs several dates
            raise ParamError(f"--param {name!r} given twice ({out[name]!r} and {value!r})")
        out[name] = value
    return out


def text(value: Any) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def params_json(values: tuple[tuple[str, Any], ...]) -> str | None:
    return json.dumps({name: text(value) for name, value in values}) if values else None


def canonical(values: Mapping[str, Any]) -> str:
    return ",".join(f"{name}={text(values[name])}" for name in sorted(values))


def checkpoint_key(job: str, values: Mapping[str, Any]) -> str:
    """What the manifest, the lock and the output claim know a parameter set's run by."""
    return f"{job}[{canonical(values)}]" if values else job


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        return text(value) if not format_spec else format(value, format_spec)


def render(template: str, values: Mapping[str, Any]) -> str:
    return _Formatter().vformat(template, (), dict(values))


def bind(
    names: tuple[str, ...],
    defaults: Mapping[str, str],
    given: Mapping[str, str],
    schedule: CronSchedule | None,
    now: datetime,
    job: str,
) -> Values:
    """The values of a run: given ones, else defaults; `date` defaults to the logical date of
    the schedule's latest fire (the latest interval that has ended)."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        known = ", ".join(names) or "none"
        raise ParamError(f"job {job!r} has no parameter {', '.join(unknown)} (its parameters: {known})")
    values: Values = {}
    for name in names:
        if name in given:
            values[name] = parse_value(name, given[name])
        elif name in defaults:
            values[name] = parse_value(name, defaults[name])
        elif name == DATE and schedule is not None:
            values[name] = logical_date(schedule, now)
        else:
            example = "YYYY-MM-DD" if name == DATE else "VALUE"
            raise ParamError(f"job {job!r} needs --param {name}={example}")
    if len(checkpoint_key(job, values)) > MAX_KEY:
        raise ParamError(
            f"job {job!r}: its parameters are too long together (a key over {MAX_KEY} characters)"
        )
    return values


# -- the schedule's dates ------------------------------------------------------------------------

STEPS = [timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), timedelta(days=8),
         timedelta(days=32), timedelta(days=367), timedelta(days=5 * 367)]  # fmt: skip


def fire_before(schedule: CronSchedule, moment: datetime) -> datetime | None:
    """The schedule's latest fire time strictly before `moment`."""
    for step in STEPS:
        fire = schedule.get_next_fire_time(None, moment - step)
        if fire is not None and fire < moment:
            while (following := schedule.get_next_fire_time(fire, fire)) is not None and following < moment:
                fire = following
            return fire
    return None


def logical_date(schedule: CronSchedule, now: datetime) -> date:
    """The logical date of the schedule's latest fire at or before `now`: the date (in the
    schedule's time zone) of the fire before it, where the interval that just ended began."""
    fired = fire_before(schedule, now + timedelta(microseconds=1))
    start = fire_before(schedule, fired) if fired else None
    if start is None:
        raise ParamError(f"schedule {schedule.expr!r} has not fired twice before {now:%Y-%m-%d %H:%M}")
    return start.astimezone(schedule.timezone).date()


def schedule_dates(schedule: CronSchedule | None, first: date, last: date) -> list[date]:
    """The logical dates from `first` to `last`: days on which the schedule fires (a fire's
    logical date is the previous fire's), every day without a schedule."""
    if schedule is None:
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]
    dates, day = [], first
    while day <= last:
        midnight = datetime(day.year, day.month, day.day, tzinfo=schedule.timezone)
        fire = schedule.get_next_fire_time(None, midnight)
        if fire is None:
            break
        day = fire.astimezone(schedule.timezone).date()
        if day <= last:
            dates.append(day)
        day += timedelta(days=1)
    return dates


# -- config ----------------------------------------------------------------------------------


def job_params(
    c: Checker, inputs: tuple[str, ...], output: str | None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """A job's parameter names (`date` first) and the defaults of its `params` table; errors
    go to the checker."""
    found = _template_params(c, "input", inputs)
    in_output = _template_params(c, "output", (output,) if output else ())
    found += in_output + sql_params(c.get("sql", str)) + sql_params(c.get("reduce_sql", str))
    defaults = _defaults(c, found)
    names = tuple(sorted(set(found), key=lambda n: (n != DATE, found.index(n))))
    fired = "schedule" in c.table or "watch" in c.table
    for name in names:
        if fired and name not in defaults and (name != DATE or "schedule" not in c.table):
            c.error(f"params.{name}", "missing: a scheduled or watched run needs a default for it")
    if missing := [n for n in names if n not in in_output]:
        shown = ", ".join("{" + n + "}" for n in missing)
        c.error("output", f"must use every parameter ({shown}) so each parameter set has its own output")
    elif output and in_output and (problem := _shared_output(output)):
        c.error("output", problem)
    return names, defaults


# Dates an output must tell apart: every day of four years (a leap year among them).
DISTINCT = [date(2024, 1, 1) + timedelta(days=n) for n in range(4 * 365 + 1)]


def _shared_output(template: str) -> str | None:
    """Why two parameter sets could share one output (a format that drops what tells them apart)."""
    for _, name, spec, _ in string.Formatter().parse(template):
        if name and name != DATE and spec:
            return f"{{{name}:{spec}}}: a format could give two values one output; use {{{name}}}"
    specs = [spec for _, name, spec, _ in string.Formatter().parse(template) if name == DATE]
    if not specs:
        return None
    rendered = {tuple(format(d, spec) if spec else d.isoformat() for spec in specs) for d in DISTINCT}
    if len(rendered) < len(DISTINCT):
        return "its {date} format must tell every day apart (for example {date:%Y-%m-%d})"
    return None


def _template_params(c: Checker, key: str, templates: Iterable[str]) -> list[str]:
    found: list[str] = []
    for template in templates:
        try:
            names = placeholders(template)
            render(template, {**{n: "x" for n in names}, **SAMPLE})
        except (ValueError, TypeError) as exc:
            c.error(key, str(exc))
        else:
            found += names
    return found


def _defaults(c: Checker, found: list[str]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for name, value in c.get("params", dict, {}).items():
        if not isinstance(value, str) or name == DATE or name not in found:
            c.error(f"params.{name}", _bad_default(name, value, name in found))
            continue
        try:
            parse_value(name, value)
        except ParamError as exc:
            c.error(f"params.{name}", str(exc))
        else:
            defaults[name] = value
    return defaults


def _bad_default(name: str, value: Any, used: bool) -> str:
    if name == DATE:
        return "date has no default: a scheduled run uses its logical date, run-now takes --param date="
    if not used:
        return "not used in input, output, sql or reduce_sql"
    return f"expected a string, got {type(value).__name__} {value!r}"
