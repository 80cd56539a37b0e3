"""finetune.py end to end on tiny synthetic shards: a probe and a full fine-tuning from pretrain.py's
encoder write a released-layout classifier that `eval` scores exactly as the run did, every video
once over its views; and the probe's folded BatchNorm computes what the probe computed."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import clean_env, kill_when

from mme import model as models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """train (16 videos) and val (8 videos, 2 windows each) shards, and a 4-step pre-training on them."""
    tmp = tmp_path_factory.mktemp("ft")
    subprocess.run([sys.executable, "extract.py", "--src", "synthetic", "--out", str(tmp / "shards"), "--split", "train,val",
                    "--limit", "16", "--frames", "8", "--stride", "2", "--short_side", "64", "--length", "4"],
                   cwd=ROOT, check=True, capture_output=True)
    base = common(tmp)
    subprocess.run([sys.executable, "pretrain.py", "--recipe", "recipes/tiny.yaml", *base, "--epochs", "1",
                    "--name", "pre", "--trajectory_length", "4"], cwd=ROOT, check=True, capture_output=True)
    return tmp


def common(tmp):
    kw = dict(data_path=f"{tmp}/shards/", num_frames=8, sampling_rate=2, input_size=64, batch_size=4, num_workers=0,
              output_dir=str(tmp), warmup_epochs=0)
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def finetune(*a, launcher=(sys.executable,)):
    env = clean_env()
    r = subprocess.run([*launcher, "finetune.py", *a], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("mode,recipe", [("probe", "recipes/probe_tiny.yaml"), ("full", "recipes/finetune_tiny.yaml")])
def test_train_then_eval_agree(pretrained, mode, recipe):
    tmp = pretrained
    r = finetune(mode, "--recipe", recipe, *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth", "--epochs", "1", "--name", mode)
    d = tmp / mode
    lines = [x for x in r.stderr.splitlines() if x.startswith("step ")]                  # stderr is a file here
    assert lines and re.match(r"step (\d+)/\1  epoch 1/1  loss ", lines[-1]) and lines[-1] in (d / "log.txt").read_text()
    result = json.loads((d / "eval.json").read_text())
    val = json.loads((tmp / "shards" / "manifest.json").read_text())["splits"]["val"]
    assert result["videos"] == val["videos"] and result["views"] == 3 * val["samples"]     # every window x 3 crops
    assert (d / "confusion.png").stat().st_size > 1000 and (d / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(x["loss"])) for x in rows)
    sd = torch.load(d / "model.pth", weights_only=True)["model"]
    clf = models.encoder("tiny", num_frames=8, img_size=64, num_classes=10)
    assert sorted(sd) == sorted(clf.state_dict())                                          # the released layout
    pre = torch.load(tmp / "pre" / "encoder.pth", weights_only=True)
    frozen = torch.equal(sd["blocks.3.mlp.fc1.weight"], pre["blocks.3.mlp.fc1.weight"])
    assert frozen == (mode == "probe")                                                     # the probe trains the head only
    finetune("eval", "--recipe", recipe, *common(tmp), "--finetune", str(d / "model.pth"), "--name", f"{mode}_eval")
    again = json.loads((tmp / f"{mode}_eval" / "eval.json").read_text())
    assert (again["top1"], again["top5"], again["views"]) == (result["top1"], result["top5"], result["views"])
    assert scalars(tmp / f"{mode}_eval") == {"val/top1": [(0, pytest.approx(again["top1"]))],
                                             "val/top5": [(0, pytest.approx(again["top5"]))]}     # TensorBoard too
    if mode == "probe":                   # 2 ranks: padded shares, gathered views, the same scores
        finetune("eval", "--recipe", recipe, *common(tmp), "--finetune", str(d / "model.pth"), "--name", "two",
                 launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
        two = json.loads((tmp / "two" / "eval.json").read_text())
        assert (two["videos"], two["views"], two["top1"], two["top5"]) == (again["videos"], again["views"], again["top1"], again["top5"])


def test_attentive_head_fine_tunes_evaluates_predicts_and_export_says_why_not(pretrained, tmp_path):
    """pool: attentive (issue #23: the mean token cancels a turn's and an expansion's direction): full fine-tuning
    writes the attentive head into model.pth, eval scores it as the run did, predict reads the pool from model.pth,
    and what cannot take it says so in one line: eval with pool mean, a linear probe, export to transformers."""
    from videos import write_video
    tmp = pretrained
    run = ("--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--pool", "attentive")
    finetune("full", *run, "--finetune", f"{tmp}/pre/encoder.pth", "--epochs", "1", "--name", "att")
    sd = torch.load(tmp / "att" / "model.pth", weights_only=True)["model"]
    assert sorted(sd) == sorted(models.encoder("tiny", num_frames=8, img_size=64, num_classes=10, pool="attentive").state_dict())
    result = json.loads((tmp / "att" / "eval.json").read_text())
    finetune("eval", *run, "--finetune", str(tmp / "att" / "model.pth"), "--name", "att_eval")
    again = json.loads((tmp / "att_eval" / "eval.json").read_text())
    assert (again["top1"], again["top5"], again["views"]) == (result["top1"], result["top5"], result["views"])
    write_video(tmp_path / "v.mp4", frames=30, size=(80, 64), seed=0, speed=(2, 0))
    r = finetune("predict", "--finetune", str(tmp / "att" / "model.pth"), str(tmp_path / "v.mp4"), "--out", str(tmp_path / "p.jsonl"))
    assert len(json.loads((tmp_path / "p.jsonl").read_text())["top"]) == 5, r.stderr[-2000:]
    for command, said in ((["eval", "--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--finetune",
                            str(tmp / "att" / "model.pth"), "--name", "as_mean"], "its head is for pool: attentive"),
                          (["probe", *run, "--finetune", f"{tmp}/pre/encoder.pth", "--name", "att_probe"], "finetune.py frozen"),
                          (["export", str(tmp_path / "hf"), "--finetune", str(tmp / "att" / "model.pth")], "an attentive head")):
        r = subprocess.run([sys.executable, "finetune.py", *command], cwd=ROOT, capture_output=True, text=True,
                           env=clean_env(), timeout=300)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "hf").exists() and not (tmp / "att_probe").exists()


def test_folded_probe_norm_computes_the_probe():
    clf = models.add_probe_norm(models.encoder("tiny", num_frames=4, img_size=32, num_classes=7))
    bn = clf.head[0]
    bn.running_mean.normal_(0, 3)
    bn.running_var.uniform_(0.01, 4)
    clf.head[1].weight.data.normal_(0, 0.5)
    clf.eval()
    video = torch.randn(3, 3, 4, 32, 32)
    plain = models.encoder("tiny", num_frames=4, img_size=32, num_classes=7).eval()
    plain.load_state_dict(models.fold_probe_norm(clf.state_dict()))
    torch.testing.assert_close(plain(video), clf(video), atol=1e-4, rtol=1e-4)


def test_num_classes_is_required(pretrained):
    r = subprocess.run([sys.executable, "finetune.py", "probe", "--recipe", "recipes/tiny.yaml", *common(pretrained)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "num_classes is required" in r.stderr


def test_killed_fine_tuning_resumes_the_same_curve(pretrained):
    """Full fine-tuning (mixup/cutmix, RandAugment, repeated sampling: every random draw must come
    back) killed after a checkpoint and rerun: the same losses as an uninterrupted run."""
    tmp = pretrained
    a = ("full", "--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth",
         "--epochs", "3", "--save_every", "2")
    finetune(*a, "--name", "whole")
    kill_when(["finetune.py", *a, "--name", "killed"], tmp / "killed" / "checkpoints" / "step_4" / "done", ROOT)
    rows = lambda name: [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    whole = rows("whole")
    assert len(rows("killed")) < len(whole), "the run finished before it could be killed"
    again = finetune(*a, "--name", "killed")
    assert "resuming at step" in again.stderr
    killed = rows("killed")
    assert [x["step"] for x in killed] == [x["step"] for x in whole]
    for x, y in zip(whole, killed):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)


def test_eval_refuses_weights_it_cannot_score(pretrained):
    """Issue #10 point 10: eval of pretrain.py's encoder.pth scored a random head (and printed it as a
    result); point 12: --finetune README.md ended in torch's UnpicklingError traceback."""
    tmp = pretrained
    for weights, words in ((f"{tmp}/pre/encoder.pth", "it has no head"), ("null", "eval needs a classifier"),
                           (str(ROOT / "README.md"), "not a checkpoint")):
        r = subprocess.run([sys.executable, "finetune.py", "eval", "--recipe", "recipes/probe_tiny.yaml", *common(tmp),
                            "--finetune", weights, "--name", "nohead"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp / "nohead" / "eval.json").exists()


def test_a_run_checkpoint_is_weights_too(pretrained, tmp_path):
    """--finetune runs/NAME/checkpoints/step_N starts from the encoder as it was at step N (the last one holds
    encoder.pth's weights exactly), read in one process; a damaged or unfinished checkpoint is refused in one
    line, before DCP unpickles anything of it."""
    import shutil
    tmp = pretrained
    step = max((tmp / "pre" / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    enc = torch.load(tmp / "pre" / "encoder.pth", weights_only=True)
    sd = models.read_checkpoint(step)
    assert sorted(k for k in sd if k.startswith("encoder.")) == sorted(f"encoder.{k}" for k in enc)
    assert all(torch.equal(sd[f"encoder.{k}"], v) for k, v in enc.items())
    finetune("probe", "--recipe", "recipes/probe_tiny.yaml", *common(tmp), "--finetune", str(step), "--epochs", "1",
             "--name", "from_step")
    clf = torch.load(tmp / "from_step" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(clf[k], v) for k, v in enc.items() if k.startswith(("patch_embed.", "blocks.")))
    damaged, unfinished = tmp_path / "damaged", tmp_path / "unfinished"
    shutil.copytree(step, damaged)
    shutil.copytree(step, unfinished)
    (unfinished / "done").unlink()
    data = next(damaged.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    for folder, words in ((damaged, "is damaged"), (unfinished, "neither a weights file nor a checkpoint")):
        r = subprocess.run([sys.executable, "finetune.py", "probe", "--recipe", "recipes/probe_tiny.yaml", *common(tmp),
                            "--finetune", str(folder), "--name", "refused"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and str(folder) in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]


def scalars(run_dir):
    """{tag: [(step, value)]} from the TensorBoard event files in a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_validation_every_epoch_keeps_best_pth(pretrained):
    """Issue #11: eval_every validates during training (val.jsonl, TensorBoard, the log), best.pth is the
    classifier of the best val top-1 and eval.json names it; the last validation is the final evaluation."""
    tmp = pretrained
    r = finetune("probe", "--recipe", "recipes/probe_tiny.yaml", *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth",
                 "--epochs", "2", "--eval_every", "1", "--name", "best")
    d = tmp / "best"
    val = [json.loads(line) for line in (d / "val.jsonl").read_text().splitlines()]
    assert [(v["step"], v["epoch"]) for v in val] == [(4, 1), (8, 2)]
    result = json.loads((d / "eval.json").read_text())
    assert (result["top1"], result["top5"]) == (val[-1]["top1"], val[-1]["top5"])           # not evaluated twice
    top = max(val, key=lambda v: v["top1"])
    assert result["best"]["top1"] == top["top1"] and result["best"]["step"] == top["step"]
    sd = torch.load(d / "best.pth", weights_only=True)["model"]
    assert sorted(sd) == sorted(models.encoder("tiny", num_frames=8, img_size=64, num_classes=10).state_dict())
    assert sum("val step" in line for line in r.stderr.splitlines()) == 2 and "best.pth" in (d / "log.txt").read_text()
    tb = scalars(d)                                                                         # beside metrics.jsonl
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 9)) and {"train/lr", "train/clips_per_s", "train/data_wait"} <= set(tb)
    assert tb["val/top1"] == [(v["step"], pytest.approx(v["top1"])) for v in val] and len(tb["val/top5"]) == 2


def test_probe_without_a_pretrained_encoder_says_to_pretrain(tmp_path):
    """Issue #11: finetune.py probe before pretrain.py ended in a bare 'No such file'."""
    for cmd in ("probe", "frozen"):
        r = subprocess.run([sys.executable, "finetune.py", cmd, "--recipe", "recipes/probe_tiny.yaml", "--finetune",
                            str(tmp_path / "runs" / "tiny" / "encoder.pth"), "--output_dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        (line,) = [x for x in r.stderr.splitlines() if "error" in x]
        assert "does not exist: run pretrain.py first" in line and "--finetune null" in line


def test_preempted_fine_tuning_saves_and_resumes(pretrained):
    """Issue #25: SIGTERM between checkpoints: the step finishes, a checkpoint is saved, exit PREEMPTED; the rerun
    resumes there and finishes with every step once."""
    import signal

    from helpers import signal_when

    from mme.run import PREEMPTED
    from mme.train import checkpoints
    tmp = pretrained
    a = ["full", "--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth",
         "--epochs", "4", "--save_every", "100", "--name", "preempted"]
    metrics = tmp / "preempted" / "metrics.jsonl"
    code, err = signal_when(["finetune.py", *a], lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
                            ROOT, signal.SIGTERM)
    assert code == PREEMPTED and "stopped by SIGTERM at step" in err and "Traceback" not in err, err[-2000:]
    (at,) = [int(p.name.split("_")[1]) for p in checkpoints(tmp / "preempted")]
    r = finetune(*a)
    assert f"resuming at step {at}" in r.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and (tmp / "preempted" / "eval.json").exists()


@pytest.mark.parametrize("command", ["probe", "eval", "frozen"])
def test_labels_outside_num_classes_and_empty_evaluation_data_stop_before_any_work(pretrained, command, tmp_path):
    """Issue #25: a 10-class dataset with --num_classes 5 failed at step 1 (probe) or after writing eval.json (eval);
    an empty validation split was found only after training. Now one line each, nothing written."""
    tmp = pretrained
    env = clean_env()
    weights = f"{tmp}/{'probe/model.pth' if command == 'eval' else 'pre/encoder.pth'}"
    if command == "eval" and not Path(weights).exists():
        weights = f"{tmp}/pre/encoder.pth"
    base = [sys.executable, "finetune.py", command, "--recipe", "recipes/probe_tiny.yaml", *common(tmp), "--finetune", weights,
            "--output_dir", str(tmp_path)]
    r = subprocess.run([*base, "--num_classes", "5", "--name", "five"], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "outside num_classes 5: set --num_classes" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "five").exists()
    manifest = json.loads((tmp / "shards" / "manifest.json").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest["splits"]["val"] = {"videos": 0, "samples": 0, "classes": {}, "shards": {}}
    (empty / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run([*base, "--eval_data_path", f"{empty}/", "--name", "noval"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "lists no val sample" in r.stderr and not (tmp_path / "noval").exists(), r.stderr[-2000:]


def test_predict_on_raw_videos_equals_eval_on_their_shards(pretrained, tmp_path):
    """Issue #26: `finetune.py predict` on mp4 files (no shards, no trajectories) gives the same per-video scores as
    the classifier on those videos extracted as shards; class names come with model.pth; an unusable video is one
    line and the others go on; a model without class names, or no video, is one line and exit 2."""

    from videos import write_video

    from mme import evaluate, predict
    from mme.online import data
    tmp = pretrained
    model = tmp / "full" / "model.pth"
    if not model.exists():
        finetune("full", "--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth",
                 "--epochs", "1", "--name", "full")
    ckpt = predict.load(model)
    assert ckpt["class_names"][0] == "moving left" and ckpt["recipe"]["num_frames"] == 8 and ckpt["extraction"]["short_side"] == 64
    videos = tmp_path / "videos" / "any"
    for i, speed in enumerate([(2, 0), (0, 2), (-1, 1)]):
        write_video(videos / f"v{i}.mp4", frames=30, size=(80, 64), seed=i, speed=speed)
    (videos / "notes.mp4").write_text("not a video")
    r = subprocess.run([sys.executable, "finetune.py", "predict", "--finetune", str(model), str(videos.parent), "--out",
                        str(tmp_path / "p.jsonl")], cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sum("skip" in x and "notes.mp4" in x for x in r.stderr.splitlines()) == 1
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [Path(x["video"]).name for x in rows] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert all(len(x["top"]) == 5 and x["top"][0][0] in ckpt["class_names"] for x in rows)
    # the same videos extracted as shards (extract.py, folder source, the model's extraction params), scored directly
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "extract.py", "--src", "folder", "--root", str(tmp_path / "videos"), "--split", "val",
                    "--out", str(shards), "--frames", "8", "--stride", "2", "--short_side", "64", "--length", "4"],
                   cwd=ROOT, check=True, capture_output=True, env=clean_env())
    import torch.distributed as dist

    from mme.train import setup_distributed
    setup_distributed("cpu", 0)
    try:
        clf = models.encoder("tiny", num_frames=8, img_size=64, num_classes=10)
        models.load_backbone(clf, ckpt)
        clf.eval()
        out = evaluate.views(lambda v: torch.softmax(clf(v).float(), -1), data.shard_urls(f"{shards}/", "val"),
                             dict(ckpt["recipe"], num_workers=0), 0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    names, score, _ = evaluate.video_scores([evaluate.video_of(k) for k in out["keys"]], out["outputs"], out["labels"])
    for row, s in zip(rows, score):
        for name, p in row["top"]:
            assert p == pytest.approx(float(s[ckpt["class_names"].index(name)]), abs=1e-5)
    for bad, said in (([str(tmp / "pre" / "encoder.pth"), str(videos)], "holds no class names"),
                      ([str(model), str(tmp_path / "nowhere.mp4")], "no such video file"),
                      ([str(model), str(videos / "notes.mp4")], "no video could be used")):
        r = subprocess.run([sys.executable, "finetune.py", "predict", "--finetune", *bad, "--out", str(tmp_path / "x.jsonl")],
                           cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "x.jsonl").exists()


def test_export_to_hugging_face_loads_and_gives_our_logits(pretrained, tmp_path):
    """Issue #26: `finetune.py export OUT --to hf` writes a folder that transformers' VideoMAEForVideoClassification
    (model.pth) and VideoMAEModel (encoder.pth) load with no missing or unexpected key, giving our outputs."""
    transformers = pytest.importorskip("transformers")

    tmp = pretrained
    model = tmp / "full" / "model.pth"
    if not model.exists():
        finetune("full", "--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth",
                 "--epochs", "1", "--name", "full")
    video = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    for weights, cls in ((model, transformers.VideoMAEForVideoClassification), (tmp / "pre" / "encoder.pth", transformers.VideoMAEModel)):
        out = tmp_path / weights.stem
        r = subprocess.run([sys.executable, "finetune.py", "export", str(out), "--finetune", str(weights), "--to", "hf"],
                           cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        hf, info = cls.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        ours = models.encoder("tiny", num_frames=8, img_size=64, depth=hf.config.num_hidden_layers,
                              num_classes=10 if cls is transformers.VideoMAEForVideoClassification else 0)
        models.load_backbone(ours, models.read_checkpoint(weights))
        with torch.no_grad():
            out = hf(pixel_values=video.transpose(1, 2))                     # transformers takes [B, T, C, H, W]
            theirs = out.logits if ours.num_classes else out.last_hidden_state
            torch.testing.assert_close(theirs, ours.eval()(video), atol=1e-4, rtol=1e-4)
    assert hf.config.num_frames == 8 and json.loads((tmp_path / "model" / "config.json").read_text())["id2label"]["0"] == "moving left"
    r = subprocess.run([sys.executable, "finetune.py", "export", "--finetune", str(model), "--to", "safetensors"],
                       cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
    from safetensors.torch import load_file
    plain = load_file(model.with_suffix(".safetensors"))                   # weights without pickle
    sd = torch.load(model, weights_only=True)["model"]
    assert r.returncode == 0 and set(plain) == set(sd) and all(torch.equal(plain[k], sd[k]) for k in sd)
    not_weights = str(tmp / "shards" / "manifest.json")
    r = subprocess.run([sys.executable, "finetune.py", "export", str(tmp_path / "bad"), "--finetune", not_weights],
                       cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "bad").exists(), r.stderr[-2000:]


def test_export_refuses_what_videomae_cannot_express(tmp_path):
    """A learned position embedding (transformers' VideoMAE has the fixed table only), an unknown size, a conv patch
    embedding: one line,
    nothing written."""
    from mme import export, recipe
    r = recipe.load(None, data_path="x", model="tiny", depth=2, num_frames=8, input_size=64)
    enc = models.encoder("tiny", num_frames=8, img_size=64, depth=2)
    sd = dict(enc.state_dict(), pos_embed=torch.zeros(1, 64, 192))
    (tmp_path / "run").mkdir()
    torch.save(sd, tmp_path / "run" / "encoder.pth")
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.dump(r))
    with pytest.raises(export.ExportError, match="learned position embedding"):
        export.to_hf(tmp_path / "run" / "encoder.pth", tmp_path / "out")
    torch.save(enc.state_dict(), tmp_path / "run" / "encoder.pth")
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.dump(r).replace("model: tiny", "model: huge"))
    with pytest.raises(export.ExportError, match="model 'huge'"):
        export.to_hf(tmp_path / "run" / "encoder.pth", tmp_path / "out")
    conv = models.encoder("tiny", num_frames=8, img_size=64, depth=2, patch_embed="conv")
    torch.save(conv.state_dict(), tmp_path / "run" / "encoder.pth")
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.dump(dict(r, patch_embed="conv")))
    with pytest.raises(export.ExportError, match="a conv patch embedding"):
        export.to_hf(tmp_path / "run" / "encoder.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("pool", ["mean", "attentive"])
def test_head_init_probe_starts_from_the_frozen_probe(pretrained, pool):
    """head_init probe (LP-FT): before any step the head is the frozen evaluation's probe fitted on what the head
    reads for each training clip's centre view (mean: the logistic regression folded into the Linear; attentive:
    the attentive probe). With lr ~0 nothing moves after, so model.pth's classifier must give the probe's scores,
    the probe refitted here on head inputs computed without the hook; on 2 ranks (sharded) the same head."""
    from mme import frozen, recipe as recipes
    from mme.evaluate import video_of
    from mme.online import data
    tmp = pretrained
    run = ("full", "--recipe", "recipes/finetune_tiny.yaml", *common(tmp), "--finetune", f"{tmp}/pre/encoder.pth", "--epochs", "1",
           "--pool", pool, "--head_init", "probe", "--base_lr", "1e-20", "--min_lr", "0")
    r = finetune(*run, "--name", f"lp_{pool}")
    said = [x for x in r.stderr.splitlines() if x.startswith("head: the ")]
    assert said and "training top-1" in said[0] and said[0] in (tmp / f"lp_{pool}" / "log.txt").read_text(), r.stderr[-2000:]
    rec = recipes.load("recipes/finetune_tiny.yaml", data_path=f"{tmp}/shards/", num_frames=8, sampling_rate=2, input_size=64,
                       batch_size=4, num_workers=0, pool=pool)
    clf = models.encoder("tiny", num_frames=8, img_size=64, num_classes=10, pool=pool).eval()
    clf.load_state_dict(torch.load(tmp / f"lp_{pool}" / "model.pth", weights_only=True)["model"])
    loader = data.build_loader(data.shard_urls(rec["data_path"], "train"), dict(rec, target="none", test_num_crop=1, test_num_segment=None),
                               train=False, rank=0, world_size=1)
    keys, videos, labels = [], [], []
    for b in loader:
        keep = ~b["pad"]
        keys += [k for k, ok in zip(b["key"], keep.tolist()) if ok]
        videos.append(b["video"][keep])
        labels += b["label"][keep].tolist()
    video, labels = torch.cat(videos), torch.tensor(labels)
    assert len(set(keys)) == len(keys) == int(re.search(r"encoder's (\d+) training clips", said[0])[1]) >= 16   # each window once
    with torch.no_grad():
        features = clf.forward_features(video)                        # [n, N, C]
        x = clf.fc_norm(features.mean(1) if pool == "mean" else features)   # what the head reads, without the hook
        scores = torch.softmax(clf(video).double(), -1)
    if pool == "mean":
        expected = frozen.fit_logreg(x, labels, [video_of(k) for k in keys], 10, seed=0).scores(x)
    else:
        expected = frozen.attentive_scores(frozen.fit_attentive(x, labels, 10, seed=0, norm=False), x)
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=0)
    assert expected.max(1).values.mean() > 0.13                       # a fitted head, not the ~uniform (0.1) one it started as
    if pool == "mean":                                                # sharded: the head reaches every rank's shards
        finetune(*run, "--name", "lp_two", launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
        two = torch.load(tmp / "lp_two" / "model.pth", weights_only=True)["model"]
        one = torch.load(tmp / "lp_mean" / "model.pth", weights_only=True)["model"]
        torch.testing.assert_close(two["head.weight"], one["head.weight"], atol=1e-4, rtol=1e-3)
        # probe mode refuses the key in one line (once: it does not depend on the pool)
        r = subprocess.run([sys.executable, "finetune.py", "probe", "--recipe", "recipes/probe_tiny.yaml", *common(tmp), "--finetune",
                            f"{tmp}/pre/encoder.pth", "--head_init", "probe", "--name", "lp_probe"], cwd=ROOT, capture_output=True,
                           text=True, env=clean_env(), timeout=300)
        assert r.returncode == 2 and "head_init probe: for full" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_head_init_probe_says_when_the_tokens_would_not_fit(pretrained):
    """An attentive head_init probe holds every training clip's tokens on rank 0: too many stop before any work."""
    from mme import frozen, recipe as recipes
    rec = recipes.load("recipes/finetune_tiny.yaml", data_path=f"{pretrained}/shards/", num_frames=8, input_size=64, pool="attentive")
    clf = models.encoder("tiny", num_frames=8, img_size=64, num_classes=10, pool="attentive")
    with pytest.raises(ValueError, match=r"holds every training clip's tokens on rank 0: 0 GiB for 16 clips \(at most 1e-06\)"):
        frozen.fit_head(clf, rec, 0, 1, torch.device("cpu"), max_gib=1e-6)
