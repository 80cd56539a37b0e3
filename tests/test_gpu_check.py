"""bench/gpu_check.sh (issue #12) without a GPU: the dry run writes the table of every step, checks the
wheels carried for an offline GPU machine (bench/gpu_wheels.sh), and a real run refuses in one line."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, path=None, root=ROOT):
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    return subprocess.run(["bash", str(root / "bench/gpu_check.sh"), *args], capture_output=True, text=True, timeout=60, env=env)


def test_dry_run_writes_the_table(tmp_path):
    r = run("--dry-run", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out/gpu_check.md").read_text()
    for step in ("carried wheels", "install a CUDA build of torch", "torch used", "install DALI", "DALI GPU backend", "loader_bench",
                 "train_bench ViT-B bf16, eager",
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


def test_dry_run_checks_the_carried_wheels(tmp_path):
    """The parts of .dali/ (DALI's wheels, split to travel over several device calls) must all be there and
    match SHA256SUMS; the table says how many wheels and parts it found, or which part is missing or damaged."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench/gpu_check.sh", repo / "bench")
    shutil.copy(ROOT / "requirements.txt", repo)

    def carried(out):
        r = run("--dry-run", str(tmp_path / out), root=repo)
        assert r.returncode == 0, r.stderr
        (row,) = [x for x in (tmp_path / out / "gpu_check.md").read_text().splitlines() if x.startswith("| carried wheels")]
        return row

    assert "0 wheels" in carried("none") and "none carried" in carried("none")
    (repo / ".whl").mkdir()
    for name in ("fire-0.7.1-py3-none-any.whl", "webdataset-1.0.2-py3-none-any.whl"):
        (repo / ".whl" / name).write_bytes(b"PK")
    (repo / ".dali").mkdir()
    parts = {"part-00": os.urandom(1000), "part-01": os.urandom(300)}
    for name, data in parts.items():
        (repo / ".dali" / name).write_bytes(data)
    (repo / ".dali/SHA256SUMS").write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in parts.items()))
    row = carried("whole")
    assert ".whl: 2 wheels" in row and "2 parts, checksums match" in row, row
    (repo / ".dali/part-01").write_bytes(b"damaged")
    row = carried("damaged")
    assert "unusable" in row and "part-01: FAILED" in row and "part-00" not in row, row
    (repo / ".dali/part-01").unlink()
    row = carried("missing")
    assert "unusable" in row and "part-01" in row and "of 2 parts" in row, row
