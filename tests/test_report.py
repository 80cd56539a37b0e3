"""finetune.py report (mme/report.py): a tiny pre-training's report.md holds the numbers of its two frozen
evaluations (every read-out), recall per class, its pictures, and other runs of the same recipe in a table of
their own (mean ± std); a rerun reads the evaluations back; the loss floor it draws is the loss of predicting
the mean target, computed independently here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clean_env

from mme import figures, recipe, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """train (16 videos) and val (16 videos) shards, and a 4-step pre-training of 2 blocks on them with
    recipes/learn_tiny.yaml's loss (parts balanced, visible tokens too)."""
    tmp = tmp_path_factory.mktemp("report")
    subprocess.run([sys.executable, "extract.py", "--src", "synthetic", "--out", str(tmp / "shards"), "--split", "train,val",
                    "--limit", "16", "--frames", "8", "--stride", "2", "--short_side", "64", "--length", "4"],
                   cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "pretrain.py", "--recipe", "recipes/learn_tiny.yaml", *common(tmp), "--num_frames", "8",
                    "--input_size", "64", "--warmup_epochs", "0", "--epochs", "1", "--trajectory_length", "4",
                    "--depth", "2", "--name", "pre"], cwd=ROOT, check=True, capture_output=True)
    return tmp


def common(tmp):
    kw = dict(data_path=f"{tmp}/shards/", sampling_rate=2, batch_size=4, num_workers=0, output_dir=str(tmp))
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def run_report(tmp):
    env = clean_env()
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "finetune.py", "report", "--recipe", "recipes/probe_tiny.yaml", *common(tmp),
                        "--finetune", f"{tmp}/pre/encoder.pth", "--floor_samples", "8",
                        "--attentive_steps", "50"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def fake_eval(path, probe1, probe5, knn1, attentive1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"probe": {"top1": probe1, "top5": probe5}, "knn": {"top1": knn1, "top5": 0.0},
                                "attentive": {"top1": attentive1, "top5": 0.0}, "top1": probe1, "top5": probe5}))


