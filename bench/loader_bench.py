"""Loader throughput: clips/s per CPU core for 16 x 224^2 clips with MME targets, against a baseline.

    python bench/loader_bench.py                       # 1 core and all cores, median of 3
    python bench/loader_bench.py --videos 48 --batches 4 --repeats 1     # a quick look
    python bench/loader_bench.py --repeated_aug 1,2    # the repeated_aug values of the second table
    python bench/loader_bench.py --core_counts 1,8     # the core counts measured (default: 1 and all)
    git worktree add /tmp/v1 6ed959a && python bench/loader_bench.py --v1_extract /tmp/v1/extract.py
                                                       # + ours on the same videos in shard schema version 1

Writes synthetic videos (256 px short side, 4:3) as mp4 (MPEG-4 Part 2) and a few as webm (VP9,
Something-Something V2's codec), extracts the mp4s to shards (stride 4, L = 6), then times, side by
side in the same run, each in a fresh process pinned to the cores:
  - ours: mme.data.build_loader, the CPU default (backend "torch": DataLoader workers decode and
    augment, the main process normalises and masks), and the DALI pipeline on CPU operators;
  - baseline, the VideoMAE way: decode the same clip from the video with OpenCV (sequential read up
    to its last frame), MultiScaleCrop + resize + normalise in NumPy/OpenCV, the trajectory arrays
    read from .npy files and cropped/resized likewise, the same target code; in a DataLoader with
    the same number of workers;
    (without DALI installed its mode is left out, said in a line, and its columns read "-";
    on a GPU "ours" normalises and builds targets on the GPU, and DALI decodes with nvJPEG there);
  - jpeg floor: reading and JPEG decoding alone, the bound on a loader making one clip per sample:
    each training sample read from the shards as ours reads it (mme.stream) and its 16 frames
    decoded as ours decodes them (mme.data.decode_frames), nothing else, in a DataLoader with ours'
    workers; "ours / floor" is the share of that rate ours keeps;
  - ours with recipe repeated_aug k (--repeated_aug, k = 1 is "ours"): one read and one JPEG decode
    of a sample serve k crops, so clips/s rises and the shard bytes read per clip fall to 1/k of
    the bytes per sample (the shards' total over their samples; printed with the schema version);
  - ours v1 (with --v1_extract): today's loader on the same videos extracted by a schema-version-1
    checkout's extract.py: what the version-2 codes (int8, 6-bit HOG, zstd) cost or save in reading.
Each mode's rate is taken over the same `batches` batches of `batch` clips, after a warm-up batch.
Where the CPU goes (the third table): over those batches, the CPU time (user + system, Linux /proc) of
the main process and of the DataLoader's worker processes, per clip: if the per-core rate falls with
workers, this says whether the extra is work the processes do (more CPU per clip: handing clips
between processes, contention) or cores left idle (the same CPU per clip, less of the cores used).
Every process runs with THP_MEM_ALLOC_ENABLE=1, as pretrain.py does (fresh 4 KiB pages for each
batch's float video otherwise cost as much as normalising it).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import fire
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
from extract_bench import write_videos

from mme import recipe, shards
from mme.online import data, stream, targets, transforms

console = Console(width=None if sys.stdout.isatty() else 160)     # a log gets every column whole
MODES = ("baseline mp4v", "baseline vp9", "ours", "ours dali", "jpeg floor")


class BaselineClips(torch.utils.data.IterableDataset):
    """VideoMAE-style: OpenCV video decode + NumPy/OpenCV augmentation, trajectories from .npy files."""

    def __init__(self, videos, trajs, r):
        self.videos, self.trajs, self.r = videos, trajs, r

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = np.random.default_rng(worker)
        r = self.r
        size, T, s = r["input_size"], r["num_frames"], r["sampling_rate"]
        mean, std = np.float32(transforms.MEAN) * 255, np.float32(transforms.STD) * 255
        for i in range(worker, 10 ** 9, info.num_workers if info else 1):
            k = i % len(self.videos)
            cap = cv2.VideoCapture(str(self.videos[k]))
            keep, frames, t = set(range(0, T * s, s)), [], 0
            while t < T * s and cap.grab():
                if t in keep:
                    frames.append(cv2.cvtColor(cap.retrieve()[1], cv2.COLOR_BGR2RGB))
                t += 1
            cap.release()
            h, w = frames[0].shape[:2]
            x0, y0, cw, ch = box = transforms.crop_box(rng, h, w, size, r["crop_scales"])
            clip = np.stack([cv2.resize(f[y0:y0 + ch, x0:x0 + cw], (size, size), interpolation=cv2.INTER_LINEAR) for f in frames])
            video = torch.from_numpy(((clip - mean) / std).transpose(3, 0, 1, 2).copy())
            traj = self.trajs[k % len(self.trajs)]
            d, g, v = (np.load(f"{traj}.{name}.npy") for name in ("disp", "hog", "valid"))
            disp_table, hog_table = shards.tables(shards.SCHEMA_VERSION)
            d, g, v = transforms.crop_tracks(d, g, v, box, size, data.GRID, hog_table=hog_table, disp_table=disp_table)
            target, weight = targets.mme_target(d[None], g[None], v[None])
            yield video, target[0], weight[0]


class JpegFloor(torch.utils.data.IterableDataset):
    """Training samples read as ours reads them (stream.samples: same split, buffer, seed) and their
    frames.jpg decoded by ours' decoder, endlessly. Only the frame count leaves the worker: the floor
    is read + decode, not the copy of the frames to the main process."""

    def __init__(self, urls, r):
        self.urls, self.r = urls, r

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for raw in stream.samples(self.urls, worker=worker, num_workers=workers, seed=self.r["seed"],
                                  shuffle_buffer=data.SHUFFLE):
            meta = json.loads(raw["json"])                 # decode_frames checks the tile against T, h, w
            (w, h), T = meta["size"], meta["num_frames"]
            frames = data.decode_frames({"jpg": np.frombuffer(raw["frames.jpg"], np.uint8), "shape": (T, h, w, 3),
                                         "name": raw["__key__"]})
            yield (len(frames),)


def shard_stats(folder):
    """(schema version, mean bytes per sample) of a shards folder's train split."""
    urls = data.shard_urls(str(folder) + "/", "train")
    return stream.check_schema(urls[0])["schema"], sum(os.path.getsize(u) for u in urls) / sum(stream.shard_sizes(urls).values())


