"""`minibatch daemon` as a real process: systemd notify over a real socket, catch-up,
dependencies, locks, reload on SIGHUP, graceful stop, Prometheus metrics, strict modes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from minibatch import validate
from minibatch.config import ConfigError
from minibatch.lock import job_lock
from minibatch.log import configure_logging
from minibatch.manifest import Manifest

from conftest import Project, wait_for, watch_stderr

ENV_JOB = """
import os
import pyarrow as pa

def notify_env(table, ctx):
    return pa.table({"notify": [os.environ.get("NOTIFY_SOCKET", "")]})
"""


class NotifySocket:
    """A stand-in for systemd's end of NOTIFY_SOCKET: collects every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def count(self, field: str) -> int:
        return sum(field in message.split("\n") for message in self.messages)


class Daemon:
    def __init__(self, project: Project, env: dict[str, str] | None = None) -> None:
        self.project = project
        self.notify = NotifySocket(project.root.parent / "notify.sock")
        extra = {"NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "200000", **(env or {})}
        self.process = project.start("daemon", env=extra)
        self.out = watch_stderr(self.process, "stdout")
        self.err = watch_stderr(self.process, "stderr")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.out) if line.startswith("{")]

    def wait_event(self, name: str, timeout: float = 30.0, **match: object) -> dict:
        def found() -> dict | None:
            for event in self.events():
                if event["event"] == name and all(event.get(k) == v for k, v in match.items()):
                    return event
            return None

        wait_for(lambda: found() is not None or self.process.poll() is not None, timeout, what=name)
        event = found()
        assert event is not None, f"daemon exited without {name}: {''.join(self.err)}"
        return event

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(project: Project, jobs: str, port: int | None = None) -> None:
    metrics = f'metrics_addr = "127.0.0.1:{port}"' if port else 'metrics_addr = ""'
    project.write_config(jobs, engine=metrics)


def seed_last_fire(project: Project, job: str, hours_ago: float) -> None:
    Manifest(project.root / ".state" / "manifest.duckdb").record_fire(
        job, datetime.now(UTC) - timedelta(hours=hours_ago)
    )


def runs(project: Project) -> list[tuple]:
    con = __import__("duckdb").connect(str(project.root / ".state" / "manifest.duckdb"), read_only=True)
    try:
        return con.execute(
            "SELECT job, status, started_at, ended_at FROM runs ORDER BY started_at"
        ).fetchall()
    finally:
        con.close()


HOURLY = """
[jobs.{name}]
input = "data/*.parquet"
output = "out/{name}"
process = "myjobs.basic:ident"
schedule = "0 * * * *"
{extra}
"""


def hourly(name: str, extra: str = "") -> str:
    return HOURLY.format(name=name, extra=extra)


def test_notify_protocol_reload_and_stop(project: Project) -> None:
    project.write_input("a.parquet", 0, 200)
    (project.root / "myjobs" / "envjob.py").write_text(ENV_JOB)
    config(project, hourly("a") + '[jobs.env]\ninput = "data/*.parquet"\noutput = "out/env"\n'
           'process = "myjobs.envjob:notify_env"\nschedule = "0 0 1 1 *"\n')  # fmt: skip
    seed_last_fire(project, "env", hours_ago=24 * 400)  # missed: caught up at start
    daemon = Daemon(project)
    try:
        wait_for(lambda: daemon.notify.count("READY=1") >= 1, what="READY=1")
        assert any(m.startswith("READY=1\nSTATUS=") for m in daemon.notify.messages)
        wait_for(lambda: daemon.notify.count("WATCHDOG=1") >= 4, timeout=10, what="watchdog pings")
        daemon.wait_event("run_finished", job="env")
        notify = project.output_table("env").column("notify").to_pylist()
        assert notify == [""]  # the workers never saw NOTIFY_SOCKET

        good = (project.root / "config.toml").read_text()
        (project.root / "config.toml").write_text(good + "\n[jobs.bad]\nbogus = 1\n")
        daemon.process.send_signal(signal.SIGHUP)
        rejected = daemon.wait_event("reload_rejected")
        assert any("jobs.bad.bogus: unknown key" in e for e in rejected["errors"])
        assert daemon.process.poll() is None  # the old config keeps running
        # (the notification and the log line travel apart: a socket and a pipe)
        wait_for(lambda: daemon.notify.count("RELOADING=1") == 1, timeout=10, what="RELOADING=1")

        (project.root / "config.toml").write_text(good + hourly("c"))
        daemon.process.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_event("config_reloaded")
        assert reloaded["jobs"] == ["a", "c", "env"]
        wait_for(lambda: daemon.notify.count("READY=1") >= 3, what="READY=1 after reloads")
    finally:
        code = daemon.stop()
    assert code == 0
    wait_for(
        lambda: daemon.notify.count("STOPPING=1") == 1, timeout=10, what="STOPPING=1"
    )  # the pump's thread may lag


