"""The HTML run report, made from real runs of the real CLI: a failed run with a retried and a
dead-lettered chunk, the no-op rerun after it, and a run killed mid-way."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from minibatch.manifest import Manifest
from minibatch.report import ReportError, default_report_path, render_report, write_report
from minibatch.units import format_size

from conftest import Project

HOSTILE = "<script>alert(1)</script>"

# One chunk of b<i>.parquet always fails (with markup in its message), one chunk of a.parquet
# fails once, one is a straggler.
JOBS = f"""
import os, time
import pyarrow.compute as pc

def picky(table, ctx):
    name = os.path.basename(ctx.file)
    time.sleep(0.15 if (name, ctx.row_start) == ("a.parquet", 200) else 0.01)
    if name.startswith("b") and ctx.row_start == 0:
        raise ValueError("{HOSTILE} is not a number")
    if (name, ctx.row_start, ctx.attempt) == ("a.parquet", 100, 1):
        raise ConnectionError("upstream said no & hung up")
    return table.append_column("doubled", pc.multiply(table["value"], 2))
"""

CONFIG = f"""
[jobs.rep]
description = "{HOSTILE}"
input = "data/*.parquet"
output = "out/rep"
process = "myjobs.report_jobs:picky"
chunk_bytes = "3KB"
retries = 1
retry_backoff = "10ms"
"""


@dataclass
class Runs:
    project: Project
    manifest: Manifest
    failed: dict[str, Any]  # the runs table's row
    attempts: list[dict[str, Any]]
    noop: dict[str, Any]  # the rerun that found nothing to do
    page: str  # the failed run's report


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("report")
    project = Project(root=tmp / "proj", count_file=tmp / "count.txt")
    (project.root / "myjobs").mkdir(parents=True)
    (project.root / "myjobs" / "__init__.py").write_text("")
    (project.root / "myjobs" / "report_jobs.py").write_text(JOBS)
    project.write_config(CONFIG)
    project.write_input("a.parquet", 0, 600)
    project.write_input("b<i>.parquet", 600, 400, row_group=20)  # other chunk sizes: skew
    first = project.cli("run-now", "rep")
    assert first.returncode == 1, first.stderr  # the dead letter fails the run
    manifest = Manifest(project.root / ".state" / "manifest.duckdb")
    failed = manifest.run("rep")
    assert failed is not None
    second = project.cli("run-now", "rep")
    assert second.returncode == 0, second.stderr
    noop = manifest.run("rep")
    assert noop is not None and noop["run_id"] != failed["run_id"]
    page = render_report(manifest, "rep", failed["run_id"])
    return Runs(project, manifest, failed, manifest.attempts(failed["run_id"]), noop, page)


def plot(page: str, div_id: str) -> list[dict[str, Any]]:
    """The traces of the figure in div `div_id`: the JSON data argument of its Plotly.newPlot."""
    match = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert match, f"no figure {div_id}"
    traces, _ = json.JSONDecoder().raw_decode(page, match.end())
    return traces


def trace(page: str, div_id: str, name: str) -> dict[str, Any]:
    (found,) = [t for t in plot(page, div_id) if t.get("name") == name]
    return found


def test_report_shows_the_run_and_every_section(runs: Runs) -> None:
    page = runs.page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert f"rep run {runs.failed['run_id']}" in page and "<td>failed</td>" in page
    for heading in [
        "Run", "Timeline of chunks per worker slot", "Throughput", "Bytes in flight and the memory budget",
        "Slowest chunks (stragglers)", "Chunk size skew", "Failures", "Settings",
    ]:  # fmt: skip
        assert f"<h2>{heading}</h2>" in page
    assert "<td>process</td><td>myjobs.report_jobs:picky</td>" in page  # a setting
    assert f"{runs.failed['chunks_total']} planned" in page


def test_every_failed_attempt_is_listed_with_its_escaped_traceback(runs: Runs) -> None:
    failed = [a for a in runs.attempts if a["outcome"] != "done"]
    assert sorted(a["outcome"] for a in failed) == ["dead", "retried", "retried"]
    for attempt in failed:
        assert attempt["traceback"] and html.escape(attempt["traceback"]) in runs.page
        assert html.escape(f"{attempt['error_type']}: {attempt['error_message']}") in runs.page
    assert "in picky" in runs.page and "upstream said no &amp; hung up" in runs.page


def test_user_text_is_escaped_everywhere(runs: Runs) -> None:
    # the message (failures), the description (settings), the file name (labels, hover text)
    assert HOSTILE not in runs.page and "b<i>" not in runs.page
    assert runs.page.count(html.escape(HOSTILE)) >= 3  # message, traceback, description
    assert "b&lt;i&gt;.parquet[0:" in runs.page


def test_gantt_has_one_bar_per_started_attempt_coloured_by_outcome(runs: Runs) -> None:
    bars = plot(runs.page, "gantt")
    started = [a for a in runs.attempts if a["started_at"] is not None]
    assert sum(len(bar["x"]) for bar in bars) == len(started) == len(runs.attempts)
    assert {bar["name"] for bar in bars} == {"done", "retried", "dead"}
    assert {slot for bar in bars for slot in bar["y"]} == {0, 1}  # 2 workers
    dead = trace(runs.page, "gantt", "dead")
    assert "b&lt;i&gt;.parquet[0:" in dead["hovertext"][0] and "attempt 2" in dead["hovertext"][0]


def test_throughput_adds_up_to_the_rows_read(runs: Runs) -> None:
    rows = trace(runs.page, "throughput", "rows/s")
    width = rows["x"][1] - rows["x"][0]
    assert sum(rows["y"][:-1]) * width == pytest.approx(runs.failed["rows_in"])
    megabytes = trace(runs.page, "throughput", "MB/s")
    assert sum(megabytes["y"][:-1]) * width == pytest.approx(runs.failed["bytes_in"] / 1e6)


def test_bytes_in_flight_stay_within_the_budget_and_drain(runs: Runs) -> None:
    in_flight = trace(runs.page, "in-flight", "in flight")["y"]
    budget = trace(runs.page, "in-flight", "memory budget")["y"]
    assert budget == [runs.failed["memory_limit"]] * 2  # far above the peak: bytes on a log axis
    assert 0 < max(in_flight) <= budget[0]
    assert in_flight[0] == in_flight[-1] == 0
    assert f"of a {format_size(runs.failed['memory_limit'])} budget" in runs.page


def test_stragglers_and_skew(runs: Runs) -> None:
    def seconds(a: dict[str, Any]) -> float:
        return (a["ended_at"] - a["started_at"]).total_seconds()

    median = statistics.median(seconds(a) for a in runs.attempts if a["outcome"] == "done")
    table = runs.page.split("<h2>Slowest chunks")[1].split("<h2>")[0].split("<tr>")[2:]
    assert len(table) == 10
    slowest = max(runs.attempts, key=seconds)  # the sleeper, or a worker's first call (imports)
    assert html.escape(slowest["label"]) in table[0] and f"{seconds(slowest) / median:.1f}x" in table[0]
    assert any("a.parquet[200:250]" in row for row in table)  # the chunk that sleeps
    sizes = plot(runs.page, "skew")[0]["x"]
    assert len(sizes) == runs.failed["chunks_done"] and min(sizes) < max(sizes)  # 2 chunk sizes


def test_no_remote_resources_and_plotly_inlined_once(runs: Runs) -> None:
    page = runs.page
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=", page, re.IGNORECASE)
    assert not re.search(r"<link[^>]*\shref=", page, re.IGNORECASE)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page, re.IGNORECASE)
    assert page.count("window.PlotlyConfig") == 1  # plotly.js's bundle, once for four figures
    assert len(re.findall(r"Plotly\.newPlot\(", page)) == 4


def test_a_run_that_computed_nothing_still_renders(runs: Runs) -> None:
    page = render_report(runs.manifest, "rep")  # the latest run: the no-op rerun
    assert runs.noop["run_id"] in page
    assert "No chunks were computed in this run." in page and "<h2>Settings</h2>" in page
    assert "<p>No failures.</p>" in page and "Plotly.newPlot" not in page


def test_unknown_job_or_run_is_a_report_error(runs: Runs) -> None:
    with pytest.raises(ReportError, match="job 'nope' has no runs"):
        render_report(runs.manifest, "nope")
    with pytest.raises(ReportError, match="job 'rep' has no run '20000101T000000Z-000000'"):
        render_report(runs.manifest, "rep", "20000101T000000Z-000000")


def test_write_report_replaces_the_file_at_the_default_path(runs: Runs) -> None:
    state_dir = runs.project.root / ".state"
    path = default_report_path(state_dir, "rep", runs.failed["run_id"])
    assert path == state_dir / "reports" / "rep" / f"{runs.failed['run_id']}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("stale")
    assert write_report(runs.manifest, "rep", path, runs.failed["run_id"]) == path
    assert path.read_text() == runs.page
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_report_writes_over_a_report_but_not_over_another_file(runs: Runs) -> None:
    """Hostile review: `report -o data/a.parquet` (or config.toml) replaced the user's file."""
    root = runs.project.root
    page = root / "page.html"
    assert runs.project.cli("report", "rep", "-o", str(page)).returncode == 0
    written = page.read_text()
    again = runs.project.cli("report", "rep", "--run", runs.noop["run_id"], "-o", str(page))
    assert again.returncode == 0 and page.read_text() != written  # an earlier report is replaced
    for name in ("data/a.parquet", "config.toml"):
        before = (root / name).read_bytes()
        refused = runs.project.cli("report", "rep", "-o", str(root / name))
        assert refused.returncode == 2 and "is not a minibatch report" in refused.stderr, refused.stderr
        assert (root / name).read_bytes() == before
    # hostile review: a mistyped directory was made (`-o /nonexist/x.html` made /nonexist)
    typo = runs.project.cli("report", "rep", "-o", str(root / "reprots" / "x.html"))
    assert typo.returncode == 2 and f"{root / 'reprots'}: no such directory" in typo.stderr, typo.stderr
    assert not (root / "reprots").exists()


