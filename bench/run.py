"""Run every workload with every engine side by side; print and write a markdown table.

    python -m bench.run [--quick] [--sf 1 --sf 10] [--runs 3] [--workers 2] [--out bench/results.md]
                        [--only WORKLOAD] [--engine ENGINE]

See bench/README.md for what each workload measures and what the columns mean.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

from bench import checks, measure, minibatch_cli, runners, workloads
from bench.dask_cluster import Cluster, ClusterError, local_cluster
from bench.report import Result, cpu_pressure, footer, machine_lines, render
from bench.runners import REPO, Prepared
from bench.workloads import DASK_EXECUTOR, Calibration, Settings, Workload

WARM_BLOCK = 8 * 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="~100 MB wide table, 400 tiny row groups, SF 0.1"
    )
    parser.add_argument("--sf", type=float, action="append", help="TPC-H scale factor; repeatable [1]")
    parser.add_argument("--runs", type=int, default=3, help="runs per engine; the median is reported [3]")
    parser.add_argument("--workers", type=int, default=2, help="N: workers/threads/processes [2]")
    parser.add_argument("--out", default="bench/results.md", help="markdown file to write [bench/results.md]")
    parser.add_argument("--data", default="bench/.data", help="dataset cache and scratch dir [bench/.data]")
    parser.add_argument("--only", action="append", default=[], help="run workloads with this name prefix")
    parser.add_argument(
        "--engine", action="append", default=[], help="engines whose label starts so: duckdb, minibatch-2w"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.workers < 1:
        parser.error("--runs and --workers must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    scale_factors = tuple(args.sf) if args.sf else ((0.1,) if args.quick else (1.0,))
    return Settings(
        workers=args.workers,
        runs=args.runs,
        quick=args.quick,
        scale_factors=scale_factors,
        data_dir=Path(args.data).resolve(),
        timeout=args.timeout,
        only=tuple(args.only),
        engines=tuple(args.engine),
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    settings = settings_from(args)
    started, pressure = time.monotonic(), cpu_pressure()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_lines(REPO)
    log("\n".join(machine))
    calibration = _calibrate(settings)
    planned = workloads.build(settings, calibration)
    results: list[Result] = []
    for workload in planned:
        results += run_workload(workload, settings, calibration)
    command = "python -m bench.run " + " ".join(raw)
    markdown = render(command.strip(), machine, planned, results, settings.workers, settings.runs)
    markdown += "\n" + footer(time.monotonic() - started, pressure)
    print(markdown)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown)
    return _exit_status(results)


def _calibrate(settings: Settings) -> Calibration | None:
    if not workloads.needs_calibration(settings):
        return None
    calibration = workloads.calibrate_udf(settings)
    log(f"udf_heavy: {calibration.rows:,} strings per row group ≈ {calibration.ms:.1f} ms on this machine")
    return calibration


def _exit_status(results: list[Result]) -> int:
    failed = [r for r in results if r.failed]
    for r in failed:
        log(f"FAILED: {r.workload.name} / {r.engine.label}: {r.problem} {r.detail}")
    return 1 if failed else 0


# -- one workload -----------------------------------------------------------------------------


def run_workload(workload: Workload, settings: Settings, calibration: Calibration | None) -> list[Result]:
    log(f"== {workload.name}")
    results = [Result(workload, engine) for engine in workload.engines]
    if workload.unavailable or workload.dataset is None:
        for r in results:
            r.problem = f"n/a ({workload.unavailable or 'no data'})"
        return results
    scratch = settings.data_dir / "work" / workload.name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    udf_rows = calibration.rows if calibration else 0
    try:
        with contextlib.ExitStack() as stack:
            cluster = _start_cluster(workload, settings, scratch, results, stack)
            prepared = {}
            for r in results:
                if settings.engines and not r.engine.label.startswith(settings.engines):
                    r.problem = "n/a (not chosen by --engine)"
                r.problem = r.problem or runners.unavailable(r.engine)
                if r.problem is None:
                    prepared[r.engine.key] = runners.prepare(
                        r.engine, workload, settings, scratch / r.engine.key, udf_rows, cluster
                    )
            run_engines(workload, results, prepared, settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def run_engines(
    workload: Workload, results: list[Result], prepared: dict[str, Prepared], settings: Settings
) -> None:
    """Every prepared engine `settings.runs` times, taking turns."""
    assert workload.dataset is not None
    expected = checks.expected_for(workload.kind, workload.dataset.files, workload.dataset.row_groups)
    warm_page_cache(workload.dataset.files)
    checksums: dict[str, tuple[int, str]] = {}
    for run in range(settings.runs):
        for r in results:
            if r.problem is None:
                run_once(r, prepared[r.engine.key], expected, settings, checksums)
                _progress(r, run, settings.runs)


def _start_cluster(
    workload: Workload, settings: Settings, scratch: Path, results: list[Result], stack: contextlib.ExitStack
) -> Cluster | None:
    """The dask_executor workloads' LocalCluster, up until `stack` closes; None if not needed or failed."""
    if not workload.dask_cluster:
        return None
    on_cluster = [r for r in results if r.engine.key == DASK_EXECUTOR]
    log_path = scratch / "dask-cluster.log"
    try:
        cluster = stack.enter_context(local_cluster(settings.workers, log_path, runners.child_env()))
    except ClusterError as exc:
        for r in on_cluster:
            r.problem, r.detail = "FAILED (no cluster)", str(exc)
        return None
    log(f"   Dask LocalCluster {settings.workers}x1 at {cluster.address}, up in {cluster.seconds:.2f} s")
    for r in on_cluster:
        r.cluster_start = cluster.seconds
    return cluster


