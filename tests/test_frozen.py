"""Frozen-feature evaluation (mme/frozen.py, finetune.py frozen): the logistic-regression probe and the
k-NN separate what is separable, find nothing in random labels, are deterministic, average a video's
views; the command scores every view, caches its features and reuses them only while they still hold."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import clean_env

from mme import frozen, model as models, recipe as recipes
from mme.online import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread is faster, far faster when another process keeps a core busy."""
    with frozen.one_thread():
        yield


def blobs(n, classes=5, dim=32, seed=0, spread=4.0):
    """n points around `classes` random centres (distance ~ spread * sqrt(2 dim) apart, unit noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_logreg_separates_blobs_deterministically():
    x, y = blobs(200)
    test_x, test_y = blobs(500, seed=1)
    groups = [f"v{i // 2}" for i in range(len(x))]                           # 2 clips per video
    probe = frozen.fit_logreg(x, y, groups, 5, seed=0)
    assert (probe.scores(test_x).argmax(1) == test_y).all()
    assert probe.l2 in frozen.L2_GRID and set(probe.held_out) == set(frozen.L2_GRID)
    again = frozen.fit_logreg(x, y, groups, 5, seed=0)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias) and again.l2 == probe.l2
    p = probe.scores(test_x)
    torch.testing.assert_close(p.sum(1), torch.ones(len(p), dtype=torch.float64))


def test_logreg_finds_nothing_in_random_labels():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 32, generator=g), torch.randint(0, 5, (400,), generator=g)
    test_x, test_y = torch.randn(2000, 32, generator=g), torch.randint(0, 5, (2000,), generator=g)
    probe = frozen.fit_logreg(x, y, [str(i) for i in range(400)], 5, seed=0)
    top1 = (probe.scores(test_x).argmax(1) == test_y).double().mean().item()
    assert abs(top1 - 0.2) < 0.04                                             # chance: 20% (+-0.9% std)


def order_tokens(n, seed=0, N=16, C=8, position=True):
    """Clips of N tokens whose mean is the same for both classes: class 1 has the marked token in the first
    half of the clip (an early event), class 0 in the second half (the time-reversed clip). With position, a
    code in the last channels says where a token is, as a ViT's tokens carry their position."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, N, C, generator=g) * 0.1
    if position:
        x[..., -2] = torch.linspace(-1, 1, N)                             # where in the clip a token is
    at = torch.randint(0, N // 2, (n,), generator=g) + (y == 0).long() * (N // 2)
    x[torch.arange(n), at, 0] += 3.0                                      # the event
    return x, y


def test_attentive_probe_reads_what_the_mean_cancels_deterministically():
    """The two classes differ only in *where* the event is: the mean over tokens is the same, so the linear probe
    of the mean is at chance, and the attentive probe (a query attending to every token) reads it."""
    x, y = order_tokens(400)
    test_x, test_y = order_tokens(400, seed=1)
    linear = frozen.fit_logreg(x.mean(1), y, [str(i) for i in range(400)], 2)
    assert abs((linear.scores(test_x.mean(1)).argmax(1) == test_y).double().mean().item() - 0.5) < 0.1
    head = frozen.fit_attentive(x, y, 2, seed=0, steps=300)       # these toy tokens are read at 0.96 by 300 steps
    scores = frozen.attentive_scores(head, test_x)
    assert (scores.argmax(1) == test_y).double().mean().item() > 0.9
    torch.testing.assert_close(scores.sum(1), torch.ones(len(scores), dtype=torch.float64))
    again = frozen.attentive_scores(frozen.fit_attentive(x, y, 2, seed=0, steps=300), test_x)
    assert torch.equal(again, scores)                                      # the same tokens, the same probe
    shuffled = frozen.fit_attentive(x, y[torch.randperm(400, generator=torch.Generator().manual_seed(0))], 2, seed=0,
                                     steps=300)
    assert (frozen.attentive_scores(shuffled, test_x).argmax(1) == test_y).double().mean().item() < 0.7   # labels it cannot read


def test_attentive_probe_knows_where_each_token_is():
    """Tokens that do not carry their position (an MAE encoder's need not: its decoder adds them again) are a set
    to a query; the probe appends a position code of its own, so it still reads where the event is, and reading
    the same tokens in another order reads them as a set would: at chance."""
    x, y = order_tokens(400, C=192, position=False)                      # ViT-T's width: the probe's 4 heads
    test_x, test_y = order_tokens(400, seed=1, C=192, position=False)
    head = frozen.fit_attentive(x, y, 2, seed=0, steps=300)
    assert (frozen.attentive_scores(head, test_x).argmax(1) == test_y).double().mean().item() > 0.9
    g = torch.Generator().manual_seed(2)
    shuffled = torch.stack([clip[torch.randperm(len(clip), generator=g)] for clip in test_x])   # each clip's tokens reordered
    assert abs((frozen.attentive_scores(head, shuffled).argmax(1) == test_y).double().mean().item() - 0.5) < 0.1


def test_held_out_split_is_by_video():
    groups = [f"v{i // 3}" for i in range(300)]                               # 100 videos x 3 clips
    held = frozen.held_out_split(groups, seed=0)
    assert held.sum() == 60                                                   # 20% of the videos
    for v in set(groups):
        assert len({bool(h) for h, g in zip(held, groups) if g == v}) == 1   # a video is on one side
    assert (held == frozen.held_out_split(groups, seed=0)).all() and (held != frozen.held_out_split(groups, seed=1)).any()


def test_knn():
    x, y = blobs(200)
    test_x, test_y = blobs(500, seed=1)
    votes = frozen.knn_scores(x, y, test_x, 5, k=10)
    assert (votes.argmax(1) == test_y).all()
    torch.testing.assert_close(votes.sum(1), torch.ones(len(votes), dtype=torch.float64))
    labels = torch.randint(0, 7, (200,), generator=torch.Generator().manual_seed(0))   # any labels at all
    assert torch.equal(frozen.knn_scores(x, labels, x, 7, k=1).argmax(1), labels)    # each point is its own neighbour
    # weights exp(sim / T): 2 neighbours of class 0 outvote 1 more similar neighbour of class 1 only when T is large
    bank, bank_y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, -1.0]]), torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[1.0, 0.6]])           # closest to the class-1 point, then the two class-0 ones
    assert frozen.knn_scores(bank, bank_y, query, 3, k=3, T=0.07).argmax(1).item() == 1
    assert frozen.knn_scores(bank, bank_y, query, 3, k=3, T=100.0).argmax(1).item() == 0


