"""Clip augmentation in pure PyTorch: the reference the DALI loader (mme/data.py) is tested against,
and the CPU-only debugging path. The same crop, resize and flip go to frames and trajectories.

    box = crop_box(rng, h, w, size=224, scales=(1, .875, .75, .66))    # (x0, y0, cw, ch), VideoMAE's MultiScaleCrop
    video = crop_frames(frames, box, size, flip)                       # uint8 [T, H, W, 3] -> float [3, T, size, size] in [0, 1]
    maps = crop_maps(m, box, size, grid, flip)                         # float [T', H/g, W/g, C] -> [T', size/g, size/g, C]
    disp, hog, valid = finish_tracks(disp, hog, valid, box, size, flip)  # the units: px scale, dx sign, HOG bins

Trajectory maps are resampled, not just cropped: output grid point (i, j) sits at the centre of its
g x g cell of the output, pixel (g*j + (g-1)/2, g*i + (g-1)/2), which is symmetric under a flip. It maps
back through the resize and the crop to a source pixel x, i.e. to the source grid index (x - g//2)/g
(source point j starts at pixel g*j + g//2, docs/shards.md), sampled bilinearly, edges clamped.
"""
import numpy as np
import torch
import torch.nn.functional as F

BINS = 9


def crop_box(rng, h, w, size=224, scales=(1.0, 0.875, 0.75, 0.66), max_distort=1):
    """VideoMAE/TSN GroupMultiScaleCrop: crop sides from scales of the short side (each side within
    `max_distort` scale steps of the other, sides within 3 px of `size` snap to it), placed at one of
    13 fixed offsets. Returns integer (x0, y0, cw, ch)."""
    base = min(h, w)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(cw, ch) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= max_distort]
    cw, ch = pairs[rng.integers(len(pairs))]
    ws, hs = (w - cw) // 4, (h - ch) // 4
    offsets = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    ox, oy = offsets[rng.integers(len(offsets))]
    return ox * ws, oy * hs, cw, ch


def centre_box(h, w, size=224):
    """Evaluation: the centre square of the short side (resized to `size`)."""
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side, side


def crop_frames(frames, box, size, flip=False):
    """uint8 [T, H, W, 3] -> float32 [3, T, size, size] in [0, 1]: crop, antialiased bilinear resize
    (as PIL's, which VideoMAE uses) to uint8 values, optional horizontal flip."""
    x0, y0, cw, ch = box
    crop = torch.as_tensor(frames)[:, y0:y0 + ch, x0:x0 + cw].permute(0, 3, 1, 2).float()   # [T, 3, ch, cw]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        out = out.flip(-1)
    out = out.round_().clamp_(0, 255)                   # resized frames are uint8 (PIL's, DALI's) before normalising
    return (out / 255).permute(1, 0, 2, 3).contiguous()


def map_coords(box, size, grid):
    """Source grid indices (ax [size/g], ay [size/g]) that the output grid samples."""
    x0, y0, cw, ch = box
    out = torch.arange(size // grid, dtype=torch.float64) * grid + (grid - 1) / 2      # output pixels
    ax = (x0 + (out + 0.5) * cw / size - 0.5 - grid // 2) / grid
    ay = (y0 + (out + 0.5) * ch / size - 0.5 - grid // 2) / grid
    return ax, ay


def crop_maps(m, box, size, grid, flip=False):
    """float [T', gh, gw, C] -> [T', size/g, size/g, C]: bilinear samples at map_coords, edges clamped."""
    m = torch.as_tensor(m, dtype=torch.float32)
    Tp, gh, gw, C = m.shape
    ax, ay = map_coords(box, size, grid)
    ax, ay = ax.clamp(0, gw - 1), ay.clamp(0, gh - 1)
    x0, y0 = ax.floor().long().clamp(max=gw - 2 if gw > 1 else 0), ay.floor().long().clamp(max=gh - 2 if gh > 1 else 0)
    fx, fy = (ax - x0).float(), (ay - y0).float()
    x1, y1 = (x0 + 1).clamp(max=gw - 1), (y0 + 1).clamp(max=gh - 1)
    rows0, rows1 = m[:, y0], m[:, y1]                                     # [T', n, gw, C]
    top = rows0[:, :, x0] * (1 - fx)[None, None, :, None] + rows0[:, :, x1] * fx[None, None, :, None]
    bot = rows1[:, :, x0] * (1 - fx)[None, None, :, None] + rows1[:, :, x1] * fx[None, None, :, None]
    out = top * (1 - fy)[None, :, None, None] + bot * fy[None, :, None, None]
    return out.flip(2) if flip else out


def finish_tracks(disp, hog, valid, box, size, flip):
    """Units after the geometric resampling of the maps (same for every backend):
    disp [..., L, 2] px of the source -> px of the output (x times size/cw, y times size/ch), dx
    negated if flipped; hog [..., L, 9] bins reversed if flipped (orientation theta -> 180 - theta:
    bin k -> 8 - k); valid: a resampled point is valid only if every source point it mixes is (> 0.999)."""
    x0, y0, cw, ch = box
    scale = torch.tensor([size / cw, size / ch], dtype=disp.dtype, device=disp.device)
    if flip:
        scale = scale * torch.tensor([-1.0, 1.0], dtype=disp.dtype, device=disp.device)
        hog = hog.flip(-1)
    return disp * scale, hog, valid > 0.999


def augment(sample, size, grid, rng=None, scales=(1.0, 0.875, 0.75, 0.66), flip_prob=0.0):
    """The whole reference transform of one decoded sample (mme.shards.decode): a random
    MultiScaleCrop (centre crop when rng is None) and flip, applied to frames and trajectories.
    Returns dict(video [3, T, S, S], disp [T/2, S/g, S/g, L, 2], hog [..., L, 9], valid [T/2, S/g, S/g],
    box, flip)."""
    frames = sample["frames"]
    T, h, w, _ = frames.shape
    box = crop_box(rng, h, w, size, scales) if rng is not None else centre_box(h, w, size)
    flip = bool(rng is not None and rng.random() < flip_prob)
    disp, hog, valid = (torch.as_tensor(sample[k]) for k in ("disp", "hog", "valid"))
    Tp, gh, gw, L, _ = disp.shape
    d = crop_maps(disp.reshape(Tp, gh, gw, L * 2), box, size, grid, flip).reshape(Tp, size // grid, size // grid, L, 2)
    g = crop_maps(hog.reshape(Tp, gh, gw, L * BINS), box, size, grid, flip).reshape(Tp, size // grid, size // grid, L, BINS)
    v = crop_maps(valid.float()[..., None], box, size, grid, flip)[..., 0]
    d, g, v = finish_tracks(d, g, v, box, size, flip)
    return dict(video=crop_frames(frames, box, size, flip), disp=d, hog=g, valid=v, box=box, flip=flip)
