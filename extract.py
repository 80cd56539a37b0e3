"""Videos -> WebDataset shards of JPEG frames paired with dense motion trajectories (docs/shards.md).

    python extract.py --src synthetic --out shards/synthetic --split train,val     # built-in data, ~1 min
    python extract.py --src k400 --out shards/k400 --split train                   # videos under data/k400
    python extract.py --src ssv2 --root /data/ssv2 --out shards/ssv2 --split train,val --workers 32
    python extract.py --src folder --root ~/videos --out shards/mine                # class = parent folder
    python extract.py --src ucf101 --root /data/ucf101 --fold 1 --split train,val --out shards/ucf101_1
    python extract.py --src k400 --out shards/k400 --split train,val --views val=5   # val: Kinetics' 5 test clips
    python extract.py show shards/synthetic --n 4                     # look at what was extracted -> a PNG

Many machines: each takes one part of the (deterministically shuffled) video list, from torchrun's
RANK/WORLD_SIZE, a SLURM array's SLURM_ARRAY_TASK_ID/COUNT, or --part i/N; parts write disjoint
shard names and manifests, merged into OUT/manifest.json.
Interrupted? Rerun the same command: finished shards are kept, the rest is redone, no duplicates.
"""
import dataclasses
import difflib
import inspect
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cv2
import fire
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mme import clips, shards, sources, synthetic, viz
from mme.video import VideoError

console = Console(stderr=True, soft_wrap=True)     # soft wrap: a log line stays one line in files
DEFAULTS = {   # per source: stride s (paper §4: K400 4, SSv2 3) and short side
    "k400": dict(stride=4, short_side=256), "ssv2": dict(stride=3, short_side=256),
    "ucf101": dict(stride=4, short_side=256), "hmdb51": dict(stride=4, short_side=256),
    "folder": dict(stride=4, short_side=256), "synthetic": dict(stride=3, short_side=128),
}


def fail(msg):
    console.print(f"[red]error:[/red] {shown(msg)}")
    sys.exit(2)


def check_flags(argv, fn):
    """Refuse flags that `fn` does not take, before any work: fire would run main first and only then
    complain about the arguments it could not use (and main exits before that)."""
    names = list(inspect.signature(fn).parameters)
    for arg in argv:
        if arg == "--":                                  # fire's own flags follow
            break
        if not arg.startswith("--") or arg in ("--help",):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name not in names and not (name.startswith("no") and name[2:] in names):
            close = difflib.get_close_matches(name, names, n=1)
            fail(f"unknown flag --{name}" + (f" (did you mean --{close[0]}?)" if close else "") + "; see --help")


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


def check_numbers(**flags):
    """flags: name=(value, lowest, highest); None values are defaults. One line for the first bad one."""
    for name, (value, lo, hi) in flags.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"--{name} {value!r}: expected a whole number")
        if value < lo or (hi is not None and value > hi):
            fail(f"--{name} {value}: must be " + (f"between {lo} and {hi}" if hi is not None else f"at least {lo}"))


def per_split(flag, value, splits, bare, example):
    """--views 'val=5' / 'val=2,test=2' / 5, --limit 'train=4000' / 400 -> {split: N}; {} when not given.
    A number alone goes to the splits `bare` picks out of the extracted ones."""
    if value is None:
        return {}
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    out = {}
    for item in (str(x).strip() for x in items):
        split, _, count = item.rpartition("=")
        try:
            n = int(count)
        except ValueError:
            n = 0
        targets = [split] if split else bare(splits)
        if n < 1 or any(t not in sources.SPLITS for t in targets):
            fail(f"--{flag} {value!r}: expected SPLIT=N ({example}) or N alone, N at least 1")
        out.update(dict.fromkeys(targets, n))
    return out


def list_split(src, root, split, fold, limit):
    """(videos, problems) of one split, shuffled deterministically and cut to `limit`."""
    if src == "synthetic":
        n = limit or synthetic.DEFAULT_COUNT.get(split, 100)        # clips are made, not listed
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


def _init_pool(params, seed):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the main process stops its workers, quietly
    _init(params, seed)


def _extract(video):
    if not video.path.startswith("synthetic:"):
        try:
            open(video.path, "rb").close()
        except OSError as e:                # permissions, a file gone: may pass, so a rerun tries again
            return video, [], [], 0, f"{UNREADABLE} {e.strerror}"
    try:
        samples, warnings, decoded = clips.video_samples(video, _worker["params"], _worker["seed"])
        return video, samples, warnings, decoded, None
    except VideoError as e:
        return video, [], [], 0, str(e)
    except Exception as e:                  # a decoder or codec failure of this one video: skip it, go on
        return video, [], [], 0, f"failed: {type(e).__name__}: {e}"


