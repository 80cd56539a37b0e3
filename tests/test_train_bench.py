"""bench/train_bench.py's CPU path without timm: a recipe's model, plain and FSDP2-wrapped on one process."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_step_plain_and_fsdp_wrapped_without_timm():
    out = subprocess.run([sys.executable, "bench/train_bench.py", "--recipe", "recipes/quick_tiny.yaml", "--fsdp",
                          "--timm", "false", "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    assert "8 x 112^2" in out.stdout and "batch 8" in out.stdout            # the recipe's frames, size and batch
    row = next(line for line in out.stdout.splitlines() if "tiny" in line and "│" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[2] == "-" and cells[3] == "-"                              # no timm columns
    assert float(cells[-1]) > 0                                             # wrapped / plain
