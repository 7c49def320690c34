"""Whose output this is: the owner file in an output's staging directory names the job (or
parameter set) that writes it, and the state_dir whose manifest records it (the random id kept
in that state_dir, lock.state_id, and where it was). Two manifests publishing into one output
would each overwrite, and remove, what the other recorded as done: a state_dir copied with its
id while the original is still there is refused; one moved, or reached by another path (a
symlink, a bind mount), is followed. A project copied whole has owner files that name the
original: the copy's runs are refused until they are removed."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from minibatch.lock import ID_NAME, former_ids, state_id, write_once

OWNER_NAME = "minibatch-owner"
ID_RE = re.compile(r"[0-9a-f]{32}")


class OutputNotOwned(Exception):
    """An existing, non-empty output directory that minibatch did not create."""


def read_owner(file: Path) -> tuple[str, str, str]:
    """(job, state_dir id, state_dir path) of an owner file ("" for what it does not say): an
    output's staging directory's OWNER_NAME, or the mark of a directory of held rows."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "", "", ""
    with os.fdopen(fd) as handle:
        job, state, where = (handle.read().split("\n") + ["", ""])[:3]
    return job, state, where


def take(
    file: Path, output: Path, owner: str, state_dir: Path, known: Callable[[], bool], kind: str = "output"
) -> None:
    """Claim `output` (the directory `file` says whose it is) for `owner` of `state_dir`, or
    refuse (see `check`); an owner file an older release wrote, or one naming where this
    state_dir was before it moved, is brought up to date."""
    record = f"{owner}\n{state_id(state_dir)}\n{os.path.abspath(state_dir)}"
    if not read_owner(file)[0]:  # the first claim writes it
        write(file, record)
    check(file, output, owner, state_dir, known, kind)
    if "\n".join(read_owner(file)) != record:
        write(file, record, replace=True)


def check(
    file: Path, output: Path, owner: str, state_dir: Path, known: Callable[[], bool], kind: str = "output"
) -> None:
    holder, holder_id, holder_dir = read_owner(file)
    hand_over = f"remove {file} to hand the {kind} over"
    if holder and holder != owner:
        raise OutputNotOwned(f"{kind} {output} is the {kind} of {holder}, not of {owner}")
    if holder and not ID_RE.fullmatch(holder_id):  # an older release's: it did not say which state_dir
        if not known():
            why = f"was claimed for {holder} by an older release, and {state_dir} has no run of it"
            raise OutputNotOwned(f"{kind} {output} {why} (if it is this one's: {hand_over})")
        return
    if holder_id and holder_id != state_id(state_dir) and holder_dir == os.path.abspath(state_dir):
        if holder_id in former_ids(state_dir):  # claimed here before a restore brought the backup's id
            return
        raise OutputNotOwned(  # not taken on its own: another host may have its own state_dir here
            f"{kind} {output} is the {kind} of {holder} with the state_dir {holder_dir}, which was made "
            f"anew since (its {ID_NAME} changed): `minibatch restore` a backup of its manifest, or if it "
            f"has none, {hand_over} (the next run adopts what it holds)"
        )
    if holder_id and holder_id != state_id(state_dir):
        raise OutputNotOwned(
            f"{kind} {output} is the {kind} of {holder} with the state_dir {holder_dir}, not {state_dir}: "
            f"give this config's job another {kind} (if that state_dir moved here: {hand_over})"
        )
    # A copy of the state_dir (the same id) while the original is still there is refused, wherever
    # it and the output are: a whole project copied too (its owner files name the original), as
    # no layout tells that apart from a state_dir copied beside a moved or copied output.
    there = Path(holder_dir) if holder_dir else None
    if there and not _same(there, state_dir) and _same_id(there, holder_id):
        raise OutputNotOwned(  # both are there: `cp -r .state .state-try` copied the id along
            f"{kind} {output} is the {kind} of {holder} with the state_dir {there}, and {state_dir} is a "
            f"copy of it (the same minibatch-id): give this config's job another {kind} ({hand_over})"
        )


def _same(a: Path, b: Path) -> bool:
    """The same directory, reached by any path (a symlink, a bind mount)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is gone: moved
        return False


def _same_id(state_dir: Path, wanted: str) -> bool:
    try:
        return wanted in (state_dir / ID_NAME).read_text().split()  # its id now, or before a restore
    except OSError:  # moved away, or unreadable: not a second live copy
        return False


def write(file: Path, record: str, replace: bool = False) -> None:
    """Durably and never half (lock.write_once): of two first claims at once, one links its
    file in first; an empty one, from a crash, counts as absent."""
    write_once(file, record, replace)
