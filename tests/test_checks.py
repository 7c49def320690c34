"""Row-level checks (warn, drop, quarantine, fail) on real runs: the output and the quarantine
hold exactly the rows they should, once, across a SIGKILL; max_bad_fraction keeps partitions
as they were; output checks keep an earlier reduce result; config errors are named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import Project, wait_for

CHECKED = """
[jobs.c]
input = "data/*.parquet"
output = "out/c"
process = "myjobs.basic:ident"
chunk_bytes = "3KB"
checks = [
  { name = "small", sql = "value < 90", action = "quarantine" },
  { name = "not_five", sql = "value <> 5", action = "drop" },
  { name = "no_tens", sql = "id % 10 <> 0", action = "warn" },
  { name = "named", sql = "name LIKE 'row-%'", action = "fail" },
]
"""


def rows(project: Project, start: int, count: int) -> None:
    project.write_input(f"in{start}.parquet", start, count)


def test_each_action_sorts_the_rows_exactly(project: Project) -> None:
    rows(project, 0, 1000)
    project.write_config(CHECKED)
    result = project.cli("run-now", "c", "-q")
    assert result.returncode == 0, result.stderr
    kept = sorted(ds.dataset(project.out("c"), format="parquet").to_table()["id"].to_pylist())
    assert kept == [i for i in range(1000) if i % 97 < 90 and i % 97 != 5]  # warn keeps its rows
    held = ds.dataset(project.root / "out" / "c.quarantine", format="parquet").to_table()
    assert sorted(held["id"].to_pylist()) == [i for i in range(1000) if i % 97 >= 90]
    assert set(held["_check"].to_pylist()) == {"small", "small,no_tens"}  # every check it failed
    counts = project.manifest_rows("SELECT check_name, action, rows_failed FROM check_counts ORDER BY 1")
    assert counts == [
        ("named", "fail", 0), ("no_tens", "warn", 100), ("not_five", "drop", 11), ("small", "quarantine", 70),
    ]  # fmt: skip
    assert project.manifest_rows("SELECT rows_bad, rows_out FROM runs") == [(81, 919)]
    assert "checks: 81 rows dropped or quarantined; rows failing each: small (quarantine) 70," in (
        project.cli("run-now", "c", "--fresh").stdout
    )
    report = project.cli("report", "c", "-o", str(project.root / "r.html"))
    assert (
        report.returncode == 0
        and "<td>not_five</td><td>drop</td><td>11</td>" in (project.root / "r.html").read_text()
    )
    history = project.cli("history", "c").stdout
    assert "BAD ROWS" in history and " 81 " in history


def test_a_fail_check_dead_letters_the_chunk_and_says_which(project: Project) -> None:
    rows(project, 0, 300)
    project.write_config(CHECKED.replace("name LIKE 'row-%'", "id < 250"))
    result = project.cli("run-now", "c")
    assert result.returncode == 1
    assert "check 'named' (id < 250) failed on 50 of" in result.stdout + result.stderr
    dead = project.manifest_rows("SELECT error_type FROM chunks WHERE status = 'dead'")
    assert dead == [("CheckFailed",)]


def test_quarantine_is_exactly_once_across_a_sigkill(project: Project) -> None:
    for n in range(6):
        rows(project, n * 1000, 300)
    project.write_config(CHECKED)
    process = project.start("run-now", "c", env={"MB_SLEEP": "0.1"})
    wait_for(lambda: len(project.computations()) >= 8, timeout=60, what="some chunks")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert project.cli("run-now", "c", "-q", env={"MB_SLEEP": "0"}).returncode == 0
    ids = [i for n in range(6) for i in range(n * 1000, n * 1000 + 300)]
    held = ds.dataset(project.root / "out" / "c.quarantine", format="parquet").to_table()["id"].to_pylist()
    assert sorted(held) == [i for i in ids if i % 97 >= 90]
    kept = ds.dataset(project.out("c"), format="parquet").to_table()["id"].to_pylist()
    assert sorted(kept) == [i for i in ids if i % 97 < 90 and i % 97 != 5]

    (project.data / "in0.parquet").unlink()  # its quarantined rows go with its results
    assert project.cli("run-now", "c", "-q").returncode == 0
    held = ds.dataset(project.root / "out" / "c.quarantine", format="parquet").to_table()["id"].to_pylist()
    assert sorted(held) == [i for i in ids if i % 97 >= 90 and i >= 1000]


def test_max_bad_fraction_fails_the_run_before_partitions_are_replaced(project: Project) -> None:
    rows(project, 0, 500)
    job = CHECKED + 'partition_by = ["value"]\nmax_bad_fraction = 0.2\n'
    project.write_config(job)
    assert project.cli("run-now", "c", "-q").returncode == 0
    before = {p: p.read_bytes() for p in project.out("c").rglob("*.parquet")}
    project.write_config(job.replace('"value <> 5"', '"value > 40"'))  # now most rows are dropped
    result = project.cli("run-now", "c")
    assert result.returncode == 1
    assert "above max_bad_fraction = 0.2" in result.stdout + result.stderr
    assert {p: p.read_bytes() for p in project.out("c").rglob("*.parquet")} == before
    again = project.cli("run-now", "c")  # hostile review: a rerun with nothing to do published it
    assert again.returncode == 1 and "above max_bad_fraction = 0.2" in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in project.out("c").rglob("*.parquet")} == before


REDUCE = """
[jobs.r]
input = "data/*.parquet"
output = "out/r"
sql = "SELECT id, value FROM chunk"
reduce_sql = "SELECT value, count(*) AS n FROM parts GROUP BY value"
chunk_bytes = "3KB"
output_checks = [{ name = "few", sql = "n <= 4", action = "fail" }]
output_rows_change = 0.5
"""


def test_output_checks_keep_the_published_result(project: Project) -> None:
    rows(project, 0, 300)
    project.write_config(REDUCE)
    assert project.cli("run-now", "r", "-q").returncode == 0
    reduced = project.out("r") / "part-reduced.parquet"
    before = reduced.read_bytes()
    rows(project, 9700, 1)  # value 0 a fifth time: fails `few`
    result = project.cli("run-now", "r")
    assert (
        result.returncode == 1
        and "output check 'few' (n <= 4) failed on 1 rows" in result.stdout + result.stderr
    )
    assert reduced.read_bytes() == before
    (project.data / "in9700.parquet").unlink()
    (project.data / "in0.parquet").unlink()
    rows(project, 0, 40)  # 40 values from 97: outside 50% of the rows before
    result = project.cli("run-now", "r")
    assert result.returncode == 1 and "output_rows_change = 0.5 allows" in result.stdout + result.stderr
    assert pq.read_table(reduced).num_rows == 97


def test_a_reduce_judged_by_max_bad_fraction_is_not_recorded_succeeded_before_it_is_published(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review: the commit that let max_bad_fraction judge every done chunk recorded the
    run `succeeded` before its reduction was published; killed in between, `history` said
    succeeded over the old reduction, a restarted daemon did not resume it, a dependent ran."""
    import minibatch.runner as runner
    from minibatch.manifest import Manifest

    rows(project, 0, 300)
    project.write_config(REDUCE + 'checks = [{ name = "c", sql = "id >= 0", action = "drop" }]\n'
                         + "max_bad_fraction = 0.5\n")  # fmt: skip
    seen: list[str] = []
    publish = runner.publish_if_needed

    def observed(*args: object) -> object:  # the manifest as a kill at this moment leaves it
        seen.extend(r["status"] for r in Manifest(project.root / ".state" / "manifest.duckdb").runs("r"))
        return publish(*args)

    monkeypatch.setattr(runner, "publish_if_needed", observed)
    assert project.cli("run-now", "r", "-q").returncode == 0
    assert seen == ["running"]


