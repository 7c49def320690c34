"""Atomic publication (minibatch/output.py) and the per-job lock (minibatch/lock.py), the latter
held by a real second process and released by the kernel when that process is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from minibatch.layout import OutputLayout, part_name, write_atomically
from minibatch.lock import JobLocked, holder_pid, job_lock, lock_path
from minibatch.userfiles import REDUCED_NAME

from conftest import MAP_JOB, Project, start_ready, wait_for

CHUNK_ID = "a1" * 12  # chunk ids are 24 hex digits
TABLE = pa.table({"id": pa.array(range(50), pa.int64()), "s": pa.array([f"v{i}" for i in range(50)])})


# ---------------------------------------------------------------- output


def test_write_atomically_publishes_the_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    staging.mkdir()
    target = out / part_name("abc")
    size = write_atomically(TABLE, target, staging)
    assert size == target.stat().st_size > 0
    assert pq.read_table(target).equals(TABLE)
    assert list(staging.iterdir()) == []
    assert [p.name for p in out.iterdir()] == ["part-abc.parquet"]

    # writing again replaces the file in place
    smaller = TABLE.slice(0, 5)
    write_atomically(smaller, target, staging)
    assert pq.read_table(target).equals(smaller)
    assert list(staging.iterdir()) == [] and len(list(out.iterdir())) == 1


def test_write_atomically_failure_leaves_neither_temp_nor_target(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    target = tmp_path / "missing-dir" / "part-x.parquet"
    with pytest.raises(FileNotFoundError):
        write_atomically(TABLE, target, staging)
    assert list(staging.iterdir()) == []
    assert not target.exists()


def test_prepare_creates_dirs_and_removes_leftovers_from_staging(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out" / "job", reduce=True)
    assert layout.prepare() == 0
    for directory in (layout.output, layout.staging, layout.parts):
        assert directory.is_dir()

    (layout.staging / "part-a.parquet.123.tmp").write_bytes(b"half a file")
    (layout.staging / "junk-dir").mkdir()
    (layout.staging / "junk-dir" / "inner").write_text("x")
    (layout.parts / "part-keep.parquet").write_bytes(b"a finished part")
    (layout.output / REDUCED_NAME).write_bytes(b"published")
    assert layout.prepare() == 2
    assert list(layout.staging.iterdir()) == []
    # finished results are not leftovers
    assert (layout.parts / "part-keep.parquet").read_bytes() == b"a finished part"
    assert (layout.output / REDUCED_NAME).read_bytes() == b"published"


def test_reduce_layout_keeps_staging_and_parts_beside_the_output(tmp_path: Path) -> None:
    output = tmp_path / "out" / "job"
    layout = OutputLayout(output, reduce=True)
    for directory in (layout.staging, layout.parts):
        assert directory.parent == output.parent
        assert directory.name.startswith(".")
        assert output not in directory.parents and directory != output
    assert layout.staging != layout.parts

    layout.prepare()
    write_atomically(TABLE, layout.parts / part_name(CHUNK_ID), layout.staging)
    write_atomically(TABLE.slice(0, 3), layout.output / REDUCED_NAME, layout.staging)
    (layout.staging / "in-flight.tmp").write_bytes(b"not parquet")
    # readers of the output see only the published result, never parts or staging
    assert ds.dataset(output, format="parquet").to_table().num_rows == 3
    glob = str(output / "**" / "*.parquet")
    con = duckdb.connect()
    try:
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [glob]).fetchall() == [(3,)]
    finally:
        con.close()
    assert layout.part_files() == {part_name(CHUNK_ID)}


def test_map_layout_writes_parts_into_the_output(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path / "out" / "job", reduce=False)
    assert layout.parts == layout.output
    assert layout.staging.parent == layout.output.parent and layout.staging.name.startswith(".")
    layout.prepare()
    write_atomically(TABLE, layout.parts / part_name("a" * 24), layout.staging)
    write_atomically(TABLE, layout.parts / part_name("b" * 24), layout.staging)
    assert layout.part_files() == {part_name("a" * 24), part_name("b" * 24)}
    layout.remove_parts({part_name("a" * 24)})
    assert layout.part_files() == {part_name("b" * 24)}
    layout.remove_all()
    assert not layout.output.exists() and not layout.staging.exists()


# ---------------------------------------------------------------- lock

OLD_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid():<20}\\n".encode(), 0)
print("locked", flush=True)
sys.stdin.readline()
"""

HOLDER = """
import sys
from pathlib import Path
from minibatch.lock import job_lock
with job_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.readline()
print("unlocked", flush=True)
"""


def hold_lock(state_dir: Path, job: str) -> subprocess.Popen[str]:
    return start_ready([sys.executable, "-c", HOLDER, str(state_dir), job], "locked")


