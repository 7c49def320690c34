"""The command line: help, validate, list, status, bad configs (exit 2, no traceback), JSON logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from minibatch.cli import main

from conftest import MAP_JOB, Project, faulty_job

COMMANDS = ["run-now", "validate", "list", "status", "retry", "reset"]

GOOD = """
[jobs.ok]
input = "data/*.parquet"
output = "out/ok"
process = "myjobs.basic:ident"
"""

CYCLE_PARTNER = "[jobs.b]\ninput = 'x/*.parquet'\noutput = 'out/b'\nsql = 'SELECT 1'\ndepends_on = ['ok']\n"

# (config body, text the error must contain)
BAD_CONFIGS = [
    (GOOD + "colour = 'red'\n", "jobs.ok.colour: unknown key"),
    (GOOD + "retries = 'three'\n", "jobs.ok.retries: expected an integer"),
    (GOOD + "chunk_bytes = '12XB'\n", "jobs.ok.chunk_bytes: bad size"),
    (GOOD + "timeout = 'soon'\n", "jobs.ok.timeout: bad duration"),
    (GOOD + "timeout = 0\n", "jobs.ok.timeout: must be greater than zero"),  # every chunk timed out
    (GOOD + "schedule = '61 * * * *'\n", "jobs.ok.schedule: bad crontab"),
    (GOOD + "schedule = '* * *'\n", "jobs.ok.schedule: bad crontab"),
    (GOOD + "timezone = 'Mars/Olympus'\n", "jobs.ok.timezone: unknown time zone"),
    (GOOD + "sql = 'SELECT 1'\n", "jobs.ok.process: set exactly one of process / sql"),
    (GOOD.replace('process = "myjobs.basic:ident"', ""), "jobs.ok.process: missing"),
    (GOOD.replace("myjobs.basic:ident", "myjobs.nope:ident"), "jobs.ok.process: cannot import 'myjobs.nope'"),
    (
        GOOD.replace("myjobs.basic:ident", "myjobs.basic:gone"),
        "jobs.ok.process: myjobs.basic has no function",
    ),
    (GOOD.replace("myjobs.basic:ident", "not a function"), "jobs.ok.process: expected"),
    (GOOD + "depends_on = ['ghost']\n", "jobs.ok.depends_on: unknown job 'ghost'"),
    (GOOD + "depends_on = ['b']\n" + CYCLE_PARTNER, "dependency cycle"),
    (GOOD.replace('output = "out/ok"', 'output = "data/out"'), "jobs.ok.output:"),
    (GOOD.replace('output = "out/ok"', 'output = "."'), "reset would delete inputs"),
    (GOOD.replace('output = "out/ok"', 'output = ""'), "jobs.ok.output: missing"),
    (GOOD + "schedule = '0 0 * * sunshine'\n", "bad weekday 'sunshine'"),
    (
        GOOD + "[jobs.twin]\ninput = 'x/*.parquet'\noutput = 'out/ok/sub'\nsql = 'SELECT 1'\n",
        "overlaps the output of",
    ),
    ("[minibatch]\nstate_dir = 'out/ok/state'\n" + GOOD, "contains the state_dir"),
    (GOOD.replace("[jobs.ok]", "[jobs.'bad name!']"), "job names must match"),
    ("[minibatch]\nworkers = 0\n" + GOOD, "minibatch.workers: must be from 1 to 256, got 0"),
    ("[minibatch]\nmemory_limit = 'lots'\n" + GOOD, "minibatch.memory_limit: bad size"),
    (GOOD.replace('input = "data/*.parquet"', ""), "jobs.ok.input: missing"),
    (  # hostile review: DuckDB ran both and the output was the last one's rows
        GOOD.replace('process = "myjobs.basic:ident"', 'sql = "SELECT * FROM chunk; SELECT 2"'),
        "jobs.ok.sql: only its last statement may be a query, the rows of 'SELECT * FROM chunk;' would",
    ),
    (GOOD + "reduce_sql = 'SELECT 1; SELECT 2'\n", "jobs.ok.reduce_sql: only its last statement may be"),
    (  # an operator review: a directory named `~` was made beside the config
        GOOD.replace('output = "out/ok"', 'output = "~/out/ok"'),
        "jobs.ok.output: '~/out/ok': a path is read literally, `~` is not your home",
    ),
    (
        "[minibatch]\nstate_dir = '${STATE:-.mb2}'\n" + GOOD,
        "minibatch.state_dir: '${STATE:-.mb2}': a path is read",
    ),
    (  # hostile review: the run exited 3 ("already running") without a word
        GOOD.replace("myjobs.basic:ident", "myjobs.exits:ident"),
        "jobs.ok.process: cannot import 'myjobs.exits': it called sys.exit(3)",
    ),
]


def write_raw_config(project: Project, body: str) -> None:
    (project.root / "config.toml").write_text(body)


@pytest.mark.parametrize(("body", "expected"), BAD_CONFIGS, ids=[e for _, e in BAD_CONFIGS])
def test_bad_config_exits_2_naming_job_and_key(project: Project, body: str, expected: str) -> None:
    (project.root / "myjobs" / "exits.py").write_text("import sys\nsys.exit(3)\n")
    write_raw_config(project, body)
    result = project.cli("run-now", "ok")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project.root / "out").exists()  # nothing was done


def test_every_error_is_reported_at_once(project: Project) -> None:
    write_raw_config(project, GOOD + "retries = -1\ntimeout = 'x'\ncolour = 1\n")
    result = project.cli("validate")
    assert result.returncode == 2
    for key in ("jobs.ok.retries", "jobs.ok.timeout", "jobs.ok.colour"):
        assert key in result.stderr


def test_missing_config_file_is_a_readable_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "minibatch", "--config", str(tmp_path / "nope.toml"), "status"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "config file not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_without_a_config(command: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "absent.toml"), command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_help_is_fast_and_lists_exit_codes() -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "minibatch", "--help"], capture_output=True, text=True)
    assert time.monotonic() - started < 2.0
    assert result.returncode == 0
    assert "Exit status" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout


def test_validate_list_and_status_of_the_example_config() -> None:
    config = str(Path(__file__).parents[1] / "config.toml")
    runner = CliRunner()
    validate = runner.invoke(main, ["--config", config, "validate"])
    assert validate.exit_code == 0, validate.output
    assert "OK, 3 job(s)" in validate.output
    listing = runner.invoke(main, ["--config", config, "list"])
    assert listing.exit_code == 0
    assert "carrier_delays  0 2 * * *  Europe/Berlin" in listing.output


def test_json_logs_carry_job_run_id_and_chunk(project: Project) -> None:
    project.write_config(GOOD)
    project.write_input("a.parquet", 0, 300)
    (project.root / "config.toml").write_text(
        (project.root / "config.toml")
        .read_text()
        .replace('log_format = "json"', 'log_format = "json"\nlog_level = "debug"')
    )
    result = project.cli("run-now", "ok")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and all(line["job"] == "ok" and line["run_id"] for line in lines)
    done = [line for line in lines if line["event"] == "chunk_done"]
    assert done and all(line["chunk"] for line in done)
    assert "rows: 300 in" in result.stdout and "rows/s" in result.stdout


def test_status_of_a_job_never_run(project: Project) -> None:
    project.write_config(GOOD)
    result = project.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"job": "ok", "status": "never run"}]
    assert project.cli("status", "nope").returncode == 2


@pytest.mark.parametrize("command", ["list", "status", "history"])
def test_a_config_without_jobs_lists_nothing(project: Project, command: str) -> None:
    """Hostile review: an empty table (no jobs) crashed the table printer with a traceback."""
    project.write_config("")
    result = project.cli(command)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_a_state_dir_that_cannot_be_created_is_a_readable_error(project: Project) -> None:
    (project.root / "blocker").write_text("a file where a directory should be")
    write_raw_config(project, "[minibatch]\nstate_dir = 'blocker/state'\n" + GOOD)
    project.write_input("a.parquet", 0, 100)
    result = project.cli("run-now", "ok")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "blocker" in result.stderr
    assert "Traceback" not in result.stderr


EXITING = """
import os, sys, threading, time
from pathlib import Path
import click
from minibatch.clibase import run_and_exit