def test_catch_up_runs_a_missed_job_once_or_skips_it(project: Project) -> None:
    project.write_input("a.parquet", 0, 200)
    config(project, hourly("once") + hourly("skip", 'catchup = "skip"') + hourly("fresh"))
    seed_last_fire(project, "once", hours_ago=5)  # five missed hourly fires: one run
    seed_last_fire(project, "skip", hours_ago=5)
    daemon = Daemon(project)
    try:
        daemon.wait_event("run_finished", job="once")
        daemon.wait_event("missed_runs_skipped", job="skip")
    finally:
        assert daemon.stop() == 0
    assert [r[0] for r in runs(project)] == ["once"]  # 'fresh' has no history: nothing missed
    last = Manifest(project.root / ".state" / "manifest.duckdb").last_fires()
    assert set(last) == {"once", "skip", "fresh"}
    assert last["skip"] > datetime.now(UTC) - timedelta(minutes=5)


def test_dependent_job_waits_for_its_dependency_to_succeed(project: Project) -> None:
    project.write_input("a.parquet", 0, 300)
    failing = hourly("broken", "retries = 0\nbreaker_failures = 0").replace(
        "basic:ident", "faulty:always_fail"
    )
    jobs = (
        hourly("first", "depends_on = []")
        + hourly("second", 'depends_on = ["first"]')
        + failing
        + hourly("blocked", 'depends_on = ["broken"]')
    )
    config(project, jobs)
    for name in ("first", "second", "broken", "blocked"):
        seed_last_fire(project, name, hours_ago=2)
    daemon = Daemon(project, env={"MB_SLEEP": "0.05"})
    try:
        daemon.wait_event("run_finished", job="second")
        daemon.wait_event("run_finished", job="broken")
        daemon.wait_event("waiting_for_dependencies", job="blocked")
    finally:
        assert daemon.stop() == 0
    history = {job: (status, started, ended) for job, status, started, ended in runs(project)}
    assert history["first"][0] == "succeeded"
    assert history["second"][1] > history["first"][2]  # started after its dependency ended
    assert history["broken"][0] == "failed"
    assert "blocked" not in history


def test_a_dependency_running_again_or_failed_since_its_success_is_not_met(project: Project) -> None:
    """Hostile review: the rule asked only for a success since the job's last start, so a job
    fired while its dependency rebuilt its output (a changed definition, `--fresh`) read the
    half-rebuilt output and published a run of 600 of 1,100 rows as succeeded."""
    import time

    from minibatch.config import load_config
    from minibatch.depends import unmet_dependencies
    from minibatch.records import RunRecord
    from minibatch.states import RunStatus

    config(project, hourly("up") + hourly("down", 'depends_on = ["up"]'))
    loaded = load_config(project.root / "config.toml")
    manifest = Manifest(project.root / ".state" / "manifest.duckdb")
    now = time.time()

    def record(run_id: str, job: str, started: float, status: RunStatus) -> None:
        run = RunRecord(run_id=run_id, job=job, pid=os.getpid(), started_at=now + started)
        manifest.start_run(run)
        if status != RunStatus.RUNNING:
            run.status, run.ended_at = status, now + started + 1
            manifest.commit(run, [])

    def unmet() -> list[str]:
        return unmet_dependencies(loaded, manifest, loaded.jobs["down"], {})

    record("d1", "down", 0, RunStatus.SUCCEEDED)
    record("u1", "up", 10, RunStatus.SUCCEEDED)
    assert unmet() == []
    record("u2", "up", 20, RunStatus.RUNNING)  # rebuilding its output right now
    assert unmet() == ["up"]
    for status in (RunStatus.FAILED, RunStatus.STOPPED):
        record(f"u3-{status}", "up", 30, status)
        assert unmet() == ["up"]
    record("u4", "up", 40, RunStatus.SUCCEEDED)
    assert unmet() == []
    record("u5", "up[region=us]", 50, RunStatus.FAILED)  # another parameter set's failure
    assert unmet() == []


