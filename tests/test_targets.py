"""Targets and masks (mme/online/targets.py): layout, normalisation, weights, and the baselines' targets."""
import numpy as np
import pytest
import torch

from mme.offline import hog as hoglib
from mme.online import targets


def maps(B=2, T2=2, g=4, L=3, seed=0):
    rng = np.random.default_rng(seed)
    disp = torch.tensor(rng.normal(0, 2, (B, T2, g, g, L, 2)), dtype=torch.float32)
    hog = torch.tensor(rng.random((B, T2, g, g, L, 9)), dtype=torch.float32)
    valid = torch.ones(B, T2, g, g, dtype=torch.bool)
    return disp, hog, valid


def test_layout_position_then_shape():
    disp, hog, valid = maps()
    target, weight = targets.mme_target(disp, hog, valid, patch_norm=False)
    B, T2, g, _, L, _ = disp.shape
    assert target.shape == (B, T2 * (g // 2) ** 2, 4 * L * 2 + 4 * L * 9)
    K = 4
    for b, t, h, w in [(0, 0, 0, 0), (1, 1, 1, 0), (0, 1, 1, 1)]:
        n = t * (g // 2) ** 2 + h * (g // 2) + w                           # tokens ordered (t, h, w)
        for k in range(K):
            i, j = 2 * h + k // 2, 2 * w + k % 2                            # trajectory k row-major in the patch
            for l in range(L):
                np.testing.assert_array_equal(target[b, n, k * L * 2 + l * 2: k * L * 2 + l * 2 + 2], disp[b, t, i, j, l])
                s0 = K * L * 2 + k * L * 9 + l * 9
                np.testing.assert_array_equal(target[b, n, s0:s0 + 9], hog[b, t, i, j, l])
    assert torch.all(weight == 1)


def test_patch_norm_per_part_and_weight():
    disp, hog, valid = maps()
    valid[0, 0, 1, 0] = False                                               # one trajectory of token (0, 0, 0) left
    target, weight = targets.mme_target(disp, hog, valid)
    pos, shape = target[..., :4 * 3 * 2], target[..., 4 * 3 * 2:]
    for part in (pos, shape):
        np.testing.assert_allclose(part.mean(-1), 0, atol=1e-5)
        np.testing.assert_allclose(part.std(-1, unbiased=False), 1, atol=1e-3)
    assert weight[0, 0] == 0 and weight.sum() == weight.numel() - 1
    # the patch's common motion survives normalisation (a rigid shift right is not all zeros)
    rigid = torch.zeros(1, 1, 2, 2, 3, 2)
    rigid[..., 0] = 1.0
    t, _ = targets.mme_target(rigid, torch.rand(1, 1, 2, 2, 3, 9), torch.ones(1, 1, 2, 2, dtype=torch.bool))
    assert torch.all(t[0, 0, 0:24:2] > 0.9) and torch.all(t[0, 0, 1:24:2] < -0.9)


def test_density_stride_and_shape_switches():
    disp, hog, valid = maps(L=6)
    t, _ = targets.mme_target(disp, hog, valid, patch_norm=False, shape=False)
    assert t.shape[-1] == 4 * 6 * 2
    t, _ = targets.mme_target(disp, hog, valid, patch_norm=False, density="mean")
    np.testing.assert_allclose(t[0, 0, :2], disp[0, 0, :2, :2, 0].mean((0, 1)), atol=1e-6)
    assert t.shape[-1] == 6 * 2 + 6 * 9
    t, _ = targets.mme_target(disp, hog, valid, patch_norm=False, density="max")
    paths = disp[0, 0, :2, :2].norm(dim=-1).sum(-1).flatten()
    k = int(paths.argmax())
    np.testing.assert_allclose(t[0, 0, :12], disp[0, 0, k // 2, k % 2].flatten(), atol=1e-6)
    t, _ = targets.mme_target(disp, hog, valid, patch_norm=False, stride=3)  # steps at the input stride
    np.testing.assert_allclose(t[0, 0, :2], disp[0, 0, 0, 0, 0:3].sum(0), atol=1e-5)
    np.testing.assert_allclose(t[0, 0, 2:4], disp[0, 0, 0, 0, 3:6].sum(0), atol=1e-5)
    assert t.shape[-1] == 4 * 2 * 2 + 4 * 2 * 9


def test_pixel_target_is_videomaes():
    video = torch.rand(1, 3, 4, 32, 32)
    t = targets.pixel_target(video)
    assert t.shape == (1, 2 * 2 * 2, 2 * 16 * 16 * 3)
    patch = video[0, :, 2:4, 16:32, 0:16]                                    # token (t=1, h=1, w=0) = 4 + 2
    x = patch.permute(1, 2, 3, 0).reshape(-1, 3)                            # (p0 p1 p2) c
    x = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-6).sqrt()
    np.testing.assert_allclose(t[0, 6], x.reshape(-1), atol=1e-5)
    raw = targets.pixel_target(video, patch_norm=False)
    np.testing.assert_allclose(raw[0, 6], patch.permute(1, 2, 3, 0).reshape(-1), atol=1e-6)


def test_hog_target_matches_mme_hog_per_channel():
    rng = np.random.default_rng(0)
    video = torch.tensor(rng.integers(0, 256, (1, 3, 2, 32, 32)) / 255, dtype=torch.float32)
    t = targets.hog_target(video)                                            # [1, 4, 108]
    frame = (video[0, :, 1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for c in range(3):
        grads = hoglib.gradient_bins(frame[..., c])
        # cell (ch, cw) of token (h, w): pixels [16h + 8ch, +8) x [16w + 8cw, +8): centre 16h + 8ch + 3.5
        for h, w, ch, cw in [(0, 0, 0, 0), (1, 0, 1, 1), (0, 1, 1, 0)]:
            ref = hoglib.hog_at(grads, np.float32([16 * w + 8 * cw + 3.5]), np.float32([16 * h + 8 * ch + 3.5]), cell=8)[0]
            n, cell = h * 2 + w, ch * 2 + cw
            ours = t[0, n, cell * 27 + c * 9: cell * 27 + c * 9 + 9].numpy()
            # a gradient with a vertical part of float-rounding size sits on the 0/180 degree edge:
            # bins 0 and 8 may trade it (the torch and OpenCV roundings differ); all else must agree
            np.testing.assert_allclose(ours[1:8], ref[1:8], atol=1e-4, rtol=1e-3)
            np.testing.assert_allclose(ours[0] + ours[8], ref[0] + ref[8], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["tube", "random"])
def test_mask_counts(kind):
    m = targets.tube_mask(np.random.default_rng(0), 3, 8, 7, 7, 0.7, kind)
    assert m.shape == (3, 8 * 49) and m.dtype == torch.bool
    per_t = m.reshape(3, 8, 49)
    if kind == "tube":
        assert torch.all(per_t.sum(-1) == 34) and torch.all(per_t == per_t[:, :1])
    else:
        assert torch.all(m.sum(-1) == round(0.7 * 392)) and not torch.all(per_t == per_t[:, :1])
    assert not torch.equal(m[0], m[1])
    again = targets.tube_mask(np.random.default_rng(0), 3, 8, 7, 7, 0.7, kind)
    assert torch.equal(m, again)


def test_unnormalize_inverts_patch_norm():
    rng = torch.Generator().manual_seed(0)
    disp = torch.randn(2, 2, 4, 4, 3, 2, generator=rng) * 3 + 1                 # [B, T', 4, 4, L=3, 2]: 2x2 patches
    hog = torch.rand(2, 2, 4, 4, 3, 9, generator=rng) * 0.1
    valid = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    normed, _ = targets.mme_target(disp, hog, valid, patch_norm=True)
    raw, _ = targets.mme_target(disp, hog, valid, patch_norm=False)
    r = {"trajectory_density": "dense", "trajectory_length": 3, "interpolation": True, "sampling_rate": 2, "shape_target": True}
    widths = targets.mme_parts(r)
    assert widths == {"position": 24, "shape": 108} and targets.target_dim(r | {"target": "mme"}) == 132
    torch.testing.assert_close(targets.unnormalize(normed, raw, widths.values()), raw, atol=1e-4, rtol=1e-4)


def test_authors_patch_std_on_a_known_patch():
    """The authors' PatchStd: per step and coordinate, (x/20 - mean over the 4) / (unbiased std + 1e-6)."""
    disp = torch.zeros(1, 1, 2, 2, 1, 2)                                    # one patch, L = 1
    disp[0, 0, :, :, 0, 0] = torch.tensor([[1.0, 3.0], [5.0, 7.0]])        # dx of trajectories k = 0..3
    disp[0, 0, :, :, 0, 1] = 4.0                                           # dy: the same for all four
    t, _ = targets.mme_target(disp, torch.rand(1, 1, 2, 2, 1, 9), torch.ones(1, 1, 2, 2, dtype=torch.bool),
                              patch_norm="authors", shape=False)
    dx = torch.tensor([1.0, 3.0, 5.0, 7.0]) / 20
    expect = (dx - dx.mean()) / (dx.std(unbiased=True) + 1e-6)             # [-1.16, -0.39, 0.39, 1.16]
    torch.testing.assert_close(t[0, 0, 0::2], expect)
    torch.testing.assert_close(t[0, 0, 1::2], torch.zeros(4))              # common motion removed entirely
    # a rigid translation (every trajectory alike) keeps nothing; the paper's norm keeps its direction
    rigid = torch.zeros(1, 1, 2, 2, 3, 2)
    rigid[..., 0] = 2.0
    t, _ = targets.mme_target(rigid, torch.rand(1, 1, 2, 2, 3, 9), torch.ones(1, 1, 2, 2, dtype=torch.bool),
                              patch_norm="authors", shape=False)
    assert torch.all(t == 0)


def test_mean_plus_relative_parts():
    disp, hog, valid = maps(L=3)
    t, _ = targets.mme_target(disp, hog, valid, patch_norm="none", density="mean+relative")
    r = {"trajectory_density": "mean+relative", "trajectory_length": 3, "interpolation": True, "sampling_rate": 2,
         "shape_target": True}
    assert targets.mme_parts(r) == {"position": 6, "relative": 24, "shape": 108} and t.shape[-1] == 138
    mean = disp[0, 0, :2, :2].mean((0, 1))                                  # token 0: the patch's mean path [L, 2]
    torch.testing.assert_close(t[0, 0, :6], mean.flatten())
    torch.testing.assert_close(t[0, 0, 6:12], (disp[0, 0, 0, 0] - mean).flatten())   # trajectory 0 relative to it
    normed, _ = targets.mme_target(disp, hog, valid, patch_norm="paper", density="mean+relative")
    for a, b in ((0, 6), (6, 30), (30, 138)):                               # each part standardised on its own
        torch.testing.assert_close(normed[..., a:b].mean(-1), torch.zeros(normed.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm,density", [("paper", "dense"), ("paper", "mean"), ("paper", "mean+relative"),
                                          ("none", "dense"), ("none", "mean"), ("none", "mean+relative"),
                                          ("authors", "dense")])
@pytest.mark.parametrize("balance", [False, True, "per_clip"])
def test_paths_undo_every_target_space(norm, density, balance):
    """A perfect prediction in the recipe's target space comes back as the true trajectories in px."""
    from mme import model

    disp, hog, valid = maps(L=3, seed=1)
    r = {"trajectory_density": density, "trajectory_length": 3, "interpolation": True, "sampling_rate": 2,
         "shape_target": True, "patch_norm": norm, "loss_balance": bool(balance), "balance_per_clip": balance == "per_clip"}
    raw, weight = targets.mme_target(disp, hog, valid, patch_norm="none", density=density)
    normed, _ = targets.mme_target(disp, hog, valid, patch_norm=norm, density=density)
    if balance:                                                             # the model predicts in part-rms units
        widths = list(targets.mme_parts(r).values())
        rms = model.part_rms(normed, weight, widths, r["balance_per_clip"])
        normed = torch.cat([p / s for p, s in zip(normed.split(widths, -1), rms)], -1)
    true, pred = targets.paths(normed, raw, weight, r)
    K = 1 if density == "mean" else 4
    assert true.shape == (2, 8, K, 3, 2)
    first = disp[:, 0, :2, :2].reshape(2, 4, 3, 2)                           # token 0: the patch at (0, 0) of t = 0
    torch.testing.assert_close(true[:, 0], first if K == 4 else first.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred, true, atol=1e-3, rtol=1e-3)
