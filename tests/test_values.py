"""Every value comes back as it went in, or the run says why (an eighth hostile review, on types
and schemas): no silent cast, no dropped field, no stale schema that empties the output."""

from __future__ import annotations

import datetime
import json
import struct
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import Project

SQL_JOB = """
[jobs.t]
input = "data/*.{ext}"
output = "out/t"
sql = "SELECT * FROM chunk"
{extra}
"""


def job(ext: str, extra: str = "") -> str:
    fmt = {"parquet": "", "csv": 'format = "csv"', "ndjson": 'format = "ndjson"'}[ext]
    return SQL_JOB.format(ext=ext, extra=f"{fmt}\n{extra}")


def rows(project: Project) -> list[dict]:
    table = ds.dataset(project.out("t"), format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))


def run(project: Project, *args: str) -> dict:
    result = project.cli("run-now", "t", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return {"exit": result.returncode, **json.loads(result.stdout)}


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_an_input_schema_no_file_has_any_more_is_decided_again(project: Project) -> None:
    """Every file rewritten with id int64 instead of int32: they were all bad files against the
    stored schema, the output was emptied, and every later run 'succeeded' with 0 rows."""
    project.data.mkdir()
    for kind in (pa.int32(), pa.int64()):
        for name, start in (("a", 0), ("b", 3)):
            pq.write_table(
                pa.table({"id": pa.array(range(start, start + 3), kind)}), project.data / f"{name}.parquet"
            )
        if kind == pa.int32():
            project.write_config(job("parquet"))
            assert run(project)["exit"] == 0
    assert run(project)["exit"] == 0
    assert rows(project) == [{"id": i} for i in range(6)]
    assert ds.dataset(project.out("t")).schema.field("id").type == pa.int64()


def test_a_declared_schema_replaces_the_inferred_one(project: Project) -> None:
    """The README's advice, followed: zip inferred as an integer, then `schema` says string.
    The stored inferred schema won, the file was bad, and the output stayed empty."""
    write(project.data / "a.csv", b"id,zip\n1,10001\n2,20134\n")
    project.write_config(job("csv"))
    assert run(project)["exit"] == 0
    project.write_config(job("csv", 'schema = { id = "int64", zip = "string" }'))
    assert run(project)["exit"] == 0
    assert rows(project) == [{"id": 1, "zip": "10001"}, {"id": 2, "zip": "20134"}]


def test_an_ndjson_field_first_seen_after_the_sample_is_malformed_not_dropped(project: Project) -> None:
    lines = [
        json.dumps({"id": i, "amount": 10.0} | ({"discount": 2.5} if i >= 59_990 else {}))
        for i in range(60_000)
    ]
    write(project.data / "a.ndjson", ("\n".join(lines) + "\n").encode())
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 10
    assert len(rows(project)) == 59_990
    malformed = ds.dataset(project.root / "out" / "t.malformed").to_table()
    assert sorted(malformed["_line"].to_pylist()) == list(range(59_991, 60_001))
    assert all("discount" in text for text in malformed["_text"].to_pylist())


def test_a_byte_that_is_not_utf8_in_ndjson_is_a_malformed_record(project: Project) -> None:
    write(
        project.data / "a.ndjson",
        b'{"id": 0, "s": "plain"}\n{"id": 1, "s": "bad \xff\xfe"}\n{"id": 2, "s": "ok"}\n',
    )
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 1
    assert rows(project) == [{"id": 0, "s": "plain"}, {"id": 2, "s": "ok"}]
    said = project.cli("run-now", "t", "--fresh").stdout  # the summary says so, not only --json
    assert "malformed: 1 records did not parse" in said, said
    duckdb.sql(f"SELECT count(*) FROM read_parquet('{project.out('t')}/**/*.parquet')").fetchall()


@pytest.mark.parametrize("ext", ["csv", "ndjson"])
def test_integers_beyond_int64_are_kept_exact(project: Project, ext: str) -> None:
    """20-digit ids (SIM cards' ICCIDs) were inferred as double: 1,000 ids became one value."""
    ids = [89490200001234567890 + i for i in range(1000)]
    if ext == "csv":
        data = "iccid,n\n" + "".join(f"{v},{i}\n" for i, v in enumerate(ids))
    else:
        data = "".join(json.dumps({"iccid": v, "n": i}) + "\n" for i, v in enumerate(ids))
    write(project.data / f"a.{ext}", data.encode())
    project.write_config(job(ext))
    assert run(project)["exit"] == 0
    assert sorted(int(r["iccid"]) for r in rows(project)) == ids


def test_numbers_with_leading_zeros_do_not_split_the_files_and_a_schema_keeps_them(project: Project) -> None:
    """Inferring text for zips written 01000 split a job's files: the files whose sample showed
    a leading zero got `string`, the others `int64`, and one kind became bad files (a review:
    100 rows of 400 published, exit 0 on later runs). Inference keeps numbers numbers; a
    declared `schema` keeps the zeros."""
    for i, first in enumerate((1000, 1100, 1200, 90000)):
        body = "".join(f"{first + n:05d},{n}\n" for n in range(100))
        write(project.data / f"f{i}.csv", ("zip,n\n" + body).encode())
    project.write_config(job("csv"))
    assert run(project)["exit"] == 0 and len(rows(project)) == 400
    project.write_config(job("csv", 'schema = { zip = "string", n = "int64" }'))
    assert run(project)["exit"] == 0
    assert sorted(r["zip"] for r in rows(project))[:2] == ["01000", "01001"]


def test_a_csv_column_that_is_not_utf8_is_a_bad_file_not_binary(project: Project) -> None:
    write(project.data / "a.csv", b"id,name\n1,Anna\n2,Bj\xf6rn\n3,Carl\n")
    project.write_config(job("csv"))
    summary = run(project)
    assert summary["exit"] == 1
    assert not project.out("t").exists() or rows(project) == []


def test_sql_results_do_not_depend_on_the_time_zone_of_the_process(project: Project) -> None:
    """DuckDB took its TimeZone from the environment: `CAST(ts AS DATE)` of one instant gave
    2026-11-01 in a daemon under TZ=UTC and 2026-11-02 in a shell under Europe/Berlin, in one
    output. Every DuckDB that runs a job's SQL (chunks, checks, the reduce) runs in UTC."""
    instant = pa.array([1_793_575_800_000_000] * 2, pa.timestamp("us", tz="UTC"))  # 2026-11-01 23:30Z
    project.data.mkdir()
    pq.write_table(pa.table({"ts": instant}), project.data / "a.parquet")
    project.write_config("""
    [jobs.t]
    input = "data/*.parquet"
    output = "out/t"
    sql = "SELECT ts, CAST(ts AS DATE) AS day FROM chunk"
    checks = [{ name = "utc_day", sql = "CAST(ts AS DATE) = DATE '2026-11-01'", action = "fail" }]
    reduce_sql = "SELECT day, CAST(CAST(max(ts) AS DATE) AS VARCHAR) AS seen FROM parts GROUP BY day"
    """)
    result = project.cli("run-now", "t", env={"TZ": "Pacific/Kiritimati"}, real=True)
    assert result.returncode == 0, result.stderr
    assert rows(project) == [{"day": datetime.date(2026, 11, 1), "seen": "2026-11-01"}]


def test_inputs_that_differ_only_in_nullability_publish(project: Project) -> None:
    """One writer marked `id` NOT NULL, the other did not: the same schema to minibatch, but
    publishing a partition concatenated both parts and failed every run, --fresh too."""
    project.data.mkdir()
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("value", pa.int64()),
        pa.field("day", pa.string()),
    ]
    a = {"id": [1, 2, 3], "value": [1, 2, 3], "day": ["d1", "d1", "d2"]}
    pq.write_table(pa.table(a, schema=pa.schema(fields)), project.data / "a.parquet")
    b = {"id": [4, 5, 6], "value": [4, 5, 6], "day": ["d1", "d2", "d2"]}
    pq.write_table(
        pa.table(b, schema=pa.schema([f.with_nullable(True) for f in fields])), project.data / "b.parquet"
    )
    project.write_config(
        job("parquet", 'partition_by = ["day"]').replace(
            'sql = "SELECT * FROM chunk"', 'process = "myjobs.basic:ident"'
        )
    )
    assert run(project)["exit"] == 0
    table = ds.dataset(project.out("t"), format="parquet", partitioning="hive").to_table()
    assert sorted(zip(table["id"].to_pylist(), table["day"].to_pylist(), strict=True)) == [
        (1, "d1"),
        (2, "d1"),
        (3, "d2"),
        (4, "d1"),
        (5, "d2"),
        (6, "d2"),
    ]


