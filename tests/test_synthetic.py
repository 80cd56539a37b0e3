"""The synthetic dataset: deterministic, and its ground truth agrees with its own pixels."""
import cv2
import numpy as np
import pytest

from mme.offline import synthetic


def test_deterministic_and_distinct():
    a = synthetic.clip(3, split="train", size=(64, 80), num_frames=10)
    b = synthetic.clip(3, split="train", size=(64, 80), num_frames=10)
    c = synthetic.clip(3, split="val", size=(64, 80), num_frames=10)
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (10, 64, 80, 3) and a.frames.dtype == np.uint8
    assert [synthetic.clip(i, size=(32, 48), num_frames=4).label for i in range(12)] == [i % 10 for i in range(12)]


def sample_rgb(frame, pos):
    x, y = pos[:, 0].astype(np.float32), pos[:, 1].astype(np.float32)
    return cv2.remap(frame.astype(np.float32), x[None], y[None], cv2.INTER_LINEAR)[0]


@pytest.mark.parametrize("label", range(10))
def test_ground_truth_tracks_follow_the_pixels(label):
    """A point's colour stays the same along its ground-truth track (object and background):
    an independent check of the renderer's and Clip.track's conventions."""
    clip = synthetic.clip(label, size=(96, 120), num_frames=12, camera_prob=1.0, noise=0.0, label=label)
    H, W = clip.frames.shape[1:3]
    ys, xs = np.mgrid[10:H - 10:3, 10:W - 10:3]
    pos, disp, depth = clip.track(xs.ravel(), ys.ravel(), 2, 6)
    inside = ((pos[..., 0] > 1) & (pos[..., 0] < W - 2) & (pos[..., 1] > 1) & (pos[..., 1] < H - 2)).all(1)
    obj = inside & (depth.min(1) > 2)
    bg = inside & (depth.max(1) < 0)
    # background points must stay clear of the object at every step (it may cover them)
    for l in range(7):
        a = sample_rgb(clip.alpha[2 + l][..., None].repeat(3, -1), pos[:, l])[:, 0]
        bg &= a < 1e-3
    assert obj.sum() > 20 and bg.sum() > 100
    start = sample_rgb(clip.frames[2], pos[:, 0])
    for l in range(1, 7):
        diff = np.abs(sample_rgb(clip.frames[2 + l], pos[:, l]) - start).mean(1)
        assert np.median(diff[obj]) < 2.5 and np.median(diff[bg]) < 2.5, (l, np.median(diff[obj]), np.median(diff[bg]))
    # and a wrong track (off by one pixel) is clearly detected by the same measure
    off = sample_rgb(clip.frames[4], pos[:, 2] + [1.0, 0.0])
    assert np.median(np.abs(off - start).mean(1)[obj | bg]) > 4
    # compensated displacement: background still, object moving (but rotation/scale/stopped ones slowly)
    assert np.abs(disp[bg]).max() == 0
