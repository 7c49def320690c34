"""Security: strict modes refuse job code before importing it, hooks keep their secrets out of
the logs and within their timeout, and the job lock never follows a symlink. Real processes,
real files and real HTTP servers on loopback."""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from minibatch.config import ConfigError, parse_config
from minibatch.lock import holder_pid, job_lock
from minibatch.validate import load_daemon_config

from conftest import Project, faulty_job, wait_for

# ---------------------------------------------------------------- strict modes (the daemon)

MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text({who!r})\n"
STRICT_JOB = """
[jobs.s]
input = "data/*.parquet"
output = "out/s"
process = "secjobs.sub.marked:run"
"""


def strict_project(project: Project, marker: Path) -> dict[str, Path]:
    """Job code that leaves `marker` behind when imported: a package, a namespace package in it
    and a module; every mode set, as tmp_path's may not be what we expect."""
    package = project.root / "secjobs"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text(MARKER_CODE.format(marker=str(marker), who="package"))
    module = package / "sub" / "marked.py"
    module.write_text(MARKER_CODE.format(marker=str(marker), who="module") + "def run(t, c):\n    return t\n")
    project.write_config(STRICT_JOB, engine='metrics_addr = ""')
    paths = {
        "config dir": project.root,
        "package dir": package,
        "__init__.py": package / "__init__.py",
        "namespace package dir": package / "sub",
        "module": module,
        "__pycache__": package / "sub" / "__pycache__",
        "cached bytecode": package / "sub" / "__pycache__" / "marked.cpython-311.pyc",
        "state dir": project.root / ".state",
    }
    for path in (project.root, package, package / "sub"):
        path.chmod(0o755)
    for path in (project.root / "config.toml", package / "__init__.py", module):
        path.chmod(0o644)
    return paths