@click.command()
@click.argument("code", type=int)
def command(code):
    if os.environ.get("THREAD_FILE"):  # work a thread that is not a daemon does after the command
        late = lambda: (time.sleep(0.2), Path(os.environ["THREAD_FILE"]).write_text("done"))
        threading.Thread(target=late).start()
    sys.stdout.write("x" * 100_000)  # unflushed: block-buffered into a pipe
    sys.exit(code)

run_and_exit(command)
"""


@pytest.mark.parametrize("code", [0, 1, 3])
def test_the_quick_exit_keeps_the_output_and_the_status(code: int, tmp_path: Path) -> None:
    done = tmp_path / "thread-done"
    for env in ({}, {"THREAD_FILE": str(done)}):
        command = [sys.executable, "-c", EXITING, str(code)]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
        assert (result.returncode, len(result.stdout), result.stderr) == (code, 100_000, "")
    assert done.read_text() == "done"  # the interpreter waited for the thread


def test_a_closed_stdout_keeps_the_exit_status() -> None:
    """Python sets sys.stdout to None when descriptor 1 is closed: the quick exit's flush
    turned that into a traceback and status 1."""
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m minibatch --help >&-"], capture_output=True, text=True
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_a_closed_stderr_still_runs_the_job(project: Project) -> None:
    """Hostile review: with descriptor 2 closed (`2>&-`) every command exited 1 doing nothing:
    the first log line wrote to sys.stderr, which Python had set to None."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    command = f"{sys.executable} -m minibatch --config {project.root / 'config.toml'} run-now ident 2>&-"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(100))


