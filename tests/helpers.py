"""Helpers the test files import: shards written as extract.py writes them, random clips to put in them, the
environment a batch job runs the scripts in, and killing a script the moment it has written a file.

    write_shard(path, samples)                           # a tar of raw samples (dicts as mme.shards.encode returns)
    frames, disp, hog, valid = fake_clip(T, H, W, L, seed=0)   # one clip's arrays, random, of the schema's shapes
    env = clean_env(RANK="1")                            # os.environ as a batch job has it, plus what is given
    kill_when(["pretrain.py", ...], path, cwd)           # SIGKILL the script once `path` exists (a node lost mid-run)
    code, err = signal_when(cmd, ready, cwd, signal.SIGTERM)   # any signal once ready() holds
"""
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np

from mme.offline import synthetic, writer

# what a batch job sees: no terminal width, not part of a SLURM array or a torchrun group (an in-process test
# run of mme.train.setup_distributed leaves RANK ... MASTER_PORT in os.environ)
_DROP = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
         "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def write_shard(path, samples):
    """A shard at `path`: the raw samples' members in order, as extract.py writes them (mme.offline.writer)."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            writer.write_sample(tar, s)


def fake_clip(T=4, H=32, W=48, L=3, g=8, seed=0):
    """Arrays of one clip for mme.shards.encode, random but of the schema's shapes and ranges: frames uint8
    [T, H, W, 3] (a smooth texture, which JPEG keeps), disp float32 [T/2, H/g, W/g, L, 2] (px, std 3),
    hog float32 [..., L, 9] (log-uniform over the HOG code's range), valid bool [T/2, H/g, W/g] (~70%)."""
    rng = np.random.default_rng(seed)
    frames = np.stack([synthetic.texture(rng, H, W) for _ in range(T)])
    disp = rng.normal(0, 3, (T // 2, H // g, W // g, L, 2)).astype(np.float32)
    hog = np.exp(rng.uniform(np.log(1e-3), np.log(0.25), (T // 2, H // g, W // g, L, 9))).astype(np.float32)
    valid = rng.random((T // 2, H // g, W // g)) > 0.3
    return frames, disp, hog, valid


def signal_when(cmd, ready, cwd, sig=signal.SIGKILL, timeout=240):
    """Start `python cmd...` (torchrun's variables cleared), send it `sig` as soon as ready() is true (or it ends,
    or timeout s pass), wait for it to end -> (return code, stderr text)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.Popen([sys.executable, *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    while not ready() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(sig)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def kill_when(cmd, path, cwd, timeout=240):
    """SIGKILL `python cmd...` as soon as `path` exists (signal_when), like a node lost mid-run."""
    signal_when(cmd, path.exists, cwd, signal.SIGKILL, timeout)
