"""Reading videos: the frames we need, resized, RGB, with a one-line reason when a file is unusable.

    info = probe(path)                                   # VideoInfo (fps, native size, frame count estimate)
    frames, n = read(path, keep, size)                   # uint8 [len(got), H, W, 3] RGB of the kept frame
                                                         # indices that exist, n = frames decoded in all
    out_size(w, h, short_side)                           # (W, H) for a short side, both multiples of 16

Decoding is OpenCV's FFmpeg backend, one frame after another; frames we do not keep are only
grabbed (decoded, not converted), which is the cheapest a sequential decoder allows.
"""
from dataclasses import dataclass

import cv2
import numpy as np

MIN_SIDE = 32      # smaller videos are "tiny": upsampling them to 256 px would invent the motion


class VideoError(Exception):
    """A video we cannot use; the message is the one-line reason."""


@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    frames: int        # the container's frame count: an estimate, sometimes 0 or wrong


def probe(path):
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError("cannot open: not a video or corrupt")
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = cap.get(cv2.CAP_PROP_FPS)
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    if w <= 0 or h <= 0:
        raise VideoError("no video stream")
    if min(w, h) < MIN_SIDE:
        raise VideoError(f"tiny: {w}x{h}, the short side must be at least {MIN_SIDE} px")
    return VideoInfo(fps=fps if 0 < fps < 1000 else 0.0, width=w, height=h, frames=max(n, 0))


def out_size(w, h, short_side):
    """(W, H) with the short side `short_side` and the aspect kept, each rounded to a multiple of 16 so
    stacked JPEG frames share no 16x16 block and the 8-px trajectory grid tiles the frame."""
    s = short_side / min(w, h)
    return max(16, int(round(w * s / 16)) * 16), max(16, int(round(h * s / 16)) * 16)


def read(path, keep, size):
    """Decode `path` in order, keeping the frames whose index is in `keep` (a set), resized to
    size = (W, H) with area interpolation, as RGB. Stops after the last kept index.

    Returns (frames uint8 [K, H, W, 3] for the kept indices that exist, in order; indices [K];
    frames decoded). Raises VideoError when nothing decodes.
    """
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError("cannot open: not a video or corrupt")
    last = max(keep) if keep else -1
    got, idx, n = [], [], 0
    try:
        while n <= last:
            if not cap.grab():
                break
            if n in keep:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    break
                if bgr.ndim == 2:
                    bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
                if (bgr.shape[1], bgr.shape[0]) != tuple(size):
                    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
                got.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                idx.append(n)
            n += 1
    finally:
        cap.release()
    if n == 0:
        raise VideoError("zero frames: no frame could be decoded")
    frames = np.stack(got) if got else np.zeros((0, size[1], size[0], 3), np.uint8)
    return frames, np.array(idx, np.int64), n


def count_frames(path):
    """Frames that actually decode (grab only): the container's count is often wrong."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def is_gray(frames):
    """True if every kept frame has equal channels (a grayscale source, converted to RGB)."""
    f = frames[:: max(1, len(frames) // 4)]
    return bool(np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 1], f[..., 2]))
