"""Which files a job's input globs name: read literally (glob characters in the base
directory are escaped), each real file once, symlink loops and the job's own output refused,
and a match that cannot be read as a file (a dangling symlink: an unmounted share) named."""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import os
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minibatch.mounts import hides, mount_table, mounts_above, unmounted


class InputError(Exception):
    """The inputs cannot be read safely: a symlink loop, or the job's own output among them."""


@dataclass(frozen=True)
class Inputs:
    files: list[str]  # absolute, sorted, each real file once
    missing: list[str]  # patterns that matched no file
    unreadable: list[str] = field(default_factory=list)  # "path: why", matches that are not files
    mounts: dict[str, str] = field(default_factory=dict)  # mount points above the files: what is on each


def expand_inputs(base_dir: Path, patterns: Iterable[str]) -> list[str]:
    """Absolute paths of the files the globs match, sorted, each once."""
    return find_inputs(base_dir, patterns).files


def input_signature(base_dir: Path, patterns: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    """Each input's path, size and mtime: what the daemon's `watch` compares. Inputs that loop
    are the run's to refuse, loudly, not a poll's."""
    try:
        paths = expand_inputs(base_dir, patterns)
    except InputError:
        return ()
    stamps = {path: _stamp(path) for path in paths}
    return tuple((path, *stamp) for path, stamp in stamps.items() if stamp)  # (None: gone since the glob)


def find_inputs(
    base_dir: Path,
    patterns: Iterable[str],
    forbidden: Sequence[Path] = (),
    read: Mapping[str, Collection[tuple[int, int]]] | None = None,
    mounts: dict[str, str] | None = None,
) -> Inputs:
    """The files the globs match, each real file once (two paths to one file through a symlink
    are one input). Raises InputError for a symlink loop under `**` and for a file inside one
    of the `forbidden` directories (the job's own output) reached through a symlink. With `read`
    (a run's check: the files earlier runs read), a file that cannot be opened is unreadable, and
    so is a directory on the way to one read before that the globs could list but do not, and a
    mount point (`mounts`, as the last run found them) holding something else now above one of
    those, or above one whose (size, mtime) is not what it was (`read`'s values)."""
    by_real: dict[object, str] = {}
    missing: list[str] = []
    unreadable: list[str] = []
    reach: list[tuple[tuple[str, ...], tuple[str, ...]]] = []  # (literal base, glob parts) of each pattern
    fences = [os.path.realpath(d) + os.sep for d in forbidden]
    for pattern in patterns:
        if "**" in pattern:
            _refuse_symlink_loops(glob_root(base_dir, pattern), pattern)
        full = pattern if os.path.isabs(pattern) else os.path.join(glob.escape(str(base_dir)), pattern)
        reach.append(reach_of(base_dir, pattern))
        found = sorted(_spelled(p) for p in glob.glob(full, recursive=True))
        kinds = {path: _kind(path) for path in found}
        matches = [path for path, kind in kinds.items() if kind == "file"]
        bad = [f"{path}: {kind}" for path, kind in kinds.items() if kind not in ("file", "directory")]
        if not matches and not bad:
            missing.append(pattern)
        unreadable += bad
        for path in matches:
            real = os.path.realpath(path)
            if any(real.startswith(fence) for fence in fences):
                raise InputError(f"input glob {pattern!r} reaches the job's own output: {path} is {real}")
            by_real.setdefault(_identity(path, real), path)
    files = sorted(by_real.values())
    if read is not None:
        unreadable += [f"{path}: cannot be read ({why})" for path in files if (why := _unopenable(path))]
        table = mount_table()
        gone = {path: way for path in set(read) - set(files) if (way := _way(path, reach))}
        changed = [path for path in set(read) & set(files) if _stamp(path) not in read[path]]
        unreadable += _unlistable_dirs(gone) + unmounted([*gone, *changed], mounts, table)
        # above earlier inputs too: a run cut short before it forgot a removed one's results
        # leaves the baseline the next run checks that one against
        seen = {place: what for place, what in mounts_above([*files, *read], table).items() if hides(place)}
        return Inputs(files, missing, sorted(set(unreadable)), seen)
    return Inputs(files=files, missing=missing, unreadable=sorted(set(unreadable)))


def recheck(
    base_dir: Path, patterns: Iterable[str], removed: Iterable[str], mounts: str | None
) -> tuple[Inputs, str | None]:
    """Files removed under a run: what the globs match now, and why the run fails, if it does:
    a glob matching nothing (an unmount mid-run, not an empty day), or a mount point above a
    removed file that holds something else than the run found at its start (`mounts`, JSON): a
    share under a `**` glob unmounted, whose files only looked removed."""
    now = find_inputs(
        base_dir, patterns, read=dict.fromkeys(removed, ()), mounts=json.loads(mounts) if mounts else None
    )
    if now.missing:
        globs = ", ".join(repr(p) for p in now.missing)
        return now, f"input glob {globs} matches no file any more (it vanished during the run)"
    return now, "; ".join(f"input {why}" for why in now.unreadable) or None


def _spelled(path: str) -> str:
    """A path glob found, absolute, its `..` taken as text (as paths always were spelled) unless
    that names another file: glob's `..` is the OS's parent of the real directory (a config
    directory reached through a symlink), so the part before it is resolved."""
    text = os.path.abspath(path)
    if ".." not in Path(path).parts or os.path.realpath(text) == os.path.realpath(path):
        return text
    head, _, tail = path.rpartition(f"{os.sep}..{os.sep}")
    return os.path.join(os.path.realpath(f"{head}{os.sep}.."), tail)


def _stamp(path: str) -> tuple[int, int] | None:
    """The file's (size, mtime_ns), None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _unopenable(path: str) -> str | None:
    """Why the file cannot be opened for reading (its mode, its owner, a share's credentials)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _unlistable_dirs(gone: dict[str, list[tuple[str, str, bool]]]) -> list[str]:
    """For files earlier runs read that the globs could list but do not (each with its way down
    from where the pattern starts: directory, the next name, whether glob lists the directory
    or only passes through it), the first directory on the way that cannot be listed (or passed
    through), or is a symlink to nothing (a share unmounted), as "place: why": glob passes over
    those in silence, and the files would look removed, their results deleted. A directory
    that is gone is not one."""
    found: dict[str, str] = {}
    for way in gone.values():
        for directory, child, listed in way:
            if why := found.get(directory) or _unreachable(directory, child, listed):
                found[directory] = why
                break
    return sorted(f"{place}: {why}" for place, why in found.items())


def _unreachable(directory: str, child: str, listed: bool) -> str | None:
    try:
        if listed:
            os.scandir(directory).close()
        else:  # a name after it is literal: glob only needs to enter it (a home directory's 0711)
            os.stat(os.path.join(directory, child))
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(directory) and not os.path.exists(directory):
            return f"a symlink to {os.readlink(directory)}, which cannot be reached"
    except OSError as exc:
        return f"a directory that cannot be {'listed' if listed else 'entered'} ({exc.strerror or exc})"
    return None


def reach_of(base_dir: Path, pattern: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the literal directory a pattern starts from, as path parts; the pattern's parts below it)."""
    parts = Path(os.path.normpath(pattern)).parts
    if os.path.isabs(pattern):
        return (), parts
    up = len(list(itertools.takewhile(lambda part: part == "..", parts)))  # `../landing/*`
    base = Path(os.path.abspath(base_dir)).parts
    text, real = base[: max(1, len(base) - up)], os.path.realpath(os.path.join(base_dir, *[".."] * up))
    if up and os.path.realpath(Path(*text)) != real:  # spelled as `_spelled` spells what glob finds
        return Path(real).parts, parts[up:]
    return text, parts[up:]


def _way(path: str, reach: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> list[tuple[str, str, bool]]:
    """The way glob would go down to `path` for the first pattern that could list it: each
    directory from where the pattern starts, the next name, and whether glob lists it."""
    parts = Path(path).parts
    for base, pattern in reach:
        listed = _listed(parts[len(base) :], pattern) if parts[: len(base)] == base else None
        if listed is not None:
            return [
                (str(Path(*parts[:i])), parts[i], i - len(base) in listed)
                for i in range(max(len(base), 1), len(parts))  # (an absolute pattern starts at "/")
            ]
    return []


def _listed(parts: tuple[str, ...], pattern: tuple[str, ...], depth: int = 0) -> tuple[int, ...] | None:
    """None if glob could not list `parts` for `pattern` (component by component; `**`: any number
    of directories; wildcards pass over hidden names, as glob's do); else the depths of the
    directories on the way (0: where the pattern starts) that it lists, not only passes through."""
    if not pattern:
        return None if parts else ()
    if pattern[0] == "**":
        visible = itertools.takewhile(  # the directories `**` passes: none hidden
            lambda i: i == 0 or not parts[i - 1].startswith("."), range(len(parts) + 1)
        )
        for i in visible:
            if (rest := _listed(parts[i:], pattern[1:], depth + i)) is not None:
                return (*range(depth, depth + i + 1), *rest)
        return None
    if not parts or not fnmatch.fnmatchcase(parts[0], pattern[0]):
        return None
    magic = glob.has_magic(pattern[0])
    if magic and parts[0].startswith(".") and not pattern[0].startswith("."):
        return None
    rest = _listed(parts[1:], pattern[1:], depth + 1)
    return None if rest is None else ((depth,) if magic else ()) + rest


def _identity(path: str, real: str) -> object:
    """One file's key under each of its names: its real path, or its inode for a file with
    hard links (only then: a file system that makes inode numbers up keeps each file apart)."""
    try:
        info = os.stat(path)
    except OSError:
        return real
    return (info.st_dev, info.st_ino) if info.st_nlink > 1 and info.st_ino else real


def _kind(path: str) -> str:
    """What the path is: "file", "directory" (a glob may match those: not input), or why it
    cannot be read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return f"a symlink to {os.readlink(path)}, which cannot be reached ({exc.strerror})"
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return "file"
    return "directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"


def _refuse_symlink_loops(root: Path, pattern: str) -> None:
    """Walk what `**` walks (following symlinks, skipping hidden names) and refuse a directory
    that is its own ancestor: glob would otherwise list every file once per trip round it."""

    def walk(directory: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return  # unreadable: glob skips it too
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            stat = os.stat(entry.path)
            key = (stat.st_dev, stat.st_ino)
            if key in ancestors:
                target = os.readlink(entry.path) if entry.is_symlink() else entry.path
                raise InputError(f"input glob {pattern!r} reaches a symlink loop: {entry.path} -> {target}")
            walk(entry.path, ancestors | {key})

    if root.is_dir():
        stat = root.stat()
        walk(str(root), frozenset({(stat.st_dev, stat.st_ino)}))


def glob_root(base_dir: Path, pattern: str) -> Path:
    """The directory part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    literal: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        literal.append(part)
    if len(literal) == len(parts):  # a plain file name: its directory
        literal = literal[:-1]
    return (base_dir / Path(*literal)).resolve() if literal else base_dir.resolve()