def test_a_partition_column_differing_from_another_only_in_case_is_refused(project: Project) -> None:
    """Columns `id` (1, 2, 3) and `ID` ('a', 'b', 'c'), partitioned by `ID`: DuckDB's hive read
    of the output took them as one and returned only the letters; the run succeeded."""
    (project.root / "myjobs" / "cased.py").write_text(
        "import pyarrow as pa\n\ndef cased(table, ctx):\n"
        "    keys = [f'k{i % 2}' for i in table['id'].to_pylist()]\n"
        "    return pa.table({'id': table['id'], 'ID': pa.array(keys)})\n"
    )
    project.write_input("a.parquet", 0, 10)
    project.write_config(
        '[jobs.t]\ninput = "data/*.parquet"\noutput = "out/t"\nprocess = "myjobs.cased:cased"\n'
        'partition_by = ["ID"]\nretries = 0\n'
    )
    result = project.cli("run-now", "t")
    assert result.returncode == 1
    assert "differ only in case" in result.stdout + result.stderr


def test_int96_timestamps_outside_nanoseconds_fail_their_chunk_not_wrap(project: Project) -> None:
    """Spark's INT96 timestamps were read as timestamp[ns]: 9999-12-31 (a usual 'valid to'
    sentinel) came out as 1816-03-29, exit 0. In-range values stay exact; others fail the chunk."""
    project.data.mkdir()
    stamps = [datetime.datetime(2024, 1, 1, 12, 30), datetime.datetime(2262, 4, 11)]
    table = pa.table({"id": [1, 2], "valid_to": pa.array(stamps, pa.timestamp("us"))})
    pq.write_table(table, project.data / "a.parquet", use_deprecated_int96_timestamps=True)
    project.write_config(
        job("parquet").replace('sql = "SELECT * FROM chunk"', 'process = "myjobs.cased:same"\nretries = 0')
    )
    (project.root / "myjobs" / "cased.py").write_text("def same(table, ctx):\n    return table\n")
    assert run(project)["exit"] == 0
    got = ds.dataset(project.out("t")).to_table().column("valid_to").cast(pa.timestamp("us")).to_pylist()
    assert sorted(got) == stamps
    far = pa.table({"id": [3], "valid_to": pa.array([datetime.datetime(9999, 12, 31)], pa.timestamp("us"))})
    pq.write_table(far, project.data / "b.parquet", use_deprecated_int96_timestamps=True)
    result = project.cli("run-now", "t")
    assert result.returncode == 1 and "valid_to" in result.stdout + result.stderr
    got = ds.dataset(project.out("t")).to_table().column("valid_to").cast(pa.timestamp("us")).to_pylist()
    assert sorted(got) == stamps  # b's row is not published, wrapped or otherwise


