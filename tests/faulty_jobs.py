"""Job functions that misbehave on one target chunk, for the fault-injection tests.

The target is `MB_TARGET="file.parquet:row_start"`; every call is logged to MB_COUNT_FILE as
"chunk_id attempt" so tests can count computations.
"""

import ctypes
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.compute as pc
from myjobs.testenv import get as env


def _log(ctx):
    path = env("MB_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.chunk_id} {ctx.attempt}\n")


def _is_target(ctx) -> bool:
    return env("MB_TARGET") == f"{os.path.basename(ctx.file)}:{ctx.row_start}"


def _ok(table):
    time.sleep(float(env("MB_SLEEP", "0")))
    # value + value, not value * 2: where pandas is installed, pyarrow imports it (~0.4 s of
    # CPU in each worker) to convert a Python scalar
    return table.append_column("doubled", pc.add(table["value"], table["value"]))


def flaky(table, ctx):
    _log(ctx)
    if _is_target(ctx) and ctx.attempt == 1:
        raise RuntimeError("flaky service said no")
    return _ok(table)


def poison(table, ctx):
    _log(ctx)
    if _is_target(ctx) and not os.path.exists(env("MB_FIXED")):
        raise ValueError("cannot parse this chunk")
    return _ok(table)


def exit_once(table, ctx):
    _log(ctx)
    if _is_target(ctx) and ctx.attempt == 1:
        os._exit(7)
    return _ok(table)


def segfault_once(table, ctx):
    _log(ctx)
    if _is_target(ctx) and ctx.attempt == 1:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return _ok(table)


def sigkill_once(table, ctx):
    _log(ctx)
    if _is_target(ctx) and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return _ok(table)


def hang(table, ctx):
    _log(ctx)
    if _is_target(ctx):
        time.sleep(3600)
    return _ok(table)


def hog(table, ctx):
    _log(ctx)
    if _is_target(ctx):
        block = bytearray(64 * 2**30)
        block[:: 2**20] = b"x" * len(block[:: 2**20])
    return _ok(table)


def always_fail(table, ctx):
    _log(ctx)
    raise ConnectionError("upstream service unavailable")


def bad_file(table, ctx):
    """Every chunk of the file named MB_BAD_FILE fails."""
    _log(ctx)
    if os.path.basename(ctx.file) == env("MB_BAD_FILE"):
        raise ValueError("this file's rows are all bad")
    return _ok(table)


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no words")


def odd_errors(table, ctx):
    """Exceptions that are hard to put into words: a lone surrogate, a __str__ that raises."""
    _log(ctx)
    if ctx.row_start == 0:
        raise FileNotFoundError("lookup file missing: " + os.fsdecode(b"/landing/bad\xff.csv"))
    if ctx.row_start == 50:
        raise Unprintable()
    return _ok(table)


def twin_columns(table, ctx):
    return pa.table([table["id"], table["value"], table["id"]], names=["id", "value", "id"])


def drift(table, ctx):
    _log(ctx)
    result = _ok(table)
    if _is_target(ctx):
        result = result.set_column(1, "value", pc.cast(result["value"], pa.string()))
    return result


def slow(table, ctx):
    _log(ctx)
    return _ok(table)


def program(table, ctx):
    """Runs a program for MB_SLEEP seconds (a stop signal to the whole process group must let
    it finish, as it lets the chunk)."""
    _log(ctx)
    subprocess.run(["sleep", env("MB_SLEEP", "0")], check=True)
    return table.append_column("doubled", pc.add(table["value"], table["value"]))


def crash_at(table, ctx):
    """Kill the whole run (coordinator, forkserver, workers) when the Nth computation starts."""
    _log(ctx)
    with open(env("MB_COUNT_FILE")) as f:
        started = sum(1 for _ in f)
    if started >= int(env("MB_CRASH_AT", "1000000000")):  # ">=": workers race on the count
        os.killpg(0, signal.SIGKILL)
    return _ok(table)


def count_rows(table, ctx):
    """One row per chunk: which file, how many rows (for hostile-input tests)."""
    return pa.table({"file": [os.path.basename(ctx.file)], "n": pa.array([table.num_rows], pa.int64())})


def hog_once(table, ctx):
    """The target's first attempt allocates past the worker's cap; each call notes its pid."""
    hog_now = _is_target(ctx) and ctx.attempt == 1
    with open(env("MB_PIDS"), "a") as f:
        f.write(f"{os.getpid()} {'hog' if hog_now else 'ok'}\n")
    if hog_now:
        bytearray(64 * 2**30)
    return _ok(table)


def gate(table, ctx):
    """The target says it started (MB_STARTED), then waits for MB_GO: a test changes the world
    under a running chunk meanwhile."""
    _log(ctx)
    if _is_target(ctx):
        open(env("MB_STARTED"), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(env("MB_GO")) and time.monotonic() < deadline:
            time.sleep(0.01)
    return _ok(table)