def test_report_tables_pictures_reuse_and_other_runs(pretrained):
    tmp = pretrained
    run = tmp / "pre"
    (run / "trajectories.png").unlink()                       # as a run that drew none: redrawn from its checkpoint
    r = run_report(tmp)
    assert "from " in r.stderr and "model tiny, depth 2, patch_embed linear, num_frames 8, input_size 64" in r.stderr  # the run's
    this, random = (json.loads((run / d / "eval.json").read_text()) for d in ("frozen", "frozen_random"))
    assert this["fitted_from"]["depth"] == 2 and random["fitted_from"]["depth"] == 2 and random["weights"] is None
    assert r.stdout.splitlines() == [str(run / "report.md"), f"MME {this['probe']['top1']:.1f} % vs random "
                                     f"{random['probe']['top1']:.1f} % top-1 (frozen linear probe; attentive probe "
                                     f"{this['attentive']['top1']:.1f} % vs {random['attentive']['top1']:.1f} %; {this['videos']} videos)"]
    text = (run / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| MME (this run) |") or line.startswith("| random encoder |")]
    for res, kind in ((this, "MME (this run)"), (random, "random encoder")):
        for key, label in report.READOUTS:
            row = next(x for x in rows if x.startswith(f"| {kind} | {label} |"))
            assert f"| {res[key]['top1']:.1f} | {res[key]['top5']:.1f} |" in row
    assert "Other pre-trainings of this recipe" not in text
    assert "## Recall per class" in text and "| moving left |" in text and "| translation |" in text
    for png in ("loss.png", "trajectories.png", "frozen/confusion.png", "frozen_random/confusion.png"):
        assert (run / png).stat().st_size > 1000 and f"({png})" in text
    assert figures.figure_note(run / "trajectories.png").startswith("validation clips")
    floor = json.loads((run / "loss_floor.json").read_text())["loss"]
    assert f"{floor:.3f}, the loss of predicting" in text
    stamps = {p: p.stat().st_mtime_ns for d in ("frozen", "frozen_random") for p in (run / d).iterdir()}
    stamps[run / "trajectories.png"] = (run / "trajectories.png").stat().st_mtime_ns

    # other run folders beside it: the same recipe with other seeds (a table of their own), and another recipe (left out)
    for name, seed, lr, scores in (("pre_s1", 1, None, (30.0, 80.0, 33.0, 50.0)), ("pre_s2", 2, None, (40.0, 90.0, 37.0, 60.0)),
                                   ("other", 3, 1e-5, (99.0, 99.0, 99.0, 99.0))):
        (tmp / name).mkdir()
        pre = recipe.load(str(run / "recipe.yaml"), name=name, seed=seed, **({"base_lr": lr} if lr else {}))
        (tmp / name / "recipe.yaml").write_text(recipe.dump(pre))
        fake_eval(tmp / name / "frozen" / "eval.json", *scores)
    r = run_report(tmp)
    assert r.stderr.count("reused") == 2 and "features:" not in r.stderr and "Fig. 4" not in r.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps                # nothing recomputed, nothing redrawn
    text = (run / "report.md").read_text()
    others = text[text.index("### Other pre-trainings of this recipe"):text.index("## Recall per class")]
    assert "pre_s1, pre_s2" in others and "other" not in others.split("(")[1].split(")")[0]
    assert "| MME (other runs) | linear probe (mean token) | 35.0 ± 7.1 | 85.0 ± 7.1 | 1, 2 |" in others
    assert "| MME (other runs) | attentive probe (all tokens) | 55.0 ± 7.1 |" in others
    assert "99.0" not in text


def numpy_floor(batches, widths, visible):
    """The loss of predicting each token position's mean (balanced, weighted) target, written out in numpy."""
    scaled = []
    for t, m, w in batches:
        edges = np.cumsum([0, *widths])
        rms = [np.sqrt((t[..., a:b] ** 2).mean(-1)[w > 0].mean()) for a, b in zip(edges, edges[1:])]
        scaled.append(np.concatenate([t[..., a:b] / s for a, b, s in zip(edges, edges[1:], rms)], -1))
    num = sum((s * w[..., None]).sum(0) for s, (_, _, w) in zip(scaled, batches))
    mean = num / sum(w.sum(0) for _, _, w in batches)[:, None]
    losses = []
    for s, (t, m, w) in zip(scaled, batches):
        edges = np.cumsum([0, *widths])
        err = np.mean([((mean[None, :, a:b] - s[..., a:b]) ** 2).mean(-1) for a, b in zip(edges, edges[1:])], 0)   # [B, N]
        on = lambda sel: (err * w * sel).sum() / (w * sel).sum()
        losses.append(on(m) + visible * on(~m))
    return float(np.mean(losses))


def test_loss_floor_is_the_loss_of_predicting_the_mean():
    g = np.random.default_rng(0)
    widths, B, N = [6, 9], 3, 8
    batches = []
    for _ in range(4):
        t = g.normal(size=(B, N, 15)) * np.r_[np.full(6, 5.0), np.full(9, 0.1)] + np.arange(N)[:, None] * 0.5
        m = np.zeros((B, N), bool)
        m[:, g.permutation(N)[:5]] = True                         # 5 of 8 masked, the same count per clip
        w = (g.random((B, N)) > 0.2).astype(np.float32)
        batches.append((t.astype(np.float32), m, w))
    as_torch = [{"target": torch.from_numpy(t), "mask": torch.from_numpy(m), "weight": torch.from_numpy(w)} for t, m, w in batches]
    for visible in (0.0, 1.0):
        loss, mean = report.mean_loss(as_torch, widths, visible)
        assert loss == pytest.approx(numpy_floor(batches, widths, visible), rel=1e-5)
        assert loss < (1 + visible) * 0.99                         # below predicting 0 (~1 per term under balanced parts)
        assert mean.shape == (N, 15)


def test_plateau_line_says_whether_the_loss_left_the_floor(tmp_path):
    """pretrain.py's last line: the mean loss of the last 10 % of steps against the loss of predicting the mean target."""
    path = tmp_path / "metrics.jsonl"

    def ended(*runs):
        path.write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(l for n, v in runs for l in [v] * n)))
        return report.plateau_line(path, 2.0)

    stayed, learnt, begun = "has not left the plateau", "has learnt from the clips", "begun to leave"
    line = ended((1, 6.0), (99, 2.0))                                        # on the plateau to the end
    assert stayed in line and "the last 10 steps' loss is 2.000, 1.00 x the loss of predicting the mean target (2.000)" in line
    assert "another --seed" in line
    line = ended((1, 6.0), (49, 2.0), (50, 1.4))
    assert learnt in line and "1.400, 0.70 x" in line
    assert begun in ended((90, 2.0), (10, 1.9))                              # 0.95 x: learning has begun
    assert stayed in ended((90, 2.0), (10, 1.97)) and begun in ended((90, 2.0), (10, 1.95))   # 0.985 x is still on it
    assert ended((10, 3.0), (10, 2.5)).startswith("the last 2 steps' loss is 2.500")