def test_ndjson_timestamps_follow_the_csv_rules_not_shifted(project: Project) -> None:
    """NDJSON turned an offset into a zone-less column into UTC (10:00+02:00 became 08:00) and
    read a zone-less time into a zoned column as UTC; CSV refuses both records, as it should."""
    lines = [
        {"id": 1, "local": "2026-06-01 10:00:00", "berlin": "2026-06-01 10:00:00+02:00"},
        {"id": 2, "local": "2026-06-01 10:00:00+02:00", "berlin": "2026-06-01 10:00:00+02:00"},
        {"id": 3, "local": "2026-06-01 10:00:00", "berlin": "2026-06-01 10:00:00"},
    ]
    write(project.data / "a.ndjson", "".join(json.dumps(line) + "\n" for line in lines).encode())
    schema = 'schema = { id = "int64", local = "timestamp[s]", berlin = "timestamp[s, tz=Europe/Berlin]" }'
    project.write_config(job("ndjson", schema))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 2
    table = ds.dataset(project.out("t")).to_table()
    assert table["id"].to_pylist() == [1]
    assert table["local"].to_pylist() == [datetime.datetime(2026, 6, 1, 10, 0)]
    assert table["berlin"].cast(pa.timestamp("s", "UTC")).to_pylist()[0].hour == 8