def test_a_held_lock_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path, "nightly")
    try:
        with pytest.raises(JobLocked) as excinfo, job_lock(tmp_path, "nightly"):
            pytest.fail("took a lock another process holds")
        assert excinfo.value.pid == holder.pid
        assert excinfo.value.job == "nightly"
        assert f"process {holder.pid}" in str(excinfo.value)
        assert holder_pid(tmp_path, "nightly") == holder.pid
        with job_lock(tmp_path, "other-job"):  # locks are per job
            pass

        # a clean release by the holder frees it
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()
    with job_lock(tmp_path, "nightly"):
        assert holder_pid(tmp_path, "nightly") == os.getpid()


def test_sigkilled_holder_releases_the_lock_at_once(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path, "nightly")
    try:
        with pytest.raises(JobLocked), job_lock(tmp_path, "nightly"):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=10) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    # the dead holder's pid is still in the file, but it names no live process
    assert lock_path(tmp_path, "nightly").read_text().split()[0] == str(holder.pid)
    assert holder_pid(tmp_path, "nightly") is None
    with job_lock(tmp_path, "nightly"):  # no wait, no stale-lock cleanup needed
        assert holder_pid(tmp_path, "nightly") == os.getpid()


def test_holder_pid_without_a_usable_lock_file(tmp_path: Path) -> None:
    assert holder_pid(tmp_path, "never") is None
    path = lock_path(tmp_path, "garbled")
    path.parent.mkdir(parents=True)
    path.write_text("not a pid\n")
    assert holder_pid(tmp_path, "garbled") is None
    path.write_text("")
    assert holder_pid(tmp_path, "garbled") is None


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with job_lock(tmp_path, "j"):
        with pytest.raises(JobLocked) as excinfo, job_lock(tmp_path, "j"):
            pass
        assert excinfo.value.pid == os.getpid()
    with job_lock(tmp_path, "j"):  # released on exit
        pass


def test_a_run_in_another_pid_namespace_is_running_and_cancelled_from_here(project: Project) -> None:
    """Hostile review: a run in a container sharing the state_dir (another PID namespace)
    records its own pid (1); `history` and `status` called it crashed while it ran, and
    `cancel` refused. The lock file names the run that holds it; cancel signals the holder as
    this namespace numbers it (never the pid the row records)."""
    import json

    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    try:
        subprocess.run([*unshare, "true"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no new PID namespace here (unshare needs CAP_SYS_ADMIN)")
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 1000)  # 10 chunks of 0.5 s on 2 workers
    argv = [*unshare, sys.executable, "-m", "minibatch", "--config", str(project.root / "config.toml")]
    pipe = subprocess.PIPE
    run = subprocess.Popen([*argv, "run-now", "ident"], env=project.env({"MB_SLEEP": "0.5"}),
                           text=True, stdout=pipe, stderr=pipe, start_new_session=True)  # fmt: skip
    project.started.append(run)
    history: list[dict[str, object]] = []

    def begun() -> bool:
        history[:] = json.loads(project.cli("history", "ident", "--json").stdout or "[]")
        return bool(history)

    wait_for(begun, what="the run's row")
    assert history[0]["status"] == "running", history
    cancel = project.cli("cancel", str(history[0]["run_id"]))
    assert cancel.returncode == 0, cancel.stderr
    assert f"SIGTERM to process {run.pid}" not in cancel.stdout  # unshare's pid: its child runs
    assert run.wait(timeout=60) == 0, run.stderr.read() if run.stderr else ""
    assert json.loads(project.cli("history", "ident", "--json").stdout)[0]["status"] == "stopped"


def test_who_holds_a_lock_from_a_child_namespace_and_beside_an_older_release(tmp_path: Path) -> None:
    """Second review: seen from a child PID namespace, /proc/locks lists no holder of a lock
    held outside it, and a live run was called crashed; and an older release, which rewrites
    only the pid, left a newer run's tag in the file, so its own live run was called crashed."""
    from minibatch.lock import held_by

    with job_lock(tmp_path, "j", tag="R1"):
        assert held_by(tmp_path, "j", "R1") and not held_by(tmp_path, "j", "R0")
        unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
        code = "import sys; from pathlib import Path; from minibatch.lock import held_by; "
        code += "print(held_by(Path(sys.argv[1]), 'j', 'R1'), held_by(Path(sys.argv[1]), 'j', 'R0'))"
        seen = subprocess.run(
            [*unshare, sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        )
        if seen.returncode == 0:  # (no new PID namespace without CAP_SYS_ADMIN)
            assert seen.stdout.split() == ["True", "False"], seen.stderr
    holder = start_ready([sys.executable, "-c", OLD_HOLDER, str(lock_path(tmp_path, "j"))], "locked")
    try:
        assert held_by(tmp_path, "j", "Rold", holder.pid)
    finally:
        holder.kill()
        holder.wait()