def test_video_scores_average_the_views():
    videos = ["a", "b", "a"]
    scores = torch.tensor([[0.6, 0.4, 0.0],      # a, view 1: class 0
                           [0.1, 0.1, 0.8],      # b: class 2
                           [0.0, 0.45, 0.55]])   # a, view 2: class 2; the average says class 1
    names, score, truth = frozen.video_scores(videos, scores, [1, 2, 1])
    assert names == ["a", "b"] and truth.tolist() == [1, 2]
    torch.testing.assert_close(score[0], torch.tensor([0.3, 0.425, 0.275], dtype=torch.float64))
    top1, top5, predicted = frozen.accuracy(score, truth)
    assert predicted.tolist() == [1, 2] and top1 == 100.0 and top5 == 100.0
    _, score, truth = frozen.video_scores(videos[:2], scores[:2], [1, 2])     # view 1 alone gets video a wrong
    assert frozen.accuracy(score, truth)[0] == 50.0


def test_random_encoder_separates_colours():
    """Clips of one constant colour per class (plus noise): a random encoder's features show the class."""
    torch.manual_seed(0)
    enc = models.encoder("tiny", num_frames=4, img_size=32).eval()
    colours = torch.rand(6, 3) * 2 - 1                                        # [classes, 3]

    def clips(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 6
        video = colours[y][:, :, None, None, None] + 0.3 * torch.randn(n, 3, 4, 32, 32, generator=g)
        with torch.no_grad():
            return frozen.clip_features(enc, video), y

    (x, y), (test_x, test_y) = clips(60, 1), clips(60, 2)
    assert x.shape == (60, 192)
    probe = frozen.fit_logreg(x, y, [str(i) for i in range(60)], 6)
    assert (probe.scores(test_x).argmax(1) == test_y).double().mean() >= 0.95
    assert (frozen.knn_scores(x, y, test_x, 6, k=5).argmax(1) == test_y).double().mean() >= 0.95


# --- the command, end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train (16 videos) and val (8 videos, 2 windows each) shards, as tests/test_finetune.py makes them,
    and two random tiny encoders saved as pretrain.py's encoder.pth."""
    tmp = tmp_path_factory.mktemp("frozen")
    subprocess.run([sys.executable, "extract.py", "--src", "synthetic", "--out", str(tmp / "shards"), "--split", "train,val",
                    "--limit", "16", "--frames", "8", "--stride", "2", "--short_side", "64", "--length", "4"],
                   cwd=ROOT, check=True, capture_output=True)
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(models.backbone_state_dict(models.encoder("tiny", num_frames=8, img_size=64)), tmp / f"enc{seed}.pth")
    return tmp


def run_frozen(tmp, *a, launcher=(sys.executable,)):
    args = dict(data_path=f"{tmp}/shards/", num_frames=8, sampling_rate=2, input_size=64, batch_size=4, num_workers=0,
                output_dir=str(tmp), attentive_steps=50)                 # the probe's fit is tested on its own, above
    env = clean_env()
    env["OMP_NUM_THREADS"] = "1"                                              # as one_thread (torchrun sets it too)
    r = subprocess.run([*launcher, "finetune.py", "frozen", "--recipe", "recipes/probe_tiny.yaml",
                        *[x for k, v in args.items() for x in (f"--{k}", str(v))], *a],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_frozen_command_scores_caches_and_recomputes(shards):
    tmp = shards
    run_frozen(tmp, "--finetune", f"{tmp}/enc1.pth", "--name", "fz")
    run = tmp / "fz"
    result = json.loads((run / "eval.json").read_text())
    val = json.loads((tmp / "shards" / "manifest.json").read_text())["splits"]["val"]
    train = json.loads((tmp / "shards" / "manifest.json").read_text())["splits"]["train"]
    assert result["protocol"] == "frozen" and result["videos"] == val["videos"] and result["views"] == 3 * val["samples"]
    assert (result["top1"], result["top5"]) == (result["probe"]["top1"], result["probe"]["top5"])
    assert result["probe"]["l2"] in frozen.L2_GRID and result["knn"]["k"] == 10
    assert result["attentive"]["steps"] == result["fitted_from"]["attentive"]["steps"] == 50   # --attentive_steps
    assert (run / "confusion.png").stat().st_size > 1000
    cached = torch.load(run / "features.pt", weights_only=True)
    assert len(cached["train"]["keys"]) == train["samples"] and cached["train"]["features"].shape[1] == 192
    assert len(cached["eval"]["keys"]) == 3 * val["samples"]
    # the features are the encoder's: a batch of training clips (centre view) through it by hand gives them
    r = recipes.load("recipes/probe_tiny.yaml", data_path=f"{tmp}/shards/", num_frames=8, sampling_rate=2, input_size=64,
                     batch_size=4, num_workers=0, target="none", test_num_crop=1)
    b = next(iter(data.build_loader(data.shard_urls(r["data_path"], "train"), r, train=False)))
    enc = models.encoder("tiny", num_frames=8, img_size=64)
    models.load_backbone(enc, tmp / "enc1.pth")
    with torch.no_grad():
        by_hand = frozen.clip_features(enc.eval(), b["video"])
    rows = [cached["train"]["keys"].index(k) for k in b["key"]]
    torch.testing.assert_close(cached["train"]["features"][rows], by_hand, atol=1e-5, rtol=1e-5)
    again, _, _ = frozen.evaluate_features(cached["train"], cached["eval"], 10, seed=0, k=10, steps=50)
    assert again == {k: result[k] for k in again}                            # eval.json is what mme.frozen computes
    stamp = (run / "features.pt").stat().st_mtime_ns

    r = run_frozen(tmp, "--finetune", f"{tmp}/enc1.pth", "--name", "fz")     # the same: the cache is used
    assert "(cached)" in r.stderr and (run / "features.pt").stat().st_mtime_ns == stamp
    assert json.loads((run / "eval.json").read_text()) == result

    r = run_frozen(tmp, "--finetune", f"{tmp}/enc2.pth", "--name", "fz")     # other weights: recomputed
    assert "(cached)" not in r.stderr and (run / "features.pt").stat().st_mtime_ns != stamp
    other = torch.load(run / "features.pt", weights_only=True)
    assert not torch.allclose(other["train"]["features"], cached["train"]["features"])
    assert json.loads((run / "eval.json").read_text())["weights"] == f"{tmp}/enc2.pth"


def test_frozen_command_on_two_ranks_and_random_weights(shards):
    """torchrun with 2 ranks gathers the same features, in the same order, as one process (a random
    encoder, drawn from the seed, the same on every rank)."""
    tmp = shards
    no_attentive = ("--attentive", "false")                                   # the gather (shape-agnostic) is under test, not the probes
    run_frozen(tmp, "--finetune", "null", "--name", "one", *no_attentive)
    run_frozen(tmp, "--finetune", "null", "--name", "two", *no_attentive, launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
    one, two = (torch.load(tmp / name / "features.pt", weights_only=True) for name in ("one", "two"))
    for split in ("train", "eval"):
        assert one[split]["keys"] == two[split]["keys"] and torch.equal(one[split]["labels"], two[split]["labels"])
        torch.testing.assert_close(one[split]["features"], two[split]["features"], atol=1e-5, rtol=1e-5)
    a, b = (json.loads((tmp / name / "eval.json").read_text()) for name in ("one", "two"))
    same = ("videos", "views", "probe", "knn")
    assert a["weights"] is None and {k: a[k] for k in same} == {k: b[k] for k in same}
    assert "attentive" not in a and a["fitted_from"]["attentive"] is None   # `--attentive false` is false (fire: 'false')
