"""Videos -> WebDataset shards of JPEG frames paired with dense motion trajectories (docs/shards.md).

    python extract.py --src synthetic --out shards/synthetic --split train,val     # built-in data, ~1 min
    python extract.py --src k400 --out shards/k400 --split train                   # videos under data/k400
    python extract.py --src ssv2 --root /data/ssv2 --out shards/ssv2 --split train,val --workers 32
    python extract.py --src folder --root ~/videos --out shards/mine                # class = parent folder
    python extract.py --src ucf101 --root /data/ucf101 --fold 1 --split train,val --out shards/ucf101_1

Many machines: each takes one part of the (deterministically shuffled) video list, from torchrun's
RANK/WORLD_SIZE, a SLURM array's SLURM_ARRAY_TASK_ID/COUNT, or --part i/N; parts write disjoint
shard names and manifests, merged into OUT/manifest.json.
Interrupted? Rerun the same command: finished shards are kept, the rest is redone, no duplicates.
"""
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import cv2
import fire
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mme import clips, shards, sources, synthetic
from mme.video import VideoError

console = Console(stderr=True, soft_wrap=True)     # soft wrap: a log line stays one line in files
DEFAULTS = {   # per source: stride s (paper §4: K400 4, SSv2 3) and short side
    "k400": dict(stride=4, short_side=256), "ssv2": dict(stride=3, short_side=256),
    "ucf101": dict(stride=4, short_side=256), "hmdb51": dict(stride=4, short_side=256),
    "folder": dict(stride=4, short_side=256), "synthetic": dict(stride=3, short_side=128),
}


def fail(msg):
    console.print(f"[red]error:[/red] {escape(str(msg))}")
    sys.exit(2)


def which_part(part):
    """(i, N) from --part 'i/N', else a SLURM array, else torchrun, else (0, 1)."""
    if part:
        try:
            i, n = (int(x) for x in str(part).split("/"))
        except ValueError:
            fail(f"--part {part!r}: expected i/N, e.g. --part 0/4")
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ:          # ids run MIN, MIN+STEP, ... (sbatch --array=0-6:2)
        step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", 1))
        i = (int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))) // step
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= i < n:
        fail(f"part {i}/{n}: need 0 <= i < N")
    return i, n


def list_split(src, root, split, fold, limit):
    """(videos, problems) of one split, shuffled deterministically and cut to `limit`."""
    if src == "synthetic":
        n = limit or synthetic.DEFAULT_COUNT.get(split, 100)
        videos = [sources.Video(path=f"synthetic:{split}/{i}", key=f"synthetic_{split}_{i:06d}", label=i % len(synthetic.CLASSES),
                                label_name=synthetic.CLASSES[i % len(synthetic.CLASSES)], split=split) for i in range(n)]
        return videos, []
    videos, problems = sources.list_videos(src, root, split=split, fold=fold)
    random.Random(0).shuffle(videos)        # shards mix classes; parts get similar work
    return videos[:limit] if limit else videos, problems


_worker = {}


def _init(params, seed):
    cv2.setNumThreads(1)                    # one video per process; OpenCV's own threads would fight
    _worker.update(params=params, seed=seed)


def _extract(video):
    try:
        samples, warnings, decoded = clips.video_samples(video, _worker["params"], _worker["seed"])
        return video, samples, warnings, decoded, None
    except VideoError as e:
        return video, [], [], 0, str(e)
    except Exception as e:                  # a decoder or codec failure of this one video: skip it, go on
        return video, [], [], 0, f"failed: {type(e).__name__}: {e}"


