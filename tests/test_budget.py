"""The memory budget on three data shapes (issue 13): what a real run's process tree holds
above idle (the summed anonymous PSS of the coordinator, the forkserver and the workers,
sampled from outside every 20 ms), against `memory_limit`.

Idle is the peak of the same tree on a tiny input (one 100-row file: one worker started, and
ran a chunk), measured once for the three shapes. A second worker, and its start-up on its
first chunk, count as above idle, as they do in the run's own measure. The issue asks for at
most 1.25 x the budget, 1.5 x at the very worst: the tests hold every shape to 1.5 x on a
job's first run, and the wide shape on a later one, with what its first run learned."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_memory import PssSampler

from conftest import Project, install_jobs

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc")

MiB = 2**20
SAME = "\n\ndef same(table, ctx):\n    return table\n"
JOB = """
[jobs.job]
input = "data/*.parquet"
output = "out/job"
process = "myjobs.basic:same"
{settings}
"""


def random_int64(rows: int) -> pa.Array:
    return pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(os.urandom(8 * rows))])


def wide(data: Path) -> int:
    """64 incompressible int64 columns, 4 MiB row groups (8,192 rows), 2 files of 3 groups."""
    rows = 3 * 8192
    for f in range(2):
        table = pa.table({f"c{j}": random_int64(rows) for j in range(64)})
        pq.write_table(table, data / f"wide{f}.parquet", row_group_size=8192)
    return 2 * rows


def dictionary(data: Path) -> int:
    """500-byte strings with 4 distinct values, dictionary-encoded: the footer says ~100 KB a
    10,000-row group, Arrow holds ~5 MiB; 2 files of 60,000 rows (59 MiB in Arrow)."""
    rows = 60_000
    values = pa.array([("x" * 499) + str(i) for i in range(4)])
    for f in range(2):
        ids = pa.array(range(f * rows, (f + 1) * rows), pa.int64())
        strings = pa.DictionaryArray.from_arrays(pa.array([i % 4 for i in range(rows)], pa.int32()), values)
        table = pa.table({"id": ids, "s": strings.cast(pa.string())})
        pq.write_table(table, data / f"part{f}.parquet", row_group_size=10_000)
    return 2 * rows


def huge_group(data: Path) -> int:
    """One row group of 400,000 rows (15 MiB in Arrow), sliced into 2 MiB chunks."""
    rows = 400_000
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "v": random_int64(rows),
            "name": pa.array([f"name-{i:014d}" for i in range(rows)]),
        }
    )
    pq.write_table(table, data / "huge.parquet", row_group_size=rows)
    return rows


def tiny(data: Path) -> int:
    pq.write_table(pa.table({"id": pa.array(range(100), pa.int64())}), data / "tiny.parquet")
    return 100


def measure(
    project: Project, settings: str, make_data, before: int = 0, function: str = "same"
) -> tuple[int, int, tuple]:
    """Run the job as a real process under the external sampler, after `before` runs of it
    unmeasured: (its peak anonymous PSS, rows in the output, the run's own peak_memory,
    idle_memory, memory_limit, workers)."""
    basic = project.root / "myjobs" / "basic.py"
    if "def same(" not in basic.read_text():
        basic.write_text(basic.read_text() + SAME)
    project.data.mkdir(exist_ok=True)
    rows = make_data(project.data)
    project.write_config(JOB.format(settings=settings).replace("basic:same", f"basic:{function}"))
    for _ in range(before):  # what the job learns from its attempts
        assert project.cli("run-now", "job", "--fresh", real=True).returncode == 0
    run = project.start("run-now", "job", "--fresh")
    sampler = PssSampler(run.pid)
    sampler.start()
    try:
        _, err = run.communicate(timeout=120)
    finally:
        sampler.done.set()
        sampler.join()
    assert run.returncode == 0, err
    assert project.output_table("job").num_rows == rows
    last = "SELECT peak_memory, idle_memory, memory_limit, workers FROM runs ORDER BY seq DESC LIMIT 1"
    (measured,) = project.manifest_rows(last)
    return max(sampler.samples), rows, measured


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> int:
    """The tree's peak on a tiny input, once for all shapes."""
    root = tmp_path_factory.mktemp("idle") / "proj"
    install_jobs(root)
    project = Project(root=root, count_file=root.parent / "count.txt")
    try:
        peak, _, _ = measure(project, 'memory_limit = "24MiB"', tiny)
    finally:
        project.stop_started()
    return peak


