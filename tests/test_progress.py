"""The progress bar on an 80-column terminal keeps what matters: chunks done of the total and
the time left (the rates are what gets cut)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from rich.console import Console

from minibatch.events import Emitter
from minibatch.progress import BarProgress
from minibatch.states import EventKind


def test_an_80_column_bar_shows_the_total_and_the_time_left() -> None:
    screen = io.StringIO()
    bar = BarProgress(Console(file=screen, width=80, force_terminal=True, color_system=None))
    emit = Emitter([bar]).bind("carrier_delays", "r")
    emit(EventKind.RUN_STARTED, memory_limit=2**30)
    emit(EventKind.RUN_PLANNED, todo=1234)
    for _ in range(10):
        emit(EventKind.CHUNK_DONE, rows=100_000, bytes_in=10**7, in_flight=2**27)
    bar.progress.refresh()
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen.getvalue())  # cursor moves, erase line
    line = text.replace("\r", "\n").strip().splitlines()[-1]
    bar.run_finished(None)  # type: ignore[arg-type]
    assert "10/1234" in line
    assert any(part.count(":") == 2 for part in line.split())  # elapsed and remaining, h:mm:ss
    assert len(line) <= 80


def test_the_cli_loads_without_rich_and_the_bar_and_embedders_still_get_it() -> None:
    """structlog imports rich when it is installed (~0.13 s of every command's start-up) for
    pretty tracebacks the CLI does not use; the bar imports it when it draws. A program that
    imports the API keeps rich tracebacks in its own structlog logs."""
    cli = (
        "import sys, minibatch; minibatch._load_cli(); assert 'rich' not in sys.modules, 'rich loaded'; "
        "from minibatch.progress import BarProgress; import rich.progress; print('ok')"
    )
    api = "import minibatch.log, structlog.dev; assert structlog.dev.rich, 'rich hidden'; print('ok')"
    for code in (cli, api):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.stdout.strip() == "ok", result.stderr


def test_a_log_line_written_while_the_bar_shows_stays_on_one_line() -> None:
    """Log lines go above the live bar through rich, which wrapped them at the terminal's width:
    a JSON log line on an 80-column terminal came out as two lines, neither of them JSON."""
    screen = io.StringIO()
    bar = BarProgress(Console(file=screen, width=80, force_terminal=True, color_system=None))
    emit = Emitter([bar]).bind("carrier_delays", "r")
    emit(EventKind.RUN_STARTED, memory_limit=2**30)
    emit(EventKind.RUN_PLANNED, todo=10)
    line = '{"event": "chunk_done", "label": "' + "x" * 150 + '"}'
    sys.stderr.write(line + "\n")  # where the log's stream writes (the bar redirects stderr)
    sys.stderr.flush()
    bar.run_finished(None)  # type: ignore[arg-type]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).replace("\r", "\n")
    assert line in text.splitlines()
