"""Fine-tuning augmentation (Table 15, VideoMAE's recipe): RandAugment applied identically to every
frame of a clip, and mixup/cutmix with label smoothing over a batch (timm's `Mixup`, 'batch' mode).

    clip = rand_augment(clip, rng, num_ops=4, magnitude=7, magnitude_std=0.5)   # uint8 [T, H, W, 3] -> same
    video, soft, lam = mix(video, labels, rng, num_classes)    # float [B, 3, T, H, W], long [B] -> same, [B, K], float
    loss = soft_cross_entropy(logits, soft)                    # [B, K], [B, K] -> scalar

RandAugment is timm's `rand-m7-n4-mstd0.5-inc1`: num_ops ops drawn uniformly with replacement from the
15 "increasing" ops, each applied with probability 0.5 at a magnitude ~ N(magnitude, magnitude_std)
clipped to [0, 10]. Ops and their parameters are drawn once per clip, so the clip stays temporally
consistent; statistics (histograms, mean grey) are per frame, as VideoMAE calls the PIL op on each
frame. Each op in OPS takes frames uint8 [T, H, W, 3] and its value (degrees, factor, bits...; None for
the parameterless ops) and gives what PIL's ImageOps/ImageEnhance/Image.transform give on every frame:
the point and colour ops exactly, the geometric ones (bilinear, fill 128) within one grey level.
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F

MAX_LEVEL = 10.0
FILL = 128              # timm's fill colour (128, 128, 128) where a geometric op samples outside the frame


# --- point ops: one lookup table per clip, or per frame and channel [T, 3, 256] ---

def _lookup(frames, lut):
    """frames uint8 [T, H, W, 3] through lut [256], or per frame and channel [T, 3, 256]."""
    lut = np.asarray(lut).clip(0, 255).astype(np.uint8)       # PIL clips table values to 0..255
    if lut.ndim == 1:                                          # cv2.LUT: ~10x numpy's indexing
        return cv2.LUT(frames.reshape(-1, *frames.shape[2:]), lut).reshape(frames.shape)
    return np.stack([cv2.LUT(f, np.ascontiguousarray(l.T)[:, None]) for f, l in zip(frames, lut)])


def _histograms(frames):
    """uint8 [T, H, W, 3] -> int64 [T, 3, 256], per frame and channel."""
    return np.array([[cv2.calcHist([f], [c], None, [256], [0, 256]).ravel() for c in range(3)]
                     for f in frames]).astype(np.int64)


def auto_contrast(frames, _=None):
    """ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255], truncating."""
    h = _histograms(frames) > 0
    lo = h.argmax(-1)[..., None]                               # [T, 3, 1]
    hi = 255 - h[..., ::-1].argmax(-1)[..., None]
    scale = 255.0 / np.maximum(hi - lo, 1)
    lut = (np.arange(256) * scale - lo * scale).astype(np.int64)     # int() truncates towards zero
    return _lookup(frames, np.where(hi > lo, lut, np.arange(256)))   # a flat channel is left alone


def equalize(frames, _=None):
    """ImageOps.equalize: per channel, value i -> (step // 2 + #pixels below i) // step, where
    step = (#pixels - #pixels at the highest value present) // 255 (the installed Pillow's formula)."""
    h = _histograms(frames)
    top = np.take_along_axis(h, 255 - (h[..., ::-1] > 0).argmax(-1)[..., None], -1)   # [T, 3, 1]
    step = (h.sum(-1, keepdims=True) - top) // 255
    below = np.cumsum(h, -1) - h
    lut = (step // 2 + below) // np.maximum(step, 1)
    return _lookup(frames, np.where(step > 0, lut, np.arange(256)))   # one value, or too few pixels: as is


def invert(frames, _=None):
    return 255 - frames


def posterize(frames, bits):
    """ImageOps.posterize: keep the top `bits` bits. 0 bits (PosterizeIncreasing at magnitude 10) gives
    black, as older Pillow did; current Pillow raises for bits < 1."""
    return frames & np.uint8((0xFF << (8 - bits)) & 0xFF)


def solarize(frames, threshold):
    """Invert values >= threshold (256: nothing)."""
    return _lookup(frames, np.where(np.arange(256) < threshold, np.arange(256), 255 - np.arange(256)))


def solarize_add(frames, add, threshold=128):
    """Add `add` to values < threshold, saturating at 255 (timm's solarize_add)."""
    v = np.arange(256)
    return _lookup(frames, np.where(v < threshold, np.minimum(v + add, 255), v))


# --- enhance ops: PIL's Image.blend(degenerate, image, factor), float32, truncated ---

def _blend(degenerate, frames, factor):
    d = degenerate.astype(np.float32)
    out = d + np.float32(factor) * (frames.astype(np.float32) - d)
    return out.clip(0, 255).astype(np.uint8)


def _grey(frames):
    """uint8 [T, H, W, 3] -> int [T, H, W]: PIL's RGB -> L (0.299, 0.587, 0.114 in 16-bit fixed point)."""
    rgb = frames.astype(np.int32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def color(frames, factor):
    """ImageEnhance.Color: blend with the grey image (0 grey, 1 unchanged, > 1 more saturated)."""
    return _blend(_grey(frames)[..., None], frames, factor)


def contrast(frames, factor):
    """ImageEnhance.Contrast: blend with each frame's mean grey level, rounded."""
    mean = (_grey(frames).mean((1, 2)) + 0.5).astype(np.int64)      # [T]
    return _blend(mean[:, None, None, None], frames, factor)


def brightness(frames, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(np.zeros((), np.uint8), frames, factor)


def sharpness(frames, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter, [[1,1,1],[1,5,1],[1,1,1]] / 13 rounded,
    the one-pixel border left unfiltered. (An integer sum / 13 is never within 1/26 of a half, so
    OpenCV's float kernel rounds as PIL does.)"""
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    smooth = np.stack([cv2.filter2D(f, -1, kernel) for f in frames])
    smooth[:, [0, -1]], smooth[:, :, [0, -1]] = frames[:, [0, -1]], frames[:, :, [0, -1]]
    return _blend(smooth, frames, factor)


# --- geometric ops: PIL's Image.transform(AFFINE, BILINEAR, fillcolor=FILL) ---

def _affine(frames, matrix):
    """PIL's affine: output pixel centre (x + .5, y + .5) samples the source at
    (a (x+.5) + b (y+.5) + c, d (x+.5) + e (y+.5) + f), bilinearly with edges clamped, and takes FILL
    where that point lies outside [0, W) x [0, H)."""
    a, b, c, d, e, f = matrix
    T, H, W, _ = frames.shape
    # the same map in OpenCV's convention, where pixel centres are integers
    m = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    out = np.stack([cv2.warpAffine(im, m, (W, H), flags=flags, borderMode=cv2.BORDER_REPLICATE) for im in frames])
    y, x = np.mgrid[0:H, 0:W] + 0.5
    sx, sy = a * x + b * y + c, d * x + e * y + f
    out[:, (sx < 0) | (sx >= W) | (sy < 0) | (sy >= H)] = FILL
    return out


def rotate(frames, degrees):
    """Image.rotate: counter-clockwise about the frame centre, same size."""
    H, W = frames.shape[1:3]
    t = -np.deg2rad(degrees)
    a, b, d, e = np.cos(t), np.sin(t), -np.sin(t), np.cos(t)
    cx, cy = W / 2, H / 2
    return _affine(frames, (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy))


def shear_x(frames, factor):
    return _affine(frames, (1, factor, 0, 0, 1, 0))


def shear_y(frames, factor):
    return _affine(frames, (1, 0, 0, factor, 1, 0))


def translate_x_rel(frames, pct):
    """Shift by pct of the width (content moves left for pct > 0, as in timm)."""
    return _affine(frames, (1, 0, pct * frames.shape[2], 0, 1, 0))


def translate_y_rel(frames, pct):
    return _affine(frames, (1, 0, 0, 0, 1, pct * frames.shape[1]))


OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "PosterizeIncreasing": posterize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "ColorIncreasing": color, "ContrastIncreasing": contrast, "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel,
}


# --- magnitude (0..10) -> op value, as timm's auto_augment.py ---

def _signed(v, rng):
    return -v if rng.random() < 0.5 else v


def _enhance_factor(m, rng):
    return max(0.1, 1.0 + _signed(0.9 * m / MAX_LEVEL, rng))


LEVELS = {
    "AutoContrast": lambda m, rng: None, "Equalize": lambda m, rng: None, "Invert": lambda m, rng: None,
    "Rotate": lambda m, rng: _signed(30.0 * m / MAX_LEVEL, rng),
    "PosterizeIncreasing": lambda m, rng: 4 - int(4 * m / MAX_LEVEL),
    "SolarizeIncreasing": lambda m, rng: 256 - min(256, int(256 * m / MAX_LEVEL)),
    "SolarizeAdd": lambda m, rng: min(128, int(110 * m / MAX_LEVEL)),
    "ColorIncreasing": _enhance_factor, "ContrastIncreasing": _enhance_factor,
    "BrightnessIncreasing": _enhance_factor, "SharpnessIncreasing": _enhance_factor,
    "ShearX": lambda m, rng: _signed(0.3 * m / MAX_LEVEL, rng),
    "ShearY": lambda m, rng: _signed(0.3 * m / MAX_LEVEL, rng),
    "TranslateXRel": lambda m, rng: _signed(0.45 * m / MAX_LEVEL, rng),
    "TranslateYRel": lambda m, rng: _signed(0.45 * m / MAX_LEVEL, rng),
}


def rand_augment(clip, rng, num_ops=4, magnitude=7, magnitude_std=0.5, prob=0.5):
    """uint8 [T, H, W, 3] -> new uint8 [T, H, W, 3]: `num_ops` ops drawn with replacement, each applied
    with probability `prob` at magnitude N(magnitude, magnitude_std) clipped to [0, 10]; one draw per
    clip, so every frame gets the same ops with the same values (random signs included)."""
    original = np.ascontiguousarray(torch.as_tensor(clip).cpu().numpy())
    frames = original
    names = list(OPS)
    for i in rng.integers(len(names), size=num_ops):
        if rng.random() >= prob:
            continue
        m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        m = min(max(m, 0.0), MAX_LEVEL)
        frames = OPS[names[i]](frames, LEVELS[names[i]](m, rng))
    # every op returns a new array; copy only when none ran, so the result never aliases the input
    return torch.from_numpy(frames.copy() if frames is original else frames)


# --- mixup / cutmix (timm's Mixup, mode 'batch', correct_lam=True): each clip mixes with its mirror
# in the batch, video.flip(0) ---

def smooth_one_hot(labels, num_classes, smoothing=0.1):
    """long [B] -> float [B, K]: smoothing / K off, 1 - smoothing + smoothing / K on (timm's mixup_target)."""
    off = smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, device=labels.device)
    return target.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def _mixup(video, lam):
    return video * lam + video.flip(0) * (1.0 - lam)


def _cutmix_box(h, w, lam, rng):
    """timm's rand_bbox: sides sqrt(1 - lam) of the frame's, centre uniform, clipped to the frame.
    Returns (y0, y1, x0, x1)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w))


def _cutmix(video, lam, rng):
    """Paste one box, the same on every frame, from the mirrored batch. Returns (video, lam, box),
    lam corrected to the share of the frame kept (the box may be clipped)."""
    H, W = video.shape[-2:]
    y0, y1, x0, x1 = box = _cutmix_box(H, W, lam, rng)
    out = video.clone()
    out[..., y0:y1, x0:x1] = video[..., y0:y1, x0:x1].flip(0)
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (H * W), box


def mix(video, labels, rng, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1):
    """video float [B, 3, T, H, W], labels long [B] -> (video, soft targets float [B, K], lam). Cutmix with
    probability switch_prob (when both alphas > 0), else mixup; lam ~ Beta(alpha, alpha) of the one used.
    Both alphas 0: no mixing, targets only smoothed. The input is never modified."""
    lam = 1.0
    if mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if use_cutmix:
            video, lam, _ = _cutmix(video, lam, rng)
        else:
            video = _mixup(video, lam)
    target = smooth_one_hot(labels, num_classes, smoothing)
    return video, target * lam + target.flip(0) * (1.0 - lam), lam


def soft_cross_entropy(logits, soft_targets):
    """Mean over the batch of -sum(soft * log_softmax(logits)) (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
