"""CSV and NDJSON inputs: a CSV with quoted newlines split into byte-range chunks across
workers gives exactly DuckDB's read_csv of it; malformed records are quarantined with their
line numbers; a file whose schema drifts is a bad file; compressed files are one chunk."""

from __future__ import annotations

import datetime
import gzip
import io
import json
import os
import re
from pathlib import Path

import duckdb
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minibatch.textinput import TextFormat, _opens_mid_field, _segments
from minibatch.textschema import infer

from conftest import Project

CSV_JOB = """
[jobs.t]
input = "data/*.csv*"
output = "out/t"
sql = "SELECT * FROM chunk"
format = "csv"
schema = { id = "int64", name = "string", amount = "double" }
chunk_bytes = "256KB"
workers = 2
"""


def write_csv(path: Path, start: int, rows: int, broken: dict[int, str] | None = None) -> None:
    lines = ["id,name,amount"]
    for i in range(start, start + rows):
        name = f'"quoted, with ""quotes""\nand a newline {i}"' if i % 97 == 0 else f"name-{i}"
        lines.append((broken or {}).get(i, f"{i},{name},{i / 4}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def output(project: Project) -> list[tuple]:
    table = ds.dataset(project.out("t"), format="parquet").to_table()
    return sorted(
        zip(table["id"].to_pylist(), table["name"].to_pylist(), table["amount"].to_pylist(), strict=True)
    )


def test_a_csv_in_many_chunks_equals_duckdbs_read_csv(project: Project) -> None:
    write_csv(project.data / "big.csv", 0, 40_000)  # ~1.3 MB: about ten chunks
    project.write_config(CSV_JOB)
    result = project.cli("run-now", "t", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chunks_total"] >= 4
    want = duckdb.sql(
        f"SELECT id, name, amount FROM read_csv('{project.data / 'big.csv'}', header = true, "
        "columns = {'id': 'BIGINT', 'name': 'VARCHAR', 'amount': 'DOUBLE'})"
    ).fetchall()
    assert output(project) == sorted(want)
    assert len(list((project.root / ".state" / "text-plans").glob("*.json"))) == 1  # the scan, kept
    again = project.cli("run-now", "t", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["chunks_done"] == 0


def test_malformed_records_are_quarantined_with_their_line_numbers(project: Project) -> None:
    broken = {5: "5,short", 300: "300,x,not-a-number", 301: "301,a,1,extra"}
    write_csv(project.data / "a.csv", 0, 1000, broken)
    project.write_config(CSV_JOB)
    result = project.cli("run-now", "t", "-q")
    assert result.returncode == 0, result.stderr
    held = ds.dataset(project.root / "out" / "t.malformed", format="parquet").to_table().to_pylist()
    # line = 1 (header) + 1 + the record's index + the newlines inside earlier quoted names
    line = {i: i + 2 + len([q for q in range(i) if q % 97 == 0]) for i in broken}
    assert [(row["_line"], row["_text"]) for row in held] == [(line[i], broken[i]) for i in sorted(broken)]
    assert "not-a-number" in held[1]["_error"]
    ids = [row[0] for row in output(project)]
    assert ids == [i for i in range(1000) if i not in broken]
    assert project.manifest_rows("SELECT rows_bad FROM runs") == [(3,)]


def test_schema_drift_is_a_bad_file_and_compressed_files_are_one_chunk(project: Project) -> None:
    write_csv(project.data / "a.csv", 0, 100)
    with gzip.open(project.data / "b.csv.gz", "wt") as handle:
        handle.write("id,name,amount\n" + "".join(f"{i},g{i},{i}.5\n" for i in range(1000, 1100)))
    (project.data / "c.csv").write_text("id,label,amount\n1,x,2\n")  # a renamed column
    project.write_config(CSV_JOB.replace('schema = { id = "int64", name = "string", amount = "double" }', ""))
    result = project.cli("run-now", "t", "--json")
    assert result.returncode == 1  # a bad file fails the run, and names it
    body = json.loads(result.stdout)
    assert [b["file"].rsplit("/", 1)[1] for b in body["bad_files"]] == ["c.csv"]
    assert "label (string) unexpected" in body["bad_files"][0]["error"]
    ids = [row[0] for row in output(project)]
    assert ids == list(range(100)) + list(range(1000, 1100))
    chunks = project.manifest_rows("SELECT count(*) FROM chunks WHERE file LIKE '%b.csv.gz'")
    assert chunks == [(1,)]


def test_ndjson_with_a_broken_line(project: Project) -> None:
    project.data.mkdir()
    lines = [json.dumps({"id": i, "name": f"n{i}", "amount": i / 2}) for i in range(50)]
    lines[10] = '{"id": 10, "name": '  # cut short
    (project.data / "a.ndjson").write_text("\n".join(lines) + "\n")
    project.write_config(CSV_JOB.replace('format = "csv"', 'format = "ndjson"').replace("*.csv*", "*.ndjson"))
    assert project.cli("run-now", "t", "-q").returncode == 0
    assert [row[0] for row in output(project)] == [i for i in range(50) if i != 10]
    held = ds.dataset(project.root / "out" / "t.malformed", format="parquet").to_table().to_pylist()
    assert [(row["_line"], row["_text"]) for row in held] == [(11, lines[10])]


def test_ndjson_lines_after_a_bom_mid_chunk_are_read(project: Project) -> None:
    """Hostile review: two files with a BOM each, joined by `cat`: the line starting with the
    second BOM was taken on its own and refused with the rest, the whole chunk dead-lettered
    (its rows skipped by every later run)."""
    project.data.mkdir()
    rows = [json.dumps({"id": i, "name": f"n{i}", "amount": i / 2}).encode() for i in range(4)]
    (project.data / "a.ndjson").write_bytes(
        b"\xef\xbb\xbf" + b"\n".join(rows[:2]) + b"\n\xef\xbb\xbf" + b"\n".join(rows[2:])
    )
    project.write_config(CSV_JOB.replace('format = "csv"', 'format = "ndjson"').replace("*.csv*", "*.ndjson"))
    result = project.cli("run-now", "t", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert output(project) == [(i, f"n{i}", i / 2) for i in range(4)]


NDJSON_JOB = CSV_JOB.replace('format = "csv"', 'format = "ndjson"').replace("*.csv*", "*.ndjson")


def test_review_ndjson_numbers_too_big_for_their_type_are_malformed_not_infinite(project: Project) -> None:
    """Hostile review: `2e308` in a double column and `1e40` as float were published as inf, exit
    0, where CSV sends them to the malformed rows."""
    job = NDJSON_JOB.replace('amount = "double"', 'amount = "double", small = "float"')
    body = b'{"id": 1, "amount": 1.5, "small": 2.5}\n{"id": 2, "amount": 2e308}\n{"id": 3, "small": 1e40}\n'
    run_csv(project, body, job, "a.ndjson")
    assert ds.dataset(project.out("t"), format="parquet").to_table()["id"].to_pylist() == [1]
    assert [line for line, _ in malformed(project)] == [2, 3]


def test_review_ndjson_dates_and_times_of_a_declared_schema_are_read(project: Project) -> None:
    """Hostile review: pyarrow's JSON reader takes no date or time from a string: every record
    went to the malformed rows, the output empty, exit 0."""
    job = NDJSON_JOB.replace('amount = "double"', 'day = "date32", at = "time64[us]"')
    lines = [{"id": 1, "name": "a", "day": "2024-01-01", "at": "10:00:00.5"}, {"id": 2, "day": "2024-02-30"}]
    run_csv(project, "\n".join(json.dumps(line) for line in lines).encode(), job, "a.ndjson")
    table = ds.dataset(project.out("t"), format="parquet").to_table()
    assert table.to_pylist() == [
        {"id": 1, "name": "a", "day": datetime.date(2024, 1, 1), "at": datetime.time(10, 0, 0, 500000)}
    ]
    assert [line for line, _ in malformed(project)] == [2]  # no such day


def test_review_a_csv_time_that_is_not_one_leaves_the_other_records_be(project: Project) -> None:
    """Review: one bad time of day in a CSV sent every record of its chunk to the malformed rows
    (pyarrow casts no string to a time, so each record's value was tried, and failed)."""
    job = CSV_JOB.replace('amount = "double"', 'at = "time64[us]"')
    run_csv(project, b"id,name,at\n1,a,10:00:00\n2,b,24:00:00\n3,c,11:00:00.25\n4,d,zz\n", job)
    table = ds.dataset(project.out("t"), format="parquet").to_table().sort_by("id")
    assert table["at"].to_pylist() == [datetime.time(10), datetime.time(11, 0, 0, 250000)]
    assert [line for line, _ in malformed(project)] == [3, 5]


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("date32", "2026-1-5"),
        ("date32", ""),
        ("time64[us]", "9:05:00"),
        ("time64[us]", "10:00:00+02:00"),
        ("time64[us]", " 10:00:00"),
        ("time32[s]", "10:00:00.5"),
        ("time64[us]", "24:00:00"),
    ],
)
def test_dates_and_times_are_read_in_iso_forms_only(kind: str, text: str) -> None:
    """Decided (review: DuckDB reads these): a value minibatch would have to guess at or truncate
    is a malformed record, never published as another value."""
    import pyarrow as pa

    from minibatch.textread import from_text

    kinds = {"date32": pa.date32(), "time64[us]": pa.time64("us"), "time32[s]": pa.time32("s")}
    with pytest.raises(pa.ArrowInvalid):
        from_text(pa.array([text]), kinds[kind])
    good = {"date32": "2026-01-05", "time64[us]": "09:05:00.25", "time32[s]": "09:05"}[kind]
    assert from_text(pa.array([good, None]), kinds[kind]).null_count == 1


def test_review_ndjson_joined_with_a_bom_each_infers_its_schema(project: Project) -> None:
    """Hostile review: inference kept the lines that start with a BOM for pyarrow, which takes
    one only at the start: the file was a bad file, skipped by later runs, exit 0."""
    rows = [json.dumps({"id": i, "name": f"n{i}", "amount": i / 2}).encode() for i in range(4)]
    body = b"\xef\xbb\xbf" + b"\n".join(rows[:2]) + b"\n\xef\xbb\xbf" + b"\n".join(rows[2:])
    job = NDJSON_JOB.replace('schema = { id = "int64", name = "string", amount = "double" }\n', "")
    assert run_csv(project, body, job, "a.ndjson")["status"] == "succeeded"
    assert output(project) == [(i, f"n{i}", i / 2) for i in range(4)]


def test_ndjson_files_with_their_keys_in_another_order_are_one_schema(project: Project) -> None:
    """Hostile review: `{"amount": 2.5, "id": 2}` beside `{"id": 1, "amount": 1.5}` was a bad
    file ("the same columns in another order"): a JSON object's keys have no order, and each
    chunk is read by name into the job's schema."""
    project.data.mkdir()
    (project.data / "a.ndjson").write_text('{"id": 1, "name": "a", "amount": 1.5}\n')
    (project.data / "b.ndjson").write_text('{"amount": 2.5, "id": 2, "name": "b"}\n')
    (project.data / "c.ndjson").write_text('{"name": "c", "amount": 3.5, "id": 3}\n')
    config = CSV_JOB.replace('format = "csv"', 'format = "ndjson"').replace("*.csv*", "*.ndjson")
    project.write_config(
        config.replace('schema = { id = "int64", name = "string", amount = "double" }\n', "")
    )
    result = project.cli("run-now", "t", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert output(project) == [(1, "a", 1.5), (2, "b", 2.5), (3, "c", 3.5)]


def test_text_settings_are_validated(project: Project) -> None:
    write_csv(project.data / "a.csv", 0, 10)
    project.write_config(
        """
        [jobs.t]
        input = "data/*.csv"
        output = "out/t"
        sql = "SELECT * FROM chunk"
        format = "xml"
        schema = { id = "integer" }
        csv_delimiter = "ab"
        """
    )
    result = project.cli("validate")
    assert result.returncode == 2
    assert "jobs.t.format: expected one of" in result.stderr or "jobs.t.format:" in result.stderr
    assert "jobs.t.schema.id: expected an Arrow type" in result.stderr
    assert "jobs.t.csv_delimiter: must be one character" in result.stderr


FIELD = st.one_of(
    st.text(alphabet='ab,\n" ', max_size=6).map(lambda s: '"' + s.replace('"', '""') + '"'),
    st.text(alphabet="xyz", max_size=4),
)


@given(st.lists(st.tuples(FIELD, FIELD), min_size=1, max_size=60), st.integers(1, 40))
def test_segments_cut_only_between_records(records: list[tuple[str, str]], step: int) -> None:
    """Parsing each segment alone gives the records of parsing the whole file, in order."""
    data = ("a,b\n" + "".join(f"{x},{y}\n" for x, y in records)).encode()
    text = TextFormat("csv")
    bounds, lines = _segments(io.BytesIO(data), 4, len(data), text, 1, segment=step)
    assert bounds[0] == 4 and bounds[-1] == len(data) and len(lines) == len(bounds) - 1
    options = pacsv.ReadOptions(column_names=["a", "b"])
    parse = pacsv.ParseOptions(newlines_in_values=True)
    convert = pacsv.ConvertOptions(column_types={"a": "string", "b": "string"}, strings_can_be_null=False)
    whole = pacsv.read_csv(
        io.BytesIO(data[4:]), read_options=options, parse_options=parse, convert_options=convert
    )
    pieces = []
    for start, end, line in zip(bounds, bounds[1:], lines, strict=False):
        assert line == data[:start].count(b"\n") + 1  # the segment's first line
        piece = pacsv.read_csv(io.BytesIO(data[start:end]), read_options=options, parse_options=parse,
                               convert_options=convert)  # fmt: skip
        pieces += piece.to_pylist()
    assert pieces == whole.to_pylist()


def run_csv(project: Project, body: bytes, job: str = CSV_JOB, name: str = "a.csv", *args: str) -> dict:
    project.data.mkdir(exist_ok=True)
    (project.data / name).write_bytes(body)
    project.write_config(job)
    result = project.cli("run-now", "t", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def malformed(project: Project) -> list[tuple[int, str]]:
    folder = project.root / "out" / "t.malformed"
    if not folder.is_dir():
        return []
    return sorted(
        (r["_line"], r["_text"]) for r in ds.dataset(folder, format="parquet").to_table().to_pylist()
    )


@pytest.mark.parametrize("stray", ['{i}" floppy,1', '{i}",1'], ids=["inside", "at its end"])
def test_review_a_stray_quote_keeps_the_file_whole_and_its_records_exact(
    project: Project, stray: str
) -> None:
    """Hostile review: `5" floppy` in an unquoted field made the quote count cut a quoted field.
    So did a quote at the end of an unquoted field (`5",`), missed by the first fix: one record
    was published as two rows, exit 0."""
    lines = ["id,name,amount"] + [
        f'{i},"multi\nline {i}",1'
        if i % 50 == 0
        else f"{i}," + stray.format(i=i)
        if i == 7
        else f"{i},n{i},1"
        for i in range(20_000)
    ]
    run_csv(project, ("\n".join(lines) + "\n").encode())
    want = duckdb.sql(
        f"SELECT id, name, amount FROM read_csv('{project.data / 'a.csv'}', header = true, quote = '\"', "
        "columns = {'id': 'BIGINT', 'name': 'VARCHAR', 'amount': 'DOUBLE'})"
    ).fetchall()
    assert output(project) == sorted(want) and len(want) == 20_000
    assert malformed(project) == []


def test_review_malformed_records_next_to_blank_and_long_ones(project: Project) -> None:
    """Hostile review: a whitespace-only line broke the slow path (IndexError, chunk lost) or
    shifted the reported records; a 3 MB record failed its chunk."""
    long = "x" * 3_000_000
    body = f'id,name,amount\n1,a,1\n \n3,c,3\n4,"q\nq",4\n5,e,5\n6,f,6,extra\n7,{long},7\n8,h,NA\n'
    report = run_csv(project, body.encode())
    assert report["exit_status"] == 0
    assert [row[0] for row in output(project)] == [1, 3, 4, 5, 7]
    assert [line for line, _ in malformed(project)] == [3, 8, 10]  # " ", "6,f,6,extra", "8,h,NA"
    assert [text for _, text in malformed(project)] == [" ", "6,f,6,extra", "8,h,NA"]


def test_review_a_header_that_differs_from_the_schema_is_a_bad_file(project: Project) -> None:
    """Hostile review: fields were taken by position, so a header `name,id` put names in `id`."""
    project.data.mkdir()
    (project.data / "b.csv").write_text("amount,name,id\n2.5,x,1\n")
    report = run_csv(project, b"id,name,amount\n1,a,1.5\n")
    assert output(project) == [(1, "a", 1.5)]
    assert "the same columns in another order" in report["bad_files"][0]["error"]


def test_review_text_values_as_duckdb_reads_them(project: Project) -> None:
    """Unquoted empty fields are NULL, quoted empty strings and "NA" are text; zoned timestamps
    and NDJSON `null` lines read; nested JSON is a bad file, not a dead chunk."""
    job = CSV_JOB.replace('schema = { id = "int64", name = "string", amount = "double" }', "")
    run_csv(
        project, b'id,name,amount,at\n1,,1.5,2026-11-01T10:00:00Z\n2,"",,2026-11-01T11:00:00Z\n3,NA,2,\n', job
    )
    table = ds.dataset(project.out("t"), format="parquet").to_table().sort_by("id")
    assert table["name"].to_pylist() == [None, "", "NA"] and table["amount"].to_pylist() == [1.5, None, 2.0]
    assert table.schema.field("at").type.tz in ("UTC", "Etc/UTC")  # read zoned (DuckDB names it Etc/UTC)

    nd = job.replace('format = "csv"', 'format = "ndjson"').replace("*.csv*", "*.ndjson")
    (project.data / "a.csv").unlink()
    rows = [b'{"id": %d, "name": "n"}' % i for i in range(100)]
    body = b"\n".join([*rows[:50], b"null", b'{"id": 5', *rows[50:]]) + b"\n"
    run_csv(project, body, nd, "a.ndjson", "--fresh")  # other columns than the CSV's: start afresh
    assert len(ds.dataset(project.out("t"), format="parquet").to_table()) == 100
    assert [line for line, _ in malformed(project)] == [51, 52]
    report = run_csv(project, b'{"id": 1, "tags": [1, 2]}\n', nd, "b.ndjson")
    assert "nested values are not supported" in report["bad_files"][0]["error"]


def test_review_a_bare_null_line_alone_is_malformed_too(project: Project) -> None:
    """Second review: without a broken line beside it, pyarrow read `null` as a row of NULLs."""
    nd = CSV_JOB.replace('format = "csv"', 'format = "ndjson"').replace("*.csv*", "*.ndjson")
    rows = [b'{"id": %d, "name": "n", "amount": 1.5}' % i for i in range(20)]
    run_csv(project, b"\n".join([*rows[:5], b"null", *rows[5:]]) + b"\n", nd, "a.ndjson")
    assert [row[0] for row in output(project)] == list(range(20))
    assert malformed(project) == [(6, "null")]


def test_a_short_read_fails_the_chunk_instead_of_losing_its_last_records(tmp_path: Path) -> None:
    """Data safety: a byte range the file no longer holds in full is an error, never fewer rows
    reported as the whole chunk."""
    import pytest

    from minibatch.planner import Chunk
    from minibatch.textread import read_text_chunk

    path = tmp_path / "a.csv"
    path.write_bytes(b"id,name,amount\n1,a,1.5\n2,b,2.5\n")
    chunk = Chunk(str(path), "x", 15, 60, 0, 1, 15, 45)  # bytes 15..60: past the end (33)
    with open(path, "rb") as handle, pytest.raises(ValueError, match="read 16 bytes of the chunk's 45"):
        read_text_chunk(
            chunk, handle, TextFormat("csv"), (("id", "int64"), ("name", "string"), ("amount", "double"))
        )


def test_a_quote_opening_mid_field_is_found_across_blocks() -> None:
    """The check behind the stray-quote rule, where a block starts inside a quoted field or
    right after a field's byte (the byte before the block comes first in `data`)."""
    pattern = re.compile(rb'(?:[^"]*+(?<![^"\r\n,])"[^"]*+")*+[^"]*+(?<=[^"\r\n,])"')
    legal = b'\n1,"a, b",2\n3,"x""y",4\n'
    assert not _opens_mid_field(legal, 0, pattern)
    assert _opens_mid_field(b'\n1,5",2\n3,"x",4\n', 0, pattern)
    assert not _opens_mid_field(b'\nb, c",2\n', 1, pattern)  # inside "a, b, c" from before the block
    assert _opens_mid_field(b'\nb",2\n3,4"\n', 1, pattern)
    assert _opens_mid_field(b'5",2\n', 0, pattern)  # the byte before the block was a field's
    assert not _opens_mid_field(b',",2"\n', 0, pattern)


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_a_text_file_replaced_by_one_of_its_size_and_mtime_is_changed_input(tmp_path: Path, fmt: str) -> None:
    """Hostile review: a worker compared a text file's size and mtime only with the plan, and
    `cp -p`, `rsync -t` or `touch -r` keep both: it read the new file by the old plan's byte
    ranges, and the run succeeded with rows of both files and one record cut in two."""
    from minibatch.planner import plan_chunks
    from minibatch.reading import read_text
    from minibatch.tasks import InputChanged, JobSpec, Task
    from minibatch.textinput import read_text_meta

    def body(first: int) -> bytes:  # the same length for any first < 9000
        if fmt == "csv":
            return ("id,name\n" + "".join(f"{i},n{i}\n" for i in range(first, first + 1000))).encode()
        return "".join(f'{{"id": {i}, "name": "n{i}"}}\n' for i in range(first, first + 1000)).encode()

    path = tmp_path / f"a.{fmt}"
    path.write_bytes(body(1000))
    text = TextFormat(fmt, (("id", "int64"), ("name", "string")))
    chunks = plan_chunks([read_text_meta(str(path), text, segment=4096)], 4096)
    assert len(chunks) > 2
    schema = json.dumps([["id", "int64"], ["name", "string"]])
    job = JobSpec(
        "j", "m:f", None, None, str(tmp_path), str(tmp_path), str(tmp_path), input_schema=schema, text=text
    )
    task = Task(1, chunks[1], job, "run", 1, "part")
    assert read_text(task).table.num_rows > 0
    stat = path.stat()
    (tmp_path / "new").write_bytes(body(5000))
    os.replace(tmp_path / "new", path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    with pytest.raises(InputChanged, match="changed since it was planned"):
        read_text(task)


@pytest.mark.parametrize(
    "header", ['id,"name\n(full)",amount', 'id,name\n(full),amount"'], ids=["quoted", "stray"]
)
@pytest.mark.parametrize("name", ["a.csv", "a.csv.gz"])
def test_a_header_field_with_a_line_break_is_one_header(project: Project, name: str, header: str) -> None:
    """Hostile review: the header was taken to end at the first newline, also inside a quoted
    header field (Excel writes one for a multi-line header cell): its second half became a
    record, or every record one malformed one, and the run succeeded. Then (review of the fix)
    a quote inside an unquoted header field (`len"`) was taken to open one: rows were lost."""
    if header.endswith('"'):  # the header's name has a stray quote: the header is its first line
        header = header.replace("\n(full)", "")
    lines = [header] + [f"{i},n{i},{i / 4}" if i != 500 else f'{i},5" floppy,1' for i in range(20_000)]
    body = ("\n".join(lines) + "\n").encode()
    job = CSV_JOB.replace('schema = { id = "int64", name = "string", amount = "double" }\n', "")
    report = run_csv(project, gzip.compress(body) if name.endswith(".gz") else body, job, name)
    assert report["exit_status"] == 0
    table = ds.dataset(project.out("t"), format="parquet").to_table()
    names = ["id", "name\n(full)", "amount"] if "(full)" in header else ["id", "name", 'amount"']
    assert table.column_names[:3] == names
    assert sorted(table["id"].to_pylist()) == list(range(20_000))
    assert malformed(project) == []


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "inferred"])
@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_review_an_empty_file_has_no_rows(project: Project, fmt: str, declared: bool) -> None:
    """Hostile review: a 0-byte export (an empty day) failed the run as a bad file (`the file is
    empty`, `Empty CSV file`), where a CSV of a header alone has no rows."""
    job = NDJSON_JOB if fmt == "ndjson" else CSV_JOB.replace("*.csv*", "*.csv")
    if not declared:
        job = job.replace('schema = { id = "int64", name = "string", amount = "double" }\n', "")
    rows = [{"id": i, "name": f"n{i}", "amount": i / 2} for i in range(3)]
    project.data.mkdir()
    (project.data / f"b.{fmt}").write_bytes(b"")
    (project.data / f"c.{fmt}.gz").write_bytes(gzip.compress(b""))
    (project.data / f"d.{fmt}").write_bytes(b"\xef\xbb\xbf\r\n")  # Excel's export of no rows: a BOM
    if fmt == "csv":
        body = "id,name,amount\n" + "".join(f"{r['id']},{r['name']},{r['amount']}\n" for r in rows)
    else:
        body = "".join(json.dumps(r) + "\n" for r in rows)
    report = run_csv(project, body.encode(), job.replace(f"*.{fmt}", f"*.{fmt}*"), f"a.{fmt}")
    assert report["status"] == "succeeded", report
    assert output(project) == [(r["id"], r["name"], r["amount"]) for r in rows]


def test_inference_passes_over_a_record_the_sample_cut_or_that_is_malformed() -> None:
    """Hostile review: the first MiB, cut at its last newline, may end inside a quoted field
    that holds newlines; a valid file was a bad file ("Expected 3 columns, got 2"), as was one
    with a short record in its first MiB, or an NDJSON value of another type there."""
    cut = b'id,name,amount\n1,a,1.5\n2,"line one\nline two",2.5\n3,"cut inside\nthe quotes\n'
    assert infer(cut, "csv", ",") == (("id", "int64"), ("name", "string"), ("amount", "double"))
    short = b"id,name,amount\n1,a,1.5\n2,short\n3,c,3.5\n"
    assert infer(short, "csv", ",") == (("id", "int64"), ("name", "string"), ("amount", "double"))
    drift = b'{"id": 1, "amount": 1.5}\n{"id": 2, "amount": 2.5}\n{"id": 3, "amount": "zz"}\n'
    assert infer(drift, "ndjson", ",") == (("id", "int64"), ("amount", "double"))


INFERRED = CSV_JOB.replace('schema = { id = "int64", name = "string", amount = "double" }\n', "")


def test_a_csv_of_a_header_alone_has_no_rows_not_a_schema_of_strings(project: Project) -> None:
    """Hostile review: a header-only CSV (an empty day's export) sorted first decided an
    all-string schema, and every file with rows was then a bad file; without a final newline
    it was a bad file itself, a declared schema or not. Its header still has to fit."""
    project.data.mkdir()
    (project.data / "b.csv").write_text("id,name,amount\n1,a,1.5\n2,b,2.5\n")
    for body in ("id,name,amount\n", "id,name,amount"):
        for job in (INFERRED, CSV_JOB):
            report = run_csv(project, body.encode(), job)
            assert report["status"] == "succeeded" and report["bad_files"] == [], (body, job, report)
            assert output(project) == [(1, "a", 1.5), (2, "b", 2.5)]
    report = run_csv(project, b"id,other\n", INFERRED)
    assert "name (string) missing; amount (double) missing" in report["bad_files"][0]["error"], report


def test_a_csv_whose_first_record_is_longer_than_the_sample_is_a_bad_file_not_strings(
    project: Project,
) -> None:
    """Hostile review: a first record longer than the sample left inference a header alone:
    every column was published as a string, exit 0. Without a record there is no schema."""
    body = b"id,name,amount\n1," + b"x" * (2**20 + 10) + b",1.5\n2,b,2.5\n"
    report = run_csv(project, body, INFERRED)
    assert report["status"] == "failed" and "no whole record in the first" in report["bad_files"][0]["error"]


def test_inference_keeps_every_record_but_those_of_another_type() -> None:
    """Hostile review: inference halved an NDJSON sample until it parsed, throwing away good
    records (a column first seen after the cut was lost, its records malformed); and a CSV whose
    every sampled record has a field too many got no types (an AssertionError in the worker)."""
    lines = [{"id": i, "v": i} if i < 7 else {"id": i, "v": i + 0.5, "extra": "e"} for i in range(12)]
    lines[9]["id"] = "zz"
    sample = "\n".join(json.dumps(line) for line in lines).encode() + b"\n"
    assert infer(sample, "ndjson", ",") == (("id", "int64"), ("v", "double"), ("extra", "string"))
    with pytest.raises(ValueError, match="Expected 2 columns, got 3"):
        infer(b"id,amount\n1,2.5,\n4,5.5,\n", "csv", ",")
    with pytest.raises(ValueError, match="no JSON object in the sample"):  # (not "Empty JSON file")
        infer(b'[2, 1]\n{"id": 3, "x": \n', "ndjson", ",")


def test_a_header_alone_does_not_keep_a_schema_no_file_with_rows_has(project: Project) -> None:
    """Hostile review: a header-only CSV fits any stored schema, so once the only file with rows
    was rewritten with another type, the stored schema was never decided again: the file was
    bad, then skipped by later runs, which succeeded over an empty output."""
    project.data.mkdir()
    (project.data / "a.csv").write_text("id,name,amount\n")
    report = run_csv(project, b"id,name,amount\n1,x,1.5\n", INFERRED, "b.csv")
    assert report["status"] == "succeeded" and output(project) == [(1, "x", 1.5)]
    report = run_csv(project, b"id,name,amount\n2,y,text\n", INFERRED, "b.csv")
    assert report["status"] == "succeeded" and report["bad_files"] == [], report
    assert ds.dataset(project.out("t"), format="parquet").to_table().to_pylist() == [
        {"id": 2, "name": "y", "amount": "text"}
    ]


def test_review_a_float_too_big_for_its_declared_type_is_malformed_not_infinite(project: Project) -> None:
    """Hostile review: with a declared schema, `1e40` as float32 and `1e400` as double were
    published as inf without a word, where `300` as int8 went to the malformed rows."""
    job = CSV_JOB.replace('amount = "double"', 'amount = "double", small = "float"')
    body = "id,name,amount,small\n1,a,1.5,2.5\n2,b,1e400,1\n3,c,1,1e40\n4,d,inf,-Infinity\n"
    run_csv(project, body.encode(), job)
    table = ds.dataset(project.out("t"), format="parquet").to_table().sort_by("id")
    assert table["id"].to_pylist() == [1, 4]  # inf written as inf stays
    assert table["amount"].to_pylist() == [1.5, float("inf")]
    assert [line for line, _ in malformed(project)] == [3, 4]
