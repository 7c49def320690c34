"""The run report: one self-contained HTML page per run, written from the manifest alone.

Everything comes from the `runs` and `attempts` tables, so a report can be made for any past
run, also one that crashed. plotly.js is inlined once (about 4.6 MB) so the page opens offline;
every string a user controls (file names, errors, tracebacks, settings) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from minibatch.manifest import Manifest, manifest_path
from minibatch.states import Outcome
from minibatch.treemem import describe
from minibatch.units import format_size

Row = dict[str, Any]

STRAGGLERS = 10  # rows in the slowest-attempts table
BINS = 50  # throughput is averaged over 1/50 of the run
COLOURS = {
    Outcome.DONE: "#2ca02c",
    Outcome.RETRIED: "#ff7f0e",
    Outcome.DEAD: "#d62728",
    Outcome.INPUT_CHANGED: "#7f7f7f",
}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
NOTHING = "No chunks were computed in this run."
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 2px 12px 2px 0; text-align: left; }
th { font-weight: 600; } tr:nth-child(even) td { background: #f7f7f7; }
pre { background: #f4f4f4; padding: 8px; overflow-x: auto; font-size: 12px; }
details { margin: .5em 0; } summary { cursor: pointer; } .dead summary { color: #b00; }
"""


class ReportError(Exception):
    """No report can be made: the job has no runs, or not the one asked for."""


def render_report(manifest: Manifest, job: str, run_id: str | None = None) -> str:
    """The HTML report of run `run_id` of `job` (default: its latest run)."""
    run = manifest.run(job, run_id)
    if run is None:
        what = f"no run {run_id!r}" if run_id else "no runs"
        raise ReportError(f"job {job!r} has {what} in the manifest {manifest.path}")
    checks = manifest.named("check_counts", read_only=True, run_id=run["run_id"])
    return _page(run, manifest.attempts(run["run_id"]), checks)


