"""Evaluation over videos: every view of every evaluation clip through a model, gathered over ranks, scored
per video (VideoMAE's multi-view protocol); and what a pre-training model predicts for Fig. 4.

    out = views(fn, urls, recipe, rank, world, device)   # fn(video [B, 3, T, S, S]) -> [B, ...]; rank 0 gets
                                                         #   {"keys" [m], "outputs" [m, ...], "labels" [m]} sorted by key
    names, score, truth = video_scores(videos, scores, labels)   # [m] views -> [V] videos: scores averaged
    top1, top5, predicted = accuracy(score, truth)                # % over videos, predicted [V]
    recall = class_recall(truth, predicted, num_classes)          # [classes] %
    result, truth, predicted = classify(clf, recipe, rank, world, device)   # a classifier's eval.json dict
    write(run, result, truth, predicted, names)                   # eval.json + confusion.png
    arrays = trajectories(net, recipe, rank, world, device)       # Fig. 4's arrays for mme.figures.trajectory_figure

A view is one clip window x one crop (test_num_crop crops along the long side; every window the
shards hold, or test_num_segment of them). A sample key is '<video>_w<window>' (video_of).
"""
import contextlib
import json

import numpy as np
import torch
import torch.distributed as dist

from mme import figures
from mme.online import data, targets, transforms
from mme.train import autocast


def video_of(key):
    """'<video>_w<window>' (a sample key) -> '<video>'."""
    return key.rsplit("_w", 1)[0]


def views(fn, urls, r, rank, world, device):
    """fn over every view of the samples of `urls` (the evaluation loader: r's crops and windows, no labels
    needed beyond the shards'), gathered over ranks. Rank 0 gets {"keys" [m], "outputs" [m, ...] (fn's, on
    CPU), "labels" [m]} sorted by key (a sample's views in crop order, whatever the world size); others None."""
    loader = data.build_loader(urls, dict(r, target="none"), train=False, rank=rank, world_size=world, device=device)
    keys, outputs, labels = [], [], []
    with torch.no_grad(), autocast(device, r["precision"]):
        for b in loader:                      # every rank runs the same number of batches (padded)
            keep = ~b["pad"]
            outputs.append(fn(b["video"]).float().cpu()[keep])
            keys += [k for k, ok in zip(b["key"], keep.tolist()) if ok]
            labels += b["label"].cpu()[keep].tolist()
    gathered = [None] * world
    dist.all_gather_object(gathered, (keys, torch.cat(outputs) if outputs else torch.zeros(0), labels))
    if rank:
        return None
    keys = [k for ks, _, _ in gathered for k in ks]
    order = sorted(range(len(keys)), key=keys.__getitem__)                   # stable
    return {"keys": [keys[i] for i in order], "outputs": torch.cat([o for _, o, _ in gathered if len(o)])[order],
            "labels": torch.tensor([label for _, _, ls in gathered for label in ls])[order]}


def video_scores(videos, scores, labels):
    """videos [m] (the video of each row, e.g. video_of(key)), scores [m, classes], labels [m] ->
    (names [V] sorted, score [V, classes] = the mean over a video's rows, truth [V] long)."""
    names = sorted(set(videos))
    row_of = {name: i for i, name in enumerate(names)}
    index = torch.tensor([row_of[v] for v in videos], dtype=torch.long)     # [m]
    scores = scores.double().cpu()
    total = torch.zeros(len(names), scores.shape[1], dtype=torch.float64).index_add_(0, index, scores)
    count = torch.bincount(index, minlength=len(names))                     # views per video [V]
    truth = torch.zeros(len(names), dtype=torch.long)
    truth[index] = torch.as_tensor(labels, dtype=torch.long).cpu()
    return names, total / count[:, None], truth


def accuracy(score, truth):
    """score [V, classes], truth [V] -> (top-1 %, top-5 %, predicted class [V])."""
    top = score.topk(min(5, score.shape[1]), dim=1).indices                  # [V, 5]
    hit = top == truth[:, None]
    return hit[:, 0].double().mean().item() * 100, hit.any(1).double().mean().item() * 100, top[:, 0]


def class_recall(truth, predicted, num_classes):
    """truth [V], predicted [V] -> [num_classes] recall % (None where a class has no video)."""
    return [100 * float((predicted[truth == c] == c).double().mean()) if bool((truth == c).any()) else None
            for c in range(num_classes)]


