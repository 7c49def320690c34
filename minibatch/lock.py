"""One run per job across processes: an flock the kernel releases when its holder dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SLOT_POLL = 0.2  # seconds between looks for a free worker slot
_HELD: set[str] = set()  # the job locks this process holds
_HELD_LOCK = threading.Lock()
TAG_WIDTH = 48
PROBE_TRIES, PROBE_WAIT = 5, 0.01  # a job lock found taken is tried again: `lock_held` may hold it an instant


class JobLocked(Exception):
    def __init__(self, job: str, pid: int | None) -> None:
        self.job = job
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        what = "a daemon of this state_dir" if job == DAEMON_LOCK else f"job {job!r}"
        super().__init__(f"{what} is already running in {holder}")


ID_NAME = "minibatch-id"
DAEMON_LOCK = "minibatch.daemon"  # one daemon per state_dir (no job's name has a dot)


def state_id(state_dir: Path) -> str:
    """The state_dir's identity: a random name made once in `minibatch-id`. It goes where the
    directory goes (moved, or behind a symlink on another disk); another state_dir has another."""
    path = state_dir / ID_NAME
    with contextlib.suppress(FileNotFoundError):
        if found := path.read_text().split():
            return found[0]
    state_dir.mkdir(parents=True, exist_ok=True)
    write_once(path, secrets.token_hex(16))  # of two first runs at once, one links first
    return path.read_text().strip()


def write_once(path: Path, text: str, replace: bool = False) -> None:
    """`text` in `path` durably and never half: written beside it, synced and linked in, which
    fails if anyone's file is there. That one is replaced only if empty (a crash between
    creating and writing it) or with `replace`."""
    temp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(temp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temp, path)
    except FileExistsError:
        if replace or not path.read_text().strip():
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_path(state_dir: Path, job: str) -> Path:
    return state_dir / "locks" / f"{job}.lock"


def lock_identity(state_dir: Path, job: str) -> tuple[int, int] | None:
    """(device, inode) of `job`'s lock file now; None if there is none (its state_dir removed)."""
    try:
        found = os.stat(lock_path(state_dir, job))
    except OSError:
        return None
    return found.st_dev, found.st_ino


def lock_moved(state_dir: Path, job: str, held: tuple[int, int] | None) -> bool:
    """Whether `job`'s lock file is no longer the one `held` (its state_dir removed or replaced
    under the holder, whose lock guards nothing then)."""
    return held is not None and lock_identity(state_dir, job) != held


@contextlib.contextmanager
def job_lock(state_dir: Path, job: str, tag: str = "") -> Iterator[Callable[[str], None]]:
    """Hold `job`'s lock; its file names the holder's pid and `tag` (the run or backfill id),
    which the function it yields changes (through the held descriptor: on NFS, closing any
    other descriptor of the file would drop the lock)."""
    path = lock_path(state_dir, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path)
    try:
        for attempt in range(PROBE_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == PROBE_TRIES - 1:  # held: not a `lock_held` probe's instant
                    raise JobLocked(job, holder_pid(state_dir, job)) from None
                time.sleep(PROBE_WAIT)
        with _HELD_LOCK:
            _HELD.add(str(path))

        def name(tag: str) -> None:
            # Overwritten in place, never truncated: ext4 flushes a file truncated and rewritten
            # at close (auto_da_alloc), some milliseconds per run. The widths cover any pid and id.
            # The pid again after the tag: an older release rewrites only the first line.
            pid = os.getpid()
            os.pwrite(fd, f"{pid:<20}\n{f'{tag[:TAG_WIDTH]} {pid}':<{TAG_WIDTH + 21}}\n".encode(), 0)

        name(tag)
        yield name
    finally:
        with _HELD_LOCK:
            _HELD.discard(str(path))
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def worker_slots(
    state_dir: Path, job: str, wanted: int, total: int, stopping: Callable[[], bool]
) -> Iterator[int]:
    """Up to `wanted` of a job's `total` worker slots (flocks, released by the kernel with
    their holder), at least one: every run of a job at once (its parameter sets, backfill
    dates, scheduled and manual runs, in any process) shares one job's worth of workers. Waits
    while other runs hold them all, unless `stopping`; yields how many it holds."""
    held: list[int] = []
    (state_dir / "locks").mkdir(parents=True, exist_ok=True)
    try:
        while not held:
            for n in range(total):
                if len(held) == wanted:
                    break
                fd = _open_lock(state_dir / "locks" / f"{job}.worker-{n}.lock")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(fd)
                except BlockingIOError:
                    os.close(fd)
            if held or stopping():
                break
            time.sleep(SLOT_POLL)
        yield len(held)
    finally:
        for fd in held:
            os.close(fd)


def former_ids(state_dir: Path) -> list[str]:
    """The ids this state_dir had before a restore gave it its backup's (after the first line)."""
    try:
        return (state_dir / ID_NAME).read_text().split()[1:]
    except OSError:
        return []


def _open_lock(path: Path) -> int:
    """Open or create the lock file, never through a symlink: the holder writes into it, so a link
    planted there would have each run overwrite the start of the file it points to."""
    try:
        # 0o666 less the umask: a group sharing the state_dir (umask 002) shares its locks too
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "lock file is a symlink; refusing to follow it", str(path)) from None
        raise


