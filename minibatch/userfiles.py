"""What in an output is the user's when minibatch rewrites it: its own files are known by name
(`ours`); a user's file in a unit swapped out goes back (`rescue`); a directory minibatch made
in staging goes whole (`remove_tree`)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import stat
from pathlib import Path

from minibatch.hive import FILE_RE

REDUCED_NAME = "part-reduced.parquet"
PART_RE = re.compile(r"^part-[0-9a-f]{24}\.parquet$")
NOTE_SUFFIX = ".unit"  # beside a unit swapped out in staging: which unit it was
WHOLE_PREFIX = "whole-"  # in staging: a whole output built to be swapped in at once


def ours(name: str) -> bool:
    return bool(PART_RE.match(name) or FILE_RE.match(name)) or name == REDUCED_NAME


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dir(path: Path | str, dir_fd: int | None = None, flags: int = os.O_RDONLY) -> int | None:
    """A real directory opened, never through a symlink in its place; None if it is not one."""
    try:
        return os.open(path, flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def rescue(old: Path, live: Path, top: bool = True, anywhere: bool = False, overwrite: bool = True) -> None:
    """Move into `live` what in `old` (a unit swapped out or removed) is not minibatch's and not
    already in `live` as the same file (carried over, linked): a user's file made or replaced in
    the unit while it was rebuilt. (One deleted meanwhile comes back, carried over.) Minibatch's
    own files are at a unit's top; a directory below holds only what it carried over. A whole
    output swapped out (`anywhere`) has minibatch's files in its partitions too: they stay.
    Without `overwrite`, a file goes beside one of the name in `live`, not over it."""
    moved = False
    for entry in os.scandir(old) if old.is_dir() else []:  # not there: nothing was swapped out
        there, is_dir = live / entry.name, entry.is_dir(follow_symlinks=False)
        below = anywhere and top and "=" in entry.name  # a partition of a whole output: its files are too
        if is_dir and there.is_dir() and not there.is_symlink():
            rescue(Path(entry.path), there, below, anywhere, overwrite)
            continue
        if not is_dir and ((top and ours(entry.name)) or _same_file(entry, there)):
            continue
        if os.path.lexists(there) and (is_dir or there.is_dir() or not overwrite):
            # a file became a directory, or the other way round: both are kept, the newer as name.N
            names = (live / f"{entry.name}.{n}" for n in itertools.count(1))
            there = next(name for name in names if not os.path.lexists(name))
        if is_dir and anywhere:  # a partition gone from the new result: only a user's files go back
            rescue(Path(entry.path), there, below, anywhere, overwrite)
            continue
        live.mkdir(parents=True, exist_ok=True)
        os.replace(entry.path, there)
        moved = True
    if moved:
        fsync_dir(live)


def _same_file(entry: os.DirEntry[str], path: Path) -> bool:
    return os.path.lexists(path) and os.path.samestat(entry.stat(follow_symlinks=False), path.lstat())


def keep_attributes(old: Path, new: Path) -> None:
    """Each directory of `new` (just swapped in, built by this run's user with its umask) gets
    the owner, group, mode and times of its counterpart in `old` (swapped out), when it has one:
    a private or group-shared output stays so. After the swap: a directory whose mode lacks
    write could not have been filled, nor moved. Through descriptors of real directories only:
    a symlink put in a directory's place meanwhile is never followed."""
    fd = open_dir(new)
    if fd is not None:
        _keep_attributes(fd, open_dir(old, flags=os.O_PATH))


def _keep_attributes(fd: int, before: int | None) -> None:
    """The attributes of `before` (None: no counterpart) onto `fd`, below first; closes both."""
    try:
        with os.scandir(fd) as listing:
            names = [entry.name for entry in listing if entry.is_dir(follow_symlinks=False)]
        for name in names:
            if (child := open_dir(name, fd)) is not None:
                _keep_attributes(child, None if before is None else open_dir(name, before, os.O_PATH))
        if before is not None:
            _copy_attributes(os.fstat(before), fd)
    finally:
        os.close(fd)
        if before is not None:
            os.close(before)


def _copy_attributes(st: os.stat_result, fd: int) -> None:
    for uid in (st.st_uid, -1):  # owner and group as far as this user may: else the group
        with contextlib.suppress(PermissionError):
            os.fchown(fd, uid, st.st_gid)
            break
    with contextlib.suppress(PermissionError):  # given away just above: no longer ours
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


def fresh_dir(path: Path) -> Path:
    """A new, empty directory at `path`, what an earlier run left there removed; if that could
    not be (another user's directory in it), beside it: a leftover must not block every run."""
    candidate, n = path, 0
    while True:
        remove_tree(candidate)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def remove_tree(path: Path) -> None:
    """A directory minibatch made in staging, whole: also where it holds a directory with a mode
    copied from the user's (0555), which would stop rmtree and block the next run. Only real
    directories, opened without following a link, are made writable: what a symlink put in the
    place of one points to is not ours."""
    with contextlib.suppress(OSError):
        fd = open_dir(path)
        if fd is None:
            return
        try:
            _make_writable(fd)
        finally:
            os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


def _make_writable(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o700)
    with os.scandir(fd) as listing:
        names = [entry.name for entry in listing if entry.is_dir(follow_symlinks=False)]
    for name in names:
        with contextlib.suppress(OSError):
            child = open_dir(name, fd)
            if child is not None:
                try:
                    _make_writable(child)
                finally:
                    os.close(child)


def note_unit(aside: Path, unit: str, target: Path) -> Path:
    """Note in staging which unit the directory `aside` swaps out, and the inode of the one it
    replaces, before it does: a run that dies before the rescue leaves the next one where to
    move a user's files back, if the swap happened (`prepare`)."""
    note = aside.with_name(aside.name + NOTE_SUFFIX)
    note.write_text(f"{unit}\n{target.stat().st_ino if target.is_dir() else ''}")
    fsync_dir(aside.parent)
    return note
