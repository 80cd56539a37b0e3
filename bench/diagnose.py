"""Why does pre-training not learn? Fast, controlled MME runs in memory, with the diagnostics of
docs/results.md: the swap test, a per-token motion read-out and the frozen-feature probe.

    python bench/diagnose.py cache                                   # centre crops of shards/synthetic -> runs/diagnose/cache.pt
    python bench/diagnose.py run --steps 300                         # the paper's target (patch norm), ViT-T, tube 0.7
    python bench/diagnose.py run --steps 2000 --norm global --balance --depth 4
    python bench/diagnose.py run --steps 1000 --target flow --depth 4   # direct supervision: each visible token's own motion
    python bench/diagnose.py run --target pixel --fixed_batch --steps 300   # can it fit one batch at all?
    python bench/diagnose.py random                                  # random encoders, the same read-outs
    python bench/diagnose.py pooling --encoder runs/ablate/headline/mme_trajectory/s0/encoder.pth --depth 4
                                     # what the frozen tokens hold beyond their mean: probes on other poolings

It trains mme.model.PretrainModel on clips held in memory (one centre crop per training clip, a new
tube mask per step), without the loader, FSDP or checkpoints, so a step costs only the model
(0.2 s at depth 4, 0.5 s at depth 12 on 2 cores). Read-outs after training, on the 100 val clips:
  - loss_own / loss_swap / loss_zero: masked loss with the clip's own encoder output, with another
    clip's (rolled by one in the batch), and with zeros. swap/own ~ 1.00 means the decoder's
    predictions do not depend on the clip: it predicts what every clip has in common at a position.
  - token_r2: ridge regression from each token's encoder features to its own mean displacement,
    fitted on half of the val clips, R^2 on the moving tokens (> 0.3 px/step) of the other half.
  - probe / knn: mme.frozen on mean-pooled features (train 400 -> val 100), top-1 %.
Each run appends its settings and read-outs to runs/diagnose/results.jsonl.

Target options (mme/targets.py computes the mme target; these only change its scaling and loss):
  --norm patch (the paper's patch norm) | global (each part divided by its rms over the training
  set) | none (raw px and HOG); --balance: the loss is the mean of the parts' MSEs (the authors'
  code) instead of the MSE over all values (eq. 1 as implemented); --shape false: position only.
"""
import json
import math
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mme import data, frozen, model as models, recipe as recipes, synthetic, targets  # noqa: E402
from mme.train import param_groups  # noqa: E402
from mme.transforms import MEAN, STD  # noqa: E402

OUT = Path("runs/diagnose")
K, L = 4, 6                                                   # trajectories per patch, steps


def cache(data_path="shards/synthetic/", recipe="recipes/tiny.yaml", file=str(OUT / "cache.pt"), **overrides):
    """Centre crops, raw trajectories and labels of the train and val splits -> `file` (overrides:
    recipe keys, e.g. --input_size 64)."""
    r = recipes.load(recipe, data_path=data_path, patch_norm=False, test_num_crop=1, num_workers=1, batch_size=16,
                     **overrides)
    out = {}
    for split in ("train", "val"):
        loader = data.build_loader(data.shard_urls(data_path, split), r, train=False)
        parts = {k: [] for k in ("video", "pos", "hog", "valid", "label")}
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1, 1), torch.tensor(STD).view(1, 3, 1, 1, 1)
        for b in loader:
            keep = ~b["pad"]
            video = (b["video"][keep].float() * std + mean) * 255
            parts["video"].append(video.round().clamp(0, 255).to(torch.uint8))     # [B, 3, T, S, S]
            raw = b["target"][keep]                                                # [B, N, K*L*2 + K*L*9], raw
            B, N, _ = raw.shape
            parts["pos"].append(raw[..., :K * L * 2].reshape(B, N, K, L, 2).half())
            parts["hog"].append(raw[..., K * L * 2:].reshape(B, N, K, L, 9).half())
            parts["valid"].append(b["weight"][keep])
            parts["label"].append(b["label"][keep])
        out[split] = {k: torch.cat(v) for k, v in parts.items()}
        print(f"{split}: {len(out[split]['label'])} clips", flush=True)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, file)


def first_frames(split, frames):
    """The first `frames` frames of each cached clip and the targets of their tokens (t-major order)."""
    tokens = frames // 2 * (split["video"].shape[-1] // 16) ** 2
    return dict(split, video=split["video"][:, :, :frames], pos=split["pos"][:, :tokens], hog=split["hog"][:, :tokens],
                valid=split["valid"][:, :tokens])


def normalise(video):                                          # uint8 [B, 3, T, S, S] -> ImageNet-normalised
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1, 1), torch.tensor(STD).view(1, 3, 1, 1, 1)
    return (video.float() / 255 - mean) / std


