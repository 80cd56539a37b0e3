"""Frozen-feature evaluation: a logistic-regression probe and a weighted k-NN on a frozen encoder's
features, fitted in seconds and deterministically (finetune.py frozen wires it to shards and runs).

    x = clip_features(enc, video)           # video [B, 3, T, S, S] -> [B, C]: mean over tokens of the
                                            #   pre-training encoder's output (after its per-token norm)
    probe = fit_logreg(train_x, train_y, groups, num_classes, seed=0)    # train_x [n, C], train_y [n],
    p = probe.scores(test_x)                #   groups [n] (the video of each row) -> Probe; p [m, classes]
    s = knn_scores(train_x, train_y, test_x, num_classes, k=10, T=0.07) # [m, classes], each row sums to 1
    result, truth, predicted = evaluate_features(train, test, num_classes)   # all of it: what eval.json holds
    result = run(recipe, folder, rank, world, device)   # finetune.py frozen: features of shards, cached, -> eval.json
    head = fit_attentive(train_tokens, train_y, num_classes, seed=0)  # train_tokens [n, N, C] -> models.AttentiveHead
    p = attentive_scores(head, test_tokens)  # [m, classes]; evaluate_features runs it when both hold "tokens"
    save_features(path, source, splits); splits = load_features(path, source)   # the cache (None if stale)
    line = fit_head(clf, r, rank, world, device)   # finetune.py full's head_init probe (LP-FT): clf's head fitted as the probe

The probe: features standardised with the training mean/std, then softmax regression (weights W
[C, classes], bias b) minimising mean cross-entropy + l2 * |W|^2, to convergence with L-BFGS
(strong Wolfe line search) in float64 from zeros. l2 is chosen from L2_GRID by accuracy (ties: the
lower cross-entropy) on a held-out 20% of the training VIDEOS (drawn from the seed), then the probe
is refitted on all of them. Unlike an SGD-trained head (Table 4's probe), it has no learning rate,
epochs or batch order, so the same features give the same probe.

The k-NN (DINO's weighted k-NN, as V-JEPA reports it): features centred with the training mean and
L2-normalised; the k most cosine-similar training clips vote for their class with weight
exp(sim / T); a row's votes are normalised to sum to 1.

The attentive probe (V-JEPA's frozen evaluation; mme.model.AttentiveHead): a learned query cross-attends to every frozen token
of a clip, each told where it is (a fixed position code appended: one block: cross-attention, then an
MLP, both residual), then LayerNorm and a Linear head; trained with AdamW on the cached tokens, from a
seed, on one thread, so the same tokens give the same probe. A mean over tokens cancels a rotation's curl
and an expansion's divergence and drops time order; the attentive probe weighs tokens by where and when
they are, so it reads what the encoder holds beyond its mean.

LP-FT (finetune.py full with head_init: probe; Kumar et al. 2022): before every layer trains, the classifier's
head is fitted the same way on what it reads from the loaded encoder (fc_norm's output) for each training clip's
centre view: pool mean -> the logistic-regression probe, its standardisation folded into the Linear head;
pool attentive -> the attentive probe (its tokens are already fc_norm's, so without a LayerNorm of its own).
A head that starts random sends random gradients into the encoder while it learns, which can wear away the
features the frozen probe reads. Rank 0 holds every training clip's head input in memory (attentive: [n, N, C]).

All three score every view of an evaluation video and average the scores per video, then rank classes
per video: the protocol of finetune.py's multi-view evaluation.
"""
import contextlib
import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from mme import evaluate, model as models
from mme.evaluate import accuracy, class_recall, video_of, video_scores
from mme.online import data

L2_GRID = tuple(10.0 ** e for e in range(-5, 2))      # 1e-5 ... 1e1, the probe's penalties to choose from
HELD_OUT = 0.2                                          # share of training videos that chooses l2
ATTENTIVE = {"steps": 1000, "batch": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup": 100, "position": models.POSITION,
             "version": 3}   # the attentive probe's fit: fixed, not tuned per run (steps: --attentive_steps)


def clip_features(enc, video):
    """enc: an Encoder in the pre-training layout (num_classes=0), video [B, 3, T, S, S] -> [B, C] float32."""
    return enc(video).float().mean(1)                                        # [B, N, C] -> [B, C]


def frozen_encoder(r, device):
    """The encoder in the pre-training layout (final per-token norm), loaded from r["finetune"] or randomly
    initialised from r["seed"] (the same on every rank); frozen, eval mode. WeightsError for a bad file."""
    torch.manual_seed(r["seed"])
    enc = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], patch_embed=r["patch_embed"], num_classes=0)
    if r["finetune"]:
        models.load_weights(enc, r["finetune"])
    return enc.requires_grad_(False).eval().to(device)


