"""What does MME pre-training learn, and what could it? Controlled runs in memory (issue #23).

    python experiments/motion.py cache --data_path shards/synthetic8_2k/ --file runs/motion/pre.pt   # pre-training clips
    python experiments/motion.py cache --data_path shards/synthetic8/ --file runs/motion/eval.pt     # 400 train + 100 val
    python experiments/motion.py ceiling --eval runs/motion/eval.pt         # classifiers on the true trajectories
    python experiments/motion.py pretrain --pre runs/motion/pre.pt --eval runs/motion/eval.pt \\
        --recipe recipes/quick_tiny.yaml --steps 2000 --seed 0 [--any_recipe_key value]
    python experiments/motion.py supervised --pre runs/motion/pre.pt --eval runs/motion/eval.pt --steps 2000
    python experiments/motion.py random --eval runs/motion/eval.pt          # a random encoder, the same read-outs
    python experiments/motion.py own_motion --cache runs/motion/eval2k.pt [--patch_embed conv]   # motion learnable at all?
    python experiments/motion.py parts --run runs/i23/d8_s0 --cache runs/motion/eval2k.pt   # what a run predicts
    python experiments/motion.py flow_check --data_path shards/heldout/     # stored motion against the frames' flow
    python experiments/motion.py token_r2 --features runs/i23/long/frozen/features.pt --eval runs/motion/eval.pt
    python experiments/motion.py noisy_ceiling --eval runs/motion/eval.pt   # how precise per-token motion must be

`cache` keeps one centre crop of every clip (uint8) with its raw trajectory target (the loader's, patch
norm off, all K = 4 trajectories) and label. `pretrain` runs pretrain.py's step on them (the recipe's
model, target, normalisation, loss, optimiser and schedule; mme.online.targets and mme.model.mme_loss, as
pretrain.py calls them), without the loader's crops, so a step costs only the model: a recipe's
behaviour in minutes, not its final number (which pretrain.py gives). Every run ends with the frozen
read-outs of mme.frozen on the evaluation cache (linear probe and 10-NN of mean-pooled tokens, the
attentive probe of all tokens), overall, per class and per motion family, and appends them to
runs/motion/results.jsonl.
"""
import json
import math
import time
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from mme import evaluate, frozen, model as models, recipe as recipes
from mme.offline import synthetic
from mme.online import data, targets, transforms
from mme.train import load_checkpoint, param_groups

OUT = Path("runs/motion")


def cache(data_path, file, recipe="recipes/quick_tiny.yaml", splits="train,val"):
    """Centre crops (uint8 [n, T, S, S, 3]), raw dense targets ([n, N, D] float16), weights, labels, keys."""
    r = recipes.load(recipe, data_path=data_path, patch_norm="none", trajectory_density="dense", shape_target=True,
                     interpolation=True, test_num_crop=1, num_workers=1, batch_size=32)
    out = {}
    for split in splits.split(","):
        parts = {k: [] for k in ("video", "target", "weight", "label")}
        keys = []
        for b in data.build_loader(data.shard_urls(data_path, split), r, train=False):
            keep = ~b["pad"]
            parts["video"].append(transforms.to_uint8(b["video"][keep]))         # [n, T, S, S, 3]
            parts["target"].append(b["target"][keep].half())
            parts["weight"].append(b["weight"][keep])
            parts["label"].append(b["label"][keep])
            keys += [k for k, pad in zip(b["key"], b["pad"].tolist()) if not pad]
        out[split] = {k: torch.cat(v) for k, v in parts.items()} | {"keys": keys}
        print(f"{split}: {len(keys)} clips", flush=True)
    found = data.class_names(data.shard_urls(data_path, splits.split(",")[0]), range(100), limit=5000)
    out["names"] = [found[i] for i in range(len(found))] if found else list(synthetic.CLASSES)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, file)


