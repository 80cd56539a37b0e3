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
Progress: a live bar on a terminal, plain lines in a batch job's log, the same lines in OUT/log-<part>.txt.
The work itself is mme/offline/ (pipeline.py: the worker pool; clips.py: what a video gives).
"""
import dataclasses
import difflib
import errno
import inspect
import json
import os
import re
import signal
import sys
from pathlib import Path

import fire
from rich.markup import escape

from mme import figures, lock, recipe as recipes, shards
from mme.offline import clips, pipeline, sources, writer as shard_writer
from mme.progress import console, fail, shown


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


def main(src, out="shards/", root=None, split="train", limit=None, workers=None, part=None, fold=1,
         frames=16, stride=None, length=6, grid=8, camera=True, short_side=None, quality=shards.JPEG_QUALITY,
         windows=4, views=None, shard_samples=256, seed=0):
    """Extract shards.

    Args:
      src: k400 | ssv2 | ucf101 | hmdb51 | folder | synthetic (built-in, needs no --root).
      out: output folder for shards and manifest.json.
      root: dataset folder (default data/<src>); its expected layout is in mme/offline/sources.py.
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
      camera: remove camera motion (Appendix A); --camera false to keep it.
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
    try:
        camera = recipes.cli_bool(camera, "camera")                        # fire hands `--camera false` over as 'false'
    except ValueError as e:
        fail(e)
    views = per_split("views", views, splits, lambda ss: [x for x in ss if x != "train"], "e.g. val=5, or val=2,test=2")
    limits = per_split("limit", limit, splits, list, "e.g. train=4000, or train=4000,val=50")
    d = pipeline.DEFAULTS[src]
    params = clips.Params(frames=frames, stride=stride or d["stride"], length=length, grid=grid, camera=camera,
                          short_side=short_side or d["short_side"], quality=quality, windows=windows)
    if params.frames % 2 or params.short_side % 16 or params.short_side < 32:
        fail("--frames must be even (tubelets of 2) and --short_side a multiple of 16, at least 32")
    if 16 % params.grid:
        fail(f"--grid {grid}: must divide 16 (1, 2, 4, 8 or 16), so the trajectory grid tiles every frame")
    root = root or f"data/{src}"
    try:
        i, n = pipeline.which_part(part)
        listed = {s: pipeline.list_split(src, root, s, fold, limits.get(s)) for s in splits}
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

    try:                                        # one process per part of an --out (parts write disjoint shards)
        lock.hold(out / ".extract" / f"part-{i:03d}.lock", f"--out {out} part {i}/{n}")
    except lock.LockedError as e:
        fail(e)
    workers = workers or os.cpu_count()
    log = out / f"log-{i:03d}.txt"                  # this part's progress lines, time-stamped
    total_samples = 0
    for s, (videos, problems) in listed.items():
        mine = videos[i::n]
        writer = shard_writer.ShardWriter(out, f"{s}-{i:03d}", max_samples=shard_samples)
        done = writer.done()
        for p in problems[i::n]:
            if p["video"] not in done:
                line = f"{p['video']}: {p['reason']}"
                pipeline.say(f"[yellow]skip[/yellow] {shown(line)}", log)
                writer.skip(p["video"], p["video"], p["reason"], retry=p["reason"].startswith(pipeline.UNREADABLE))
        todo = [v for v in mine if v.key not in done]
        pipeline.say(f"[bold]{src} {s}[/bold] part {i}/{n}: {len(mine)} videos, {len(mine) - len(todo)} already done, "
                     f"{workers} workers -> {escape(str(out))}", log)
        here = dataclasses.replace(params, views=views.get(s, 0))
        pipeline.run(writer, todo, len(mine), here, seed, workers, log)
        manifest = shard_writer.part_manifest(writer.entries, s, vars(params) | {"src": src, "views": views}, f"{s}-{i}/{n}", len(mine))
        shard_writer.write_json(out / f"manifest-{s}-{i:03d}.json", manifest)
        total_samples += manifest["splits"][s]["samples"]
    merged = shard_writer.merge_manifests(out)
    pipeline.say(f"{escape(str(out / 'manifest.json'))}: {merged['videos']} videos, {merged['samples']} samples, "
                 f"{len(merged['skipped'])} skipped, {len(merged['warnings'])} warnings", log)
    sys.exit(0 if total_samples else 1)


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
    from mme.online import data, stream
    check_numbers(n=(n, 1, 64), skip=(skip, 0, None))
    try:
        urls = data.shard_urls(str(shards_path), split)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{shards_path}: {e}")
    raws = stream.samples(urls, resampled=False, start=skip)
    samples = []
    for raw in raws:
        try:
            samples.append(shards.decode(raw))
        except ValueError as e:                          # a damaged sample: say which, draw the others
            console.print(f"skipped {shown(raw.get('__url__', '?'))} {raw.get('__key__', '?')}: {e}")
        if len(samples) == n:
            break
    if not samples:
        fail(f"{shards_path}: no readable {split} samples" + (f" after skipping {skip}" if skip else ""))
    name = Path(str(shards_path).rstrip("/")).name.replace("*", "") or "shards"
    out = Path(out or f"runs/show_{name}_{split}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = figures.shard_figure(out, samples)
    for clip, (moving, invalid) in zip(samples, counts):
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
    # SIGTERM (a batch system's stop) takes Ctrl-C's way out: the worker pool is stopped, nothing left behind
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        fire.Fire(main)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        fail(f"no space left on {e.filename or 'the --out disk'}: free some (the shards finished so far are kept) and "
             "rerun the same command to extract the rest")
    except KeyboardInterrupt:
        console.print("interrupted: finished shards are kept; rerun the same command to extract the rest")
        sys.exit(130)
