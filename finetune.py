"""Linear probing, fine-tuning and multi-view evaluation of a pre-trained encoder (paper Tables 4, 15).

    python pretrain.py --recipe recipes/tiny.yaml                      # -> runs/tiny/encoder.pth
    python finetune.py probe --recipe recipes/probe_tiny.yaml          # frozen encoder, linear head (Table 4)
    python finetune.py full --recipe recipes/finetune_tiny.yaml        # every layer (Table 15)
    python finetune.py eval --recipe recipes/probe_tiny.yaml --finetune runs/probe_tiny/model.pth
    torchrun --nproc_per_node=8 finetune.py full --recipe recipes/ssv2_finetune.yaml --finetune runs/ssv2/encoder.pth
    python finetune.py probe --recipe recipes/probe_tiny.yaml --finetune null --name probe_random   # the random baseline
    python finetune.py frozen --recipe recipes/probe_tiny.yaml        # frozen features: logistic regression + k-NN, seconds
    python finetune.py report --recipe recipes/probe_tiny.yaml --finetune runs/learn_tiny/encoder.pth   # -> runs/learn_tiny/report.md

The recipe's `finetune` names the weights to start from: pretrain.py's encoder.pth, a released
VideoMAE/MME checkpoint (any wrapping), or null for a randomly initialised encoder. probe trains only
the head on the frozen encoder (mean of the tokens -> fc_norm, loaded from the pre-training's final
norm -> head; MAE's BatchNorm before it, folded into it when saved), with the recipe's crops and
flips only; full trains everything with layer decay, drop path, label
smoothing, mixup/cutmix, RandAugment and repeated sampling as the recipe says (Table 15).
Progress as pretrain.py's: a live bar on a terminal, plain lines in a batch job's log, both in log.txt.
Writes runs/<name>/: recipe.yaml, log.txt, metrics.jsonl, loss.png, checkpoints/ (a killed run resumes),
model.pth (the classifier in the released layout: backbone + fc_norm + head), eval.json (top-1/top-5
over videos: every clip window, or test_num_segment of them, x test_num_crop crops, softmax averaged) and confusion.png; with
eval_every N also val.jsonl (a validation every N epochs and at the end) and best.pth (the classifier
of the best validation top-1). Scalars go to TensorBoard event files too (tensorboard --logdir runs).
frozen trains nothing: it computes the encoder's features once (cached in features.pt, reused while
the weights, shards and feature-related keys stay the same) and fits a deterministic logistic-regression
probe and a weighted k-NN on them (mme/frozen.py), scored over the same views into eval.json.
report runs frozen on a pre-training run's encoder.pth and on a random encoder of the same architecture
(taken from the run's recipe.yaml) into runs/<run>/frozen/ and frozen_random/, and writes runs/<run>/report.md
(mme/report.py): the recipe, the accuracy table (with bench/ablate.py's rows where they exist), the loss
curve with the loss of predicting the mean target, Fig. 4 for validation clips, the confusion matrix.
"""
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # before torch: see pretrain.py

import hashlib
import json
import math
import pickle
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mme import augment, data, frozen as frozen_lib, model as models, recipe as recipes, report as report_lib, viz
from mme.train import (ResumeError, autocast, command_line, fail, keep_metrics, lr_at, optimizer_step, param_groups, resume,
                       reached, save_checkpoint, set_lr, setup_distributed, shard, timed)

console = Console(stderr=True, soft_wrap=True)


def load_recipe(recipe, overrides):
    """The recipe with overrides, or exit 2 with a one-line error; finetune.py needs num_classes."""
    try:
        r = recipes.load(recipe, **overrides)
        if r["num_classes"] is None:
            raise recipes.RecipeError(f"{recipe}: num_classes is required for finetune.py")
    except (recipes.RecipeError, FileNotFoundError) as e:
        fail(None, e)
    return r


