"""Dense motion trajectories (paper §3.3, Appendices A-B): where each grid point moves over the next
L raw frames, and its HOG at each step.

    tr = trajectories(frames, length=6, grid=8, camera=True)    # frames: uint8 [T, H, W, 3] RGB
    tr.disp    # float32 [S, H//grid, W//grid, L, 2]  per-step (dx, dy) in pixels of `frames`, camera removed (eq. 4)
    tr.hog     # float32 [S, H//grid, W//grid, L, 9]  HOG at the tracked point at each step (eq. 5)
    tr.valid   # bool    [S, H//grid, W//grid]        False if the track left the frame (eq. 7) or the video ended
    tr.pos     # float32 [S, H//grid, W//grid, L+1, 2] image positions of the tracked point (for pictures)
    tr.starts  # int     [S]                          start frame of each row; default all t in [0, T - L)

Grid point (i, j) starts at pixel (x, y) = (grid*j + grid//2, grid*i + grid//2) of its start frame.

Tracking (eq. 6): the point's image position q follows the 3x3-median-filtered flow w_t, sampled
bilinearly at the sub-pixel position: q' = q + (M * w_t)(q). HOG is taken where the point really is
and validity uses real image positions. With camera=True the camera motion is removed as Appendix A
asks: fit the camera homography H_t between frames t and t+1 (mme.offline.flow) and record the motion
relative to the scene, disp = q' - H_t(q). The paper warps frame t+1 by H_t and recomputes the
flow; subtracting the camera's flow is the same to first order, measured as accurate on the
synthetic ground truth, at half the flow computations (docs/benchmarks.md). camera=False: disp = q' - q.
"""
from dataclasses import dataclass

import cv2
import numpy as np

from mme.offline import flow as flowlib, hog as hoglib


@dataclass
class Trajectories:
    disp: np.ndarray    # float32 [S, gh, gw, L, 2]
    hog: np.ndarray     # float32 [S, gh, gw, L, 9]
    valid: np.ndarray   # bool    [S, gh, gw]
    pos: np.ndarray     # float32 [S, gh, gw, L+1, 2]
    starts: np.ndarray  # int64   [S]


def grid_points(h, w, grid):
    """Start pixels of the grid, float32 (x [gh*gw], y [gh*gw]), row-major over (i, j)."""
    ys, xs = np.mgrid[0:h // grid, 0:w // grid]
    return (xs.ravel() * grid + grid // 2).astype(np.float32), (ys.ravel() * grid + grid // 2).astype(np.float32)


def _sample(field, x, y):
    """Bilinear samples of an [H, W, C] field at float points: [N, C]."""
    return cv2.remap(field, x[None], y[None], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]




def trajectories(frames, length=6, grid=8, camera=True, starts=None):
    """Track the grid points of each start frame for `length` frames (see the module docstring).

    starts: start frames to compute (default every t in [0, T - length)); starts later than
    T - 1 - length give tracks that run past the last frame, which come out invalid.
    """
    T, h, w = frames.shape[:3]
    starts = np.arange(max(T - length, 0)) if starts is None else np.asarray(starts, np.int64)
    gx, gy = grid_points(h, w, grid)
    gh, gw, n = h // grid, w // grid, len(gx)
    S, L = len(starts), length

    gray, feats, grads, pair = {}, {}, {}, {}   # per-frame and per-pair work, each done once
    dis = flowlib.make_dis()

    def g(t):
        if t not in gray:
            gray[t] = cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY)
        return gray[t]

    def f(t):
        if t not in feats:
            feats[t] = flowlib.features(g(t))
        return feats[t]

    def flow_and_camera(t):
        """(median-filtered flow t -> t+1 [H, W, 2], camera homography [3, 3])."""
        if t not in pair:
            raw = flowlib.dense_flow(g(t), g(t + 1), dis)
            H = flowlib.camera_homography(raw, f(t), f(t + 1)) if camera else np.eye(3)
            pair[t] = cv2.medianBlur(raw, 3), H
        return pair[t]

    disp = np.zeros((S, n, L, 2), np.float32)
    hog = np.zeros((S, n, L, hoglib.BINS), np.float32)
    pos = np.zeros((S, n, L + 1, 2), np.float32)
    valid = np.zeros((S, n), bool)
    for si, s in enumerate(starts):
        x, y = gx.copy(), gy.copy()
        pos[si, :, 0] = np.stack([x, y], -1)
        inside = np.ones(n, bool)
        for l in range(L):
            t = s + l
            if t + 1 > T - 1:
                inside[:] = False                       # the video ended before the track did
                break
            if t not in grads:
                grads[t] = hoglib.gradient_bins(g(t))
            hog[si, :, l] = hoglib.hog_at(grads[t], x, y, cell=grid)
            flow, H = flow_and_camera(t)
            here = np.stack([x, y], -1)                                     # [n, 2]
            moved = here + _sample(flow, x, y)                              # eq. 6
            camera_only = cv2.perspectiveTransform(here[None], H)[0]       # where the scene at q went
            disp[si, :, l] = np.clip(moved - camera_only, -flowlib.MAX_FLOW, flowlib.MAX_FLOW)
            pos[si, :, l + 1] = moved
            x, y = moved[:, 0], moved[:, 1]
            inside &= (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)   # eq. 7
        valid[si] = inside
    return Trajectories(
        disp=disp.reshape(S, gh, gw, L, 2), hog=hog.reshape(S, gh, gw, L, hoglib.BINS),
        valid=valid.reshape(S, gh, gw), pos=pos.reshape(S, gh, gw, L + 1, 2), starts=starts)
