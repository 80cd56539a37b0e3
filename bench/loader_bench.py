"""Loader throughput: clips/s per CPU core for 16 x 224^2 clips with MME targets, against a baseline.

    python bench/loader_bench.py                       # 1 core and all cores, median of 3
    python bench/loader_bench.py --videos 24 --batches 12

Writes synthetic videos (mp4, 256 px short side, 4:3), extracts them to shards (stride 4, L = 6),
then times, side by side in the same run:
  - ours: mme.data.build_loader (DALI on CPU operators): shards -> decoded, cropped, resized,
    normalised clips + masks + MME targets;
  - baseline, the VideoMAE way: decode the same clip from the mp4 with OpenCV (sequential read up to
    its last frame), MultiScaleCrop + resize + normalise in NumPy/OpenCV, the trajectory arrays
    read from .npy files and cropped/resized likewise, then the same target code.
"Per core" runs pin the process to one core (DALI with one thread, no loader workers).
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


def baseline_clips(videos, trajs, r, n, rng):
    """VideoMAE-style: OpenCV mp4 decode + NumPy/OpenCV augmentation, trajectories from .npy files."""
    size, T, s = r["input_size"], r["num_frames"], r["sampling_rate"]
    mean, std = np.float32(data.MEAN) * 255, np.float32(data.STD) * 255
    for i in range(n):
        k = i % len(videos)
        cap = cv2.VideoCapture(str(videos[k]))
        keep, frames, t = set(range(0, T * s, s)), [], 0
        while t < T * s and cap.grab():
            if t in keep:
                frames.append(cv2.cvtColor(cap.retrieve()[1], cv2.COLOR_BGR2RGB))
            t += 1
        cap.release()
        h, w = frames[0].shape[:2]
        x0, y0, cw, ch = transforms.crop_box(rng, h, w, size, r["crop_scales"])
        clip = np.stack([cv2.resize(f[y0:y0 + ch, x0:x0 + cw], (size, size), interpolation=cv2.INTER_LINEAR) for f in frames])
        video = torch.from_numpy(((clip - mean) / std).transpose(3, 0, 1, 2).copy())
        d, g, v = (np.load(f"{trajs[k]}.{name}.npy") for name in ("disp", "hog", "valid"))
        box = (x0, y0, cw, ch)
        Tp, gh, gw, L, _ = d.shape
        d = transforms.crop_maps(d.astype(np.float32).reshape(Tp, gh, gw, -1), box, size, 8).reshape(Tp, size // 8, size // 8, L, 2)
        g = transforms.crop_maps(shards.decode_hog(g).reshape(Tp, gh, gw, -1), box, size, 8).reshape(Tp, size // 8, size // 8, L, 9)
        v = transforms.crop_maps(v.astype(np.float32)[..., None], box, size, 8)[..., 0]
        d, g, v = transforms.finish_tracks(d, g, v, box, size, False)
        target, weight = targets.mme_target(d[None], g[None], v[None])
        yield video, target, weight


def time_ours(shard_dir, r, batches, backend="dali"):
    loader = data.build_loader(str(shard_dir) + "/", r, train=True, backend=backend)
    it = iter(loader)
    next(it)                                                   # warm-up: pipeline build, first decode
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        n += b["video"].shape[0]
    return n / (time.perf_counter() - t)


def time_baseline(videos, trajs, r, clips):
    gen = baseline_clips(videos, trajs, r, clips + 1, np.random.default_rng(0))
    next(gen)
    t = time.perf_counter()
    n = sum(1 for _ in gen)
    return n / (time.perf_counter() - t)


def worker(mode, shard_dir, videos_dir, traj_dir, batches, batch, cores):
    """One measurement in this process (pinned to `cores` cores); prints clips/s."""
    os.sched_setaffinity(0, set(range(cores)))
    torch.set_num_threads(cores)
    cv2.setNumThreads(1)
    r = recipe.load(str(ROOT / "recipes/k400.yaml"), data_path=str(shard_dir), batch_size=batch,
                    num_workers=0 if cores == 1 else cores - 1, flip=True)   # workers read; DALI threads decode
    if mode == "ours":
        print(time_ours(shard_dir, r, batches))
    else:
        videos = sorted(Path(videos_dir).rglob("*.mp4"))
        trajs = [Path(traj_dir) / v.stem for v in videos]
        print(time_baseline(videos, trajs, r, batches * batch))


def main(videos=16, frames=64, batches=8, batch=8, repeats=3, _worker=None, **kw):
    if _worker:
        return worker(_worker, batches=batches, batch=batch, **kw)
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_videos(tmp / "videos", videos, (256, 336), frames)
        subprocess.run([sys.executable, str(ROOT / "extract.py"), "--src", "folder", "--root", str(tmp / "videos"),
                        "--out", str(tmp / "shards"), "--stride", "4", "--windows", "1"], check=True, capture_output=True)
        # the baseline's trajectory files: the same arrays, one .npy per array and video
        (tmp / "traj").mkdir()
        import tarfile
        for shard in sorted((tmp / "shards").glob("train-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    if ext in ("disp.npy", "hog.npy", "valid.npy"):
                        stem = key.rsplit("_w", 1)[0].split("__")[-1]
                        (tmp / "traj" / f"{stem}.{ext}").write_bytes(tar.extractfile(m).read())
        results = {}
        for c in sorted({1, cores}):
            for mode in ("baseline", "ours"):
                runs = []
                for _ in range(repeats):
                    out = subprocess.run([sys.executable, __file__, "--_worker", mode, "--shard_dir", str(tmp / "shards"),
                                          "--videos_dir", str(tmp / "videos"), "--traj_dir", str(tmp / "traj"),
                                          "--batches", str(batches), "--batch", str(batch), "--cores", str(c)],
                                         capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(out.stderr[-3000:])
                    runs.append(float(out.stdout.strip().splitlines()[-1]))
                results[(c, mode)] = statistics.median(runs)
    t = Table(title=f"loader: 16 x 224^2 clips with MME targets, from 336x256 sources (median of {repeats})")
    for col in ("cores", "baseline clips/s", "ours clips/s", "ours per core", "ours / baseline"):
        t.add_column(col, justify="right")
    for c in sorted({1, cores}):
        b, o = results[(c, "baseline")], results[(c, "ours")]
        t.add_row(str(c), f"{b:.1f}", f"{o:.1f}", f"{o / c:.1f}", f"{o / b:.2f}x")
    console.print(t)


if __name__ == "__main__":
    fire.Fire(main)
