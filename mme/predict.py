"""Predictions for raw videos with a fine-tuned classifier (finetune.py predict wires it): each video is decoded
and cut into clip windows exactly as extract.py does for the data the model was tested on (frames only, no
trajectories), then scored as `finetune.py eval` scores (the recipe's test views x crops, softmax averaged
per video), so a video gives the same scores either way.

    ckpt = load("runs/x/model.pth")                        # {"model", "class_names", "recipe", "extraction"}
    rows, skipped = predict(["a.mp4", "clips/"], ckpt, top=5)   # rows: {"video", "top": [[name, p], ...]}

A folder stands for every video file under it. A video that cannot be used is one line in `skipped` (path and
reason) and the others go on.
"""
import json
import pickle
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from mme import evaluate, model as models
from mme.offline import clips, pipeline, sources, writer


class PredictError(ValueError):
    """A model file or a video list that prediction cannot use: one line."""


def load(path):
    """The classifier checkpoint at `path` (mme.model.classifier_checkpoint's dict); PredictError when it lacks
    what prediction needs (a released file without our class names and recipe)."""
    try:
        ckpt = models.read_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise PredictError(f"{path}: cannot read: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(ckpt, dict) or not ckpt.get("class_names") or not ckpt.get("recipe"):
        raise PredictError(f"{path}: holds no class names and recipe: predict needs a model.pth of finetune.py probe/full "
                           "(this version saves them beside the weights)")
    return ckpt


def videos_of(paths):
    """Video files: each path, or every video file under a folder (sorted); PredictError naming a missing one."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(x for x in p.rglob("*") if x.suffix.lower() in sources.VIDEO_EXTS and not x.name.startswith("."))
        elif p.exists():
            found.append(p)
        else:
            raise PredictError(f"{p}: no such video file or folder")
    if not found:
        raise PredictError(f"no video files in {', '.join(map(str, paths))}")
    return found


def extraction_params(ckpt):
    """clips.Params of the data the model was tested on (its manifest's params), frames only."""
    r, saved = ckpt["recipe"], dict(ckpt.get("extraction") or {})
    known = {f.name for f in fields(clips.Params)}
    p = clips.Params(**{k: v for k, v in saved.items() if k in known})
    return clips.Params(**{**p.__dict__, "frames": r["num_frames"], "stride": r["sampling_rate"], "tracks": False})


def predict(paths, ckpt, top=5, device="cpu", workers=1):
    """(rows, skipped): rows [{"video": path, "top": [[class name, probability], ...]}] in the order of the videos,
    skipped [{"video", "reason"}] for the videos that could not be used."""
    r = dict(ckpt["recipe"], finetune=None, data_path="predict", eval_data_path=None, num_workers=0, batch_size=max(
        ckpt["recipe"]["test_num_crop"], 4))
    names = ckpt["class_names"]
    todo = [sources.Video(path=str(p.resolve()), key=f"v{i:06d}", label=-1, label_name="", split="val")
            for i, p in enumerate(videos_of(paths))]
    clf = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], patch_embed=r["patch_embed"], num_classes=len(names),
                         pool=r.get("pool", "mean"))                      # model.pth files before the key: mean
    models.load_backbone(clf, ckpt)
    clf.eval().to(device)
    with tempfile.TemporaryDirectory(prefix="mme_predict_") as tmp:
        w = writer.ShardWriter(Path(tmp), "val-000", max_samples=256)
        skipped = []
        for video, samples, _, _, error in map(_one(extraction_params(ckpt)), todo):
            if error:
                skipped.append({"video": video.path, "reason": error})
            else:
                w.write_video(video.key, samples, "")
        w.close()
        urls = sorted(str(x) for x in Path(tmp).glob("*.tar"))
        if not urls:
            return [], skipped
        out = evaluate.views(lambda v: torch.softmax(clf(v).float(), -1), urls, r, 0, 1, torch.device(device))
    keys, score, _ = evaluate.video_scores([evaluate.video_of(k) for k in out["keys"]], out["outputs"], out["labels"])
    by_key = {k: s for k, s in zip(keys, score)}
    rows = []
    for v in todo:
        if v.key in by_key:
            p, idx = by_key[v.key].topk(min(top, len(names)))
            rows.append({"video": v.path, "top": [[names[i], round(float(x), 6)] for x, i in zip(p, idx.tolist())]})
    return rows, skipped


def run(paths, weights, out, top=5, say=print):
    """finetune.py predict: load `weights`, predict, print each video's top classes and its skipped ones, write
    the rows as JSON lines to `out` (atomically). PredictError when no video could be used."""
    ckpt = load(weights or "")
    rows, skipped = predict(paths, ckpt, top, device="cuda" if torch.cuda.is_available() else "cpu")
    for s in skipped:
        say(f"skip {s['video']}: {s['reason']}")
    for row in rows:
        say(f"{row['video']}: " + ", ".join(f"{name} {p:.2f}" for name, p in row["top"]))
    if not rows:
        raise PredictError("no video could be used (the lines above say why)")
    tmp = Path(f"{out}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(out)
    say(f"done: {len(rows)} video(s) -> {out}" + (f", {len(skipped)} skipped" if skipped else ""))
    return rows, skipped


def _one(params):
    """The extraction of one video with `params` (in this process: prediction is for a handful of videos)."""
    pipeline._init(params, 0)
    return pipeline._extract
