"""on_failure / on_success hooks: a real command, a real HTTP server on loopback, and hooks
that fail, hang or cannot connect without touching the run's outcome."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from minibatch.config import ConfigError, parse_config
from minibatch.hooks import Hook

from conftest import Project, faulty_job, wait_for


def setup(project: Project, process: str, hooks: str = "", engine: str = "") -> None:
    project.write_config(faulty_job(process, f"retries = 0\n{hooks}"), engine=engine)
    project.write_input("f0.parquet", 0, 300)


def env_file_hook(path: Path) -> str:
    return f"env | grep ^MINIBATCH_ | sort > {path}"


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


class Receiver:
    """A loopback HTTP server that records JSON POSTs and answers with `status`."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_on_failure_command_gets_the_run_in_its_environment_and_a_report(project: Project) -> None:
    seen = project.root / "hook.env"
    setup(project, "poison", f'on_failure = "{env_file_hook(seen)}"')
    result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:100"})
    assert result.returncode == 1, result.stderr
    env = read_env(seen)
    assert env["MINIBATCH_EVENT"] == "on_failure"
    assert env["MINIBATCH_JOB"] == "f" and env["MINIBATCH_OUTCOME"] == "failed"
    assert env["MINIBATCH_CHUNKS_DEAD"] == "1"
    assert int(env["MINIBATCH_CHUNKS_DONE"]) == int(env["MINIBATCH_CHUNKS_TOTAL"]) - 1 > 0
    assert env["MINIBATCH_RUN_ID"] in result.stdout
    report = Path(env["MINIBATCH_REPORT"])
    assert report.is_file() and env["MINIBATCH_RUN_ID"] in report.read_text()
    assert '"hook_done"' in result.stderr or "hook_done" in result.stderr


def test_on_success_runs_on_success_and_on_failure_does_not(project: Project) -> None:
    ok, bad = project.root / "ok.env", project.root / "bad.env"
    setup(project, "poison", f'on_success = "{env_file_hook(ok)}"\non_failure = "{env_file_hook(bad)}"')
    result = project.cli("run-now", "f")  # no target: every chunk succeeds
    assert result.returncode == 0, result.stderr
    assert read_env(ok)["MINIBATCH_OUTCOME"] == "succeeded"
    assert not bad.exists()


def test_engine_wide_hook_applies_unless_a_job_overrides_it(project: Project) -> None:
    engine_seen, job_seen = project.root / "engine.env", project.root / "job.env"
    engine = f'on_success = "{env_file_hook(engine_seen)}"'
    setup(project, "poison", engine=engine)
    assert project.cli("run-now", "f").returncode == 0
    assert engine_seen.exists()
    engine_seen.unlink()
    setup(project, "poison", f'on_success = "{env_file_hook(job_seen)}"', engine=engine)
    assert project.cli("run-now", "f", "--fresh").returncode == 0
    assert job_seen.exists() and not engine_seen.exists()


def test_a_failing_hook_is_logged_and_leaves_the_exit_status_alone(project: Project) -> None:
    setup(project, "poison", 'on_success = "echo broken >&2; exit 7"')
    result = project.cli("run-now", "f")
    assert result.returncode == 0
    failure = next(json.loads(line) for line in result.stderr.splitlines() if "hook_failed" in line)
    assert failure["exit_status"] == 7 and "broken" in failure["output"]


def test_a_hanging_hook_is_killed_at_its_timeout(project: Project) -> None:
    setup(project, "poison", 'on_success = { command = "sleep 60", timeout = "300ms" }')
    started = time.monotonic()
    result = project.cli("run-now", "f")
    assert result.returncode == 0
    assert time.monotonic() - started < 20
    assert "timed out after 0.3s" in result.stderr


def test_webhook_receives_a_json_post(project: Project, receiver: Receiver) -> None:
    setup(project, "poison", f'on_failure = "{receiver.url}"')
    result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0"})
    assert result.returncode == 1
    (body,) = receiver.bodies
    assert body["event"] == "on_failure" and body["job"] == "f" and body["outcome"] == "failed"
    assert body["chunks_dead"] == 1 and body["run_id"] in result.stdout
    assert Path(body["report"]).is_file()


def test_webhook_errors_are_logged_not_fatal(project: Project) -> None:
    bad = Receiver(status=500)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    hooks = f'on_success = "{bad.url}"'
    setup(project, "poison", hooks)
    result = project.cli("run-now", "f")
    assert result.returncode == 0 and '"http_status": 500' in result.stderr
    setup(project, "poison", f'on_success = {{ url = "http://127.0.0.1:{closed}/", timeout = "2s" }}')
    result = project.cli("run-now", "f", "--fresh")
    assert result.returncode == 0 and "hook_failed" in result.stderr
    bad.server.shutdown()