def test_check_settings_are_validated(project: Project) -> None:
    rows(project, 0, 10)
    project.write_config(
        """
        [jobs.c]
        input = "data/*.parquet"
        output = "out/c"
        sql = "SELECT * FROM chunk"
        checks = [{ name = "a", sql = "x > 0", action = "shout" }, { name = "a b", sql = "x" }, "nope",
                  { name = "d", sql = "day = $date" }]
        max_bad_fraction = 2
        output_checks = [{ name = "o", sql = "x > 0" }]
        quarantine = "q"
        """
    )
    result = project.cli("validate")
    assert result.returncode == 2
    for expected in (
        "jobs.c.checks[0]: action must be one of warn, drop, quarantine, fail, got 'shout'",
        "jobs.c.checks[1]: name must be a unique identifier",
        "jobs.c.checks[2]: expected {",
        "jobs.c.max_bad_fraction: must be between 0 and 1, got 2",
        "jobs.c.output_checks: apply to a reduce job's result",
        'jobs.c.quarantine: no check has action = "quarantine"',
        # hostile review: it passed, and DuckDB refused every chunk ("Values were not provided")
        "jobs.c.checks[3]: sql 'day = $date' uses $date: checks take no parameters",
    ):
        assert expected in result.stderr, expected


def test_review_a_window_check_judges_each_row_by_its_own_values() -> None:
    """Hostile review: DuckDB reorders rows for a window; verdicts were paired with the wrong rows."""
    import pyarrow as pa

    from minibatch.checks import Check, apply_checks

    table = pa.table({"k": [1, 2, 1, 2, 1] * 400, "v": list(range(2000))})
    checked = apply_checks(table, (Check("low", "v <= avg(v) OVER (PARTITION BY k)", "quarantine"),))
    means = {k: sum(v for kk, v in zip(table["k"].to_pylist(), range(2000), strict=True) if kk == k)
             / table["k"].to_pylist().count(k) for k in (1, 2)}  # fmt: skip
    assert checked.quarantined is not None
    assert sorted(checked.quarantined["v"].to_pylist()) == [
        v for k, v in zip(table["k"].to_pylist(), range(2000), strict=True) if v > means[k]
    ]


