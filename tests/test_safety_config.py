"""Configs that would destroy the project, a reset nobody confirmed, and config values or files
that must end in one readable line (exit 2), never in a traceback or a deleted directory."""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MAP_JOB, Project


def said(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (but bytecode caches and the state_dir) and its bytes."""
    files = {str(p.relative_to(directory)): p for p in directory.rglob("*") if p.is_file()}
    return {
        name: path.read_bytes()
        for name, path in files.items()
        if "__pycache__" not in name and not name.startswith(".state") and name != "mb_env.json"
    }


# -- I. outputs that would destroy the project -----------------------------------------------


def _project_as_output(project: Project, tmp_path: Path) -> tuple[str, ...]:
    """output = "." with the inputs and the state_dir elsewhere: nothing else stops it."""
    ext = tmp_path / "ext"
    ext.mkdir()
    pq.write_table(pa.table({"id": [1], "value": [2]}), ext / "e.parquet")
    (project.root / "config.toml").write_text(f"""
[minibatch]
state_dir = "{tmp_path / "state"}"
workers = 2
log_format = "json"

[jobs.ident]
input = "{ext}/*.parquet"
output = "."
process = "myjobs.basic:ident"
""")
    return ("jobs.ident.output",)


def _project_as_output_beside_data(project: Project, tmp_path: Path) -> tuple[str, ...]:
    project.write_config(MAP_JOB.replace('"out/ident"', '"."'))
    return ("jobs.ident.output",)


def _job_code_as_output(project: Project, tmp_path: Path) -> tuple[str, ...]:
    project.write_config(MAP_JOB.replace('"out/ident"', '"myjobs"'))
    return ("jobs.ident.output",)


def _inside_another_jobs_output(project: Project, tmp_path: Path) -> tuple[str, ...]:
    project.write_config(
        MAP_JOB.replace('"out/ident"', '"out/all/inner"')
        + """
    [jobs.outer]
    input = "data/*.parquet"
    output = "out/all"
    sql = "SELECT * FROM chunk"
    """
    )
    (project.root / "out" / "all").mkdir(parents=True)
    pq.write_table(pa.table({"id": [1]}), project.root / "out" / "all" / "part-x.parquet")
    return ("jobs.ident.output", "jobs.outer.output")  # either job's key names the overlap


@pytest.mark.parametrize(
    "setup",
    [_project_as_output, _project_as_output_beside_data, _job_code_as_output, _inside_another_jobs_output],
)
def test_output_that_would_destroy_the_project_is_refused(project: Project, tmp_path: Path, setup) -> None:
    project.write_input("a.parquet", 0, 100)
    keys = setup(project, tmp_path)
    before = snapshot(project.root)
    check = project.cli("validate")
    assert check.returncode == 2, said(check)
    assert any(key in said(check) for key in keys), said(check)
    assert "Traceback" not in said(check)
    reset = project.cli("reset", "ident", "--yes")
    assert reset.returncode == 2, said(reset)
    for name in ("config.toml", "myjobs/basic.py", "data/a.parquet"):
        assert (project.root / name).is_file(), name
    assert snapshot(project.root) == before


# -- J. reset needs a confirmation -----------------------------------------------------------


def test_reset_without_yes_and_without_a_terminal_refuses(project: Project) -> None:
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 300)
    assert project.cli("run-now", "ident").returncode == 0
    before = snapshot(project.out("ident"))
    assert before
    result = project.cli("reset", "ident", input="n\n")
    assert result.returncode == 2, said(result)
    assert snapshot(project.out("ident")) == before
    # on a terminal, answering no (or Ctrl-D) was "Aborted!" with exit 1, a failed run's status
    for answer in (b"n\n", b"\x04"):
        pid, terminal = pty.fork()
        if pid == 0:  # the child: minibatch on the terminal
            argv = [
                sys.executable,
                "-m",
                "minibatch",
                "--config",
                str(project.root / "config.toml"),
                "reset",
                "ident",
            ]
            os.execvpe(sys.executable, argv, project.env())
        said_so = b""
        while b"?" not in said_so:
            said_so += os.read(terminal, 1024)
        os.write(terminal, answer)
        with contextlib.suppress(OSError):  # the terminal closes with the child
            while chunk := os.read(terminal, 1024):
                said_so += chunk
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 2, said_so
        assert b"nothing removed" in said_so and b"Traceback" not in said_so
    assert snapshot(project.out("ident")) == before


# -- K. config values and files that must be one readable line -------------------------------


@pytest.mark.parametrize("level", ["engine", "job"])
def test_absurd_memory_limit_is_a_config_error(project: Project, level: str) -> None:
    if level == "engine":
        project.write_config(MAP_JOB, engine="memory_limit = 1e300")
    else:
        project.write_config(MAP_JOB + "memory_limit = 1e300\n")
    project.write_input("a.parquet", 0, 100)
    for command in ("validate", "run-now"):
        result = project.cli(command, *(["ident"] if command == "run-now" else []))
        assert result.returncode == 2, (command, said(result))
        assert "memory_limit" in result.stderr, (command, said(result))
        assert "Traceback" not in said(result), command


def test_a_state_dir_path_duckdb_cannot_hold_is_a_config_error(project: Project) -> None:
    """Hostile review: with a `?` in its path (DuckDB reads what follows as the file's options)
    the manifest's WAL went elsewhere: every run failed, `repair` set the manifest aside and
    failed alike, read commands printed tracebacks, `backup` copied an empty manifest."""
    project.write_config(MAP_JOB)
    config = project.root / "config.toml"
    config.write_text(config.read_text().replace('state_dir = ".state"', 'state_dir = "st?ate"'))
    project.write_input("a.parquet", 0, 100)
    for command in (["validate"], ["run-now", "ident"], ["status"], ["history"]):
        result = project.cli(*command)
        assert result.returncode == 2, (command, said(result))
        assert "minibatch.state_dir: " in result.stderr and "'?'" in result.stderr, (command, said(result))
        assert "Traceback" not in said(result), command
    assert not (project.root / "st?ate").exists()


def test_config_that_is_not_utf8_is_a_config_error(project: Project) -> None:
    config = project.root / "config.toml"
    config.write_bytes(b"\xff\xfe[minibatch]\n")
    for command in ("validate", "run-now"):
        result = project.cli(command, *(["ident"] if command == "run-now" else []))
        assert result.returncode == 2, (command, said(result))
        assert str(config) in result.stderr, (command, said(result))
        assert "Traceback" not in said(result), command


def test_what_a_jobs_sql_creates_while_it_is_checked_is_gone_after(project: Project) -> None:
    """The SQL check shares one DuckDB per process (the daemon checks every run): a macro that
    one check creates must not make the next check fail with "already exists"."""
    from minibatch.config import load_config
    from minibatch.validate import check_imports

    project.write_config("""
    [jobs.m]
    input = "data/*.parquet"
    output = "out/m"
    sql = "CREATE MACRO plus1(a) AS a + 1; SELECT id, plus1(id) AS n FROM chunk"
    """)
    project.write_input("a.parquet", 0, 10)
    config = load_config(project.root / "config.toml")
    check_imports(config)
    check_imports(config)  # raised ConfigError ("plus1 already exists") without the rollback


def test_an_output_that_is_a_file_is_a_config_error_and_nothing_is_made(project: Project) -> None:
    """Hostile review: a run-now exited 1 with "File exists", left a staging directory beside
    the user's file and recorded a crashed run; validate said OK."""
    project.write_config(MAP_JOB)
    project.write_input("a.parquet", 0, 100)
    project.root.joinpath("out").mkdir()
    project.out("ident").write_text("a user's file")
    for command in (("validate",), ("run-now", "ident")):
        result = project.cli(*command)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"output {project.out('ident')} is a file, not a directory" in result.stderr
    assert project.out("ident").read_text() == "a user's file"
    assert sorted(p.name for p in project.root.joinpath("out").iterdir()) == ["ident"]
    assert project.cli("history", "ident", "--json").stdout.strip() == "[]"  # no run recorded
