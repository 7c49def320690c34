"""Parameterised jobs: placeholders, bound SQL values, the logical date of a scheduled fire
(across a DST change), the dates a backfill covers, and one checkpoint per parameter set."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, date, datetime, timedelta

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minibatch.params import (
    ParamError,
    checkpoint_key,
    logical_date,
    parse_assignments,
    parse_value,
    placeholders,
    render,
    schedule_dates,
    sql_params,
)
from minibatch.schedule import parse_crontab

from conftest import Project


def test_placeholders_and_rendering() -> None:
    template = "landing/{date:%Y/%m/%d}/{region}-*.parquet"
    assert placeholders(template) == ["date", "region"]
    assert render(template, {"date": date(2026, 11, 1), "region": "eu"}) == "landing/2026/11/01/eu-*.parquet"
    assert render("out/{date}", {"date": date(2026, 11, 1)}) == "out/2026-11-01"  # no format: ISO
    assert placeholders("a{{literal}}b") == []
    for bad in ("{date.year}", "{0}", "{date!r}", "{}"):
        with pytest.raises(ValueError, match="bad placeholder"):
            placeholders(bad)


def test_values_that_could_leave_a_directory_are_refused() -> None:
    assert parse_value("date", "2026-11-01") == date(2026, 11, 1)
    for bad in ("2026-11-1", "2026-13-01", "yesterday", "2026-11-01T00:00"):
        with pytest.raises(ParamError, match="YYYY-MM-DD"):
            parse_value("date", bad)
    for bad in (
        "../etc",
        "a/b",
        ".hidden",
        "",
        "a b",
        "x\x00",
        "*",
        "2026-1?",
        "[ab]",
        "a'b",
        "$x",
    ):  # paths, globs
        with pytest.raises(ParamError, match="not allowed"):
            parse_value("region", bad)
    with pytest.raises(ParamError, match="NAME=VALUE"):
        parse_assignments(["date"])
    # Hostile review: the last of two values won silently, and the run exited 0 for one date.
    with pytest.raises(ParamError, match="'date' given twice"):
        parse_assignments(["date=2026-11-01", "date=2026-11-02"])


NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
VALUES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,12}", fullmatch=True)


@given(st.dictionaries(NAMES, VALUES, max_size=4))
def test_each_parameter_set_has_one_key(values: dict[str, str]) -> None:
    key = checkpoint_key("daily", values)
    assert key == checkpoint_key("daily", dict(reversed(values.items())))  # order does not matter
    items = [] if not values else key.removeprefix("daily[").removesuffix("]").split(",")
    assert parse_assignments(items) == values  # and it says which set it is


def test_a_fires_logical_date_is_the_start_of_the_interval_that_ended() -> None:
    daily = parse_crontab("0 0 * * *", "UTC")
    assert logical_date(daily, datetime(2026, 11, 2, 0, 0, 1, tzinfo=UTC)) == date(2026, 11, 1)
    assert logical_date(daily, datetime(2026, 11, 2, 23, 59, tzinfo=UTC)) == date(2026, 11, 1)
    weekdays = parse_crontab("0 6 * * 1-5", "UTC")  # Monday's fire covers Friday (to Monday)
    assert logical_date(weekdays, datetime(2026, 11, 30, 6, 0, tzinfo=UTC)) == date(2026, 11, 27)
    monthly = parse_crontab("@monthly", "UTC")
    assert logical_date(monthly, datetime(2026, 12, 1, 0, 5, tzinfo=UTC)) == date(2026, 11, 1)


def test_logical_date_across_a_dst_change() -> None:
    """Berlin springs forward on 29 March 2026: that day has 23 hours. The 00:30 fire of
    30 March covers 29 March; a date taken 24 hours back in UTC would say 28 March."""
    schedule = parse_crontab("30 0 * * *", "Europe/Berlin")
    fire = datetime(2026, 3, 29, 22, 30, tzinfo=UTC)  # 00:30 CEST on 30 March
    assert logical_date(schedule, fire) == date(2026, 3, 29)
    assert (fire - timedelta(days=1)).astimezone(schedule.timezone).date() == date(2026, 3, 28)
    autumn = datetime(2026, 10, 25, 23, 30, tzinfo=UTC)  # 00:30 CET on 26 October, after 25 hours
    assert logical_date(schedule, autumn) == date(2026, 10, 25)


def test_backfill_dates_follow_the_schedule() -> None:
    weekdays = parse_crontab("0 6 * * 1-5", "Europe/Berlin")
    dates = schedule_dates(weekdays, date(2026, 11, 20), date(2026, 11, 30))
    assert [d.isoformat() for d in dates] == [
        "2026-11-20", "2026-11-23", "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27", "2026-11-30",
    ]  # fmt: skip
    assert len(schedule_dates(None, date(2026, 11, 1), date(2026, 11, 28))) == 28
    assert schedule_dates(None, date(2026, 11, 2), date(2026, 11, 1)) == []


PARAM_JOB = """
[jobs.daily]
input = "landing/{date:%Y-%m-%d}/*.parquet"
output = "out/region={region}/date={date:%Y-%m-%d}"
sql = "SELECT id, $date AS logical, $region AS region FROM chunk WHERE $date >= DATE '2026-01-01'"
params = { region = "eu" }
"""


def test_each_parameter_set_is_its_own_checkpoint(project: Project) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for day in ("2026-11-01", "2026-11-02"):
        (project.root / "landing" / day).mkdir(parents=True)
        ids = range(10) if day.endswith("1") else range(100, 105)
        pq.write_table(pa.table({"id": list(ids)}), project.root / "landing" / day / "a.parquet")
    project.write_config(PARAM_JOB)
    for args in (["--param", "date=2026-11-01"], ["--param", "date=2026-11-02", "--param", "region=us"]):
        result = project.cli("run-now", "daily", "-q", *args)
        assert result.returncode == 0, result.stderr
    again = project.cli("run-now", "daily", "-q", "--json", "--param", "date=2026-11-01")
    assert '"chunks_done": 0' in again.stdout  # its own checkpoint: nothing to redo
    one = pq.read_table(project.root / "out/region=eu/date=2026-11-01")
    assert sorted(one.column("id").to_pylist()) == list(range(10))
    assert set(one.column("logical").to_pylist()) == {date(2026, 11, 1)}  # a DATE, bound
    two = pq.read_table(project.root / "out/region=us/date=2026-11-02")
    assert sorted(two.column("id").to_pylist()) == list(range(100, 105))
    assert set(two.column("region").to_pylist()) == {"us"}
    keys = project.manifest_rows("SELECT DISTINCT job, params FROM runs ORDER BY job")
    assert keys == [
        ("daily[date=2026-11-01,region=eu]", '{"date": "2026-11-01", "region": "eu"}'),
        ("daily[date=2026-11-02,region=us]", '{"date": "2026-11-02", "region": "us"}'),
    ]
    history = project.cli("history", "daily")
    assert history.stdout.count("daily[date=") == 3
    (status,) = json.loads(project.cli("status", "daily", "--json").stdout)  # its latest parameter set's
    assert status["params"] == {"date": "2026-11-01", "region": "eu"} and status["chunks_done"] == 1


def test_parameter_errors_are_usage_errors_naming_the_job(project: Project) -> None:
    project.write_config(PARAM_JOB)
    cases = {
        (): "job 'daily' needs --param date=YYYY-MM-DD",
        ("--param", "date=2026-11-31"): "expected a date YYYY-MM-DD, got '2026-11-31'",
        ("--param", "date=2026-11-01", "--param", "region=../x"): "parameter region: '../x' is not allowed",
        ("--param", "date=2026-11-01", "--param", "day=1"): "job 'daily' has no parameter day",
    }
    for args, message in cases.items():
        result = project.cli("run-now", "daily", "-q", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (project.root / "out").exists()


def test_config_checks_parameters(project: Project) -> None:
    project.write_config("""
    [jobs.a]
    input = "landing/{date}/*.parquet"
    output = "out/a"
    sql = "SELECT * FROM chunk"
    [jobs.b]
    input = "landing/{date.year}/*.parquet"
    output = "out/b/{date}"
    sql = "SELECT * FROM chunk WHERE region = $region"
    schedule = "@daily"
    params = { date = "2026-01-01", unused = "x" }
    """)
    errors = project.cli("validate").stderr
    assert "jobs.a.output: must use every parameter ({date})" in errors
    assert "jobs.b.input: bad placeholder {date.year}" in errors
    assert "jobs.b.params.date: date has no default" in errors
    assert "jobs.b.params.unused: not used in input, output, sql or reduce_sql" in errors
    assert "jobs.b.params.region: missing: a scheduled or watched run needs a default" in errors


def test_two_parameter_sets_never_share_an_output(project: Project) -> None:
    project.write_config("""
    [jobs.monthly]
    input = "landing/{date}/*.parquet"
    output = "out/m/{date:%Y-%m}"
    sql = "SELECT * FROM chunk"
    [jobs.short]
    input = "landing/{region}/*.parquet"
    output = "out/s/{region:.2}"
    sql = "SELECT * FROM chunk"
    [jobs.fine]
    input = "landing/{date}/*.parquet"
    output = "out/f/{date:%Y/%m/%d}"
    sql = "SELECT * FROM chunk"
    """)
    errors = project.cli("validate").stderr
    assert "jobs.monthly.output: its {date} format must tell every day apart" in errors
    assert "jobs.short.output: {region:.2}: a format could give two values one output" in errors
    assert "jobs.fine" not in errors


def test_reset_and_dead_name_one_parameter_set(project: Project) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for day in ("2026-11-01", "2026-11-02"):
        (project.root / "landing" / day).mkdir(parents=True)
        pq.write_table(pa.table({"id": [1, 2]}), project.root / "landing" / day / "a.parquet")
    project.write_config(PARAM_JOB)
    for day in ("2026-11-01", "2026-11-02"):
        assert project.cli("run-now", "daily", "-q", "--param", f"date={day}").returncode == 0
    refused = project.cli("reset", "daily", "--yes")
    assert refused.returncode == 2 and "give --param date=YYYY-MM-DD" in refused.stderr
    assert project.cli("dead", "daily", "--param", "date=2026-11-01").returncode == 0
    assert project.cli("reset", "daily", "--yes", "--param", "date=2026-11-01").returncode == 0
    assert not any((project.root / "out/region=eu/date=2026-11-01").glob("*.parquet"))
    assert any((project.root / "out/region=eu/date=2026-11-02").glob("*.parquet"))  # the other date kept
    assert project.manifest_rows("SELECT DISTINCT job FROM chunks") == [("daily[date=2026-11-02,region=eu]",)]


def test_newlines_and_overlong_values_are_refused() -> None:
    for bad in ("eu\n", "eu\nx", "x" * 65):
        with pytest.raises(ParamError, match="not allowed"):
            parse_value("region", bad)
        with pytest.raises(ParamError, match="not allowed"):  # hostile review: --param stripped it
            parse_value("region", parse_assignments([f"region={bad}"])["region"])
    with pytest.raises(ParamError, match="YYYY-MM-DD"):
        parse_value("date", "2026-11-01\n")
    with pytest.raises(ValueError, match="bad placeholder"):
        placeholders("{date\n}")


def test_outputs_of_two_parameter_sets_are_kept_apart_at_run_time(project: Project) -> None:
    """Values glued by a dash can render one directory (eu-west + a, eu + west-a), and a value
    can name another job's output: the output's owner refuses the second, and deletes nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for source, rows in (("eu-west", range(10)), ("eu", range(100, 110)), ("global", range(500, 503))):
        (project.root / "landing" / source).mkdir(parents=True)
        pq.write_table(pa.table({"id": list(rows)}), project.root / "landing" / source / "a.parquet")
    project.write_config("""
    [jobs.ingest]
    input = "landing/{source}/*.parquet"
    output = "lake/{source}-{region}"
    sql = "SELECT * FROM chunk"
    [jobs.glob]
    input = "landing/global/*.parquet"
    output = "lake/global-x"
    sql = "SELECT id FROM chunk"
    [jobs.nested]
    input = "landing/{region}/*.parquet"
    output = "lake/{region}/n"
    sql = "SELECT id FROM chunk"
    """)
    first = project.cli("run-now", "ingest", "-q", "--param", "source=eu-west", "--param", "region=a")
    assert first.returncode == 0, first.stderr
    second = project.cli("run-now", "ingest", "-q", "--param", "source=eu", "--param", "region=west-a")
    assert second.returncode == 2
    assert (
        "is the output of ingest[region=a,source=eu-west], not of ingest[region=west-a,source=eu]"
        in second.stderr
    )
    assert sorted(pq.read_table(project.root / "lake/eu-west-a").column("id").to_pylist()) == list(range(10))

    assert project.cli("run-now", "glob", "-q").returncode == 0
    stolen = project.cli("run-now", "ingest", "-q", "--param", "source=global", "--param", "region=x")
    assert stolen.returncode == 2 and "overlaps the output of job 'glob'" in stolen.stderr
    assert pq.read_table(project.root / "lake/global-x").column("id").to_pylist() == [500, 501, 502]
    inside = project.cli("run-now", "nested", "-q", "--param", "region=eu-west-a")
    assert inside.returncode == 2 and "inside the output" in inside.stderr