def check_weights(r, rank, command):
    """Before any work: a --finetune file that is not there is one line saying where the weights come from."""
    path = r["finetune"]
    if path and not Path(path).is_file():
        what = "is a folder, not a weights file" if Path(path).is_dir() else "does not exist"
        if command == "eval":
            fail(rank, f"finetune {path} {what}: eval needs a classifier checkpoint (model.pth of finetune.py probe or full)")
        fail(rank, f"finetune {path} {what}: run pretrain.py first (python pretrain.py --recipe recipes/tiny.yaml writes "
                   f"runs/tiny/encoder.pth), point --finetune at a pre-trained encoder, or use --finetune null for a "
                   f"random one (the baseline)")


def load_weights(model, r, rank, need_head=False):
    """Load r["finetune"] into the encoder (kept as initialised when null); a bad file exits in one line.
    need_head (eval): the checkpoint must hold a head for this many classes, else nothing would be scored
    but a random head."""
    what = "a classifier checkpoint (model.pth of finetune.py probe or full, or a released fine-tuned one)"
    if not r["finetune"]:
        if need_head:
            fail(rank, f"finetune null: eval needs {what}")
        return
    before = {k: v.clone() for k, v in model.head.state_dict().items()} if need_head else {}
    try:
        skipped = models.load_backbone(model, r["finetune"])
    except pickle.UnpicklingError:
        fail(rank, f"finetune {r['finetune']}: not a checkpoint of tensors that torch.load(weights_only=True) reads")
    except (OSError, KeyError, ValueError, RuntimeError, AttributeError, TypeError) as e:
        fail(rank, f"finetune {r['finetune']}: {' '.join(str(e).split())[:300]}")
    if need_head and all(torch.equal(v, model.head.state_dict()[k]) for k, v in before.items()):
        why = "its head has another number of classes" if any("head." in k for k in skipped) else \
            "it has no head (an encoder such as pretrain.py's encoder.pth?)"
        fail(rank, f"finetune {r['finetune']}: {why}; eval needs {what} for num_classes {r['num_classes']}")
    if rank == 0:
        console.print(f"weights: {r['finetune']}" + (f" ({len(skipped)} keys not for this model)" if skipped else ""))


def start_group(r):
    """setup_distributed, or exit 2 in one line when the recipe's device is not there."""
    try:
        return setup_distributed(r["device"], r["num_workers"])
    except ValueError as e:
        fail(None, e)


def setup(recipe, overrides, probe=False, need_head=False):
    """Recipe, process group and the classifier, loaded from recipe["finetune"] and sharded with FSDP2;
    probe: everything frozen but the head, with MAE's BatchNorm before it (mme.model.add_probe_norm);
    need_head: the weights must include the head (eval)."""
    r = load_recipe(recipe, overrides)
    if probe:                                # a frozen encoder, the recipe's crops and flips only
        r.update(drop_path=0.0, rand_aug=None, repeated_aug=1, mixup=0.0, cutmix=0.0, smoothing=0.0)
    rank, world, device = start_group(r)
    check_weights(r, rank, "eval" if need_head else "train")
    torch.manual_seed(r["seed"] + rank)
    clf = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], num_classes=r["num_classes"],
                         drop_path=r["drop_path"])
    load_weights(clf, r, rank, need_head)
    if probe:
        for p in clf.parameters():
            p.requires_grad_(False)
        models.add_probe_norm(clf)
        clf.head.requires_grad_(True)       # the head (BatchNorm + Linear) is all that trains
    clf.to(device)
    if world > 1:                            # one process runs unwrapped (mme.train.shard says why)
        shard(clf)
    return r, rank, world, device, clf


