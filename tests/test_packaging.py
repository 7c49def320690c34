"""Shipping: the sdist and the wheel hold the whole package and pass `twine check`; the wheel,
installed outside the checkout, runs the example job and serves the image's HEALTHCHECK with the
compose file's config; the Dockerfile passes hadolint, the CI workflow actionlint (and runs what
.ci/run runs), docker-compose.yml the Compose specification's schema and `docker-compose config`,
and its Prometheus and Grafana are wired to the daemon, the alert rules and the dashboard."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from minibatch.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
CONTRIB = ROOT / "contrib"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# The dev extra's linters install their binaries beside this interpreter, which may not be on PATH.
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
MOUNT_ROOT = Path("/srv/minibatch")  # the image's WORKDIR, where the compose file mounts config and data


def tool(name: str) -> str:
    found = shutil.which(name, path=PATH)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def run(*args: object, cwd: Path = ROOT, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", os.environ | {"PATH": PATH})
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs
    )


def tracked(under: str = ".") -> list[str]:
    """The files git tracks (under a directory) that exist in the work tree."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = run("git", "ls-files", "-z", "--", under).stdout.split("\0")
    return [name for name in names if name and (ROOT / name).is_file()]


def once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A directory that `make` fills once per test session, whichever pytest-xdist worker asks first."""
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the workers
    target = root / f"packaging-{name}"
    with open(root / f"packaging-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".done").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            make(target)
            (target / ".done").touch()
    return target


# -- the sdist and the wheel ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build` (the sdist, then the wheel from it) of the tracked files as they are now,
    copied out of the work tree so that no build/ or egg-info of the checkout takes part."""
    pytest.importorskip("build", reason="build is not installed (pip install -e '.[dev]')")
    files = tracked()

    def make(target: Path) -> None:
        for name in files:
            (target / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / "src" / name)
        result = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", target, target / "src")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return once(tmp_path_factory, "dist", make)


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob(f"minibatch-{VERSION}-py3-none-any.whl")
    return wheel


def test_wheel_and_sdist_hold_every_tracked_package_file(dist: Path) -> None:
    package = tracked("minibatch")
    assert "minibatch/schema.sql" in package and "minibatch/queries.sql" in package
    with zipfile.ZipFile(wheel_of(dist)) as wheel:
        in_wheel = set(wheel.namelist())
        metadata = wheel.read(f"minibatch-{VERSION}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"minibatch-{VERSION}.dist-info/entry_points.txt").decode()
    assert [name for name in package if name not in in_wheel] == []
    with tarfile.open(dist / f"minibatch-{VERSION}.tar.gz") as sdist:
        in_sdist = {name.partition("/")[2] for name in sdist.getnames()}
    assert [name for name in package if name not in in_sdist] == []
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "minibatch = minibatch:entry" in entry_points


def test_twine_check_passes(dist: Path) -> None:
    pytest.importorskip("twine", reason="twine is not installed (pip install -e '.[dev]')")
    result = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.glob("minibatch-*")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


# -- the wheel, installed ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (not editable). The dependencies are this
    environment's: a .pth file appends its site-packages, where .pth files (the editable
    install's finder among them) are not run, and which comes after the venv's own."""

    def make(target: Path) -> None:
        venv = target / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
        python = venv / "bin" / "python"
        install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
        result = run(*install, wheel_of(dist))
        assert result.returncode == 0, result.stdout + result.stderr
        site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
        ours = {sysconfig.get_path(kind) for kind in ("purelib", "platlib")}
        (Path(site) / "_minibatch_test_deps.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))

    return once(tmp_path_factory, "venv", make) / "venv"


def installed_env(tmp_path: Path, venv: Path) -> dict[str, str]:
    """The environment of a deployment: the venv's bin first, no PYTHONPATH, an empty HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MINIBATCH_CONFIG")}
    (tmp_path / "home").mkdir()
    return env | {"PATH": f"{venv / 'bin'}{os.pathsep}{PATH}", "HOME": str(tmp_path / "home")}


def example_project(directory: Path, config: str | None = None) -> Path:
    directory.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "jobs", directory / "jobs", ignore=ignore)
    (directory / "config.toml").write_text(config or (ROOT / "config.toml").read_text())
    return directory