def _size(b):
    return (b["video"] if isinstance(b, dict) else b[0]).shape[0]


def worker(mode, shard_dir, videos_dir, traj_dir, batches, batch, cores, repeated_aug):
    """One measurement in this process (pinned to `cores` cores); prints clips/s."""
    os.sched_setaffinity(0, set(range(cores)))
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    workers = 0 if cores == 1 else cores
    r = recipe.load(str(ROOT / "recipes/k400.yaml"), data_path=str(shard_dir), batch_size=batch,
                    num_workers=workers, flip=True, repeated_aug=repeated_aug)
    if mode == "jpeg floor":
        ds = JpegFloor(data.shard_urls(str(shard_dir) + "/", "train"), r)
        make = lambda: torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    elif mode.startswith("ours"):
        if mode == "ours dali":                   # workers read; DALI's threads decode in this process
            r["num_workers"] = cores - 1
            torch.set_num_threads(cores)
        loader = data.build_loader(str(shard_dir) + "/", r, train=True, backend="dali" if mode == "ours dali" else "torch")
        batches_per_epoch = len(loader)
        if batches + 1 > batches_per_epoch:
            raise SystemExit(f"{batches + 1} batches asked, an epoch has {batches_per_epoch}: use more --videos")
        make = lambda: loader
    else:
        videos = sorted(Path(videos_dir).glob("videos/*/*.mp4" if mode.endswith("mp4v") else "vp9/*/*.webm"))
        trajs = [Path(traj_dir) / v.stem for v in videos]
        ds = BaselineClips(videos, trajs, r)
        make = lambda: torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    it = iter(make())
    next(it)
    pids = children(os.getpid())                              # the DataLoader's worker processes (none without)
    if workers and mode != "ours dali" and len(pids) != workers:
        raise SystemExit(f"{mode}: {len(pids)} child processes found, {workers} DataLoader workers expected")
    main_cpu, workers_cpu, t = time.process_time(), cpu_seconds(pids), time.perf_counter()
    n = sum(_size(next(it)) for _ in range(batches))
    wall = time.perf_counter() - t
    print(json.dumps({"clips_per_s": n / wall, "main_cpu_ms": (time.process_time() - main_cpu) / n * 1e3,
                      "workers_cpu_ms": (cpu_seconds(pids) - workers_cpu) / n * 1e3}))


