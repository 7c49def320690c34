"""Standard streams whose reader may go away (`run-now j 2>&1 | head -1`): what is written
after that goes to /dev/null, and the run goes on."""

from __future__ import annotations

import os
from typing import Any, TextIO


def to_devnull(fd: int) -> None:
    """Descriptor `fd` to /dev/null, for this process and those it starts from now on (what
    the stream still buffers goes there too)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class ForgivingStream:
    """A worker's stdout or stderr, written by the job's own print(): a closed pipe must not
    fail the chunk. Everything else (`.buffer`, `.encoding`, `.reconfigure`) is the stream's."""

    def __init__(self, stream: TextIO, fd: int) -> None:
        self.stream, self.fd = stream, fd

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            to_devnull(self.fd)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            to_devnull(self.fd)