def test_the_installed_wheel_runs_the_example_job(venv: Path, tmp_path: Path) -> None:
    env = installed_env(tmp_path, venv)
    project = example_project(tmp_path / "example")
    python = venv / "bin" / "python"

    found = run(python, "-c", "import minibatch; print(minibatch.__file__, minibatch.__version__)",
                cwd=project, env=env)  # fmt: skip
    assert found.returncode == 0, found.stderr
    where, version = found.stdout.split()
    assert Path(where).is_relative_to(venv) and version == VERSION  # not the checkout's editable copy

    made = run(python, "-m", "jobs.make_data", "--files", "2", "--rows", "3000", "--row-group", "1000",
               cwd=project, env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    ran = run(python, "-m", "minibatch", "--config", project / "config.toml", "run-now", "carrier_delays",
              "--quiet", cwd=project, env=env)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "succeeded" in ran.stdout
    table = pq.read_table(project / "out" / "carrier_delays" / "part-reduced.parquet")
    assert table.column_names == ["carrier", "day", "avg_delay", "flights"]
    assert sum(table["flights"].to_pylist()) == 6000

    shown = run(venv / "bin" / "minibatch", "--version", cwd=project, env=env)
    assert shown.returncode == 0 and shown.stdout.strip() == f"minibatch, version {VERSION}"
    assert list((tmp_path / "home").iterdir()) == []  # nothing written to HOME: fine on a read-only root


PROBE = """
import sys

import pyarrow as pa


def modules(table, ctx):
    loaded = [m for m in ("minibatch.cli", "click", "duckdb") if m in sys.modules]
    return pa.table({"loaded": [" ".join(loaded)]})
"""


def test_the_installed_script_starts_workers_without_the_cli(venv: Path, tmp_path: Path) -> None:
    """multiprocessing runs the script's module again in every worker it starts (as
    `__mp_main__`): a script that imports the CLI there costs each worker ~60 ms before its
    first chunk. Nor does the worker of a job without SQL import DuckDB (~0.13 s of the
    forkserver's start). What the worker holds is what the job sees in `sys.modules`."""
    project = tmp_path / "probe"
    (project / "data").mkdir(parents=True)
    (project / "probe.py").write_text(PROBE)
    pq.write_table(pa.table({"x": [1, 2, 3]}), project / "data" / "a.parquet")
    job = '[jobs.p]\ninput = "data/*.parquet"\noutput = "out/p"\nprocess = "probe:modules"\nworkers = 1\n'
    (project / "config.toml").write_text(job)
    ran = run(venv / "bin" / "minibatch", "--config", project / "config.toml", "run-now", "p", "--quiet",
              cwd=project, env=installed_env(tmp_path, venv))  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert pq.read_table(project / "out" / "p")["loaded"].to_pylist() == [""]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_installed_daemon_passes_the_image_healthcheck_with_the_compose_config(
    venv: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = compose_config_text().replace('"0.0.0.0:9464"', f'"127.0.0.1:{port}"')  # loopback in tests
    assert f"127.0.0.1:{port}" in config
    project = example_project(tmp_path / "srv", config)
    env = installed_env(tmp_path, venv) | {"MINIBATCH_CONFIG": str(project / "config.toml")}  # as the image
    healthcheck = [str(venv / "bin" / "python"), *image_healthcheck()[1:]]
    healthcheck = [arg.replace(":9464/", f":{port}/") for arg in healthcheck]

    assert run(*healthcheck, env=env, cwd=project).returncode != 0  # no daemon yet: unhealthy
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen([venv / "bin" / "minibatch", "daemon"], cwd=project, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (
            run(*healthcheck, env=env, cwd=project).returncode != 0 or "daemon_started" not in log.read_text()
        ):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not healthy within 30 s: {log.read_text()}"
            time.sleep(0.2)
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'minibatch_runs_total{job="carrier_delays",status="failed"}' in metrics
        daemon.send_signal(signal.SIGTERM)  # docker stop
        assert daemon.wait(timeout=30) == 0, log.read_text()
        events = [json.loads(line)["event"] for line in log.read_text().splitlines()]  # log_format = "json"
        assert events[-1] == "daemon_stopped"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert list((tmp_path / "home").iterdir()) == []


# -- Dockerfile ----------------------------------------------------------------------------------


def image_healthcheck() -> list[str]:
    """The HEALTHCHECK's command (exec form) from the Dockerfile."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\s.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    assert match, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    command: list[str] = json.loads(match.group(1))
    return command


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), DOCKERFILE)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_builds_the_wheel_and_runs_the_daemon_as_a_user() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) == 2 and stages[0][1] == "builder"
    assert {image for image, _ in stages} == {"python:${PYTHON_VERSION}-slim"}
    assert re.search(r"^ARG PYTHON_VERSION=3\.1[1-3]$", text, re.M)
    builder, runtime = text.split("\nFROM ")[1:]
    assert "pip wheel" in builder
    assert "--no-index" in runtime and "/wheels/minibatch-*.whl" in runtime and "COPY" not in runtime
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["minibatch"\]$', runtime, re.M)
    assert re.search(r'^CMD \["daemon"\]$', runtime, re.M)
    assert "http://127.0.0.1:9464/metrics" in " ".join(image_healthcheck())
    assert f"MINIBATCH_CONFIG={MOUNT_ROOT}/config.toml" in runtime and f"WORKDIR {MOUNT_ROOT}" in runtime


def test_dockerignore_lets_in_what_the_build_copies_and_little_else() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"  # everything out (.venv, .git, data, state) ...
    copied = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", DOCKERFILE.read_text(), re.M)
    for source in " ".join(copied).split():  # ... but what the builder copies
        assert f"!{source}" in rules, source


# -- the CI workflow -----------------------------------------------------------------------------


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def test_workflow_passes_actionlint() -> None:
    result = run(tool("actionlint"), "-no-color", WORKFLOW.relative_to(ROOT))  # shellcheck on PATH: run too
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_matches_the_github_workflow_schema() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def commands(lines: str) -> set[str]:
    """Shell lines of the checks, without comments or --quiet."""
    found = set()
    for line in lines.splitlines():
        words = [w for w in line.partition(" #")[0].split() if w != "--quiet"]
        if words and words[0] in ("pip", "ruff", "mypy", "python"):
            found.add(" ".join(words))
    return found


def test_workflow_runs_what_ci_run_runs_on_every_supported_python() -> None:
    test = workflow()["jobs"]["test"]
    assert test["strategy"]["matrix"]["python-version"] == ["3.11", "3.12", "3.13"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    steps = "\n".join(step.get("run", "") for step in test["steps"])
    ci_run = {c for c in commands((ROOT / ".ci" / "run").read_text()) if "--upgrade pip" not in c}
    assert ci_run and ci_run <= commands(steps), ci_run - commands(steps)


def test_workflow_installs_the_wheel_outside_the_checkout_and_runs_the_example() -> None:
    steps = "\n".join(step.get("run", "") for step in workflow()["jobs"]["wheel"]["steps"])
    assert "python -m build" in steps and "twine check --strict dist/*" in steps
    assert 'python -m venv "$RUNNER_TEMP/venv"' in steps and 'pip" install dist/*.whl' in steps
    assert "pip install -e" not in steps and 'cd "$example"' in steps
    assert "run-now carrier_delays" in steps and "--version" in steps


# -- docker-compose.yml --------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_config_text() -> str:
    """The config.toml that the compose file gives the daemon."""
    (mounted,) = [c for c in compose()["services"]["minibatch"]["configs"] if c["target"].endswith(".toml")]
    text: str = compose()["configs"][mounted["source"]]["content"]
    return text


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_file_matches_the_compose_specification() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    env = os.environ | {"PATH": PATH, "DOCKER_CONFIG": str(tmp_path)}
    result = run(tool("docker-compose"), "--file", COMPOSE, "config", "--quiet", env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_minibatch_runs_the_image_with_its_state_on_volumes() -> None:
    spec = compose()
    service = spec["services"]["minibatch"]
    assert service["build"] in (".", {"context": "."}) and service["command"] == ["daemon"]
    assert service["init"] is True and int(service["stop_grace_period"].rstrip("s")) > 30
    assert service["healthcheck"]["test"] == ["CMD", *image_healthcheck()]
    assert not service.get("read_only")  # inline configs are copied in, which a read-only root refuses
    (config_mount,) = service["configs"]
    config = parse_config(tomllib.loads(compose_config_text()), Path(config_mount["target"]))
    assert config.base_dir == MOUNT_ROOT and config.engine.metrics_addr == "0.0.0.0:9464"
    volumes = mounts(service)
    named = {target for target, source in volumes.items() if source in spec["volumes"]}
    assert config.engine.state_dir in {Path(t) for t in named}
    for job in config.jobs.values():
        assert any(job.output.is_relative_to(t) and job.output != Path(t) for t in named), job.name
        assert all(any((MOUNT_ROOT / glob).is_relative_to(t) for t in named) for glob in job.inputs), job.name
        if job.process:
            assert volumes[str(MOUNT_ROOT / job.process.split(".")[0])] == "./" + job.process.split(".")[0]
    example = tomllib.loads((ROOT / "config.toml").read_text())
    assert tomllib.loads(compose_config_text())["jobs"] == example["jobs"]  # the example's jobs


def prometheus_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CONTRIB / "prometheus.yml").read_text())
    return loaded


def test_compose_prometheus_loads_the_alert_rules_and_scrapes_the_daemon() -> None:
    service = compose()["services"]["prometheus"]
    volumes = mounts(service)
    config_file = next(a.partition("=")[2] for a in service["command"] if a.startswith("--config.file="))
    assert volumes[config_file] == "./contrib/prometheus.yml"
    config = prometheus_config()
    (rules_at,) = [t for t, s in volumes.items() if s == "./contrib/prometheus-alerts.yml"]
    assert any(fnmatch.fnmatch(rules_at, pattern) for pattern in config["rule_files"])
    (scrape,) = config["scrape_configs"]
    assert scrape["job_name"] == "minibatch" and scrape["honor_labels"] is True  # as the rules assume
    port = tomllib.loads(compose_config_text())["minibatch"]["metrics_addr"].rpartition(":")[2]
    assert scrape["static_configs"] == [{"targets": [f"minibatch:{port}"]}]


def test_prometheus_config_passes_promtool_with_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    config = prometheus_config() | {"rule_files": [str(CONTRIB / "prometheus-alerts.yml")]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run(promtool, "check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 rules found" in result.stdout + result.stderr


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    service = compose()["services"]["grafana"]
    volumes = mounts(service)
    provisioning = "/etc/grafana/provisioning"
    assert volumes[f"{provisioning}/datasources"] == "./contrib/grafana/datasources"
    assert volumes[f"{provisioning}/dashboards"] == "./contrib/grafana/dashboards"
    (sources,) = [yaml.safe_load(p.read_text()) for p in (CONTRIB / "grafana" / "datasources").glob("*.yml")]
    (source,) = sources["datasources"]
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].rpartition(":")[2]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    (providers,) = [yaml.safe_load(p.read_text()) for p in (CONTRIB / "grafana" / "dashboards").glob("*.yml")]
    (provider,) = providers["providers"]
    (dashboard_at,) = [t for t, s in volumes.items() if s == "./contrib/grafana-dashboard.json"]
    assert Path(dashboard_at).parent == Path(provider["options"]["path"]) and dashboard_at.endswith(".json")
    dashboard = json.loads((CONTRIB / "grafana-dashboard.json").read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == "prometheus"  # the default Prometheus data source: the provisioned one
