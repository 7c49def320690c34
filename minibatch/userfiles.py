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
Placed = dict[str, tuple[int, int, int, int]]  # live path -> what minibatch put there (`place`)


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


def place(source: str, target: Path, placed: Placed) -> None:
    """A user's file (or symlink) into staging as it is: linked, never moved, so no crash can
    leave it only in staging. Where the kernel refuses the link (another user's file under
    fs.protected_hardlinks, another file system) a copy stands in until the rescue moves the
    original back over it. `placed` notes what was put there by where it goes live."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK):
            raise
        shutil.copy2(source, target, follow_symlinks=False)
    placed[source] = _identity(os.lstat(target))


def link_theirs(source: Path, target: Path, placed: Placed, mine: bool = True) -> None:
    """What minibatch did not write in `source` (an output, a unit), placed at the same place
    under `target`; a directory of the user's is kept even empty, a partition only with such
    files. Minibatch's files are in the output and its partitions (`mine`), not in a user's
    directory."""
    for entry in os.scandir(source) if source.is_dir() and not source.is_symlink() else []:
        if entry.is_dir(follow_symlinks=False):
            link_theirs(Path(entry.path), target / entry.name, placed, mine and "=" in entry.name)
            if not mine or "=" not in entry.name:
                (target / entry.name).mkdir(parents=True, exist_ok=True)
        elif not (mine and ours(entry.name)):
            target.mkdir(parents=True, exist_ok=True)
            place(entry.path, target / entry.name, placed)


def rescue(old: Path, live: Path, placed: Placed | None = None, anywhere: bool = False) -> None:
    """Move into `live` what in `old` (a unit swapped out or removed) is not minibatch's and not
    already in `live` as the same file (carried over, linked): a user's file made or replaced in
    the unit while it was rebuilt. (One deleted meanwhile comes back, carried over.) Minibatch's
    own files are at a unit's top; a directory below holds only what it carried over. A whole
    output swapped out (`anywhere`) has minibatch's files in its partitions too: they stay.
    A file goes over one of its name in `live` only if that is still what minibatch placed
    there (`placed`); else beside it: the user saved it anew since. `old` is read only if it
    is a real directory, never through a symlink."""
    fd = open_dir(old)
    if fd is not None:
        try:
            _rescue(fd, live, True, anywhere, placed or {})
        finally:
            os.close(fd)


def _rescue(fd: int, live: Path, top: bool, anywhere: bool, placed: Placed) -> None:
    moved = False
    with os.scandir(fd) as listing:
        entries = list(listing)
    for entry in entries:
        there, is_dir = live / entry.name, entry.is_dir(follow_symlinks=False)
        below = anywhere and top and "=" in entry.name  # a partition of a whole output: its files are too
        if (
            is_dir
            and there.is_dir()
            and not there.is_symlink()
            and _below(fd, entry.name, there, below, anywhere, placed)
        ):
            continue
        if not is_dir and ((top and ours(entry.name)) or _same_file(entry, there)):
            continue
        ours_there = os.path.lexists(there) and placed.get(str(there)) == _identity(there.lstat())
        if os.path.lexists(there) and (is_dir or there.is_dir() or not ours_there):
            # the user's newer file, or a file became a directory or the other way round: both kept
            names = (live / f"{entry.name}.{n}" for n in itertools.count(1))
            there = next(name for name in names if not os.path.lexists(name))
        if is_dir and anywhere and _below(fd, entry.name, there, below, anywhere, placed):
            continue  # a partition gone from the new result: only a user's files go back
        live.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(entry.name, there, src_dir_fd=fd)
        except PermissionError:
            if not ours_there:
                raise
            continue  # the original in a directory this user may not write: its copy stays
        moved = True
    if moved:
        fsync_dir(live)


def _below(fd: int, name: str, live: Path, top: bool, anywhere: bool, placed: Placed) -> bool:
    """Rescue from the directory `name` in `fd`; False if it is not one now (a symlink put in
    its place goes back as it is, not followed)."""
    child = open_dir(name, fd)
    if child is None:
        return False
    try:
        _rescue(child, live, top, anywhere, placed)
    finally:
        os.close(child)
    return True


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns  # a copy written into since differs


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
