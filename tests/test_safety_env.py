"""The machine failing under a run (a hostile review, session 19; each failed before its fix):
a result that cannot be written or published is the machine's fault, never a dead letter that
later runs skip with exit 0; a share unmounted under a `**` glob mid-run is no success; a
manifest removed mid-run and a forkserver killed while a worker starts end in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minibatch.pool import WorkerPool, warm_up
from minibatch.tasks import PoolBroken

from conftest import Project, faulty_job, in_a_mount_namespace, wait_for


def ids(project: Project) -> list[int]:
    return sorted(project.output_table("f").column("id").to_pylist())


def gated(project: Project, target: str) -> tuple[subprocess.Popen[str], Path]:
    """A real run whose `target` chunk waits, once started, until the returned file exists."""
    started, go = project.root / "started", project.root / "go"
    env = {"MB_TARGET": target, "MB_STARTED": str(started), "MB_GO": str(go)}
    process = project.start("run-now", "f", env=env)
    wait_for(lambda: started.exists() or process.poll() is not None, what="the target chunk")
    assert process.poll() is None, process.communicate()
    return process, go


NAMESPACE = pytest.mark.skipif(
    in_a_mount_namespace() is None, reason="no mount namespace to mount a tmpfs in"
)


def in_namespace(project: Project, script: str, root: Path | None = None) -> list[tuple[str, str]]:
    """`script` run by sh in a private mount namespace, in the project's directory, `$RUN`
    being `minibatch run-now f` (its config spelled under `root`): the exit status and output
    of each `$RUN > N.out 2>&1; echo $? > N.rc` in it."""
    namespace = in_a_mount_namespace()
    assert namespace is not None
    run = f"{sys.executable} -m minibatch --config {(root or project.root) / 'config.toml'} run-now f"
    body = f"cd {project.root} || exit 9\n" + script.replace("$RUN", run)
    assert subprocess.run([*namespace, "sh", "-c", body], env=project.env(), timeout=300).returncode == 0
    ran = sorted(project.root.glob("*.rc"), key=lambda path: int(path.stem))
    return [(path.read_text().strip(), path.with_suffix(".out").read_text()) for path in ran]


def test_a_staging_directory_removed_under_a_run_dead_letters_nothing(project: Project) -> None:
    """A worker that could not write its result (staging removed here; made read-only, or a
    file size limit, alike) had its chunk charged: dead letters after the retries, and the next
    run exited 0 without their rows."""
    project.write_config(faulty_job("gate", "workers = 1"))
    project.write_input("a.parquet", 0, 300)
    process, go = gated(project, "a.parquet:100")
    shutil.rmtree(project.root / "out" / ".f.minibatch-staging")
    go.touch()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, out + err
    assert "OutputUnwritable" in out and "No such file or directory" in out, out
    assert project.manifest_rows("SELECT count(*) FROM chunks WHERE status = 'dead'") == [(0,)]
    assert project.cli("run-now", "f").returncode == 0
    assert ids(project) == list(range(300))


def test_an_output_moved_under_a_run_fails_it_and_names_the_output(project: Project) -> None:
    """Publishing into an output that had gone (moved, removed, made read-only) ended the run
    as `crashed`, without a summary, naming a file in staging. (Moved after a result was
    published, the commit that would record it cannot make it durable: the run ends there,
    one line naming the output, exit 1.)"""
    project.write_config(faulty_job("gate", "workers = 1"))
    project.write_input("a.parquet", 0, 300)
    process, go = gated(project, "a.parquet:0")
    parts = project.out("f")
    parts.rename(parts.with_name("away"))
    go.touch()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, out + err
    assert f"OutputUnwritable: {parts}/part-" in out and "cannot be written" in out, out + err
    assert project.manifest_rows("SELECT status FROM runs") == [("failed",)]
    parts.with_name("away").rename(parts)
    assert project.cli("run-now", "f").returncode == 0
    assert ids(project) == list(range(300))


@NAMESPACE
def test_a_share_unmounted_under_a_run_is_no_success(project: Project) -> None:
    """`data/**/*.parquet` with data/b a share: unmounted while the run read a new file on it,
    the file's chunks looked removed and the run succeeded, with a reduction (or `depends_on`)
    over some of the share's files and not others."""
    project.write_config(faulty_job("gate", "workers = 1").replace("data/*.parquet", "data/**/*.parquet"))
    for place in ("a", "b"):
        (project.data / place).mkdir(parents=True)
    project.write_input("a/x.parquet", 0, 300)
    for name, first in (("y", 300), ("g", 600)):
        project.write_input(f"{name}.parquet", first, 300).rename(project.root / f"{name}.parquet")
    outcome = in_namespace(
        project,
        """
        mount -t tmpfs share data/b && cp -p y.parquet data/b/ || exit 9
        $RUN > 1.out 2>&1; echo $? > 1.rc
        cp -p g.parquet data/b/
        MB_TARGET=g.parquet:0 MB_STARTED=started MB_GO=go $RUN > 2.out 2>&1 &
        for i in $(seq 6000); do [ -e started ] && break; sleep 0.01; done
        umount -l data/b; touch go; wait $!; echo $? > 2.rc
        mount -t tmpfs share data/b && cp -p y.parquet g.parquet data/b/ || exit 9
        $RUN > 3.out 2>&1; echo $? > 3.rc
    """,
    )
    assert [rc for rc, _ in outcome] == ["0", "1", "0"], outcome
    unmounted = f"{project.data / 'b'}: a mount point of share (tmpfs) when its inputs were last read"
    assert unmounted in outcome[1][1], outcome[1][1]
    assert ids(project) == list(range(900))