def test_a_rendered_output_may_not_hold_job_code(project: Project) -> None:
    project.write_config("""
    [jobs.p]
    input = "data/*.parquet"
    output = "{where}"
    process = "myjobs.basic:ident"
    """)
    project.write_input("a.parquet", 0, 10)
    result = project.cli("run-now", "p", "-q", "--param", "where=myjobs")
    assert result.returncode == 2 and "contains job code" in result.stderr
    assert (project.root / "myjobs" / "basic.py").exists()


def test_a_dated_dependency_counts_for_the_same_date_only(project: Project) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minibatch.config import load_config
    from minibatch.depends import unmet_dependencies
    from minibatch.manifest import Manifest
    from minibatch.records import RunRecord

    for day in ("2026-10-01", "2026-11-01"):
        (project.root / "landing" / day).mkdir(parents=True)
        pq.write_table(pa.table({"id": [1]}), project.root / "landing" / day / "a.parquet")
    project.write_config("""
    [jobs.up]
    input = "landing/{date}/*.parquet"
    output = "out/up/{date}"
    sql = "SELECT * FROM chunk"
    [jobs.down]
    input = "landing/{date}/*.parquet"
    output = "out/down/{date}"
    sql = "SELECT * FROM chunk"
    depends_on = ["up"]
    """)
    config = load_config(project.root / "config.toml")
    manifest = Manifest(project.root / ".state" / "manifest.duckdb")
    assert project.cli("run-now", "up", "-q", "--param", "date=2026-10-01").returncode == 0
    today = {"date": "2026-11-01"}
    assert unmet_dependencies(config, manifest, config.jobs["down"], today) == ["up"]  # another date's
    assert project.cli("run-now", "up", "-q", "--param", "date=2026-11-01").returncode == 0
    assert unmet_dependencies(config, manifest, config.jobs["down"], today) == []
    key = config.bound("up", today).key
    # that date's output is being rebuilt: not met until it succeeds again
    manifest.start_run(RunRecord(run_id="again", job=key, pid=os.getpid(), started_at=time.time()))
    assert unmet_dependencies(config, manifest, config.jobs["down"], today) == ["up"]