def warm_page_cache(files: tuple[str, ...]) -> None:
    """Read the inputs once so that no engine pays for the first read from disk."""
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(WARM_BLOCK):
                pass


def run_once(
    result: Result,
    prepared: Prepared,
    expected: checks.Expected,
    settings: Settings,
    checksums: dict[str, tuple[int, str]],
) -> None:
    if prepared.clear_before and prepared.out_dir is not None:
        shutil.rmtree(prepared.out_dir, ignore_errors=True)
    sample = measure.run(prepared.cmd, prepared.cwd, prepared.env, settings.timeout, prepared.also_sampled)
    if not sample.ok:
        result.problem = f"FAILED (exit {sample.returncode})"
        result.detail = _tail(sample.stderr or sample.stdout)
        return
    for stray in sample.strays:
        log(
            f"   note: {result.engine.label} left a process running {measure.STRAY_GRACE:g} s after it "
            f"exited; killed it: {stray}"
        )
    result.strays += len(sample.strays)
    problem = _check(result, prepared, expected, checksums)
    if problem:
        result.problem, result.detail = "WRONG RESULT", problem
        return
    result.samples.append(sample)
    seconds = runners.in_process_seconds(result.engine, sample.stdout)
    if seconds is not None:
        result.in_process.append(seconds)
    if result.engine.is_minibatch_run:
        result.chunks = minibatch_cli.parse_summary(sample.stdout).chunks


def _check(
    result: Result, prepared: Prepared, expected: checks.Expected, checksums: dict[str, tuple[int, str]]
) -> str | None:
    """The output against the expected answer, and against the other engines' where comparable."""
    out = prepared.out_dir
    if out is None:
        return None
    label = result.engine.label
    problem = checks.check(expected, out)
    if problem is None and expected.kind == "udf":
        hashes = checks.udf_checksum(out)
        problem = _agrees(checksums, "sum of per-chunk hashes", hashes, label, " (different chunking?)")
    if problem is None and result.workload.dask_cluster:  # the same job: the very same rows
        problem = _agrees(checksums, "sum of the output rows' hashes", checks.rows_fingerprint(out), label)
    return problem


def _agrees(
    seen: dict[str, tuple[int, str]], what: str, value: int, label: str, hint: str = ""
) -> str | None:
    """None if `value` is what the first engine to report `what` got, else what differs."""
    first, by = seen.setdefault(what, (value, label))
    return None if value == first else f"{what} {value}, {by} got {first}{hint}"


def _tail(text: str, lines: int = 12) -> str:
    return "\n```\n" + "\n".join(text.strip().splitlines()[-lines:]) + "\n```"


def _progress(result: Result, run: int, runs: int) -> None:
    label = f"   {result.engine.label:<38} run {run + 1}/{runs}: "
    if result.problem:
        log(label + result.problem + result.detail)
    elif result.samples:
        last = result.samples[-1]
        log(label + f"{last.wall:8.3f} s, peak RSS {last.peak_rss / 2**20:,.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
