"""`depends_on` in the daemon, in-process: a real manifest, real runs, the daemon's own
`fire` (its scheduler not started; what it would hand a thread runs at once here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from minibatch.config import load_config
from minibatch.control import Active
from minibatch.daemon import Daemon
from minibatch.manifest import Manifest
from minibatch.records import RunRecord
from minibatch.runner import RunOptions
from minibatch.signals import CANCELLED, StopSignals
from minibatch.states import RunStatus

from conftest import Project, wait_for

JOBS = """
[jobs.up]
input = "data/*.parquet"
output = "out/up"
process = "myjobs.basic:ident"
schedule = "{schedule}"
{up}
[jobs.down]
input = "data/*.parquet"
output = "out/down"
process = "myjobs.basic:ident"
schedule = "{schedule}"
depends_on = ["up"]
{down}
"""


def daemon(project: Project, schedule: str = "0 * * * *", up: str = "", down: str = "") -> Daemon:
    project.write_input("a.parquet", 0, 100)
    project.write_config(JOBS.format(schedule=schedule, up=up, down=down))
    path = project.root / "config.toml"
    found = Daemon(load_config(path), str(path))
    found.submit = lambda target, *args: target(*args)  # type: ignore[method-assign]
    return found


def record(manifest: Manifest, run_id: str, job: str, started: float, status: RunStatus) -> None:
    run = RunRecord(run_id=run_id, job=job, pid=os.getpid(), started_at=started)
    manifest.start_run(run)
    if status != RunStatus.RUNNING:
        run.status, run.ended_at = status, started + 1
        manifest.commit(run, [])


def statuses(d: Daemon, job: str) -> list[str]:
    return [r["status"] for r in d.manifest.runs(job)]


def test_a_dependency_whose_fire_of_this_minute_has_not_begun_is_waited_for(project: Project) -> None:
    """Hostile review: fired in the same minute as its dependency (two `0 2 * * *` jobs), the
    dependent checked the manifest before the dependency's run had begun, saw its success of
    the day before and ran beside it on half its output: 'succeeded', a day's rows short, every day."""
    d = daemon(project, schedule="* * * * *")
    # all in one minute: past its end, the next minute's fire of `up` is the one waited for
    wait_for(lambda: datetime.now(UTC).second < 50, timeout=15, what="a minute with time left")
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    record(d.manifest, "u0", "up", time.time() - 70, RunStatus.SUCCEEDED)  # the last minute's success
    d.manifest.record_fire("up", minute - timedelta(seconds=59.96))  # its fire of that minute
    assert d.fire("down")  # this minute's fire: `up`'s has not begun yet
    assert statuses(d, "down") == []  # not run beside the dependency's coming run
    assert [key[0] for key in d.waiting] == ["down"]
    assert d.fire("up")  # its run ends: the waiting dependent goes
    assert statuses(d, "up")[0] == "succeeded" and statuses(d, "down") == ["succeeded"]
    assert d.waiting == {}
    from minibatch.depends import busy_dependencies

    d.manifest.record_fire("up", minute - timedelta(seconds=59.96))
    down, nothing = d.config.jobs["down"], set
    assert busy_dependencies(d.config, d.manifest, down, nothing, minute + timedelta(seconds=50)) == {"up"}
    # a fire time long gone unrecorded was skipped (its run of an earlier fire went on, the daemon
    # was suspended): waiting for it would wait for the next
    assert busy_dependencies(d.config, d.manifest, down, nothing, minute + timedelta(seconds=70)) == set()


def test_a_dependency_running_in_the_daemon_before_its_row_exists_is_waited_for(project: Project) -> None:
    d = daemon(project)
    record(d.manifest, "u0", "up", time.time() - 7200, RunStatus.SUCCEEDED)
    d.active.add("r1", Active("up", StopSignals()))  # accepted or begun, no `running` row yet
    assert d.fire("down")
    assert statuses(d, "down") == []
    d.active.remove("r1")
    d.fire("up")
    assert statuses(d, "down") == ["succeeded"]