def test_inferred_ndjson_timestamps_with_a_zone_keep_their_instant(project: Project) -> None:
    """pyarrow infers a zone-less timestamp for "...Z": read by CSV's rules, every record would
    be malformed; such a column is inferred zoned (UTC), as CSV's inference makes it."""
    lines = [{"id": i, "at": f"2026-06-01T1{i}:00:00Z"} for i in range(2)]
    lines.append({"id": 2, "at": "2026-06-01T12Z"})  # the hour alone (a review)
    lines.append({"id": 3, "at": "2026-06-01 13:00:00+02:00"})
    write(project.data / "a.ndjson", "".join(json.dumps(line) + "\n" for line in lines).encode())
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 0
    table = ds.dataset(project.out("t")).to_table()
    assert json.loads(table.schema.metadata[b"minibatch.input_schema"])[1] == ["at", "timestamp[s, tz=UTC]"]
    hours = sorted(v.hour for v in table["at"].to_pylist())
    assert hours == [10, 11, 11, 12]


def test_files_unreadable_for_a_run_do_not_decide_the_schema_again(project: Project) -> None:
    """A review of the rule above: with the job's files cut short mid-copy (unreadable) and one
    drifted file readable, the drift's schema was taken, and the job's own files were bad
    files from then on: 2 rows published of 302, later runs exit 0. Nor when they stay cut
    short into a second run (known bad files then: another review)."""
    project.data.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"a": list(range(i * 100, i * 100 + 100))}), project.data / f"a{i}.parquet")
    pq.write_table(pa.table({"a": [1, 2], "extra": ["x", "y"]}), project.data / "z_drift.parquet")
    saved = {p.name: p.read_bytes() for p in project.data.iterdir()}
    project.write_config(job("parquet"))
    assert run(project)["exit"] == 1  # the drifted file is a bad file
    for i in range(3):
        (project.data / f"a{i}.parquet").write_bytes(saved[f"a{i}.parquet"][:100])
    run(project)
    run(project)  # still cut short: now known bad files, and they may still have the stored schema
    for name, data in saved.items():
        (project.data / name).write_bytes(data)
    run(project)
    assert sorted(r["a"] for r in rows(project)) == list(range(300))


def test_a_declared_ndjson_schema_may_name_some_fields_only(project: Project) -> None:
    """A declared schema is how a nested field is skipped: a review found the new rule (an
    unknown field makes its record malformed) made every record malformed, exit 0."""
    lines = [{"id": i, "kind": "k", "debug": {"trace": [1, 2]}} for i in range(5)]
    write(project.data / "a.ndjson", "".join(json.dumps(line) + "\n" for line in lines).encode())
    project.write_config(job("ndjson", 'schema = { id = "int64", kind = "string" }'))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 0
    assert [r["id"] for r in rows(project)] == list(range(5))


def test_a_csv_header_naming_a_column_twice_and_ndjson_beyond_38_digits_read_as_before(
    project: Project,
) -> None:
    """A review of the inference above: `a,a` became a KeyError (a bad file), and an NDJSON
    integer of 41 digits made its column text, each JSON number in it a malformed record."""
    write(project.data / "a.csv", b"a,a\n1,2\n3,4\n")
    project.write_config(job("csv"))
    assert run(project)["exit"] == 0 and len(rows(project)) == 2
    write(
        project.data / "b.ndjson",
        b'{"id": 12345678901234567890123456789012345678901, "v": 1}\n{"id": 2, "v": 2}\n',
    )
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 0 and len(rows(project)) == 2