def make_target(split, idx, cfg):
    """-> target [B, N, D], weight [B, N], part widths (None: one part)."""
    if cfg["target"] in ("pixel", "hog"):
        video = split["video"][idx].float() / 255
        t = targets.pixel_target(video, cfg["norm"] == "patch") if cfg["target"] == "pixel" else targets.hog_target(video)
        return t, torch.ones(t.shape[:2]), None
    pos, hog = split["pos"][idx].float(), split["hog"][idx].float()
    if cfg["target"] == "flow":                                # each token's own mean displacement, px / rms
        return pos.mean((2, 3)) / cfg["scales"][0], split["valid"][idx].float(), None
    parts = [pos.flatten(2)] + ([hog.flatten(2)] if cfg["shape"] else [])
    if cfg["norm"] == "patch":
        parts = [F.layer_norm(p, p.shape[-1:], eps=1e-6) for p in parts]
    elif cfg["norm"] == "global":
        parts = [p / s for p, s in zip(parts, cfg["scales"])]
    return torch.cat(parts, -1), split["valid"][idx].float(), [p.shape[-1] for p in parts]


def masked_loss(pred, target, select, weight, widths, balance):
    """pred [B, n, D] for the tokens `select` [B, N] picks, in increasing index; eq. 1 with eq. 7's weight."""
    B, _, D = target.shape
    t, w = target[select].reshape(B, -1, D), weight[select].reshape(B, -1)
    if balance and widths:
        err = sum(((p - q) ** 2).mean(-1) for p, q in zip(pred.split(widths, -1), t.split(widths, -1))) / len(widths)
    else:
        err = ((pred - t) ** 2).mean(-1)
    return (err * w).sum() / w.sum().clamp_min(1e-6)


def step_loss(net, video, target, weight, mask, widths, cfg):
    feats = net.encoder(normalise(video), mask)
    if cfg["target"] == "flow":                                # a linear read-out of the visible tokens
        return masked_loss(net.flow_head(feats), target, ~mask, weight, None, False)
    pred = net.decode(feats, mask, every_token=True)
    nv = feats.shape[1]
    loss = masked_loss(pred[:, nv:], target, mask, weight, widths, cfg["balance"])
    if cfg["loss_visible"]:
        loss = loss + cfg["loss_visible"] * masked_loss(pred[:, :nv], target, ~mask, weight, widths, cfg["balance"])
    return loss


def readouts(net, d, cfg):
    """The swap test, token_r2 and the frozen probe (module docstring)."""
    net.eval()
    val, out = d["val"], {}
    with torch.no_grad():
        if cfg["target"] != "flow":
            idx = torch.arange(len(val["label"]))
            target, weight, widths = make_target(val, idx, cfg)
            t, n = cfg["frames"] // 2, cfg["size"] // 16
            mask = targets.tube_mask(np.random.default_rng(123), len(idx), t, n, n, cfg["mask_ratio"], cfg["mask_type"])
            feats = net.encoder(normalise(val["video"]), mask)
            for name, f in (("own", feats), ("swap", feats.roll(1, 0)), ("zero", torch.zeros_like(feats))):
                pred = net.decode(f, mask)
                out[f"loss_{name}"] = masked_loss(pred, target, mask, weight, widths, cfg["balance"]).item()
        tokens = {s: torch.cat([net.encoder(normalise(d[s]["video"][i:i + 25])) for i in range(0, len(d[s]["label"]), 25)])
                  for s in ("train", "val")}                                      # [n, N, C], every token visible
    out["token_r2"] = token_r2(tokens["val"], val["pos"])
    split = {s: {"keys": [f"{s}{i}_w00" for i in range(len(d[s]["label"]))], "features": tokens[s].mean(1),
                 "labels": d[s]["label"]} for s in ("train", "val")}
    result, _, _ = frozen.evaluate(split["train"], split["val"], 10, seed=cfg["seed"])
    out.update(probe=result["probe"]["top1"], knn=result["knn"]["top1"])
    net.train()
    return out


def token_r2(tokens, pos):
    y = pos.float().mean((2, 3))                                  # [B, N, 2] mean displacement per step
    moving = y.norm(dim=-1) > 0.3
    X = torch.cat([tokens, torch.ones(*tokens.shape[:2], 1)], -1).double()
    half = len(tokens) // 2
    a, ya = X[:half][moving[:half]], y[:half][moving[:half]].double()
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=torch.float64), a.T @ ya)
    b, yb = X[half:][moving[half:]], y[half:][moving[half:]].double()
    return float(1 - ((b @ w - yb) ** 2).sum() / ((yb - yb.mean(0)) ** 2).sum())


