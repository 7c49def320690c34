"""Crash safety through the real CLI: the processes of a killed run publish nothing and do not
outlive it, an input rewritten under a run fails it, a stop while planning is a clean stop, a
damaged part file or manifest is recovered from, and a full disk is reported in one line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from conftest import MAP_JOB, Project, faulty_job, wait_for, watch_stderr

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, mounts a tmpfs")

# A job whose workers note their pid, then hold their chunk until the test creates $MB_RELEASE
# (at most a minute): "mid-chunk" for as long as the test needs, with no timing guess.
HOLD_MODULE = """
import os
import time

import pyarrow.compute as pc


def hold(table, ctx):
    pid_file = os.environ.get("MB_PID_FILE")
    if pid_file:
        with open(pid_file, "a") as f:
            f.write(f"{os.getpid()}\\n")
    release = os.environ.get("MB_RELEASE")
    deadline = time.monotonic() + 60
    while release and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return table.append_column("doubled", pc.multiply(table["value"], 2))
"""

HOLD_JOB = """
[jobs.h]
input = "data/*.parquet"
output = "out/h"
process = "myjobs.hold:hold"
"""

ORIGINAL_ROWS = 300


def ids_of(project: Project, job: str) -> list[int]:
    return sorted(project.output_table(job).column("id").to_pylist())


def part_files(project: Project, job: str) -> set[str]:
    return {p.name for p in project.out(job).glob("*.parquet")}


def last_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def prose_lines(stderr: str) -> list[str]:
    """stderr's lines that are not JSON log lines (log_format = "json")."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


# -- processes ------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def children(pid: int) -> list[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.update(int(child) for child in task.read_text().split())
    return sorted(found)


