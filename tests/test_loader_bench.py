"""bench/loader_bench.py as a GPU machine without DALI runs it (bench/gpu_check.sh): the DALI mode is left
out and said so, its columns read "-", every other mode is measured; core counts are chosen and checked."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import loader_bench  # noqa: E402

from mme import data  # noqa: E402


def test_without_dali_the_other_modes_run(monkeypatch, capsys):
    monkeypatch.setattr(data, "dali_installed", lambda: False)
    monkeypatch.setenv("COLUMNS", "250")
    loader_bench.main(videos=8, vp9_videos=2, frames=24, batches=1, batch=2, repeats=1, repeated_aug="1", core_counts="1")
    out = capsys.readouterr().out
    assert "'ours dali' mode is left out" in out
    header = next(line for line in out.splitlines() if "cores" in line and "jpeg floor" in line)
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("1 "))
    names = [c.strip() for c in header.strip("┃ ").split("┃")]
    cells = dict(zip(names, (c.strip() for c in row.strip("│ ").split("│"))))
    assert cells["ours dali"] == "-" and cells["dali / mp4v"] == "-"
    for mode in ("baseline mp4v", "baseline vp9", "ours", "jpeg floor"):
        assert float(cells[mode]) > 0, (mode, row)
    assert cells["ours / floor"].endswith("x")
    runs = out[out.index("runs:"):]
    assert "'1 ours'" in runs and "dali" not in runs


def test_core_counts_beyond_this_process_refused():
    with pytest.raises(SystemExit, match="core_counts"):
        loader_bench.main(core_counts="1,4096")