def main(src, out="shards/", root=None, split="train", limit=None, workers=None, part=None, fold=1,
         frames=16, stride=None, length=6, grid=8, camera=True, short_side=None, quality=shards.JPEG_QUALITY,
         windows=4, shard_samples=256, seed=0):
    """Extract shards.

    Args:
      src: k400 | ssv2 | ucf101 | hmdb51 | folder | synthetic (built-in, needs no --root).
      out: output folder for shards and manifest.json.
      root: dataset folder (default data/<src>); its expected layout is in mme/sources.py.
      split: train | val | test, or several comma-separated (train,val).
      limit: extract at most this many videos per split (synthetic: how many clips; default 400 train, 100 val).
      workers: processes (default: all cores).
      part: i/N to extract part i of N (default from SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE).
      fold: official split number for ucf101 / hmdb51 (1-3).
      frames: T, frames per clip (paper: 16).
      stride: s, raw frames between sampled frames (default k400 4, ssv2 3, ucf101/hmdb51/folder 4, synthetic 3).
      length: L, trajectory length in raw frames (paper: 6).
      grid: pixels between trajectory start points (8: K = 4 trajectories per 16x16 patch).
      camera: remove camera motion (Appendix A); --camera=False to keep it.
      short_side: resize frames to this short side (default 256; synthetic 128).
      quality: JPEG quality of stored frames.
      windows: at most this many clip windows per video (spread evenly, no overlap).
      shard_samples: samples per shard (a video's windows never straddle two shards).
      seed: synthetic dataset seed.
    """
    if src not in sources.SOURCES:
        fail(f"unknown --src {src!r}; choose one of {', '.join(sources.SOURCES)}")
    splits = [s for s in (split.split(",") if isinstance(split, str) else split) if s]
    d = DEFAULTS[src]
    params = clips.Params(frames=frames, stride=stride or d["stride"], length=length, grid=grid, camera=bool(camera),
                          short_side=short_side or d["short_side"], quality=quality, windows=windows)
    if params.frames % 2 or params.short_side % 16 or params.short_side < 32:
        fail("--frames must be even (tubelets of 2) and --short_side a multiple of 16, at least 32")
    root = root or f"data/{src}"
    i, n = which_part(part)
    try:
        listed = {s: list_split(src, root, s, fold, limit) for s in splits}
    except (sources.SourceError, ValueError) as e:
        fail(str(e))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as e:
        fail(f"cannot write to --out {out}: {e}")

    workers = workers or os.cpu_count()
    total_samples = 0
    for s, (videos, problems) in listed.items():
        mine = videos[i::n]
        writer = shards.ShardWriter(out, f"{s}-{i:03d}", max_samples=shard_samples)
        done = writer.done()
        for p in problems[i::n]:
            if p["video"] not in done:
                writer.skip(p["video"], p["video"], p["reason"])
        todo = [v for v in mine if v.key not in done]
        console.print(f"[bold]{src} {s}[/bold] part {i}/{n}: {len(mine)} videos, {len(mine) - len(todo)} already done, "
                      f"{workers} workers -> {escape(str(out))}")
        run(writer, todo, len(mine), params, seed, workers)
        manifest = shards.part_manifest(writer.entries, s, vars(params) | {"src": src}, f"{s}-{i}/{n}", len(mine))
        shards.write_json(out / f"manifest-{s}-{i:03d}.json", manifest)
        total_samples += manifest["splits"][s]["samples"]
    merged = shards.merge_manifests(out)
    console.print(f"{escape(str(out / 'manifest.json'))}: {merged['videos']} videos, {merged['samples']} samples, "
                  f"{len(merged['skipped'])} skipped, {len(merged['warnings'])} warnings")
    sys.exit(0 if total_samples else 1)


def run(writer, todo, total, params, seed, workers):
    """Extract `todo` with a process pool, writing samples as videos finish; progress on the console."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("videos"),
               TextColumn("{task.fields[fps]:>6.0f} frames/s"), TimeRemainingColumn())
    start, frames = time.perf_counter(), 0
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("extracting", total=total, completed=total - len(todo), fps=0.0)
        if workers > 1 and len(todo) > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _init, (params, seed))
            results = pool.imap_unordered(_extract, todo, chunksize=1)
        else:
            pool, results = None, map(_extract, todo)
            _init(params, seed)
        try:
            for video, samples, warnings, decoded, error in results:
                if error:
                    console.print(f"[yellow]skip[/yellow] {escape(f'{video.path}: {error}')}")
                    writer.skip(video.key, video.path, error)
                else:
                    writer.write_video(video.key, samples, video.label_name)
                for w in warnings:
                    console.print(f"[yellow]note[/yellow] {escape(f'{video.path}: {w}')}")
                    writer.warn(video.key, video.path, w)
                frames += decoded
                progress.update(task, advance=1, fps=frames / (time.perf_counter() - start))
        finally:
            if pool:
                pool.terminate()
        writer.close()


if __name__ == "__main__":
    fire.Fire(main)
