"""Property: a run killed at any step and started again yields the same output as a clean run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Project, install_jobs

JOB = """
[jobs.f]
input = "data/*.parquet"
output = "out/f"
process = "myjobs.faulty:crash_at"
chunk_bytes = "5KB"
"""
FILES, ROWS = 3, 600  # 6 row groups per file -> 18 chunks


def make_project(root: Path) -> Project:
    install_jobs(root)
    project = Project(root=root, count_file=root / "count.txt")
    project.write_config(JOB)
    for i in range(FILES):
        project.write_input(f"f{i}.parquet", i * ROWS, ROWS)
    return project


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(crash_at=st.integers(min_value=1, max_value=FILES * ROWS // 100), workers=st.sampled_from([1, 2]))
def test_crash_at_any_step_then_resume_gives_the_clean_output(crash_at: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "proj")
        env = {"MB_CRASH_AT": str(crash_at)}
        crashed = project.cli("run-now", "f", "--workers", str(workers), env=env, start_new_session=True)
        assert crashed.returncode == -9  # SIGKILL, from inside the run
        resumed = project.cli("run-now", "f", "--workers", str(workers))
        assert resumed.returncode == 0, resumed.stderr
        rows = project.output_table("f").sort_by("id").to_pylist()
        expected = [
            {"id": i, "value": i % 97, "name": f"row-{i}", "doubled": (i % 97) * 2}
            for i in range(FILES * ROWS)
        ]
        assert rows == expected
        computed = project.computations()
        assert len(computed) - len(set(computed)) <= workers