@NAMESPACE
def test_a_filesystem_mounted_over_an_input_directory_hides_no_results(project: Project) -> None:
    """Hostile review of the fix above: data/b a plain directory, then a filesystem mounted
    over it. Its files looked removed and their results were deleted, exit 0 (mid-run: the run
    succeeded without them). A directory that is a mount point now, and was not when the inputs
    were last read, is checked as one that was; also where the paths run through a symlink
    (the project reached as /srv/minibatch -> /data/minibatch; the review of that fix)."""
    project.write_config(faulty_job("gate", "workers = 1").replace("data/*.parquet", "data/*/*.parquet"))
    for place in ("a", "b"):
        (project.data / place).mkdir(parents=True)
    project.write_input("a/x.parquet", 0, 300)
    project.write_input("b/y.parquet", 300, 300)
    (project.root.parent / "link").symlink_to(project.root)
    script = """
        $RUN > 1.out 2>&1; echo $? > 1.rc
        mount -t tmpfs over data/b || exit 9
        $RUN > 2.out 2>&1; echo $? > 2.rc
        umount data/b
        $RUN > 3.out 2>&1; echo $? > 3.rc
    """
    outcome = in_namespace(project, script, root=project.root.parent / "link")
    assert [rc for rc, _ in outcome] == ["0", "1", "0"], outcome
    hidden = f"{project.data / 'b'}: not a mount point when its inputs were last read, over (tmpfs) now"
    assert hidden in outcome[1][1], outcome[1][1]
    assert "0 done now, 12 already done" in outcome[2][1], outcome[2][1]
    assert ids(project) == list(range(600))


@NAMESPACE
def test_a_volume_mounted_on_the_output_is_a_configuration_error(project: Project) -> None:
    """Hostile review: with a volume mounted on the output, every publication (a rename from
    staging, beside the output) failed across filesystems, each run exit 1, and the chunk's
    quarantined rows were published before its result failed to be."""
    project.write_config(faulty_job("gate"))
    project.write_input("a.parquet", 0, 300)
    [(code, said)] = in_namespace(
        project,
        """
        mkdir -p out/f && mount -t tmpfs volume out/f || exit 9
        $RUN > 1.out 2>&1; echo $? > 1.rc
    """,
    )
    assert code == "2", said
    staging = project.root / "out" / ".f.minibatch-staging"
    assert f"{project.out('f')} is on another mount than {staging}" in said, said
    [(code, said)] = in_namespace(
        project,
        """
        rm -f 1.rc && mount --bind out/f out/f || exit 9  # the same filesystem: renames fail too
        $RUN > 1.out 2>&1; echo $? > 1.rc
    """,
    )
    assert code == "2" and f"{project.out('f')} is on another mount than" in said, said
    assert project.cli("run-now", "f").returncode == 0  # unmounted: the same directory works
    assert ids(project) == list(range(300))


