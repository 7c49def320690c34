"""SIGTERM/SIGINT during a run: the first asks for a graceful stop, the second for an immediate one."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
from types import FrameType, TracebackType

CANCELLED = "cancelled"  # the reason of a stop asked by `cancel`: recorded as the run's error

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Counts stop signals; `wakeup` is readable when one arrives, so a wait returns at once."""

    def __init__(self) -> None:
        self.count = 0
        self.last: str | None = None
        self._reader, self._writer = socket.socketpair()
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None

    @property
    def wakeup(self) -> socket.socket:
        return self._reader

    @property
    def requested(self) -> bool:
        return self.count >= 1

    def arrived(self) -> bool:
        """Whether a stop was asked for, also while the main thread is inside C code (a DuckDB
        query), where the handler that counts a signal cannot run yet: its byte is in `wakeup`."""
        return self.requested or bool(select.select([self._reader], [], [], 0)[0])

    @property
    def immediate(self) -> bool:
        return self.count >= 2

    def request(self, reason: str = "daemon stop") -> None:
        """Ask for a stop from code (the daemon stopping a run in a thread): like a signal."""
        self.count += 1
        self.last = reason if reason == CANCELLED else self.last or reason  # a cancel is kept
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()
