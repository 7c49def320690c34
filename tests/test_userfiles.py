"""A user's files and directories around a publication (compact.py, userfiles.py): never lost,
never replaced by an older version, and never reached through a symlink the user put in the way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minibatch import compact, userfiles

from conftest import Project

MAP = """
[jobs.p]
input = "data/*.parquet"
output = "out/p"
sql = "SELECT * FROM chunk"
partition_by = ["day"]
target_file_bytes = "6KB"
"""
REDUCE = """
[jobs.p]
input = "data/*.parquet"
output = "out/p"
sql = "SELECT * FROM chunk"
reduce_sql = "SELECT day, count(*)::BIGINT AS n FROM parts GROUP BY day"
partition_by = ["day"]
"""
DAY = "day=2026-11-01"


def write(project: Project, name: str, ids: range) -> None:
    project.data.mkdir(exist_ok=True)
    days = [f"2026-11-0{1 + i % 2}" for i in ids]
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "day": days}), project.data / name)


def first_run(project: Project, job: str) -> Path:
    write(project, "a.parquet", range(0, 100))
    project.write_config(job)
    assert project.cli("run-now", "p", "-q").returncode == 0
    write(project, "b.parquet", range(100, 200))  # the next run rebuilds both days
    return project.out("p") / DAY


def on_exchange(monkeypatch: pytest.MonkeyPatch, unit: Path, act: Callable[[], None], after: bool) -> None:
    real, done = compact.exchange, []

    def exchange(staged: Path, target: Path) -> None:
        first = target == unit and not done
        if first:
            done.append(True)
        if first and not after:
            act()
        real(staged, target)
        if first and after:
            act()

    monkeypatch.setattr(compact, "exchange", exchange)


@pytest.mark.parametrize("job", [MAP, REDUCE])
def test_a_users_file_saved_after_the_swap_is_not_replaced_by_its_old_version(
    project: Project, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    """Hostile review: a file the user saved anew (written beside, renamed over) between the swap
    and the rescue of the unit swapped out got its old version moved back over it, exit 0."""
    unit = first_run(project, job)
    notes = unit / "USER_notes.txt"
    notes.write_text("version 1")
    whole = job == REDUCE

    def save() -> None:
        (unit / ".tmp").write_text("version 2")
        os.replace(unit / ".tmp", notes)

    on_exchange(monkeypatch, project.out("p") if whole else unit, save, after=True)
    assert project.cli("run-now", "p", "-q").returncode == 0
    assert notes.read_text() == "version 2"
    assert (unit / "USER_notes.txt.1").read_text() == "version 1"  # the old one beside, not lost


def test_a_partition_made_a_symlink_during_the_build_is_not_followed(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review: a partition directory replaced by a symlink while the new one was built
    was swapped out, the rescue moved the files of the directory it points to into the output,
    and the symlink was deleted as staging's leftover."""
    unit = first_run(project, MAP)
    victim = project.root / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("not the output's")

    def link() -> None:
        unit.rename(unit.with_name("moved_by_user"))
        unit.symlink_to(victim)

    on_exchange(monkeypatch, unit, link, after=False)
    result = project.cli("run-now", "p")
    said = result.stdout + result.stderr
    assert result.returncode == 1 and f"{unit} is not a directory minibatch made" in said, said
    assert [p.name for p in victim.iterdir()] == ["secret.txt"]
    assert unit.is_symlink() and os.readlink(unit) == str(victim)  # the user's link, back in its place


