"""The markdown report: the machine, the datasets, one row per workload x engine, and notes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench import datasets
from bench.measure import Sample, median
from bench.workloads import DASK_EXECUTOR, Engine, Workload, cpu_model

MiB = 2**20
VERSIONED = ("pyarrow", "duckdb", "polars", "dask", "distributed", "pandas", "numpy", "psutil")


@dataclass
class Result:
    """Every run of one engine on one workload."""

    workload: Workload
    engine: Engine
    samples: list[Sample] = field(default_factory=list)
    in_process: list[float] = field(default_factory=list)
    chunks: int | None = None  # minibatch: chunks computed, from its summary
    problem: str | None = None  # "n/a ...", "FAILED ...", "WRONG RESULT ..."
    detail: str = ""  # stderr tail or the check's message, for the notes
    strays: int = 0  # processes left running after the command exited, over all runs
    cluster_start: float | None = None  # executor = dask: seconds the Dask cluster took to start

    @property
    def ok(self) -> bool:
        return self.problem is None and bool(self.samples)

    @property
    def failed(self) -> bool:
        return self.problem is not None and not self.problem.startswith("n/a")

    @property
    def seconds(self) -> float:
        return median([s.wall for s in self.samples])

    @property
    def peak_rss(self) -> float:
        return median([float(s.peak_rss) for s in self.samples])

    @property
    def spread(self) -> float | None:
        walls = [s.wall for s in self.samples]
        return (max(walls) - min(walls)) / median(walls) if len(walls) > 1 else None


# -- machine ----------------------------------------------------------------------------------


def machine_lines(repo: Path) -> list[str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = psutil.virtual_memory().total / 2**30
    versions = [f"{name} {_version(name)}" for name in VERSIONED]
    versions.append(f"tpchgen-cli {datasets.tpchgen_version() or 'not installed'}")
    return [
        f"- machine: {cpu_model()}, {cores} cores ({usable} usable), {ram:.1f} GiB RAM",
        f"- system: {platform.platform()}",
        f"- load average at start: {_load()} (the machine is shared; see the spread column)",
        f"- Python {platform.python_version()}; " + "; ".join(versions),
        f"- minibatch {_version('minibatch')} from {_minibatch_location()}, {_git_state(repo)}",
    ]


def cpu_pressure() -> float | None:
    """Seconds during which some runnable task waited for a CPU, since boot (Linux PSI)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(line.rsplit("total=", 1)[1]) / 1e6


def footer(seconds: float, pressure_at_start: float | None) -> str:
    """The suite's duration and how contended the CPUs were meanwhile."""
    text = f"Whole suite: {seconds:,.0f} s; load average at the end: {_load()}."
    now = cpu_pressure()
    if now is not None and pressure_at_start is not None and seconds > 0:
        share = 100 * (now - pressure_at_start) / seconds
        text += (
            f" CPU pressure during the suite: some task was waiting for a CPU {share:.0f}% of the time "
            "(/proc/pressure/cpu; the suite's own N-way runs cause some, much more means other load)."
        )
    return text + "\n"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _minibatch_location() -> str:
    spec = importlib.util.find_spec("minibatch")
    return str(Path(spec.origin).parent) if spec and spec.origin else "?"