def run(steps=300, target="mme", norm="patch", balance=False, shape=True, depth=12, mask_type="tube",
        mask_ratio=0.7, loss_visible=0.0, lr=1e-3, batch=8, weight_decay=0.05, seed=0, fixed_batch=False,
        eval_every=0, threads=2, cache_file=str(OUT / "cache.pt"), frames=0, note=""):
    """One controlled run (module docstring); prints and appends its read-outs. --frames 8: only the
    first 8 cached frames (and their tokens' targets), a cheaper step."""
    torch.set_num_threads(threads)
    balance, shape, fixed_batch = (str(v).lower() not in ("false", "0", "no") for v in (balance, shape, fixed_batch))
    cfg = dict(steps=steps, target=target, norm=norm, balance=balance, shape=shape, depth=depth, mask_type=mask_type,
               mask_ratio=mask_ratio, loss_visible=loss_visible, lr=lr, batch=batch, weight_decay=weight_decay,
               seed=seed, fixed_batch=fixed_batch, cache_file=cache_file, note=note)
    d = torch.load(cache_file, weights_only=True)
    if frames:
        d = {s: first_frames(split, frames) for s, split in d.items()}
    tr = d["train"]
    cfg["frames"], cfg["size"] = tr["video"].shape[2], tr["video"].shape[-1]
    cfg["scales"] = [tr["pos"].float().pow(2).mean().sqrt().item(), tr["hog"].float().pow(2).mean().sqrt().item()]
    torch.manual_seed(seed)
    dim = {"pixel": 1536, "hog": 108, "flow": 2}.get(target, K * L * 2 + (K * L * 9 if shape else 0))
    net = models.PretrainModel("tiny", cfg["frames"], cfg["size"], dim, 1, 96, 3)
    net.encoder.blocks = net.encoder.blocks[:depth]
    net.flow_head = torch.nn.Linear(net.encoder.dim, 2)
    opt = torch.optim.AdamW(param_groups(net, weight_decay), lr=0.0)
    rng = np.random.default_rng(seed)
    warm, t, n, log, t0 = max(1, steps // 10), cfg["frames"] // 2, cfg["size"] // 16, [], time.time()
    for step in range(steps):
        lr_now = lr * (step + 1) / warm if step < warm else 1e-5 + (lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.arange(batch) if fixed_batch else torch.from_numpy(rng.choice(len(tr["label"]), batch, replace=False))
        tgt, weight, widths = make_target(tr, idx, cfg)
        mask = targets.tube_mask(rng, batch, t, n, n, mask_ratio, mask_type)
        loss = step_loss(net, tr["video"][idx], tgt, weight, mask, widths, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(log[-50:]):.4f} lr {lr_now:.1e} {time.time() - t0:.0f}s", flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            print(f"step {step + 1}:", json.dumps(readouts(net, d, cfg)), flush=True)
    result = dict(cfg, final_loss=float(np.mean(log[-50:])) if log else None, train_s=round(time.time() - t0), **readouts(net, d, cfg))
    print(json.dumps(result), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def random(seeds=3, depth=12, threads=2):
    """The read-outs of randomly initialised encoders (the baseline every run is compared with)."""
    for seed in range(seeds):
        run(steps=0, depth=depth, seed=seed, threads=threads, note="random encoder")


POOLINGS = {   # tokens [B, T/2, n*n, C] -> [B, features]
    "mean": lambda x: x.mean((1, 2)),                                   # what finetune.py frozen reads
    "mean per time step": lambda x: x.mean(2).flatten(1),               # keeps the order of the 8 tubelets
    "mean + std": lambda x: torch.cat([x.mean((1, 2)), x.flatten(1, 2).std(1)], 1),   # + the spread over tokens
    "mean + std per time step": lambda x: torch.cat([x.mean(2), x.std(2)], 2).flatten(1),
}


def pooling(encoder=None, depth=4, seed=0, cache_file=str(OUT / "cache.pt"), threads=2):
    """Probe the frozen tokens of `encoder` (an encoder.pth; None: random, from `seed`) pooled in several
    ways (POOLINGS), on the cached centre crops (400 train -> 100 val): overall and per-class top-1 %.
    If only the mean loses a class (rotations, scaling and the temporal classes cancel or vanish in a
    mean over tokens and time), richer poolings read it back."""
    torch.set_num_threads(threads)
    d = torch.load(cache_file, weights_only=True)
    frames, size = d["train"]["video"].shape[2], d["train"]["video"].shape[-1]
    torch.manual_seed(seed)
    enc = models.encoder("tiny", frames, size, depth, num_classes=0)
    if encoder:
        models.load_backbone(enc, encoder)
    enc.eval()
    with torch.no_grad():
        tokens = {s: torch.cat([enc(normalise(d[s]["video"][i:i + 25])) for i in range(0, len(d[s]["label"]), 25)])
                  .unflatten(1, (frames // 2, -1)) for s in ("train", "val")}           # [B, T/2, n*n, C]
    names = [c.removeprefix("moving ") if c.count(" ") == 1 else c for c in synthetic.CLASSES]
    print(f"{encoder or f'random encoder (seed {seed})'}, depth {depth}: probe top-1 % on {len(d['val']['label'])} val clips")
    print("| pooling | all | " + " | ".join(names) + " |")
    for name, pool in POOLINGS.items():
        split = {s: {"keys": [f"{s}{i}_w00" for i in range(len(d[s]["label"]))], "features": pool(tokens[s]),
                     "labels": d[s]["label"]} for s in ("train", "val")}
        result, truth, predicted = frozen.evaluate(split["train"], split["val"], len(names), seed=seed)
        per_class = [100 * float((predicted[truth == c] == c).double().mean()) for c in range(len(names))]
        print(f"| {name} | {result['probe']['top1']:.0f} | " + " | ".join(f"{a:.0f}" for a in per_class) + " |", flush=True)


if __name__ == "__main__":
    fire.Fire({"cache": cache, "run": run, "random": random, "pooling": pooling})
