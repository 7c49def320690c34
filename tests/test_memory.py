"""Measured memory: what a run's real process tree holds, against an external sampler, and
what the summary, history and logs say about it (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch.treemem import TreeMemory, tree

from conftest import Project

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc")

DICT_JOB = """
[jobs.ident]
input = "data/*.parquet"
output = "out/ident"
process = "myjobs.basic:same"
chunk_bytes = "200KB"
memory_limit = "{limit}"
"""


def dictionary_heavy(project: Project, files: int = 2, groups: int = 4, rows: int = 10_000) -> None:
    """500-byte strings with 4 distinct values: the footer says ~100 KB a row group, Arrow
    holds ~5 MB."""
    project.data.mkdir(exist_ok=True)
    for f in range(files):
        ids = range(f * groups * rows, (f + 1) * groups * rows)
        strings = pa.array([("x" * 499) + str(i % 4) for i in ids])
        table = pa.table({"id": pa.array(ids, pa.int64()), "s": strings})
        pq.write_table(table, project.data / f"part{f}.parquet", row_group_size=rows)


def anon_pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PssSampler(threading.Thread):
    """The external view: the process tree's summed anonymous PSS (smaps_rollup, which shares
    each copy-on-write page among the processes that map it), every 20 ms."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.samples, self.done = root, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.samples.append(sum(anon_pss(p) for p in tree(self.root)))


def test_the_summary_reports_the_measured_peak_and_warns_over_the_budget(project: Project) -> None:
    (project.root / "myjobs" / "basic.py").write_text(
        (project.root / "myjobs" / "basic.py").read_text() + "\n\ndef same(table, ctx):\n    return table\n"
    )
    dictionary_heavy(project)
    project.write_config(DICT_JOB.format(limit="4MiB"))
    run = project.start("run-now", "ident")
    sampler = PssSampler(run.pid)
    sampler.start()
    out, err = run.communicate(timeout=120)
    sampler.done.set()
    sampler.join()
    assert run.returncode == 0, err
    ((peak, idle, limit),) = project.manifest_rows("SELECT peak_memory, idle_memory, memory_limit FROM runs")
    external = max(sampler.samples)
    print(f"measured {peak >> 20} MiB above {idle >> 20}; external anonymous PSS {external >> 20} MiB")
    assert peak > limit and "OVER the 4.0 MiB budget" in out
    assert 0.8 * external <= idle + peak <= 1.5 * external
    warning = [json.loads(line) for line in err.splitlines() if '"memory_over_budget"' in line]
    assert warning and warning[0]["peak_memory"] == peak
    history = json.loads(project.cli("history", "ident", "--json").stdout)
    assert history[0]["peak_memory"] == peak and history[0]["idle_memory"] == idle


def test_a_lower_budget_splits_done_chunks_and_the_output_keeps_each_row_once(project: Project) -> None:
    """A chunk over half of memory_limit by its size in Arrow is split, so lowering the budget
    re-plans chunks that are already done: their parts must be replaced, not kept beside the
    new ones (each row exactly once)."""
    (project.root / "myjobs" / "basic.py").write_text(
        (project.root / "myjobs" / "basic.py").read_text() + "\n\ndef same(table, ctx):\n    return table\n"
    )
    dictionary_heavy(project, files=1, groups=2, rows=10_000)  # ~5 MB in Arrow a row group
    job = DICT_JOB.replace('"200KB"', '"64MiB"')
    project.write_config(job.format(limit="1GiB"))
    assert project.cli("run-now", "ident", "-q").returncode == 0
    assert project.manifest_rows("SELECT count(*) FROM chunks") == [(1,)]  # ~10 MB in one chunk
    project.write_config(job.format(limit="8MiB"))  # at most 4 MB a chunk
    result = project.cli("run-now", "ident", "-q")
    assert result.returncode == 0, result.stderr
    assert project.manifest_rows("SELECT count(*) FROM chunks")[0][0] >= 3
    assert sorted(project.output_table("ident")["id"].to_pylist()) == list(range(20_000))
    assert len(list(project.out("ident").glob("*.parquet"))) >= 3


def _dictionary_pages(path: Path) -> list[int]:
    """Bytes of each row group's dictionary page in the first column (0 where there is none)."""
    meta = pq.ParquetFile(path).metadata
    pages = []
    for group in range(meta.num_row_groups):
        column = meta.row_group(group).column(0)
        start = column.dictionary_page_offset
        pages.append(column.data_page_offset - start if start is not None else 0)
    return pages


def test_a_tight_budget_writes_parts_with_dictionary_pages_its_workers_can_hold(project: Project) -> None:
    """Dictionary-encoding a column of many distinct values holds ~32 x Arrow's dictionary page
    limit until it falls back to plain pages (measured: +32 MiB at the default 1 MiB, for one
    int64 column of a 1.5 MiB part; +3.7 MiB at 64 KiB). A worker whose share of the budget is
    4 MiB writes with the smaller limit; a roomy budget keeps Arrow's (smaller files)."""
    (project.root / "myjobs" / "basic.py").write_text(
        (project.root / "myjobs" / "basic.py").read_text() + "\n\ndef same(table, ctx):\n    return table\n"
    )
    project.data.mkdir(exist_ok=True)
    ids = [i * 2_654_435_761 % 2**61 for i in range(200_000)]  # distinct, and snappy cannot shrink them
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64())}), project.data / "ids.parquet")
    job = DICT_JOB.replace('chunk_bytes = "200KB"\n', "")
    pages = {}
    for limit in ("1GiB", "8MiB"):  # 2 workers: 512 MiB and 4 MiB each
        project.write_config(job.format(limit=limit))
        result = project.cli("run-now", "ident", "--fresh", "-q")
        assert result.returncode == 0, result.stderr
        assert project.output_table("ident")["id"].to_pylist() == ids
        (part,) = project.out("ident").glob("*.parquet")
        pages[limit] = _dictionary_pages(part)
    assert max(pages["1GiB"]) > 2**19, pages  # Arrow's 1 MiB: 131,072 int64 values before it gives up
    assert 0 < max(pages["8MiB"]) <= 64 * 1024 + 1024, pages


def test_a_worker_reparented_to_the_coordinator_does_not_hide_its_other_children() -> None:
    """Hostile review: a worker whose forkserver died is re-parented to the coordinator where that
    is PID 1 or a subreaper (a container without --init). Its parent was then taken for the
    server of other runs' workers, and every other child left out: the new forkserver, the
    workers started on it. Here the run's worker is this process's child, as such an orphan."""
    code = "import sys; sys.stdin.readline(); held = b'x' * (50 << 20); print('held', flush=True); input()"
    worker, other = (
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    )
    memory = TreeMemory()
    try:
        memory.start(lambda: [worker.pid])
        assert other.stdin is not None and other.stdout is not None
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline() == "held\n"
        assert (memory.sampled_peak() or 0) >= 45 << 20
    finally:
        memory.stop()
        for child in (worker, other):
            child.kill()
            child.wait()