def run(r, folder, rank, world, device, knn_k=10, knn_T=0.07, attentive=True, reuse=False, say=print,
        attentive_steps=ATTENTIVE["steps"]):
    """The frozen evaluation of r["finetune"] (None: a random encoder) into `folder`: tokens of every training
    clip (centre view) and every evaluation view, cached in features.pt while the weights, shards and
    feature-related keys stay the same; the probe, the k-NN and (attentive) the attentive probe
    (attentive_steps AdamW steps); eval.json and confusion.png. Every rank calls it.
    reuse: an eval.json fitted from the same weights (unchanged since), shards, keys and fit is read back.
    Returns eval.json's dict on rank 0, None elsewhere. Raises FileNotFoundError / ValueError (data, labels) and WeightsError."""
    where = r["eval_data_path"] or r["data_path"]
    train_urls, eval_urls = data.shard_urls(r["data_path"], "train"), data.shard_urls(where, "val")
    source = feature_source(r, train_urls, eval_urls, device) | {"tokens": bool(attentive)}
    shards = hashlib.sha256(json.dumps([source["train"], source["eval"]]).encode()).hexdigest()   # thousands of them
    fitted = json.loads(json.dumps({**{k: v for k, v in source.items() if k not in ("train", "eval")}, "shards": shards,
                                    "seed": r["seed"], "num_classes": r["num_classes"], "knn_k": knn_k,
                                    "knn_T": knn_T,
                                    "attentive": dict(ATTENTIVE, steps=attentive_steps) if attentive else None}))   # as read back
    done = [rank == 0 and reuse and same_fit(folder / "eval.json", fitted, r["finetune"])]
    dist.broadcast_object_list(done)                        # rank 0 decides: every rank computes, or none
    if done[0]:
        if rank == 0:
            say(f"{folder / 'eval.json'}: reused (the same weights, data and recipe keys)")
        return json.loads((folder / "eval.json").read_text()) if rank == 0 else None
    cache = folder / "features.pt"
    splits = load_features(cache, source) if rank == 0 else None
    cached = [splits is not None]
    dist.broadcast_object_list(cached)
    if cached[0]:
        say(f"features: {cache} (cached)") if rank == 0 else None
    else:
        enc = frozen_encoder(r, device)
        tick = time.perf_counter()
        fn = (lambda video: enc(video).float()) if attentive else (lambda video: clip_features(enc, video))
        splits = {"train": evaluate.views(fn, train_urls, dict(r, test_num_crop=1, test_num_segment=None), rank, world, device),
                  "eval": evaluate.views(fn, eval_urls, r, rank, world, device)}   # train: centre view; eval: every view
        if rank == 0:
            for s in splits.values():
                out = s.pop("outputs")
                s["features"] = out.float().mean(1) if attentive else out
                if attentive:
                    s["tokens"] = out.half()
            folder.mkdir(parents=True, exist_ok=True)
            save_features(cache, source, splits)
            say(f"features: {len(splits['train']['keys'])} train clips, {len(splits['eval']['keys'])} eval views in "
                f"{time.perf_counter() - tick:.0f} s -> {cache}")
    if rank:
        return None
    result, truth, predicted = evaluate_features(splits["train"], splits["eval"], r["num_classes"], r["seed"], knn_k, knn_T, device,
                                                steps=attentive_steps)
    result = {"protocol": "frozen", **result, "top1": result["probe"]["top1"], "top5": result["probe"]["top5"],
              "weights": r["finetune"], "data": str(where), "fitted_from": fitted}
    evaluate.write(folder, result, truth, predicted, r["num_classes"], evaluate.class_names(r))
    return result


def same_fit(path, fitted, weights):
    """Whether the eval.json at `path` was fitted from `fitted` (weights, shards, recipe keys, fit) and
    is newer than the weights file."""
    try:
        done = json.loads(path.read_text())
        newer = not weights or path.stat().st_mtime_ns > Path(weights).stat().st_mtime_ns
    except (OSError, ValueError):
        return False
    return newer and done.get("fitted_from") == fitted


# --- the logistic-regression probe --------------------------------------------------------------

