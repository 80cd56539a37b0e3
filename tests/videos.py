"""Small test videos written with cv2.VideoWriter (mp4v in .mp4), generated on the spot: never downloaded."""
from pathlib import Path

import cv2
import numpy as np


def write_video(path, frames=40, size=(128, 96), color=True, fps=12.0, seed=0, speed=(2, 1)):
    """A random texture translating by `speed` px per frame, `frames` frames of size = (W, H).

    Returns the path. Fails loudly if the writer cannot open (no mp4v encoder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    dx, dy = abs(speed[0]), abs(speed[1])
    tw, th = w + dx * frames + 1, h + dy * frames + 1
    # a smooth-ish random texture, larger than the frame so that the view can slide over it
    texture = cv2.resize(rng.integers(0, 256, (th // 4 + 1, tw // 4 + 1, 3), np.uint8), (tw, th),
                         interpolation=cv2.INTER_LINEAR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h), isColor=color)
    assert writer.isOpened(), f"cv2.VideoWriter could not open {path} (mp4v)"
    try:
        for t in range(frames):
            x = speed[0] * t if speed[0] >= 0 else dx * (frames - t)
            y = speed[1] * t if speed[1] >= 0 else dy * (frames - t)
            bgr = np.ascontiguousarray(texture[y: y + h, x: x + w])
            if not color:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
            writer.write(bgr)
    finally:
        writer.release()
    assert path.stat().st_size > 0, f"{path}: nothing written"
    return path


def truncate(src, dst, fraction=0.4):
    """Copy the first `fraction` of src's bytes to dst (a download cut short)."""
    data = Path(src).read_bytes()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def _chunk(fourcc, data):
    import struct
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def _list(kind, *chunks):
    return _chunk(b"LIST", kind + b"".join(chunks))


def write_mjpeg_avi(path, frames=30, size=(99, 71), fps=12, seed=0):
    """A Motion-JPEG .avi written byte by byte, for sizes cv2.VideoWriter cannot make: its FFmpeg
    backend rounds odd widths/heights down to even ones (99x71 -> 98x70), whatever the codec."""
    import struct
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    texture = cv2.resize(rng.integers(0, 256, (h // 4 + 2, (w + 2 * frames) // 4 + 2, 3), np.uint8),
                         (w + 2 * frames + 8, h + 8), interpolation=cv2.INTER_LINEAR)
    jpegs = []
    for t in range(frames):
        ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(texture[:h, 2 * t: 2 * t + w]))
        assert ok
        jpegs.append(jpg.tobytes())
    biggest = max(map(len, jpegs))
    avih = struct.pack("<14I", 1_000_000 // fps, biggest * fps, 0, 0x10, frames, 0, 1, biggest, w, h, 0, 0, 0, 0)
    strh = struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, frames, biggest,
                       0xFFFFFFFF, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    hdrl = _list(b"hdrl", _chunk(b"avih", avih), _list(b"strl", _chunk(b"strh", strh), _chunk(b"strf", strf)))
    movi, index, offset = [], [], 4                  # idx1 offsets count from the 'movi' fourcc
    for jpg in jpegs:
        c = _chunk(b"00dc", jpg)
        index.append(struct.pack("<4sIII", b"00dc", 0x10, offset, len(jpg)))
        movi.append(c)
        offset += len(c)
    body = b"AVI " + hdrl + _list(b"movi", *movi) + _chunk(b"idx1", b"".join(index))
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path