def test_a_restarted_daemon_resumes_a_run_the_last_one_left_unfinished(project: Project) -> None:
    """Hostile review: a run stopped by the daemon's SIGTERM (or cut short by its death) was
    left for the job's next fire: a daily job stayed at 200 of 1,000 rows until the next day.
    It is fired once when the daemon starts; a job whose last run finished is not."""
    import time

    from minibatch.records import RunRecord
    from minibatch.states import RunStatus

    project.write_input("a.parquet", 0, 200)
    config(project, hourly("s") + hourly("c") + hourly("done"))
    manifest = Manifest(project.root / ".state" / "manifest.duckdb")
    for name, status in (("s", RunStatus.STOPPED), ("c", RunStatus.RUNNING), ("done", RunStatus.SUCCEEDED)):
        seed_last_fire(project, name, hours_ago=0)  # nothing missed: no catch-up
        run = RunRecord(run_id=f"{name}1", job=name, pid=os.getpid(), started_at=time.time() - 60)
        manifest.start_run(run)
        if status != RunStatus.RUNNING:  # "c": its process died mid-run
            run.status, run.ended_at = status, time.time() - 50
            manifest.commit(run, [])
    daemon = Daemon(project)
    try:
        fired = [daemon.wait_event("run_fired", job=name) for name in ("s", "c")]
        wait_for(lambda: sum(e["event"] == "run_finished" for e in daemon.events()) == 2, what="both runs")
        second = project.cli(
            "daemon", timeout=60
        )  # a second daemon on the same state_dir fired everything twice
        assert second.returncode == 3 and "already running" in second.stderr, second.stderr
    finally:
        assert daemon.stop() == 0
    assert [f["reason"] for f in fired] == ["resume", "resume"]
    for name in ("s", "c"):
        assert sorted(project.output_table(name).column("id").to_pylist()) == list(range(200))
    assert not project.out("done").exists()


def test_a_locked_job_is_skipped_not_queued(project: Project) -> None:
    project.write_input("a.parquet", 0, 200)
    config(project, hourly("a"))
    seed_last_fire(project, "a", hours_ago=2)
    with job_lock(project.root / ".state", "a"):
        daemon = Daemon(project)
        try:
            skipped = daemon.wait_event("run_skipped_locked", job="a")
        finally:
            assert daemon.stop() == 0
    assert skipped["holder_pid"] == os.getpid()
    assert runs(project) == []


def test_sigterm_mid_run_stops_it_gracefully_and_serves_metrics(project: Project) -> None:
    for i in range(3):
        project.write_input(f"f{i}.parquet", i * 1000, 1000)
    port = free_port()
    config(project, hourly("slow", 'chunk_bytes = "5KB"').replace("basic:ident", "faulty:slow"), port)
    seed_last_fire(project, "slow", hours_ago=2)
    daemon = Daemon(project, env={"MB_SLEEP": "0.1"})
    try:
        wait_for(lambda: len(project.computations()) >= 4, what="chunks to run")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'minibatch_chunks_total{job="slow",status="done"}' in scrape
        assert 'minibatch_running{job="slow"} 1.0' in scrape
    finally:
        code = daemon.stop()
    assert code == 0
    wait_for(
        lambda: daemon.notify.count("STOPPING=1") == 1, timeout=10, what="STOPPING=1"
    )  # the pump's thread may lag
    (status,) = [r[1] for r in runs(project)]
    assert status == "stopped"


def test_refuses_a_config_writable_by_others(project: Project) -> None:
    project.write_input("a.parquet", 0, 100)
    config(project, hourly("a"))
    (project.root / "config.toml").chmod(0o666)
    result = project.cli("daemon", timeout=30)
    assert result.returncode == 2
    assert "writable by group or others" in result.stderr and "chmod go-w" in result.stderr
    (project.root / "config.toml").chmod(0o644)
    (project.root / "myjobs" / "basic.py").chmod(0o664)
    result = project.cli("daemon", timeout=30)
    assert result.returncode == 2
    assert "basic.py is writable by group or others" in result.stderr


