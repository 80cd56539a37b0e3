"""Loader throughput: clips/s per CPU core for 16 x 224^2 clips with MME targets, against a baseline.

    python bench/loader_bench.py                       # 1 core and all cores, median of 3
    python bench/loader_bench.py --videos 48 --batches 4 --repeats 1     # a quick look

Writes synthetic videos (256 px short side, 4:3) as mp4 (MPEG-4 Part 2) and a few as webm (VP9,
Something-Something V2's codec), extracts the mp4s to shards (stride 4, L = 6), then times, side by
side in the same run, each in a fresh process pinned to the cores:
  - ours: mme.data.build_loader, the CPU default (backend "torch": DataLoader workers decode and
    augment, the main process normalises and masks), and the DALI pipeline on CPU operators;
  - baseline, the VideoMAE way: decode the same clip from the video with OpenCV (sequential read up
    to its last frame), MultiScaleCrop + resize + normalise in NumPy/OpenCV, the trajectory arrays
    read from .npy files and cropped/resized likewise, the same target code; in a DataLoader with
    the same number of workers.
Every process runs with THP_MEM_ALLOC_ENABLE=1, as pretrain.py does (fresh 4 KiB pages for each
batch's float video otherwise cost as much as normalising it).
"""
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
sys.path.insert(0, str(ROOT))
from mme import data, recipe, shards, targets, transforms  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from extract_bench import write_videos  # noqa: E402

console = Console()
MODES = ("baseline mp4v", "baseline vp9", "ours", "ours dali")


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


def _size(b):
    return (b["video"] if isinstance(b, dict) else b[0]).shape[0]


def worker(mode, shard_dir, videos_dir, traj_dir, batches, batch, cores):
    """One measurement in this process (pinned to `cores` cores); prints clips/s."""
    os.sched_setaffinity(0, set(range(cores)))
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    workers = 0 if cores == 1 else cores
    r = recipe.load(str(ROOT / "recipes/k400.yaml"), data_path=str(shard_dir), batch_size=batch,
                    num_workers=workers, flip=True)
    if mode.startswith("ours"):
        if mode == "ours dali":                   # workers read; DALI's threads decode in this process
            r["num_workers"] = cores - 1
            torch.set_num_threads(cores)
        loader = data.build_loader(str(shard_dir) + "/", r, train=True, backend=mode.split()[-1] if " " in mode else "torch")
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
    t = time.perf_counter()
    n = sum(_size(next(it)) for _ in range(batches))
    print(n / (time.perf_counter() - t))


def main(videos=96, vp9_videos=6, frames=64, batches=10, batch=8, repeats=3, _worker=None, **kw):
    if _worker:
        return worker(_worker, batches=batches, batch=batch, **kw)
    cores = os.cpu_count()
    env = os.environ | {"THP_MEM_ALLOC_ENABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_videos(tmp / "videos", videos, (256, 336), frames)
        write_videos(tmp / "vp9", vp9_videos, (256, 336), frames, codec="vp09")       # the same first clips
        subprocess.run([sys.executable, str(ROOT / "extract.py"), "--src", "folder", "--root", str(tmp / "videos"),
                        "--out", str(tmp / "shards"), "--stride", "4", "--windows", "1"],
                       check=True, capture_output=True)
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
        results = {}
        for c in sorted({1, cores}):
            for _ in range(repeats):
                for mode in MODES:                       # interleaved: the machine's load hits every mode alike
                    out = subprocess.run([sys.executable, __file__, "--_worker", mode, "--shard_dir", str(tmp / "shards"),
                                          "--videos_dir", str(tmp), "--traj_dir", str(tmp / "traj"),
                                          "--batches", str(batches), "--batch", str(batch), "--cores", str(c)],
                                         capture_output=True, text=True, env=env)
                    if out.returncode:
                        raise SystemExit(out.stderr[-3000:])
                    results.setdefault((c, mode), []).append(float(out.stdout.strip().splitlines()[-1]))
    t = Table(title=f"loader: 16 x 224^2 clips with MME targets from 336x256 sources, clips/s (median of {repeats})")
    for col in ("cores", *MODES, "ours per core", "ours / mp4v", "ours / vp9", "dali / mp4v"):
        t.add_column(col, justify="right")
    for c in sorted({1, cores}):
        m = {mode: statistics.median(results[(c, mode)]) for mode in MODES}
        t.add_row(str(c), *(f"{m[mode]:.1f}" for mode in MODES), f"{m['ours'] / c:.1f}",
                  f"{m['ours'] / m['baseline mp4v']:.2f}x", f"{m['ours'] / m['baseline vp9']:.2f}x",
                  f"{m['ours dali'] / m['baseline mp4v']:.2f}x")
    console.print(t)
    console.print("runs:", {f"{c} {mode}": [round(x, 1) for x in v] for (c, mode), v in results.items()})


if __name__ == "__main__":
    fire.Fire(main)
