"""One process per run folder or extraction part: a second one is refused in one line, naming the first.

    lock = hold("runs/x/.lock", "run runs/x")      # LockedError(ValueError) if another process holds it
    ...                                            # held until the process exits (any exit: a crash, kill -9)

An fcntl lock on a file in the folder: the kernel releases it when its holder exits however it exits, so a
crashed run never leaves a stale lock. The file records who holds it (pid, host), for the refusal's line.
Where the folder is on a network file system, fcntl locks work where the file system supports them (NFSv4,
Lustre with flock); elsewhere two hosts may not see each other's lock.
"""
import fcntl
import os
import socket
from pathlib import Path

_held = []          # the open lock files of this process (closing one would release its lock)


class LockedError(ValueError):
    """Another live process holds the lock; the message says which and what to do."""


def hold(path, what):
    """Take the lock at `path` (created with its folder) for the life of this process; raise LockedError naming
    the holder's pid and host when another process has it. `what`: the thing locked, for the message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LockedError(f"{what} is in use by {holder}: wait for it to end, or use another name / --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    _held.append(f)
    return f