def test_a_partition_made_a_symlink_before_it_is_removed_is_not_followed(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, for a partition left without rows (renamed out of the output whole)."""
    unit = first_run(project, MAP)
    (project.data / "b.parquet").unlink()
    write(project, "a.parquet", range(1, 100, 2))  # day 1 has no rows now
    victim = project.root / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("not the output's")
    real_rename = os.rename

    def rename(source: str | Path, destination: str | Path) -> None:
        if Path(source) == unit:
            real_rename(unit, unit.with_name("moved_by_user"))
            unit.symlink_to(victim)
        real_rename(source, destination)

    monkeypatch.setattr(compact.os, "rename", rename)
    result = project.cli("run-now", "p")
    said = result.stdout + result.stderr
    assert result.returncode == 1 and f"{unit} is not a directory minibatch made" in said, said
    assert [p.name for p in victim.iterdir()] == ["secret.txt"]
    assert unit.is_symlink() and os.readlink(unit) == str(victim)


def swap_for_link_on_first(
    monkeypatch: pytest.MonkeyPatch, names: list[str], directory: Path, victim: Path
) -> None:
    """At the first call of os.<name> on `directory` (by path or by descriptor), the user puts
    a symlink to `victim` in its place: the race, widened to certain."""
    done: list[bool] = []
    for name in names:
        real = getattr(os, name)

        def wrapped(target: object, *args: object, real: Callable[..., None] = real, **kw: object) -> None:
            path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else str(target)
            if not done and path == str(directory):
                done.append(True)
                directory.rename(directory.with_name("moved_by_user"))
                directory.symlink_to(victim)
            real(target, *args, **kw)

        monkeypatch.setattr(userfiles.os, name, wrapped)


@pytest.mark.parametrize("step", ["keep_attributes", "remove_tree"])
def test_owner_and_mode_are_never_set_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Hostile review: keep_attributes chowned and chmodded, and remove_tree chmodded, each
    directory by path: a symlink the user put in a directory's place in between had the
    directory it points to given the user's owner and mode."""
    old, new, victim = tmp_path / "old", tmp_path / "new", tmp_path / "victim"
    for top in (old, new):
        (top / "sub").mkdir(parents=True)
    victim.mkdir(mode=0o700)
    os.chmod(victim, 0o700)
    os.chmod(old / "sub", 0o555)
    before = os.stat(victim)
    if step == "keep_attributes":
        swap_for_link_on_first(monkeypatch, ["chown", "fchown"], new / "sub", victim)
        userfiles.keep_attributes(old, new)
    else:
        swap_for_link_on_first(monkeypatch, ["chmod", "fchmod"], old / "sub", victim)
        userfiles.remove_tree(old)
    after = os.stat(victim)
    assert [after.st_mode, after.st_uid, after.st_mtime_ns] == [
        before.st_mode,
        before.st_uid,
        before.st_mtime_ns,
    ]
    assert (victim.exists(), victim.is_symlink()) == (True, False)


def test_a_link_refused_to_the_user_is_a_copy_and_the_original_comes_back(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile review: with fs.protected_hardlinks, a file of the output the running user neither
    owns nor may write (a group member's 0644 file) cannot be linked into the new output: the
    publication failed on it, every run. The link is refused here as the kernel would."""
    unit = first_run(project, REDUCE)
    theirs = unit / "USER_theirs.txt"
    theirs.write_text("a colleague's")
    os.chown(theirs, 1234, 1234)
    real_link = os.link

    def link(source: str | Path, destination: str | Path, **kwargs: bool) -> None:
        if os.lstat(source).st_uid == 1234:
            raise PermissionError(1, "Operation not permitted", str(source))
        real_link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", link)
    result = project.cli("run-now", "p")
    assert result.returncode == 0, result.stdout + result.stderr
    assert theirs.read_text() == "a colleague's" and os.stat(theirs).st_uid == 1234  # the original itself
    assert sorted(p.name for p in unit.iterdir() if not p.name.endswith(".parquet")) == ["USER_theirs.txt"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs to drop root's powers")
@pytest.mark.skipif(Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1", reason="kernel")
def test_another_users_file_in_a_shared_output_blocks_no_publication(project: Project) -> None:
    """The same with the kernel's own refusal: a run without root's power over modes."""
    unit = first_run(project, REDUCE)
    theirs, shared = unit / "USER_theirs.txt", project.out("p") / "shared"
    shared.mkdir()
    for path in (theirs, shared / "USER_theirs.txt"):
        path.write_text("a colleague's")
        os.chown(path, 1234, 1234)
    os.chown(shared, 1234, 1234)
    config = str(project.root / "config.toml")
    argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", sys.executable, "-m"]
    argv += ["minibatch", "--config", config, "run-now", "p"]
    result = subprocess.run(argv, capture_output=True, text=True, env=project.env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (theirs, shared / "USER_theirs.txt"):
        assert path.read_text() == "a colleague's"
    assert os.stat(theirs).st_uid == 1234  # moved back: the colleague's own file, not a copy