@dataclass
class Probe:
    mean: torch.Tensor            # [C] training mean, float64
    std: torch.Tensor             # [C] training std (1 where a feature is constant)
    weight: torch.Tensor          # [C, classes]
    bias: torch.Tensor            # [classes]
    l2: float                     # the penalty it was fitted with
    held_out: dict                # l2 -> held-out top-1 % (empty if there was no choice to make)

    def scores(self, x):
        """x [m, C] -> softmax probabilities [m, classes], float64."""
        z = (x.to(self.mean) - self.mean) / self.std
        return torch.softmax(z @ self.weight + self.bias, -1)


def standardiser(x):
    """Training features [n, C] -> (mean [C], std [C]) in float64; std 1 for a constant feature."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std, torch.ones_like(std))


def fit_softmax(z, y, num_classes, l2, max_iter=1000):
    """Softmax regression on standardised z [n, C] (float64), y [n] -> (weight [C, classes], bias
    [classes]) minimising mean cross-entropy + l2 * |weight|^2. L-BFGS from zeros: deterministic."""
    weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, device=z.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return weight.detach(), bias.detach()


def held_out_split(groups, seed, share=HELD_OUT):
    """groups [n] (a video name per row) -> bool [n], True for the rows of a held-out `share` of the
    videos, drawn from the seed (every row of a video on the same side). All False below 2 videos."""
    names = sorted(set(groups))
    if len(names) < 2:
        return np.zeros(len(groups), bool)
    order = np.random.default_rng([seed, 8]).permutation(len(names))
    chosen = {names[i] for i in order[:min(len(names) - 1, max(1, round(share * len(names))))]}
    return np.array([g in chosen for g in groups])


@contextlib.contextmanager
def one_thread():
    """torch's CPU ops on one thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_logreg(train_x, train_y, groups, num_classes, seed=0, grid=L2_GRID, device=None):
    """train_x [n, C], train_y [n] class indices, groups [n] video names -> Probe (module docstring):
    l2 chosen from `grid` on a held-out 20% of the videos, then the probe refitted on all rows.
    On a CPU it runs on one thread: a thread count changes the order of float sums (one thread gives
    the same probe on every CPU), and L-BFGS's many small ops ([n, C] @ [C, classes]) gain little from
    threads but lose much more (40x measured) when another process keeps a core busy."""
    x = train_x.to(device or train_x.device, torch.float64)
    with one_thread() if x.device.type == "cpu" else contextlib.nullcontext():
        return _fit_logreg(x, train_y, groups, num_classes, seed, grid)


