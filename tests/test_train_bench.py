"""bench/train_bench.py's CPU path without timm: a recipe's model, plain and FSDP2-wrapped on one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mme import recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_step_plain_and_fsdp_wrapped_without_timm():
    # the command line of bench/train_bench.py, through fire as its __main__ runs it, with main's rows printed
    # as JSON after its table; in a process of its own (--fsdp makes a process group and sets torchrun's variables)
    code = ("import json, sys, fire, train_bench; rows = fire.Fire(train_bench.main, sys.argv[1:], serialize=lambda rows: None); "
            "print('ROWS', json.dumps(rows))")
    out = subprocess.run([sys.executable, "-c", code, "--recipe", "recipes/quick_tiny.yaml", "--fsdp", "--timm", "false",
                          "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, COLUMNS="200", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench")])))
    assert out.returncode == 0, out.stderr
    r = recipe.load(ROOT / "recipes/quick_tiny.yaml")
    # the table is still printed, for the recipe's frames, size and batch
    assert f"{r['num_frames']} x {r['input_size']}^2" in out.stdout and f"batch {r['batch_size']}" in out.stdout
    (row,) = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
    assert row["model"] == r["model"]
    assert row["timm_encoder_ms"] is None and row["mfu"] is None                # no timm; a CPU has no MFU
    for key in ("ours_encoder_ms", "full_step_ms", "clips_per_s", "wrapped_step_ms", "wrapped_over_plain"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert math.isclose(row["clips_per_s"], r["batch_size"] / (row["full_step_ms"] / 1e3), rel_tol=1e-9)
    assert math.isclose(row["wrapped_over_plain"], row["wrapped_step_ms"] / row["full_step_ms"], rel_tol=1e-9)
