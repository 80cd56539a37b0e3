"""pretrain.py end to end on tiny synthetic shards: outputs, exact resume after a kill, torchrun with
2 processes (FSDP2 on gloo), and the errors that must stop a run before or while it starts."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import clean_env, kill_when, signal_when

from mme import model as models
from mme.train import checkpoint_model_state, checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "shards"
    subprocess.run([sys.executable, "extract.py", "--src", "synthetic", "--out", str(out), "--split", "train",
                    "--limit", "16", "--frames", "8", "--stride", "2", "--short_side", "64", "--length", "4"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def args(shards, out, name, **kw):
    base = dict(data_path=f"{shards}/", num_frames=8, sampling_rate=2, trajectory_length=4,
                input_size=64, batch_size=4, epochs=2, warmup_epochs=1, save_every=2, num_workers=0,
                output_dir=str(out), name=name)
    base.update(kw)
    return ["--recipe", "recipes/tiny.yaml"] + [x for k, v in base.items() for x in (f"--{k}", str(v))]


def run(cmd_args, launcher=(sys.executable, "pretrain.py")):
    env = clean_env()
    return subprocess.run([*launcher, *cmd_args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def losses(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir):
    """{tag: [(step, value)]} from the TensorBoard event files in a run folder (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_one_process_run_writes_everything(shard_dir, tmp_path):
    r = run(args(shard_dir, tmp_path, "one", log_every=3))
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "one"
    # stderr is not a terminal (a batch job's log): plain progress lines, at steps 1, 4, 7 and the last
    lines = [x for x in r.stderr.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["1/8", "4/8", "7/8", "8/8"], r.stderr[-2000:]
    assert all(w in lines[-1] for w in ("epoch 2/2", "loss ", "lr ", "clips/s", "data ", "ETA 0s")), lines[-1]
    log = (d / "log.txt").read_text()                                         # the same lines, time-stamped
    assert all(x in log for x in lines) and "1 process(es)" in log and "done:" in log
    floor = json.loads((d / "loss_floor.json").read_text())["loss"]             # the last word: did the loss leave it?
    assert f"x the loss of predicting the mean target ({floor:.3f})" in log and f"{floor:.3f}" in r.stdout + r.stderr
    tb = scalars(d)                                                           # TensorBoard, beside metrics.jsonl
    assert {"train/loss", "train/lr", "train/clips_per_s", "train/data_wait"} <= set(tb)
    assert tb["train/loss"] == [(x["step"], pytest.approx(x["loss"])) for x in losses(d)]
    rows = losses(d)
    assert [x["step"] for x in rows] == list(range(1, 9))                    # 16 clips / 4 = 4 steps, 2 epochs
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["lr"] == 0 and max(x["lr"] for x in rows) == pytest.approx(3.2e-2 * 4 / 256)   # warmup to base_lr x B/256
    assert (d / "loss.png").stat().st_size > 1000 and "model: tiny" in (d / "recipe.yaml").read_text()
    assert (d / "trajectories.png").stat().st_size > 1000
    enc = models.encoder("tiny", num_frames=8, img_size=64)
    models.load_backbone(enc, torch.load(d / "encoder.pth", map_location="cpu", weights_only=True))   # strict
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_6", "step_8"]            # the last 2 kept


def test_killed_run_resumes_the_same_curve(shard_dir, tmp_path):
    """With drop path on, so the torch RNG's state must come back exactly too."""
    whole = run(args(shard_dir, tmp_path, "whole", epochs=4, drop_path=0.1))
    assert whole.returncode == 0, whole.stderr[-2000:]
    kill_when(["pretrain.py", *args(shard_dir, tmp_path, "killed", epochs=4, drop_path=0.1)],
              tmp_path / "killed" / "checkpoints" / "step_4" / "done", ROOT)
    killed_at = len(losses(tmp_path / "killed"))
    assert killed_at < 16, "the run finished before it could be killed; make it longer"
    again = run(args(shard_dir, tmp_path, "killed", epochs=4, drop_path=0.1))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at step" in again.stderr
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert [x["step"] for x in b] == list(range(1, 17))                      # no step twice, none missing
    assert [s for s, _ in scalars(tmp_path / "killed")["train/loss"]] == list(range(1, 17))   # TensorBoard too
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)
        assert x["lr"] == pytest.approx(y["lr"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preempted_run_saves_says_so_and_resumes_the_same_curve(shard_dir, tmp_path, sig):
    """Issue #25: SIGTERM (SLURM's stop) or SIGUSR1 (sbatch --signal) between checkpoints: the step finishes, a
    checkpoint is saved, one line says where, exit PREEMPTED; the rerun continues the uninterrupted curve."""
    from mme.run import PREEMPTED
    kw = dict(epochs=4, drop_path=0.1, save_every=100)                      # no checkpoint before the end
    whole = run(args(shard_dir, tmp_path, "whole", **kw))
    assert whole.returncode == 0, whole.stderr[-2000:]
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    code, err = signal_when(["pretrain.py", *args(shard_dir, tmp_path, "stopped", **kw)],
                            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, ROOT, sig)
    assert code == PREEMPTED and "Traceback" not in err, err[-2000:]
    (at,) = [int(p.name.split("_")[1]) for p in checkpoints(tmp_path / "stopped")]
    assert 3 <= at < 16 and f"stopped by {sig.name} at step {at}" in err and "rerun the same command" in err
    again = run(args(shard_dir, tmp_path, "stopped", **kw))
    assert again.returncode == 0 and f"resuming at step {at}" in again.stderr, again.stderr[-2000:]
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "stopped")
    assert [x["step"] for x in b] == list(range(1, 17))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)


def test_torchrun_two_processes_fsdp(shard_dir, tmp_path):
    r = run(args(shard_dir, tmp_path, "two"), launcher=("torchrun", "--standalone", "--nproc_per_node=2", "pretrain.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and "batch 4 = 2 x 2 x 1" in r.stderr
    rows = losses(tmp_path / "two")
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
    enc = models.encoder("tiny", num_frames=8, img_size=64)
    models.load_backbone(enc, torch.load(tmp_path / "two" / "encoder.pth", map_location="cpu", weights_only=True))


def worker_pids(agent):
    """{rank: pid} of the pretrain.py workers a torchrun agent (pid) started (their RANK, from /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if b"pretrain.py" not in (d / "cmdline").read_bytes():
                continue
            env = dict(x.split("=", 1) for x in (d / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in x)
            if "RANK" in env and int(d.name) != agent:
                found[int(env["RANK"])] = int(d.name)
        except (OSError, ValueError):
            pass
    return found


def test_torchrun_restarts_after_a_lost_rank_and_finishes_the_same_run(shard_dir, tmp_path):
    """Issue #25: under torchrun --max-restarts=1 a killed rank made both new workers die in init_process_group
    (the agent's shared rendezvous store, pytorch/pytorch#135712). With the launch line the README and
    scripts/ use (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) the group restarts, resumes at its last checkpoint and
    ends with the uninterrupted run's curve, no step twice or missing."""
    launcher = ("torchrun", "--standalone", "--nproc_per_node=2", "--max-restarts=1", "pretrain.py")
    env = clean_env()
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    whole = subprocess.run([*launcher, *args(shard_dir, tmp_path, "whole", epochs=4)], cwd=ROOT, capture_output=True,
                           text=True, env=env, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    agent = subprocess.Popen([*launcher, *args(shard_dir, tmp_path, "lost", epochs=4)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        done = tmp_path / "lost" / "checkpoints" / "step_4" / "done"
        deadline = time.time() + 240
        while not done.exists() and agent.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(worker_pids(agent.pid)[1], signal.SIGKILL)                    # a rank lost mid-run
        _, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err[-3000:]
    assert "resuming at step" in err
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "lost")
    assert [x["step"] for x in b] == list(range(1, 17))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)


def test_bad_recipe_stops_before_anything(shard_dir, tmp_path):
    r = run(args(shard_dir, tmp_path, "bad", mask_ratoi=0.5))
    assert r.returncode == 2 and "unknown key 'mask_ratoi'" in r.stderr and "mask_ratio" in r.stderr
    assert not (tmp_path / "bad").exists()
    r = run(args(shard_dir, tmp_path, "bad", data_path=str(tmp_path / "nowhere" / "*.tar")))
    assert r.returncode == 2 and "no shards match" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def finite(run_dir):
    """Whether every tensor of every checkpoint of a run (its model through DCP) is finite."""
    return [all(bool(torch.isfinite(v).all()) for v in checkpoint_model_state(path).values()) for path in checkpoints(run_dir)]


def test_nonfinite_weights_are_never_saved_and_the_run_continues_with_a_lower_lr(shard_dir, tmp_path):
    """Issue #25: a blown-up update is caught before its weights are saved (the loss check alone read the loss
    computed before the update); the line names a finite checkpoint and the flags that continue from it."""
    # warm-up: step 1 runs at lr 0, so there is a good checkpoint to go back to
    r = run(args(shard_dir, tmp_path, "nan", base_lr=1e6, warmup_epochs=1, epochs=3, min_lr=0, save_every=1))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("error:"))
    assert "non-finite" in line and "nothing saved" in line and "--resume_changes base_lr,clip_grad" in line
    assert all(finite(tmp_path / "nan")) and not (tmp_path / "nan" / "encoder.pth").exists()
    named = re.search(r"Last good checkpoint: (\S+)\.", line)
    if named and named.group(1) != "none":
        assert Path(named.group(1)) == checkpoints(tmp_path / "nan")[0]
    again = run(args(shard_dir, tmp_path, "nan", base_lr=1e-4, warmup_epochs=1, epochs=3, min_lr=0, save_every=1))
    assert again.returncode == 2 and "--resume_changes base_lr" in again.stderr       # a changed recipe, not allowed
    import shutil
    for path in checkpoints(tmp_path / "nan")[:-1]:       # finite is not good: step 2's update, at 1e6 x lr, already
        shutil.rmtree(path)                               # made huge weights; continue from step 1 (it ran at lr 0)
    again = run(args(shard_dir, tmp_path, "nan", base_lr=1e-4, warmup_epochs=1, epochs=3, min_lr=0, save_every=1,
                     clip_grad=1.0, resume_changes="base_lr,clip_grad"))
    assert "resuming at step 1" in again.stderr
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(finite(tmp_path / "nan")) and (tmp_path / "nan" / "encoder.pth").exists()


# --- issue #10: faults around resuming ------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(shard_dir, tmp_path_factory):
    """A finished 8-step run (checkpoints step_6 and step_8): copy it before changing it."""
    out = tmp_path_factory.mktemp("finished")
    r = run(args(shard_dir, out, "done"))
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "done"


def copy_run(finished, tmp_path, name):
    import shutil
    shutil.copytree(finished, tmp_path / name)
    return tmp_path / name


class Planted:
    """Unpickling this runs code: what a planted .metadata would do."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


DAMAGE = {   # point 4: how a latest checkpoint gets broken
    "distcp cut": lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:1000]),
    "rank0.json cut": lambda d: (d / "rank0.json").write_text((d / "rank0.json").read_text()[:50]),
    ".metadata emptied": lambda d: (d / ".metadata").write_bytes(b""),
    ".metadata missing": lambda d: (d / ".metadata").unlink(),
    "done cut": lambda d: (d / "done").write_text((d / "done").read_text()[:30]),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoint_is_named_before_anything_reads_it(finished, tmp_path, how):
    from mme.train import verify_checkpoint
    d = copy_run(finished, tmp_path, "x") / "checkpoints"
    assert verify_checkpoint(d / "step_8") is None and verify_checkpoint(d / "step_6") is None
    DAMAGE[how](d / "step_8")
    reason = verify_checkpoint(d / "step_8")
    assert reason and (how.split()[0] in reason or "done marker" in reason), reason


def test_corrupt_latest_checkpoint_resumes_from_the_one_before(shard_dir, finished, tmp_path):
    """Points 4 and 5: a cut shard, and a planted .metadata pickle, are both refused in one line each;
    the run resumes from step 6 and ends with the same losses; the planted pickle never runs."""
    for case in ("cut", "planted"):
        d = copy_run(finished, tmp_path, case)
        ck = d / "checkpoints" / "step_8"
        if case == "cut":
            DAMAGE["distcp cut"](ck)
        else:
            import pickle
            (ck / ".metadata").write_bytes(pickle.dumps(Planted(tmp_path / "pwned")))
        r = run(args(shard_dir, tmp_path, case))
        assert r.returncode == 0, r.stderr[-2000:]
        warned = [line for line in r.stderr.splitlines() if "step_8" in line and "not used" in line]
        assert len(warned) == 1 and "resuming at step 6" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert [x["loss"] for x in losses(d)] == pytest.approx([x["loss"] for x in losses(finished)], rel=1e-5, abs=1e-6)
    assert not (tmp_path / "pwned").exists()


def test_torn_metrics_line_and_more_epochs_continue_a_finished_run(shard_dir, finished, tmp_path):
    """Point 6 (a metrics.jsonl line torn by a crash broke every rerun) and point 9's exception: raising
    epochs continues a finished run from its last checkpoint (and keep_checkpoints 0 keeps them all)."""
    d = copy_run(finished, tmp_path, "more")
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 2, "lo')
    r = run(args(shard_dir, tmp_path, "more", epochs=3, keep_checkpoints=0))      # keep every checkpoint from now on
    assert r.returncode == 0 and "resuming at step 8" in r.stderr, r.stderr[-2000:]
    assert [x["step"] for x in losses(d)] == list(range(1, 13))
    assert "epochs: 3" in (d / "recipe.yaml").read_text()
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_10", "step_12", "step_6", "step_8"]


def test_changed_recipe_is_refused_then_started_fresh_on_request(shard_dir, finished, tmp_path):
    """Point 9: another mask_ratio (or model) under the same name silently "resumed" a finished run."""
    d = copy_run(finished, tmp_path, "changed")
    saved = (d / "recipe.yaml").read_text()
    r = run(args(shard_dir, tmp_path, "changed", mask_ratio=0.9, model="small"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if "error" in x]
    assert "mask_ratio 0.7 -> 0.9" in line and "model 'tiny' -> 'small'" in line and "--name" in line and "--resume false" in line
    assert (d / "recipe.yaml").read_text() == saved and len(losses(d)) == 8
    r = run(args(shard_dir, tmp_path, "changed", mask_ratio=0.9, resume="false"))
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr[-2000:]
    assert [x["step"] for x in losses(d)] == list(range(1, 9)) and "mask_ratio: 0.9" in (d / "recipe.yaml").read_text()
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_6", "step_8"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(shard_dir, tmp_path):
    r = run(args(shard_dir, tmp_path, "gpu", device="cuda"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "device cuda" in r.stderr, r.stderr[-2000:]


def test_ctrl_c_says_where_the_run_resumes(shard_dir, tmp_path):
    import signal
    import time
    env = clean_env()
    # a long run (200 steps), signalled once any checkpoint is finished, and still running then
    def as_from_a_shell():
        # a child inherits its parent's blocked-signal mask and ignored signals: in the full suite (here and on
        # CI) the run went on after the SIGINT, though alone it stops; start it as a shell would, SIGINT live
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen([sys.executable, "pretrain.py", *args(shard_dir, tmp_path, "stop", epochs=50)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_shell)
    deadline = time.time() + 240
    while not checkpoints(tmp_path / "stop") and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before any checkpoint was seen: " + p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode not in (0, None) and "Traceback" not in err, err[-2000:]
    assert re.search(r"interrupted at step \d+: rerun the same command to resume from step \d+ \(.*checkpoints/step_", err), err[-2000:]


def test_a_second_process_on_the_same_run_folder_is_refused(shard_dir, tmp_path):
    """Issue #25: two pretrain.py with one --name corrupted each other; the second is now refused in one line
    naming the first, and the first runs on untouched. A crashed run's lock is no lock (kill -9 frees it)."""
    env = clean_env()
    first = subprocess.Popen([sys.executable, "pretrain.py", *args(shard_dir, tmp_path, "busy", epochs=6)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = tmp_path / "busy" / "metrics.jsonl"
        while not metrics.exists() and first.poll() is None:
            time.sleep(0.05)
        second = run(args(shard_dir, tmp_path, "busy", epochs=4))
        assert second.returncode == 2 and f"pid {first.pid} on" in second.stderr and "Traceback" not in second.stderr
        assert len([x for x in second.stderr.splitlines() if x.strip()]) == 1, second.stderr
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert [x["step"] for x in losses(tmp_path / "busy")] == list(range(1, 25))        # every step once
    kill_when(["pretrain.py", *args(shard_dir, tmp_path, "crashed", epochs=6)],
              tmp_path / "crashed" / "metrics.jsonl", ROOT)
    assert run(args(shard_dir, tmp_path, "crashed", epochs=6)).returncode == 0


def test_check_space_refuses_in_one_line(tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from mme.train import NoSpaceError, check_space
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 * 2 ** 20, 9 * 2 ** 20, 2 ** 20))
    with pytest.raises(NoSpaceError, match=r"^no space left on .*: checkpoint x needs 5 MB, 1 MB free$"):
        check_space(tmp_path / "not" / "yet", 5 * 2 ** 20, "checkpoint x")
    check_space(tmp_path, 2 ** 19, "checkpoint x")                        # enough: no error


def test_a_full_disk_is_one_line_and_loses_nothing(shard_dir, small_disk):
    """Issue #25: a 72-line traceback ending 'unexpected pos'; now one line naming the folder and the sizes."""
    r = run(args(shard_dir, small_disk, "full", save_every=1))
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "no space left on" in lines[0] and "MB free" in lines[0] or "while writing checkpoint" in lines[0]
    assert not checkpoints(small_disk / "full")                            # nothing half-written counts as done


def test_a_small_dataset_gets_min_steps_and_says_so(shard_dir, tmp_path):
    """Issue #23: min_steps raises the epochs of a small dataset (said in one line at the start, with the warm-up
    scaled), and a schedule that shows each clip more than 16 times says so."""
    r = run(args(shard_dir, tmp_path, "small", epochs=2, warmup_epochs=1, min_steps=80, save_every=100))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 steps an epoch: epochs raised from 2 to 20 (80 steps) to reach min_steps 80, warm-up 10 epochs" in r.stderr
    assert "few distinct clips: 16 a pass, seen 20 times each" in r.stderr
    assert len(losses(tmp_path / "small")) == 80