# (settings, data). Measured (2026-12-02, session 26, 3 runs each, tree above idle / budget):
# wide 0.74-1.18, dictionary 0.51-0.61, huge group 0.58-0.66 under 16 MiB; beside two busy loops
# 0.60-1.22, 0.50-0.84 and 0.70-1.17 (6 runs). The huge group's budget is 16 MiB: under CPU contention the
# coordinator's DuckDB commits grow it 5-18 MiB, the whole of an 8 MiB budget (0.95-2.2 x). Under
# 16 MiB a first run started a second worker at once, its start-up unknown: 0.94-1.6 x (CI: 1.59),
# until a first run learned it from its first chunk (MemoryModel). On one worker (configured):
# 1.76-1.78 x while its freed pages waited (a share of 8 chunks), 0.74-0.96 x since (frees_at_once).
# Before the parts' dictionary limit, the write's share of first-run estimates and starting
# workers as work arrives: 1.34-1.55, 0.42-0.87 and 1.9-3.6 (with mimalloc, Arrow's default:
# 2.1-3.0, 1.8-2.4 and 11-15).
SHAPES = [
    pytest.param('chunk_bytes = "8MiB"\nmemory_limit = "24MiB"', wide, id="wide"),
    pytest.param('memory_limit = "24MiB"', dictionary, id="dictionary"),
    pytest.param('chunk_bytes = "2MiB"\nmemory_limit = "16MiB"', huge_group, id="huge-group"),
    pytest.param('chunk_bytes = "2MiB"\nmemory_limit = "16MiB"\nworkers = 1', huge_group, id="huge-group-1w"),
]
WIDE = SHAPES[0].values[0]


@pytest.mark.parametrize(("settings", "make_data"), SHAPES)
def test_the_tree_stays_near_the_budget_above_idle(
    project: Project, idle: int, settings: str, make_data
) -> None:
    peak, _, (ours, ours_idle, limit, _) = measure(project, settings, make_data)
    above = peak - idle
    print(
        f"external {peak / MiB:.1f} MiB, {above / MiB:.1f} above an idle {idle / MiB:.1f} = "
        f"{above / limit:.2f} x the budget; measured by the run {ours / MiB:.1f} above {ours_idle / MiB:.1f}"
    )
    assert above <= 1.5 * limit  # the bound at the very worst (its target: 1.25)


def test_a_later_run_counts_a_second_workers_start_up(project: Project, idle: int) -> None:
    """A later run of the wide job, with the factor its first run learned (~2.4 per byte), found
    two chunks within 24 MiB and started a second worker, whose start-up (~10 MiB on its first
    chunk) no estimate counted: 1.3-1.7 x the budget. Admission now reserves a start-up learned
    from workers' first attempts when a chunk would start a worker."""
    peak, _, (ours, ours_idle, limit, workers) = measure(project, WIDE, wide, before=1)
    above = peak - idle
    print(f"later run: {above / MiB:.1f} above idle = {above / limit:.2f} x the budget, {workers} worker(s)")
    assert above <= 1.5 * limit
    assert workers == 1  # two chunks and a second worker's start-up do not fit (without it: 1.4-1.7 x)


KEEPS = """

_KEPT = []


def keep(table, ctx):
    if not _KEPT:  # what a worker takes on for good with its first chunk (a model, a cache)
        _KEPT.append(bytearray(b"\\x01") * (70 * 2**20))
    return table
"""


def few_files(data: Path) -> int:
    for f in range(6):
        pq.write_table(
            pa.table({"id": pa.array(range(f * 100, (f + 1) * 100), pa.int64())}), data / f"f{f}.parquet"
        )
    return 600