def test_a_bare_command_prints_its_help() -> None:
    result = subprocess.run([sys.executable, "-m", "minibatch"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("Usage: ") and not result.stderr


@pytest.mark.parametrize(
    "args",
    [["run-now"], ["nosuch"], ["--nosuch", "list"], ["run-now", "j", "--workers", "x"], ["history", "--bad"]],
)
def test_a_usage_error_is_one_error_line(args: list[str]) -> None:
    """click printed "Usage: ...", "Try ...", "Error: ..." where every other error is one line
    starting with `error:` (a review)."""
    result = subprocess.run([sys.executable, "-m", "minibatch", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], result.stderr


def test_huge_numbers_in_options_are_usage_errors(project: Project) -> None:
    """Tracebacks from DuckDB's integer conversions, and --workers 10**20 made ~20,000 lock
    files before failing on open files."""
    project.write_config(MAP_JOB)
    huge = "99999999999999999999"
    zero = project.cli("run-now", "ident", "--memory-limit", "0")  # was "not given": the config's
    assert zero.returncode == 2 and "more than 0" in zero.stderr, zero.stderr
    for args in (
        ["history", "--limit", huge],
        ["run-now", "ident", "--workers", huge],
        ["run-now", "ident", "--workers", "257"],
    ):
        result = project.cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        not (project.root / ".state" / "locks").exists()
        or len(list((project.root / ".state" / "locks").iterdir())) < 5
    )


def run_into_head(project: Project) -> None:
    """`minibatch run-now ident 2>&1 | head -1` over 1,200 rows in 4 files: exit 0, every row."""
    for i in range(4):
        project.write_input(f"{i}.parquet", i * 300, 300)
    config = str(project.root / "config.toml")
    argv = [sys.executable, "-m", "minibatch", "--config", config, "run-now", "ident"]
    run = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=project.env()
    )
    assert run.stdout is not None
    run.stdout.readline()  # head -1
    run.stdout.close()
    assert run.wait(timeout=120) == 0
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(1200))


