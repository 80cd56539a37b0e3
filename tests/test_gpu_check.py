"""bench/gpu_check.sh (issue #12) without a GPU: the dry run writes the table of every step, and a
real run refuses in one line."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, path=None):
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    return subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), *args], capture_output=True, text=True, timeout=60, env=env)


def test_dry_run_writes_the_table(tmp_path):
    r = run("--dry-run", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out/gpu_check.md").read_text()
    for step in ("install torch", "install DALI", "DALI GPU backend", "loader_bench", "train_bench ViT-B bf16, eager",
                 "torch.compile", "pretrain.py, 30 steps, torchrun"):
        assert step in table, (step, table)
    assert table.count("| dry run |") >= 8 and "--compile" in table and "--nproc_per_node=1" in table


def test_no_gpu_refuses_in_one_line(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (fake / "nvidia-smi").chmod(0o755)
    for path in (str(fake) + ":" + os.environ["PATH"], "/usr/bin:/bin"):     # a driver without a GPU; no driver
        r = run(str(tmp_path / "out"), path=path)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "no NVIDIA GPU" in r.stderr and not (tmp_path / "out").exists()