WATCHED = (
    '[jobs.w]\ninput = "data/*.parquet"\noutput = "out/w"\nprocess = "myjobs.basic:ident"\nwatch = "200ms"\n'
)


def test_watch_fires_for_files_that_came_while_no_daemon_ran(project: Project) -> None:
    """Hostile review: a watched job took the inputs as its daemon found them at start for its
    baseline: a file that landed while the daemon was down (a restart, an upgrade) was never
    processed, until another file changed. Its runs' inputs are the baseline."""
    project.write_input("a.parquet", 0, 100)
    config(project, WATCHED)
    assert project.cli("run-now", "w").returncode == 0
    project.write_input("b.parquet", 100, 100)  # while no daemon runs
    daemon = Daemon(project)
    try:
        assert daemon.wait_event("run_fired", job="w")["reason"] == "inputs changed"
        daemon.wait_event("run_finished", job="w")
    finally:
        assert daemon.stop() == 0
    assert sorted(project.output_table("w").column("id").to_pylist()) == list(range(200))


def test_watch_runs_the_job_when_inputs_change_and_settle(project: Project) -> None:
    """And a change met by a run elsewhere (`run-now` holding the job's lock) is fired again
    once the lock is free: it was counted as handled, and the new file never processed."""
    project.write_input("a.parquet", 0, 100)
    config(project, WATCHED)
    assert project.cli("run-now", "w").returncode == 0  # a.parquet read: no change for the daemon
    daemon = Daemon(project)

    def finished() -> int:
        return sum(e["event"] == "run_finished" and e.get("job") == "w" for e in daemon.events())

    try:
        daemon.wait_event("daemon_started")
        project.write_input("b.parquet", 100, 100)
        fired = daemon.wait_event("run_fired", job="w")
        assert fired["reason"] == "inputs changed"
        wait_for(lambda: finished() == 1, what="the first run")
        with job_lock(project.root / ".state", "w"):
            project.write_input("c.parquet", 200, 100)
            daemon.wait_event("run_skipped_locked", job="w")
        wait_for(lambda: finished() == 2, what="the change fired again")
    finally:
        assert daemon.stop() == 0
    assert sorted(project.output_table("w").column("id").to_pylist()) == list(range(300))


def test_metrics_port_in_use_is_a_config_error(project: Project) -> None:
    project.write_input("a.parquet", 0, 100)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config(project, hourly("a"), busy.getsockname()[1])
        result = project.cli("daemon", timeout=30)
    assert result.returncode == 2
    assert "minibatch.metrics_addr: cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_watched_jobs_baseline_holds_its_bad_files(project: Project) -> None:
    """Second review: a known bad file has no chunk records, so the baseline lacked it and each
    daemon start fired the job for nothing (and its on_success hook)."""
    from minibatch.config import load_config
    from minibatch.inputs import input_signature
    from minibatch.manifest import Manifest
    from minibatch.reconcile import inputs_read

    project.write_input("a.parquet", 0, 100)
    (project.data / "bad.parquet").write_bytes(b"not parquet")
    config(project, WATCHED)
    assert project.cli("run-now", "w").returncode == 1  # the new bad file fails it
    loaded = load_config(project.root / "config.toml")
    read = inputs_read(Manifest(project.root / ".state" / "manifest.duckdb"), "w")
    assert set(read) == set(input_signature(loaded.base_dir, loaded.jobs["w"].inputs))


