"""Alerting hooks: `on_failure` / `on_success` run a command and/or POST JSON to a URL.

A hook reports a run; it never changes it. Its own failure (non-zero exit, timeout, HTTP
error, unreachable host) is logged as `hook_failed` and the run's exit status stands. Commands
and URLs often carry tokens, so the log names a hook by its program or its URL without
credentials and query: never in full.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from minibatch.checking import Hook, url_label
from minibatch.config import Config, JobConfig
from minibatch.events import Event, Listener
from minibatch.log import get_logger
from minibatch.manifest import Manifest, manifest_path
from minibatch.records import RunRecord
from minibatch.signals import StopSignals
from minibatch.states import RunStatus

if TYPE_CHECKING:
    import http.client

OUTPUT_LIMIT = 2000  # characters of a command's output kept in the log
KEEP_REPORTS = 50  # per job: reports written for hooks are ~5 MB each
KILLED_OUTPUT_WAIT = 1.0  # seconds to collect a command's last output after it ended
ENV_LIMIT = 16 * 1024  # characters of a fact in a command's environment
ASSIGNMENT_RE = re.compile(r"^[A-Za-z_]\w*=")  # FOO=bar before a command


class HookListener(Listener):
    """Fires the job's on_failure or on_success hook once its run has ended and released the
    job's lock (so a hook may start the next run). A run stopped by a signal fires neither."""

    def __init__(self, config: Config, job: JobConfig, stop: StopSignals | None = None) -> None:
        self.config = config
        self.job = job
        self.stop = stop  # the run's (a daemon's run: its stop asked twice ends the hook too)

    def run_ended(self, event: Event) -> None:
        record: RunRecord = event.data["record"]
        if record.status in (RunStatus.FAILED, RunStatus.CRASHED):
            hook, name = self.job.on_failure, "on_failure"
        elif record.status == RunStatus.SUCCEEDED:
            hook, name = self.job.on_success, "on_success"
        else:
            return
        if hook is None:
            return
        try:  # a stop signal now: the hook keeps its timeout; a second one ends it at once
            with StopSignals() as signals:
                report = _write_report(self.config.engine.state_dir, record)
                facts = describe_run(record, self.config.path, report)
                fire(hook, name, facts, self.config.base_dir, signals, self.stop)
        except Exception as exc:  # the boundary: whatever a hook does, the run's outcome stands
            get_logger(job=record.job, run_id=record.run_id).warning(
                "hook_failed", hook=name, error=repr(exc)
            )


def _write_report(state_dir: Path, record: RunRecord) -> Path | None:
    """The run's HTML report, for the hook to link to; a failure here must not stop the hook."""
    from minibatch.report import default_report_path, write_report  # plotly: only when a hook fires

    path = default_report_path(state_dir, record.job, record.run_id)
    try:
        written = write_report(Manifest(manifest_path(state_dir)), record.job, path, record.run_id)
        _prune(path.parent)
        return written
    except Exception as exc:
        get_logger(job=record.job, run_id=record.run_id).warning("report_failed", error=str(exc))
        return None


def _prune(reports: Path) -> None:
    """Keep a job's newest KEEP_REPORTS reports (run ids sort by start time)."""
    for old in sorted(reports.glob("*.html"))[:-KEEP_REPORTS]:
        old.unlink(missing_ok=True)


def describe_run(record: Any, config_path: Path, report: Path | None) -> dict[str, Any]:
    """What a hook is told about a run (`record` is the run's RunRecord)."""
    return {
        "job": record.job,
        "run_id": record.run_id,
        "outcome": record.status,
        "error": record.error,
        "chunks_total": record.chunks_total,
        "chunks_done": record.chunks_done,
        "chunks_reused": record.chunks_reused,
        "chunks_dead": record.chunks_dead,
        "chunks_skipped": record.chunks_skipped,
        "bad_files": record.bad_files,
        "rows_in": record.rows_in,
        "rows_out": record.rows_out,
        "seconds": round((record.ended_at or record.started_at) - record.started_at, 3),
        "report": str(report) if report else None,
        "config": str(config_path),
    }


def fire(hook: Hook, event: str, facts: dict[str, Any], cwd: Path, *stops: StopSignals | None) -> None:
    log = get_logger(job=facts["job"], run_id=facts["run_id"])
    if hook.command:
        _run_command(hook, event, facts, cwd, log, [s for s in stops if s is not None])
    if hook.url:
        _post(hook, event, facts, log)


