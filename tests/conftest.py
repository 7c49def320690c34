"""Shared fixtures: a throwaway project (config.toml, job module, Parquet inputs) and a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import settings

# The suite must stay under two minutes: property tests try 40 examples each (Hypothesis' default is 100).
settings.register_profile("minibatch", max_examples=40)
settings.load_profile("minibatch")

SHARED = Path(__file__).resolve().parents[2] / "shared"

# A map job over data/*.parquet: one chunk per 100-row row group (~3.4 KB) or less.
MAP_JOB = """
[jobs.ident]
input = "data/*.parquet"
output = "out/ident"
process = "myjobs.basic:ident"
chunk_bytes = "3KB"
"""


def faulty_job(process: str, extra: str = "") -> str:
    """Job f over data/*.parquet running a function of tests/faulty_jobs.py (as myjobs.faulty)."""
    return f"""
    [jobs.f]
    input = "data/*.parquet"
    output = "out/f"
    process = "myjobs.faulty:{process}"
    chunk_bytes = "3KB"
    retry_backoff = "10ms"
    {extra}
    """


# What job code reads instead of os.environ: a CLI run in the test's own process shares one
# forkserver, whose environment was fixed when it started, so settings also go in a file.
TESTENV_MODULE = """
import json, os
from pathlib import Path

_FILE = Path(__file__).resolve().parents[1] / "mb_env.json"

def get(name, default=None):
    if name in os.environ:
        return os.environ[name]
    try:
        return json.loads(_FILE.read_text()).get(name, default)
    except (OSError, ValueError):
        return default
"""

JOB_MODULE = """
import os, time
import pyarrow as pa
import pyarrow.compute as pc
from myjobs.testenv import get as env

def _count(ctx):
    path = env("MB_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.chunk_id} {ctx.attempt}\\n")

def ident(table, ctx):
    _count(ctx)
    time.sleep(float(env("MB_SLEEP", "0")))
    # value + value, not value * 2: where pandas is installed, pyarrow imports it (~0.4 s of
    # CPU in each worker) to convert a Python scalar
    return table.append_column("doubled", pc.add(table["value"], table["value"]))

def nothing(table, ctx):
    _count(ctx)
    return None
"""


@dataclass
class Project:
    root: Path
    count_file: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def stop_started(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    @property
    def data(self) -> Path:
        return self.root / "data"

    def out(self, job: str) -> Path:
        return self.root / "out" / job

    def write_config(self, body: str, engine: str = "") -> None:
        api = "" if "api_addr" in engine else 'api_addr = ""\n'  # tests run side by side: no fixed port
        head = f'[minibatch]\nstate_dir = ".state"\nworkers = 2\nlog_format = "json"\n{api}{engine}\n'
        (self.root / "config.toml").write_text(head + textwrap.dedent(body))

    def write_input(self, name: str, start: int, rows: int, row_group: int = 100) -> Path:
        self.data.mkdir(exist_ok=True)
        table = pa.table(
            {
                "id": pa.array(range(start, start + rows), pa.int64()),
                "value": pa.array([i % 97 for i in range(start, start + rows)], pa.int64()),
                "name": pa.array([f"row-{i}" for i in range(start, start + rows)]),
            }
        )
        path = self.data / name
        pq.write_table(table, path, row_group_size=row_group)
        return path

    def write_shared_input(self, name: str, start: int, rows: int) -> Path:
        """An input in data/ that is a symlink into share/ (a mounted share); the file's path."""
        share = self.root / "share"
        share.mkdir(exist_ok=True)
        self.write_input(name, start, rows).rename(share / name)
        (self.data / name).symlink_to(share / name)
        return share / name

    def cli(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        real: bool = False,
        input: str | None = None,
        **kwargs: object,
    ) -> subprocess.CompletedProcess[str]:
        """The `minibatch` command on this project: in this process (click's CliRunner, the
        forkserver shared by every test: fast), or as a real process (`real`, or any
        subprocess option such as start_new_session)."""
        self.write_env(env)
        argv = ["--config", str(self.root / "config.toml"), *args]
        if real or kwargs or args[:1] == ("daemon",):  # a daemon never runs in the test's process
            return subprocess.run(
                [sys.executable, "-m", "minibatch", *argv], capture_output=True, text=True,
                timeout=timeout, env=self.env(env), input=input, **kwargs,
            )  # fmt: skip
        return in_process(argv, input)

    def write_env(self, extra: dict[str, str] | None) -> None:
        """What job code reads through myjobs.testenv (see TESTENV_MODULE)."""
        settings = {"MB_COUNT_FILE": str(self.count_file), **(extra or {})}
        (self.root / "mb_env.json").write_text(json.dumps(settings))

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A real `minibatch` process in a session of its own; killed, if still running, when
        the test ends (only this test's: other tests run beside it)."""
        self.write_env(env)
        process = subprocess.Popen(
            [sys.executable, "-m", "minibatch", "--config", str(self.root / "config.toml"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(env),
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["MB_COUNT_FILE"] = str(self.count_file)
        env.pop("MINIBATCH_CONFIG", None)
        env.update(extra or {})
        return env

    def computations(self) -> list[str]:
        if not self.count_file.exists():
            return []
        return self.count_file.read_text().split()[::2]

    def manifest_rows(self, sql: str) -> list[tuple]:
        """Rows of a query on the project's manifest, opened read-only as users may."""
        import duckdb

        con = duckdb.connect(str(self.root / ".state" / "manifest.duckdb"), read_only=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def output_table(self, job: str) -> pa.Table:
        return ds.dataset(self.out(job), format="parquet").to_table()


def in_process(argv: list[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process; an exception that escapes it shows as a traceback on
    stderr with exit status 1, as it would from a real process."""
    from click.testing import CliRunner

    from minibatch.cli import main

    result = CliRunner().invoke(main, argv, input=input, env={"MINIBATCH_CONFIG": None})
    stderr, code = result.stderr, result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["minibatch", *argv], code, result.stdout, stderr)


def install_jobs(root: Path) -> None:
    (root / "myjobs").mkdir(parents=True, exist_ok=True)
    (root / "myjobs" / "__init__.py").write_text("")
    (root / "myjobs" / "testenv.py").write_text(TESTENV_MODULE)
    (root / "myjobs" / "basic.py").write_text(JOB_MODULE)
    (root / "myjobs" / "faulty.py").write_text((Path(__file__).parent / "faulty_jobs.py").read_text())


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    root = tmp_path / "proj"
    install_jobs(root)
    project = Project(root=root, count_file=tmp_path / "count.txt")
    yield project
    project.stop_started()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_ready(args: list[str], ready: str) -> subprocess.Popen[str]:
    """Start a helper process and return once it printed `ready` (it holds a lock, a file...)."""
    process = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line != f"{ready}\n":
        process.kill()
        raise AssertionError(f"helper process failed: {line!r} {process.communicate()[1]}")
    return process


def watch_stderr(process: subprocess.Popen[str], stream: str = "stderr") -> list[str]:
    """Collect a running process's stderr (or stdout) lines in the background; the live list."""
    lines: list[str] = []

    def pump() -> None:
        pipe = getattr(process, stream)
        assert pipe is not None
        for line in pipe:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture
def shared_testdata() -> Path:
    path = SHARED / "testdata" / "parquet-bad"
    if not path.is_dir():
        pytest.skip("../shared/testdata is absent")
    return path


def in_a_mount_namespace() -> list[str] | None:
    """The argv prefix of a private mount namespace where this user may mount a tmpfs, if any."""
    for argv in (
        ["unshare", "-m", "--propagation", "private"],
        ["unshare", "-rm", "--propagation", "private"],
    ):
        probe = "d=$(mktemp -d) && mount -t tmpfs probe $d && umount $d && rmdir $d"
        if (
            shutil.which("unshare")
            and subprocess.run([*argv, "sh", "-c", probe], capture_output=True).returncode == 0
        ):
            return argv
    return None
