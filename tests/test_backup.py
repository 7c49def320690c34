"""`minibatch backup` during a live run, and a restore from it: the job resumes and every row
is in the output exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal

import duckdb

from minibatch.config import load_config
from minibatch.lock import job_lock

from conftest import MAP_JOB, Project, in_process, wait_for


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


def test_after_a_restore_results_of_another_definition_are_computed_again(project: Project) -> None:
    """Hostile review: backup under definition A, a run under B, restore, back to A: the
    manifest said A's chunks were done and B's parts on disk had the sizes it recorded, so
    half the output was B's, exit 0. Parts are footer-checked once after a restore."""
    job = MAP_JOB.replace('process = "myjobs.basic:ident"', 'sql = "SELECT id, value FROM chunk"')
    for i in range(2):
        project.write_input(f"f{i}.parquet", i * 400, 400)
    project.write_config(job)
    assert project.cli("run-now", "ident", "-q").returncode == 0
    (project.root / "backups").mkdir()
    copy = project.cli("backup", str(project.root / "backups")).stdout.strip()
    project.write_config(job.replace("SELECT id, value", "SELECT id, value + 1000 AS value"))
    assert project.cli("run-now", "ident", "-q").returncode == 0
    assert project.cli("restore", copy).returncode == 0
    project.write_config(job)
    result = project.cli("run-now", "ident", "-q")
    assert result.returncode == 0, result.stderr
    table = project.output_table("ident")
    assert sorted(zip(table["id"].to_pylist(), table["value"].to_pylist(), strict=True)) == [
        (i, i % 97) for i in range(800)
    ]
    again = project.cli("run-now", "ident", "--json")  # verified once: reused as any done chunk
    assert json.loads(again.stdout)["chunks_reused"] == 16, again.stdout


def test_after_a_restore_a_reduction_of_another_definition_is_published_again(project: Project) -> None:
    """Review of the fix above: the parts were the backup's, so they passed their footer check,
    and the reduction recorded matched: the result of the reduce_sql used after the backup
    stayed published, exit 0."""
    job = MAP_JOB.replace('process = "myjobs.basic:ident"', 'sql = "FROM chunk"\nreduce_sql = "{}"')
    project.write_input("f.parquet", 0, 400)
    project.write_config(job.format("SELECT (sum(value) + 0)::BIGINT AS s FROM parts"))
    assert project.cli("run-now", "ident", "-q").returncode == 0
    (project.root / "backups").mkdir()
    copy = project.cli("backup", str(project.root / "backups")).stdout.strip()
    project.write_config(job.format("SELECT (sum(value) + 1000)::BIGINT AS s FROM parts"))
    assert project.cli("run-now", "ident", "-q").returncode == 0
    assert project.cli("restore", copy).returncode == 0
    project.write_config(job.format("SELECT (sum(value) + 0)::BIGINT AS s FROM parts"))
    assert project.cli("run-now", "ident", "-q").returncode == 0
    assert project.output_table("ident")["s"].to_pylist() == [sum(i % 97 for i in range(400))]


def test_a_state_dir_lost_with_its_manifest_gets_its_outputs_back(project: Project) -> None:
    """Hostile review: after the README's disaster recovery (the state_dir's disk lost, then
    `restore` of a backup, or no backup at all) every job was refused its own output: the new
    state_dir had a new minibatch-id, which no backup kept."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    copy = project.root / "m.duckdb"
    assert project.cli("backup", str(copy)).returncode == 0
    state = project.root / ".state"
    shutil.rmtree(state)  # the disk holding the state_dir is lost
    assert project.cli("restore", str(copy)).returncode == 0
    resumed = project.cli("run-now", "ident")
    assert resumed.returncode == 0, resumed.stderr
    assert "0 done now" in resumed.stdout and len(project.computations()) == len(set(project.computations()))
    shutil.rmtree(state)  # and no backup: the way out is named
    refused = project.cli("run-now", "ident")
    assert refused.returncode == 2 and "was made anew" in refused.stderr, refused.stderr
    owner_file = next((project.root / "out").glob(".ident.minibatch-staging/minibatch-owner"))
    assert f"remove {owner_file}" in refused.stderr
    owner_file.unlink()
    adopted = project.cli("run-now", "ident")
    assert adopted.returncode == 0, adopted.stderr
    assert "0 done now" in adopted.stdout
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(300))
    # an output first claimed after the loss, then a restore: both are this state_dir's (a review)
    project.write_config(
        MAP_JOB + MAP_JOB.replace("[jobs.ident]", "[jobs.two]").replace("out/ident", "out/two")
    )
    assert project.cli("run-now", "two").returncode == 0
    shutil.copytree(state, project.root / ".state-copy")  # `cp -r`, before the restore
    assert project.cli("restore", str(copy)).returncode == 0
    # the copy holds the id the original had before the restore: it stays a copy (a review)
    config = (
        (project.root / "config.toml")
        .read_text()
        .replace('state_dir = ".state"', 'state_dir = ".state-copy"')
    )
    (project.root / "copy.toml").write_text(config)
    taken = in_process(["--config", str(project.root / "copy.toml"), "run-now", "two"])
    assert taken.returncode == 2 and "is a copy of it" in taken.stderr, taken.stdout + taken.stderr
    for job in ("ident", "two"):
        again = project.cli("run-now", job)
        assert again.returncode == 0 and "0 done now" in again.stdout, again.stderr


def test_backup_never_overwrites(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    target = project.root / "m.duckdb"
    assert project.cli("backup", str(target)).returncode == 0
    again = project.cli("backup", str(target))
    assert again.returncode == 1 and "will not overwrite" in again.stderr
    # hostile review: `backup DIR/` with DIR absent wrote a file DIR, and every later night failed
    nightly = project.root / "nightly"
    result = project.cli("backup", f"{nightly}/")
    assert result.returncode == 1 and f"no such directory: {nightly}/" in result.stderr, result.stderr
    assert not nightly.exists()
    (project.root / "bk?x").mkdir()  # review: DuckDB took what followed '?' for options
    result = project.cli("backup", f"{project.root / 'bk?x'}/")
    assert result.returncode == 1 and "on a path with '?'" in result.stderr, result.stderr
    assert "repair" not in result.stderr and not list((project.root / "bk?x").iterdir())


def test_restore_takes_only_a_manifest_and_leaves_the_file_it_is_given_as_it_was(project: Project) -> None:
    """Hostile review: `restore` opened the file it was given read-write, adding minibatch's
    tables to a user's own DuckDB database, and put a Parquet file in place of the manifest
    (DuckDB opens one as an empty database in memory): every later command then failed."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    other = project.root / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE userdata (x INTEGER)")
    garbage = project.root / "garbage.bin"
    garbage.write_bytes(os.urandom(4096))
    for given, why in [
        (other, "without minibatch's tables"),
        (project.data / "a.parquet", "not a DuckDB database file"),
        (garbage, "not a DuckDB database file"),
        (project.root / "nope.duckdb", "no such file"),
    ]:
        before = given.read_bytes() if given.exists() else None
        result = project.cli("restore", str(given))
        assert result.returncode == 1 and why in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert (given.read_bytes() if given.exists() else None) == before  # not even opened for writing
    state = project.root / ".state"
    assert not list(state.glob("*.replaced-*")) and not list(state.glob(".*"))  # nothing set aside or left
    status = project.cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)[0]["status"] == "succeeded", status.stderr


