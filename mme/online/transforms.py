"""Clip augmentation in pure PyTorch: the loader's CPU backend (mme/data.py, backend="torch") and the
reference its DALI pipeline is tested against. The same crop, resize and flip go to frames and
trajectories.

    box = crop_box(rng, h, w, size=224, scales=(1, .875, .75, .66))    # (x0, y0, cw, ch), VideoMAE's MultiScaleCrop
    clip = crop_frames(frames, box, size, flip)                        # uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]
    video = normalize(clip)                                            # uint8 [..., T, S, S, 3] -> float [..., 3, T, S, S]
    maps = crop_maps(m, box, size, grid, flip)                         # float [T', H/g, W/g, C] -> [T', size/g, size/g, C]
    disp, hog, valid = finish_tracks(disp, hog, valid, box, size, flip)  # the units: px scale, dx sign, HOG bins
    disp, hog, valid = crop_tracks(disp, hog, valid, box, size, grid, flip)   # crop_maps + finish_tracks

Trajectory maps are resampled, not just cropped: output grid point (i, j) sits at the centre of its
g x g cell of the output, pixel (g*j + (g-1)/2, g*i + (g-1)/2), which is symmetric under a flip. It maps
back through the resize and the crop to a source pixel x, i.e. to the source grid index (x - g//2)/g
(source point j starts at pixel g*j + g//2, docs/shards.md), sampled bilinearly, edges clamped.
"""
import torch
import torch.nn.functional as F

BINS = 9
MEAN = (0.485, 0.456, 0.406)        # ImageNet, as VideoMAE normalises its input
STD = (0.229, 0.224, 0.225)


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


def eval_boxes(h, w, n):
    """Multi-crop testing (VideoMAE's spatial_idx 0..n-1): n squares of the short side, evenly spread
    along the long side from one end to the other (n = 1: the centre one)."""
    side = min(h, w)
    starts = [(max(h, w) - side) // 2] if n == 1 else [round(i * (max(h, w) - side) / (n - 1)) for i in range(n)]
    return [(s, 0, side, side) if w >= h else (0, s, side, side) for s in starts]


def crop_frames(frames, box, size, flip=False):
    """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]: crop, antialiased bilinear resize (PIL's filter,
    which VideoMAE uses; torch's uint8 kernel, ~6x faster than resizing floats), optional horizontal flip."""
    x0, y0, cw, ch = box
    crop = torch.as_tensor(frames)[:, y0:y0 + ch, x0:x0 + cw].permute(0, 3, 1, 2)   # [T, 3, ch, cw], channels-last
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = out.permute(0, 2, 3, 1)                                                  # [T, size, size, 3]
    return (out.flip(2) if flip else out).contiguous()


def normalize(video):
    """uint8 [..., T, S, S, 3] -> float [..., 3, T, S, S], ImageNet-normalised. The result is a view in
    channels-last order (torch.channels_last_3d for a batch), which the patch embedding reads ~1.7x
    faster than the contiguous layout; the values are the same either way."""
    *lead, T, H, W, C = video.shape
    scale = (1 / (255 * torch.tensor(STD, device=video.device))).repeat(W)
    shift = (torch.tensor(MEAN, device=video.device) / torch.tensor(STD, device=video.device)).repeat(W)
    # in place over rows of W*3 values (broadcasting over the last dim of 3 is ~6x slower on CPU),
    # in one pass: x * scale - shift
    x = video.reshape(-1, W * C).float()
    torch.addcmul(-shift, x, scale, out=x)
    return x.view(*lead, T, H, W, C).movedim(-1, -4)


def to_uint8(video):
    """normalize's inverse: float [..., 3, T, S, S], ImageNet-normalised -> uint8 [..., T, S, S, 3] (for pictures
    and caches of what the model saw)."""
    mean = torch.tensor(MEAN, device=video.device).view(3, 1, 1, 1)
    std = torch.tensor(STD, device=video.device).view(3, 1, 1, 1)
    return ((video.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).movedim(-4, -1)


def map_coords(box, size, grid):
    """Source grid indices (ax [size/g], ay [size/g]) that the output grid samples."""
    x0, y0, cw, ch = box
    out = torch.arange(size // grid, dtype=torch.float64) * grid + (grid - 1) / 2      # output pixels
    ax = (x0 + (out + 0.5) * cw / size - 0.5 - grid // 2) / grid
    ay = (y0 + (out + 0.5) * ch / size - 0.5 - grid // 2) / grid
    return ax, ay


def _taps(a, n):
    """Bilinear taps along one axis: indices i0, i1 and weight f of i1, edges clamped."""
    a = a.clamp(0, n - 1)
    i0 = a.floor().long().clamp(max=max(n - 2, 0))
    return i0, (i0 + 1).clamp(max=n - 1), (a - i0).float()


def crop_maps(m, box, size, grid, flip=False, table=None):
    """float [T', gh, gw, C] -> [T', size/g, size/g, C]: bilinear samples at map_coords, edges clamped
    (separable: rows, then columns). table: m holds uint8 codes of these float values (the shards' HOG
    code), looked up after cutting out the rows and columns the samples read."""
    m = torch.as_tensor(m)
    Tp, gh, gw, C = m.shape
    ax, ay = map_coords(box, size, grid)
    y0, y1, fy = _taps(ay, gh)
    x0, x1, fx = _taps(ax, gw)
    m = m[:, y0[0]:y1[-1] + 1, x0[0]:x1[-1] + 1]
    m = torch.as_tensor(table)[m.long()] if table is not None else m.float()
    y0, y1, x0, x1 = y0 - y0[0], y1 - y0[0], x0 - x0[0], x1 - x0[0]
    rows = torch.lerp(m.index_select(1, y0), m.index_select(1, y1), fy[None, :, None, None])      # [T', n, w, C]
    out = torch.lerp(rows.index_select(2, x0), rows.index_select(2, x1), fx[None, None, :, None])  # [T', n, n, C]
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


def crop_tracks(disp, hog, valid, box, size, grid, flip=False, hog_table=None, disp_table=None):
    """Trajectories through a given crop box and flip: disp [T', gh, gw, L, 2] (or its uint8 codes and
    disp_table), hog float [T', gh, gw, L, 9] (or its uint8 codes and hog_table), valid [T', gh, gw] ->
    disp, hog at [T', S/g, S/g, L, c] in output units, valid bool [T', S/g, S/g]."""
    disp, hog, valid = (torch.as_tensor(x) for x in (disp, hog, valid))
    Tp, gh, gw, L, _ = disp.shape
    n = size // grid
    d = crop_maps(disp.reshape(Tp, gh, gw, L * 2), box, size, grid, flip, disp_table).reshape(Tp, n, n, L, 2)
    g = crop_maps(hog.reshape(Tp, gh, gw, L * BINS), box, size, grid, flip, hog_table).reshape(Tp, n, n, L, BINS)
    v = crop_maps(valid.float()[..., None], box, size, grid, flip)[..., 0]
    return finish_tracks(d, g, v, box, size, flip)