def train(mode, recipe, **overrides):
    r, rank, world, device, clf = setup(recipe, overrides, probe=mode == "probe")
    run = Path(r["output_dir"]) / r["name"]
    if r["batch_size"] % world:
        fail(rank, f"batch_size {r['batch_size']} must divide by world size {world}")
    try:
        loader = data.build_loader(r["data_path"], dict(r, target="none"), train=True, rank=rank, world_size=world, device=device)
    except (FileNotFoundError, ValueError) as e:
        fail(rank, f"data_path {r['data_path']}: {e}")
    opt = torch.optim.AdamW(param_groups(clf, r["weight_decay"], r["layer_decay"] if mode == "full" else None),
                            lr=0.0, betas=tuple(r["opt_betas"]))
    peak, floor = recipes.lr(r, r["batch_size"]), recipes.lr(r, r["batch_size"], "min_lr")
    steps_per_epoch = len(loader)
    total_steps = r["epochs"] * steps_per_epoch
    try:
        step, _ = resume(run, r, clf, opt, loader, rank)          # the newest checkpoint that verifies
    except ResumeError as e:
        fail(rank, str(e))
    progress = None
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(recipes.dump(r))
        keep_metrics(run / "metrics.jsonl", step)
        progress = viz.progress(console, total_steps, step, run / "log.txt", r["log_every"], r["log_seconds"], device)
        progress.note(f"[bold]{r['name']}[/bold] ({mode}): {world} process(es) on {device}"
                      f"{' (FSDP2)' if world > 1 else ''}, {total_steps} steps "
                      f"({steps_per_epoch}/epoch), batch {r['batch_size']}, peak lr {peak:.2e}"
                      + (f", resuming at step {step}" if step else ""))
    amp = autocast(device, r["precision"])
    mixing, smoothing = r["mixup"] > 0 or r["cutmix"] > 0, r["smoothing"]
    metrics = open(run / "metrics.jsonl", "a") if rank == 0 else None
    board = viz.Board(run, step, progress.note, r["wandb"], r) if rank == 0 else None
    best = best_so_far(run, step) if rank == 0 else None    # (top-1, step) of best.pth, from val.jsonl
    last = None                                              # the latest validation: (step, result, truth, predicted)
    clf.train()
    while step < total_steps:
        tick = time.perf_counter()
        for b, wait in timed(loader):
            lr = lr_at(step, r, steps_per_epoch, peak, floor)
            set_lr(opt, lr)
            video, labels = b["video"], b["label"]
            rng = np.random.default_rng([r["seed"], rank, step, 11])          # mixing draws, the same on resume
            if mixing:
                video, soft, _ = augment.mix(video, labels, rng, r["num_classes"], r["mixup"], r["cutmix"], smoothing=smoothing)
            else:
                soft = augment.smooth_one_hot(labels, r["num_classes"], smoothing)
            with amp:
                loss = augment.soft_cross_entropy(clf(video).float(), soft)
            loss.backward()
            value = optimizer_step(clf, opt, loss, r["clip_grad"], world)
            step += 1
            reached(step)
            if not math.isfinite(value):
                fail(rank, f"loss is {value} at step {step}; lower base_lr or set clip_grad")
            if rank == 0:
                seconds, clips = time.perf_counter() - tick, len(labels) * world
                metrics.write(json.dumps({"step": step, "epoch": loader.epoch, "loss": value, "lr": lr,
                                          "clips_per_s": clips / seconds, "data_wait": wait / seconds}) + "\n")
                metrics.flush()
                board.add(step, **{"train/loss": value, "train/lr": lr, "train/clips_per_s": clips / seconds,
                                   "train/data_wait": wait / seconds})
                progress.update(step, epoch=f"{loader.epoch + 1}/{r['epochs']}", loss=value, lr=lr, clips=clips,
                                seconds=seconds, wait=wait)
            epoch, epoch_end = divmod(step, steps_per_epoch)
            if r["eval_every"] and not epoch_end and (epoch % r["eval_every"] == 0 or step == total_steps):
                # before the checkpoint: a run killed while validating validates again when it resumes
                last = validate(clf, r, rank, world, device, run, mode, step, epoch, best, board, progress)
                best = last[-1]
                clf.train()
            if step % r["save_every"] == 0 or step == total_steps:
                save_checkpoint(run, step, clf, opt, loader, rank)
            tick = time.perf_counter()
            if step >= total_steps:
                break
    full = get_model_state_dict(clf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        progress.stop()
        metrics.close()
        torch.save(models.fold_probe_norm(full) if mode == "probe" else full, run / "model.pth")
        viz.loss_curve(run / "metrics.jsonl", run / "loss.png", label="loss (cross-entropy)")
    if last is not None and last[0] == total_steps:          # the last model was just validated: the same views
        result, truth, predicted = last[1:4]
    else:
        result, truth, predicted = score(clf, r, rank, world, device)
        if rank == 0:
            board.add(total_steps, **{"val/top1": result["top1"], "val/top5": result["top5"]})
    if rank == 0:
        board.close()
        if r["eval_every"] and best is not None:
            result["best"] = {"step": best[1], "top1": best[0], "weights": str(run / "best.pth")}
    write_result(r, rank, run, result, truth, predicted, note=progress.note if rank == 0 else None)
    dist.barrier()
    dist.destroy_process_group()


def best_so_far(run, step):
    """(top-1, step) of the best validation in val.jsonl up to `step` (a resumed run drops the rows past its
    checkpoint, as metrics.jsonl's), or None."""
    keep_metrics(run / "val.jsonl", step)
    rows = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()] if (run / "val.jsonl").exists() else []
    return max(((row["top1"], row["step"]) for row in rows), key=lambda x: (x[0], -x[1]), default=None)