@pytest.mark.parametrize("zone", ["GMT", "Etc/GMT", "Greenwich", "GMT0", "Etc/UTC"])
def test_a_zone_that_is_utc_by_another_name_is_kept(zone: str) -> None:
    """DuckDB labels TIMESTAMPTZ results with its zone: outputs written under TZ=GMT carry
    tz=GMT, and a switch to UTC dead-lettered every new chunk on the label (a review)."""
    from minibatch.params import in_utc

    con = duckdb.connect()
    con.execute(f"SET TimeZone = '{zone}'")
    assert in_utc(con).execute("SELECT current_setting('TimeZone')").fetchall() == [(zone,)]
    con.execute("SET TimeZone = 'Europe/Berlin'")
    assert in_utc(con).execute("SELECT current_setting('TimeZone')").fetchall() == [("UTC",)]


def test_an_ndjson_date_column_is_not_taken_for_zoned_times(project: Project) -> None:
    """A review: the offset pattern matched the `-01` of `2024-01-01`, the column was inferred
    zoned, and every record was malformed (0 rows, exit 0)."""
    lines = [
        {"id": i, "day": f"2024-01-{i + 1:02d}", "at": f"2024-01-{i + 1:02d} 10:00:00"} for i in range(20)
    ]
    write(project.data / "a.ndjson", "".join(json.dumps(line) + "\n" for line in lines).encode())
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 0 and len(rows(project)) == 20


def test_a_schema_kept_for_an_unreadable_input_fails_every_run_until_it_is_fixed(project: Project) -> None:
    """A review of the rule above: with a corrupt file left among the inputs, the rewritten files
    were bad files against the kept schema, known from the second run on: every later run
    'succeeded' over an empty output. Such a run fails each time, saying why."""
    project.data.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"id": list(range(10))}), project.data / f"{name}.parquet")
    project.write_config(job("parquet"))
    assert run(project)["exit"] == 0
    (project.data / "c.parquet").write_bytes((project.data / "a.parquet").read_bytes()[:100])
    for name in ("a", "b"):
        pq.write_table(pa.table({"id": [str(i) for i in range(10)]}), project.data / f"{name}.parquet")
    for _ in range(3):
        result = project.cli("run-now", "t")
        assert result.returncode == 1 and "cannot be read" in result.stdout + result.stderr
    (project.data / "c.parquet").unlink()
    assert run(project)["exit"] == 0 and len(rows(project)) == 20


def test_two_json_objects_on_one_line_are_a_malformed_record_not_two_rows(project: Project) -> None:
    """A review: pyarrow's reader takes `{"id": 1} {"id": 2}` as two records; in a chunk with no
    other broken line they were published as two rows of one line."""
    write(project.data / "a.ndjson", b'{"id": 0}\n{"id": 1} {"id": 2}\n\n{"id": 3}\n')
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 1
    assert [r["id"] for r in rows(project)] == [0, 3]


def test_a_declared_schema_applies_beside_a_known_bad_file(project: Project) -> None:
    """A review: with an old corrupt file among the inputs, declaring `schema` (as the README
    advises) kept the inferred one, and every run failed over an emptied output."""
    write(project.data / "a.csv", b"id,zip\n1,10001\n2,20134\n")
    write(project.data / "c.csv.gz", b"\x1f\x8b\x08 not gzip at all")
    project.write_config(job("csv").replace('"data/*.csv"', '["data/*.csv", "data/*.csv.gz"]'))
    assert run(project)["exit"] == 1  # c: a new bad file
    assert run(project)["exit"] == 0
    project.write_config(
        job("csv", 'schema = { id = "int64", zip = "string" }').replace(
            '"data/*.csv"', '["data/*.csv", "data/*.csv.gz"]'
        )
    )
    assert run(project)["exit"] == 0
    assert rows(project) == [{"id": 1, "zip": "10001"}, {"id": 2, "zip": "20134"}]


