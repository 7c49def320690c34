"""`minibatch advise`: what it recommends from measurements (made up, then real runs), and that
a run with its advice is measurably better than the run it learned from (issue 13)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch.advise import Machine, Measured, _read_limit, measure, recommend
from minibatch.summary import config_value

from conftest import Project

MiB = 2**20
TWO_CORES = Machine(cores=2, memory=16 * 2**30, limit="RAM")

BASE = Measured(
    run_id="r", runs=1, workers=2, chunk_bytes=64 * MiB, memory_limit=2**30, chunks=40,
    input_bytes=40 * 64 * MiB, chunk_seconds=1.0, fixed_seconds=0.01, busy=0.95, cpu=0.95,
    queued=0.0, tail=0.02, chunk_memory=200 * MiB, memory_per_byte=3.0, peak_memory=400 * MiB,
    idle_memory=300 * MiB,
)  # fmt: skip


def advice(m: Measured, machine: Machine = TWO_CORES) -> dict[str, int]:
    return {a.setting: a.advice for a in recommend(m, machine)}


def test_a_well_set_job_is_told_to_keep_its_settings() -> None:
    assert advice(BASE) == {"workers": 2, "chunk_bytes": 64 * MiB, "memory_limit": 2**30}


def test_cpu_bound_chunks_get_a_worker_per_core_and_waiting_chunks_more() -> None:
    assert advice(replace(BASE, workers=8, cpu=1.0, queued=0.7))["workers"] == 2
    assert advice(replace(BASE, workers=1))["workers"] == 2
    assert advice(replace(BASE, cpu=0.25))["workers"] == 8  # a chunk mostly waits for I/O
    assert advice(replace(BASE, cpu=0.01))["workers"] == 8  # at most 4 a core
    assert advice(replace(BASE, workers=4, chunks=3, cpu=0.1))["workers"] == 3
    assert advice(replace(BASE, cpu=None))["workers"] == 2


def test_no_more_workers_than_the_machines_memory_holds() -> None:
    small = Machine(cores=2, memory=1 * 2**30, limit="cgroup")
    assert advice(replace(BASE, cpu=0.1), small)["workers"] == 2  # (800 MiB - 300 idle) / 250 a chunk


def test_tiny_chunks_grow_until_fixed_costs_are_small_but_each_worker_keeps_chunks() -> None:
    tiny = replace(
        BASE,
        chunk_bytes=4096,
        chunks=4000,
        input_bytes=4000 * 4096,
        chunk_seconds=0.002,
        fixed_seconds=0.0015,
    )
    size = advice(tiny)["chunk_bytes"]
    assert 64 * 4096 <= size <= tiny.input_bytes // 4
    few = replace(tiny, chunks=40, input_bytes=40 * 4096)
    assert advice(few)["chunk_bytes"] == 64 * 1024  # 40 KiB a worker, at least 64 KiB


def test_few_big_chunks_with_a_long_tail_are_made_smaller() -> None:
    straggling = replace(BASE, chunks=3, input_bytes=3 * 64 * MiB, tail=0.4)
    assert advice(straggling)["chunk_bytes"] == 16 * MiB


def test_chunks_do_not_grow_past_what_the_machine_can_hold() -> None:
    tiny = replace(
        BASE, chunk_bytes=MiB, input_bytes=10**6 * MiB, chunks=10**6, fixed_seconds=0.9, chunk_memory=2 * MiB
    )
    small = Machine(cores=2, memory=4 * 2**30, limit="cgroup")
    size = advice(tiny, small)["chunk_bytes"]
    assert 2 * (2 * MiB + 3.0 * (size - MiB)) * 1.25 <= 0.8 * 4 * 2**30 - 300 * MiB


def test_a_budget_too_low_for_the_workers_is_raised_and_one_above_the_machine_lowered() -> None:
    low = advice(replace(BASE, memory_limit=64 * MiB))["memory_limit"]
    assert low == 512 * MiB  # 2 x 200 MiB x 1.25 = 500 MiB, rounded up to 1/8 of 512 MiB
    assert advice(replace(BASE, memory_limit=64 * MiB, chunk_memory=240 * MiB))["memory_limit"] == 640 * MiB
    high = advice(replace(BASE, memory_limit=64 * 2**30))["memory_limit"]
    assert high == 8 * 2**30  # 80 % of 16 GiB less the idle tree, rounded down


def test_a_budget_holds_each_workers_start_up_beside_its_chunk() -> None:
    """A run of one worker (its budget let no more) measured 68 MiB above idle, and advise said
    2 x 68 MiB x 1.25 = 176 MiB for two: with that budget the next run ran two workers and
    measured 210 MiB (a worker keeps its start-up, 68-85 MiB where pyarrow imports pandas, and
    grows ~20 MiB more with each chunk), then the one after learned the start-up and ran one
    worker. The start-up a worker holds, learned as admission learns it, counts beside a chunk."""
    one = replace(BASE, workers=1, configured=2, memory_limit=30 * MiB, chunk_bytes=8 * MiB,
                  chunk_memory=20 * MiB, memory_per_byte=2.5, peak_memory=68 * MiB, busy=0.95)  # fmt: skip
    assert advice(one)["memory_limit"] == 176 * MiB  # 2 x 68 MiB x 1.25 = 170 MiB
    held = advice(replace(one, startup=85 * MiB))["memory_limit"]
    assert held >= 2 * (85 + 2.5 * 8) * MiB * 1.25, held / MiB  # 262.5 MiB
    assert advice(replace(one, startup=85 * MiB, memory_limit=held))["memory_limit"] == held  # keep


def test_cgroup_limits_are_read_as_the_kernel_writes_them(tmp_path: Path) -> None:
    for text, value in (
        ("max\n", None),
        ("200000 100000\n", 2.0),
        ("max 100000\n", None),
        ("1073741824\n", 2**30),
    ):
        (tmp_path / "limit").write_text(text)
        assert _read_limit(tmp_path / "limit") == value
    assert _read_limit(tmp_path / "missing") is None


def test_sizes_are_written_as_config_toml_takes_them() -> None:
    assert config_value("chunk_bytes", 16 * MiB) == '"16MiB"'
    assert config_value("memory_limit", 2**30) == '"1GiB"'
    assert config_value("workers", 3) == "3"


def attempt(slot: int, start: float, end: float, admitted: float, **kw: Any) -> dict[str, Any]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    at = lambda s: t0 + timedelta(seconds=s)  # noqa: E731
    row = dict(
        run_id="r", pid=100 + slot, slot=slot, outcome="done", admitted_at=at(admitted), started_at=at(start),
        ended_at=at(end), read_seconds=0.0, compute_seconds=end - start, write_seconds=0.0, chunk_bytes=MiB,
        peak_rss=None, start_rss=None, cpu_seconds=end - start, queued_seconds=0.0,
    )  # fmt: skip
    return row | kw


def test_measure_splits_a_runs_time_into_fixed_costs_stragglers_and_cpu() -> None:
    run = {"run_id": "r", "workers": 2, "memory_limit": 2**30, "settings": '{"chunk_bytes": 1048576}',
           "peak_memory": None, "idle_memory": None}  # fmt: skip
    attempts = [
        attempt(0, 0.0, 1.0, 0.0),
        attempt(0, 1.2, 2.0, 0.5, compute_seconds=0.6, cpu_seconds=0.3, queued_seconds=0.2),  # 0.2 s to send
        attempt(1, 0.0, 4.0, 0.0),  # the straggler: slot 0 waits 2 s of the 4
    ]
    m = measure(run, [attempts])
    assert m.chunks == 3 and m.input_bytes == 3 * MiB and m.busy == pytest.approx(5.8 / 8)
    assert m.tail == pytest.approx(2.0 / 8)
    assert m.fixed_seconds == pytest.approx(0.0)  # the median: 0, 0.2 + 0.2, 0
    assert m.cpu == pytest.approx(5.3 / (5.6 - 0.2)) and m.queued == pytest.approx(0.2 / 5.6)


# Real runs: the job as configured, then advise, then the job with the advice.

JOB = """
[jobs.a]
input = "data/*.parquet"
output = "out/a"
process = "myjobs.basic:{process}"
workers = {workers}
chunk_bytes = "{chunk_bytes}"
memory_limit = "{memory_limit}"
"""

EXTRA = """