def validate(clf, r, rank, world, device, run, mode, step, epoch, best, board, progress):
    """Validation during training (every eval_every epochs): the multi-view score of the model as it is,
    logged to val.jsonl, TensorBoard and the log; best.pth is the classifier (released layout) of the
    best top-1 so far. Returns (step, result, truth, predicted, best) on rank 0, (step, None...) elsewhere."""
    result, truth, predicted = score(clf, r, rank, world, device)
    new = [rank == 0 and (best is None or result["top1"] > best[0])]
    dist.broadcast_object_list(new)                      # rank 0 decides; the state dict is gathered by all
    if new[0]:
        full = get_model_state_dict(clf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if new[0]:
            torch.save(models.fold_probe_norm(full) if mode == "probe" else full, run / "best.pth")
            best = (result["top1"], step)
        with open(run / "val.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "top1": result["top1"], "top5": result["top5"],
                                "videos": result["videos"], "views": result["views"]}) + "\n")
        board.add(step, **{"val/top1": result["top1"], "val/top5": result["top5"]})
        progress.note(f"val step {step} (epoch {epoch}): top-1 {result['top1']:.1f} %, top-5 {result['top5']:.1f} % "
                      f"({result['videos']} videos, {result['views']} views); best top-1 {best[0]:.1f} % at step {best[1]}"
                      + (" -> best.pth" if new[0] else ""))
    return step, result, truth, predicted, best