def maps(split, idx, L):
    """The cached raw targets of clips idx back to the loader's trajectory maps: disp [B, T/2, S/8, S/8, L, 2],
    hog [..., L, 9], valid [B, T/2, S/8, S/8] (a point is valid where its token's weight is 1)."""
    raw, weight = split["target"][idx].float(), split["weight"][idx]
    n_side = int(math.isqrt(raw.shape[1] // (split["video"].shape[1] // 2)))
    grid = dict(t=split["video"].shape[1] // 2, h=n_side, w=n_side, kh=2, kw=2)
    disp = rearrange(raw[..., :4 * L * 2], "b (t h w) (kh kw l c) -> b t (h kh) (w kw) l c", l=L, c=2, **grid)
    hog = rearrange(raw[..., 4 * L * 2:], "b (t h w) (kh kw l c) -> b t (h kh) (w kw) l c", l=L, c=9, **grid)
    valid = rearrange(weight.bool()[..., None].expand(-1, -1, 4), "b (t h w) (kh kw) -> b t (h kh) (w kw)", **grid)
    return disp, hog, valid


def recipe_target(r, split, idx):
    """What pretrain.py's loader would give as target and weight for these clips (mme.online.data.make_target)."""
    if r["target"] == "mme":
        return data.make_target(r, None, *maps(split, idx, r["trajectory_length"]))
    return data.make_target(r, split["video"][idx], None, None, None)


def tokens_of(enc, video, chunk=50):
    """uint8 [n, T, S, S, 3] -> frozen tokens [n, N, C] float16 (every token visible)."""
    with torch.no_grad():
        return torch.cat([enc(transforms.normalize(video[i:i + chunk])).half() for i in range(0, len(video), chunk)])


def families(names):
    """{family: [class index, ...]} for the classes `names` (the built-in data's or experiments/heldout.py's)."""
    import heldout
    names = [n.replace("_", " ") for n in names]                           # folder names of the held-out videos
    table = next(t for cs, t in ((synthetic.CLASSES, synthetic.FAMILIES), (heldout.CLASSES, heldout.FAMILIES),
                                 (heldout.CLASSES2, heldout.FAMILIES2)) if set(names) == set(cs))
    return {f: [names.index(c) for c in cs] for f, cs in table.items()}


def class_list(ev):
    """The class names of an evaluation cache, in label order (cached with it)."""
    return ev.get("names") or list(synthetic.CLASSES)


def summarise(result, names):
    """A frozen evaluation's per-method top-1, recall per class and mean recall per family."""
    fam = families(names)
    return {m: {"top1": result[m]["top1"], "recall": result[m]["recall"],
                "family": {f: float(np.mean([result[m]["recall"][i] for i in idx])) for f, idx in fam.items()}}
            for m in ("probe", "knn", "attentive") if m in result}


def readouts(enc, ev, seed=0):
    """Linear probe / 10-NN on mean-pooled tokens and the attentive probe on all tokens, train -> val of the
    evaluation cache: top-1 %, recall per class and per family."""
    enc.eval()
    split = {}
    for s in ("train", "val"):
        tok = tokens_of(enc, ev[s]["video"])
        split[s] = {"keys": ev[s]["keys"], "features": tok.float().mean(1), "tokens": tok, "labels": ev[s]["label"]}
    names = class_list(ev)
    result, _, _ = frozen.evaluate_features(split["train"], split["val"], len(names), seed=seed)
    return summarise(result, names)


def show(out):
    for method, o in out.items():
        fam = " ".join(f"{f} {v:.0f}" for f, v in o["family"].items())
        print(f"  {method:9s} top-1 {o['top1']:5.1f} %  families: {fam}", flush=True)


def record(row):
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def schedule(step, steps, warmup, peak, floor):
    if step < warmup:
        return peak * step / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pretrain(pre, eval, recipe="recipes/quick_tiny.yaml", steps=2000, seed=0, threads=2, eval_at="", name="", **overrides):
    """MME pre-training in memory on the `pre` cache with the recipe's model, target and loss (overrides: recipe
    keys), then the read-outs on `eval`. eval_at: also read out at these steps ("1000,1500")."""
    torch.set_num_threads(threads)
    r = recipes.load(recipe, data_path="memory", seed=seed, **overrides)
    d, ev = torch.load(pre, weights_only=True), torch.load(eval, weights_only=True)
    tr = d["train"]
    T, S = tr["video"].shape[1], tr["video"].shape[2]
    if (T, S) != (r["num_frames"], r["input_size"]):
        raise SystemExit(f"{pre}: clips are {T} frames of {S}^2, the recipe wants {r['num_frames']} of {r['input_size']}^2")
    torch.manual_seed(seed)
    probe_idx = torch.arange(2)
    dim = recipe_target(r, tr, probe_idx)[0].shape[-1]
    net = models.PretrainModel.from_recipe(r, dim)
    opt = torch.optim.AdamW(param_groups(net, r["weight_decay"]), lr=0.0, betas=tuple(r["opt_betas"]))
    B = r["batch_size"]
    peak, floor = recipes.lr(r, B), recipes.lr(r, B, "min_lr")
    warmup = round(steps * r["warmup_epochs"] / r["epochs"])
    widths, visible = targets.loss_widths(r), r["loss_visible"]
    rng = np.random.default_rng(seed)
    at = {int(s) for s in str(eval_at).split(",") if str(s).strip()}
    log, t0, reads = [], time.time(), {}
    for step in range(steps):
        lr = schedule(step, steps, warmup, peak, floor)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        idx = torch.from_numpy(rng.choice(len(tr["label"]), B, replace=False))
        target, weight = recipe_target(r, tr, idx)
        mask = targets.tube_mask(rng, B, T // 2, S // 16, S // 16, r["mask_ratio"], r["mask_type"])
        pred = net(transforms.normalize(tr["video"][idx]), mask, every_token=visible > 0)
        loss = net.loss(pred, target, mask, weight, widths, visible, r["balance_per_clip"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if r["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(net.parameters(), r["clip_grad"])
        opt.step()
        log.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(log[-100:]):.4f} lr {lr:.1e} {time.time() - t0:.0f}s", flush=True)
        if step + 1 in at and step + 1 < steps:
            reads[step + 1] = readouts(net.encoder, ev, seed)
            print(f"read-outs at step {step + 1}:")
            show(reads[step + 1])
            net.train()
    out = readouts(net.encoder, ev, seed)
    show(out)
    row = {"kind": "pretrain", "name": name, "recipe": recipe, "overrides": overrides, "seed": seed, "steps": steps,
           "pre": pre, "eval": eval, "train_s": round(time.time() - t0),
           "loss": {"first": float(np.mean(log[:100])), "mid": float(np.mean(log[steps // 2 - 50:steps // 2 + 50])),
                    "last": float(np.mean(log[-100:]))},
           "readouts": out, "readouts_at": reads, "date": time.strftime("%Y-%m-%d")}
    record(row)


def supervised(pre, eval, recipe="recipes/quick_tiny.yaml", steps=2000, seed=0, threads=2, lr=1e-3, name="", **overrides):
    """The supervised ceiling: the recipe's encoder trained from scratch on the labels of the pre-training clips
    (mean-pooled tokens -> fc_norm -> Linear, cross-entropy, AdamW, the same batch and schedule), scored on the
    evaluation cache's val clips, and the frozen read-outs of its encoder."""
    torch.set_num_threads(threads)
    r = recipes.load(recipe, data_path="memory", seed=seed, **overrides)
    d, ev = torch.load(pre, weights_only=True), torch.load(eval, weights_only=True)
    tr = d["train"]
    torch.manual_seed(seed)
    clf = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], patch_embed=r["patch_embed"],
                         num_classes=len(synthetic.CLASSES))
    opt = torch.optim.AdamW(param_groups(clf, r["weight_decay"]), lr=0.0)
    B, rng, t0, log = r["batch_size"], np.random.default_rng(seed), time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = schedule(step, steps, steps // 10, lr, 1e-5) * g["lr_scale"]
        idx = torch.from_numpy(rng.choice(len(tr["label"]), B, replace=False))
        loss = F.cross_entropy(clf(transforms.normalize(tr["video"][idx])), tr["label"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(log[-100:]):.4f} {time.time() - t0:.0f}s", flush=True)
    clf.eval()
    with torch.no_grad():
        logits = torch.cat([clf(transforms.normalize(ev["val"]["video"][i:i + 50])) for i in range(0, len(ev["val"]["label"]), 50)])
    predicted, truth = logits.argmax(1), ev["val"]["label"]
    names = class_list(ev)
    recall = evaluate.class_recall(truth, predicted, len(names))
    trained = summarise({"probe": {"top1": 100 * float((predicted == truth).double().mean()), "recall": recall}}, names)["probe"]
    print("supervised head:")
    show({"trained": trained})
    enc = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], patch_embed=r["patch_embed"], num_classes=0)
    enc.load_state_dict({k: v for k, v in clf.state_dict().items() if not k.startswith(("head.", "fc_norm."))}, strict=False)
    out = readouts(enc, ev, seed)
    show(out)
    record({"kind": "supervised", "name": name, "recipe": recipe, "overrides": overrides, "seed": seed, "steps": steps,
            "lr": lr, "pre": pre, "eval": eval, "train_s": round(time.time() - t0), "loss_last": float(np.mean(log[-100:])),
            "trained": trained, "readouts": out, "date": time.strftime("%Y-%m-%d")})


def random(eval, recipe="recipes/quick_tiny.yaml", seed=0, threads=2, **overrides):
    """A randomly initialised encoder of the recipe's shape: the read-outs every run is compared with."""
    torch.set_num_threads(threads)
    r = recipes.load(recipe, data_path="memory", seed=seed, **overrides)
    torch.manual_seed(seed)
    net = models.PretrainModel.from_recipe(r, 2)
    out = readouts(net.encoder, torch.load(eval, weights_only=True), seed)
    show(out)
    record({"kind": "random", "recipe": recipe, "overrides": overrides, "seed": seed, "eval": eval, "readouts": out,
            "date": time.strftime("%Y-%m-%d")})


def own_motion(cache, recipe="recipes/quick_tiny.yaml", steps=2500, every=500, seed=0, threads=2, lr=1e-3, **overrides):
    """Can the recipe's encoder learn each token's own motion from its pixels at all? Supervised, every token
    visible, no masking and no decoder: encoder -> Linear -> the token's true mean path (L x (dx, dy), the
    mean of its K trajectories, in units of its std), MSE on valid tokens, AdamW (50 warm-up steps, cosine),
    on the cache's training clips (fixed centre crops). Every `every` steps: R^2 of the total displacement
    on the moving tokens (> 0.5 px) of the cache's val clips. How long that stays at 0 is how long the
    architecture takes to discover motion on this data, with the pretext task out of the way."""
    torch.set_num_threads(threads)
    r = recipes.load(recipe, data_path="memory", seed=seed, **overrides)
    d, L, B = torch.load(cache, weights_only=True), r["trajectory_length"], r["batch_size"]
    paths = {s: true_tokens(d[s], L)[..., :2 * L] for s in ("train", "val")}   # [n, N, 2L] px, the mean of the K
    ok = {s: d[s]["weight"] > 0 for s in ("train", "val")}
    scale = paths["train"][ok["train"]].std()
    torch.manual_seed(seed)
    enc = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], patch_embed=r["patch_embed"])
    head = torch.nn.Linear(enc.dim, 2 * L)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=lr, weight_decay=r["weight_decay"])
    rng, t0, log, curve = np.random.default_rng(seed), time.time(), [], {}

    def r2_val():
        enc.eval()
        with torch.no_grad():
            pred = torch.cat([head(enc(transforms.normalize(d["val"]["video"][i:i + 50])))
                              for i in range(0, len(paths["val"]), 50)]) * scale
        enc.train()
        total = lambda p: p.reshape(*p.shape[:-1], L, 2).sum(-2)[ok["val"]]   # [tokens, 2] px
        y, p = total(paths["val"]), total(pred)
        moving = y.norm(dim=-1) > 0.5
        return round(float(r2_score(p[moving].double(), y[moving].double(), dim=(0, 1))), 2)

    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = schedule(step, steps, 50, lr, 0.0)
        idx = torch.from_numpy(rng.choice(len(paths["train"]), B, replace=False))
        pred = head(enc(transforms.normalize(d["train"]["video"][idx])))
        w = ok["train"][idx].float()
        loss = (((pred - paths["train"][idx] / scale) ** 2).mean(-1) * w).sum() / w.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(loss.item())
        if (step + 1) % every == 0:
            curve[step + 1] = r2_val()
            print(f"step {step + 1}/{steps} loss {np.mean(log[-every:]):.4f} val R^2 (moving tokens) {curve[step + 1]} "
                  f"{time.time() - t0:.0f}s", flush=True)
    record({"kind": "own_motion", "cache": cache, "recipe": recipe, "overrides": overrides, "seed": seed, "lr": lr,
            "steps": steps, "r2": curve, "train_s": round(time.time() - t0), "date": time.strftime("%Y-%m-%d")})


def parts(run, cache, recipe="recipes/deep_tiny.yaml", clips=200, seed=0, threads=2, **overrides):
    """Which parts of its target a pre-trained model predicts: the run's last checkpoint (encoder and decoder),
    on the cache's val clips (centre crops) under the recipe's masks, R^2 of its predicted mean path (as the
    total displacement, on moving tokens > 0.5 px) and of its predicted shape part, on the visible and on
    the masked tokens. run "random": an untrained model. overrides: the run's recipe keys (patch_embed, ...)."""
    torch.set_num_threads(threads)
    r = recipes.load(recipe, data_path="memory", seed=seed, **overrides)
    ev = torch.load(cache, weights_only=True)["val"]
    idx = torch.arange(min(clips, len(ev["label"])))
    target, weight = recipe_target(r, ev, idx)
    widths = targets.loss_widths(r) or list(targets.mme_parts(r).values())
    torch.manual_seed(seed)
    net = models.PretrainModel.from_recipe(r, target.shape[-1])
    if run != "random":
        last = max(Path(run, "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
        load_checkpoint(last, net)
    net.eval()
    rng = np.random.default_rng(seed)
    T, S = ev["video"].shape[1], ev["video"].shape[2]
    preds, masks = [], []
    with torch.no_grad():
        for i in range(0, len(idx), 20):
            b = idx[i:i + 20]
            mask = targets.tube_mask(rng, len(b), T // 2, S // 16, S // 16, r["mask_ratio"], r["mask_type"])
            pred = net(transforms.normalize(ev["video"][b]), mask, every_token=True)     # visible first, then masked
            order = torch.argsort(mask.int(), dim=1, stable=True)                    # token index of each row of pred
            preds.append(torch.empty_like(pred).scatter_(1, order[..., None].expand_as(pred), pred))
            masks.append(mask)
    pred, mask = torch.cat(preds), torch.cat(masks)
    rms = models.part_rms(target.float(), weight, widths)
    target = torch.cat([p / s for p, s in zip(target.float().split(list(widths), -1), rms)], -1)   # the loss's units
    w0, ok = widths[0], weight > 0
    total = lambda x: x[..., :w0].reshape(*x.shape[:-1], -1, 2).sum(-2)   # the mean path's total displacement
    moving = total(target).norm(dim=-1) * rms[0] > 0.5
    out = {}
    for name, where in (("visible", ~mask & ok), ("masked", mask & ok)):
        out[f"position {name}"] = round(float(r2_score(total(pred)[where & moving], total(target)[where & moving], (0, 1))), 2)
        if len(widths) > 1:
            out[f"shape {name}"] = round(float(r2_score(pred[where][:, w0:], target[where][:, w0:], (0, 1))), 2)
    print(run, cache, out)
    record({"kind": "parts", "run": run, "cache": cache, "recipe": recipe, "overrides": overrides, "r2": out,
            "date": time.strftime("%Y-%m-%d")})


def flow_check(data_path, clips=60):
    """Do a shard folder's stored trajectories agree with its stored frames? OpenCV's Farneback flow between
    each tubelet's two frames (camera motion removed as the frame's median flow), averaged over each 16 x 16
    patch, against the stored displacement of the patch's points over the same `stride` raw frames: R^2 on
    all valid tokens and on the moving ones (> 0.5 px), on the first `clips` training clips."""
    import cv2
    import webdataset as wds

    from mme import shards
    flows, stored = [], []
    for i, raw in enumerate(wds.WebDataset(data.shard_urls(data_path, "train"), shardshuffle=False)):
        if i == clips:
            break
        d = shards.decode_sample(raw)
        p, (T, H, W) = d["meta"]["params"], d["frames"].shape[:3]
        g, stride = p["grid"], p["stride"]
        for t in range(T // 2):
            a, b = (cv2.cvtColor(d["frames"][k], cv2.COLOR_RGB2GRAY) for k in (2 * t, 2 * t + 1))
            flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
            flow -= np.median(flow.reshape(-1, 2), 0)
            per_patch = flow.reshape(H // 16, 16, W // 16, 16, 2).mean((1, 3))
            disp = d["disp"][t, :, :, :stride].sum(2).reshape(H // 16, 16 // g, W // 16, 16 // g, 2).mean((1, 3))
            ok = d["valid"][t].reshape(H // 16, 16 // g, W // 16, 16 // g).all((1, 3))
            flows.append(torch.from_numpy(per_patch[ok]).double())
            stored.append(torch.from_numpy(disp[ok]).double())
    f, y = torch.cat(flows), torch.cat(stored)
    moving = y.norm(dim=-1) > 0.5
    out = {"tokens": len(y), "moving": round(float(moving.double().mean()), 2),
           "r2": round(float(r2_score(f, y, (0, 1))), 2), "r2_moving": round(float(r2_score(f[moving], y[moving], (0, 1))), 2)}
    print(data_path, out)
    record({"kind": "flow_check", "data_path": data_path, **out, "date": time.strftime("%Y-%m-%d")})


# --- the ceiling: what the true trajectories of a clip window tell --------------------------------

def motion_statistics(disp, valid, min_speed=0.2):
    """Per tubelet, from the true trajectories disp [n, T/2, G, G, L, 2] (px), valid [n, T/2, G, G]: the mean
    velocity of the moving points (2), their mean speed and share (2), and the affine fit of their velocity
    against position (divergence, curl and the two shears; 4) -> [n, T/2 * 8] features."""
    n, T2, G = disp.shape[:3]
    v = disp.float().mean(-2)                                                # [n, T2, G, G, 2] px per raw frame
    ys, xs = torch.meshgrid(torch.arange(G, dtype=torch.float32), torch.arange(G, dtype=torch.float32), indexing="ij")
    pos = torch.stack([xs, ys], -1) * 8                                      # [G, G, 2] px
    feats = []
    for i in range(n):
        for t in range(T2):
            vt, ok = v[i, t].reshape(-1, 2), valid[i, t].reshape(-1)
            moving = ok & (vt.norm(dim=-1) > min_speed)
            if moving.sum() < 3:
                feats.append(torch.zeros(8))
                continue
            p, u = pos.reshape(-1, 2)[moving], vt[moving]
            X = torch.cat([p - p.mean(0), torch.ones(len(p), 1)], 1)          # u = X @ M: M [3, 2]
            M = torch.linalg.lstsq(X, u).solution
            J = M[:2].T                                                       # du/dx: [[ux_x, ux_y], [uy_x, uy_y]]
            feats.append(torch.stack([u.mean(0)[0], u.mean(0)[1], u.norm(dim=-1).mean(), moving.float().mean(),
                                      J[0, 0] + J[1, 1], J[1, 0] - J[0, 1], J[0, 0] - J[1, 1], J[0, 1] + J[1, 0]]))
    return torch.stack(feats).reshape(n, T2 * 8)


def true_tokens(split, L):
    """What a perfect local-motion encoder would give: each token's true mean path (the mean of its K
    trajectories, L steps x (dx, dy), px) with a sinusoid code of its position, each channel standardised
    by the caller."""
    raw = split["target"].float()
    paths = raw[..., :4 * L * 2].reshape(*raw.shape[:2], 4, L, 2).mean(2).flatten(2)     # [n, N, 2L]
    n, N, _ = paths.shape
    return torch.cat([paths, models.sinusoid_table(N, 32)[0].expand(n, -1, -1)], -1)  # [n, N, 2L + 32]


def ceiling(eval, recipe="recipes/quick_tiny.yaml"):
    """What the true trajectories of the clip window tell (mme.frozen's read-outs, train -> val of the cache):
    logistic regression on (a) the motion statistics of each tubelet (motion_statistics), (b) the flattened
    position target of every token; (c) the attentive probe on every token's true mean path and position
    (true_tokens): the read-out of an encoder that knew each patch's motion exactly; (d) the same without the
    position code (what a set of motions tells without where each one is). Per class and family."""
    r = recipes.load(recipe, data_path="memory")
    ev = torch.load(eval, weights_only=True)
    names, L = class_list(ev), r["trajectory_length"]
    rows, feats = {}, {}
    for s in ("train", "val"):
        idx = torch.arange(len(ev[s]["label"]))
        disp, _, valid = maps(ev[s], idx, L)
        feats[s] = {"statistics": motion_statistics(disp, valid), "raw": ev[s]["target"][:, :, :4 * L * 2].float().flatten(1),
                    "tokens": true_tokens(ev[s], L)}
        feats[s]["paths"] = feats[s]["tokens"][..., :2 * L]
    for what, key, method in (("logistic regression on the motion statistics per tubelet", "statistics", "probe"),
                              ("logistic regression on the raw displacements of every token", "raw", "probe"),
                              ("attentive probe on every token's true mean path and position", "tokens", "attentive"),
                              ("attentive probe on every token's true mean path, no position", "paths", "attentive")):
        if key in ("tokens", "paths"):                                       # units differ: px and a position code
            flat = feats["train"][key].flatten(0, 1)
            mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        split = {s: {"keys": ev[s]["keys"], "labels": ev[s]["label"],
                     **({"features": feats[s][key]} if key not in ("tokens", "paths") else
                        {"features": feats[s]["raw"][:, :1], "tokens": (feats[s][key] - mean) / std})} for s in ("train", "val")}
        result, _, _ = frozen.evaluate_features(split["train"], split["val"], len(names))
        rows[what] = summarise(result, names)[method]
        print(what)
        show({method: rows[what]})
    record({"kind": "ceiling", "eval": eval, "rows": rows, "names": names, "date": time.strftime("%Y-%m-%d")})


def ridge_fit(x, y, ridge):
    """Ridge regression with a bias, x [n, C] -> y [n, D], in float64: -> predict(x') [m, D]."""
    bias = lambda a: torch.cat([a.double(), torch.ones(len(a), 1, dtype=torch.float64)], 1)
    x1 = bias(x)
    W = torch.linalg.solve(x1.T @ x1 + ridge * torch.eye(x1.shape[1], dtype=torch.float64), x1.T @ y.double())
    return lambda a: bias(a) @ W


def r2_score(pred, y, dim=0):
    """pred, y [m, D] -> R^2 per column (dim=0, [D]) or pooled over all values (dim=(0, 1))."""
    return 1 - ((pred - y) ** 2).sum(dim) / ((y - y.mean(0)) ** 2).sum(dim)


def token_r2(features, eval, L=6, ridge=0.1):
    """How precisely an encoder's frozen tokens hold their own motion: ridge regression from each token (the
    training clips' centre views in a `finetune.py frozen` features.pt) to its true displacement over L steps
    (the cache's target), fitted on a random half of the clips (a features file may list them by class), R^2
    on the moving tokens (> 0.5 px) of the other half, per motion family."""
    cached = torch.load(eval, weights_only=True)
    ev = cached["train"]
    total = ev["target"].float()[..., :4 * L * 2].reshape(*ev["target"].shape[:2], 4, L, 2).mean(2).sum(2)   # [n, N, 2]
    row = {k: i for i, k in enumerate(ev["keys"])}
    c = torch.load(features, weights_only=True)["train"]
    rows = torch.tensor([row[k] for k in c["keys"]])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))   # features may come sorted by class
    rows = rows[order]
    X, Y, lab, ok = c["tokens"][order].float(), total[rows], ev["label"][rows], ev["weight"][rows] > 0
    half = len(X) // 2
    predict = ridge_fit(X[:half][ok[:half]], Y[:half][ok[:half]], ridge)
    out = {}
    for family, idx in families(class_list(cached)).items():
        pick = torch.arange(half, len(X))[torch.isin(lab[half:], torch.tensor(idx))]
        m = ok[pick] & (Y[pick].norm(dim=-1) > 0.5)
        out[family] = round(float(r2_score(predict(X[pick][m]), Y[pick][m].double(), dim=(0, 1))), 2)
    print(features, out)
    record({"kind": "token_r2", "features": features, "r2": out, "date": time.strftime("%Y-%m-%d")})


def noisy_ceiling(eval, L=6, r2="1.0,0.8,0.6,0.4", seed=0):
    """The attentive probe on true per-token motion (true_tokens) with independent noise added so that a token's
    motion is known to R^2 = r2: how precise an encoder's motion must be for each family to be read."""
    ev = torch.load(eval, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for level in [float(x) for x in str(r2).split(",")]:
        feats = {}
        for s in ("train", "val"):
            t = true_tokens(ev[s], L)
            paths = t[..., :2 * L]
            noise = torch.randn(paths.shape, generator=g) * paths.std(dim=(0, 1), keepdim=True) * ((1 - level) / level) ** 0.5
            feats[s] = torch.cat([paths + noise, t[..., 2 * L:]], -1)
        flat = feats["train"].flatten(0, 1)
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        split = {s: {"keys": ev[s]["keys"], "labels": ev[s]["label"], "features": feats[s].mean(1),
                     "tokens": (feats[s] - mean) / std} for s in ("train", "val")}
        result, _, _ = frozen.evaluate_features(split["train"], split["val"], len(class_list(ev)), seed=seed)
        rows[level] = summarise(result, class_list(ev))["attentive"]
        print(f"R^2 {level}")
        show({"attentive": rows[level]})
    record({"kind": "noisy_ceiling", "eval": eval, "rows": rows, "date": time.strftime("%Y-%m-%d")})


def positioned(features, ridge=0.1, seed=0):
    """Does a frozen encoder keep where each token is, and does the attentive probe read more when told?
    features: a `finetune.py frozen` features.pt. Prints (a) the R^2 of a ridge read-out from a token to its
    (t, y, x) grid position (fitted on half the training clips, scored on the other half), (b) the attentive
    probe on the tokens alone (position 0: the probe before version 3), on the tokens with the encoder's
    fixed sinusoid position table added (VideoMAE's, the encoder's own input code), and as mme.frozen fits
    it now (its position code appended)."""
    f = torch.load(features, weights_only=True)
    src = json.loads(f["source"])
    tr, te = f["train"], f["eval"]
    found = data.class_names(data.shard_urls(src["eval_data_path"] or src["data_path"], "val"), range(int(tr["labels"].max()) + 1))
    names = [found[i] for i in range(len(found))] if found else list(synthetic.CLASSES)
    n, N, C = tr["tokens"].shape
    T = src["num_frames"] // 2
    G = int(round((N / T) ** 0.5))
    grid = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(G), torch.arange(G), indexing="ij"), -1).reshape(N, 3)
    half = n // 2
    predict = ridge_fit(tr["tokens"][:half].flatten(0, 1), grid.repeat(half, 1), ridge)
    r2 = r2_score(predict(tr["tokens"][half:].flatten(0, 1)), grid.repeat(n - half, 1).double())
    print(f"{features}: position R^2 t {r2[0]:.2f} y {r2[1]:.2f} x {r2[2]:.2f}")
    rows = {"position_r2": [round(float(v), 2) for v in r2]}
    table = models.sinusoid_table(N, C)
    for what, add, position in (("tokens alone", 0.0, 0), ("tokens + position table", table, 0),
                                ("tokens, position code appended (the probe now)", 0.0, models.POSITION)):
        split = [dict(s, tokens=s["tokens"].float() + add) for s in (tr, te)]
        result, _, _ = frozen.evaluate_features(split[0], split[1], len(names), seed=seed, position=position)
        rows[what] = summarise(result, names)["attentive"]
        print(what)
        show({"attentive": rows[what]})
    record({"kind": "positioned", "features": features, "rows": rows, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    fire.Fire({"cache": cache, "ceiling": ceiling, "pretrain": pretrain, "supervised": supervised, "random": random,
               "token_r2": token_r2, "noisy_ceiling": noisy_ceiling, "positioned": positioned,
               "own_motion": own_motion, "parts": parts, "flow_check": flow_check})