def test_reset_never_deletes_another_owners_output(project: Project) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (project.root / "landing").mkdir()
    pq.write_table(pa.table({"id": [1, 2]}), project.root / "landing" / "a.parquet")
    project.write_config("""
    [jobs.regional]
    input = "landing/*.parquet"
    output = "lake/{region}"
    sql = "SELECT * FROM chunk"
    [jobs.europe]
    input = "landing/*.parquet"
    output = "lake/eu"
    sql = "SELECT * FROM chunk"
    """)
    assert project.cli("run-now", "europe", "-q").returncode == 0
    refused = project.cli("reset", "regional", "--yes", "--param", "region=eu")
    assert refused.returncode == 2 and "overlaps the output of job 'europe'" in refused.stderr
    assert "nothing was deleted" in refused.stderr
    assert pq.read_table(project.root / "lake/eu").num_rows == 2


def test_a_fresh_run_stopped_before_it_began_keeps_the_output(project: Project) -> None:
    from minibatch.config import load_config
    from minibatch.runner import RunOptions, run_job
    from minibatch.signals import StopSignals

    project.write_input("a.parquet", 0, 300)
    project.write_config(
        '[jobs.x]\ninput = "data/*.parquet"\noutput = "out/x"\nsql = "SELECT * FROM chunk"\n'
    )
    assert project.cli("run-now", "x", "-q").returncode == 0
    stop = StopSignals()
    stop.request()  # cancelled while it waited for a worker slot

    def listing() -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_mtime_ns) for p in (project.root / "out").rglob("*"))

    before = listing()
    summary = run_job(load_config(project.root / "config.toml"), "x", RunOptions(fresh=True, stop=stop))
    assert summary.stopped and listing() == before  # nothing removed, nothing written
    assert project.manifest_rows("SELECT count(*) FROM chunks") != [(0,)]
    assert project.manifest_rows("SELECT status FROM runs ORDER BY started_at") == [
        ("succeeded",),
        ("stopped",),
    ]