def main(src, out="shards/", root=None, split="train", limit=None, workers=None, part=None, fold=1,
         frames=16, stride=None, length=6, grid=8, camera=True, short_side=None, quality=shards.JPEG_QUALITY,
         windows=4, views=None, shard_samples=256, seed=0):
    """Extract shards.

    Args:
      src: k400 | ssv2 | ucf101 | hmdb51 | folder | synthetic (built-in, needs no --root).
      out: output folder for shards and manifest.json.
      root: dataset folder (default data/<src>); its expected layout is in mme/sources.py.
      split: train | val | test, or several comma-separated (train,val).
      limit: extract at most this many videos per split (synthetic: how many clips; default 400 train, 100 val);
        SPLIT=N for one split (train=4000, or train=4000,val=50).
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
      views: evaluation views per split, e.g. val=5 (Kinetics' 5 clips) or val=2 (SSv2's 2): exactly
        that many windows over the whole video, overlapping where it is short, instead of --windows;
        a number alone means every split but train.
      shard_samples: samples per shard (a video's windows never straddle two shards).
      seed: synthetic dataset seed.
    """
    if src not in sources.SOURCES:
        fail(f"unknown --src {src!r}; choose one of {', '.join(sources.SOURCES)}")
    splits = split.split(",") if isinstance(split, str) else list(split) if isinstance(split, (tuple, list)) else [split]
    splits = [s for s in splits if s != ""]
    bad = [s for s in splits if s not in sources.SPLITS]
    if bad or not splits:
        fail(f"--split {split!r}: expected one or more of {', '.join(sources.SPLITS)}, comma-separated")
    check_numbers(workers=(workers, 1, None), frames=(frames, 2, None), stride=(stride, 1, None),
                  length=(length, 1, None), short_side=(short_side, 32, None), quality=(quality, 1, 100),
                  windows=(windows, 1, None), shard_samples=(shard_samples, 1, None), fold=(fold, 1, None),
                  seed=(seed, 0, None), grid=(grid, 1, 16))
    views = per_split("views", views, splits, lambda ss: [x for x in ss if x != "train"], "e.g. val=5, or val=2,test=2")
    limits = per_split("limit", limit, splits, list, "e.g. train=4000, or train=4000,val=50")
    d = DEFAULTS[src]
    params = clips.Params(frames=frames, stride=stride or d["stride"], length=length, grid=grid, camera=bool(camera),
                          short_side=short_side or d["short_side"], quality=quality, windows=windows)
    if params.frames % 2 or params.short_side % 16 or params.short_side < 32:
        fail("--frames must be even (tubelets of 2) and --short_side a multiple of 16, at least 32")
    if 16 % params.grid:
        fail(f"--grid {grid}: must divide 16 (1, 2, 4, 8 or 16), so the trajectory grid tiles every frame")
    root = root or f"data/{src}"
    i, n = which_part(part)
    try:
        listed = {s: list_split(src, root, s, fold, limits.get(s)) for s in splits}
    except (sources.SourceError, ValueError) as e:
        fail(str(e))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"{out} is not writable")
    except OSError as e:
        fail(f"cannot write to --out {out}: {e}")
    try:
        old = json.loads((out / "manifest.json").read_text()).get("schema")
    except (OSError, ValueError, AttributeError):
        old = shards.SCHEMA_VERSION
    if old != shards.SCHEMA_VERSION:            # resuming would mix two versions in one folder
        fail(f"--out {out} holds shards of schema {old}; this extract.py writes {shards.SCHEMA_VERSION}: extract into a new folder")

    workers = workers or os.cpu_count()
    total_samples = 0
    for s, (videos, problems) in listed.items():
        mine = videos[i::n]
        writer = shards.ShardWriter(out, f"{s}-{i:03d}", max_samples=shard_samples)
        done = writer.done()
        for p in problems[i::n]:
            if p["video"] not in done:
                line = f"{p['video']}: {p['reason']}"
                console.print(f"[yellow]skip[/yellow] {shown(line)}")
                writer.skip(p["video"], p["video"], p["reason"], retry=p["reason"].startswith(UNREADABLE))
        todo = [v for v in mine if v.key not in done]
        console.print(f"[bold]{src} {s}[/bold] part {i}/{n}: {len(mine)} videos, {len(mine) - len(todo)} already done, "
                      f"{workers} workers -> {escape(str(out))}")
        here = dataclasses.replace(params, views=views.get(s, 0))
        run(writer, todo, len(mine), here, seed, workers)
        manifest = shards.part_manifest(writer.entries, s, vars(params) | {"src": src, "views": views}, f"{s}-{i}/{n}", len(mine))
        shards.write_json(out / f"manifest-{s}-{i:03d}.json", manifest)
        total_samples += manifest["splits"][s]["samples"]
    merged = shards.merge_manifests(out)
    console.print(f"{escape(str(out / 'manifest.json'))}: {merged['videos']} videos, {merged['samples']} samples, "
                  f"{len(merged['skipped'])} skipped, {len(merged['warnings'])} warnings")
    sys.exit(0 if total_samples else 1)