@NAMESPACE
def test_a_bind_of_another_directory_over_inputs_hides_no_results(project: Project) -> None:
    """Review of the same-filesystem rule: a bind mount of another directory of the same disk
    (systemd's BindPaths=, `docker -v`) over an input directory was neither recorded nor
    counted: a run with it after one without (or the other way round) deleted the hidden
    files' results, exit 0. A bind of a directory onto itself hides nothing and is not counted."""
    project.write_config(faulty_job("gate").replace("data/*.parquet", "data/*/*.parquet"))
    for place in ("data/a", "data/b", "empty", "incoming"):
        (project.root / place).mkdir(parents=True)
    project.write_input("a/x.parquet", 0, 300)
    project.write_input("b/y.parquet", 300, 300)
    project.write_input("z.parquet", 600, 300).rename(project.root / "incoming" / "z.parquet")
    script = """
        $RUN > 1.out 2>&1; echo $? > 1.rc
        mount --bind empty data/b || exit 9
        $RUN > 2.out 2>&1; echo $? > 2.rc
        umount data/b && rm data/b/y.parquet || exit 9
        $RUN > 3.out 2>&1; echo $? > 3.rc
        mount --bind incoming data/b || exit 9
        $RUN > 4.out 2>&1; echo $? > 4.rc
    """
    outcome = in_namespace(project, script)
    assert [code for code, _ in outcome] == ["0", "1", "0", "0"], outcome
    assert f"{project.data / 'b'}: not a mount point when its inputs were last read" in outcome[1][1]
    assert ids(project) == [*range(300), *range(600, 900)]
    refused = project.cli("run-now", "f")  # the bind gone: z looks removed
    assert refused.returncode == 1 and "when its inputs were last read, and not one now" in refused.stdout
    assert ids(project) == [*range(300), *range(600, 900)]


@NAMESPACE
def test_a_mount_out_of_sight_is_not_the_outputs(project: Project) -> None:
    """Review of the mount comparison: a volume mounted on out/ over one on out/f (hidden
    now) had out/f taken for another mount than its staging directory: exit 2 from the
    second run on."""
    project.write_config(faulty_job("gate"))
    project.write_input("a.parquet", 0, 300)
    script = """
        mkdir -p out/f && mount -t tmpfs hidden out/f && mount -t tmpfs volume out || exit 9
        $RUN > 1.out 2>&1; echo $? > 1.rc
        $RUN > 2.out 2>&1; echo $? > 2.rc
    """
    outcome = in_namespace(project, script)
    assert [code for code, _ in outcome] == ["0", "0"], outcome


@NAMESPACE
def test_a_directory_bound_onto_itself_is_no_mount_over_its_inputs(project: Project) -> None:
    """Hostile review of the mount-over rule: systemd's ReadWritePaths= binds the project onto
    itself in the service's view only; a run there after one from a shell, with an input
    removed, was refused as if a filesystem had been mounted over the inputs; and a run from a
    shell after one there, as if a share had been unmounted."""
    project.write_config(faulty_job("gate").replace("data/*.parquet", "data/*/*.parquet"))
    for place in ("a", "b"):
        (project.data / place).mkdir(parents=True)
    project.write_input("a/x.parquet", 0, 300)
    project.write_input("a/w.parquet", 600, 300)
    project.write_input("b/y.parquet", 300, 300)
    assert project.cli("run-now", "f").returncode == 0
    (project.data / "b" / "y.parquet").unlink()
    [(code, said)] = in_namespace(
        project,
        """
        mount --bind "$PWD" "$PWD" || exit 9
        $RUN > 1.out 2>&1; echo $? > 1.rc
    """,
    )
    assert code == "0", said
    assert ids(project) == [*range(300), *range(600, 900)]
    (project.data / "a" / "x.parquet").unlink()
    assert project.cli("run-now", "f").returncode == 0  # the bind seen by the run above only
    assert ids(project) == list(range(600, 900))


@NAMESPACE
def test_a_run_records_the_mounts_above_earlier_inputs_too(project: Project) -> None:
    """Hostile review: a run cut short before it forgot a removed input's results recorded the
    mounts above the files it found only, and every later run took the share above the removed
    one for a filesystem mounted since: refused until `--fresh`."""
    (project.data / "vol").mkdir(parents=True)
    project.write_input("a.parquet", 0, 10)
    check = (
        "import json, sys; from pathlib import Path; from minibatch.inputs import find_inputs; "
        "found = find_inputs(Path.cwd(), ['data/**/*.parquet'], read={sys.argv[1]: {(1, 2)}}, mounts={}); "
        "print(json.dumps(found.mounts))"
    )
    [(code, said)] = in_namespace(
        project,
        f"""
        mount -t tmpfs vol data/vol || exit 9
        {sys.executable} -c "{check}" {project.data / "vol" / "gone.parquet"} > 1.out 2>&1; echo $? > 1.rc
    """,
    )
    assert code == "0" and json.loads(said) == {str(project.data / "vol"): "vol (tmpfs)"}, said


