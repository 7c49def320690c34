"""A Dask LocalCluster in a process of its own, as a user would have one running.

The dask_executor workloads start it before their runs and close it after them, so its
start-up is outside every timed command; minibatch's `executor = "dask"` connects to it by
address. The process prints the scheduler's address, then serves until its stdin closes (so it
also goes away if the harness dies).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import measure

START_TIMEOUT = 120.0
CLOSE_TIMEOUT = 30.0

SCRIPT = """
import logging, sys
from distributed import LocalCluster
with LocalCluster(
    n_workers=int(sys.argv[1]), threads_per_worker=1, processes=True, host="127.0.0.1",
    dashboard_address=None, silence_logs=logging.ERROR,
) as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()
"""


class ClusterError(Exception):
    """The cluster did not start: the message ends with its log's last lines."""


@dataclass(frozen=True)
class Cluster:
    address: str  # tcp://127.0.0.1:PORT
    pid: int  # the cluster's process: scheduler and nannies in it, its workers its children
    seconds: float  # from starting the process to the scheduler's address with every worker up


@contextlib.contextmanager
def local_cluster(workers: int, log: Path, env: dict[str, str]) -> Iterator[Cluster]:
    """A LocalCluster of `workers` single-threaded worker processes on 127.0.0.1, closed on exit."""
    started = time.perf_counter()
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(workers)],
            cwd=log.parent,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    try:
        address = _read_address(process, log)
        yield Cluster(address, process.pid, time.perf_counter() - started)
    finally:
        _close(process)


def _read_address(process: subprocess.Popen[str], log: Path) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    if not ready:
        raise ClusterError(f"Dask LocalCluster: no address in {START_TIMEOUT:g} s: {_tail(log)}")
    line = process.stdout.readline().strip()
    if not line.startswith("tcp://"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5.0)
        why = f"exit {process.returncode}" if process.returncode is not None else f"printed {line!r}"
        raise ClusterError(f"Dask LocalCluster did not start ({why}): {_tail(log)}")
    return line


def _close(process: subprocess.Popen[str]) -> None:
    """Close stdin (the cluster shuts down cleanly); kill its whole session if it hangs."""
    for pipe in (process.stdin, process.stdout):
        with contextlib.suppress(OSError):
            if pipe is not None:
                pipe.close()
    try:
        process.wait(CLOSE_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"   note: the Dask LocalCluster did not close in {CLOSE_TIMEOUT:g} s; killed", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for stray in measure.reap_session(process.pid):
        print(f"   note: the Dask LocalCluster left a process running; killed it: {stray}", file=sys.stderr)


def _tail(log: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text().strip().splitlines()[-lines:])
    return ""