def holder_pid(state_dir: Path, job: str) -> int | None:
    """The pid of the lock's holder, if it is held (0: by a process this PID namespace cannot
    see): the kernel's word (/proc/locks), not only the pid the holder wrote, which outlives it
    and may be another process's by now."""
    path = lock_path(state_dir, job)
    try:
        return _flock_holder(path)
    except (OSError, ValueError):  # no lock file: no holder; no /proc/locks: the file's word
        if not os.path.lexists(path):
            return None
    try:
        pid = int(_read_lock(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def held_by(state_dir: Path, job: str, tag: str, pid: int | None = None) -> bool:
    """Whether the run (or backfill) `tag`, recorded with `pid`, still holds `job`'s lock. The
    lock file's tag says which run holds it: a pid is another in each PID namespace (a run in a
    container sharing the state_dir records its own). A file without one (a holder of an older
    version): the pids, or any holder if no pid is known."""
    holder = holder_pid(state_dir, job)
    if holder is None and not lock_held(state_dir, job):  # (a holder in a parent namespace: unlisted)
        return False
    try:
        written = _read_lock(lock_path(state_dir, job)).decode(errors="replace").split()
    except OSError:
        return False
    if len(written) == 3 and written[0] == written[2]:  # this release's: pid, tag, pid
        return written[1] == tag
    return pid in (None, holder)


def lock_held(state_dir: Path, job: str) -> bool:
    """Whether anyone holds the lock, asked of the lock itself: also a holder this PID namespace
    cannot see (a run in another container sharing the state_dir), whom /proc/locks leaves out.
    A shared lock taken and dropped at once: `job_lock` waits out such a probe."""
    path = lock_path(state_dir, job)
    with _HELD_LOCK:
        if str(path) in _HELD:  # this process's own: never probed (on NFS, closing a descriptor
            return True  # of the file drops every lock the process holds on it)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to read (another user's umask), a symlink: the kernel's list
        return holder_pid(state_dir, job) is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (and with it the probe's shared lock)
    return False


def keys_of(state_dir: Path, job: str) -> list[str]:
    """`job`, and each of its parameter sets (`job[k=v]`) that has ever taken its lock."""
    try:
        names = os.listdir(state_dir / "locks")
    except OSError:
        names = []
    return [
        job,
        *(n.removesuffix(".lock") for n in names if n.startswith(f"{job}[") and n.endswith("].lock")),
    ]


def _flock_holder(path: Path) -> int | None:
    """Who holds the flock on `path` (0: held by a pid this namespace cannot see), or None."""
    st = os.stat(path, follow_symlinks=False)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as handle:
        for line in handle:
            fields = line.split()  # "3: FLOCK ADVISORY WRITE <pid> <dev>:<inode> 0 EOF"; "->": a waiter
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where:
                return int(fields[4])
    return None


def _read_lock(path: Path) -> bytes:
    """The lock file's contents; not through a symlink, and never blocking on a FIFO put there."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return os.read(fd, 128)
    finally:
        os.close(fd)
