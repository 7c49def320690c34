"""SIGKILL of the whole process group at random instants of a 200-chunk run (start-up and
planning included), then resume: each input row exactly once, no partial file visible, nothing
left staged, few chunks computed twice. The suite's one real multi-kill test."""

from __future__ import annotations

import os
import random
import signal
import time

import duckdb

from conftest import Project, wait_for

JOB = """
[jobs.ident]
input = "data/*.parquet"
output = "out/ident"
process = "myjobs.basic:ident"
chunk_bytes = "5KB"
"""


def test_sigkill_at_random_instants_of_a_200_chunk_run(project: Project) -> None:
    project.write_config(JOB)
    for i in range(10):
        project.write_input(f"part{i:02d}.parquet", i * 2000, 2000)  # 20 row groups each
    env = {"MB_SLEEP": "0.01"}
    rng = random.Random(20261128)
    kills = 0
    for _ in range(6):
        process = project.start("run-now", "ident", env=env)
        if rng.random() < 0.3:  # anywhere, start-up and planning included
            time.sleep(rng.uniform(0.0, 0.8))
        else:  # mid-run, after some more chunks
            target = len(project.computations()) + rng.randrange(1, 25)
            wait_for(lambda t=target, p=process: len(project.computations()) >= t or p.poll() is not None)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        assert not _visible_partials(project)
    result = project.cli("run-now", "ident")  # the resume need not be slow
    assert result.returncode == 0, result.stderr
    ids = sorted(project.output_table("ident").column("id").to_pylist())
    assert ids == list(range(20000))
    glob = str(project.out("ident") / "**" / "*.parquet")
    query = f"SELECT count(*), count(DISTINCT id) FROM read_parquet('{glob}')"
    assert duckdb.sql(query).fetchall() == [(20000, 20000)]
    computed = project.computations()
    chunks = len(set(computed))
    assert chunks == 200
    redone = len(computed) - chunks
    # at most the chunks in flight at each kill (2 workers) are computed again
    assert redone <= kills * 2, f"{redone} recomputations over {kills} kills"
    assert "200 planned" in result.stdout
    left = project.out("ident").parent.glob(".ident.minibatch-staging/*")
    assert [p.name for p in left] == ["minibatch-owner"]  # nothing left staged


def _visible_partials(project: Project) -> list[str]:
    out = project.out("ident")
    if not out.exists():
        return []
    return [p.name for p in out.iterdir() if not (p.name.startswith("part-") and p.suffix == ".parquet")]