def test_a_stopped_or_crashed_dependent_resumes_without_waiting(project: Project) -> None:
    """Hostile review: the restarted daemon's resume fire of a dependent whose run was stopped
    waited for the dependency to succeed again (a day), its output half-built meanwhile."""
    d = daemon(project)
    config = d.config
    from minibatch.depends import unmet_dependencies

    def unmet() -> list[str]:
        return unmet_dependencies(config, d.manifest, config.jobs["down"], {})

    start = time.time() - 1000
    record(d.manifest, "d0", "down", start, RunStatus.SUCCEEDED)
    record(d.manifest, "u1", "up", start + 10, RunStatus.SUCCEEDED)
    for i, status in enumerate((RunStatus.STOPPED, RunStatus.CRASHED, RunStatus.RUNNING)):
        record(d.manifest, f"d{i + 1}", "down", start + 20 + i, status)  # began on u1's output
        assert unmet() == []
    record(d.manifest, "d9", "down", start + 30, RunStatus.FAILED)  # finished with it: wait again
    assert unmet() == ["up"]


def test_each_dated_fire_waits_for_its_own_date(project: Project) -> None:
    """Hostile review: a dated fire waiting for its dependency was replaced by the next day's
    fire: that logical date never ran, and nothing said so."""
    d = daemon(project, schedule="0 2 * * *")
    dated = JOBS.format(schedule="0 2 * * *", up="", down="").replace('out/up"', 'out/up/{date}"')
    project.write_config(dated.replace('out/down"', 'out/down/{date}"'))
    d.config = load_config(project.root / "config.toml")
    day = datetime(2026, 11, 28, 2, 0, 0, 50_000, tzinfo=UTC)
    for n in range(2):
        d.fire("down", now=day + timedelta(days=n))
    assert sorted(params["date"] for params in d.waiting.values()) == ["2026-11-27", "2026-11-28"]


def test_a_paused_job_waiting_for_its_dependencies_is_not_released(project: Project) -> None:
    d = daemon(project)
    d.fire("down")  # `up` never succeeded: waits
    assert len(d.waiting) == 1
    d.control.pause("down", True)
    d.fire("up")
    assert statuses(d, "up") == ["succeeded"]
    assert statuses(d, "down") == [] and d.waiting == {}


def test_list_says_a_paused_job_fires_no_more(project: Project) -> None:
    """Hostile review: `list` showed a paused job's next fire time (the API said none)."""
    import json

    d = daemon(project)
    d.control.pause("down", True)
    listed = {row["job"]: row["next"] for row in json.loads(project.cli("list", "--json").stdout)}
    assert listed["down"] == "paused" and listed["up"] != "paused"
    assert "paused" in project.cli("list").stdout


def test_a_fire_waiting_for_its_dependencies_outlives_a_daemon_restart(project: Project) -> None:
    """A dated fire waiting for its dependency was kept in memory only: a restart (an upgrade, a
    reboot) lost it, and that date never ran, silently."""
    d = daemon(project)
    d.fire("down")  # `up` never succeeded
    waiting = dict(d.waiting)
    assert len(waiting) == 1
    restarted = daemon(project)
    restarted.restore_waiting()
    assert restarted.waiting == waiting
    restarted.fire("up")
    assert statuses(restarted, "down") == ["succeeded"] and restarted.waiting == {}
    again = daemon(project)
    again.restore_waiting()
    assert again.waiting == {}  # released for good, not again after the next restart


def test_a_dependency_waiting_for_its_own_dependency_is_about_to_run(project: Project) -> None:
    """Hostile review: with A -> B -> C fired in the same minute, B waiting for A was not
    counted as about to run: C ran at once on B's output of the day before."""
    top = '[jobs.top]\ninput = "data/*.parquet"\noutput = "out/top"\nprocess = "myjobs.basic:ident"\n'
    d = daemon(project)
    project.write_config(JOBS.format(schedule="0 * * * *", up='depends_on = ["top"]', down="") + top)
    d.config = load_config(project.root / "config.toml")
    record(d.manifest, "u0", "up", time.time() - 100, RunStatus.SUCCEEDED)
    d.fire("up")  # waits for `top`, which never ran
    d.fire("down")
    assert statuses(d, "down") == [] and ("down", "{}") in d.waiting


