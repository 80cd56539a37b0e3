"""Which clip windows of a video become samples, and making them (decode -> trajectories -> shard sample).

A window is what one pre-training clip needs (paper §4: T frames at stride s; §3.3: trajectories
of L raw frames from each tubelet's first frame):

    frames   raw indices start + s*i,            i < T        (stored as JPEG)
    tracks   raw frames start + 2*s*j + [0, L],  j < T/2      (tubelets of 2 frames)

Windows are spread evenly over the video without overlap, at most `windows` of them; a video
shorter than one window gives one window whose frame indices clamp to the last frame and whose
tracks past the end are invalid. Evaluation splits extracted with `views` N get the papers' test
clips instead: N windows over the whole video, overlapping where it is short (window_starts).

    params = Params(frames=16, stride=3, length=6)
    samples, warnings = video_samples(video, params)      # video: mme.offline.sources.Video
"""
from dataclasses import asdict, dataclass

import numpy as np

from mme import shards
from mme.offline import synthetic, video as videolib
from mme.offline.trajectory import trajectories


@dataclass
class Params:
    frames: int = 16          # T: frames per clip (Tables 14/15: 16)
    stride: int = 4           # s: raw frames between sampled frames (K400 4, SSv2 3)
    length: int = 6           # L: trajectory length in raw frames (Table 7: 6)
    grid: int = 8             # px between trajectory start points: K = (16/8)^2 = 4 per patch (Table 9)
    camera: bool = True       # remove camera motion (Appendix A)
    short_side: int = 256     # frames are resized to this short side before anything else
    quality: int = shards.JPEG_QUALITY
    windows: int = 4          # at most this many windows per video
    views: int = 0            # evaluation views: exactly this many windows over the whole video, overlapping if need be (0: off)
    tracks: bool = True       # compute trajectories; False (prediction: frames only) stores them zero and invalid

    def span(self):
        """Raw frames one window covers."""
        T, s, L = self.frames, self.stride, self.length
        return max((T - 1) * s + 1, (T - 2) * s + L + 1)


