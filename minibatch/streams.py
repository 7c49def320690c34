"""Standard streams whose reader may go away (`run-now j 2>&1 | head -1`): what is written
after that goes to /dev/null, and the run goes on."""

from __future__ import annotations

import os
from typing import Any


def to_devnull(fd: int) -> None:
    """Descriptor `fd` to /dev/null, for this process and those it starts from now on (what
    the stream still buffers goes there too)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class ForgivingStream:
    """A worker's stdout or stderr, written by the job's own print(): a closed pipe must not
    fail the chunk. Everything else (`.buffer`, `.encoding`, `.reconfigure`) is the stream's."""

    def __init__(self, stream: Any, fd: int) -> None:
        self.stream, self.fd = stream, fd

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def write(self, text: Any) -> int:  # str, or bytes to `buffer`
        try:
            return int(self.stream.write(text))
        except BrokenPipeError:
            to_devnull(self.fd)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            to_devnull(self.fd)

    @property
    def buffer(self) -> ForgivingStream:  # bytes written to it, the same
        return ForgivingStream(self.stream.buffer, self.fd)