@NAMESPACE
def test_a_read_only_output_fails_the_run_and_says_so(project: Project) -> None:
    """Hostile review: a read-only output crashed the run (`Read-only file system:
    out/f/part-reduced.parquet`, a file there is not: its removal failed first), `crashed`."""
    project.write_config(faulty_job("gate"))
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "f").returncode == 0
    project.write_input("b.parquet", 300, 300)
    [(code, said)] = in_namespace(
        project,
        """
        mount --bind out out && mount -o remount,bind,ro out || exit 9
        $RUN > 1.out 2>&1; echo $? > 1.rc
    """,
    )
    assert code == "1", said
    assert "OutputUnwritable: " in said and "cannot be written (Read-only file system)" in said, said
    statuses = project.manifest_rows("SELECT status FROM runs ORDER BY started_at")
    assert statuses == [("succeeded",), ("failed",)]
    assert project.cli("run-now", "f").returncode == 0
    assert ids(project) == list(range(600))


def test_a_manifest_removed_under_a_run_is_one_line_not_a_new_manifest(project: Project) -> None:
    """The state_dir removed mid-run: the coordinator created an empty manifest at the next
    commit, then failed with a DuckDB traceback (`Table with name chunks does not exist!`)."""
    project.write_config(faulty_job("gate", "workers = 1"))
    project.write_input("a.parquet", 0, 300)
    process, go = gated(project, "a.parquet:100")
    shutil.rmtree(project.root / ".state")
    go.touch()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err, err
    assert f"manifest {project.root / '.state' / 'manifest.duckdb'} is gone" in err, err
    assert not (project.root / ".state" / "manifest.duckdb").exists()


def forkserver_pid() -> int:
    import multiprocessing.forkserver

    pid = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert pid
    return pid


def pending_connections(pid: int) -> int:
    """Connections waiting on the forkserver's listening socket (`ss`: its Recv-Q)."""
    import multiprocessing.forkserver

    address = multiprocessing.forkserver._forkserver._forkserver_address  # type: ignore[attr-defined]
    listed = subprocess.run(["ss", "-xlH", "src", address], capture_output=True, text=True).stdout.split()
    return int(listed[2]) if len(listed) > 2 else 0


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss to see the forkserver's socket")
def test_a_forkserver_killed_while_a_worker_starts_breaks_the_pool_not_the_command() -> None:
    """The forkserver killed while a worker was starting: `EOFError` escaped the pool, and the
    command ended in click's `Aborted!`, its run `crashed`. A new server is tried once; if the
    worker still cannot start, the pool is broken (the run fails, the next carries on)."""
    warm_up(duckdb=False)
    pid = forkserver_pid()
    os.kill(pid, signal.SIGSTOP)
    outcome: list[object] = []
    starting = threading.Thread(target=lambda: outcome.append(_pool_or_error()))
    starting.start()
    try:
        wait_for(lambda: pending_connections(pid) > 0, what="a worker asking the stopped forkserver")
    finally:
        os.kill(pid, signal.SIGKILL)
    starting.join(60)
    assert outcome and isinstance(outcome[0], WorkerPool | PoolBroken), outcome
    if isinstance(outcome[0], WorkerPool):  # a new server started it
        assert forkserver_pid() != pid
        outcome[0].terminate()


def _pool_or_error() -> object:
    try:
        return WorkerPool(1, None)
    except Exception as exc:  # noqa: BLE001 (the test says which)
        return exc


def test_a_low_open_files_limit_is_not_blamed_on_an_input(project: Project) -> None:
    """Hostile review: under `ulimit -n 26` a SQL job's worker asked for a descriptor number
    above the limit (each file is held under a number above all its DuckDB has seen): EINVAL,
    and the run failed blaming a readable input ("cannot be read (Invalid argument)")."""
    import resource

    for i in range(60):
        project.write_input(f"f{i:03d}.parquet", i * 10, 10)
    project.write_config('[jobs.j]\ninput = "data/*.parquet"\noutput = "out/j"\nsql = "SELECT * FROM chunk"')

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (26, 26))

    result = project.cli("run-now", "j", "-q", preexec_fn=limited)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.output_table("j")["id"].to_pylist()) == list(range(600))