def test_each_started_worker_keeps_its_start_up_reserved(project: Project, idle: int) -> None:
    """A job whose workers each keep 70 MiB after their first chunk, under a 100 MiB budget: a
    later run reserved the learned start-up only while a new worker ran its first chunk, and
    the first worker's never, so it started a second worker and the tree held ~1.4 x the budget
    (a review's 150 MiB under 250 MiB: 1.3-1.4 x). A worker's start-up is held for the run."""
    basic = project.root / "myjobs" / "basic.py"
    basic.write_text(basic.read_text() + KEEPS)
    settings = 'memory_limit = "100MiB"\nchunk_bytes = "1KiB"'
    peak, _, (_, _, limit, workers) = measure(project, settings, few_files, before=1, function="keep")
    above = peak - idle
    print(
        f"kept start-up: {above / MiB:.1f} above idle = {above / limit:.2f} x the budget, {workers} worker(s)"
    )
    assert workers == 1
    assert above <= 1.25 * limit


def test_library_pages_a_first_chunk_maps_are_no_start_up(project: Project) -> None:
    """A review: a SQL job's workers map DuckDB's library on their first chunk, 53 MiB of RSS
    that is file-backed and shared; learned as a start-up and held for each worker, it left
    later runs of a 38 KiB-chunk job under 64 MiB on one worker (peak 8-14 MiB). The learned
    start-up is capped by what recent runs' trees measured above idle per worker."""
    project.data.mkdir(exist_ok=True)
    for f in range(8):
        ids = pa.array(range(f * 2000, (f + 1) * 2000), pa.int64())
        pq.write_table(
            pa.table({"id": ids, "s": pa.array([f"v{i}" for i in range(2000)])}),
            project.data / f"f{f}.parquet",
        )
    project.write_config(
        '[jobs.job]\ninput = "data/*.parquet"\noutput = "out/job"\nsql = "SELECT id, s FROM chunk"\n'
        'memory_limit = "64MiB"\nworkers = 2\n'
    )
    for _ in range(3):
        assert project.cli("run-now", "job", "--fresh", real=True).returncode == 0
    assert project.output_table("job").num_rows == 16_000
    ((workers, reserved),) = project.manifest_rows(
        "SELECT workers, peak_in_flight FROM runs ORDER BY seq DESC LIMIT 1"
    )
    print(f"later run: {workers} workers, {reserved / MiB:.1f} MiB reserved at most")
    assert workers == 2


POOL_NAME = """

def pool_name(table, ctx):
    import os

    conf = os.environ.get("JE_ARROW_MALLOC_CONF", "")
    return pa.table({"pool": [f"{pa.default_memory_pool().backend_name} {conf}".strip()] * len(table)})
"""


def test_workers_allocate_with_jemalloc_unless_the_user_chose(project: Project) -> None:
    """Measured above: jemalloc keeps the tree near the budget where mimalloc (Arrow's default)
    holds freed pages; under a tight budget it hands them back at once in every arena. A pool
    the user names in the environment wins."""
    basic = project.root / "myjobs" / "basic.py"
    basic.write_text(basic.read_text() + POOL_NAME)
    project.data.mkdir(exist_ok=True)
    tiny(project.data)
    at_once = "jemalloc dirty_decay_ms:0,muzzy_decay_ms:0"
    for settings, env, expected in [
        ("", {}, "jemalloc"),  # 1 GiB for one worker of 64 MiB chunks: room to spare
        ('memory_limit = "64MiB"', {}, at_once),
        ("", {"ARROW_DEFAULT_MEMORY_POOL": "system"}, "system"),
    ]:
        project.write_config(JOB.format(settings=settings).replace("basic:same", "basic:pool_name"))
        run = project.cli("run-now", "job", "--fresh", real=True, env=env)
        assert run.returncode == 0, run.stderr
        assert set(project.output_table("job").column("pool").to_pylist()) == {expected}, settings