def command_label(command: str) -> str:
    """What the log calls a command: its program, not its arguments (`curl -H 'Authorization: ...'`)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = [w for w in lexer if not ASSIGNMENT_RE.match(w) and w.strip(lexer.punctuation_chars)]
    except ValueError:  # unbalanced quotes: sh reports it in the output
        return "sh"
    if not words:
        return "sh"
    return f"{words[0]} ..." if len(words) > 1 else words[0]


def _redact(text: str, url: str) -> str:
    """`text` (an error message) without the URL's credentials and query, should it quote them."""
    parts = urllib.parse.urlsplit(url)
    secrets = {parts.username, parts.password, parts.query, parts.fragment}
    secrets |= {urllib.parse.unquote(s) for s in secrets if s}
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _run_command(
    hook: Hook, event: str, facts: dict[str, Any], cwd: Path, log: Any, stops: list[StopSignals]
) -> None:
    assert hook.command is not None
    env = os.environ | {"MINIBATCH_EVENT": event}
    env |= {f"MINIBATCH_{key.upper()}": _env_value(value) for key, value in facts.items()}
    label = command_label(hook.command)
    try:
        process = subprocess.Popen(
            ["/bin/sh", "-c", hook.command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a timeout kills the command's children too
        )
    except OSError as exc:
        log.warning("hook_failed", hook=event, command=label, error=str(exc))
        return
    assert process.stdout is not None
    tail = _Tail(process.stdout)
    deadline = time.monotonic() + hook.timeout
    while process.poll() is None:  # the command's own end, not its output's (a child left running)
        stopped = any(stop.immediate for stop in stops)
        if stopped or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            why = "stopped by a second signal" if stopped else f"timed out after {hook.timeout:g}s"
            log.warning("hook_failed", hook=event, command=label, error=why, output=tail.text())
            return
        if stops and select.select([stops[0].wakeup], [], [], 0.05)[0]:
            stops[0].drain()  # a signal's byte, read: or every wait after it returns at once
        elif not stops:
            time.sleep(0.05)
    output = tail.text()
    if process.returncode != 0:
        log.warning("hook_failed", hook=event, command=label, exit_status=process.returncode, output=output)
    else:
        log.info("hook_done", hook=event, command=label)


def _env_value(value: Any) -> str:
    """A fact as an environment variable: Linux refuses to start a command with one string in
    its environment over 128 KiB (an error quoting a long input value would silence the alert)."""
    text = "" if value is None else str(value)
    return text if len(text) <= ENV_LIMIT else text[:ENV_LIMIT] + " ... (cut)"


class _Tail:
    """A command's last OUTPUT_LIMIT characters, read as it writes: never all of its output in
    memory (a hook printing gigabytes). Once asked for them, it reads on for KILLED_OUTPUT_WAIT
    at most, then closes the pipe: a child left running keeps no thread and no descriptor of a
    daemon's for as long as it lives."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.kept, self.done = bytearray(), threading.Event()
        self.reader = threading.Thread(
            target=self._read, args=(pipe,), name="minibatch-hook-output", daemon=True
        )
        self.reader.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe, contextlib.suppress(OSError, ValueError):
            while not self.done.is_set():
                if select.select([pipe], [], [], 0.05)[0]:
                    if not (chunk := os.read(pipe.fileno(), 65536)):
                        return
                    self.kept = (self.kept + chunk)[-4 * OUTPUT_LIMIT :]

    def text(self) -> str:
        """What it wrote, then no more."""
        self.reader.join(KILLED_OUTPUT_WAIT)
        self.done.set()
        self.reader.join()
        return bytes(self.kept).decode(errors="replace")[-OUTPUT_LIMIT:]


def _post(hook: Hook, event: str, facts: dict[str, Any], log: Any) -> None:
    assert hook.url is not None
    import http.client  # here: ~40 ms at every run's start, for the few jobs with a webhook
    from importlib.metadata import version

    body = json.dumps({"event": event, **facts}).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"minibatch/{version('minibatch')}"}
    label = url_label(hook.url)
    try:
        status, reason = _post_within(hook.url, body, headers, hook.timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, DNS, timeout, TLS
        log.warning("hook_failed", hook=event, url=label, error=_redact(str(exc) or repr(exc), hook.url))
        return
    if status >= 300:  # a redirect is not followed: it would take the credentials elsewhere
        log.warning("hook_failed", hook=event, url=label, http_status=status, error=reason)
    else:
        log.info("hook_done", hook=event, url=label, http_status=status)


def _post_within(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """POST `body` to `url`: (status, reason). The whole exchange (name lookup, connect, send,
    status line and headers) ends within `timeout`: a per-read timeout lets a server that
    trickles its answer hold the run for as long as it likes. `user:password@` is sent as
    HTTP Basic authentication."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:  # http.client would take "" for localhost
        raise ValueError("the URL has no host")
    https = parts.scheme == "https"
    connection_type = http.client.HTTPSConnection if https else http.client.HTTPConnection
    connection = connection_type(parts.hostname, parts.port, timeout=timeout)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    outcome: list[tuple[int, str] | Exception] = []

    def exchange() -> None:
        try:
            connection.request("POST", target, body, headers | _basic_auth(parts))
            with connection.getresponse() as response:
                outcome.append((response.status, response.reason))
        except Exception as exc:  # handed to the waiting thread
            outcome.append(exc)
        finally:
            connection.close()

    worker = threading.Thread(target=exchange, name="minibatch-webhook", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:  # still going: unblock the thread, don't wait for it
        _shut_down(connection)
        raise TimeoutError(f"timed out after {timeout:g}s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _basic_auth(parts: urllib.parse.SplitResult) -> dict[str, str]:
    if parts.username is None:
        return {}
    user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _shut_down(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
