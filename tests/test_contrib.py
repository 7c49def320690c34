"""The monitoring kit in contrib/: promtool checks and unit-tests the alert rules, a real
daemon's /metrics passes `promtool check metrics`, the rules fire on what it serves, and
every metric the rules and the dashboard name is one the daemon serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from minibatch.manifest import Manifest

from conftest import Project, install_jobs, wait_for, watch_stderr

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"
RULES = CONTRIB / "prometheus-alerts.yml"
DASHBOARD = CONTRIB / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

# Metric names in PromQL: ours, the daemon's process_* and Prometheus's own `up`.
METRIC = re.compile(r"\b(?:minibatch|process)_[a-z_]+\b|\bup\b")
SELECTOR = re.compile(r"\b(minibatch_[a-z_]+)(?:\{([^}]*)\})?")
EXACT = re.compile(r'(\w+)="([^"$]*)"')
# A dashboard's Grafana variables, with values that make its queries plain PromQL.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1d",
                "$scrape_job": "minibatch", "$instance": ".*", "$job": ".*"}  # fmt: skip

# "ok" runs at once (a missed hourly fire is caught up); "broken" when data/b*.parquet appears.
JOBS = """
[jobs.ok]
input = "data/a*.parquet"
output = "out/ok"
process = "myjobs.basic:ident"
schedule = "0 * * * *"

[jobs.broken]
input = "data/b*.parquet"
output = "out/broken"
process = "myjobs.faulty:always_fail"
watch = "100ms"
retries = 0
breaker_failures = 0
"""


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_project(root: Path) -> Project:
    install_jobs(root)
    return Project(root=root, count_file=root / "count.txt")


def scrape_when(url: str, daemon: subprocess.Popen[str], err: list[str], needle: str) -> str:
    """Scrape `url` until the exposition contains `needle`; return it."""
    text = ""

    def ready() -> bool:
        nonlocal text
        assert daemon.poll() is None, f"the daemon exited: {''.join(err)}"
        try:
            text = urlopen(url, timeout=5).read().decode()
        except OSError:  # not listening yet
            return False
        return needle in text

    wait_for(ready, what=needle)
    return text


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two scrapes of a real daemon: once "ok" succeeded, and once "broken" failed after it."""
    project = make_project(tmp_path_factory.mktemp("contrib") / "proj")
    port = free_port()
    project.write_input("a.parquet", 0, 200)
    project.write_config(JOBS, engine=f'metrics_addr = "127.0.0.1:{port}"')
    Manifest(project.root / ".state" / "manifest.duckdb").record_fire(
        "ok", datetime.now(UTC) - timedelta(hours=2)
    )
    daemon = project.start("daemon")
    watch_stderr(daemon, "stdout")
    err = watch_stderr(daemon)
    url = f"http://127.0.0.1:{port}/metrics"
    try:  # dead letters are loaded from the manifest once the run has been recorded
        first = scrape_when(url, daemon, err, 'minibatch_dead_letters{job="ok"} 0.0')
        project.write_input("b.parquet", 0, 100)
        second = scrape_when(url, daemon, err, 'minibatch_dead_letters{job="broken"} 1.0')
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    return first, second


def samples(scrape: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(scrape) for s in f.samples]


def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    nested = [p for row in panels for p in row.get("panels", [])]  # collapsed rows hold theirs
    return [p for p in panels + nested if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    queries = [v["definition"] for v in variables if v["type"] == "query"]
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]] + queries


# -- the alert rules ----------------------------------------------------------------------------


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(CONTRIB / "prometheus-alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def stored_series(scrapes: tuple[str, str]) -> list[dict[str, str]]:
    """promtool input series for what Prometheus stores from the two scrapes under the documented
    scrape config (honor_labels: the daemon's `job` kept, job="minibatch" where it has none):
    the first scrape for 5 minutes, then the second for 20; `up` all along."""
    first, second = ({(name, tuple(sorted(labels.items()))): value for name, labels, value in samples(s)}
                     for s in scrapes)  # fmt: skip
    series = [{"series": 'up{instance="daemon:9464", job="minibatch"}', "values": "1+0x25"}]
    for (name, labels), value in second.items():
        before = f"{first[name, labels]:f}+0x4" if (name, labels) in first else "_x4"
        stored = {"job": "minibatch", **dict(labels), "instance": "daemon:9464"}
        matchers = ", ".join(f'{k}="{v}"' for k, v in sorted(stored.items()))
        series.append({"series": f"{name}{{{matchers}}}", "values": f"{before} {value:f}+0x20"})
    return series


@needs_promtool
def test_alerts_fire_on_what_a_real_daemon_serves(scrapes: tuple[str, str], tmp_path: Path) -> None:
    """The job "broken" failed and dead-lettered a chunk after the first scrape: exactly its two
    alerts fire (the failure is its counter's first, at 1), none for "ok" or the daemon."""
    alert = 'ALERTS{{alertname="{}", alertstate="firing", instance="daemon:9464", job="broken", {}}}'
    firing = [
        {"labels": alert.format("MinibatchJobFailed", 'severity="warning", status="failed"'), "value": 1},
        {"labels": alert.format("MinibatchDeadLetters", 'severity="warning"'), "value": 1},
    ]
    query = {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "20m", "exp_samples": firing}
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": stored_series(scrapes), "promql_expr_test": [query]}],
    }
    (tmp_path / "real.test.json").write_text(json.dumps(test))
    result = promtool("test", "rules", str(tmp_path / "real.test.json"))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the daemon's exposition --------------------------------------------------------------------


@needs_promtool
def test_a_real_scrape_passes_promtool_check_metrics(scrapes: tuple[str, str]) -> None:
    """Exit 0 and no lint finding at all: the exposition is clean today, and a finding (a
    counter without _total, a missing HELP, a non-base unit) is a naming slip worth failing on
    before dashboards and rules depend on the name."""
    for scrape in scrapes:
        result = promtool("check", "metrics", stdin=scrape)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "", result.stdout


def test_rules_and_dashboard_use_only_served_metrics(scrapes: tuple[str, str]) -> None:
    """A renamed metric or label value breaks this test rather than a dashboard or an alert.
    The second scrape has every family: a success, a failed run, a dead letter, histograms."""
    served = samples(scrapes[1])
    names = {name for name, _, _ in served} | {"up"}
    texts = {
        "prometheus-alerts.yml": RULES.read_text(),
        "grafana-dashboard.json": "\n".join(dashboard_queries()),
    }
    for source, text in texts.items():
        used = set(METRIC.findall(text))
        assert {"minibatch_runs_total", "minibatch_dead_letters", "up"} <= used, source
        assert used <= names, f"{source} uses metrics the daemon does not serve: {used - names}"
        for metric, matchers in SELECTOR.findall(text):
            for label, value in EXACT.findall(matchers):
                assert any(n == metric and labels.get(label) == value for n, labels, _ in served), (
                    f"{source}: no {metric}{{{label}={value!r}}} in the scrape"
                )


# -- the dashboard ------------------------------------------------------------------------------


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["expr"], panel["title"]
            for metric, matchers in SELECTOR.findall(target["expr"]):  # the variables apply everywhere
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                    f"{panel['title']}: {metric} ignores the job or instance variable"
                )


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, its Grafana variables filled in, as a recording rule `promtool` parses."""
    rules = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            rules.append({"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": expr})
    (tmp_path / "dashboard.rules.json").write_text(json.dumps({"groups": [{"name": "d", "rules": rules}]}))
    result = promtool("check", "rules", str(tmp_path / "dashboard.rules.json"))
    assert result.returncode == 0, result.stdout + result.stderr