def test_a_backup_that_cannot_be_written_blames_the_destination(project: Project) -> None:
    """Hostile review: it said the manifest could not be used and suggested `repair`."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    result = project.cli("backup", "/proc/minibatch-backup.duckdb")
    assert result.returncode == 1 and "cannot write the backup /proc/minibatch-backup.duckdb" in result.stderr
    assert "repair" not in result.stderr and "Traceback" not in result.stderr


def test_two_restores_in_one_second_keep_both_manifests_they_replace(project: Project) -> None:
    """Hostile review: both were set aside under one name, and the first was lost."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "ident").returncode == 0
    (project.root / "backups").mkdir()
    copy = project.cli("backup", str(project.root / "backups")).stdout.strip()
    for _ in range(3):
        assert project.cli("restore", copy).returncode == 0
    assert len(list((project.root / ".state").glob("manifest.duckdb.replaced-*"))) == 3


def test_restore_and_repair_refuse_while_a_run_of_a_parameter_set_holds_its_lock(project: Project) -> None:
    """Hostile review: both took the locks of job names only, and a run of a parameter set holds
    its checkpoint's (`daily[date=...]`): a restore went ahead in the middle of one."""
    job = 'input = "data/*.parquet"\noutput = "out/{date:%Y-%m-%d}"\nprocess = "myjobs.basic:ident"\n'
    project.write_config(f"[jobs.daily]\n{job}")
    project.write_input("a.parquet", 0, 100)
    assert project.cli("run-now", "daily", "--param", "date=2026-01-01").returncode == 0
    (project.root / "backups").mkdir()
    copy = project.cli("backup", str(project.root / "backups")).stdout.strip()
    config = load_config(project.root / "config.toml")
    key = config.bound("daily", {"date": "2026-01-02"}).key
    assert key != "daily"
    with job_lock(config.engine.state_dir, key):  # what `run-now daily --param date=2026-01-02` holds
        for refused in (project.cli("restore", copy), project.cli("repair")):
            assert refused.returncode == 3, refused.stdout + refused.stderr
            assert f"job {key!r} is already running" in refused.stderr
    assert not list((project.root / ".state").glob("manifest.duckdb.*-*"))  # nothing set aside
    assert project.cli("restore", copy).returncode == 0


def test_a_second_restore_keeps_the_ids_the_first_one_kept(project: Project) -> None:
    """Hostile review: a backup kept only the state_dir's current minibatch-id, not the former
    ones; after a second disaster and restore, an output claimed under a former id was refused."""
    project.write_config(
        MAP_JOB + MAP_JOB.replace("[jobs.ident]", "[jobs.two]").replace("out/ident", "out/two")
    )
    project.write_input("a.parquet", 0, 100)
    state = project.root / ".state"
    assert project.cli("run-now", "ident").returncode == 0
    first, second = project.root / "1.duckdb", project.root / "2.duckdb"
    assert project.cli("backup", str(first)).returncode == 0
    shutil.rmtree(state)  # disaster 1
    assert project.cli("run-now", "two").returncode == 0  # claimed under the new state_dir's id
    assert project.cli("restore", str(first)).returncode == 0
    assert project.cli("backup", str(second)).returncode == 0
    shutil.rmtree(state)  # disaster 2
    assert project.cli("restore", str(second)).returncode == 0
    for job in ("ident", "two"):
        again = project.cli("run-now", job)
        assert again.returncode == 0 and "0 done now" in again.stdout, again.stderr
    # a backup of the previous release: one row, the current id only
    with duckdb.connect(str(second)) as con:
        con.execute("CREATE OR REPLACE TABLE state_identity AS SELECT 'aaaa' AS id")
    assert project.cli("restore", str(second)).returncode == 0
    assert (state / "minibatch-id").read_text().split()[0] == "aaaa"
