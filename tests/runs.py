"""Running the top-level scripts from tests: kill one the moment it has written a given file."""
import os
import signal
import subprocess
import sys
import time


def kill_when(cmd, path, cwd, timeout=240):
    """Start `python cmd...` (torchrun's variables cleared), SIGKILL it as soon as `path` exists (or it
    ends, or timeout s pass), like a node lost mid-run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.Popen([sys.executable, *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while not path.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
