"""Alerting hooks: `on_failure` / `on_success` run a command and/or POST JSON to a URL.

A hook reports a run; it never changes it. Its own failure (non-zero exit, timeout, HTTP
error, unreachable host) is logged as `hook_failed` and the run's exit status stands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minibatch.units import parse_duration

DEFAULT_TIMEOUT = 10.0
OUTPUT_LIMIT = 2000  # characters of a command's output kept in the log
KEEP_REPORTS = 50  # per job: reports written for hooks are ~5 MB each


@dataclass(frozen=True)
class Hook:
    command: str | None = None  # run by /bin/sh, like a crontab line
    url: str | None = None  # receives a JSON POST
    timeout: float = DEFAULT_TIMEOUT


def parse_hook(value: Any, where: str, errors: list[str]) -> Hook | None:
    """`"cmd"`, `"https://..."` or `{ command = ..., url = ..., timeout = ... }`; {} means none."""
    if isinstance(value, str):
        value = {"url": value} if value.startswith(("http://", "https://")) else {"command": value}
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a command, a URL or a table {{ command, url, timeout }}")
        return None
    for key in sorted(set(value) - {"command", "url", "timeout"}):
        errors.append(f"{where}.{key}: unknown key (expected command, url, timeout)")
    command, url = value.get("command"), value.get("url")
    if command is not None and not (isinstance(command, str) and command.strip()):
        errors.append(f"{where}.command: expected a non-empty string")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        errors.append(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    try:
        timeout = parse_duration(value.get("timeout", DEFAULT_TIMEOUT))
    except ValueError as exc:
        errors.append(f"{where}.timeout: {exc}")
        timeout = DEFAULT_TIMEOUT
    if timeout <= 0:
        errors.append(f"{where}.timeout: must be greater than zero")
    if command is None and url is None:
        return None
    return Hook(command=command, url=url, timeout=timeout)


def notify_run(config: Any, job: Any, record: Any) -> None:
    """Fire the job's on_failure or on_success hook for a finished run (`record`: RunRecord)."""
    if record.status in ("failed", "crashed"):
        hook, event = job.on_failure, "on_failure"
    elif record.status == "succeeded":
        hook, event = job.on_success, "on_success"
    else:  # stopped by a signal: neither
        return
    if hook is None:
        return
    try:
        facts = describe_run(record, config.path, _write_report(config, record))
        fire(hook, event, facts, config.base_dir)
    except Exception as exc:  # the boundary: whatever a hook does, the run's outcome stands
        from minibatch.log import get_logger

        get_logger(job=record.job, run_id=record.run_id).warning("hook_failed", hook=event, error=repr(exc))


def _write_report(config: Any, record: Any) -> Path | None:
    """The run's HTML report, for the hook to link to; a failure here must not stop the hook."""
    from minibatch.log import get_logger
    from minibatch.manifest import Manifest
    from minibatch.report import default_report_path, write_report

    state_dir = config.engine.state_dir
    path = default_report_path(state_dir, record.job, record.run_id)
    try:
        written = write_report(Manifest(state_dir / "manifest.duckdb"), record.job, path, record.run_id)
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


def fire(hook: Hook, event: str, facts: dict[str, Any], cwd: Path) -> None:
    from minibatch.log import get_logger  # not at the top: config.py imports this module

    log = get_logger(job=facts["job"], run_id=facts["run_id"])
    if hook.command:
        _run_command(hook, event, facts, cwd, log)
    if hook.url:
        _post(hook, event, facts, log)


def _run_command(hook: Hook, event: str, facts: dict[str, Any], cwd: Path, log: Any) -> None:
    assert hook.command is not None
    env = os.environ | {"MINIBATCH_EVENT": event}
    env |= {f"MINIBATCH_{key.upper()}": "" if value is None else str(value) for key, value in facts.items()}
    try:
        process = subprocess.Popen(
            ["/bin/sh", "-c", hook.command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # so a timeout kills the command's children too
        )
    except OSError as exc:
        log.warning("hook_failed", hook=event, command=hook.command, error=str(exc))
        return
    try:
        output, _ = process.communicate(timeout=hook.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        log.warning(
            "hook_failed", hook=event, command=hook.command, error=f"timed out after {hook.timeout:g}s",
            output=output[-OUTPUT_LIMIT:],
        )  # fmt: skip
        return
    if process.returncode != 0:
        log.warning(
            "hook_failed", hook=event, command=hook.command, exit_status=process.returncode,
            output=output[-OUTPUT_LIMIT:],
        )  # fmt: skip
    else:
        log.info("hook_done", hook=event, command=hook.command)


def _post(hook: Hook, event: str, facts: dict[str, Any], log: Any) -> None:
    assert hook.url is not None
    from importlib.metadata import version

    body = json.dumps({"event": event, **facts}).encode()
    request = urllib.request.Request(
        hook.url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"minibatch/{version('minibatch')}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=hook.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        log.warning("hook_failed", hook=event, url=hook.url, http_status=exc.code, error=str(exc.reason))
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, DNS, timeout, bad URL
        reason = getattr(exc, "reason", exc)
        log.warning("hook_failed", hook=event, url=hook.url, error=str(reason))
        return
    log.info("hook_done", hook=event, url=hook.url, http_status=status)
