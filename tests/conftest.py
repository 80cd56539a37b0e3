"""Fixtures several test files share (their plain helpers are in tests/helpers.py):

    synthetic_shards                                     # (folder, CompletedProcess) of one extract.py run
    small_disk                                           # a 3 MB file system (a tmpfs; skipped where none mounts)
"""
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """extract.py's synthetic dataset, once per session: 6 train and 6 val videos (one 16-frame window each,
    --short_side 64) in shards of at most 4 samples, by 2 workers. Returns (the output folder, the run's
    CompletedProcess with text stdout and stderr); a test checks the return code itself. Shared by every test
    of the session: read it, never change it."""
    out = tmp_path_factory.mktemp("synthetic") / "out"
    r = subprocess.run([sys.executable, "extract.py", "--src", "synthetic", "--out", str(out), "--split", "train,val",
                        "--limit", "6", "--short_side", "64", "--shard_samples", "4", "--workers", "2"],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    return out, r


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs at tmp_path/small (skipped where mounting is not allowed)."""
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (test_check_space_refuses_in_one_line covers the check)")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)
