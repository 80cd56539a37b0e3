"""The built-in synthetic dataset: videos whose class is defined by motion alone, with ground truth.

Each clip is one randomly textured object moving over a randomly textured background, optionally
under a camera pan. The class says how the object moves (CLASSES); shapes, textures, positions,
speeds and the pan are random, so no single frame reveals the class (as in Something-Something).
Everything is deterministic given (split, index, seed).

    clip = synthetic.clip(index=3, split="train")
    clip.frames        # uint8 [T, H, W, 3] RGB
    clip.label         # int, index into CLASSES
    clip.track(x, y, t, steps)   # ground truth of image points (x, y) of frame t (see Clip.track)

World and image coordinates: pixel centres sit at integers (OpenCV's convention), the camera is
a pure translation, image = world - cam[t]. The object maps its texture coordinates u to the world
as w = A[t] @ u + b[t]. Camera-compensated motion (what `mme.offline.trajectory` measures) is motion in
world coordinates: zero for the background, the object's own motion for the object.
"""
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES = (
    "moving left", "moving right", "moving up", "moving down",
    "rotating clockwise", "rotating counter-clockwise",
    "approaching", "receding",
    "moving then stopping", "stopping then moving",
)
FAMILIES = {                          # what kind of motion tells each class apart (reports give recall per family)
    "translation": ("moving left", "moving right", "moving up", "moving down"),
    "rotation": ("rotating clockwise", "rotating counter-clockwise"),
    "scale": ("approaching", "receding"),
    "temporal order": ("moving then stopping", "stopping then moving"),
}
SPLITS = ("train", "val")
DEFAULT_COUNT = {"train": 400, "val": 100}   # clips per split when --limit is not given


@dataclass
class Clip:
    frames: np.ndarray   # uint8 [T, H, W, 3] RGB
    label: int
    A: np.ndarray        # float64 [T, 2, 2] object texture -> world, linear part (rotation * scale)
    b: np.ndarray        # float64 [T, 2]    object texture -> world, translation
    cam: np.ndarray      # float64 [T, 2]    camera offset: image = world - cam
    alpha: np.ndarray    # float32 [T, H, W] object coverage of each pixel (1 = object)
    inside: np.ndarray   # float32 [S, S]    distance (texture px) from each texture pixel to the object's edge, 0 outside

    def track(self, x, y, t, steps):
        """Ground truth for image points (x, y) of frame t over the next `steps` frames.

        Returns (pos [N, steps+1, 2] image positions, disp [N, steps, 2] camera-compensated
        per-step displacement, depth [N, steps+1] distance in px inside the object, or <= 0 for
        background points, which are taken to be static in the world).
        """
        p = np.stack([np.asarray(x, np.float64), np.asarray(y, np.float64)], -1)   # [N, 2]
        u = np.linalg.solve(self.A[t], (p + self.cam[t] - self.b[t]).T).T         # texture coords at t
        ts = np.arange(t, t + steps + 1)
        w_obj = np.einsum("sij,nj->nsi", self.A[ts], u) + self.b[ts][None]           # [N, S+1, 2]
        scale = np.sqrt(np.abs(np.linalg.det(self.A[ts])))                           # [S+1]
        depth = _sample(self.inside, u)[:, None] * scale[None]                       # [N, S+1]
        on_object = depth[:, 0] > 0
        w = np.where(on_object[:, None, None], w_obj, (p + self.cam[t])[:, None, :])
        pos = w - self.cam[ts][None]
        depth = np.where(on_object[:, None], depth, -1.0)
        return pos, np.diff(w, axis=1), depth


def _sample(img, uv):
    """Bilinear sample of a 2-D array at float (x, y) points, 0 outside."""
    x, y = uv[:, 0], uv[:, 1]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    h, w = img.shape
    out = np.zeros(len(uv))
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out[ok] += wt[ok] * img[yy[ok], xx[ok]]
    return out