def survivors(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` s for every process in `pids` to exit; those that did not."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(gone(pid) for pid in pids), timeout=timeout, what="the processes to exit")
    return [pid for pid in pids if not gone(pid)]


def kill_leftovers(pids: list[int]) -> None:
    """SIGKILL what the test's runs left behind (only multiprocessing children: no reused pid)."""
    for pid in pids:
        if not gone(pid) and "multiprocessing" in cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Orphans:
    coordinator: subprocess.Popen[str]
    workers: list[int]  # mid-chunk when the coordinator was killed
    helpers: list[int]  # the coordinator's children: forkserver, resource tracker
    release: Path  # creating it lets the held chunks finish


def orphan_workers(project: Project, tmp_path: Path, stop_workers: bool = False) -> Orphans:
    """A finished map job gets two new input files; a run over them is SIGKILLed (the coordinator
    alone, as the OOM killer does) while both workers are mid-chunk. With `stop_workers` the
    workers are SIGSTOPped first (paused, say, by a debugger or a frozen cgroup)."""
    (project.root / "myjobs" / "hold.py").write_text(HOLD_MODULE)
    project.write_config(HOLD_JOB)
    project.write_input("a.parquet", 0, ORIGINAL_ROWS)
    first = project.cli("run-now", "h")
    assert first.returncode == 0, first.stderr
    project.write_input("b.parquet", 1000, 200)
    project.write_input("c.parquet", 2000, 200)
    pid_file, release = tmp_path / "worker-pids", tmp_path / "release"
    coordinator = project.start(
        "run-now", "h", env={"MB_PID_FILE": str(pid_file), "MB_RELEASE": str(release)}
    )

    def workers() -> list[int]:
        return sorted({int(p) for p in pid_file.read_text().split()}) if pid_file.exists() else []

    wait_for(lambda: len(workers()) >= 2 or coordinator.poll() is not None, what="both workers mid-chunk")
    assert coordinator.poll() is None, coordinator.communicate()[1]
    helpers = children(coordinator.pid)  # the forkserver the workers were forked from, ...
    if stop_workers:
        for pid in workers():
            os.kill(pid, signal.SIGSTOP)
    os.kill(coordinator.pid, signal.SIGKILL)  # the coordinator alone, not its process group
    coordinator.wait()
    return Orphans(coordinator, workers(), helpers, release)


def forget_new_inputs_and_run_again(project: Project) -> None:
    for name in ("b.parquet", "c.parquet"):
        (project.data / name).unlink()
    again = project.cli("run-now", "h")
    assert again.returncode == 0, again.stderr


def close(orphans: Orphans) -> None:
    kill_leftovers(orphans.workers + orphans.helpers)
    for pipe in (orphans.coordinator.stdout, orphans.coordinator.stderr):
        if pipe is not None:
            pipe.close()


def test_orphaned_workers_publish_nothing_after_their_coordinator_died(
    project: Project, tmp_path: Path
) -> None:
    orphans = orphan_workers(project, tmp_path)
    try:
        forget_new_inputs_and_run_again(project)
        orphans.release.touch()  # a surviving worker finishes its chunk now
        left = survivors(orphans.workers, timeout=10)
        assert not left, f"workers still alive: {[cmdline(pid) for pid in left]}"
        ids = ids_of(project, "h")
        assert ids == list(range(ORIGINAL_ROWS)), (
            f"{len(ids) - ORIGINAL_ROWS} rows of removed input files were published by the workers of "
            f"a dead run: {sorted(part_files(project, 'h'))}"
        )
    finally:
        close(orphans)


def test_no_process_of_a_killed_run_outlives_it(project: Project, tmp_path: Path) -> None:
    orphans = orphan_workers(project, tmp_path)
    try:
        left = survivors(orphans.workers + orphans.helpers, timeout=5)
        assert not left, "alive 5 s after their coordinator was SIGKILLed: " + "; ".join(
            f"{pid} {'worker' if pid in orphans.workers else cmdline(pid)[:120]}" for pid in left
        )
    finally:
        close(orphans)


def test_a_stopped_worker_publishes_nothing_once_resumed(project: Project, tmp_path: Path) -> None:
    orphans = orphan_workers(project, tmp_path, stop_workers=True)
    try:
        forget_new_inputs_and_run_again(project)
        published = part_files(project, "h")
        orphans.release.touch()
        for pid in orphans.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        # Passes if the resumed workers die, or live on without publishing; stops waiting as
        # soon as one publishes.
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: all(gone(pid) for pid in orphans.workers) or part_files(project, "h") != published,
                timeout=10,
                what="the resumed workers to exit",
            )
        ids = ids_of(project, "h")
        assert ids == list(range(ORIGINAL_ROWS)), (
            f"{len(ids) - ORIGINAL_ROWS} rows of removed input files were published by resumed workers "
            f"of a dead run: {sorted(part_files(project, 'h') - published)}"
        )
    finally:
        close(orphans)


# -- inputs that change under a run -----------------------------------------------------------


def test_an_input_rewritten_mid_run_fails_the_run_and_the_next_run_catches_up(project: Project) -> None:
    project.write_config(faulty_job("slow"))
    project.write_input("f0.parquet", 0, 600)  # 12 chunks, computed first
    project.write_input("f1.parquet", 600, 300)  # 6 chunks, not started when it is rewritten
    process = project.start("run-now", "f", env={"MB_SLEEP": "0.15"})
    wait_for(lambda: len(project.computations()) >= 1 or process.poll() is not None, what="a first chunk")
    staged = project.write_input("f1.rewritten", 5000, 250)  # other rows, another size
    os.replace(staged, project.data / "f1.parquet")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, f"exit {process.returncode}; stdout: {out}"
    assert "changed" in out + err
    assert "Traceback" not in err, last_lines(err)
    again = project.cli("run-now", "f")
    assert again.returncode == 0, again.stderr
    assert ids_of(project, "f") == list(range(600)) + list(range(5000, 5250))


# -- a stop while planning --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_planning_is_a_clean_stop(project: Project, tmp_path: Path, signum: int) -> None:
    project.write_config("""
    [jobs.ident]
    input = "data/*.parquet"
    output = "out/ident"
    process = "myjobs.basic:ident"
    """)
    # Footers of 2000 row groups: planning 64 such files takes ~1.3 s on an idle 2-core machine
    # (~3 s loaded); the signal comes within ~10 ms of run_started.
    source = project.write_input("source.parquet.tmp", 0, 2000, row_group=1)
    for i in range(64):
        os.link(source, project.data / f"f{i:03d}.parquet")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        command = [sys.executable, "-m", "minibatch", "--config", str(project.root / "config.toml")]
        process = subprocess.Popen(
            [*command, "run-now", "ident"],  # stderr to a file: read whole once the run is over
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=project.env(),
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: '"event": "run_started"' in log.read_text() or process.poll() is not None,
            what="run_started",
        )
        before = log.read_text()
        assert process.poll() is None, before
        os.kill(process.pid, signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert '"event": "run_planned"' not in before  # the signal did come while planning
    err = log.read_text()
    assert process.returncode == 0, f"exit {process.returncode}: {last_lines(err)}"
    assert "Traceback" not in err and "Aborted!" not in err, last_lines(err)
    assert project.manifest_rows("SELECT status FROM runs") == [("stopped",)]


# -- a damaged part file ----------------------------------------------------------------------


def test_a_truncated_part_file_met_while_adopting_is_computed_again(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    first = project.cli("run-now", "ident")
    assert first.returncode == 0, first.stderr
    part = sorted(project.out("ident").glob("part-*.parquet"))[0]
    os.truncate(part, part.stat().st_size // 2)
    con = duckdb.connect(str(project.root / ".state" / "manifest.duckdb"))
    try:
        con.execute("DELETE FROM chunks WHERE output_file = ?", [part.name])
        (left,) = con.execute("SELECT count(*) FROM chunks WHERE output_file = ?", [part.name]).fetchone()
    finally:
        con.close()
    assert left == 0
    chunk_id = part.name.removeprefix("part-").removesuffix(".parquet")
    assert project.computations().count(chunk_id) == 1

    result = project.cli("run-now", "ident")
    assert result.returncode == 0, f"exit {result.returncode}: {last_lines(result.stderr)}"
    assert "Traceback" not in result.stderr, last_lines(result.stderr)
    assert part.name in result.stderr  # a warning names the file it could not adopt
    assert project.computations().count(chunk_id) == 2
    assert ids_of(project, "ident") == list(range(500))


# -- a damaged manifest: `minibatch repair` ---------------------------------------------------


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_bytes(path: Path) -> None:
    """XOR 256 bytes in both database headers (4096, 8192: checksummed) and in the middle."""
    data = bytearray(path.read_bytes())
    for offset in (4096, 8192, len(data) // 2):
        for i in range(offset, offset + 256):
            data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def duckdb_rejects(path: Path) -> bool:
    """Whether DuckDB fails to open or read the file (in a child: nothing cached here)."""
    probe = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "for table in ('runs', 'chunks', 'attempts', 'bad_files'):\n"
        "    con.execute(f'SELECT * FROM {table}').fetchall()\n"
    )
    return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True).returncode != 0


def assert_points_to_repair(result: subprocess.CompletedProcess[str], manifest: Path) -> None:
    assert result.returncode == 1, f"exit {result.returncode}: {last_lines(result.stderr)}"
    assert "Traceback" not in result.stderr, last_lines(result.stderr)
    mentions = [line for line in result.stderr.splitlines() if "minibatch repair" in line]
    assert len(mentions) == 1, result.stderr
    assert str(manifest) in mentions[0] or str(manifest.resolve()) in mentions[0], mentions[0]
    assert len(prose_lines(result.stderr)) <= 1, result.stderr  # one line, not a dump


@pytest.mark.parametrize("damage", [truncate_half, flip_bytes], ids=["truncated", "flipped-bytes"])
def test_repair_sets_a_broken_manifest_aside_and_the_next_run_adopts_the_output(
    project: Project, damage: Callable[[Path], None]
) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    project.write_input("b.parquet", 300, 200)
    first = project.cli("run-now", "ident")
    assert first.returncode == 0, first.stderr
    computed = project.computations()
    state = project.root / ".state"
    manifest = state / "manifest.duckdb"
    damage(manifest)

    if duckdb_rejects(manifest):  # else DuckDB reads it anyway: then only the repair is checked
        assert_points_to_repair(project.cli("status"), manifest)
        assert_points_to_repair(project.cli("run-now", "ident"), manifest)

    broken = manifest.read_bytes()
    repaired = project.cli("repair")
    assert repaired.returncode == 0, f"exit {repaired.returncode}: {last_lines(repaired.stderr)}"
    kept = [p for p in state.iterdir() if p.name.startswith("manifest.duckdb.broken")]
    assert any(p.read_bytes() == broken for p in kept), sorted(p.name for p in state.iterdir())
    assert manifest.exists()  # "a new manifest was started" (it was not, until the next run)

    again = project.cli("run-now", "ident")
    assert again.returncode == 0, last_lines(again.stderr)
    assert project.computations() == computed  # every result on disk adopted, none recomputed
    assert ids_of(project, "ident") == list(range(500))
    status = project.cli("status")
    assert status.returncode == 0, last_lines(status.stderr)


# -- a full disk -------------------------------------------------------------------------------


def mount_tmpfs(path: Path, size: str) -> None:
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave: int) -> None:
    stat = os.statvfs(directory)
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_a_full_disk_during_the_manifest_commit_ends_in_one_readable_line(project: Project) -> None:
    project.write_config(MAP_JOB)
    state = project.root / ".state"
    state.mkdir()
    mount_tmpfs(state, "8m")
    try:
        project.write_input("a.parquet", 0, 300)
        first = project.cli("run-now", "ident")
        assert first.returncode == 0, first.stderr
        project.write_input("b.parquet", 300, 300)
        fill(state, leave=128 * 1024)  # room to open the manifest, not to commit the run
        result = project.cli("run-now", "ident")
    finally:
        unmount(state)
    assert result.returncode == 1, f"exit {result.returncode}: {last_lines(result.stderr)}"
    assert "Traceback" not in result.stderr, last_lines(result.stderr)
    lines = result.stderr.splitlines()
    assert any("No space left" in line or "disk full" in line.lower() for line in lines), result.stderr
    assert len(prose_lines(result.stderr)) <= 1, result.stderr


def hold_manifest(manifest: Path, then: str, read_only: bool = False) -> subprocess.Popen[str]:
    """Another process holding the manifest open (a `duckdb` shell, say), once it has it; it
    runs `then` (Python) and lets go when it ends."""
    code = (
        f"import duckdb, sys, time; c = duckdb.connect({str(manifest)!r}, read_only={read_only})\n"
        f"print('open', flush=True); {then}"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "open\n"
    return holder


def test_repair_leaves_a_manifest_another_process_holds_open(project: Project) -> None:
    """Hostile review: a read-only DuckDB session on the manifest (as "The manifest" in the
    README suggests) made `repair` take the healthy file for a damaged one: it was set aside, and
    history, dead letters and fire times went with it, exit 0."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    manifest = project.root / ".state" / "manifest.duckdb"
    holder = hold_manifest(manifest, "sys.stdin.read()", read_only=True)
    try:
        repaired = project.cli("repair")
    finally:
        holder.kill()
        holder.wait()
    assert repaired.returncode == 3, f"exit {repaired.returncode}: {repaired.stdout}{repaired.stderr}"
    assert "in use by another process" in repaired.stderr and "Traceback" not in repaired.stderr
    assert sorted(p.name for p in manifest.parent.iterdir() if p.name.startswith("manifest")) == [
        "manifest.duckdb"
    ]
    assert project.manifest_rows("SELECT count(*) FROM runs") == [(1,)]


def test_a_run_waiting_for_a_held_manifest_says_so(project: Project) -> None:
    """An operator review: with a `duckdb` shell holding the manifest, `run-now` printed nothing
    for its whole minute of waiting. After BUSY_SAYS seconds it names the holder."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    manifest = project.root / ".state" / "manifest.duckdb"
    argv = [sys.executable, "-m", "minibatch", "--config", str(project.root / "config.toml"), "status"]
    # the holder lets go only once the waiting command has said so: a loaded machine's slow start
    # must not let the command find the manifest free
    holder = hold_manifest(manifest, "sys.stdin.read()")
    try:
        waiting = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=project.env()
        )
        seen = watch_stderr(waiting)
        wait_for(lambda: any("manifest_busy" in line for line in seen), what="manifest_busy")
    finally:
        holder.communicate("")
    assert waiting.wait(timeout=60) == 0, seen
    assert "Conflicting lock" in "".join(seen), seen
    # and Ctrl-C while it waits: one line and 130, not a traceback nor "Aborted!" with a failed run's 1
    holder = hold_manifest(manifest, "sys.stdin.read()")
    try:
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (xdist ignores it)
        waiting = subprocess.Popen(
            argv, stderr=subprocess.PIPE, text=True, env=project.env(), preexec_fn=default_sigint
        )
        seen = watch_stderr(waiting)
        wait_for(lambda: any("manifest_busy" in line for line in seen), what="manifest_busy")
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=30) == 130
    finally:
        holder.communicate("")
    assert "interrupted" in "".join(seen) and "Traceback" not in "".join(seen), seen