def test_a_value_naming_a_quarantine_or_another_templates_output_is_refused(project: Project) -> None:
    """Hostile review: `--param r=x.quarantine` rendered the quarantine directory of the set
    r=x: r=x's run deleted its parts and wrote its quarantined rows there, and r=x.quarantine then
    published them as its own, exit 0. And two templates met: b's `out/{s}/k=1` inside a's
    partitioned `out/{r}`; a's first run swapped b's partition out, deleting b's parts."""
    project.write_config("""
    [jobs.q]
    input = "data/*.parquet"
    output = "out/{r}"
    sql = "SELECT * FROM chunk"
    checks = [{name = "s", sql = "id < 250", action = "quarantine"}]

    [jobs.a]
    input = "data/*.parquet"
    output = "nest/{r}"
    sql = "SELECT *, 1 AS k FROM chunk"
    partition_by = ["k"]

    [jobs.b]
    input = "data/*.parquet"
    output = "nest/{s}/k=1"
    process = "myjobs.basic:ident"
    """)
    project.write_input("a.parquet", 0, 500)
    for value in ("x.quarantine", "x.malformed", ".x.minibatch-staging"):
        refused = project.cli("run-now", "q", "--param", f"r={value}")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "named like" in refused.stderr or "not allowed" in refused.stderr, refused.stderr
    assert not (project.root / "out").exists()
    assert project.cli("run-now", "b", "--param", "s=x").returncode == 0
    b_out = project.root / "nest/x/k=1"
    before = {p.name: p.read_bytes() for p in b_out.iterdir()}
    refused = project.cli("run-now", "a", "--param", "r=x")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ".k=1.minibatch-staging" in refused.stderr, refused.stderr
    assert {p.name: p.read_bytes() for p in b_out.iterdir()} == before
    assert project.cli("run-now", "b", "--param", "s=x").returncode == 0