def test_a_bom_before_the_first_ndjson_record_is_read_alike_on_both_paths(project: Project) -> None:
    """A BOM was accepted by pyarrow's reader and refused by the line-by-line check: the first
    record was lost to the malformed ones whenever another line of its chunk was broken."""
    write(project.data / "a.ndjson", b'\xef\xbb\xbf{"id": 1}\n{"id": 2}\n{broken\n')
    project.write_config(job("ndjson"))
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 1
    assert [r["id"] for r in rows(project)] == [1, 2]
    write(project.data / "a.ndjson", b'\xef\xbb\xbf\n{"id": 1}\n{"id": 2}\n')  # a BOM, then a blank line
    summary = run(project)
    assert summary["exit"] == 0 and summary["rows_bad"] == 0 and len(rows(project)) == 2


def test_int96_nanoseconds_and_nullability_are_read_as_pyarrow_reads_them(tmp_path: Path) -> None:
    """Differential fuzzing: INT96 was read as microseconds, then cast to ns: the digits below
    a microsecond were lost without a word (whole row groups and slices alike), and a
    required column came back nullable."""
    from minibatch import reading
    from minibatch.planner import Chunk, read_file_meta

    path = tmp_path / "spark.parquet"
    values = pa.array([1_000_000_123, 2_000_000_456, 3_000_000_789, 4_000_000_001], pa.timestamp("ns"))
    table = pa.Table.from_arrays(
        [values], schema=pa.schema([pa.field("ts", pa.timestamp("ns"), nullable=False)])
    )
    pq.write_table(table, path, use_deprecated_int96_timestamps=True, data_page_size=16)
    meta = read_file_meta(str(path), None)
    expected = pq.read_table(path)
    for start, end in ((0, 4), (1, 3)):  # the row group, and a slice of it
        got = reading.read_chunk(Chunk(str(path), meta.fingerprint, start, end, 0, 1, 0, 1000), None)
        assert got.equals(expected.slice(start, end - start)) and got.schema == expected.schema


def test_int96_out_of_range_is_found_in_structs_and_lists_and_at_the_nanosecond(tmp_path: Path) -> None:
    """Second fuzzing: nested INT96 values were not range-checked (9999-12-31 in a struct came
    back as 1816), a value 1-192 ns past timestamp[ns]'s end wrapped unseen (the microsecond
    read cut it back into range), and valid values in its first 808 ns failed."""
    from minibatch import reading
    from minibatch.planner import Chunk, read_file_meta

    def read(name: str, table: pa.Table) -> pa.Table:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, use_deprecated_int96_timestamps=True)
        return reading.read_chunk(
            Chunk(str(path), read_file_meta(str(path), None).fingerprint, 0, 2, 0, 1, 0, 1000), None
        )

    far = datetime.datetime(9999, 12, 31)
    us = pa.timestamp("us")
    for name, column in (
        ("struct", pa.array([{"t": far}, {"t": None}], pa.struct([("t", us)]))),
        ("list", pa.array([[far], []], pa.list_(us))),
    ):
        with pytest.raises(ValueError, match="outside 1677-2262"):
            read(name, pa.table({"c": column}))
    top = 2**63 - 1  # written, then its nanoseconds of the day raised by one in the file's bytes
    path = tmp_path / "past.parquet"
    plain = {"compression": "none", "use_dictionary": False, "write_statistics": False}
    table = pa.table({"t": pa.array([top, 0], pa.timestamp("ns"))})
    pq.write_table(table, path, use_deprecated_int96_timestamps=True, **plain)
    raw, day = bytearray(path.read_bytes()), struct.pack("<q", top % (86400 * 10**9))
    raw[raw.index(day) : raw.index(day) + 8] = struct.pack("<q", top % (86400 * 10**9) + 1)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="outside 1677-2262"):
        reading.read_chunk(
            Chunk(str(path), read_file_meta(str(path), None).fingerprint, 0, 2, 0, 1, 0, 1000), None
        )
    low = pa.array([-(2**63) + 1, -(2**63) + 807], pa.timestamp("ns"))
    assert (
        read("low", pa.table({"t": low}))["t"].cast(pa.int64()).to_pylist()
        == low.cast(pa.int64()).to_pylist()
    )