def spin(table, ctx):
    end = time.process_time() + 0.15  # 150 ms of CPU, however long it takes to get it
    while time.process_time() < end:
        pass
    return table

def hold(table, ctx):
    block = bytearray(24 << 20)  # 24 MiB touched, then a wait as for a remote service
    time.sleep(0.3)
    return table if block else None  # (no pyarrow.compute: with pandas installed, its first
    # call imports pandas, ~0.5 s of each worker's first chunk, which is not what this measures)
"""


def configure(project: Project, **settings: Any) -> None:
    project.write_config(JOB.format(**settings))


def run(project: Project, fresh: bool = True) -> dict[str, Any]:
    result = project.cli("run-now", "a", "-q", *(["--fresh"] if fresh else []))
    assert result.returncode == 0, result.stderr
    return json.loads(project.cli("history", "a", "--json", "--limit", "1").stdout)[0]


def span(project: Project, run: dict[str, Any]) -> float:
    """Seconds from the run's first chunk sent to its last done: what the settings change
    (a loaded machine makes starting the workers slow, whatever their number)."""
    sql = f"SELECT epoch(max(ended_at) - min(admitted_at)) FROM attempts WHERE run_id = '{run['run_id']}'"
    return float(project.manifest_rows(sql)[0][0])


def advised(project: Project) -> dict[str, int]:
    result = project.cli("advise", "a", "--json")
    assert result.returncode == 0, result.stderr
    return {a["setting"]: a["advice"] for a in json.loads(result.stdout)["advice"]}


@pytest.fixture
def jobs(project: Project) -> Project:
    basic = project.root / "myjobs" / "basic.py"
    basic.write_text(basic.read_text() + EXTRA)
    return project


def test_advice_on_too_small_chunks_makes_the_run_faster(jobs: Project) -> None:
    jobs.write_input("a.parquet", 0, 60_000, row_group=100)  # 600 row groups of ~2.6 KB
    settings = dict(process="ident", workers=2, chunk_bytes="4KB", memory_limit="1GiB")
    configure(jobs, **settings)
    before = run(jobs)
    better = advised(jobs)
    assert better["chunk_bytes"] >= 16 * 4000, better
    configure(jobs, **settings | {"chunk_bytes": str(better["chunk_bytes"])})
    after = run(jobs)
    assert after["chunks_total"] <= before["chunks_total"] // 16
    assert jobs.output_table("a").num_rows == 60_000
    # On a machine shared with other tests a burst of load can land on either run: compare the
    # best of up to 3 alternating pairs.
    seconds = {"before": [before["seconds"]], "after": [after["seconds"]]}
    for _ in range(2):
        if min(seconds["after"]) < 0.6 * min(seconds["before"]):
            break
        for name, chunk_bytes in (("before", "4KB"), ("after", str(better["chunk_bytes"]))):
            configure(jobs, **settings | {"chunk_bytes": chunk_bytes})
            seconds[name].append(run(jobs)["seconds"])
    assert min(seconds["after"]) < 0.6 * min(seconds["before"]), seconds


def test_advice_on_too_many_workers_holds_less_memory_for_the_same_work(jobs: Project) -> None:
    jobs.write_input("a.parquet", 0, 800, row_group=100)  # 8 chunks
    settings = dict(process="spin", workers=6, chunk_bytes="4KB", memory_limit="1GiB")
    configure(jobs, **settings)
    before = run(jobs)
    better = advised(jobs)
    assert better["workers"] == 2, better  # this machine's 2 cores (CI has 2)
    configure(jobs, **settings | {"workers": better["workers"]})
    after = run(jobs)
    assert before["idle_memory"] - after["idle_memory"] > 4 * 10 * MiB  # 4 fewer idle workers
    # No slower: on a machine shared with other tests, 6 workers take a bigger share of the
    # cores than 2, so compare the best of up to 3 alternating pairs of runs.
    spans = {"before": [span(jobs, before)], "after": [span(jobs, after)]}
    for _ in range(2):
        if min(spans["after"]) < 1.3 * min(spans["before"]) + 0.5:
            break
        for name, workers in (("before", 6), ("after", better["workers"])):
            configure(jobs, **settings | {"workers": workers})
            spans[name].append(span(jobs, run(jobs)))
    assert min(spans["after"]) < 1.3 * min(spans["before"]) + 0.5, spans


def test_advice_on_a_budget_too_low_lets_chunks_run_side_by_side(jobs: Project) -> None:
    jobs.write_input("a.parquet", 0, 600, row_group=100)  # 6 chunks, each holding 24 MiB for 0.3 s
    settings = dict(process="hold", workers=2, chunk_bytes="4KB", memory_limit="1MiB")
    configure(jobs, **settings)
    before = run(jobs)
    better = advised(jobs)
    assert better["memory_limit"] >= better["workers"] * 24 * MiB, better
    assert better["workers"] >= 2
    configure(jobs, **settings | {"workers": better["workers"], "memory_limit": str(better["memory_limit"])})
    after = run(jobs)
    assert before["utilisation"] * before["workers"] < 1.6 < 2 < after["utilisation"] * after["workers"]
    assert span(jobs, after) < 0.75 * span(jobs, before), (span(jobs, before), span(jobs, after))


def test_the_workers_advised_from_are_the_configured_not_the_started(jobs: Project) -> None:
    """A run whose budget lets one chunk run at a time starts one worker of its two: advise said
    "workers 1 -> 2", the setting it already had (a review's finding)."""
    jobs.data.mkdir(exist_ok=True)
    ids = pa.array(range(3 * 160_000), pa.int64())  # 3 row groups of 1.2 MiB: big enough to learn from
    pq.write_table(pa.table({"id": ids}), jobs.data / "a.parquet", row_group_size=160_000)
    configure(jobs, process="hold", workers=2, chunk_bytes="2MB", memory_limit="32MiB")
    run(jobs)  # learns that a chunk holds 24 MiB
    assert run(jobs)["workers"] == 1
    current = json.loads(jobs.cli("advise", "a", "--json").stdout)["advice"][0]
    assert current["setting"] == "workers" and current["current"] == 2


def test_a_start_up_counts_only_beside_what_later_chunks_grew(jobs: Project) -> None:
    """A review: where each worker ran one chunk, the start-up learned is that chunk's whole
    growth, and advise counted the chunk again beside it (a run that peaked at 107 MiB was told
    320 MiB for the same two workers)."""
    jobs.data.mkdir(exist_ok=True)
    ids = pa.array(range(2 * 160_000), pa.int64())  # 2 row groups of 1.2 MiB: one chunk a worker
    pq.write_table(pa.table({"id": ids}), jobs.data / "a.parquet", row_group_size=160_000)
    configure(jobs, process="hold", workers=2, chunk_bytes="2MB", memory_limit="1GiB")
    assert run(jobs)["workers"] == 2
    result = jobs.cli("advise", "a", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["measured"]["startup"] == 0


def test_the_cli_prints_reasons_and_config_lines_and_refuses_without_history(jobs: Project) -> None:
    jobs.write_input("a.parquet", 0, 1_000, row_group=100)
    configure(jobs, process="ident", workers=2, chunk_bytes="64MiB", memory_limit="1KiB")
    first = jobs.cli("advise", "a")
    assert first.returncode == 2 and "no run of a has finished a chunk yet" in first.stderr
    run(jobs)
    text = jobs.cli("advise", "a").stdout
    assert "memory_limit" in text and "in config.toml, [jobs.a]:" in text and "measured:" in text
    assert jobs.cli("advise", "nope").returncode == 2
