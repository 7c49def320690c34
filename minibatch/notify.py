"""systemd's notify protocol (sd_notify), spoken directly over $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any


class Notifier:
    """Sends READY=1, WATCHDOG=1, STATUS=..., STOPPING=1, RELOADING=1; a no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls) -> Notifier:
        """Read and remove NOTIFY_SOCKET (so worker processes never talk to systemd)."""
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        if pid and pid.isdigit() and int(pid) != os.getpid():
            usec = None  # the watchdog is meant for another process
        return cls(address, int(usec) if usec and usec.isdigit() else None)

    @property
    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout, as systemd recommends."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *fields: str) -> None:
        if self._socket is None or self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with contextlib.suppress(OSError):  # systemd gone or socket full: never fatal
            self._socket.sendto("\n".join(fields).encode(), target)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading config")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: letting chunks in flight finish")


def status_line(active: Any, scheduler: Any) -> str:
    """What the daemon says in systemd's STATUS=: its runs (an ActiveRuns), its next fire."""
    running = ", ".join(sorted({a.job for _, a in active.items()})) or "nothing"
    upcoming = [
        (job.next_run_time, job.id)
        for job in scheduler.get_jobs()
        if job.next_run_time and job.id.startswith("cron:")
    ]
    following = f"; next {min(upcoming)[1][5:]} at {min(upcoming)[0]:%Y-%m-%d %H:%M %Z}" if upcoming else ""
    return f"running {running}{following}"