class Lines:
    """Progress when stderr is not a terminal (a batch job's log): a plain line every 100 videos and at
    least every minute: videos done, frames/s, skipped so far, ETA."""

    def __init__(self, total, completed):
        self.total, self.done, self.skipped, self.fps = total, completed, 0, 0.0
        self.when, self.rate = viz.every(100, 60), viz.Rate()

    def update(self, advance=1, fps=0.0, skipped=0):
        self.done, self.fps, self.skipped = self.done + advance, fps, self.skipped + skipped
        left = self.rate.eta(self.done, self.total)
        if self.when.due(self.done, self.total):
            console.print(f"videos {self.done}/{self.total}  {self.fps:.0f} frames/s  {self.skipped} skipped  "
                          f"ETA {viz.eta(left)}", markup=False, highlight=False)


class Bar:
    """Progress on a terminal: rich's live bar (with its ETA once a few videos are done)."""

    def __init__(self, total, completed):
        columns = (TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TextColumn("videos"),
                   TextColumn("{task.fields[fps]:>6.0f} frames/s  {task.fields[skipped]} skipped"), TimeRemainingColumn())
        self.bar = Progress(*columns, console=console, transient=False)
        self.task = self.bar.add_task("extracting", total=total, completed=completed, fps=0.0, skipped=0)
        self.skipped = 0
        self.bar.start()

    def update(self, advance=1, fps=0.0, skipped=0):
        self.skipped += skipped
        self.bar.update(self.task, advance=advance, fps=fps, skipped=self.skipped)


def run(writer, todo, total, params, seed, workers):
    """Extract `todo` with a process pool, writing samples as videos finish; progress on the console
    (a live bar on a terminal, plain lines in a log file)."""
    start, frames = time.perf_counter(), 0
    progress = (Bar if console.is_terminal else Lines)(total, total - len(todo))
    try:
        parallel = workers > 1 and len(todo) > 1
        if not parallel:
            _init(params, seed)
        results = extract_all(todo, params, seed, workers) if parallel else iter(map(_extract, todo))
        try:
            for video, samples, warnings, decoded, error in results:
                if error:
                    console.print(f"[yellow]skip[/yellow] {shown(f'{video.path}: {error}')}")
                    writer.skip(video.key, video.path, error, retry=error == WORKER_DIED or error.startswith(UNREADABLE))
                else:
                    writer.write_video(video.key, samples, video.label_name)
                for w in warnings:
                    console.print(f"[yellow]note[/yellow] {shown(f'{video.path}: {w}')}")
                    writer.warn(video.key, video.path, w)
                frames += decoded
                progress.update(advance=1, fps=frames / (time.perf_counter() - start), skipped=int(bool(error)))
        finally:
            if parallel:
                results.close()                          # stops the pool now, even on an exception
        writer.close()
    finally:
        if isinstance(progress, Bar):
            progress.bar.stop()


WORKER_DIED = "the process extracting it died twice (killed by a signal: out of memory?)"
UNREADABLE = "cannot read:"


