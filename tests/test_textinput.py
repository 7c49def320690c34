"""CSV and NDJSON inputs: a CSV with quoted newlines split into byte-range chunks across
workers gives exactly DuckDB's read_csv of it; malformed records are quarantined with their
line numbers; a file whose schema drifts is a bad file; compressed files are one chunk."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import duckdb
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
from hypothesis import given
from hypothesis import strategies as st

from minibatch.textinput import TextFormat, _segments

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