def test_logs_into_a_closed_pipe_do_not_break_the_run(project: Project) -> None:
    """`minibatch run-now j 2>&1 | head -1`: the next log line's BrokenPipeError crashed the
    run part-way (0 of its chunks, the output of a --fresh run already removed), and the
    command exited 0."""
    project.write_config(MAP_JOB)
    run_into_head(project)
    assert project.manifest_rows("SELECT status FROM runs") == [("succeeded",)]


def test_a_job_printing_into_a_closed_pipe_loses_no_chunk(project: Project) -> None:
    """The same, for a job's own print(): workers write to the pipe themselves, and their
    BrokenPipeError dead-lettered chunks; the next run succeeded over the hole (a review)."""
    (project.root / "myjobs" / "noisy.py").write_text(
        "import sys\n\ndef noisy(table, ctx):\n"
        "    print('a chunk', file=sys.stderr, flush=True)\n"
        "    print('a chunk', flush=True)\n"
        "    sys.stdout.writelines(['a line\\n'] * 2000)\n"
        "    sys.stdout.buffer.write(b'bytes\\n')\n"
        "    sys.stdout.buffer.flush()\n"
        "    return table\n"
    )
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.noisy:noisy") + "retries = 0\n")
    run_into_head(project)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["list", "--help"]])
def test_help_into_a_closed_pipe_exits_0(args: list[str]) -> None:
    """`minibatch --help | true`: click's own handler of the closed pipe exited 1 (a review)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        argv = [sys.executable, "-m", "minibatch", *args]
        done = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert done.returncode == 0 and not done.stderr, done.stderr


def test_a_run_leaves_nothing_in_the_temp_directory(project: Project) -> None:
    """The quick exit skipped multiprocessing's own clean-up: every `run-now` left a pymp-*
    directory (the forkserver's socket) in /tmp, ~100,000 a year from a 5-minute cron."""
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="mb-", dir="/tmp"))  # short: the socket's path has a limit
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    result = project.cli("run-now", "ident", env={"TMPDIR": str(temp)}, real=True)
    assert result.returncode == 0, result.stderr
    assert list(temp.iterdir()) == []
    temp.rmdir()


@pytest.mark.parametrize(("process", "status"), [("flaky", 0), ("always_fail", 1)])
def test_a_closed_pipe_cuts_the_summary_short_not_the_exit_status(
    project: Project, process: str, status: int
) -> None:
    """`minibatch run-now f | head -1` under `set -o pipefail`: a reader that stops early cut
    the summary short and turned a failed run's exit status into 0."""
    project.write_input("a.parquet", 0, 100)
    project.write_config(faulty_job(process, "retries = 0"))
    argv = [sys.executable, "-m", "minibatch", "--config", str(project.root / "config.toml"), "run-now", "f"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=project.env())
    assert run.stdout is not None
    run.stdout.close()  # the reader is gone before the summary is written
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == status, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}, {}])
def test_no_color_and_a_dumb_terminal_get_plain_log_lines(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from minibatch.log import configure_logging, get_logger

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = Terminal()
    configure_logging("console", stream=out)
    get_logger().info("hello")
    assert ("\x1b[" in out.getvalue()) == (not env), out.getvalue()
    configure_logging("console")


def test_a_job_may_use_its_workers_standard_streams_as_files(project: Project) -> None:
    """A review: wrapping workers' stdout and stderr (above) hid `.buffer`, `.encoding` and
    `.reconfigure`, and a job using them failed every chunk."""
    (project.root / "myjobs" / "streams.py").write_text(
        "import sys\n\ndef streams(table, ctx):\n"
        "    sys.stdout.buffer.write(b'bytes\\n')\n"
        "    print('x'.encode(sys.stdout.encoding), sys.stderr.name, file=sys.stderr)\n"
        "    sys.stderr.reconfigure(line_buffering=True)\n"
        "    return table\n"
    )
    project.write_config(MAP_JOB.replace("myjobs.basic:ident", "myjobs.streams:streams") + "retries = 0\n")
    project.write_input("a.parquet", 0, 300)
    result = project.cli("run-now", "ident")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(project.output_table("ident").column("id").to_pylist()) == list(range(300))