def test_daemon_refuses_a_world_writable_job_module_without_importing_it(project: Project) -> None:
    marker = project.root.parent / "imported"
    module = strict_project(project, marker)["module"]
    module.chmod(0o646)
    result = project.cli("daemon", timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"{module} is writable by group or others" in result.stderr
    assert f"chmod go-w {module}" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists(), f"the job code ran before it was refused: {marker.read_text()}"


@pytest.mark.parametrize(
    ("where", "mode"),
    [
        ("config dir", 0o777),
        ("package dir", 0o775),
        ("__init__.py", 0o664),
        ("namespace package dir", 0o757),
        ("__pycache__", 0o777),
        ("cached bytecode", 0o666),
        ("state dir", 0o777),
    ],
    ids=lambda value: f"{value:o}" if isinstance(value, int) else value,
)
def test_strict_modes_check_each_path_on_the_way_to_the_job_code(
    project: Project, where: str, mode: int
) -> None:
    marker = project.root.parent / "imported"
    path = strict_project(project, marker)[where]
    if where == "cached bytecode":
        path.parent.mkdir(mode=0o755)
        path.write_bytes(b"not really bytecode")
    elif not path.exists():
        path.mkdir()
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_daemon_config(str(project.root / "config.toml"))
    (error,) = info.value.errors
    assert error == f"{path} is writable by group or others; refusing to run it (chmod go-w {path})"
    assert not marker.exists()


# ---------------------------------------------------------------- hooks: secrets in the logs


class Receiver:
    """A loopback HTTP server that records each POST's path, headers and JSON body."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((self.path, dict(self.headers), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def hook_setup(project: Project, hooks: str) -> None:
    project.write_config(faulty_job("poison", f"retries = 0\n{hooks}"))
    project.write_input("f0.parquet", 0, 300)


def events(stderr: str, name: str) -> list[dict]:
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [event for event in logged if event["event"] == name]


def test_hook_secrets_stay_out_of_the_logs_and_url_credentials_work(
    project: Project, receiver: Receiver
) -> None:
    command = "test 'Authorization: Bearer TOKEN-1' = x"  # fails: hook_failed
    url = f"http://alice:p%40ss-TOKEN-2@127.0.0.1:{receiver.port}/hook?token=TOKEN-3"
    hook_setup(project, f'on_failure = {{ command = "{command}", url = "{url}" }}')
    result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0"})
    assert result.returncode == 1, result.stderr
    assert "TOKEN" not in result.stdout + result.stderr
    (failed,) = events(result.stderr, "hook_failed")
    assert failed["command"] == "test ..." and failed["exit_status"] == 1
    (done,) = events(result.stderr, "hook_done")
    assert done["url"] == f"http://127.0.0.1:{receiver.port}/hook" and done["http_status"] == 200
    ((path, headers, body),) = receiver.requests
    assert path == "/hook?token=TOKEN-3" and body["outcome"] == "failed"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alice:p@ss-TOKEN-2").decode()


def test_a_failing_webhook_keeps_its_secrets_out_of_the_log(project: Project) -> None:
    refusing = Receiver(status=500)
    try:
        url = f"http://bob:TOKEN-1@127.0.0.1:{refusing.port}/x?token=TOKEN-2"
        hook_setup(project, f'on_failure = "{url}"')
        result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0"})
    finally:
        refusing.server.shutdown()
    assert result.returncode == 1, result.stderr
    assert "TOKEN" not in result.stdout + result.stderr
    (failed,) = events(result.stderr, "hook_failed")
    assert failed["url"] == f"http://127.0.0.1:{refusing.port}/x" and failed["http_status"] == 500


def test_a_bad_hook_url_is_reported_without_its_secrets(tmp_path: Path) -> None:
    import tomllib

    hook = '{ url = "ftp://carol:TOKEN-1@files.example/up?token=TOKEN-2" }'
    raw = tomllib.loads(f'[jobs.j]\ninput = "x/*"\noutput = "o"\nsql = "SELECT 1"\non_failure = {hook}')
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "config.toml")
    assert "jobs.j.on_failure.url: expected an http:// or https:// URL" in str(info.value)
    assert "TOKEN" not in str(info.value)


# ---------------------------------------------------------------- hooks: the whole hook within its timeout


class Trickler:
    """A loopback HTTP server that reads a request and then answers one byte every 0.5 s, a
    status line and headers that take 30 s: each read gets data well within a 1 s timeout."""

    ANSWER = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"." * 12 + b"\r\nContent-Length: 0\r\n\r\n"  # 60 bytes

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(60)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.recv(65536)
            for byte in self.ANSWER:
                if self.stop.wait(0.5):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:  # the client gave up
                    return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def seconds_after_the_run(stderr: str, finished_at: float) -> float:
    (run,) = events(stderr, "run_finished")
    return finished_at - datetime.fromisoformat(run["timestamp"].replace("Z", "+00:00")).timestamp()


def test_a_webhook_that_trickles_its_answer_is_cut_off_at_its_timeout(project: Project) -> None:
    trickler = Trickler()
    try:
        hook_setup(project, f'on_failure = {{ url = "{trickler.url}", timeout = "1s" }}')
        result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0"}, timeout=90)
        finished = time.time()
    finally:
        trickler.close()
    assert result.returncode == 1, result.stderr  # the run's status, not the hook's
    assert seconds_after_the_run(result.stderr, finished) < 8
    (failed,) = events(result.stderr, "hook_failed")
    assert failed["error"] == "timed out after 1s"


def test_a_command_hook_whose_child_left_the_session_is_still_cut_off(project: Project) -> None:
    pid_file = project.root.parent / "escaped.pid"
    script = f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 30' &\nsleep 60\n"
    (project.root / "hold.sh").write_text(script)  # the escaped child holds the output pipe
    hook_setup(project, 'on_failure = { command = "sh hold.sh", timeout = "500ms" }')
    try:
        result = project.cli("run-now", "f", env={"MB_TARGET": "f0.parquet:0"}, timeout=90)
        finished = time.time()
    finally:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", 10, "the child's pid")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert result.returncode == 1, result.stderr
    assert seconds_after_the_run(result.stderr, finished) < 8
    (failed,) = events(result.stderr, "hook_failed")
    assert failed["error"] == "timed out after 0.5s" and failed["command"] == "sh ..."


# ---------------------------------------------------------------- the job lock


def test_run_now_refuses_a_lock_file_that_is_a_symlink(project: Project) -> None:
    hook_setup(project, "")
    victim = project.root.parent / "victim.txt"
    victim.write_text("precious\n")
    lock = project.root / ".state" / "locks" / "f.lock"
    lock.parent.mkdir(parents=True)
    lock.symlink_to(victim)
    result = project.cli("run-now", "f")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: lock file is a symlink; refusing to follow it: {lock}"
    )
    assert "Traceback" not in result.stderr
    assert victim.read_text() == "precious\n"


def test_job_lock_creates_nothing_through_a_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "created"
    target.parent.mkdir()
    lock = tmp_path / "state" / "locks" / "j.lock"
    lock.parent.mkdir(parents=True)
    lock.symlink_to(target)
    with pytest.raises(OSError) as info, job_lock(tmp_path / "state", "j"):
        pass
    assert info.value.errno == errno.ELOOP and info.value.filename == str(lock)
    assert not target.exists()
    target.write_text(f"{os.getpid()}\n")  # a pid reached through the link is not a holder's
    assert holder_pid(tmp_path / "state", "j") is None