@pytest.mark.parametrize("clash", ["partition", "quarantine"])
def test_a_rendered_output_on_another_jobs_output_is_refused_and_deletes_nothing(
    project: Project, clash: str
) -> None:
    """Hostile review: `output = "out/{region}"` rendered for region=eu landed on job b's output
    (`out/eu/k=1`, inside a's partitions; or `out/eu.quarantine`, a's quarantine). a's run
    replaced or overwrote b's files, b kept reporting succeeded over the hole, and `reset` of
    a's parameter set deleted b's output. Only the unrendered template was checked."""
    b_out = "out/eu/k=1" if clash == "partition" else "out/eu.quarantine"
    a_extra = (
        'sql = "SELECT *, 1 AS k FROM chunk"\npartition_by = ["k"]\n'
        if clash == "partition"
        else 'sql = "SELECT * FROM chunk"\nchecks = [{name = "s", sql = "id < 250", action = "quarantine"}]\n'
    )
    project.write_config(f"""
    [jobs.b]
    input = "data/*.parquet"
    output = "{b_out}"
    process = "myjobs.basic:ident"
    chunk_bytes = "3KB"

    [jobs.a]
    input = "data/*.parquet"
    output = "out/{{region}}"
    chunk_bytes = "3KB"
    {a_extra}""")
    project.write_input("a.parquet", 0, 500)
    assert project.cli("run-now", "b").returncode == 0
    before = {p.name: p.read_bytes() for p in (project.root / b_out).iterdir()}
    for command in (["run-now", "a"], ["reset", "a", "--yes"]):
        refused = project.cli(*command, "--param", "region=eu")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "overlaps the output of job 'b'" in refused.stderr, refused.stderr
        assert {p.name: p.read_bytes() for p in (project.root / b_out).iterdir()} == before
    assert project.cli("run-now", "b").returncode == 0  # nothing to do: its output is whole
    assert sorted(pq.read_table(project.root / b_out)["id"].to_pylist()) == list(range(500))


def test_a_parameter_inside_a_string_literal_or_a_comment_is_not_bound() -> None:
    """Hostile review: `SELECT '$date' AS tag` bound `date`, which DuckDB does not see there
    (a literal), and refused: every chunk dead-lettered by a config `validate` had passed."""
    sql = "SELECT id, '$date' AS tag, $region AS r FROM chunk -- by $owner\n/* $x */ WHERE d = $day"
    assert sql_params(sql) == ["region", "day"]
    assert sql_params("SELECT $date AS d FROM chunk") == ["date"]
    assert sql_params("SELECT 'it''s $date' AS d") == []
