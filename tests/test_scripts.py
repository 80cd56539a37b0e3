"""The SLURM launchers (scripts/slurm/): they parse, print the exact command lines a job would run (DRY_RUN),
and the commands they launch run: an array extraction in two parts, a 2-process torchrun pre-training on CPU."""
import json
import socket
import subprocess
import sys
from pathlib import Path

from helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "slurm"


def bash(script, *args, **env):
    return subprocess.run(["bash", str(SCRIPTS / script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env(**env), timeout=600)


def test_scripts_parse():
    for script in SCRIPTS.glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_dry_runs_print_the_job_commands():
    r = bash("train.sbatch", "pretrain.py", "--recipe", "recipes/ssv2.yaml", "--epochs", "1", DRY_RUN="1",
             SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8", MASTER_ADDR="gpu01", SLURM_JOB_ID="123")
    assert r.returncode == 0 and r.stdout.strip() == (
        "torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=gpu01:29500 --rdzv_id=123 "
        "--max-restarts=3 pretrain.py --recipe recipes/ssv2.yaml --epochs 1")
    r = bash("train.sbatch", "finetune.py", "full", "--recipe", "recipes/ssv2_finetune.yaml", DRY_RUN="1",
             NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="localhost", MASTER_PORT="4000")
    assert r.stdout.strip() == ("torchrun --nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=localhost:4000 "
                                "--rdzv_id=mme --max-restarts=3 finetune.py full --recipe recipes/ssv2_finetune.yaml")
    r = bash("extract.sbatch", "--src", "k400", "--out", "/shards/k400", DRY_RUN="1", SLURM_ARRAY_TASK_ID="3",
             SLURM_ARRAY_TASK_COUNT="16", SLURM_CPUS_PER_TASK="32")
    assert r.stdout.strip() == "part 3/16: python extract.py --workers 32 --src k400 --out /shards/k400"


def test_array_extraction_in_two_parts(tmp_path):
    out = tmp_path / "out"
    for task in (0, 1):
        r = bash("extract.sbatch", "--src", "synthetic", "--out", out, "--limit", "6", "--short_side", "64", "--frames", "8",
                 SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2", SLURM_CPUS_PER_TASK="1")
        assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["videos"] == 6 and sorted(m["parts"]) == ["train-0/2", "train-1/2"]


def test_the_launched_torchrun_command_trains_on_two_cpu_processes(tmp_path):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "extract.py", "--src", "synthetic", "--out", str(shards), "--limit", "8", "--frames", "8",
                    "--stride", "2", "--short_side", "64", "--length", "4"], cwd=ROOT, check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = bash("train.sbatch", "pretrain.py", "--recipe", "recipes/tiny.yaml", "--data_path", f"{shards}/", "--num_frames", 8,
             "--sampling_rate", 2, "--trajectory_length", 4, "--input_size", 64, "--batch_size", 4, "--epochs", 1,
             "--warmup_epochs", 0, "--num_workers", 0, "--output_dir", tmp_path, "--name", "launched",
             NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and (tmp_path / "launched" / "encoder.pth").exists()
