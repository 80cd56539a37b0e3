"""The model (mme/model.py): released checkpoint layout, loading, position table, attention, masking,
decoder order, loss, learning, FLOP count. CPU; tiny models on 4 frames x 32 x 32 unless a test is
about ViT-B itself."""
import argparse
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from torch.utils.flop_counter import FlopCounterMode

from mme import model as M
from mme.online.targets import tube_mask

T, S = 4, 32                       # tiny clips: 2 x 2 x 2 = 8 tokens
GRID = (T // 2, S // 16, S // 16)
N = math.prod(GRID)


def released_layout(C=768, depth=12, num_classes=None):
    """The released VideoMAE/MME backbone layout (shared/notes/anchors.md), width C: pre-training
    (final `norm`) when num_classes is None, else fine-tuning (`fc_norm` + `head`)."""
    L = {"patch_embed.proj.weight": (C, 3, 2, 16, 16), "patch_embed.proj.bias": (C,)}
    for i in range(depth):
        b = f"blocks.{i}."
        L.update({
            b + "norm1.weight": (C,), b + "norm1.bias": (C,),
            b + "attn.qkv.weight": (3 * C, C), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "norm2.weight": (C,), b + "norm2.bias": (C,),
            b + "mlp.fc1.weight": (4 * C, C), b + "mlp.fc1.bias": (4 * C,),
            b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,),
        })
    if num_classes is None:
        L.update({"norm.weight": (C,), "norm.bias": (C,)})
    else:
        L.update({"fc_norm.weight": (C,), "fc_norm.bias": (C,), "head.weight": (num_classes, C), "head.bias": (num_classes,)})
    return L


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_sd(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in layout.items()}


def video(B=2, seed=0):
    return torch.randn(B, 3, T, S, S, generator=torch.Generator().manual_seed(seed))


def mask_of(B=2, ratio=0.5, kind="tube", seed=0):
    return tube_mask(np.random.default_rng(seed), B, *GRID, ratio, kind=kind)


# (a) layout ---------------------------------------------------------------------------------------

def test_base_layout_matches_released_checkpoint_exactly():
    enc = M.encoder("base")
    got = shapes(enc)
    # literal shapes copied from anchors.md, so the layout helper above cannot hide a mistake
    assert got["patch_embed.proj.weight"] == (768, 3, 2, 16, 16)
    assert got["blocks.0.attn.qkv.weight"] == (2304, 768)
    assert got["blocks.11.attn.q_bias"] == got["blocks.11.attn.v_bias"] == (768,)
    assert got["blocks.5.mlp.fc1.weight"] == (3072, 768) and got["blocks.5.mlp.fc2.weight"] == (768, 3072)
    assert got["norm.weight"] == (768,)
    assert got == released_layout(768, 12)                                  # every key, nothing else
    assert not any("pos_embed" in k or "cls_token" in k or "qkv.bias" in k for k in got)
    assert "pos_embed" in dict(enc.named_buffers())                         # there, but not saved
    # ViT-B/16 by hand: patch 768*1536 + 768; per block 2*1536 (norms) + 3*768^2 + 2*768 (q/v bias)
    # + 768^2 + 768 (proj) + 2*768*3072 + 3072 + 768 (mlp) = 7,087,104; 12 blocks + final norm 1536
    n = sum(p.numel() for p in enc.parameters())
    assert n == 768 * 1536 + 768 + 12 * 7_087_104 + 1536 == 86_227_200
    assert abs(n - 86e6) / 86e6 < 0.01