def shown(text):
    """text for a log line: markup escaped, and control characters (a newline, an ANSI escape in a file
    name) written as escapes, so no name can forge or recolour a line."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)))


def extract_all(todo, params, seed, workers):
    """_extract over `todo` in `workers` processes, yielding results as videos finish. A worker that dies
    (the OOM killer, kill -9) breaks the pool: the videos then in flight are redone one at a time, each in
    a process of its own, and one whose process dies again is reported failed (WORKER_DIED); the others
    go on in a new pool. Nothing waits forever, nothing is lost."""
    # forkserver: workers are forked from a clean single-threaded server, never from this process, whose
    # progress thread (and a test's OpenCV threads) may hold locks at the fork that the child waits on forever
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["mme.clips"])
    queue = list(reversed(todo))
    while queue:
        suspects, pool = [], ProcessPoolExecutor(workers, fork, initializer=_init_pool, initargs=(params, seed))
        try:
            running, broken, finished_any = {}, False, False
            while (queue or running) and not broken:
                try:
                    while queue and len(running) < workers:    # only as many as run: all in flight if it breaks
                        f = pool.submit(_extract, queue[-1])
                        running[f] = queue.pop()
                except BrokenProcessPool:
                    broken = True
                for f in wait(running, return_when=FIRST_COMPLETED)[0]:
                    video = running.pop(f)
                    try:
                        result = f.result()
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(video)
                        continue
                    finished_any = True
                    yield result
            suspects += running.values()
        finally:
            stop(pool)
        if broken and not suspects and not finished_any:
            raise RuntimeError("the extraction worker processes die as they start")
        if broken:
            console.print("[yellow]note[/yellow] a worker process died (killed: out of memory?)" + (
                f"; redoing the {len(suspects)} video(s) in flight, one at a time" if suspects else "; going on"))
        for video in suspects:
            alone = ProcessPoolExecutor(1, fork, initializer=_init_pool, initargs=(params, seed))
            try:
                yield alone.submit(_extract, video).result()
            except BrokenProcessPool:
                yield video, [], [], 0, WORKER_DIED
            finally:
                stop(alone)


def stop(pool):
    """Shut a pool down without waiting for videos in progress (an interrupted or broken run), leaving no
    process behind (a worker may wait forever on a queue lock its killed sibling held)."""
    procs = list((pool._processes or {}).values())     # no public way before Python 3.14's terminate_workers
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def show(shards_path, n=4, split="train", skip=0, out=None):
    """Draw `n` samples of extracted shards (a folder with manifest.json, a glob, s3:// URLs) as stored:
    frames with their trajectories, invalid tracks marked, a caption with video, window and class.
    Check it before training on your own videos: with camera motion removed, the background holds
    still and the lines follow the moving objects.

    Args:
      shards_path: the shards (the --out of an extraction, or URLs as the recipes' data_path takes them).
      n: samples to draw, one row each.
      split: which split of a folder's manifest (train, val, ...).
      skip: samples to skip first (the order of the shards: videos were shuffled at extraction).
      out: the PNG to write; default runs/show_<folder name>_<split>.png.
    """
    from mme import data, stream
    check_numbers(n=(n, 1, 64), skip=(skip, 0, None))
    try:
        urls = data.shard_urls(str(shards_path), split)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{shards_path}: {e}")
    raws = stream.samples(urls, resampled=False, start=skip)
    clips = []
    for raw in raws:
        try:
            clips.append(shards.decode(raw))
        except ValueError as e:                          # a damaged sample: say which, draw the others
            console.print(f"skipped {shown(raw.get('__url__', '?'))} {raw.get('__key__', '?')}: {e}")
        if len(clips) == n:
            break
    if not clips:
        fail(f"{shards_path}: no readable {split} samples" + (f" after skipping {skip}" if skip else ""))
    name = Path(str(shards_path).rstrip("/")).name.replace("*", "") or "shards"
    out = Path(out or f"runs/show_{name}_{split}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = viz.shard_figure(out, clips)
    for clip, (moving, invalid) in zip(clips, counts):
        meta = clip["meta"]
        console.print(f"{clip['key']}: {meta.get('label_name') or clip['label']}, frames {meta['frame_indices'][0]}-"
                      f"{meta['frame_indices'][-1]}, {moving} moving and {invalid} invalid tracks drawn")
    console.print(f"done: {out}")
    return str(out)


def usage():
    """--help: the module's text, then every flag as users type it (--src k400, not fire's positional SRC)."""
    import textwrap
    doc = inspect.getdoc(main)
    texts = {name: " ".join(text.split()) for name, text in
             re.findall(r"^  (\w+): (.*(?:\n    .*)*)", doc[doc.index("Args:"):], re.M)}
    lines = [f"{__doc__.strip()}\n", "usage: python extract.py --src SOURCE [--flag value ...]\n", "flags:"]
    for name, p in inspect.signature(main).parameters.items():
        default = p.default
        shown = ("(required)" if default is inspect.Parameter.empty else "" if default is None
                 else f"= {str(default).lower() if isinstance(default, bool) else default}")
        lines.append(f"  --{name} {shown}".rstrip())
        lines += textwrap.wrap(texts.get(name, ""), 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["show"]:                             # python extract.py show SHARDS [--n 4 ...]
        if {"-h", "--help"} & set(sys.argv[2:]):
            print(f"usage: python extract.py show SHARDS [--n 4] [--split train] [--skip 0] [--out PNG]\n\n{inspect.getdoc(show)}")
            sys.exit(0)
        check_flags(sys.argv[2:], show)
        fire.Fire(show, command=sys.argv[2:], serialize=lambda _: None)
        sys.exit(0)
    if {"-h", "--help"} & set(sys.argv[1:]):                # ours, not fire's: flags as users type them
        print(usage())
        sys.exit(0)
    check_flags(sys.argv[1:], main)
    try:
        fire.Fire(main)
    except KeyboardInterrupt:
        console.print("interrupted: finished shards are kept; rerun the same command to extract the rest")
        sys.exit(130)