def test_review_a_check_that_unnests_is_refused_for_what_it_is() -> None:
    """Hostile review: refused, but as "not an aggregate", which it is not."""
    import pyarrow as pa

    from minibatch.checks import Check, apply_checks

    with pytest.raises(ValueError, match=r"gave 6 verdicts for 3 rows \(a set-returning function"):
        apply_checks(pa.table({"v": [1, 5, 9]}), (Check("big", "unnest([v, 20]) > 3", "drop"),))


def test_review_a_check_whose_action_changed_leaves_no_stale_quarantine(project: Project) -> None:
    """Hostile review: rows stayed in the quarantine after the check stopped quarantining them,
    and were in the output too."""
    rows(project, 0, 300)
    project.write_config(CHECKED)
    assert project.cli("run-now", "c", "-q").returncode == 0
    quarantine = project.root / "out" / "c.quarantine"
    assert list(quarantine.glob("*.parquet"))
    project.write_config(CHECKED.replace('action = "quarantine"', 'action = "warn"'))
    assert project.cli("run-now", "c", "-q").returncode == 0
    assert not list(quarantine.glob("*.parquet"))
    kept = ds.dataset(project.out("c"), format="parquet").to_table()["id"].to_pylist()
    assert sorted(kept) == [i for i in range(300) if i % 97 != 5]