def score(clf, r, rank, world, device):
    """Multi-view testing: every clip window of a video (or test_num_segment of them) x test_num_crop crops, softmax averaged per
    video (VideoMAE's protocol), gathered over ranks. Rank 0 gets (result, truth, predicted): result
    {videos, views, top1, top5, weights, data}; the other ranks (None, None, None)."""
    where = r["eval_data_path"] or r["data_path"]
    try:
        loader = data.build_loader(where, dict(r, target="none"), train=False, rank=rank, world_size=world, device=device)
    except (FileNotFoundError, ValueError) as e:
        fail(rank, f"eval data {where}: {e}")
    keys, probs, labels = [], [], []
    clf.eval()
    with torch.no_grad(), autocast(device, r["precision"]):
        for b in loader:                      # every rank runs the same number of batches (padded)
            p = torch.softmax(clf(b["video"]).float(), -1).cpu()
            keep = ~b["pad"]
            keys += [k.rsplit("_w", 1)[0] for k, ok in zip(b["key"], keep.tolist()) if ok]
            probs.append(p[keep])
            labels += b["label"].cpu()[keep].tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, (keys, torch.cat(probs).tolist() if probs else [], labels))
    if rank:
        return None, None, None
    videos = {}
    for ks, ps, ls in gathered:
        for k, p, label in zip(ks, ps, ls):
            v = videos.setdefault(k, [np.zeros(r["num_classes"]), 0, label])
            v[0] += p
            v[1] += 1
    names = sorted(videos)
    scores = np.stack([videos[k][0] / videos[k][1] for k in names])    # [videos, classes]
    truth = np.array([videos[k][2] for k in names])
    top5 = np.argsort(-scores, 1)[:, :min(5, r["num_classes"])]
    result = {"videos": len(names), "views": int(sum(videos[k][1] for k in names)),
              "top1": float((top5[:, 0] == truth).mean() * 100), "top5": float((top5 == truth[:, None]).any(1).mean() * 100),
              "weights": r["finetune"], "data": str(where)}
    return result, truth, top5[:, 0]