@pytest.mark.parametrize("size,C,depth", [("tiny", 192, 12), ("small", 384, 12), ("large", 1024, 24)])
def test_other_sizes_and_classifier_layout(size, C, depth):
    with torch.device("meta"):                                              # shapes only, no memory
        assert shapes(M.encoder(size)) == released_layout(C, depth)
        clf = M.encoder(size, num_classes=174)
        assert shapes(clf) == released_layout(C, depth, 174)
        assert all(blk.attn.heads == C // 64 for blk in clf.blocks)         # head dim 64 at every size


def test_pretrain_model_keys_are_videomae_style():
    pm = M.PretrainModel("tiny", T, S, target_dim=10)
    keys = set(pm.state_dict())
    assert {"encoder." + k for k in released_layout(192, 12)} <= keys
    assert {"encoder_to_decoder.weight", "mask_token", "decoder.norm.weight", "decoder.head.weight",
            "decoder.blocks.0.attn.qkv.weight"} <= keys
    assert "encoder_to_decoder.bias" not in keys and not any("pos_embed" in k for k in keys)
    assert not any(k.startswith("decoder.blocks.1.") for k in keys)         # depth 1 (Table 12)
    assert pm.state_dict()["decoder.head.weight"].shape == (10, 192)


# (b) loading released checkpoints -----------------------------------------------------------------

def test_pretraining_checkpoint_loads_strictly_and_round_trips(tmp_path):
    fake = random_sd(released_layout(192, 12))
    decoder = random_sd({"encoder_to_decoder.weight": (192, 192), "mask_token": (1, 1, 192),
                         "decoder.blocks.0.attn.qkv.weight": (576, 192), "decoder.norm.weight": (192,),
                         "decoder.head.weight": (264, 192), "decoder.head.bias": (264,)}, seed=1)
    ckpt = {"model": {**{"encoder." + k: v for k, v in fake.items()}, **decoder},
            "optimizer": {}, "epoch": 799, "scaler": {},
            "args": argparse.Namespace(model="pretrain_videomae_base_patch16_224", mask_ratio=0.9)}
    torch.save(ckpt, tmp_path / "checkpoint-799.pth")
    enc = M.encoder("tiny", T, S)                                            # table is not saved: any size loads
    skipped = M.load_backbone(enc, tmp_path / "checkpoint-799.pth")          # a path: weights_only read
    assert sorted(skipped) == sorted(decoder)
    out = M.backbone_state_dict(enc)
    assert out.keys() == fake.keys()
    assert all(torch.equal(out[k], fake[k]) for k in fake)                  # norm.* <- encoder.norm.*
    torch.save(out, tmp_path / "ours.pth")
    back = torch.load(tmp_path / "ours.pth", map_location="cpu", weights_only=True)
    enc2 = M.encoder("tiny", T, S)
    assert M.load_backbone(enc2, back) == []
    assert all(torch.equal(v, fake[k]) for k, v in enc2.state_dict().items())
    # the same checkpoint into a PretrainModel's encoder, and into a classifier (norm -> fc_norm, new head)
    pm = M.PretrainModel("tiny", T, S, target_dim=264)
    M.load_backbone(pm, ckpt)
    assert torch.equal(pm.encoder.blocks[3].attn.v_bias, fake["blocks.3.attn.v_bias"])
    clf = M.encoder("tiny", T, S, num_classes=5)
    head = clf.head.weight.clone()
    M.load_backbone(clf, ckpt)
    assert torch.equal(clf.fc_norm.weight, fake["norm.weight"]) and torch.equal(clf.head.weight, head)
    # our own pre-training checkpoint ({'model': PretrainModel.state_dict()}) loads the same way
    enc3 = M.encoder("tiny", T, S)
    M.load_backbone(enc3, {"model": pm.state_dict()})
    assert all(torch.equal(v, pm.encoder.state_dict()[k]) for k, v in enc3.state_dict().items())


def test_finetune_checkpoint_loads_with_head_and_round_trips(tmp_path):
    fake = random_sd(released_layout(192, 12, num_classes=5))
    clf = M.encoder("tiny", T, S, num_classes=5)
    assert M.load_backbone(clf, {"module": fake}) == []                     # deepspeed wrapping
    assert all(torch.equal(v, fake[k]) for k, v in clf.state_dict().items())
    torch.save({"module": M.backbone_state_dict(clf)}, tmp_path / "ft.pth")
    clf2 = M.encoder("tiny", T, S, num_classes=5)
    M.load_backbone(clf2, tmp_path / "ft.pth")
    assert all(torch.equal(v, fake[k]) for k, v in clf2.state_dict().items())
    # another task's head is skipped (ours kept); into a pre-training encoder fc_norm -> norm
    other = M.encoder("tiny", T, S, num_classes=7)
    assert sorted(M.load_backbone(other, {"module": fake})) == ["head.bias", "head.weight"]
    assert other.head.weight.shape == (7, 192) and torch.equal(other.fc_norm.bias, fake["fc_norm.bias"])
    enc = M.encoder("tiny", T, S)
    M.load_backbone(enc, {"model": fake})
    assert torch.equal(enc.norm.weight, fake["fc_norm.weight"])


def test_load_is_strict():
    fake = random_sd(released_layout(192, 12))
    enc = M.encoder("tiny", T, S)
    before = M.backbone_state_dict(enc)
    for broken in ({k: v for k, v in fake.items() if k != "blocks.7.attn.q_bias"},        # missing
                   {**fake, "pos_embed": torch.zeros(1, N, 192)},                         # learned positions
                   {**fake, "blocks.12.norm1.weight": torch.ones(192)},                   # a deeper model
                   {**fake, "fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.ones(192)}):  # two final norms
        with pytest.raises(KeyError):
            M.load_backbone(enc, {"model": broken})
    with pytest.raises((KeyError, ValueError)):
        M.load_backbone(enc, random_sd(released_layout(384, 12)))           # ViT-S into ViT-T
    with pytest.raises(KeyError, match="has 4 blocks, the model 12: set the recipe key depth to 4"):
        M.load_backbone(enc, random_sd(released_layout(192, 4)))            # recipes/learn_tiny.yaml's encoder
    shallow = M.encoder("tiny", T, S, depth=4)
    M.load_backbone(shallow, random_sd(released_layout(192, 4)))
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())    # nothing half-loaded


class NotWeights:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""


def test_checkpoint_is_read_weights_only(tmp_path):
    torch.save({"model": {}, "payload": NotWeights()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        M.load_backbone(M.encoder("tiny", T, S), tmp_path / "evil.pth")


# (c) position table --------------------------------------------------------------------------------

def test_sinusoid_table_by_hand():
    tab = M.sinusoid_table(6, 8)[0]                                         # angle = pos / 10000^(2*floor(j/2)/8)
    hand = {(0, 0): 0.0, (0, 1): 1.0, (3, 0): math.sin(3), (3, 1): math.cos(3),
            (3, 2): math.sin(0.3), (3, 3): math.cos(0.3),                   # 10000^(2/8) = 10
            (5, 4): math.sin(0.05), (5, 5): math.cos(0.05),                 # 10000^(4/8) = 100
            (5, 6): math.sin(0.005), (5, 7): math.cos(0.005)}               # 10000^(6/8) = 1000
    for (p, j), v in hand.items():
        assert tab[p, j].item() == pytest.approx(v, abs=1e-7), (p, j)
    enc = M.encoder("tiny", T, S)
    assert enc.pos_embed.shape == (1, N, 192)
    assert enc.pos_embed[0, 7, 2].item() == pytest.approx(math.sin(7 / 10000 ** (2 / 192)), abs=1e-6)
    assert enc.pos_embed[0, 7, 191].item() == pytest.approx(math.cos(7 / 10000 ** (190 / 192)), abs=1e-6)
    pm = M.PretrainModel("tiny", T, S, target_dim=10)
    assert torch.equal(pm.decoder_pos_embed, M.sinusoid_table(N, 192))
    assert "decoder_pos_embed" not in pm.state_dict() and "encoder.pos_embed" not in pm.state_dict()


def test_positions_are_added():
    enc = M.encoder("tiny", T, S).eval()
    out = enc(torch.ones(1, 3, T, S, S))                                    # every tubelet identical
    assert (out - out[:, :1]).abs().amax() > 1e-3                           # only the position tells tokens apart


# (d) attention -------------------------------------------------------------------------------------

def test_attention_equals_naive_softmax():
    torch.manual_seed(0)
    C, H, d = 12, 3, 4
    attn = M.Attention(C, H)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, 5, C)
    W, qb, vb = attn.qkv.weight, attn.q_bias, attn.v_bias
    q = x @ W[:C].T + qb                                                    # bias = cat(q_bias, 0, v_bias)
    k = x @ W[C:2 * C].T
    v = x @ W[2 * C:].T + vb
    heads = []
    for h in range(H):                                                      # head h: channels h*d .. h*d+d
        s = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), -1)
        heads.append(a @ v[..., s])
    want = torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_block_is_pre_norm_with_exact_gelu():
    torch.manual_seed(0)
    blk = M.Block(12, 3)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_()
    x = torch.randn(2, 5, 12)
    ln = lambda norm, y: F.layer_norm(y, (12,), norm.weight, norm.bias, eps=1e-6)
    y = x + blk.attn(ln(blk.norm1, x))
    mlp = blk.mlp
    want = y + F.linear(F.gelu(F.linear(ln(blk.norm2, y), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(blk(x), want, atol=1e-4, rtol=1e-5)


def test_drop_path_keeps_the_expectation():
    torch.manual_seed(0)
    dp = M.DropPath(0.25).train()
    y = dp(torch.ones(20000, 3, 2))
    assert y.unique().tolist() == [0.0, pytest.approx(4 / 3)]      # dropped, or scaled by 1 / keep
    assert (y[:, 0, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert ((y == 0).all((1, 2)) | (y != 0).all((1, 2))).all()             # one draw per sample
    assert torch.equal(dp.eval()(torch.ones(4, 2)), torch.ones(4, 2))


def test_initialisation_as_mae():
    torch.manual_seed(0)
    pm = M.PretrainModel("small", T, S, target_dim=264)
    enc = pm.encoder

    def xavier(w, fan_in, fan_out):                                         # U(-a, a), a = sqrt(6 / (in + out))
        a = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= a and w.std().item() == pytest.approx(a / math.sqrt(3), rel=0.05)

    xavier(enc.blocks[0].attn.qkv.weight, 384, 1152)
    xavier(enc.blocks[11].mlp.fc2.weight, 1536, 384)
    xavier(enc.patch_embed.proj.weight, 3 * 2 * 16 * 16, 384)               # as a Linear on flattened tubelets
    xavier(pm.encoder_to_decoder.weight, 384, 192)
    xavier(pm.decoder.head.weight, 192, 264)
    for name, p in pm.named_parameters():
        if name.endswith("bias"):                                           # incl. q_bias, v_bias, LayerNorm
            assert (p == 0).all(), name
        elif "norm" in name:
            assert (p == 1).all(), name
    assert pm.mask_token.std().item() == pytest.approx(0.02, rel=0.2) and pm.mask_token.abs().max() < 0.1
    clf = M.encoder("tiny", T, S, num_classes=400)
    assert clf.head.weight.std().item() == pytest.approx(2e-5, rel=0.1)    # MAE/VideoMAE fine-tuning head


# (e) the encoder drops masked tokens ---------------------------------------------------------------

def test_encoder_sees_only_visible_tokens():
    enc = M.encoder("tiny", T, S).eval()
    x, mask = video(), mask_of()                                            # 2 of 4 patches masked per t
    seen = []
    enc.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = enc(x, mask)
    assert out.shape == (2, N // 2, 192) and seen == [(2, N // 2, 192)]
    assert enc(x).shape == (2, N, 192)
    pix = repeat(mask.view(2, *GRID), "b t h w -> b 1 (t p0) (h p1) (w p2)", p0=2, p1=16, p2=16)
    noisy = torch.where(pix, torch.randn_like(x) * 5, x)                    # new content in masked tubelets
    assert not torch.equal(noisy, x)
    torch.testing.assert_close(enc(noisy, mask), out, atol=1e-6, rtol=0)
    poked = x.clone()
    poked[~pix.expand_as(x)] += 1.0                                         # visible pixels do matter
    assert (enc(poked, mask) - out).abs().amax() > 1e-2


def assert_visible_embeds_as_forward(pe, x, mask):
    """pe.visible(x, mask) gives the tokens, and the gradients for pe's weights, of embedding every tubelet
    with forward() and gathering the visible ones."""
    fast = pe.visible(x, mask)
    fast.square().sum().backward()
    grads = [p.grad.clone() for p in pe.parameters()]
    pe.zero_grad()
    ref = M._visible(pe(x), mask)
    ref.square().sum().backward()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, pe.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)
    assert fast.shape == (x.shape[0], int((~mask[0]).sum()), pe.proj.out_channels)


def test_visible_tubelets_embed_as_the_conv_does():
    """The encoder embeds the visible tubelets alone (a Linear with the Conv3d's weights): the same
    tokens, and the same gradients for the conv's weights, as embedding every tubelet with the conv
    and gathering the visible ones."""
    torch.manual_seed(0)
    x, mask = video(), mask_of()
    x = x + torch.linspace(0, 1, x.shape[2])[None, None, :, None, None]      # frames differ: tubelet order matters
    assert_visible_embeds_as_forward(M.PatchEmbed(32), x, mask)


def test_conv_stem_embeds_each_tubelet_on_its_own():
    """patch_embed conv: a CNN inside each tubelet. The visible tubelets embedded alone give forward()'s tokens and
    gradients; a tubelet's token depends on its own 2 x 16 x 16 pixels only, and on both frames (the point of it:
    a temporal change times a spatial one)."""
    torch.manual_seed(0)
    pe = M.PatchEmbed(32, "conv")
    x, mask = video(), mask_of()
    assert_visible_embeds_as_forward(pe, x, mask)
    tokens = pe(x)                                                           # [2, N, 32], (t, h, w) order
    poked = x.clone()
    poked[0, :, 1, 20, 5] += 3.0                                             # frame 1 (tubelet 0, its 2nd frame), row 1, col 0
    moved = (pe(poked) - tokens).abs().amax(-1)                              # [2, N]
    hit = 0 * GRID[1] * GRID[2] + 1 * GRID[2] + 0
    assert moved[0, hit] > 1e-4 and float(moved.sum() - moved[0, hit]) == 0.0
    enc = M.encoder("tiny", T, S, depth=2, patch_embed="conv")
    assert sorted(k for k in enc.state_dict() if k.startswith("patch_embed.")) == [
        "patch_embed.proj.bias", "patch_embed.proj.weight"] + [f"patch_embed.stem.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight")]
    with pytest.raises(ValueError, match="unknown patch_embed 'cnn'"):
        M.PatchEmbed(32, "cnn")


def test_conv_diff_stem_is_the_conv_stem_on_the_mean_frame_and_the_frame_difference():
    """patch_embed conv_diff: the conv stem fed (f0 + f1) / 2 and f1 - f0 instead of f0 and f1, i.e. a conv stem whose
    first weights on (f0, f1) are (Wm / 2 - Wd, Wm / 2 + Wd). Its checkpoints say which stem they are."""
    torch.manual_seed(0)
    diff, conv = M.PatchEmbed(32, "conv_diff"), M.PatchEmbed(32, "conv")
    sd = {k: v.clone() for k, v in diff.state_dict().items() if k != "frame_mix"}
    w = sd["stem.0.weight"].view(16, 3, 2, 3, 3)                             # channels (c, t) as flatten(1, 2) makes them
    wm, wd = w[:, :, 0], w[:, :, 1]
    sd["stem.0.weight"] = torch.stack((wm / 2 - wd, wm / 2 + wd), 2).flatten(1, 2)
    conv.load_state_dict(sd)
    x, mask = video(), mask_of()
    torch.testing.assert_close(diff(x), conv(x), atol=1e-5, rtol=1e-4)
    plain = M.PatchEmbed(32, "conv")                                        # the same weights on the two frames as they are
    plain.load_state_dict({k: v for k, v in diff.state_dict().items() if k != "frame_mix"})
    assert not torch.allclose(plain(x), diff(x), atol=1e-3)
    assert_visible_embeds_as_forward(diff, x, mask)
    a, b = (M.encoder("tiny", T, S, depth=2, patch_embed=k) for k in ("conv_diff", "conv"))
    with pytest.raises(KeyError, match="a conv_diff patch embedding, the model a conv one"):
        M.load_backbone(b, a.state_dict())
    with pytest.raises(KeyError, match="a conv patch embedding, the model a conv_diff one"):
        M.load_backbone(a, b.state_dict())


def test_linear_plus_conv_diff_stem_is_the_sum_of_the_two_embeddings():
    """patch_embed linear+conv_diff: the linear embedding (VideoMAE's Conv3d, key proj) plus the conv_diff one (its
    projection under conv_proj), each with its own weights; its FLOPs are the two paths'. Its checkpoints say which
    stem they are."""
    torch.manual_seed(0)
    both, linear, diff = M.PatchEmbed(32, "linear+conv_diff"), M.PatchEmbed(32), M.PatchEmbed(32, "conv_diff")
    sd = both.state_dict()
    linear.load_state_dict({k: sd[k] for k in ("proj.weight", "proj.bias")})
    diff.load_state_dict({k.replace("conv_proj", "proj"): v for k, v in sd.items() if k.startswith(("stem.", "conv_proj.", "frame_mix"))})
    x, mask = video(), mask_of()
    torch.testing.assert_close(both(x), linear(x) + diff(x), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both(x), diff(x), atol=1e-3) and not torch.allclose(both(x), linear(x), atol=1e-3)
    assert both.flops() == linear.flops() + diff.flops()
    assert_visible_embeds_as_forward(both, x, mask)
    a, b = (M.encoder("tiny", T, S, depth=2, patch_embed=k) for k in ("linear+conv_diff", "conv_diff"))
    assert M.load_backbone(M.encoder("tiny", T, S, depth=2, patch_embed="linear+conv_diff"), a.state_dict()) == []
    with pytest.raises(KeyError, match="a linear\\+conv_diff patch embedding, the model a conv_diff one"):
        M.load_backbone(b, a.state_dict())
    with pytest.raises(KeyError, match="set the recipe key patch_embed to conv_diff"):
        M.load_backbone(a, b.state_dict())


def test_normal_flow_has_the_sign_of_the_motion_and_the_grad_stem_adds_it_to_linear_plus_conv_diff():
    """patch_embed linear+conv_grad: linear+conv_diff whose CNN also sees the normal flow. On a smooth texture moved by
    one pixel its sums have the sign of u and v (brightness constancy); with those two input channels' weights at zero
    the stem is linear+conv_diff. Its checkpoints say which stem they are."""
    g = torch.Generator().manual_seed(0)
    tex = F.avg_pool2d(torch.rand(1, 3, 40, 40, generator=g), 5, 1, 2)[0]       # smooth, so one pixel is a small step
    for (dy, dx), (su, sv) in {(0, 1): (1, 0), (0, -1): (-1, 0), (1, 0): (0, 1), (-1, 0): (0, -1)}.items():
        f0, f1 = tex[:, 12:28, 12:28], torch.roll(tex, (dy, dx), (1, 2))[:, 12:28, 12:28]
        mixed = torch.stack(((f0 + f1) / 2, f1 - f0), 1)[None]                  # [1, 3, 2, 16, 16]
        u, v = M.normal_flow(mixed)[0].mean((1, 2))
        for value, sign in ((u, su), (v, sv)):
            assert (sign == 0 and abs(value) < 0.2 * abs(u + v)) or value * sign > 0, ((dy, dx), u, v)
    torch.manual_seed(0)
    grad, diff = M.PatchEmbed(32, "linear+conv_grad"), M.PatchEmbed(32, "linear+conv_diff")
    sd = {k: v.clone() for k, v in grad.state_dict().items()}
    assert sd["stem.0.weight"].shape[1] == 8
    sd["stem.0.weight"][:, 6:] = 0
    grad.load_state_dict(sd)
    diff.load_state_dict({**sd, "stem.0.weight": sd["stem.0.weight"][:, :6]})
    x, mask = video(), mask_of()
    torch.testing.assert_close(grad(x), diff(x), atol=1e-5, rtol=1e-4)
    assert_visible_embeds_as_forward(grad, x, mask)
    a, b = (M.encoder("tiny", T, S, depth=2, patch_embed=k) for k in ("linear+conv_grad", "linear+conv_diff"))
    assert M.load_backbone(M.encoder("tiny", T, S, depth=2, patch_embed="linear+conv_grad"), a.state_dict()) == []
    with pytest.raises(KeyError, match="a linear\\+conv_grad patch embedding, the model a linear\\+conv_diff one"):
        M.load_backbone(b, a.state_dict())


def test_a_checkpoint_names_its_patch_embedding():
    """Weights of one patch embedding into a model of the other: one line naming the recipe key to set."""
    linear, conv = M.encoder("tiny", T, S, depth=2), M.encoder("tiny", T, S, depth=2, patch_embed="conv")
    with pytest.raises(KeyError, match="a conv patch embedding, the model a linear one: set the recipe key patch_embed to conv"):
        M.load_backbone(linear, conv.state_dict())
    with pytest.raises(KeyError, match="set the recipe key patch_embed to linear"):
        M.load_backbone(conv, linear.state_dict())
    again = M.encoder("tiny", T, S, depth=2, patch_embed="conv")
    M.load_backbone(again, M.backbone_state_dict(conv))
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in again.state_dict().items())


def test_mask_count_must_agree():
    mask = mask_of()
    mask[0, (~mask[0]).nonzero()[0]] = True                                 # sample 0 masks one more
    with pytest.raises(ValueError):
        M.encoder("tiny", T, S)(video(), mask)
    with pytest.raises(ValueError):
        M.encoder("tiny", T, S)(torch.randn(1, 3, T, 48, 48))               # not the size it was built for


def test_classifier_mean_pools():
    clf = M.encoder("tiny", T, S, num_classes=3).eval()
    with torch.no_grad():
        clf.head.weight.normal_()
    x = video()
    feats = clf.forward_features(x)
    assert feats.shape == (2, N, 192)
    torch.testing.assert_close(clf(x), clf.head(clf.fc_norm(feats.mean(1))))


def test_attentive_classifier_knows_where_each_token_is(tmp_path):
    """pool: attentive: fc_norm per token, then the AttentiveHead; the pre-training's final norm becomes fc_norm.
    Moving features between tokens changes its output (it reads where each is); the mean head's does not."""
    pre = M.encoder("tiny", T, S)
    with torch.no_grad():
        pre.norm.weight.uniform_(0.5, 1.5)
    torch.save(M.backbone_state_dict(pre), tmp_path / "encoder.pth")
    clf = M.encoder("tiny", T, S, num_classes=3, pool="attentive").eval()
    assert M.load_weights(clf, tmp_path / "encoder.pth") == [] and torch.equal(clf.fc_norm.weight, pre.norm.weight)
    assert {k for k in clf.state_dict() if k.startswith("head.")} >= {"head.query", "head.kv.weight", "head.head.weight"}
    assert "head.position" not in clf.state_dict() and clf.head.position.shape == (1, N, M.POSITION)   # fixed code
    with torch.no_grad():
        clf.head.head.weight.normal_()
        feats = clf.forward_features(video())
        swapped = feats[:, torch.randperm(N, generator=torch.Generator().manual_seed(0))]
        out = clf.head(clf.fc_norm(feats))
        torch.testing.assert_close(clf(video()), out)
        assert (clf.head(clf.fc_norm(swapped)) - out).abs().max() > 1e-3 * out.abs().max()
        mean = M.encoder("tiny", T, S, num_classes=3).eval()
        torch.testing.assert_close(mean.head(mean.fc_norm(swapped.mean(1))), mean.head(mean.fc_norm(feats.mean(1))))
    torch.save({"model": clf.state_dict()}, tmp_path / "model.pth")      # a head for the other pool: one line
    with pytest.raises(M.WeightsError, match="its head is for pool: attentive"):
        M.load_weights(M.encoder("tiny", T, S, num_classes=3), tmp_path / "model.pth", need_head=True)
    again = M.encoder("tiny", T, S, num_classes=3, pool="attentive").eval()
    M.load_weights(again, tmp_path / "model.pth", need_head=True)
    torch.testing.assert_close(again(video()), clf(video()))


def test_drop_path_only_in_training():
    enc = M.encoder("tiny", T, S, drop_path=0.5)
    assert enc.blocks[0].drop_path.p == 0.0 and enc.blocks[-1].drop_path.p == 0.5
    x = video()
    enc.eval()
    assert torch.equal(enc(x), enc(x))
    enc.train()
    torch.manual_seed(0)
    a = enc(x)
    assert not torch.equal(a, enc(x))                                       # random depth per sample


# (f) decoder: shape and order ----------------------------------------------------------------------

def test_pred_order_is_target_mask_order():
    """Make the decoder copy its input's position: blocks are identities (their output projections
    zeroed), the encoder's contribution and the mask token are 0, the head is the identity. Then the
    prediction for a masked token is LayerNorm(decoder position of that token)."""
    pm = M.PretrainModel("tiny", T, S, target_dim=192).eval()
    with torch.no_grad():
        for blk in pm.decoder.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_(), lin.bias.zero_()
        pm.encoder_to_decoder.weight.zero_()
        pm.mask_token.zero_()
        pm.decoder.head.weight.copy_(torch.eye(192))
        pm.decoder.head.bias.zero_()
    mask = mask_of(3, 0.5, kind="random", seed=1)                           # a different mask per sample
    pred = pm(video(3), mask)
    assert pred.shape == (3, N // 2, 192)
    target = F.layer_norm(M.sinusoid_table(N, 192), (192,), eps=1e-6).expand(3, -1, -1)   # token n's signal
    torch.testing.assert_close(pred, target[mask].reshape(3, -1, 192), atol=1e-5, rtol=1e-5)
    assert pm.loss(pred, target, mask).item() < 1e-9


def test_zero_weight_token_gets_no_gradient():
    pm = M.PretrainModel("tiny", T, S, target_dim=6)
    mask = mask_of(2, 0.5, kind="random", seed=2)
    pred = pm(video(), mask)
    assert pred.shape == (2, N // 2, 6)
    pred.retain_grad()
    weight = torch.ones(2, N)
    n = int(mask[1].nonzero()[2])                                           # sample 1's third masked token
    weight[1, n] = 0
    pm.loss(pred, torch.randn(2, N, 6), mask, weight).backward()
    g = pred.grad.abs().sum(-1)                                             # [2, N_masked]
    assert g[1, 2] == 0
    assert (g[0] > 0).all() and (g[1, [0, 1, 3]] > 0).all()


# (g) loss --------------------------------------------------------------------------------------------

def test_loss_by_hand():
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    target = torch.tensor([[[1., 2], [9, 9], [3, 4], [5, 6]], torch.zeros(4, 2).tolist()])
    pred = torch.tensor([[[1., 0], [3, 7], [0, 6]], [[1., 1], [1, 1], [1, 1]]], requires_grad=True)
    # sample 0's masked tokens 0, 2, 3: mean over D of squared error = 4/2, 9/2, 25/2 = 2, 4.5, 12.5
    # sample 1's masked tokens 1, 2, 3: 1 each
    weight = torch.tensor([[1., 7, 0, 1], [5., 1, 1, 1]])                  # the 7 and 5 sit on visible tokens
    assert M.mme_loss(pred, target, mask, weight).item() == pytest.approx((2 + 0 + 12.5 + 3) / (2 + 3))
    assert M.mme_loss(pred, target, mask).item() == pytest.approx((2 + 4.5 + 12.5 + 3) / 6)
    zero = M.mme_loss(pred, target, mask, torch.zeros(2, 4))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()
    assert M.mme_loss(pred.bfloat16(), target, mask).dtype == torch.float32
    with pytest.raises(ValueError):
        M.mme_loss(pred[:, :2], target, mask)


def test_loss_balanced_parts_and_visible_tokens_by_hand():
    mask = torch.tensor([[True, False, True]])                              # token 1 visible
    target = torch.tensor([[[2., 0, 0], [0, 1, 1], [4, 2, -2]]])            # parts: width 1, width 2
    # part rms over the batch: sqrt((4 + 0 + 16) / 3) = sqrt(20/3) and sqrt((0 + 1 + 4) / 3) = sqrt(5/3)
    a, b = (20 / 3) ** 0.5, (5 / 3) ** 0.5
    assert [r.item() for r in M.part_rms(target, torch.ones(1, 3), (1, 2))] == pytest.approx([a, b])
    pred = torch.tensor([[[0., 0, 0], [2 / a, 0, 0], [4 / a, 0, 0]]])       # every token: visible 1, masked 0, 2
    # in part units: token 0 errors (0, 0) -> 0; token 2 (0, 4/b^2) -> 2/b^2 = 1.2; masked mean 0.6;
    # visible token 1 (0, 1/b^2) -> 0.3
    assert M.mme_loss(pred, target, mask, widths=(1, 2), visible=2.0).item() == pytest.approx(0.6 + 2 * 0.3)
    assert M.mme_loss(pred[:, 1:], target, mask, widths=(1, 2)).item() == pytest.approx(0.6)
    # unbalanced, raw units: masked (((2 - 2/a)^2) / 3 + ((4 - 4/a)^2 + 8) / 3) / 2, visible 2/3
    masked = ((2 - 2 / a) ** 2 / 3 + ((4 - 4 / a) ** 2 + 8) / 3) / 2
    assert M.mme_loss(pred, target, mask, visible=1.0).item() == pytest.approx(masked + 2 / 3)
    with pytest.raises(ValueError, match="every token"):
        M.mme_loss(pred[:, 1:], target, mask, visible=1.0)                  # masked-only predictions
    net = M.PretrainModel("tiny", 4, 32, target_dim=3, decoder_embed_dim=32, decoder_num_heads=2)
    video, m = torch.randn(2, 3, 4, 32, 32), torch.tensor([[True, False, True, False] * 2] * 2)
    every = net(video, m, every_token=True)                                 # [B, N, D]: visible, then masked
    assert every.shape == (2, 8, 3)
    assert torch.allclose(every[:, 4:], net(video, m), atol=1e-5)


def test_loss_balanced_per_clip_by_hand():
    """balance_per_clip: each clip's parts over that clip's own rms (weighted tokens only), floored at a tenth of
    the batch's, so a slow clip's errors count as much as a fast one's."""
    target = torch.tensor([[[3., 1], [0, 1], [9, 5]],                      # clip 0: part 0 fast
                           [[0.3, 1], [0, 1], [0, 1]],                     # clip 1: part 0 slow
                           [[1e-4, 2], [0, 2], [0, 2]]])                   # clip 2: part 0 static
    weight = torch.tensor([[1., 1, 0], [1, 1, 1], [1, 1, 1]])              # clip 0's token 2 out of the frame
    rms0, rms1 = M.part_rms(target, weight, (1, 1), per_clip=True)
    batch = ((9 + 0.09 + 1e-8) / 8) ** 0.5                                  # part 0 over the 8 weighted tokens
    assert rms0.shape == (3, 1, 1)
    assert rms0.flatten().tolist() == pytest.approx([(9 / 2) ** 0.5, (0.09 / 3) ** 0.5, 0.1 * batch])
    assert rms1.flatten().tolist() == pytest.approx([1, 1, 2])
    mask = torch.tensor([[True, True, False]] * 3)
    pred = torch.zeros(3, 2, 2)                                             # predicts 0 everywhere
    # in each clip's units, part 0's squared error over the masked, weighted tokens: clip 0 (9 + 0) / 4.5 = 2 over 2
    # tokens, clip 1 (0.09 + 0) / 0.03 = 3 over 2, clip 2 ~0; part 1 is 1 for every token
    want = ((9 / 4.5 + 0.09 / 0.03 + (1e-8 / (0.1 * batch) ** 2)) / 6 + 1) / 2
    assert M.mme_loss(pred, target, mask, weight, widths=(1, 1), per_clip=True).item() == pytest.approx(want)
    per_batch = M.mme_loss(pred, target, mask, weight, widths=(1, 1)).item()
    part1_ms = (1 + 1 + 1 + 1 + 1 + 4 + 4 + 4) / 8                          # part 1's mean square over the batch
    assert per_batch == pytest.approx(((9 + 0.09 + 1e-8) / batch ** 2 / 6 + (1 + 1 + 1 + 1 + 4 + 4) / part1_ms / 6) / 2)


# (h) learning --------------------------------------------------------------------------------------

def test_a_tiny_model_can_fit_a_batch():
    torch.manual_seed(0)
    pm = M.PretrainModel("tiny", T, S, target_dim=16)
    x, mask = video(), mask_of()
    target = torch.randn(2, N, 16)
    opt = torch.optim.Adam(pm.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = pm.loss(pm(x, mask), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pm.encoder.patch_embed.proj.weight.grad.abs().sum() > 0         # the encoder learns too
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_autocast():
    pm = M.PretrainModel("tiny", T, S, target_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = pm(video(), mask_of())
        loss = pm.loss(pred, torch.randn(2, N, 8), mask_of())
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


# (i) FLOPs -----------------------------------------------------------------------------------------

def test_flops_vit_b_by_hand():
    """ViT-B, 16 x 224: N = 8 * 14 * 14 = 1568 tokens, C = 768, 12 blocks; decoder 192 wide, 1 block,
    D = 264. Tube masking masks round(ratio * 196) patches per time step:
      0.9: 176 -> N_v = 8 * 20 = 160, N_m = 1408;   0.7: 137 -> N_v = 8 * 59 = 472, N_m = 1096.
    FLOPs = 2 * N_v * 1536 * C                        patch embedding (visible tokens)
          + 12 * (24 * N_v * C^2 + 4 * N_v^2 * C)     encoder blocks on visible tokens
          + 2 * N_v * C * 192                         encoder_to_decoder
          + 24 * N * 192^2 + 4 * N^2 * 192            decoder block on all tokens
          + 2 * N_m * 192 * 264                       head on masked tokens"""
    with torch.device("meta"):
        pm = M.PretrainModel("base", 16, 224, target_dim=264)
        clf = M.encoder("base", 16, 224, num_classes=174)

    def hand(Nv, Nm, n=1568, C=768):
        return (2 * Nv * 1536 * C + 12 * (24 * Nv * C ** 2 + 4 * Nv ** 2 * C) + 2 * Nv * C * 192
                + 24 * n * 192 ** 2 + 4 * n ** 2 * 192 + 2 * Nm * 192 * 264)

    assert M.flops_per_clip(pm, 16, 224, 0.9) == hand(160, 1408) == 31_965_708_288
    assert M.flops_per_clip(pm, 16, 224, 0.7) == hand(472, 1096) == 93_030_408_192
    # against published counts (fvcore: 1 multiply-add = 1 "FLOP", so ours / 2):
    # VideoMAE ViT-B 16x224 classifier, no masking: 180 G; the MME paper's Table 12, joint 1-block
    # decoder at 70% masking: 51 G (its exact decoder/heads differ slightly from ours)
    assert M.flops_per_clip(clf, 16, 224, 0.0) / 2e9 == pytest.approx(180, rel=0.01)
    assert M.flops_per_clip(pm, 16, 224, 0.7) / 2e9 == pytest.approx(51, rel=0.10)


def test_flops_match_a_counter(monkeypatch):
    """The analytic count equals torch's FLOP counter on a real forward (attention written as
    matmuls so the counter sees it; CPU SDPA is not counted)."""
    def naive(q, k, v, scale=None, **kw):
        return torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive)
    pm = M.PretrainModel("tiny", 4, 64, target_dim=10)
    mask = tube_mask(np.random.default_rng(0), 1, 2, 4, 4, 0.75)
    with FlopCounterMode(display=False) as fc:
        pm(torch.randn(1, 3, 4, 64, 64), mask)
    assert M.flops_per_clip(pm, 4, 64, 0.75) == fc.get_total_flops()
    clf = M.encoder("tiny", 4, 64, num_classes=7)
    with FlopCounterMode(display=False) as fc:
        clf(torch.randn(1, 3, 4, 64, 64))
    assert M.flops_per_clip(clf, 4, 64) == fc.get_total_flops()
    conv = M.PretrainModel("tiny", 4, 64, target_dim=10, patch_embed="conv")
    with FlopCounterMode(display=False) as fc:
        conv(torch.randn(1, 3, 4, 64, 64), mask)
    assert M.flops_per_clip(conv, 4, 64, 0.75) == fc.get_total_flops()
    assert M.flops_per_clip(conv, 4, 64, 0.75) > M.flops_per_clip(pm, 4, 64, 0.75)
