"""bench/loader_bench.py as a GPU machine without DALI runs it (bench/gpu_check.sh): the DALI mode is left
out and said so, every other mode is measured; core counts are chosen and checked."""
import math
import os
import statistics
import subprocess
import sys

import loader_bench
import pytest

from mme.online import data


def test_without_dali_the_other_modes_run(monkeypatch, capsys):
    monkeypatch.setattr(data, "dali_installed", lambda: False)
    monkeypatch.setenv("COLUMNS", "250")
    rows = loader_bench.main(videos=8, vp9_videos=2, frames=24, batches=1, batch=2, repeats=1, repeated_aug="1",
                             core_counts="1")
    assert "'ours dali' mode is left out" in capsys.readouterr().out
    assert sorted(row["mode"] for row in rows) == sorted(m for m in loader_bench.MODES if m != "ours dali")
    for row in rows:
        assert (row["cores"], row["repeated_aug"], len(row["runs"])) == (1, 1, 1), row
        assert math.isfinite(row["clips_per_s"]) and row["clips_per_s"] > 0, row
        assert row["clips_per_s"] == statistics.median(row["runs"])
        assert row["main_cpu_ms"] > 0 and row["workers_cpu_ms"] == 0, row          # 1 core: no worker processes


def test_cpu_seconds_of_other_processes():
    """The CPU table reads the worker processes' CPU time from /proc: a child that burns 0.3 s of CPU and
    then sleeps reads 0.3 s (to the clock tick), however long it has existed."""
    burn = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\nprint(flush=True)\ntime.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        burn.stdout.readline()                      # the burn is over
        assert 0.28 <= loader_bench.cpu_seconds([burn.pid]) <= 0.5     # + the interpreter's start
        assert burn.pid in loader_bench.children(os.getpid())
    finally:
        burn.kill()
    assert loader_bench.cpu_seconds([]) == 0


def test_core_counts_beyond_this_process_refused():
    with pytest.raises(SystemExit, match="core_counts"):
        loader_bench.main(core_counts="1,4096")
