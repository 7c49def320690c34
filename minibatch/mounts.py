"""What is mounted where, and whether the shares earlier inputs came from still are: an
unmounted share's mount point is a bare directory (or gone, as an automounter leaves it), and
its files would look removed, their results deleted. Linux (/proc/self/mountinfo) only."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

# (st_dev, "source[root] (type)") of each mount on a mount point, in mountinfo's order
Table = dict[str, list[tuple[int, str]]]


def mount_table() -> Table:
    """Each mount point but the root, with what is mounted on it: its source (a block device by
    its filesystem's UUID where udev lists it, as device names change when disks are added),
    its root within the source, its type. Hidden mounts are listed too: `mounted` tells which one is seen."""
    uuids = _uuids()
    table: Table = {}
    for fields in _mountinfo():
        kind, source = fields[fields.index("-") + 1 :][:2]
        if source.startswith("/dev/") and (real := os.path.realpath(source)) in uuids:
            source = f"UUID={uuids[real]}"  # (/dev/mapper/vg-lv is /dev/dm-3 there)
        device = os.makedev(*(int(number) for number in fields[2].split(":")))
        root = "" if fields[3] == "/" else fields[3]
        table.setdefault(fields[4], []).append((device, f"{source}{root} ({kind})"))
    table.pop("/", None)
    return table


def _mountinfo() -> list[list[str]]:
    """Linux's /proc/self/mountinfo, a list of fields per mount, octal escapes (`\\040`) undone."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="surrogateescape").splitlines()
    except OSError:
        return []
    return [[re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f) for f in line.split()] for line in lines]


def _uuids() -> dict[str, str]:
    with_uuid = Path("/dev/disk/by-uuid")
    try:
        return {os.path.realpath(link): link.name for link in with_uuid.iterdir()}
    except OSError:
        return {}


def mounted(place: str, table: Table) -> str | None:
    """What is seen mounted on `place` now: of the mounts listed there, the one whose device the
    place is on (one hidden under a mount above it, or under another on the same place, is not)."""
    if place not in table:
        return None
    try:
        device = os.stat(place).st_dev
    except OSError:
        return None
    seen = [what for dev, what in table[place] if dev == device]
    return seen[-1] if seen else None


def other_mount(home: Path, places: Iterable[Path]) -> Path | None:
    """The first directory of `places` under another mount point than `home`: a rename between
    them fails (EXDEV), across bind mounts of one filesystem too."""
    table = mount_table()
    return next((p for p in places if p.is_dir() and mount_of(p, table) != mount_of(home, table)), None)


def mount_of(path: Path | str, table: Table) -> str:
    """The mount point `path` is under (where it resolves): two paths under different ones
    cannot be renamed into each other (EXDEV), bind mounts of one filesystem included."""
    real = os.path.realpath(path)
    above = [place for place in table if real == place or real.startswith(place.rstrip("/") + "/")]
    return max((place for place in above if mounted(place, table)), key=len, default="/")  # not hidden


def mounts_above(files: Iterable[str], table: Table) -> dict[str, str]:
    """The mount points above the files (or a file itself, bind-mounted), as spelled and where
    they resolve, and what is mounted on each."""
    places = set().union(*_places(files).values())
    return {place: what for place in sorted(places & table.keys()) if (what := mounted(place, table))}


def unmounted(files: Iterable[str], recorded: dict[str, str] | None, table: Table) -> list[str]:
    """The mount points the last run recorded above the files (earlier inputs gone or changed)
    that hold something else now: a share unmounted (a bare directory, a file bind mount's
    placeholder, or gone, as an automounter leaves it), or another filesystem mounted there;
    and the directories above them that are mount points now and were not then: a filesystem
    mounted over one hides its files. `recorded` None: no record (an earlier release's run)."""
    if recorded is None:
        return []
    above = set().union(*_places(files).values())
    now = {place: mounted(place, table) for place in {*recorded, *(above & table.keys())}}
    hit = sorted(
        place
        for place in above
        if now.get(place) != recorded.get(place) and (place in recorded or hides(place))
    )
    fresh = "if its files now live here, or the share is gone for good, `run-now --fresh` computes"
    fresh += " everything anew"
    return [
        f"{place}: not a mount point when its inputs were last read, {now[place]} now (a filesystem "
        f"mounted over their directory hides them? unmount it; {fresh})"
        if place not in recorded
        else f"{place}: a mount point of {recorded[place]} when its inputs were last read, "
        + (
            f"{now[place]} now"
            if now[place]
            else "and gone now"
            if not os.path.lexists(place)
            else "and not one now"
        )
        + f" (a share unmounted? mount it again; {fresh})"
        for place in hit
    ]


def hides(place: str) -> bool:
    """Whether the mount seen on `place` shows something else than its parent's filesystem
    would there: another filesystem, or a bind of another directory (not one of the place onto
    itself, as systemd's ReadWritePaths= makes in the service's view only)."""
    try:
        device, above = os.stat(place).st_dev, os.stat(os.path.dirname(place)).st_dev
    except OSError:
        return False
    if device != above:
        return True
    roots = _roots()
    real = os.path.realpath(place)
    here = [root for dev, root in roots.get(real, []) if dev == device]
    parents = [p for p in roots if p != real and (real.startswith(p.rstrip("/") + "/"))]
    seen = [(p, root) for p in sorted(parents, key=len) for dev, root in roots[p] if dev == above]
    if not here or not seen:
        return False
    point, root = seen[-1]
    return here[-1] != os.path.normpath(os.path.join(root, os.path.relpath(real, point)))


def _roots() -> dict[str, list[tuple[int, str]]]:
    """Each mount point ("/" too) with (device, root within its filesystem) of the mounts on it."""
    roots: dict[str, list[tuple[int, str]]] = {}
    for fields in _mountinfo():
        device = os.makedev(*(int(number) for number in fields[2].split(":")))
        roots.setdefault(fields[4], []).append((device, fields[3]))
    return roots


def _places(files: Iterable[str]) -> dict[str, set[str]]:
    """Each file, with itself and the directories above it, as spelled and where they resolve
    (a file that is a symlink: where it leads too)."""
    above: dict[str, set[str]] = {}

    def up(directory: str) -> set[str]:
        if directory not in above:
            above[directory] = set()
            for way in {directory, os.path.realpath(directory)}:
                while way != os.path.dirname(way):
                    above[directory].add(way)
                    way = os.path.dirname(way)
        return above[directory]

    places = {}
    for path in files:
        places[path] = up(os.path.dirname(path)) | {path}
        if os.path.islink(path):
            real = os.path.realpath(path)
            places[path] |= up(os.path.dirname(real)) | {real}
    return places