def _git_state(repo: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "no git"
    dirty = git("status", "--porcelain", "--", "minibatch")
    return f"git {commit}" + (" with uncommitted changes in minibatch/" if dirty else "")


# -- the results table ------------------------------------------------------------------------

HEADER = (
    "| workload | engine | seconds | spread | in-process s | rows/s | MB/s | peak RSS MiB "
    "| minibatch-1w ÷ this | minibatch-{n}w ÷ this |\n"
    "| --- | --- |" + " ---: |" * 8
)


def render(
    command: str,
    machine: list[str],
    workloads: list[Workload],
    results: list[Result],
    workers: int,
    runs: int,
) -> str:
    lines = ["# minibatch benchmarks", "", f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}", ""]
    lines += machine
    lines += [
        f"- N = {workers} workers/threads/processes for every parallel engine; median of {runs} run(s); "
        "peak RSS summed over the process tree, sampled every 20 ms",
        "",
        "## Datasets",
        "",
        *dataset_table(workloads),
        "",
        "## Results",
        "",
        HEADER.format(n=workers),
    ]
    for workload in workloads:
        lines += [_row(r, results) for r in results if r.workload is workload]
    lines += ["", "## Notes", ""]
    for workload in workloads:
        lines += notes(workload, [r for r in results if r.workload is workload])
    return "\n".join(lines) + "\n"


def dataset_table(workloads: list[Workload]) -> list[str]:
    lines = [
        "| dataset | files | row groups | rows | decoded MB (Arrow) | Parquet uncompressed MB | on disk MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = set()
    for w in workloads:
        d = w.dataset
        if d is None or d.name in seen:
            continue
        seen.add(d.name)
        lines.append(
            f"| {d.name} | {len(d.files)} | {d.row_groups:,} | {d.rows:,} | {_mb(d.arrow_bytes())} | "
            f"{_mb(d.parquet_bytes())} | {_mb(d.disk_bytes)} |"
        )
    return lines


def _row(result: Result, results: list[Result]) -> str:
    w, e = result.workload, result.engine
    if not result.ok:
        cells = [result.problem or "no run"] + [""] * 7
    else:
        s = result.seconds
        in_proc = median(result.in_process) if result.in_process else None
        cells = [
            f"{s:.3f}",
            f"{100 * result.spread:.0f}%" if result.spread is not None else "",
            f"{in_proc:.3f}" if in_proc is not None else "",
            _si(w.rows / s) if w.rows and _has_input(e) else "",
            _mb(w.input_bytes / s) if w.input_bytes and _has_input(e) else "",
            f"{result.peak_rss / MiB:,.0f}",
            *_ratios(result, results),
        ]
    return f"| {w.name} | {e.label} | " + " | ".join(cells) + " |"


def _has_input(engine: Engine) -> bool:
    return engine.role not in ("reference",)


def _ratios(result: Result, results: list[Result]) -> list[str]:
    if result.engine.role != "baseline":
        return ["", ""]
    cells = []
    for role in ("mb1", "mbN"):
        mine = _find(results, result.workload, role)
        cells.append(f"{mine.seconds / result.seconds:.2f}" if mine and mine.ok else "")
    return cells


def _find(results: list[Result], workload: Workload, role: str = "", key: str = "") -> Result | None:
    for r in results:
        if r.workload is workload and (r.engine.role == role or r.engine.key == key):
            return r
    return None


def _mb(nbytes: float) -> str:
    mb = nbytes / 1e6
    return f"{mb:,.1f}" if mb >= 10 else f"{mb:.3g}"


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


# -- notes ------------------------------------------------------------------------------------


def notes(workload: Workload, results: list[Result]) -> list[str]:
    head = f"- **{workload.name}**: {workload.what}"
    if workload.unavailable:
        return [f"{head}. Not run: {workload.unavailable}."]
    lines = [head + "."]
    d = workload.dataset
    if d is not None:
        cols = ", ".join(workload.columns) if workload.columns else "all columns"
        lines.append(f"  Input: {d.name}, {cols}: {d.rows:,} rows, {_mb(workload.input_bytes)} MB decoded.")
    chunks = {r.engine.label: r.chunks for r in results if r.chunks is not None}
    if chunks:
        lines.append("  minibatch chunks: " + ", ".join(f"{k}: {v:,}" for k, v in chunks.items()) + ".")
    lines += _special_notes(workload, results)
    for r in results:
        if r.strays:
            lines.append(
                f"  {r.engine.label} left a process running after it exited in {r.strays} of its runs "
                "(killed by the harness; see the log)."
            )
        if r.failed:
            lines.append(f"  **{r.engine.label}: {r.problem}** {r.detail}".rstrip())
    return lines


def _special_notes(workload: Workload, results: list[Result]) -> list[str]:
    if workload.dask_cluster:
        return _dask_overhead(workload, results)
    if workload.kind == "identity":
        return _overhead_per_chunk(workload, results)
    if workload.kind == "mem":
        return _memory_ratio(workload, results)
    if workload.kind == "fixed":
        return _fixed_cost(workload, results)
    if workload.kind == "q1":
        ok = [r.engine.label for r in results if r.ok]
        return [
            f"  Checked against DuckDB's own Q1 (same groups, values within 1e-6 relative): {', '.join(ok)}."
        ]
    return []


def _overhead_per_chunk(workload: Workload, results: list[Result]) -> list[str]:
    lines = []
    pairs = (("mbN", "processpool", "ProcessPoolExecutor"), ("mb1", "pyarrow", "the pyarrow loop"))
    for role, key, name in pairs:
        mine, base = _find(results, workload, role=role), _find(results, workload, key=key)
        if mine and base and mine.ok and base.ok:
            chunks = mine.chunks or (workload.dataset.row_groups if workload.dataset else 1)
            ms = 1000 * (mine.seconds - base.seconds) / chunks
            lines.append(
                f"  Engine overhead per chunk, ({mine.engine.label} − {name}) / {chunks:,} chunks: "
                f"{ms:.2f} ms."
            )
    return lines


def _dask_overhead(workload: Workload, results: list[Result]) -> list[str]:
    local, dask = _find(results, workload, role="mbN"), _find(results, workload, key=DASK_EXECUTOR)
    lines = []
    if dask and dask.cluster_start is not None:
        lines.append(
            f"  The Dask LocalCluster was started once, before the runs, in {dask.cluster_start:.2f} s "
            "(not in any row); its processes' RSS counts in the dask row's peak RSS."
        )
    if not (local and dask and local.ok and dask.ok):
        return lines
    chunks = dask.chunks or local.chunks or 1
    in_process = ""
    if local.in_process and dask.in_process:
        in_process = f" (in-process × {median(dask.in_process) / median(local.in_process):.2f})"
    per_chunk = 1000 * (dask.seconds - local.seconds) / chunks
    lines.append(
        f"  **executor = dask ÷ local: time × {dask.seconds / local.seconds:.2f}**{in_process}, "
        f"peak RSS × {dask.peak_rss / local.peak_rss:.2f}; "
        f"(dask − local) / {chunks:,} chunks: {per_chunk:+.2f} ms per chunk. "
        "Same output rows as the local run (sum of the rows' hashes)."
    )
    return lines


def _memory_ratio(workload: Workload, results: list[Result]) -> list[str]:
    free, bounded = _find(results, workload, role="mbN"), _find(results, workload, role="variant")
    if not (free and bounded and free.ok and bounded.ok):
        return []
    limit = (workload.chunk_bytes or 0) * 4 / MiB
    return [
        f"  memory_limit = {limit:,.1f} MiB (chunk_bytes × 2 × 2) versus 16 GiB: "
        f"time × {bounded.seconds / free.seconds:.2f}, peak RSS × {bounded.peak_rss / free.peak_rss:.2f} "
        f"({bounded.peak_rss / MiB:,.0f} versus {free.peak_rss / MiB:,.0f} MiB)."
    ]


def _fixed_cost(workload: Workload, results: list[Result]) -> list[str]:
    mine, imports = _find(results, workload, role="mb1"), _find(results, workload, key="python-imports")
    if not (mine and imports and mine.ok and imports.ok):
        return []
    own = mine.seconds - imports.seconds
    return [f"  {mine.engine.label} run-now beyond starting Python with pyarrow and duckdb: {own:.3f} s."]