def test_a_parameter_set_of_the_dependency_running_elsewhere_is_not_met(project: Project) -> None:
    """Hostile review: only the bare name's lock was asked; a parameter set's run (`run-now up
    --param region=us` in a shell) holds `up[region=us]`'s lock, and the dependent ran beside it."""
    from minibatch.lock import job_lock

    d = daemon(project)
    project.write_config(
        JOBS.format(schedule="0 * * * *", up='params = { region = "eu" }', down="").replace(
            'output = "out/up"\n', 'output = "out/up/{region}"\n'
        )
    )
    d.config = load_config(project.root / "config.toml")
    record(d.manifest, "u0", "up[region=eu]", time.time() - 100, RunStatus.SUCCEEDED)
    with job_lock(project.root / ".state", "up[region=us]"):
        d.fire("down")
        assert statuses(d, "down") == []
    d.fire("up")  # (any run's end releases it)
    assert statuses(d, "down") == ["succeeded"]


def test_a_fire_skipped_while_the_dependencys_run_goes_on_is_not_waited_for(project: Project) -> None:
    """Hostile review: a dependency's run outlasting its next fire time had that fire skipped
    by APScheduler, unrecorded: for a minute after it the dependency looked about to run, and a
    dependent released meanwhile waited for its next fire (an hour, a day)."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent

    d = daemon(project, schedule="* * * * *")
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    record(d.manifest, "u0", "up", time.time() - 100, RunStatus.SUCCEEDED)
    d.manifest.record_fire("up", minute - timedelta(seconds=59.96))
    d.skipped(JobSubmissionEvent(EVENT_JOB_MAX_INSTANCES, "cron:up", "default", [minute]))
    d.fire("down")
    assert statuses(d, "down") == ["succeeded"]


def test_a_waiting_fire_is_released_once_by_two_runs_ending_together(project: Project) -> None:
    import threading

    d = daemon(project)
    record(d.manifest, "u0", "up", time.time() - 100, RunStatus.SUCCEEDED)
    d.waiting[("down", "{}")] = {}
    submitted: list[str] = []
    together = threading.Barrier(2)
    unmet = d._unmet

    def both_check(*args: Any) -> list[str]:
        found = unmet(*args)
        together.wait(timeout=10)  # both threads have found it met before either takes it
        return found

    d._unmet = both_check  # type: ignore[method-assign]
    d.submit = lambda target, *args: submitted.append(args[0])  # type: ignore[method-assign]
    threads = [threading.Thread(target=d._release_waiting) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert submitted == ["down"]


def test_a_chain_released_at_once_runs_one_link_at_a_time(project: Project) -> None:
    """Hostile review: A -> B -> C, B and C waiting: A's end released B (handed to the pool) and,
    in the same pass, C, since B was then neither waiting nor running: C read B's output while
    B rebuilt it."""
    job = '[jobs.{}]\ninput = "data/*.parquet"\noutput = "out/{}"\nprocess = "myjobs.basic:ident"\n'
    d = daemon(project)
    chain = job.format("a", "a") + job.format("b", "b") + 'depends_on = ["a"]\n'
    project.write_config(chain + job.format("c", "c") + 'depends_on = ["b"]\n')
    d.config = load_config(project.root / "config.toml")
    record(d.manifest, "b0", "b", time.time() - 100, RunStatus.SUCCEEDED)  # yesterday's `b`
    handed: list[Any] = []
    d.submit = lambda target, *args: handed.append((target, args))  # type: ignore[method-assign]
    d.fire("b")  # waits for `a`
    d.fire("c")  # waits for `b`
    d.fire("a")  # runs; its end releases `b` only
    assert [args[0] for _, args in handed] == ["b"]
    target, args = handed.pop()
    target(*args)  # the pool runs `b`; its end releases `c`
    assert [args[0] for _, args in handed] == ["c"]


def test_a_dependency_done_while_the_daemon_stops_leaves_the_fire_for_the_next(project: Project) -> None:
    """Hostile review: a fire released while the daemon stopped was dropped from the manifest but
    not run: that date never ran."""
    d = daemon(project)
    d.fire("down")  # `up` never succeeded
    assert project.cli("run-now", "up", "-q").returncode == 0  # (a run the stop let finish)
    d.stopping = True
    d._release_waiting()  # as that run's end does
    restarted = daemon(project)
    restarted.restore_waiting()
    assert list(restarted.waiting) == [("down", "{}")]


def test_a_waiting_fire_met_by_a_run_outside_the_daemon_is_released_by_the_periodic_check(
    project: Project,
) -> None:
    """Hostile review: met by a `run-now` in a shell (or a reload dropping the dependency, or a
    restart), a waiting fire waited for some run in the daemon to end: a day, for daily jobs."""
    d = daemon(project)
    d.fire("down")
    assert project.cli("run-now", "up", "-q").returncode == 0
    assert statuses(d, "down") == []
    d._refresh_metrics(release=True)  # every METRICS_REFRESH seconds
    assert statuses(d, "down") == ["succeeded"]


def test_a_fire_released_while_its_own_run_goes_on_waits_for_that_run(project: Project) -> None:
    """Released while a run of its own parameter set held the job's lock, the fire was skipped,
    waited again, and was released again at once: round and round until that run ended."""
    from minibatch.lock import job_lock

    d = daemon(project)
    d.fire("down")
    with job_lock(project.root / ".state", "down"):  # `run-now down` in a shell
        d.fire("up")  # met: but `down` runs already
        assert statuses(d, "up") == ["succeeded"] and list(d.waiting) == [("down", "{}")]
    d._refresh_metrics(release=True)
    assert statuses(d, "down") == ["succeeded"]


def test_a_lock_held_by_a_process_this_namespace_cannot_see_is_held(project: Project) -> None:
    """Hostile review: a daemon in a container (another PID namespace) did not see a run holding
    a job's lock from the host or another container: /proc/locks leaves such a lock out. A
    released fire met JobLocked, waited, and was released again at once, round and round; a
    dependency so running was not "busy"."""
    from minibatch.lock import job_lock

    state = project.root / ".state"
    code = "import sys; from pathlib import Path; from minibatch.lock import lock_held; "
    code += "print(lock_held(Path(sys.argv[1]), 'down'))"
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    try:
        subprocess.run([*unshare, "true"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no new PID namespace here (unshare needs CAP_SYS_ADMIN)")
    with job_lock(state, "down"):
        seen = subprocess.run(
            [*unshare, sys.executable, "-c", code, str(state)], capture_output=True, text=True
        )
    assert seen.stdout.strip() == "True", seen.stderr


def test_a_probe_of_a_lock_makes_no_run_fail(project: Project) -> None:
    """`lock_held` takes the lock shared for an instant: a run starting in that instant waits it
    out rather than exiting 3."""
    import fcntl
    import threading

    from minibatch.lock import job_lock, lock_path

    state = project.root / ".state"
    with job_lock(state, "down"):
        pass  # the lock file exists
    probe = os.open(lock_path(state, "down"), os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.015, os.close, [probe]).start()  # a probe lasting far longer than any does
    with job_lock(state, "down"):
        pass


def released(project: Project) -> tuple[Daemon, Any]:
    """A daemon whose waiting `down` was released (its `up` succeeded in a shell) into a pool
    whose threads are all busy; and what starts it once one is free."""
    d = daemon(project)
    d.fire("down")
    assert project.cli("run-now", "up", "-q").returncode == 0
    queued: list[Any] = []
    d.submit = lambda target, *args: queued.append((target, args))  # type: ignore[method-assign]
    d._refresh_metrics(release=True)
    ((target, args),) = queued
    assert args[0] == "down"
    return d, lambda: target(*args)


def test_a_released_fire_checks_its_dependencies_again_when_it_starts(project: Project) -> None:
    """Hostile review: released, the fire waited in the pool's queue (all threads busy) and then
    started without a second look, beside a run of its dependency begun meanwhile."""
    d, start = released(project)
    d.active.add("u2", Active("up", StopSignals()))  # `up` begins again before `down` gets a thread
    start()
    assert statuses(d, "down") == [] and list(d.waiting) == [("down", "{}")]


def test_a_waiting_fire_that_cannot_be_checked_holds_up_no_other(project: Project) -> None:
    """Hostile review: one waiting fire whose check raised (a dependency that no longer binds
    after a reload: another parameter without a default) stopped the release of every waiting
    fire sorted after it."""
    broken = (
        '[jobs.alpha]\ninput = "data/*.parquet"\noutput = "out/alpha/{date}"\n'
        'process = "myjobs.basic:ident"\nschedule = "0 2 * * *"\ndepends_on = ["up2"]\n'
        '[jobs.up2]\ninput = "data/*.parquet"\noutput = "out/up2/{date}/{region}"\n'
        'process = "myjobs.basic:ident"\n'
    )
    d = daemon(project)
    project.write_config(JOBS.format(schedule="0 * * * *", up="", down="") + broken)
    d.config = load_config(project.root / "config.toml")
    d.fire("down")
    d.waiting[("alpha", '{"date": "2026-11-29"}')] = {"date": "2026-11-29"}  # sorted first
    assert project.cli("run-now", "up", "-q").returncode == 0
    d._refresh_metrics(release=True)
    assert statuses(d, "down") == ["succeeded"]
    assert ("alpha", '{"date": "2026-11-29"}') in d.waiting


def test_a_released_fire_whose_second_check_fails_waits_on(project: Project) -> None:
    """Hostile review: the check a released fire makes when it starts raised (the manifest held
    by another process past its deadline): the fire was neither run nor waiting any more."""
    d, start = released(project)
    unmet = d._unmet

    def busy(*given: Any) -> list[str]:
        raise OSError("the manifest is busy")

    d._unmet = busy  # type: ignore[method-assign]
    start()
    assert list(d.waiting) == [("down", "{}")] and statuses(d, "down") == []
    d._unmet = unmet  # type: ignore[method-assign]
    d.submit = lambda target, *args: target(*args)  # type: ignore[method-assign]
    d._refresh_metrics(release=True)
    assert statuses(d, "down") == ["succeeded"]


def test_a_run_refused_for_a_broken_job_module_is_recorded_failed_and_counted(project: Project) -> None:
    """Review: a job module broken by a deploy after the daemon started: each fire died before
    it was recorded, a traceback in the journal only. History, the API and the failed-runs
    alert saw nothing (no run row, minibatch_runs_total{status="failed"} stayed 0)."""
    d = daemon(project)
    (project.root / "myjobs" / "basic.py").write_text("raise RuntimeError('half-deployed')\n")
    d.fire("up")
    [run] = d.manifest.runs("up")
    assert run["status"] == RunStatus.FAILED
    assert "jobs.up.process" in run["error"] and "half-deployed" in run["error"]
    assert d.metrics.registry.get_sample_value("minibatch_runs_total", {"job": "up", "status": "failed"}) == 1


def test_a_crashed_run_is_counted_and_no_longer_running_in_the_metrics() -> None:
    """Review: a run that broke after it began emits run_ended, not run_finished: the metrics
    never counted it, and minibatch_running stayed 1."""
    from minibatch.events import Emitter
    from minibatch.metrics import Metrics
    from minibatch.states import EventKind

    metrics = Metrics()
    events = Emitter([metrics]).bind("up", "r1")
    events(EventKind.RUN_STARTED, workers=1, memory_limit=1 << 20)
    record = RunRecord(
        run_id="r1", job="up", pid=os.getpid(), started_at=time.time(), status=RunStatus.CRASHED
    )
    events(EventKind.RUN_ENDED, record=record)
    sample = metrics.registry.get_sample_value
    assert sample("minibatch_running", {"job": "up"}) == 0
    assert sample("minibatch_runs_total", {"job": "up", "status": "crashed"}) == 1


def test_a_cancel_outranks_the_daemons_stop_that_comes_before_or_after_it(project: Project) -> None:
    """Hostile review: a date cancelled while the daemon stopped (its chunks finishing) stayed in
    waiting_fires, and the restart ran it again; the other way round the cancel was forgotten."""
    d = daemon(project)
    dated = JOBS.format(schedule="0 2 * * *", up="", down="").replace('out/up"', 'out/up/{date}"')
    project.write_config(dated)
    d.config = load_config(project.root / "config.toml")
    first = StopSignals()
    first.request()  # the daemon's stop, then the cancel
    first.request(CANCELLED)
    assert first.last == CANCELLED

    class DaemonStopsDuringTheRun(StopSignals):
        @property
        def requested(self) -> bool:
            d.stopping = True  # the daemon's SIGTERM arrives while the cancelled run winds down
            return super().requested

    stop = DaemonStopsDuringTheRun()
    stop.request(CANCELLED)
    fired = json.dumps({"date": "2026-11-27"})
    d.manifest.named("wait_fire", job="up", params=fired, at=datetime.now(UTC))
    d.run_in_daemon("up", "schedule", RunOptions(params={"date": "2026-11-27"}, stop=stop), waited=fired)
    assert d.stopping and statuses(d, "up") == ["stopped"]
    assert d.manifest.named("waiting_fires") == []  # a restart does not run it again