def test_review_a_moved_quarantine_holds_every_quarantined_row_once(project: Project) -> None:
    """Hostile review: `quarantine = "q2"` set on a job that had run recomputed nothing: q2
    held only the rows of chunks computed after, the old directory the rest; moved back, q2 kept
    rows of inputs since rewritten beside their new versions in the default directory."""
    rows(project, 0, 300)
    project.write_config(CHECKED)
    assert project.cli("run-now", "c", "-q").returncode == 0
    default, moved = project.root / "out" / "c.quarantine", project.root / "q2"
    expected = [i for i in range(300) if i % 97 >= 90]
    project.write_config(CHECKED.replace("[jobs.c]", '[jobs.c]\nquarantine = "q2"'))
    assert project.cli("run-now", "c", "-q").returncode == 0
    assert sorted(ds.dataset(moved, format="parquet").to_table()["id"].to_pylist()) == expected
    assert not list(default.glob("*.parquet"))  # minibatch's own default directory: emptied
    rows(project, 0, 250)  # rewritten: its rows 250.. are gone
    project.write_config(CHECKED)
    assert project.cli("run-now", "c", "-q").returncode == 0
    held = ds.dataset(default, format="parquet").to_table()["id"].to_pylist()
    assert sorted(held) == [i for i in range(250) if i % 97 >= 90]


def test_review_quarantine_paths_and_check_sql_are_refused_up_front(project: Project) -> None:
    rows(project, 0, 10)
    other = """
    [jobs.d]
    input = "data/*.parquet"
    output = "out/d"
    sql = "SELECT 1"
    checks = [{ name = "q", sql = "x > 0", action = "quarantine" }]
    quarantine = "data/q"
    """
    project.write_config(CHECKED.replace("[jobs.c]", '[jobs.c]\nquarantine = "out/c"') + other)
    result = project.cli("validate")
    assert result.returncode == 2
    assert "jobs.c.quarantine:" in result.stderr and "overlaps the job's output" in result.stderr
    assert "jobs.d.quarantine:" in result.stderr and "inside the directory of input glob" in result.stderr
    project.write_config(CHECKED.replace("value < 90", "value <"))
    result = project.cli("validate")
    assert result.returncode == 2 and "jobs.c.checks[0]: sql 'value <' does not parse" in result.stderr
    project.write_config(CHECKED.replace("value < 90", "value < avg(value)"))
    result = project.cli("run-now", "c")
    assert result.returncode == 1 and "a check is a condition on each row, not an aggregate" in result.stdout


def test_review_parameter_sets_keep_their_own_quarantine(project: Project) -> None:
    """Second review: every date wrote to one directory literally named `{date}.quarantine`."""
    for day in ("2026-11-01", "2026-11-02"):
        folder = project.data / day
        folder.mkdir(parents=True)
        project.write_input(f"{day}/in.parquet", 0 if day.endswith("1") else 1000, 200)
    job = CHECKED.replace('input = "data/*.parquet"', 'input = "data/{date}/*.parquet"')
    project.write_config(job.replace('output = "out/c"', 'output = "out/c/{date}"'))
    for day in ("2026-11-01", "2026-11-02", "2026-11-01"):
        assert project.cli("run-now", "c", "-q", "--param", f"date={day}").returncode == 0
    for day, start in (("2026-11-01", 0), ("2026-11-02", 1000)):
        held = ds.dataset(project.root / "out" / "c" / f"{day}.quarantine", format="parquet").to_table()
        assert sorted(held["id"].to_pylist()) == [i for i in range(start, start + 200) if i % 97 >= 90]


def test_review_no_job_cleans_a_directory_it_did_not_make(project: Project) -> None:
    """Second review: a job without checks removed part files from `<its output>.quarantine`,
    another job's output there."""
    rows(project, 0, 300)
    project.write_config(
        MAP_PLAIN + MAP_PLAIN.replace("[jobs.a]", "[jobs.b]").replace("out/a", "out/a.quarantine")
    )
    result = project.cli("validate")
    assert result.returncode == 2 and "jobs" in result.stderr  # outputs may not overlap
    mine = project.root / "out" / "a.quarantine"
    mine.mkdir(parents=True)
    (mine / "part-0123456789abcdef01234567.parquet").write_bytes(b"not minibatch's")
    project.write_config(MAP_PLAIN)
    assert project.cli("run-now", "a", "-q").returncode == 0
    assert project.cli("reset", "a", "--yes").returncode == 0
    assert (mine / "part-0123456789abcdef01234567.parquet").read_bytes() == b"not minibatch's"