def test_a_reload_keeps_the_state_dir_and_a_state_dir_gone_stops_the_daemon(project: Project) -> None:
    """Hostile review (session 19): a reload that moved state_dir was taken half-way (runs wrote
    the new manifest, dependencies were read from the old one: a dependent ran on a failed
    dependency); with its state_dir removed, a daemon fired into nothing, its log not saying
    why, and a second daemon could start beside it. Now it stops (exit 1: systemd restarts it)."""
    project.write_input("a.parquet", 0, 200)
    config(project, hourly("a"))
    daemon = Daemon(project)
    try:
        daemon.wait_event("daemon_started")
        good = (project.root / "config.toml").read_text()
        (project.root / "config.toml").write_text(
            good.replace('state_dir = ".state"', 'state_dir = ".state2"')
        )
        daemon.process.send_signal(signal.SIGHUP)
        rejected = daemon.wait_event("reload_rejected")
        assert any(error.startswith("minibatch.state_dir: ") for error in rejected["errors"]), rejected
        (project.root / "config.toml").write_text(good)
        shutil.rmtree(project.root / ".state")
        daemon.process.send_signal(signal.SIGHUP)  # a wake-up (else it looks within a minute)
        assert daemon.wait_event("state_dir_gone")["state_dir"] == str(project.root / ".state")
        assert daemon.process.wait(timeout=60) == 1
    finally:
        if daemon.process.poll() is None:
            daemon.stop()


def test_a_job_module_that_hangs_when_imported_is_a_rejected_reload(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review (session 19): the reload's check ran 120 s, then its TimeoutExpired took
    the daemon down with a traceback (and the daemon heard no SIGTERM meanwhile)."""
    monkeypatch.setattr(validate, "VALIDATE_TIMEOUT", 2.0)
    (project.root / "myjobs" / "hangs.py").write_text("import time\ntime.sleep(600)\n")
    config(project, hourly("a").replace("myjobs.basic:ident", "myjobs.hangs:f"))
    with pytest.raises(ConfigError, match=r"checking the config took over 2s \(a job module that hangs"):
        validate.validate_in_fresh_process(str(project.root / "config.toml"))


def test_a_library_error_logged_with_its_exception_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    """Hostile review (session 19): APScheduler's "Job ... raised an exception" came without the
    exception: a daemon whose fires all failed never said why."""
    configure_logging("json")
    try:
        raise ValueError("the reason")
    except ValueError:
        logging.getLogger("apscheduler.executors.default").exception("Job raised an exception")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "Job raised an exception" and "ValueError: the reason" in line["exception"]


def test_a_reload_with_the_state_dir_spelled_otherwise_moves_nothing(project: Project) -> None:
    """Hostile review of the state_dir rule: the same directory spelled another way (through a
    symlink, absolute for relative) was a rejected reload."""
    config(project, hourly("a"))
    (project.root.parent / "link").symlink_to(project.root)
    reloaded = validate.reload_config(
        str(project.root / "config.toml"), project.root.parent / "link" / ".state"
    )
    assert reloaded.engine.state_dir.resolve() == (project.root / ".state").resolve()


DATED = """
[jobs.daily]
input = "landing/{date}/*.parquet"
output = "out/daily/{date}"
process = "myjobs.basic:ident"
schedule = "0 0 * * *"
workers = 1
"""


def test_a_dated_fire_is_not_lost_when_the_daemon_dies_before_its_run(project: Project) -> None:
    """Review: a dated job's fire that waited for the job's worker slots (another date of it
    ran) was recorded in schedule_state but had no run yet; SIGKILLed then, the restarted daemon
    neither caught it up nor resumed it, and history showed nothing: the date was never run."""
    import time

    from minibatch.lock import worker_slots

    date = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()  # the latest ended interval
    (project.root / "landing" / date).mkdir(parents=True)
    project.write_input(f"../landing/{date}/a.parquet", 0, 200)
    config(project, DATED)
    seed_last_fire(project, "daily", hours_ago=72)  # missed: caught up at start
    state = project.root / ".state"
    with worker_slots(state, "daily", 1, 1, lambda: False):  # another date of the job runs
        daemon = Daemon(project)
        daemon.wait_event("run_fired", job="daily", reason="catch-up")
        time.sleep(0.5)  # let it reach the slots it waits for: nothing may be lost at any point
        os.killpg(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(timeout=30)
    daemon.notify.sock.close()
    daemon.notify.path.unlink()
    assert Manifest(state / "manifest.duckdb").runs(f"daily[date={date}]") == []  # it never began
    daemon = Daemon(project)
    try:
        daemon.wait_event("run_finished", job="daily", timeout=30)
    finally:
        assert daemon.stop() == 0
    table = project.output_table(f"daily/{date}")
    assert sorted(table.column("id").to_pylist()) == list(range(200))
    assert project.manifest_rows("SELECT count(*) FROM waiting_fires") == [(0,)]