def _fit_logreg(x, train_y, groups, num_classes, seed, grid):
    y = torch.as_tensor(train_y, dtype=torch.long, device=x.device)
    held = torch.as_tensor(held_out_split(list(groups), seed), device=x.device)
    held_out = {}
    if len(grid) > 1 and held.any():
        mean, std = standardiser(x[~held])
        z_fit, z_held, y_held = (x[~held] - mean) / std, (x[held] - mean) / std, y[held]
        best = None
        for l2 in grid:
            w, b = fit_softmax(z_fit, y[~held], num_classes, l2)
            logits = z_held @ w + b
            top1 = (logits.argmax(1) == y_held).double().mean().item() * 100
            held_out[l2] = top1
            rank = (top1, -F.cross_entropy(logits, y_held).item())           # accuracy, then the lower loss
            if best is None or rank > best[0]:
                best = (rank, l2)
        l2 = best[1]
    else:
        l2 = grid[len(grid) // 2]
    mean, std = standardiser(x)
    w, b = fit_softmax((x - mean) / std, y, num_classes, l2)
    return Probe(mean, std, w, b, l2, held_out)


# --- the attentive probe -----------------------------------------------------------------------


def fit_attentive(train_tokens, train_y, num_classes, seed=0, steps=ATTENTIVE["steps"], batch=ATTENTIVE["batch"],
                  lr=ATTENTIVE["lr"], weight_decay=ATTENTIVE["weight_decay"], warmup=ATTENTIVE["warmup"], device=None,
                  position=ATTENTIVE["position"], norm=True):
    """train_tokens [n, N, C] (a clip view per row), train_y [n] -> mme.model.AttentiveHead in eval mode: AdamW,
    linear warm-up then cosine to 0, batches drawn from the seed; one thread on a CPU (deterministic).
    position: channels of the position code (0: none, the probe before version 3); norm: its own LayerNorm first
    (False for a classifier's head, which reads fc_norm's tokens)."""
    x = train_tokens.to(device or "cpu")
    y = torch.as_tensor(train_y, dtype=torch.long, device=x.device)
    N, C = x.shape[1:]
    with one_thread() if x.device.type == "cpu" else contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = models.AttentiveHead(C, num_classes, N, position, norm=norm).to(x.device)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        order = np.random.default_rng([seed, 9])
        for step in range(steps):
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            idx = torch.from_numpy(order.choice(len(y), min(batch, len(y)), replace=False)).to(x.device)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def attentive_scores(head, tokens, chunk=256):
    """tokens [m, N, C] -> softmax probabilities [m, classes], float64."""
    device = head.query.device
    return torch.cat([torch.softmax(head(part.to(device)).double(), -1) for part in tokens.split(chunk)])


def fit_head(clf, r, rank, world, device, max_gib=16):
    """LP-FT (module docstring): clf (a classifier, mme.model.Encoder with num_classes, possibly sharded) gets its
    head fitted on its own head input for every training clip's centre view of r["data_path"] (the frozen
    evaluation's probe: pool mean -> fit_logreg folded into the Linear; attentive -> fit_attentive), on every rank.
    Every rank calls it; returns a line for the log. Raises FileNotFoundError / ValueError (data, labels), and
    ValueError before any work when the shards' sizes say the attentive head's tokens would pass max_gib on rank 0."""
    urls = data.shard_urls(r["data_path"], "train")
    if r["pool"] == "attentive":
        clips = sum(data.stream.shard_sizes(urls).values())       # the manifests' counts, as the loader's epoch length
        gib = clips * clf.num_tokens * clf.dim * 4 / 2 ** 30
        if gib > max_gib:
            raise ValueError(f"head_init probe with pool attentive holds every training clip's tokens on rank 0: {gib:.0f} GiB "
                             f"for {clips} clips (at most {max_gib}); use pool mean or head_init random")
    tick, seen = time.perf_counter(), []
    hook = clf.head.register_forward_hook(lambda module, args, out: seen.append(args[0]))

    def head_input(video):                   # [B, 3, T, S, S] -> [B, C] (mean) or [B, N, C] (attentive)
        seen.clear()
        clf(video)
        return seen[0]

    training = clf.training
    clf.eval()                               # no drop path: the encoder as the frozen evaluation sees it
    try:
        split = evaluate.views(head_input, urls, dict(r, test_num_crop=1, test_num_segment=None), rank, world, device)
    finally:
        hook.remove()
        clf.train(training)
    state, line = [None], None
    if rank == 0:
        x, y = split["outputs"], split["labels"]
        if r["pool"] == "attentive":
            head = fit_attentive(x, y, r["num_classes"], r["seed"], norm=False)
            state[0] = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
            fitted = f"the attentive probe ({ATTENTIVE['steps']} steps)"
        else:                                # logits = ((x - mean) / std) @ W + b = x @ (W / std) + (b - (mean / std) @ W)
            probe = fit_logreg(x, y, [video_of(key) for key in split["keys"]], r["num_classes"], r["seed"])
            state[0] = {"head.weight": (probe.weight / probe.std[:, None]).T.float().contiguous(),
                        "head.bias": (probe.bias - (probe.mean / probe.std) @ probe.weight).float()}
            fitted = f"the logistic-regression probe (l2 {probe.l2:g})"
        top1 = (attentive_scores(head, x) if r["pool"] == "attentive" else probe.scores(x)).argmax(1).eq(y).double().mean() * 100
        line = (f"head: {fitted} on the frozen encoder's {len(y)} training clips, training top-1 {top1:.1f} % "
                f"({time.perf_counter() - tick:.0f} s)")
    if world > 1:
        dist.broadcast_object_list(state)
    if isinstance(clf, FSDPModule):          # FSDP2 keeps the root's parameters gathered after a forward: back to shards
        clf.reshard()
    with torch.no_grad():                    # in place: the optimizer holds these parameters
        for name, param in clf.named_parameters():
            if name in state[0]:
                full = state[0][name].to(param.device, param.dtype)
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements) if isinstance(param, DTensor) else full)
    return line


# --- k-NN ---------------------------------------------------------------------------------------