def texture(rng, h, w):
    """A smooth, colourful, multi-octave noise texture, uint8 [h, w, 3] (smooth so bilinear
    rendering at sub-pixel offsets is exact enough to serve as flow ground truth)."""
    img = np.zeros((h, w, 3), np.float32)
    for cell, weight in ((24, 1.0), (10, 0.7), (5, 0.5)):
        coarse = rng.random((h // cell + 4, w // cell + 4, 3)).astype(np.float32)
        up = cv2.resize(coarse, (coarse.shape[1] * cell, coarse.shape[0] * cell), interpolation=cv2.INTER_CUBIC)
        img += weight * up[cell:cell + h, cell:cell + w]
    img = img @ rng.normal(0, 1, (3, 3)).astype(np.float32)        # random colour mixing
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    lo, hi = np.percentile(img, 1, axis=(0, 1)), np.percentile(img, 99, axis=(0, 1))   # per channel: full contrast
    return np.clip((img - lo) / (hi - lo + 1e-6) * 215 + 20, 0, 255).astype(np.uint8)


def shape_mask(rng, s):
    """Object silhouette in texture coordinates, float32 [s, s] in {0, 1}: ellipse, box or polygon."""
    mask = np.zeros((s, s), np.uint8)
    c = (s - 1) / 2
    kind = rng.integers(3)
    if kind == 0:
        axes = (int(c * rng.uniform(0.6, 0.95)), int(c * rng.uniform(0.6, 0.95)))
        cv2.ellipse(mask, (int(c), int(c)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        hw, hh = c * rng.uniform(0.55, 0.9), c * rng.uniform(0.55, 0.9)
        cv2.rectangle(mask, (int(c - hw), int(c - hh)), (int(c + hw), int(c + hh)), 1, -1)
    else:
        n = rng.integers(5, 9)
        ang = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
        rad = c * rng.uniform(0.6, 0.95, n)
        pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], -1).round().astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask.astype(np.float32)


def _object_motion(rng, label, T, speed):
    """Per-frame (angle rad, scale, velocity [2]) for a class: the only thing that defines it."""
    angle = np.zeros(T)
    scale = np.ones(T)
    vel = np.zeros((T, 2))
    jitter = rng.uniform(-0.3, 0.3)                   # direction jitter (rad)
    name = CLASSES[label]
    if name.startswith("moving ") and "then" not in name:
        base = {"moving left": np.pi, "moving right": 0.0, "moving up": -np.pi / 2, "moving down": np.pi / 2}[name]
        vel[:] = speed * np.array([np.cos(base + jitter), np.sin(base + jitter)])
    elif name.startswith("rotating"):
        omega = np.deg2rad(rng.uniform(1.0, 3.0)) * (1 if name == "rotating clockwise" else -1)  # y points down
        angle = omega * np.arange(T)
    elif name in ("approaching", "receding"):
        rate = rng.uniform(0.008, 0.016) * (1 if name == "approaching" else -1)
        scale = np.exp(rate * (np.arange(T) - T / 2))
    else:
        direction = rng.uniform(0, 2 * np.pi)
        switch = int(T * rng.uniform(0.35, 0.65))
        moving = np.arange(T) < switch if name == "moving then stopping" else np.arange(T) >= switch
        vel[moving] = speed * np.array([np.cos(direction), np.sin(direction)])
    return angle, scale, vel


def render(bg, margin, cam, objects, size, noise, rng):
    """Frames of objects over a background under a camera pan: bg uint8 [H + 2*my, W + 2*mx, 3] (margin
    (mx, my) around the view), cam [T, 2] (image = world - cam), objects: (texture uint8 [s, s, 3], mask
    float32 [s, s], A [T, 2, 2], b [T, 2]) each, drawn in order (texture u -> world A[t] u + b[t]), plus
    Gaussian noise of std `noise` -> (frames uint8 [T, H, W, 3], alpha float32 [T, H, W]: the coverage
    of the last object)."""
    H, W = size
    T = len(cam)
    frames = np.empty((T, H, W, 3), np.uint8)
    alpha = np.empty((T, H, W), np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for t in range(T):
        # background: image x shows world x + cam[t], i.e. bg pixel x + cam[t] + margin
        to_bg = np.array([[1, 0, cam[t, 0] + margin[0]], [0, 1, cam[t, 1] + margin[1]]])
        frame = cv2.warpAffine(bg, to_bg, (W, H), flags=flags, borderMode=cv2.BORDER_REFLECT).astype(np.float32)
        for tex, mask, A, b in objects:
            # object: image x -> texture u = A^-1 (x + cam - b)
            Ainv = np.linalg.inv(A[t])
            to_tex = np.concatenate([Ainv, (Ainv @ (cam[t] - b[t]))[:, None]], 1)
            obj = cv2.warpAffine(tex, to_tex, (W, H), flags=flags, borderMode=cv2.BORDER_REPLICATE)
            a = cv2.warpAffine(mask, to_tex, (W, H), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            frame += a[..., None] * (obj.astype(np.float32) - frame)
        frame += rng.normal(0, noise, frame.shape).astype(np.float32)
        frames[t] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
        alpha[t] = a
    return frames, alpha


def clip(index, split="train", seed=0, size=(128, 160), num_frames=50, camera_prob=0.5, noise=1.0, label=None):
    """Generate clip `index` of `split`: frames [num_frames, H, W, 3] at size (H, W) and its ground truth.

    label: force a class (default: index % len(CLASSES), so every split is balanced).
    camera_prob: probability of a camera pan (0 or 1 to force it off or on).
    """
    split_id = SPLITS.index(split) if split in SPLITS else zlib.crc32(split.encode())
    rng = np.random.default_rng([seed, split_id, index])
    label = index % len(CLASSES) if label is None else label
    H, W = size
    T = num_frames

    cam_vel = np.zeros(2)
    if rng.random() < camera_prob:
        a = rng.uniform(0, 2 * np.pi)
        cam_vel = rng.uniform(0.5, 2.0) * np.array([np.cos(a), np.sin(a)]) * min(H, W) / 128
    cam = cam_vel[None] * np.arange(T)[:, None]                      # [T, 2]
    margin = np.ceil(np.abs(cam).max(0)).astype(int) + 4
    bg = texture(rng, H + 2 * margin[1], W + 2 * margin[0])

    S = int(min(H, W) * rng.uniform(0.3, 0.45)) | 1                 # odd: centre on a pixel
    obj_tex = texture(rng, S, S)
    mask = shape_mask(rng, S)
    inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    speed = rng.uniform(0.4, 1.6) * min(H, W) / 128
    angle, scale, vel = _object_motion(rng, label, T, speed)

    # Start so that the object's path stays in view: centre of its image path near the image centre.
    path = np.concatenate([np.zeros((1, 2)), np.cumsum(vel[:-1], 0)])
    image_path = path - cam
    centre = np.array([W, H]) / 2 + rng.uniform(-0.1, 0.1, 2) * np.array([W, H])
    start = centre - (image_path.min(0) + image_path.max(0)) / 2
    world_pos = start + path                                       # object centre in world coords
    c = (S - 1) / 2
    cos, sin = np.cos(angle), np.sin(angle)
    A = scale[:, None, None] * np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    b = world_pos - np.einsum("tij,j->ti", A, np.array([c, c]))

    frames, alpha = render(bg, margin, cam, [(obj_tex, mask, A, b)], (H, W), noise, rng)
    return Clip(frames=frames, label=label, A=A, b=b, cam=cam, alpha=alpha, inside=inside)
