"""The unit file: systemd accepts it without a word, and its exposure stays low."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[1] / "systemd" / "minibatch.service"
analyze = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(analyze is None, reason="systemd-analyze is absent")


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_has_the_settings_the_daemon_relies_on() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["KillMode"] == ["mixed"] and s["OOMPolicy"] == ["continue"]
    assert s["Restart"] == ["on-failure"] and "WatchdogSec" in s
    assert int(s["TimeoutStopSec"][0]) > 30  # longer than the default stop_grace of 30 s
    assert s["CapabilityBoundingSet"] == [""] and s["NoNewPrivileges"] == ["yes"]
    assert "ExecReload" in s and "HUP" in s["ExecReload"][0]


@needs_systemd
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    minibatch = Path(sys.executable).with_name("minibatch")
    unit = tmp_path / "minibatch.service"
    unit.write_text(UNIT.read_text().replace("/srv/minibatch/.venv/bin/minibatch", str(minibatch)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_systemd
def test_security_exposure_is_at_most_2() -> None:
    result = subprocess.run([analyze, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0