def children(pid):
    """PIDs of the live child processes of `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):      # a process that ended while we looked
            pass
    return found


def cpu_seconds(pids):
    """User + system CPU seconds used so far by the processes `pids` (Linux /proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])          # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def ints(value):
    """fire hands "--x 1,2,4" over as a tuple, "--x 2" as an int, and a string stays a string."""
    return [int(k) for k in (value.split(",") if isinstance(value, str) else np.atleast_1d(value))]


def main(videos=96, vp9_videos=6, frames=64, batches=10, batch=8, repeats=3, repeated_aug="1,2,4", v1_extract=None,
         core_counts=None, _worker=None, shard_dir=None, videos_dir=None, traj_dir=None, cores=None):
    # Prints the tables; returns the measurements as data (for tests; a comment, not a docstring, which fire
    # would show as --help): per core count, mode measured (one left out has none) and repeated_aug k,
    # {"cores", "mode", "repeated_aug", "clips_per_s" (the median), "runs" (each repeat's clips/s)}.
    # The worker's arguments by name, not **kw: fire would take --help for one and run the benchmark.
    if _worker:
        return worker(_worker, shard_dir, videos_dir, traj_dir, batches, batch, cores, int(repeated_aug))
    ks = ints(repeated_aug)
    if any(batch % k for k in ks):
        raise SystemExit(f"batch {batch} must divide by every repeated_aug in {ks}")
    counts = sorted(set(ints(core_counts))) if core_counts is not None else sorted({1, os.cpu_count()})
    if counts[0] < 1 or counts[-1] > len(os.sched_getaffinity(0)):
        raise SystemExit(f"core_counts {counts}: this process may use 1 to {len(os.sched_getaffinity(0))} cores")
    modes = [m for m in MODES if m != "ours dali" or data.dali_installed()]
    if len(modes) < len(MODES):
        console.print("NVIDIA DALI is not installed: the 'ours dali' mode is left out (pip install -r requirements-gpu.txt)")
    # k = 1 is the "ours" mode itself; the others run as more modes, interleaved with the rest
    runs = [(mode, 1) for mode in modes] + [("ours", k) for k in ks if k != 1] + ([("ours v1", 1)] if v1_extract else [])
    env = os.environ | {"THP_MEM_ALLOC_ENABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_videos(tmp / "videos", videos, (256, 336), frames)
        write_videos(tmp / "vp9", vp9_videos, (256, 336), frames, codec="vp09")       # the same first clips
        subprocess.run([sys.executable, str(ROOT / "extract.py"), "--src", "folder", "--root", str(tmp / "videos"),
                        "--out", str(tmp / "shards"), "--stride", "4", "--windows", "1"],
                       check=True, capture_output=True)
        if v1_extract:                            # the same videos in schema version 1, read by today's loader
            subprocess.run([sys.executable, str(v1_extract), "--src", "folder", "--root", str(tmp / "videos"),
                            "--out", str(tmp / "shards_v1"), "--stride", "4", "--windows", "1"],
                           check=True, capture_output=True, cwd=Path(v1_extract).parent)
            v1 = shard_stats(tmp / "shards_v1")
        # the baseline's trajectory files: the same arrays, one .npy per array and video
        (tmp / "traj").mkdir()
        import tarfile
        for shard in sorted((tmp / "shards").glob("train-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    if ext in shards.TRACKS[shards.SCHEMA_VERSION]:      # the .npy inside, uncompressed
                        stem = key.rsplit("_w", 1)[0].split("__")[-1]
                        b = tar.extractfile(m).read()
                        b = shards.unzst(b, 1 << 30) if ext.endswith(".zst") else b
                        a = shards.npy_load(b)
                        (tmp / "traj" / f"{stem}.{ext.removesuffix('.zst')}").write_bytes(
                            shards.npy_bytes(a.view(np.uint8) if a.dtype == np.int8 else a))
        schema, sample_bytes = shard_stats(tmp / "shards")
        results, cpu = {}, {}
        for c in counts:
            for _ in range(repeats):
                for mode, k in runs:                     # interleaved: the machine's load hits every mode alike
                    shard_dir = tmp / ("shards_v1" if mode == "ours v1" else "shards")
                    out = subprocess.run([sys.executable, __file__, "--_worker", mode, "--shard_dir", str(shard_dir),
                                          "--videos_dir", str(tmp), "--traj_dir", str(tmp / "traj"),
                                          "--batches", str(batches), "--batch", str(batch), "--cores", str(c),
                                          "--repeated_aug", str(k)],
                                         capture_output=True, text=True, env=env)
                    if out.returncode:
                        raise SystemExit(out.stderr[-3000:])
                    measured = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault((c, mode, k), []).append(measured["clips_per_s"])
                    cpu.setdefault((c, mode, k), []).append((measured["main_cpu_ms"], measured["workers_cpu_ms"]))
    t = Table(title=f"loader: 16 x 224^2 clips with MME targets from 336x256 sources, clips/s (median of {repeats})")
    for col in ("cores", *MODES, "ours per core", "ours / mp4v", "ours / vp9", "dali / mp4v", "ours / floor"):
        t.add_column(col, justify="right")
    for c in counts:
        m = {mode: statistics.median(results[(c, mode, 1)]) if (c, mode, 1) in results else None for mode in MODES}
        ratio = lambda a, b: "-" if m[a] is None else f"{m[a] / m[b]:.2f}x"
        t.add_row(str(c), *("-" if m[mode] is None else f"{m[mode]:.1f}" for mode in MODES), f"{m['ours'] / c:.1f}",
                  ratio("ours", "baseline mp4v"), ratio("ours", "baseline vp9"), ratio("ours dali", "baseline mp4v"),
                  ratio("ours", "jpeg floor"))
    console.print(t)
    console.print(f"shard schema version {schema}: {sample_bytes / 1e3:.1f} KB per sample on average (train shards' "
                  "bytes over their samples)")
    t = Table(title=f"ours with repeated_aug k: clips/s (median of {repeats}), shard bytes read per clip")
    for col in ("cores", "repeated_aug k", "clips/s", "KB read per clip"):
        t.add_column(col, justify="right")
    for c in counts:
        for k in ks:
            t.add_row(str(c), str(k), f"{statistics.median(results[(c, 'ours', k)]):.1f}", f"{sample_bytes / k / 1e3:.1f}")
    console.print(t)
    if v1_extract:
        t = Table(title=f"ours on schema version {v1[0]} ({v1[1] / 1e3:.1f} KB per sample) against version {schema} "
                        f"({sample_bytes / 1e3:.1f} KB), the same videos and loader code, clips/s (median of {repeats})")
        for col in ("cores", f"version {v1[0]}", f"version {schema}", "ratio"):
            t.add_column(col, justify="right")
        for c in counts:
            old, new = (statistics.median(results[(c, mode, 1)]) for mode in ("ours v1", "ours"))
            t.add_row(str(c), f"{old:.1f}", f"{new:.1f}", f"{new / old:.2f}x")
        console.print(t)
    t = Table(title=f"where the CPU of 'ours' goes: CPU ms per clip (median of {repeats}) and the share of the cores used")
    for col in ("cores", "workers", "clips/s", "per core", "main process ms", "workers ms", "total ms", "cores busy"):
        t.add_column(col, justify="right")
    for c in counts:
        rate = statistics.median(results[(c, "ours", 1)])
        main_ms, workers_ms = (statistics.median(x[i] for x in cpu[(c, "ours", 1)]) for i in (0, 1))
        t.add_row(str(c), str(0 if c == 1 else c), f"{rate:.1f}", f"{rate / c:.1f}", f"{main_ms:.1f}", f"{workers_ms:.1f}",
                  f"{main_ms + workers_ms:.1f}", f"{(main_ms + workers_ms) * rate / 1e3 / c:.0%}")
    console.print(t)
    console.print("runs:", {f"{c} {mode}" + (f" k={k}" if k != 1 else ""): [round(x, 1) for x in v]
                            for (c, mode, k), v in results.items()})
    return [{"cores": c, "mode": mode, "repeated_aug": k, "clips_per_s": statistics.median(v), "runs": v,
             "main_cpu_ms": statistics.median(x[0] for x in cpu[(c, mode, k)]),
             "workers_cpu_ms": statistics.median(x[1] for x in cpu[(c, mode, k)])}
            for (c, mode, k), v in results.items()]


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda rows: None)      # the tables are printed; fire would print the rows again