MAP_PLAIN = """
[jobs.a]
input = "data/*.parquet"
output = "out/a"
sql = "SELECT * FROM chunk"
"""


def test_checks_turn_no_python_value_into_arrow(tmp_path: Path) -> None:
    """A SQL job's workers never import pandas, but the checks did (a Python list per chunk made
    pyarrow import it where installed: ~0.5 s and ~50 MiB in each worker)."""
    pytest.importorskip("pandas")
    pq.write_table(pa.table({"v": range(8)}), tmp_path / "v.parquet")  # read back: no conversion there
    code = (
        "import sys, pyarrow.parquet as pq; from minibatch.checks import Check, apply_checks; "
        f"table = pq.ParquetFile({str(tmp_path / 'v.parquet')!r}).read(); "
        "checks = (Check('small', 'v < 5', 'drop'), Check('odd', 'v % 2 = 1', 'warn')); "
        "checked = apply_checks(table, checks); "
        "print(checked.table['v'].to_pylist(), checked.failed, 'pandas' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[0, 1, 2, 3, 4] {'small': 3, 'odd': 4} False"


def test_review_a_quarantine_among_minibatchs_own_directories_is_refused(project: Project) -> None:
    """Third review: a quarantine in the job's own parts or staging directory, or in another
    job's, passed validate; the parts overwrote its rows, or the next run's cleanup took them."""
    rows(project, 0, 10)
    for place, said in (
        ("out/.c.minibatch-parts", "jobs.c.quarantine: {q} overlaps the job's parts"),
        ("out/.c.minibatch-staging/q", "jobs.c.quarantine: {q} overlaps the job's staging"),
        ("out/.a.minibatch-staging/q", "jobs.c.output: {o} overlaps the output of job 'a'"),
    ):
        project.write_config(CHECKED.replace("[jobs.c]", f'[jobs.c]\nquarantine = "{place}"') + MAP_PLAIN)
        result = project.cli("validate")
        expected = said.format(q=project.root / place, o=project.out("c"))
        assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_review_a_symlinked_or_shared_quarantine_is_refused(project: Project, tmp_path: Path) -> None:
    """Third review: `<output>.quarantine` as a symlink to another job's output had the
    quarantine written over that output; two configs naming one quarantine directory each
    deleted the other's rows."""
    rows(project, 0, 300)
    project.write_config(MAP_PLAIN + CHECKED)
    assert project.cli("run-now", "a", "-q").returncode == 0
    theirs = sorted(p.read_bytes() for p in project.out("a").glob("*.parquet"))
    (project.root / "out" / "c.quarantine").symlink_to("a")
    result = project.cli("run-now", "c")
    assert result.returncode == 2 and "c.quarantine is a symlink" in result.stderr, result.stderr
    assert sorted(p.read_bytes() for p in project.out("a").glob("*.parquet")) == theirs
    (project.root / "out" / "c.quarantine").unlink()

    shared = CHECKED.replace("[jobs.c]", '[jobs.c]\nquarantine = "../rejected"')
    project.write_config(shared)
    assert project.cli("run-now", "c", "-q").returncode == 0
    held = sorted(p.read_bytes() for p in (project.root.parent / "rejected").glob("*.parquet"))
    assert held
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text((project.root / "config.toml").read_text())
    (other / "data").symlink_to(project.data)
    (other / "myjobs").symlink_to(project.root / "myjobs")
    for _ in range(2):  # and after a --fresh run of the first (it kept its claim)
        result = project.cli("--config", str(other / "config.toml"), "run-now", "c")
        assert result.returncode == 2 and "is the quarantine of c with the state_dir" in result.stderr
        assert project.cli("run-now", "c", "--fresh", "-q").returncode == 0
        assert sorted(p.read_bytes() for p in (project.root.parent / "rejected").glob("*.parquet")) == held