def write_result(r, rank, run, result, truth, predicted, note=None):
    """Rank 0 writes eval.json and confusion.png (with the class names the shards hold) and prints the scores."""
    if rank:
        return
    (run / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    viz.confusion_matrix(run / "confusion.png", truth, predicted, r["num_classes"], class_names(r))
    table = Table(title=f"{r['name']}: {result['videos']} videos, {result['views']} views")
    for col in ("top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['top1']:.1f}", f"{result['top5']:.1f}")
    console.print(table)
    note = note or console.print
    note(f"eval (the last model): top-1 {result['top1']:.1f} %, top-5 {result['top5']:.1f} %")
    if "best" in result:
        note(f"best validation: top-1 {result['best']['top1']:.1f} % at step {result['best']['step']} -> {result['best']['weights']}")
    note(f"done: {run / 'eval.json'}, {run / 'confusion.png'}")


def probe(recipe, **overrides):
    """Linear probe (Table 4): train the head on the frozen encoder, then evaluate. Any recipe key can
    be given as --key value (every key, its default and its table: mme/recipe.py DEFAULTS)."""
    train("probe", recipe, **overrides)


def full(recipe, **overrides):
    """Fine-tune every layer (Table 15), then evaluate. Any recipe key can be given as --key value
    (every key, its default and its table: mme/recipe.py DEFAULTS)."""
    train("full", recipe, **overrides)


def eval(recipe, **overrides):
    """Evaluate the classifier in recipe["finetune"] (a model.pth of probe/full, or a released fine-tuned
    checkpoint) on eval_data_path (default: the val split of data_path); --key value overrides any key."""
    r, rank, world, device, clf = setup(recipe, overrides, need_head=True)
    run = Path(r["output_dir"]) / r["name"]
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    result, truth, predicted = score(clf, r, rank, world, device)
    write_result(r, rank, run, result, truth, predicted)
    if rank == 0:                                         # TensorBoard (and W&B if asked), as a training run's validation
        board = viz.Board(run, 0, console.print, r["wandb"], r)
        board.add(0, **{"val/top1": result["top1"], "val/top5": result["top5"]})
        board.close()
    dist.barrier()
    dist.destroy_process_group()


def frozen(recipe, knn_k=10, knn_T=0.07, **overrides):
    """Frozen-feature evaluation in seconds (mme/frozen.py): features of the encoder in recipe["finetune"]
    (null: random), once per clip, cached in runs/<name>/features.pt; a logistic-regression probe
    (L-BFGS, l2 chosen on held-out training videos) and a weighted k-NN (knn_k neighbours, temperature
    knn_T), both over every view of the evaluation videos. --key value overrides any recipe key."""
    r = load_recipe(recipe, overrides)
    rank, world, device = start_group(r)
    check_weights(r, rank, "frozen")
    frozen_eval(r, Path(r["output_dir"]) / r["name"], rank, world, device, knn_k, knn_T)
    dist.barrier()
    dist.destroy_process_group()


def frozen_eval(r, run, rank, world, device, knn_k=10, knn_T=0.07, reuse=False):
    """The frozen evaluation of r["finetune"] into `run` (features.pt, eval.json, confusion.png); every rank
    calls it. reuse: an eval.json computed from the same weights (unchanged since), shards, recipe keys and
    fit is read back instead. Returns the result (eval.json's dict) on rank 0, None elsewhere."""
    where = r["eval_data_path"] or r["data_path"]
    try:
        train_urls, eval_urls = data.shard_urls(r["data_path"], "train"), data.shard_urls(where, "val")
        source = frozen_lib.feature_source(r, train_urls, eval_urls, device)
    except (FileNotFoundError, ValueError) as e:                # no shards, no split, no weights file
        fail(rank, str(e))
    shards = hashlib.sha256(json.dumps([source["train"], source["eval"]]).encode()).hexdigest()   # thousands of them
    fitted = json.loads(json.dumps({**{k: v for k, v in source.items() if k not in ("train", "eval")}, "shards": shards,
                                    "seed": r["seed"], "num_classes": r["num_classes"], "knn_k": knn_k,
                                    "knn_T": knn_T}))                     # as eval.json reads back
    done = [rank == 0 and reuse and same_fit(run / "eval.json", fitted, r["finetune"])]
    dist.broadcast_object_list(done)                        # rank 0 decides: every rank computes, or none
    if done[0]:
        if rank == 0:
            console.print(f"{run / 'eval.json'}: reused (the same weights, data and recipe keys)")
        return json.loads((run / "eval.json").read_text()) if rank == 0 else None
    cache = run / "features.pt"
    splits = frozen_lib.load_features(cache, source) if rank == 0 else None
    cached = [splits is not None]
    dist.broadcast_object_list(cached)
    if cached[0]:
        if rank == 0:
            console.print(f"features: {cache} (cached)")
    else:
        enc = frozen_encoder(r, rank, device)
        tick = time.perf_counter()
        splits = {"train": gather_features(enc, train_urls, dict(r, test_num_crop=1, test_num_segment=None), rank, world, device),   # centre view
                  "eval": gather_features(enc, eval_urls, r, rank, world, device)}                             # every view
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            frozen_lib.save_features(cache, source, splits)
            console.print(f"features: {len(splits['train']['keys'])} train clips, {len(splits['eval']['keys'])} "
                          f"eval views in {time.perf_counter() - tick:.0f} s -> {cache}")
    if rank:
        return None
    tick = time.perf_counter()
    try:
        result, truth, predicted = frozen_lib.evaluate(splits["train"], splits["eval"], r["num_classes"], r["seed"],
                                                       knn_k, knn_T, device)
    except ValueError as e:
        fail(rank, str(e))
    result = {"protocol": "frozen", **result, "top1": result["probe"]["top1"], "top5": result["probe"]["top5"],
              "weights": r["finetune"], "data": str(where), "fitted_from": fitted}
    (run / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    viz.confusion_matrix(run / "confusion.png", truth.numpy(), predicted.cpu().numpy(), r["num_classes"], class_names(r))
    table = Table(title=f"{run.name} (frozen): {result['videos']} videos, {result['views']} views, "
                        f"fitted in {time.perf_counter() - tick:.1f} s")
    for col in ("", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    table.add_row(f"logistic regression (l2 {result['probe']['l2']:g})", f"{result['probe']['top1']:.1f}", f"{result['probe']['top5']:.1f}")
    table.add_row(f"{knn_k}-NN (T {knn_T:g})", f"{result['knn']['top1']:.1f}", f"{result['knn']['top5']:.1f}")
    console.print(table)
    console.print(f"done: {run / 'eval.json'}, {run / 'confusion.png'}, {cache}")
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


def class_names(r):
    """The evaluation shards' class names, label order ([num_classes] str; a label no sample names is its
    index), or None when the shards name none."""
    try:
        names = data.class_names(data.shard_urls(r["eval_data_path"] or r["data_path"], "val"), range(r["num_classes"]))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return [names.get(i, str(i)) for i in range(r["num_classes"])] if names else None


ARCHITECTURE = ("model", "depth", "num_frames", "input_size")    # what the frozen evaluations take from the run


def report(recipe, knn_k=10, knn_T=0.07, floor_samples=256, ledger="docs/ablate_cells.jsonl", **overrides):
    """The report of a pre-training run: --finetune runs/<run>/encoder.pth (a pretrain.py run folder,
    with its recipe.yaml and metrics.jsonl). Runs the frozen evaluation (as `frozen`) of that encoder
    into runs/<run>/frozen/ and of a random encoder of the same architecture (the recipe's seed) into
    runs/<run>/frozen_random/, with model, depth, num_frames, input_size taken from the run's recipe.yaml
    unless given here; an eval.json of the same weights, shards and keys is read back, not recomputed.
    Writes runs/<run>/report.md: the run's recipe and the commands that reproduce it, the accuracy table
    (with bench/ablate.py's headline rows where they exist, dated: its cells under runs/ablate, else
    their scores in `ledger`, bench/ablate.py's record of finished cells; null: none), the loss curve
    (loss.png) with the loss of predicting the mean target (from floor_samples training clips), Fig. 4 for validation clips
    (trajectories.png; redrawn from the last checkpoint when pretrain.py drew training clips), and the
    probe's confusion matrix with class names."""
    rank = int(os.environ.get("RANK", 0))
    base = load_recipe(recipe, overrides)
    if not base["finetune"]:
        fail(rank, "report needs a pre-trained encoder: --finetune runs/<run>/encoder.pth")
    check_weights(base, rank, "frozen")
    run = Path(base["finetune"]).parent
    try:
        pre = recipes.load(str(run / "recipe.yaml"))
    except (recipes.RecipeError, FileNotFoundError) as e:
        fail(rank, f"{e}: report reads the pre-training's recipe.yaml beside the encoder (a pretrain.py run folder)")
    taken = {k: pre[k] for k in ARCHITECTURE if k not in overrides}
    r = load_recipe(recipe, {**taken, **overrides})
    if rank == 0:
        console.print(f"from {run / 'recipe.yaml'}: " + ", ".join(f"{k} {v}" for k, v in taken.items())
                      + "".join(f"; {k} {overrides[k]} as given" for k in ARCHITECTURE if k in overrides))
    rank, world, device = start_group(r)
    this = frozen_eval(r, run / "frozen", rank, world, device, knn_k, knn_T, reuse=True)
    random = frozen_eval(dict(r, finetune=None), run / "frozen_random", rank, world, device, knn_k, knn_T, reuse=True)
    figure = report_lib.trajectory_figure(run, pre, rank, world, device, note=console.print)
    if rank == 0:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (run / "metrics.jsonl").exists() else []
        try:
            floor, floor_label = report_lib.loss_floor(run, pre, floor_samples, note=console.print)
        except (FileNotFoundError, ValueError) as e:          # the run's training shards are not here
            console.print(f"no loss floor: data_path {pre['data_path']}: {e}")
            floor, floor_label = None, None
        if rows:
            viz.loss_curve(run / "metrics.jsonl", run / "loss.png", label="training loss",
                           title=f"{run.name}: {report_lib.TARGET_NAMES.get(pre['target'], pre['target'])} pre-training",
                           floor=floor, floor_label=floor_label and f"predicting the mean target: {floor:.3f}")
        when = lambda path: report_lib.day(path.stat().st_mtime)
        runs = Path(r["output_dir"])
        text = report_lib.markdown(
            run, pre, rows[-1]["step"] if rows else "?", this, random,
            {"run": when(Path(r["finetune"])), "this": when(run / "frozen" / "eval.json"),
             "random": when(run / "frozen_random" / "eval.json")},
            {"report": "python finetune.py " + shlex.join(sys.argv[1:])}, floor_label, figure,
            report_lib.ablation_rows(runs, ledger), report_lib.finetune_rows(runs, ledger), r["num_classes"])
        (run / "report.md").write_text(text)
        print(run / "report.md")
        print(report_lib.headline(pre["target"], this, random))
    dist.barrier()
    dist.destroy_process_group()


def frozen_encoder(r, rank, device):
    """The encoder in the pre-training layout (final per-token norm), loaded from r["finetune"] or
    randomly initialised from r["seed"] (the same on every rank); frozen, eval mode, no drop path."""
    torch.manual_seed(r["seed"])
    enc = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], num_classes=0)
    load_weights(enc, r, rank)
    return enc.requires_grad_(False).eval().to(device)


def gather_features(enc, urls, r, rank, world, device):
    """Every sample of `urls` x r["test_num_crop"] views through the frozen encoder, gathered over ranks.
    Rank 0 gets {"keys" [m], "features" [m, C], "labels" [m]} sorted by key (a sample's views in crop
    order, whatever the world size); other ranks None."""
    loader = data.build_loader(urls, dict(r, target="none"), train=False, rank=rank, world_size=world, device=device)
    keys, feats, labels = [], [], []
    with torch.no_grad(), autocast(device, r["precision"]):
        for b in loader:                      # every rank runs the same number of batches (padded)
            keep = ~b["pad"]
            feats.append(frozen_lib.clip_features(enc, b["video"]).cpu()[keep])
            keys += [k for k, ok in zip(b["key"], keep.tolist()) if ok]
            labels += b["label"].cpu()[keep].tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, (keys, torch.cat(feats), labels))
    if rank:
        return None
    keys = [k for ks, _, _ in gathered for k in ks]
    order = sorted(range(len(keys)), key=keys.__getitem__)                   # stable
    return {"keys": [keys[i] for i in order], "features": torch.cat([f for _, f, _ in gathered])[order],
            "labels": torch.tensor([label for _, _, ls in gathered for label in ls])[order]}