def test_a_killed_run_renders_without_an_end(project: Project) -> None:
    project.write_config("""
    [jobs.f]
    input = "data/*.parquet"
    output = "out/f"
    process = "myjobs.faulty:crash_at"
    chunk_bytes = "3KB"
    """)
    project.write_input("f.parquet", 0, 500)
    process = project.start("run-now", "f", env={"MB_CRASH_AT": "6"})  # kills its process group
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    manifest = Manifest(project.root / ".state" / "manifest.duckdb")
    page = render_report(manifest, "f")
    assert "<td>running</td>" in page and "<td>ended</td><td>-</td>" in page


# -- in a browser -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_draws_in_headless_chromium_offline(runs: Runs, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(runs.page)
    shot = tmp_path / "shot.png"
    # one browser start: the screenshot, and the page as plotly.js left it
    dom = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", "--dump-dom", page)
    width, height, pixels = png(shot.read_bytes())
    assert (width, height) == (1200, 1600)
    # A blank page's rows filter to a handful of byte values; text and charts use them all.
    assert len(set(pixels)) > 100
    gantt = dom.split('id="gantt"')[1].split('id="throughput"')[0]
    assert gantt.count('class="point"') == len(runs.attempts)  # drawn, one bar per attempt
    assert dom.count('class="main-svg"') >= 4


def chromium(tmp: Path, *args: object) -> str:
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    *options, page = args
    result = subprocess.run(
        [*command, *map(str, options), f"file://{page}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the inflated (still filtered) pixel rows of an 8-bit RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        position += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    pixels = zlib.decompress(idat)
    assert depth == 8 and colour in (2, 6)  # RGB or RGBA
    assert len(pixels) == height * (1 + width * (3 if colour == 2 else 4))
    return width, height, pixels