def classify(clf, r, rank, world, device):
    """A classifier's multi-view test on eval_data_path (default: data_path's val split): softmax averaged
    over a video's views. Rank 0 gets (result, truth [V], predicted [V]); result {videos, views, top1, top5,
    recall, weights, data}; other ranks (None, None, None). Raises FileNotFoundError / ValueError for data
    that is not there."""
    where = r["eval_data_path"] or r["data_path"]
    clf.eval()
    out = views(lambda video: torch.softmax(clf(video).float(), -1), data.shard_urls(where, "val"), r, rank, world, device)
    if rank:
        return None, None, None
    _, score, truth = video_scores([video_of(k) for k in out["keys"]], out["outputs"], out["labels"])
    top1, top5, predicted = accuracy(score, truth)
    result = {"videos": len(truth), "views": len(out["keys"]), "top1": top1, "top5": top5,
              "recall": class_recall(truth, predicted, r["num_classes"]), "weights": r["finetune"], "data": str(where)}
    return result, truth, predicted


def class_names(r):
    """The evaluation shards' class names in label order ([num_classes] str; a label no sample names is its
    index), or None when the shards name none."""
    try:
        names = data.class_names(data.shard_urls(r["eval_data_path"] or r["data_path"], "val"), range(r["num_classes"]))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return [names.get(i, str(i)) for i in range(r["num_classes"])] if names else None


def write(run, result, truth, predicted, num_classes, names=None):
    """eval.json and confusion.png (row labels: names, or class indices) into the folder `run`."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    figures.confusion_matrix(run / "confusion.png", np.asarray(truth), np.asarray(predicted), num_classes, names)


def trajectories(net, recipe, rank=0, world=1, device=None, amp=None, clips=4):
    """What a pre-training model (PretrainModel, sharded or not) predicts for Fig. 4: the first clips of the
    recipe's validation split (centre crop, the evaluation loader's tube mask of the recipe's seed: the same
    clips and masks every time; the training stream's first clips when the data has no val split), the
    middle tubelet. Every rank runs the model on its own first batch (FSDP needs them all); rank 0 gets the
    keyword arguments of mme.figures.trajectory_figure (frames, mask, true_pos, pred_pos, labels, note)."""
    raw = dict(recipe, patch_norm="none", test_num_crop=1)     # true trajectories in px; predictions mapped to them
    try:
        loader = data.build_loader(recipe["data_path"], raw, train=False, rank=rank, world_size=world, device=device)
        note = f"validation clips (centre crop, tube mask of seed {recipe['seed']})"
    except (FileNotFoundError, ValueError):                                   # no val split
        loader = data.build_loader(recipe["data_path"], raw, train=True, rank=rank, world_size=world, device=device)
        note = "training clips (the data has no val split)"
    b = next(iter(loader))
    was_training = net.training
    net.eval()
    with torch.no_grad(), amp or contextlib.nullcontext():
        pred = net(b["video"], b["mask"])
    net.train(was_training)
    if rank:
        return None
    target, mask = b["target"].float().cpu(), b["mask"].cpu()
    B, N, D = target.shape
    full = target.clone()
    full[mask] = pred.detach().float().cpu().reshape(-1, D)                 # masked tokens in index order
    n, S = min(clips, B), recipe["input_size"]
    hw, t = (S // 16) ** 2, recipe["num_frames"] // 4                       # tokens per tubelet, the middle tubelet
    tokens = slice(t * hw, (t + 1) * hw)
    true_pos, pred_pos = (x.numpy() for x in targets.paths(full[:n, tokens], target[:n, tokens],
                                                          b["weight"][:n, tokens].cpu(), recipe))
    frames = transforms.to_uint8(b["video"][:n, :, 2 * t:2 * t + 1].cpu())[:, 0].numpy()   # [n, S, S, 3]: the tubelet's first frame
    names = data.class_names(loader.urls, b["label"][:n].tolist(), limit=2000)
    labels = [names.get(c, f"class {c}") for c in b["label"][:n].tolist()] if names else None
    return {"frames": frames, "mask": mask[:n, tokens].numpy(), "true_pos": true_pos, "pred_pos": pred_pos,
            "labels": labels, "note": note}