@pytest.mark.parametrize(
    ("value", "hook"),
    [
        ('"notify-send done"', Hook(command="notify-send done")),
        ('"https://alerts.example/x"', Hook(url="https://alerts.example/x")),
        ('{ command = "a", url = "http://h/", timeout = "3s" }', Hook("a", "http://h/", 3.0)),
        ("{}", None),
    ],
)
def test_hook_values(tmp_path: Path, value: str, hook: Hook | None) -> None:
    import tomllib

    job = '[jobs.j]\ninput = "x/*"\noutput = "o"\nsql = "SELECT 1"'
    raw = tomllib.loads(f"[minibatch]\non_failure = {value}\n{job}")
    config = parse_config(raw, tmp_path / "config.toml")
    assert config.engine.on_failure == hook
    assert config.jobs["j"].on_failure == hook


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3", "jobs.j.on_failure: expected a command, a URL or a table"),
        ('{ url = "ftp://x" }', "jobs.j.on_failure.url: expected an http:// or https:// URL"),
        ('{ command = "x", timeout = "soon" }', "jobs.j.on_failure.timeout: bad duration"),
        ('{ command = "x", retries = 2 }', "jobs.j.on_failure.retries: unknown key"),
        ('{ command = "" }', "jobs.j.on_failure.command: expected a non-empty string"),
    ],
)
def test_bad_hook_values_are_config_errors(tmp_path: Path, value: str, message: str) -> None:
    import tomllib

    raw = tomllib.loads(f'[jobs.j]\ninput = "x/*"\noutput = "o"\nsql = "SELECT 1"\non_failure = {value}')
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "config.toml")
    assert message in str(info.value)


def test_a_run_that_breaks_is_recorded_crashed_and_fires_on_failure(project: Project) -> None:
    seen = project.root / "hook.env"
    setup(project, "poison", f'on_failure = "{env_file_hook(seen)}"')
    (project.root / "out").mkdir()
    (project.root / "out" / ".f.minibatch-staging").write_text("not a directory")  # breaks the run
    result = project.cli("run-now", "f")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    env = read_env(seen)
    assert env["MINIBATCH_OUTCOME"] == "crashed" and "FileExistsError" in env["MINIBATCH_ERROR"]
    assert project.manifest_rows("SELECT status FROM runs") == [("crashed",)]


def test_a_hooks_output_is_kept_as_its_tail_and_its_end_is_the_shells(project: Project) -> None:
    """Hostile review: a hook's whole output was held in memory (512 MiB of output: 1.8 GB
    RSS; `yes` within a 4 s timeout: 15 GB), and a hook leaving a child in the background was
    waited for until its timeout, reported failed and its child killed."""
    import subprocess
    import sys

    flood = "head -c 600000000 /dev/zero | tr '\\\\0' x; echo THE-END; exit 3"
    setup(project, "poison", f'on_success = "{flood}"')
    argv = [sys.executable, "-m", "minibatch", "--config", str(project.root / "config.toml"), "run-now", "f"]
    # started by a small process: a child's peak RSS counts the image it was forked from (pytest's)
    measure = (
        "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", measure, *argv], capture_output=True, text=True, env=project.env()
    )
    code, peak = map(int, result.stdout.split())
    assert code == 0, result.stderr
    failure = next(json.loads(line) for line in result.stderr.splitlines() if "hook_failed" in line)
    assert failure["exit_status"] == 3 and failure["output"].endswith("xxxTHE-END\n")
    assert peak < 400 * 1024, f"{peak // 1024} MiB at most in the process"  # KiB

    done = project.root / "bg_done"
    setup(project, "poison", f'on_success = {{ command = "(sleep 1; touch {done}) &", timeout = "3s" }}')
    started = time.monotonic()
    result = project.cli("run-now", "f", "--fresh")
    assert result.returncode == 0 and "hook_done" in result.stderr and "hook_failed" not in result.stderr
    assert time.monotonic() - started < 3  # not its timeout
    wait_for(done.exists, timeout=10, what="the hook's own child, left running")


def test_a_long_error_still_reaches_the_hook(tmp_path: Path) -> None:
    """Hostile review: an error quoting a 200 KB input value made `MINIBATCH_ERROR` longer
    than Linux lets one environment string be: the on_failure command never started."""
    from minibatch.hooks import ENV_LIMIT, fire

    seen = tmp_path / "seen"
    facts = {"job": "j", "run_id": "r", "error": "x" * 200_000}
    fire(Hook(command=f'printf %s "$MINIBATCH_ERROR" | wc -c > {seen}'), "on_failure", facts, tmp_path)
    assert ENV_LIMIT <= int(seen.read_text()) < ENV_LIMIT + 100


def test_a_stop_signal_while_a_hook_runs_ends_the_command_as_the_run_did(project: Project) -> None:
    """Hostile review: SIGTERM while on_success ran killed `run-now` with 143 (no summary) and
    left the hook running: the handlers were the default ones again after the run."""
    import signal

    started = project.root / "hook_started"
    setup(project, "poison", f'on_success = {{ command = "touch {started}; sleep 2", timeout = "20s" }}')
    process = project.start("run-now", "f")
    wait_for(started.exists, timeout=60, what="the hook")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "succeeded" in out, out


def test_a_child_a_hook_leaves_running_keeps_no_descriptor_and_a_second_signal_stops_the_hook(
    project: Project, tmp_path: Path
) -> None:
    """Reviews: a hook leaving a child in the background (which holds its output pipe) cost a
    daemon a descriptor and a thread for as long as the child lived; and a second SIGTERM during
    a hook was ignored until the hook's timeout (a second signal stops at once)."""
    import os
    import signal

    from minibatch.hooks import fire

    before = len(os.listdir("/proc/self/fd"))
    child = tmp_path / "child.pid"
    fire(Hook(command=f"sleep 30 & echo $! > {child}"), "on_success", {"job": "j", "run_id": "r"}, tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before
    os.kill(int(child.read_text()), signal.SIGKILL)

    started = project.root / "hook_started"
    setup(project, "poison", f'on_success = {{ command = "touch {started}; sleep 60", timeout = "60s" }}')
    process = project.start("run-now", "f")
    wait_for(started.exists, timeout=60, what="the hook")
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)  # not a second SIGTERM: the kernel would merge two pending ones
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - began < 20 and process.returncode == 0, err
    assert "stopped by a second signal" in err