COMMANDS = {"probe": probe, "full": full, "eval": eval, "frozen": frozen, "report": report}


def usage(command=None):
    """--help: the module's text and its commands, or one command's with every recipe key (type,
    default, paper table)."""
    import inspect
    if command is None:
        listed = "\n".join(f"  {name:7s} {what}" for name, what in (
            ("probe", "linear probe (Table 4): train a head on the frozen encoder, then evaluate"),
            ("full", "fine-tune every layer (Table 15), then evaluate"),
            ("eval", "evaluate a classifier (model.pth of probe/full, or a released fine-tuned checkpoint)"),
            ("frozen", "frozen features: logistic regression + k-NN, in seconds"),
            ("report", "a pre-training run's report.md: frozen evaluation of it and of a random encoder, loss, Fig. 4")))
        return (f"{__doc__.strip()}\n\nusage: python finetune.py COMMAND --recipe FILE [--key value ...]\n\n"
                f"commands:\n{listed}\n\npython finetune.py COMMAND --help lists every recipe key.")
    extra = {"frozen": " [--knn_k K] [--knn_T T]",
             "report": " --finetune runs/RUN/encoder.pth [--knn_k K] [--knn_T T] [--floor_samples N]"}.get(command, "")
    return (f"usage: python finetune.py {command} --recipe FILE{extra} [--key value ...]\n\n"
            f"{inspect.getdoc(COMMANDS[command])}\n\n"
            f"Recipe keys: a recipe file sets them as 'key: value' lines; --key value on the command line wins.\n\n"
            f"{recipes.keys_help()}")


if __name__ == "__main__":
    command_line(COMMANDS, lambda args: usage(args[0] if args and args[0] in COMMANDS else None))