def window_starts(n, p):
    """Start frames of the windows of an n-frame video. Training windows (p.views 0): at most p.windows,
    spread evenly, never overlapping. Evaluation views (p.views N, the papers' test clips: 2 on SSv2, 5 or 7
    on Kinetics): N windows spread evenly from the first frame to the last window's start, overlapping
    where the video is shorter than N windows; a video shorter than one window gets starts within one
    stride (different frames, as segment sampling's test offsets), and starts that would repeat are kept once."""
    if p.views:
        last = max(n - p.span(), min(p.stride - 1, n - 1))
        return sorted(set(np.linspace(0, last, p.views).round().astype(int).tolist()))
    k = max(1, min(p.windows, n // p.span()))
    return np.linspace(0, max(n - p.span(), 0), k).round().astype(int).tolist()


def window_frames(start, n, p):
    """(sampled frame indices [T], needed raw frame indices) of a window, clamped to the video."""
    sampled = np.minimum(start + p.stride * np.arange(p.frames), n - 1)
    tracked = start + 2 * p.stride * np.arange(p.frames // 2)[:, None] + np.arange(p.length + 1)
    return sampled, set(sampled.tolist()) | set(tracked[tracked < n].ravel().tolist())


def plan(n, p):
    """(window starts, every raw frame index they need) for an n-frame video."""
    starts = window_starts(n, p)
    return starts, set().union(*(window_frames(s, n, p)[1] for s in starts))


def window_sample(key, frames_of, start, n, p, label, meta, encode=shards.encode):
    """Encode one window. frames_of: dict raw index -> uint8 [H, W, 3]. encode: shards.encode, or any function
    of its arguments (key, frames, disp, hog, valid, label, meta, quality=), e.g. to keep the float arrays."""
    sampled, needed = window_frames(start, n, p)
    end = min(start + p.span(), n)
    any_frame = frames_of[sampled[0]]
    raw = np.zeros((end - start,) + any_frame.shape, np.uint8)       # frames no track touches stay 0
    for i in needed:
        raw[i - start] = frames_of[i]
    starts = 2 * p.stride * np.arange(p.frames // 2)                   # tubelet starts, window-relative
    clip = np.stack([frames_of[i] for i in sampled])
    if not p.tracks:                                                   # frames only: no flow is computed
        g = (p.frames // 2, clip.shape[1] // p.grid, clip.shape[2] // p.grid)
        meta = dict(meta, start=int(start), frame_indices=sampled.tolist(), num_frames=p.frames)
        return encode(key, clip, np.zeros((*g, p.length, 2), np.float32), np.zeros((*g, p.length, 9), np.float32),
                      np.zeros(g, bool), label, meta, quality=p.quality)
    tr = trajectories(raw, length=p.length, grid=p.grid, camera=p.camera, starts=starts)
    meta = dict(meta, start=int(start), frame_indices=sampled.tolist(), num_frames=p.frames)
    return encode(key, clip, tr.disp, tr.hog, tr.valid, label, meta, quality=p.quality)


def synthetic_frames(video, p, seed=0):
    """Frames of a built-in synthetic clip (video.path = 'synthetic:<split>/<index>'), sized for p."""
    split, index = video.path.split(":", 1)[1].split("/")
    h = p.short_side
    w = int(round(h * 1.25 / 16)) * 16
    return synthetic.clip(int(index), split=split, seed=seed, size=(h, w), num_frames=p.span() + 1).frames


def video_samples(video, p, seed=0, encode=shards.encode):
    """All window samples of one video: (samples, warnings, frames decoded), each sample what `encode`
    returns (window_sample). Raises VideoError (skip)."""
    warnings = []
    if video.path.startswith("synthetic:"):
        all_frames = synthetic_frames(video, p, seed)
        n, fps, (w, h) = len(all_frames), 12.0, all_frames.shape[2:0:-1]
        info = videolib.VideoInfo(fps=fps, width=w, height=h, frames=n)
        size = (w, h)
        get = lambda needed: (all_frames[sorted(needed)], np.array(sorted(needed)), n)
    else:
        info = videolib.probe(video.path)
        size = videolib.out_size(info.width, info.height, p.short_side)
        if info.width % 2 or info.height % 2:
            warnings.append(f"odd size {info.width}x{info.height}: resized to {size[0]}x{size[1]}")
        n = info.frames if info.frames > 0 else videolib.count_frames(video.path)
        get = lambda needed: videolib.read(video.path, needed, size)
    if n < p.length + 1:
        raise videolib.VideoError(f"too short: {n} frames, need at least {p.length + 1}")
    starts, needed = plan(n, p)
    frames, idx, decoded = get(needed)
    if decoded <= max(needed):                        # the container promised frames that do not decode
        if decoded < p.length + 1:
            raise videolib.VideoError(f"truncated: {decoded} of {n} frames decode, need at least {p.length + 1}")
        warnings.append(f"truncated: {decoded} of {n} frames decode")
        n = decoded
        starts, needed = plan(n, p)
        frames, idx, decoded = get(needed)
    if len(frames) and videolib.is_gray(frames):
        warnings.append("grayscale: converted to RGB")
    frames_of = dict(zip(idx.tolist(), frames))
    meta = {"schema": shards.SCHEMA_VERSION, "video": video.path, "video_key": video.key, "split": video.split,
            "label_name": video.label_name, "fps": info.fps, "video_frames": int(n),
            "video_size": [info.width, info.height], "size": list(size), "params": asdict(p),
            "windows": len(starts)}
    samples = [window_sample(f"{video.key}_w{k:02d}", frames_of, s, n, p, video.label, dict(meta, window=k), encode)
               for k, s in enumerate(starts)]
    return samples, warnings, decoded
