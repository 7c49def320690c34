"""Imported by the forkserver (its preload, after allocator), and never by the coordinator: stop signals
sent to the whole process group (`kill -TERM -PGID`, a supervisor's, a terminal's Ctrl-C) are
the coordinator's to act on (it lets chunks in flight finish, then kills the workers). The
server would die of a SIGTERM and take every worker with it (they die with their parent), each
chunk in flight charged an attempt. (Workers ignore both, for the programs a job runs.)"""

import signal


def _leave_to_the_coordinator(signum: int, frame: object) -> None:
    pass


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _leave_to_the_coordinator)