def write_report(manifest: Manifest, job: str, path: Path, run_id: str | None = None) -> Path:
    """Write the report to `path` atomically: a reader never sees half a page."""
    text = render_report(manifest, job, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def report_run(state_dir: Path, job: str, run_id: str | None, output: str | None) -> Path:
    """Write the report of `run_id` to `output` (default: under state_dir); the path written.
    Without `run_id`, the latest run that did something: a re-run with nothing to do has an
    empty page. Raises ReportError for a run that does not exist."""
    manifest = Manifest(manifest_path(state_dir))
    run = manifest.run(job, run_id) if run_id else manifest.run_with_work(job) or manifest.run(job)
    if run is None:
        raise ReportError(f"no run {run_id} of {job}" if run_id else f"{job} has no runs yet")
    path = Path(output) if output else default_report_path(state_dir, job, run["run_id"])
    if output and path.exists() and not _is_report(path):  # `-o data/a.parquet`: a typo, not a wish
        raise ReportError(f"{path} exists and is not a minibatch report: not writing over it")
    if output and not path.parent.is_dir():  # a typo too: only the state_dir's own are made
        raise ReportError(f"{path.parent}: no such directory")
    return write_report(manifest, job, path, run["run_id"])


def _is_report(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(512)
    return head.startswith(b"<!DOCTYPE html>") and b"<title>minibatch report: " in head


def default_report_path(state_dir: Path, job: str, run_id: str) -> Path:
    return state_dir / "reports" / job / f"{run_id}.html"


# -- the page ---------------------------------------------------------------------------------


def _page(run: Row, attempts: list[Row], checks: list[Row]) -> str:
    title = html.escape(f"minibatch report: {run['job']} run {run['run_id']}")
    parts = [f"<h1>{title}</h1>", _section("Run", _header(run))]
    if attempts:
        parts += _charts(run, attempts)
    else:
        parts.append(f"<p>{NOTHING}</p>")
    if checks:
        rows = [(c["check_name"], c["action"], f"{c['rows_failed']:,}") for c in checks]
        parts.append(_section("Checks: rows that failed each", _table(["check", "action", "rows"], rows)))
    parts += [_section("Failures", _failures(attempts)), _section("Settings", _settings(run))]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _charts(run: Row, attempts: list[Row]) -> list[str]:
    t0, span = run["started_at"], _span(run, attempts)  # time axes: seconds since the run started
    started = [a for a in attempts if _ran(a)]
    done = [a for a in started if a["outcome"] == Outcome.DONE]
    if not started:
        return [f"<p>{NOTHING} (no attempt started)</p>"]
    timeline = _gantt(started, t0)
    throughput = _throughput(done, t0, span)
    in_flight = _in_flight(run, attempts)
    for figure in (timeline, throughput, in_flight):  # one time scale, so the charts line up
        figure.update_xaxes(range=[0, span])
    return [
        _section("Timeline of chunks per worker slot", _embed(timeline, "gantt", with_plotlyjs=True)),
        _section("Throughput", _embed(throughput, "throughput")),
        _section("Bytes in flight and the memory budget", _embed(in_flight, "in-flight")),
        _section("Slowest chunks (stragglers)", _stragglers(started)),
        _section("Chunk size skew", _skew(done)),
    ]


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _embed(figure: go.Figure, div_id: str, with_plotlyjs: bool = False) -> str:
    """A figure as an HTML fragment; only the page's first one carries plotly.js (4.6 MB)."""
    # Legends above the plot and fixed margins: the time axes of all charts line up.
    legend = {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"}
    figure.update_layout(template="plotly_white", legend=legend, margin={"l": 80, "r": 20, "t": 30, "b": 45})
    return str(figure.to_html(
        full_html=False, include_plotlyjs=with_plotlyjs, include_mathjax=False,
        config=PLOT_CONFIG, div_id=div_id,
    ))  # fmt: skip


def _header(run: Row) -> str:
    limit, peak = run["memory_limit"] or 0, run["peak_in_flight"] or 0
    rows = [
        ("job", run["job"]),
        ("run id", run["run_id"]),
        ("status", run["status"] + (f": {run['error']}" if run["error"] else "")),
        ("started", _when(run["started_at"])),
        ("ended", _when(run["ended_at"])),
        ("duration", _secs(_at(run["ended_at"], run["started_at"]) if run["ended_at"] else None)),
        ("chunks", f"{run['chunks_total'] or 0} planned: {run['chunks_done'] or 0} done now, "
         f"{run['chunks_reused'] or 0} already done, {run['chunks_dead'] or 0} dead-lettered, "
         f"{run['chunks_skipped'] or 0} dead letters skipped, {run['bad_files'] or 0} bad files"),
        ("rows", f"{run['rows_in'] or 0:,} in, {run['rows_out'] or 0:,} out"),
        ("bytes", f"{format_size(run['bytes_in'] or 0)} in, {format_size(run['bytes_out'] or 0)} written"),
        ("throughput", f"{run['rows_per_second'] or 0:,.0f} rows/s, {run['mb_per_second'] or 0:.2f} MB/s"),
        ("workers", f"{run['workers']}, {run['utilisation'] or 0:.0%} busy"),
        ("memory", describe(limit, peak, run.get("peak_memory"), run.get("idle_memory"))),
    ]  # fmt: skip
    return _table(["", ""], rows)


# -- charts -----------------------------------------------------------------------------------


def _gantt(started: list[Row], t0: datetime) -> go.Figure:
    """One bar per attempt: y the worker slot, x its start..end, coloured by outcome."""
    figure = go.Figure()
    for outcome in sorted({a["outcome"] for a in started}):
        group = [a for a in started if a["outcome"] == outcome]
        figure.add_bar(
            name=outcome, orientation="h", marker_color=COLOURS.get(outcome, "#9467bd"),
            y=[a["slot"] for a in group], base=[_at(a["started_at"], t0) for a in group],
            x=[_duration(a) for a in group], hovertext=[_hover(a) for a in group],
            hovertemplate="%{hovertext}<extra></extra>",
        )  # fmt: skip
    slots = sorted({a["slot"] for a in started})
    figure.update_yaxes(
        tickvals=slots, ticktext=[f"slot {s}" for s in slots], autorange="reversed", title="worker"
    )
    figure.update_xaxes(title="seconds since the run started")
    return figure.update_layout(barmode="overlay", showlegend=True, height=120 + 40 * len(slots))


def _hover(a: Row) -> str:
    # plotly renders a few tags in hover text, so the label is escaped like the rest of the page
    parts = [f"{k} {a[f'{k}_seconds']:.3f}" for k in ("read", "compute", "write") if a[f"{k}_seconds"]]
    return "<br>".join([
        f"<b>{html.escape(a['label'] or '')}</b>",
        f"chunk {a['chunk_id']}, attempt {a['attempt']}: {a['outcome']}",
        f"{a['rows_in'] or 0:,} rows in, {_duration(a):.3f} s" + (f" ({', '.join(parts)})" if parts else ""),
        f"peak RSS {format_size(a['peak_rss'] or 0)}",
    ])  # fmt: skip


def _throughput(done: list[Row], t0: datetime, span: float) -> go.Figure:
    """Rows/s and MB/s per bin; each attempt's input is spread evenly over its duration."""
    width = max(span, 1e-3) / BINS
    rows, megabytes = [0.0] * BINS, [0.0] * BINS
    for a in done:
        start, end = _at(a["started_at"], t0), _at(a["ended_at"], t0)
        _spread(rows, width, start, end, a["rows_in"] or 0)
        _spread(megabytes, width, start, end, (a["bytes_in"] or 0) / 1e6)
    x = [i * width for i in range(BINS + 1)]  # the last point closes the final step
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for row, (name, values) in enumerate([("rows/s", rows), ("MB/s", megabytes)], start=1):
        y = [v / width for v in [*values, values[-1]]]
        figure.add_scatter(name=name, x=x, y=y, mode="lines", line_shape="hv", row=row, col=1)
        figure.update_yaxes(title=name, rangemode="tozero", row=row, col=1)
    figure.update_xaxes(title="seconds since the run started", row=2, col=1)
    return figure.update_layout(height=380, showlegend=False)


def _spread(bins: list[float], width: float, start: float, end: float, amount: float) -> None:
    if end <= start:
        bins[min(max(int(start / width), 0), len(bins) - 1)] += amount
        return
    for i in range(max(int(start / width), 0), min(int(end / width) + 1, len(bins))):
        overlap = min(end, (i + 1) * width) - max(start, i * width)
        if overlap > 0:
            bins[i] += amount * overlap / (end - start)


def _in_flight(run: Row, attempts: list[Row]) -> go.Figure:
    """Budget bytes reserved over time: each attempt holds its share from admission to its end."""
    t0, span, limit = run["started_at"], _span(run, attempts), run["memory_limit"] or 0
    timed = [a for a in attempts if a["admitted_at"] and a["ended_at"]]
    events = [(_at(a["admitted_at"], t0), a["reserved_bytes"] or 0) for a in timed]
    events += [(_at(a["ended_at"], t0), -(a["reserved_bytes"] or 0)) for a in timed]
    level, x, y = 0, [0.0], [0]
    for at, delta in sorted(events):  # at one instant releases sort first: no false peak
        level += delta
        x.append(at)
        y.append(level)
    # A budget far above the peak would flatten the in-flight line on a linear axis.
    log = 0 < 10 * max(y) < limit
    unit, size = ("bytes", 1) if log else _unit(max([limit, *y]))
    figure = go.Figure()
    figure.add_scatter(
        name="in flight", x=[*x, span], y=[v / size for v in [*y, level]],
        mode="lines", line_shape="hv", fill="tozeroy",
    )  # fmt: skip
    if limit:
        budget = {"x": [0, span], "y": [limit / size] * 2, "mode": "lines", "line_dash": "dash"}
        figure.add_scatter(name="memory budget", **budget)
    if log:
        figure.update_yaxes(type="log", **_binary_ticks(min(v for v in y if v > 0), limit))
    figure.update_yaxes(title=f"{unit}{' (log scale)' if log else ''}")
    figure.update_xaxes(title="seconds since the run started")
    return figure.update_layout(height=320)


# -- tables -----------------------------------------------------------------------------------


def _stragglers(started: list[Row]) -> str:
    done = [_duration(a) for a in started if a["outcome"] == Outcome.DONE]
    median = statistics.median(done or [_duration(a) for a in started])
    slowest = sorted(started, key=_duration, reverse=True)[:STRAGGLERS]
    rows = [
        (a["label"], a["attempt"], a["outcome"], a["slot"], _secs(_duration(a)),
         " / ".join(_secs(a[f"{k}_seconds"]) for k in ("read", "compute", "write")),
         f"{a['rows_in'] or 0:,}", f"{_duration(a) / median:.1f}x" if median else "-")
        for a in slowest
    ]  # fmt: skip
    head = ["chunk", "attempt", "outcome", "slot", "seconds", "read / compute / write", "rows", "vs median"]
    return f"<p>Median done attempt: {_secs(median)}.</p>\n" + _table(head, rows)


def _skew(done: list[Row]) -> str:
    if not done:
        return "<p>No chunk finished in this run.</p>"
    sizes = [a["bytes_in"] or 0 for a in done]
    stats = [_stats("uncompressed bytes in", sizes, format_size)]
    stats.append(_stats("rows in", [a["rows_in"] or 0 for a in done], "{:,.0f}".format))
    unit, size = _unit(max(sizes))
    bars = go.Histogram(
        x=[s / size for s in sizes], nbinsx=30, marker_color=COLOURS[Outcome.DONE], name="chunks"
    )
    figure = go.Figure(bars)
    figure.update_xaxes(title=f"uncompressed {unit} in, per done chunk")
    figure.update_layout(height=280, bargap=0.05, yaxis_title="chunks")
    return _table(["", "min", "median", "max", "max / median"], stats) + _embed(figure, "skew")


def _stats(name: str, values: list[int], show: Callable[[Any], str]) -> tuple[str, ...]:
    median = statistics.median(values)
    ratio = f"{max(values) / median:.1f}" if median else "-"
    return (name, show(min(values)), show(median), show(max(values)), ratio)


def _failures(attempts: list[Row]) -> str:
    failed = [a for a in attempts if a["outcome"] != Outcome.DONE]
    if not failed:
        return "<p>No failures.</p>"
    items = []
    for a in failed:
        # dead letters are what someone must act on: open; retried attempts folded
        dead = a["outcome"] == Outcome.DEAD
        error = f"{a['error_type']}: {a['error_message']}"
        summary = f"{a['label']}, attempt {a['attempt']} ({a['outcome']}): {error}"
        items.append(
            f'<details class="{a["outcome"]}"{" open" if dead else ""}><summary>{html.escape(summary)}'
            f"</summary><pre>{html.escape(a['traceback'] or 'no traceback recorded')}</pre></details>"
        )
    return f"<p>{len(failed)} failed attempts.</p>\n" + "\n".join(items)


def _settings(run: Row) -> str:
    if not run["settings"]:
        return "<p>Not recorded for this run.</p>"
    settings = json.loads(run["settings"])
    return _table(["setting", "value"], list(settings.items()))


def _table(head: list[str], rows: list[tuple[Any, ...]]) -> str:
    """An HTML table; every cell is escaped here, so callers pass plain values."""
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>" for row in rows]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


# -- small helpers ----------------------------------------------------------------------------


def _unit(largest: float) -> tuple[str, int]:
    """The binary unit `largest` reads best in, so the axes agree with the tables' sizes."""
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "bytes", 1


def _binary_ticks(low: float, high: float) -> dict[str, list[Any]]:
    """Log-axis ticks at powers of two, named in KiB/MiB/GiB (plotly's own read "10µ")."""
    first, last = math.floor(math.log2(max(low, 1))), math.ceil(math.log2(high))
    step = max(1, math.ceil((last - first) / 6))
    values = [2**k for k in range(last, first - 1, -step)]  # from the top: the budget is labelled
    return {"tickvals": values, "ticktext": [format_size(v).replace(".0 ", " ") for v in values]}


def _ran(a: Row) -> bool:
    return a["started_at"] is not None and a["ended_at"] is not None and a["slot"] is not None


def _at(when: datetime, t0: datetime) -> float:
    return (when - t0).total_seconds()


def _duration(a: Row) -> float:
    return float((a["ended_at"] - a["started_at"]).total_seconds())


def _span(run: Row, attempts: list[Row]) -> float:
    """Seconds from the run's start to its end (or its last attempt's, if it never ended)."""
    ends = [a["ended_at"] for a in attempts if a["ended_at"]] + [run["ended_at"] or run["started_at"]]
    return _at(max(ends), run["started_at"])


def _when(at: datetime | None) -> str:
    return at.isoformat(sep=" ", timespec="seconds") if at else "-"


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
