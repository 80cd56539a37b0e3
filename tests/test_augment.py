"""Fine-tuning augmentation (mme/online/augment.py): every RandAugment op against PIL frame by frame, one draw
of ops and values per clip, and mixup/cutmix/label smoothing against timm's definitions worked out here."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from mme.online import augment

FILL = (128, 128, 128)


def smooth_clip(seed, T=3, h=48, w=64):
    """uint8 [T, h, w, 3]: smooth random colour fields, each frame with its own range (so per-frame and
    per-clip statistics differ), non-square to catch swapped axes."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(T):
        field = cv2.resize(rng.normal(size=(h // 8 + 2, w // 8 + 2, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
        field = (field - field.min()) / (field.max() - field.min())
        lo = 10 + 30 * t
        frames.append(lo + field * (230 - 40 * t - lo))
    return np.stack(frames).round().astype(np.uint8)


def noise_clip(seed):
    """Full-range noise with the histogram edge cases: a flat channel, a narrow-range frame, 255s."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
    frames[0, ..., 2] = 77
    frames[1] = 40 + frames[1] % 160
    return frames


def per_frame(pil_op, frames):
    return np.stack([np.asarray(pil_op(Image.fromarray(f))) for f in frames])


def solarize_add_pil(add):
    """timm's solarize_add: a 256-entry table through Image.point."""
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return lambda im: im.point(lut * 3)


POINT_AND_COLOUR = [
    ("AutoContrast", None, ImageOps.autocontrast),
    ("Equalize", None, ImageOps.equalize),
    ("Invert", None, ImageOps.invert),
    *[("PosterizeIncreasing", b, lambda im, b=b: ImageOps.posterize(im, b)) for b in (1, 2, 3, 4)],
    *[("SolarizeIncreasing", t, lambda im, t=t: ImageOps.solarize(im, t)) for t in (26, 77, 128, 256)],
    *[("SolarizeAdd", a, solarize_add_pil(a)) for a in (0, 77, 110)],
    *[(name, f, lambda im, f=f, E=E: E(im).enhance(f))
      for name, E in [("ColorIncreasing", ImageEnhance.Color), ("ContrastIncreasing", ImageEnhance.Contrast),
                      ("BrightnessIncreasing", ImageEnhance.Brightness), ("SharpnessIncreasing", ImageEnhance.Sharpness)]
      for f in (0.1, 0.37, 1.0, 1.63, 1.9)],
]


@pytest.mark.parametrize("name,value,pil_op", POINT_AND_COLOUR, ids=lambda p: str(p) if not callable(p) else "")
def test_point_and_colour_ops_equal_pil(name, value, pil_op):
    for frames in (smooth_clip(0), noise_clip(1)):
        out = augment.OPS[name](frames, value)
        assert out.dtype == np.uint8 and out.shape == frames.shape
        np.testing.assert_array_equal(out, per_frame(pil_op, frames))


def test_posterize_to_zero_bits_is_black():
    """Magnitude 10 gives 0 bits, which current Pillow refuses; older Pillow (and we) give black."""
    assert augment.LEVELS["PosterizeIncreasing"](10.0, None) == 0
    assert not augment.OPS["PosterizeIncreasing"](noise_clip(0), 0).any()


def pil_affine(matrix):
    return lambda im: im.transform(im.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


GEOMETRIC = [
    *[("Rotate", d, lambda im, d=d: im.rotate(d, resample=Image.BILINEAR, fillcolor=FILL)) for d in (-23.7, 9.0, 30.0)],
    *[("ShearX", s, pil_affine((1, s, 0, 0, 1, 0))) for s in (-0.3, 0.17)],
    *[("ShearY", s, pil_affine((1, 0, 0, s, 1, 0))) for s in (-0.3, 0.17)],
    # +-10.5 px puts sample points exactly on the frame's edges, where PIL's inside/outside rule decides
    *[("TranslateXRel", p, pil_affine((1, 0, p * 64, 0, 1, 0))) for p in (-0.45, 0.213, 10.5 / 64, -10.5 / 64)],
    *[("TranslateYRel", p, pil_affine((1, 0, 0, 0, 1, p * 48))) for p in (-0.45, 0.213, 10.5 / 48, -10.5 / 48)],
]


@pytest.mark.parametrize("name,value,pil_op", GEOMETRIC, ids=lambda p: str(p) if not callable(p) else "")
def test_geometric_ops_match_pil(name, value, pil_op):
    """Every pixel, borders and fill included: the fill region is PIL's exactly (else differences would
    be ~100), the bilinear samples within one grey level (OpenCV rounds 1/32-pixel weights, PIL does not)."""
    frames = smooth_clip(2)
    out = augment.OPS[name](frames, value)
    diff = np.abs(out.astype(int) - per_frame(pil_op, frames))
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert diff.max() <= 1 and diff.mean() < 0.6
    assert (out == 128).all(-1).mean() > 0.02                    # the op did bring in fill


def test_levels_follow_timm():
    rng = np.random.default_rng(0)
    levels = augment.LEVELS
    for name, top in [("Rotate", 30.0), ("ShearX", 0.3), ("ShearY", 0.3), ("TranslateXRel", 0.45), ("TranslateYRel", 0.45)]:
        values = {levels[name](7.0, rng) for _ in range(50)}
        assert sorted(values) == pytest.approx([-0.7 * top, 0.7 * top])              # both signs
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        assert sorted({levels[name](7.0, rng) for _ in range(50)}) == pytest.approx([0.37, 1.63])
        assert sorted({levels[name](10.0, rng) for _ in range(50)}) == pytest.approx([0.1, 1.9])
    assert [levels["PosterizeIncreasing"](m, rng) for m in (0, 2.5, 5, 7.4, 7.5, 9.9)] == [4, 3, 2, 2, 1, 1]
    assert [levels["SolarizeIncreasing"](m, rng) for m in (0, 7, 10)] == [256, 256 - 179, 0]
    assert [levels["SolarizeAdd"](m, rng) for m in (0, 7, 10)] == [0, 77, 110]
    assert levels["Equalize"](7.0, rng) is None


def test_rand_augment_draws_like_timm(monkeypatch):
    """Ops uniform with replacement, each applied with probability 1/2, magnitude ~ N(7, 0.5): seen
    through recording ops (Rotate's |degrees| = 3 x magnitude)."""
    calls = []
    for name in augment.OPS:
        monkeypatch.setitem(augment.OPS, name, lambda frames, v, name=name: calls.append((name, v)) or frames)
    rng = np.random.default_rng(0)
    runs = 5000
    for _ in range(runs):
        augment.rand_augment(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), rng)
    assert abs(len(calls) / (4 * runs) - 0.5) < 0.02
    names = [n for n, _ in calls]
    assert all(abs(names.count(n) / len(calls) - 1 / 15) < 0.012 for n in augment.OPS)
    degrees = np.array([v for n, v in calls if n == "Rotate"])
    assert abs(np.abs(degrees).mean() / 3 - 7) < 0.1 and abs(np.abs(degrees).std() / 3 - 0.5) < 0.1
    assert abs((degrees > 0).mean() - 0.5) < 0.08


def test_rand_augment_same_ops_on_every_frame():
    """A clip of T equal frames stays T equal frames (ops and values drawn once per clip), and is changed."""
    frame = smooth_clip(3, T=1)[0]
    clip = torch.from_numpy(np.stack([frame] * 4))
    changed = 0
    for seed in range(30):
        out = augment.rand_augment(clip, np.random.default_rng(seed))
        assert out.dtype == torch.uint8 and out.shape == clip.shape
        assert all(torch.equal(out[t], out[0]) for t in range(1, 4))
        changed += not torch.equal(out, clip)
    assert changed >= 25


def test_rand_augment_deterministic_and_leaves_input_alone():
    clip = torch.from_numpy(smooth_clip(4))
    before = clip.clone()
    a = augment.rand_augment(clip, np.random.default_rng(7))
    b = augment.rand_augment(clip, np.random.default_rng(7))
    c = augment.rand_augment(clip, np.random.default_rng(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(clip, before)


def test_rand_augment_without_ops_is_identity():
    clip = torch.from_numpy(smooth_clip(5))
    out = augment.rand_augment(clip, np.random.default_rng(0), num_ops=0)
    assert torch.equal(out, clip) and out.dtype == torch.uint8
    out[0, 0, 0] = 255 - out[0, 0, 0]                             # a new tensor, not a view of the input
    assert not torch.equal(out, clip)


# --- mixup / cutmix ---

B, K = 4, 5


def batch(seed=0, T=3, H=12, W=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, T, H, W, generator=g), torch.tensor([0, 3, 1, 3])


def test_mixup_is_the_convex_combination_with_the_mirror():
    x, _ = batch()
    assert torch.equal(augment._mixup(x, 0.3), 0.3 * x + 0.7 * x.flip(0))


def test_mix_with_mixup_only():
    x, y = batch()
    before = x.clone()
    video, soft, lam = augment.mix(x, y, np.random.default_rng(0), K, cutmix_alpha=0.0, smoothing=0.0)
    one_hot = F.one_hot(y, K).float()
    assert 0 < lam < 1 and torch.equal(x, before)
    assert torch.equal(video, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot.flip(0), rtol=0, atol=1e-7)


def box_reference(h, w, lam, seed):
    """timm's rand_bbox, with the centre drawn from the same generator stream."""
    rng = np.random.default_rng(seed)
    cut = np.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = rng.integers(h), rng.integers(w)
    return np.clip([cy - ch // 2, cy + ch // 2, cx - cw // 2, cx + cw // 2], 0, [h, h, w, w]).tolist()


def test_cutmix_pastes_one_box_from_the_mirror_on_every_frame():
    x, _ = batch(T=4)
    flipped = x.flip(0)
    clipped = 0
    for seed, lam in enumerate(np.linspace(0.05, 0.95, 24)):
        out, lam_out, box = augment._cutmix(x, lam, np.random.default_rng(seed))
        y0, y1, x0, x1 = box
        assert list(box) == box_reference(12, 16, lam, seed)
        inside = torch.zeros(12, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        # B even, so every sample differs from its mirror: where out came from is unambiguous
        assert torch.equal(out[..., inside], flipped[..., inside]) and torch.equal(out[..., ~inside], x[..., ~inside])
        assert lam_out == 1 - (y1 - y0) * (x1 - x0) / (12 * 16)
        clipped += (y1 - y0) < 2 * (int(12 * np.sqrt(1 - lam)) // 2)
    assert clipped > 0                                             # boxes cut by the frame's edge were seen


def test_mix_with_cutmix_only_corrects_lam_and_targets():
    x, y = batch(1)
    video, soft, lam = augment.mix(x, y, np.random.default_rng(3), K, mixup_alpha=0.0, smoothing=0.1)
    from_mirror = (video == x.flip(0)) & (video != x)              # [B, 3, T, H, W]
    area = from_mirror[0, 0, 0].sum().item()
    assert (from_mirror == from_mirror[0, 0, 0]).all()              # one box, every sample, channel and frame
    assert 0 < area and lam == 1 - area / (12 * 16)
    smooth = torch.full((B, K), 0.1 / K).scatter_(1, y[:, None], 0.9 + 0.1 / K)
    torch.testing.assert_close(soft, lam * smooth + (1 - lam) * smooth.flip(0), rtol=0, atol=1e-7)


def test_switch_prob_chooses_cutmix():
    x, y = batch()

    def is_cutmix(video):
        return bool(((video == x) | (video == x.flip(0))).all())

    picks = [is_cutmix(augment.mix(x, y, np.random.default_rng(s), K)[0]) for s in range(400)]
    assert 0.43 < np.mean(picks) < 0.57
    assert all(is_cutmix(augment.mix(x, y, np.random.default_rng(s), K, switch_prob=1.0)[0]) for s in range(20))
    assert not any(is_cutmix(augment.mix(x, y, np.random.default_rng(s), K, switch_prob=0.0)[0]) for s in range(20))


def test_soft_targets_sum_to_one_and_keep_smoothing():
    x, y = batch()
    for seed in range(20):
        _, soft, lam = augment.mix(x, y, np.random.default_rng(seed), K, smoothing=0.1)
        torch.testing.assert_close(soft.sum(1), torch.ones(B), rtol=0, atol=1e-6)
        assert soft.min() >= 0.1 / K - 1e-7


def test_mix_without_alphas_only_smooths():
    x, y = batch()
    video, soft, lam = augment.mix(x, y, np.random.default_rng(0), K, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert torch.equal(video, x) and lam == 1.0
    expect = torch.full((B, K), 0.02)
    expect[torch.arange(B), y] = 0.92
    torch.testing.assert_close(soft, expect, rtol=0, atol=1e-7)


def test_mix_any_memory_format():
    x, y = batch(2)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    for seed in range(6):                                          # both branches
        a = augment.mix(x, y, np.random.default_rng(seed), K)
        b = augment.mix(x_cl, y, np.random.default_rng(seed), K)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_soft_cross_entropy():
    logits = torch.randn(6, K, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    torch.testing.assert_close(augment.soft_cross_entropy(logits, F.one_hot(y, K).float()), F.cross_entropy(logits, y))
    # torch's label smoothing has timm's on/off values, so the smoothed targets must give the same loss
    torch.testing.assert_close(augment.soft_cross_entropy(logits, augment.smooth_one_hot(y, K, 0.1)),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