def knn_scores(train_x, train_y, test_x, num_classes, k=10, T=0.07):
    """Weighted k-NN: train_x [n, C], train_y [n], test_x [m, C] -> votes [m, classes] (rows sum to 1),
    cosine similarity on features centred with the training mean, weights exp(sim / T)."""
    mean = train_x.double().mean(0)
    bank = F.normalize(train_x.double() - mean, dim=1)                      # [n, C]
    labels = torch.as_tensor(train_y, dtype=torch.long, device=bank.device)
    k = min(k, len(bank))
    chunk = max(1, 2 ** 26 // len(bank))                                     # similarities [chunk, n]: 512 MB at most
    out = []
    for part in test_x.double().split(chunk):
        sim = F.normalize(part.to(bank.device) - mean, dim=1) @ bank.T       # [m', n]
        top, idx = sim.topk(k, dim=1)                                        # [m', k]
        votes = torch.zeros(len(part), num_classes, dtype=torch.float64, device=bank.device)
        votes.scatter_add_(1, labels[idx], torch.exp(top / T))
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


# --- per video ----------------------------------------------------------------------------------

def evaluate_features(train, test, num_classes, seed=0, k=10, T=0.07, device=None, position=ATTENTIVE["position"],
                      steps=ATTENTIVE["steps"]):
    """train: {"keys" [n] clip keys, "features" [n, C], "labels" [n]} (a view per clip), test: the same
    for every view of the evaluation videos -> (result, truth [V], the probe's predicted class [V]);
    result: {"videos", "views", "probe": {"top1", "top5", "l2", "recall"}, "knn": {..., "k"}}, and
    "attentive": {"top1", "top5", "recall", "steps"} when both hold "tokens" [n, N, C]; "recall" is each
    class's recall % over its videos (None for a class with no evaluation video); the attentive probe trains
    for `steps`."""
    train_y = torch.as_tensor(train["labels"], dtype=torch.long)
    if len(train_y) == 0 or bool((train_y < 0).any()) or bool((train_y >= num_classes).any()):
        raise ValueError(f"training labels must be in [0, {num_classes}) (shards without labels give -1)")
    train_x = train["features"].to(device or "cpu", torch.float64)
    test_x = test["features"].to(train_x.device, torch.float64)
    probe = fit_logreg(train_x, train_y, [video_of(key) for key in train["keys"]], num_classes, seed)
    videos = [video_of(key) for key in test["keys"]]
    result = {"videos": len(set(videos)), "views": len(videos)}
    methods = {"probe": (probe.scores(test_x), {"l2": probe.l2}),                       # scores [m, classes]
               "knn": (knn_scores(train_x, train_y, test_x, num_classes, k, T), {"k": k})}
    if "tokens" in train and "tokens" in test:
        head = fit_attentive(train["tokens"], train_y, num_classes, seed, steps, device=device, position=position)
        methods["attentive"] = (attentive_scores(head, test["tokens"]), {"steps": steps})
    predicted = {}
    for name, (scores, extra) in methods.items():
        _, score, truth = video_scores(videos, scores, test["labels"])
        top1, top5, predicted[name] = accuracy(score, truth)
        result[name] = {"top1": top1, "top5": top5, **extra, "recall": class_recall(truth, predicted[name], num_classes)}
    return result, truth, predicted["probe"]


# --- the feature cache --------------------------------------------------------------------------

def feature_source(recipe, train_urls, eval_urls, device):
    """What a feature cache is computed from (a JSON-able dict): the weights (path, size, mtime; or
    random and the seed), the recipe keys that change features, and the shards (with size and mtime)."""
    r = recipe
    if r["finetune"]:
        stat = Path(r["finetune"]).stat()
        weights = {"path": str(Path(r["finetune"]).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:
        weights = {"random": True, "seed": r["seed"]}
    stamp = lambda url: [url] + ([os.stat(url).st_size, os.stat(url).st_mtime_ns] if os.path.isfile(url) else [])
    return {"weights": weights, "device": torch.device(device).type,
            **{key: r[key] for key in ("model", "depth", "patch_embed", "num_frames", "input_size", "sampling_rate", "test_num_crop",
                                       "test_num_segment", "data_path", "eval_data_path", "precision")},
            "train": [stamp(u) for u in train_urls], "eval": [stamp(u) for u in eval_urls]}


def save_features(path, source, splits):
    """splits: {"train": {"keys": [n] str, "features": [n, C], "labels": [n]}, "eval": ...}; source: a
    JSON-able dict of what the features were computed from (weights, recipe keys, shards)."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")                                 # a killed run leaves no half a cache
    torch.save({"source": json.dumps(source, sort_keys=True),
                **{name: {"keys": list(s["keys"]), "features": s["features"].float().cpu(),
                          "labels": torch.as_tensor(s["labels"], dtype=torch.long),
                          **({"tokens": s["tokens"].half().cpu()} if "tokens" in s else {})} for name, s in splits.items()}},
               tmp)
    os.replace(tmp, path)


def load_features(path, source):
    """The splits save_features wrote, if the file exists and was computed from `source`; else None."""
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    if cached.get("source") != json.dumps(source, sort_keys=True):
        return None
    return {name: s for name, s in cached.items() if name != "source"}
