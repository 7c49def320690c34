"""`minibatch backup` during a live run, and a restore from it: the job resumes and every row
is in the output exactly once."""

from __future__ import annotations

import os
import signal

from conftest import MAP_JOB, Project, wait_for


def test_a_backup_taken_during_a_live_run_restores_to_a_manifest_that_resumes_exactly(
    project: Project,
) -> None:
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.faulty:slow"))
    for i in range(3):
        project.write_input(f"f{i}.parquet", i * 500, 500)
    run = project.start("run-now", "ident", env={"MB_SLEEP": "0.05"})
    manifest = project.root / ".state" / "manifest.duckdb"
    wait_for(lambda: len(project.computations()) >= 6, what="chunks under way")
    (project.root / "backups").mkdir()
    taken = project.cli("backup", str(project.root / "backups"), real=True)
    assert taken.returncode == 0, taken.stderr
    copy = taken.stdout.strip()
    assert copy.startswith(str(project.root / "backups")) and os.path.exists(copy)
    os.killpg(run.pid, signal.SIGKILL)  # the box dies; the manifest with it
    run.wait()
    restored = project.cli("restore", copy)
    assert restored.returncode == 0, restored.stderr
    assert list(manifest.parent.glob("manifest.duckdb.replaced-*"))  # set aside, not deleted
    resumed = project.cli("run-now", "ident")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(1500))
    computed = project.computations()
    assert len(set(computed)) == project.manifest_rows("SELECT count(*) FROM chunks")[0][0]
    # parts published after the backup are adopted (their footers name chunk and definition):
    # only the chunks in flight at the kill are computed again
    assert len(computed) - len(set(computed)) <= 2


def test_backup_never_overwrites(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    target = project.root / "m.duckdb"
    assert project.cli("backup", str(target)).returncode == 0
    again = project.cli("backup", str(target))
    assert again.returncode == 1 and "will not overwrite" in again.stderr
