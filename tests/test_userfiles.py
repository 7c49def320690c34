"""A user's files and directories around a publication (compact.py, userfiles.py): never lost,
never replaced by an older version, and never reached through a symlink the user put in the way."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from minibatch import userfiles


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
