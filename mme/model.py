"""The model: a video ViT encoder, the MME pre-training model (MAE-style), checkpoint helpers, a FLOP count.

What this module owns (paper §3, Table 12, Appendix D; VideoMAE's backbone, whose released
checkpoint layout we keep exactly so released VideoMAE/MME weights load and ours export):

    enc = encoder("base", num_frames=16, img_size=224)        # pre-training encoder: ... + norm.*
    feats = enc(video, mask)          # video [B, 3, T, S, S], mask bool [B, N] (True = masked) -> [B, N_visible, C]
    clf = encoder("base", num_classes=174, drop_path=0.1)     # classifier: ... + fc_norm.* + head.*
    logits = clf(video)               # [B, 174]: mean of the tokens -> fc_norm -> head
    clf = encoder("base", num_classes=174, pool="attentive")  # ours: fc_norm per token -> AttentiveHead (head.*)
    add_probe_norm(clf); sd = fold_probe_norm(clf.state_dict())   # linear probe: BatchNorm before the head, folded away

    model = PretrainModel("base", 16, 224, target_dim=264)    # encoder + 1-block decoder (Table 12)
    pred = model(video, mask)         # [B, N_masked, target_dim], the masked tokens in increasing index
    pred = model.decode(model.encoder(video, mask), mask)     # the same, from given encoder features
    loss = model.loss(pred, target, mask, weight)             # eq. 1 with the loss mask of eq. 7
    pred = model(video, mask, every_token=True)               # [B, N, target_dim]: visible, then masked
    loss = model.loss(pred, target, mask, weight, widths=(48, 216), visible=1.0)   # parts balanced, + visible tokens

    skipped = load_backbone(enc, "videomae_pretrain.pth")      # released or ours, any wrapping, strict
    sd = backbone_state_dict(model)                            # ours, in the released layout
    flops = flops_per_clip(model, 16, 224, mask_ratio=0.7)     # analytic forward FLOPs, for MFU

Tokens. A token is a tubelet of 2 frames x 16 x 16 pixels, embedded by a Conv3d with stride = kernel;
tokens are ordered (t, h, w), N = T/2 * (S/16)^2 (as mme/online/targets.py). Positions are VideoMAE's fixed
1-D sinusoid table over that flattened order (no learned position, no cls token), so it is a
non-persistent buffer and never appears in a state_dict.

Masking (§3, "follow MAE to only feed the unmasked patches"): the encoder embeds the visible tubelets
only (the Conv3d's weights as a Linear on them: the same numbers, a tenth of the work at ratio 0.9;
every sample of a batch must mask the same count, as mme.online.targets.tube_mask guarantees) and runs its
blocks on them only. The decoder gets the projected visible features followed by one mask token per
masked token, each with its decoder position, and predicts the masked tokens only.

Sizes (width, depth, heads): tiny 192/12/3, small 384/12/6, base 768/12/12, large 1024/24/16;
mlp ratio 4, LayerNorm eps 1e-6, qkv bias = cat(q_bias, 0, v_bias) as BEiT/VideoMAE.

No dtype or device is assumed: the model runs under bf16/fp16 autocast and on any device; the loss
is computed in float32.
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

PATCH, TUBELET = 16, 2
SIZES = {  # name: (width C, depth, heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
EPS = 1e-6  # LayerNorm eps, as VideoMAE


def sinusoid_table(n, dim):
    """Fixed 1-D sinusoid position table [1, n, dim] (VideoMAE's get_sinusoid_encoding_table):
    angle(pos, j) = pos / 10000^(2 * floor(j / 2) / dim); sin on even j, cos on odd j. float32."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]                      # [n, 1]
    j = torch.arange(dim, dtype=torch.float64)[None, :]                      # [1, dim]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)   # [n, dim]
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]                                               # [1, n, dim]


# --- building blocks ---------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p (train only)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):                                                    # x [B, ...]
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        m = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)   # [B, 1, 1]
        return x * m / keep


class Attention(nn.Module):
    """Multi-head self-attention; qkv Linear without bias plus learnable q_bias and v_bias (the key
    bias is fixed at zero: it would only add a per-query constant to the logits)."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                    # x [B, N, C]
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])   # [3C]
        qkv = F.linear(x, self.qkv.weight, bias)                             # [B, N, 3C]
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)   # [B, h, N, d] each
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)        # softmax(q k^T * d^-0.5) v
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))               # [B, N, C]


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):                                                    # [B, N, C] -> [B, N, C]
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); drop path on both."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):                                                    # [B, N, C] -> [B, N, C]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def normal_flow(tubes, eps=1e-2):                                          # [n, 3, 2 (mean, change), h, w] -> [n, 2, h, w]
    """The normal flow of the grey mean frame and change: -It * (Ix, Iy) / (|grad I|^2 + eps), the motion across each
    edge that brightness constancy (It = -Ix u - Iy v) gives, in pixels per frame step; eps (in normalised grey units,
    where |grad I| is ~0.03 at the median) keeps flat regions at ~0."""
    grey, change = tubes[:, :, 0].mean(1, keepdim=True), tubes[:, :, 1].mean(1, keepdim=True)     # [n, 1, h, w]
    pad = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    ix = (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2]) / 2                      # central differences
    iy = (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1]) / 2
    return -change * torch.cat([ix, iy], 1) / (ix * ix + iy * iy + eps)


class PatchEmbed(nn.Module):
    """Tubelets of 2 x 16 x 16 pixels -> tokens, each tubelet on its own (so masked ones are never computed).

    stem "linear" (the paper's, VideoMAE's): one Conv3d with stride = kernel, i.e. a Linear on each tubelet.
    stem "conv" (ours, not in the paper): a small CNN inside each tubelet (the two frames stacked as 6
    channels through a 3x3 conv, then 3x3 stride-2 convs 16 -> 8 -> 4 px, GELUs between) before the same
    kind of projection. Motion is a product of a temporal and a spatial change (It = -Ix u - Iy v), which
    one Linear of the whole tubelet cannot form. Measured (docs/results.md, Learning depth): on the built-in
    clips both stems learn motion; on motion data with real-frame textures and small objects only the conv
    stem does. It costs 1.3-1.6x the step of the tiny recipes.
    stem "conv_diff": the same CNN fed the tubelet's mean frame and its change (f1 - f0) instead of the two
    frames; the same functions, reached by another path (AdamW is not invariant to the input's basis).
    It left the no-motion loss plateau on every seed tried, where conv did on 7 of 9.
    stem "linear+conv_diff" (recipes/conv_tiny.yaml's): the linear and the conv_diff embeddings summed. The CNN
    learns motion on real-frame textures where the linear stem learns none; with the CNN alone the attentive
    probe lost the built-in clips' time order, with the linear path beside it reads it (docs/results.md).
    stem "linear+conv_grad" (recipes/quick_tiny.yaml's): linear+conv_diff whose CNN also sees the tubelet's normal
    flow (normal_flow: 2 planes more, computed, not learnt). A CNN must otherwise discover motion as a product of
    It and the spatial gradient, from inputs where that product is ~25x smaller than the frames: supervised on each
    token's own motion on the first held-out set it reaches R^2 0.19 after 250 steps, where linear+conv_diff is
    still at 0 after 500.
    state_dict: patch_embed.stem.{0,2,4}, patch_embed.proj (Conv2d); conv_diff also patch_embed.frame_mix [2, 2];
    linear+conv_diff: patch_embed.proj (the linear Conv3d), .stem.{0,2,4}, .conv_proj (Conv2d), .frame_mix;
    linear+conv_grad: the same keys, stem.0 taking 8 planes instead of 6."""

    WIDTHS = (16, 32, 64)                                                    # conv stem channels at 16, 8, 4 px
    KINDS = ("linear", "conv", "conv_diff", "linear+conv_diff", "linear+conv_grad")

    def __init__(self, dim, stem="linear"):
        super().__init__()
        if stem not in self.KINDS:
            raise ValueError(f"unknown patch_embed {stem!r}; choose one of {', '.join(self.KINDS)}")
        self.kind = stem
        self.linear_path, self.conv_path = stem.startswith("linear"), stem != "linear"   # which paths are summed
        if self.linear_path:                                                 # VideoMAE's: a Linear on each tubelet
            self.proj = nn.Conv3d(3, dim, kernel_size=(TUBELET, PATCH, PATCH), stride=(TUBELET, PATCH, PATCH))
        if self.conv_path:                                                   # Conv2d: CPU Conv3d is ~20x slower here
            c1, c2, c3 = self.WIDTHS
            self.grad_inputs = stem.endswith("conv_grad")                    # + the normal flow (grey): 2 more channels
            self.diff_inputs = self.grad_inputs or stem.endswith("conv_diff")
            if self.diff_inputs:                                             # the stem sees the tubelet's mean frame and
                self.register_buffer("frame_mix", torch.tensor([[0.5, 0.5], [-1.0, 1.0]]))   # its change It, not 2 frames
            self.stem = nn.Sequential(
                nn.Conv2d(3 * TUBELET + 2 * self.grad_inputs, c1, 3, padding=1), nn.GELU(),   # [n, c1, 16, 16]
                nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),        # [n, c2, 8, 8]
                nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU())        # [n, c3, 4, 4]
            conv_proj = nn.Conv2d(c3, dim, PATCH // 4)                       # [n, C, 1, 1]
            if self.linear_path:
                self.conv_proj = conv_proj                                   # summed with the linear path's proj
            else:
                self.proj = conv_proj

    def forward(self, video):                                                # [B, 3, T, H, W]
        if self.kind == "linear":
            x = self.proj(video)                                             # [B, C, T/2, H/16, W/16]
            return rearrange(x, "b c t h w -> b (t h w) c")                  # [B, N, C], (t, h, w) order
        tubes = rearrange(video, "b c (t pt) (h ph) (w pw) -> b t h w c pt ph pw", pt=TUBELET, ph=PATCH, pw=PATCH)
        return self.embed(tubes.flatten(0, 3)).reshape(video.shape[0], -1, self.proj.out_channels)   # [B, N, C]

    def flops(self):
        """Forward FLOPs of one tubelet's embedding (a multiply-add counts 2)."""
        total = 2 * self.proj.weight.numel() if self.linear_path else 0
        if not self.conv_path:
            return total
        side = PATCH
        for conv in [m for m in self.stem if isinstance(m, nn.Conv2d)] + [self.conv_path_proj()]:
            side = (side + 2 * conv.padding[-1] - conv.kernel_size[-1]) // conv.stride[-1] + 1
            total += 2 * conv.weight.numel() * side * side
        return total

    def conv_path_proj(self):
        """The conv path's last layer: proj when it is the only path, conv_proj beside the linear one."""
        return self.conv_proj if self.linear_path else self.proj

    def embed(self, tubes):                                                  # [n, 3, 2, 16, 16] -> [n, C]
        out = 0
        if self.linear_path:
            out = F.linear(tubes.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        if self.conv_path:
            if self.diff_inputs:
                tubes = torch.einsum("st,ncthw->ncshw", self.frame_mix.to(tubes.dtype), tubes)
            planes = tubes.flatten(1, 2)                                     # [n, 6, 16, 16]
            if self.grad_inputs:
                planes = torch.cat([planes, normal_flow(tubes)], 1)          # [n, 8, 16, 16]
            out = out + self.conv_path_proj()(self.stem(planes)).flatten(1)
        return out

    def visible(self, video, mask):
        """forward()'s tokens where mask [B, N] is False, [B, N_visible, C], without computing the others:
        each tubelet is embedded on its own, so only the visible tubelets are gathered and embedded (at mask
        ratio 0.9, a tenth of the work, forward and backward)."""
        B, _, T, H, W = video.shape
        tubes = rearrange(video, "b c (t pt) (h ph) (w pw) -> b t h w c pt ph pw", pt=TUBELET, ph=PATCH, pw=PATCH)  # a view
        keep = ~mask.reshape(B, T // TUBELET, H // PATCH, W // PATCH)        # (t, h, w) order, as forward's
        x = self.embed(tubes[keep])                                          # [B * N_visible, C]
        return x.reshape(B, -1, x.shape[-1])


def _rates(drop_path, depth):
    """Stochastic depth rates growing linearly from 0 to drop_path over the blocks (VideoMAE)."""
    return [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def _init(module):
    """MAE/VideoMAE initialisation: xavier_uniform Linear weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _same_count(mask):
    """Every sample must mask the same count of tokens (else gathered rows would mix samples)."""
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"every sample must mask the same number of tokens, got {counts.tolist()}")


def _visible(x, mask):
    """x [B, N, ...], mask bool [B, N] (True = masked) -> the visible tokens [B, N_visible, ...] in
    increasing token index."""
    _same_count(mask)
    return x[~mask].reshape(x.shape[0], -1, *x.shape[2:])


# --- the attentive head -------------------------------------------------------------------------

POSITION = 64   # channels of the position code the attentive head appends to each token


class AttentiveHead(nn.Module):
    """tokens [B, N, C] -> logits [B, classes]: a learned query cross-attends to the tokens, each with a fixed
    code of its position appended, then an MLP, then LayerNorm + Linear (V-JEPA's AttentiveClassifier, one
    block). finetune.py frozen's attentive probe (mme.frozen, with its own LayerNorm first: `norm=True`) and the
    classifier's head when the recipe says pool: attentive (after fc_norm, applied per token).

    The position code (POSITION channels of VideoMAE's 1-D sinusoid table over the token index, each
    standardised) is there because an MAE encoder need not keep where its tokens are: its decoder adds the
    positions again (the quick start's encoders hold a token's column at R^2 0.2). Without it the query sees
    a set of motions, in which a turn clockwise and one anticlockwise, or an approach and a recession, are
    the same set (the true per-token motion read without positions: 31 % against 86 %; docs/results.md).
    A mean over tokens (pool: mean) loses the same: it cancels a rotation's curl and an expansion's
    divergence and drops time order."""

    def __init__(self, dim, num_classes, num_tokens, position=POSITION, norm=False):
        super().__init__()
        code = sinusoid_table(num_tokens, position)[0] if position else torch.zeros(num_tokens, 0)   # [N, P]
        if position:
            code = (code - code.mean(0)) / code.std(0).clamp_min(1e-6)
        self.register_buffer("position", code[None], persistent=False)    # fixed: never in a state_dict
        width = dim + position
        self.heads = next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.norm1 = nn.LayerNorm(dim) if norm else nn.Identity()
        self.q, self.kv, self.proj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.norm3 = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens):                                               # [B, N, C] -> [B, classes]
        B, N, _ = tokens.shape
        x = self.norm1(tokens.float())                                       # cached frozen tokens are float16
        x = torch.cat([x, self.position.to(x.dtype).expand(B, -1, -1)], -1)  # [B, N, W]
        W = x.shape[-1]
        k, v = self.kv(x).view(B, N, 2, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)   # [B, h, N, W/h] each
        q = self.q(self.query).view(1, 1, self.heads, W // self.heads).transpose(1, 2).expand(B, -1, -1, -1)
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v).transpose(1, 2).reshape(B, 1, W)
        y = self.query + self.proj(y)                                          # [B, 1, W]
        y = y + self.mlp(self.norm2(y))
        return self.head(self.norm3(y[:, 0]))


# --- the encoder -------------------------------------------------------------------------------

class Encoder(nn.Module):
    """Video ViT. state_dict: patch_embed.proj, blocks.{i}.{norm1, attn.{qkv, q_bias, v_bias, proj},
    norm2, mlp.{fc1, fc2}}, then `norm` (pre-training layout, num_classes=0) or `fc_norm` + `head`
    (fine-tuning layout, num_classes > 0, mean pooling), exactly as the released checkpoints. pool="attentive"
    (ours, not in the released layout): fc_norm per token, then an AttentiveHead (head.query, head.q, ...)."""

    def __init__(self, dim=768, depth=12, heads=12, num_frames=16, img_size=224, num_classes=0,
                 drop_path=0.0, mlp_ratio=4.0, patch_embed="linear", pool="mean"):
        super().__init__()
        if num_frames % TUBELET or img_size % PATCH:
            raise ValueError(f"num_frames must be a multiple of {TUBELET} and img_size of {PATCH}, "
                             f"got {num_frames} and {img_size}")
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        if pool not in ("mean", "attentive"):
            raise ValueError(f"pool must be mean or attentive, got {pool!r}")
        self.num_frames, self.img_size, self.num_classes, self.pool = num_frames, img_size, num_classes, pool
        self.grid = (num_frames // TUBELET, img_size // PATCH, img_size // PATCH)   # (t, h, w) tokens
        self.num_tokens = math.prod(self.grid)
        self.patch_embed = PatchEmbed(dim, patch_embed)
        self.register_buffer("pos_embed", sinusoid_table(self.num_tokens, dim), persistent=False)   # [1, N, C]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in _rates(drop_path, depth))
        if num_classes:
            self.fc_norm = nn.LayerNorm(dim, eps=EPS)                        # after mean pooling (attentive: per token)
            self.head = nn.Linear(dim, num_classes) if pool == "mean" else AttentiveHead(dim, num_classes, self.num_tokens)
        else:
            self.norm = nn.LayerNorm(dim, eps=EPS)                           # per token
        self.apply(_init)
        for conv in [m for m in self.patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]:
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))   # like a Linear: [C, 3*2*16*16]
            nn.init.zeros_(conv.bias)
        if num_classes:                                                      # MAE/VideoMAE fine-tuning: head std 2e-5
            nn.init.trunc_normal_(self.head.weight if pool == "mean" else self.head.head.weight, std=2e-5)

    def forward_features(self, video, mask=None):
        """video [B, 3, T, H, W] (the T, H, W the model was built for), mask bool [B, N] or None ->
        the visible tokens' features [B, N_visible, C] (after `norm` in the pre-training layout; the
        classifier's fc_norm acts on the pooled vector instead)."""
        T, H, W = video.shape[2:]
        if (T // TUBELET, H // PATCH, W // PATCH) != self.grid or T % TUBELET or H % PATCH or W % PATCH:
            raise ValueError(f"video {tuple(video.shape)} does not tile into this encoder's tokens: it was built "
                             f"for {self.num_frames} frames of {self.img_size}^2 ({self.num_tokens} tokens)")
        if mask is None:
            x = self.patch_embed(video) + self.pos_embed.to(video.dtype)     # [B, N, C]
        else:                                                                # masked tokens never computed
            mask = mask.to(video.device)
            _same_count(mask)
            pos = _visible(self.pos_embed.expand(len(video), -1, -1), mask)  # [B, N_visible, C]
            x = self.patch_embed.visible(video, mask)
            x = x + pos.to(x.dtype)                                          # [B, N_visible, C]
        for blk in self.blocks:
            x = blk(x)
        return x if self.num_classes else self.norm(x)

    def forward(self, video, mask=None):
        """Pre-training layout: the visible tokens' features [B, N_visible, C].
        Classifier layout: logits [B, num_classes] = head(fc_norm(mean over tokens)), or with pool attentive
        head(fc_norm(every token))."""
        x = self.forward_features(video, mask)
        if not self.num_classes:
            return x
        if self.pool == "attentive":
            return self.head(self.fc_norm(x))                                # [B, num_classes]
        return self.head(self.fc_norm(x.mean(1)))                            # [B, num_classes]


def encoder(size="base", num_frames=16, img_size=224, depth=None, **kw):
    """Encoder of a named size (tiny | small | base | large), with `depth` blocks (None: the size's).
    kw: num_classes (0: pre-training layout with `norm`; > 0: classifier with fc_norm + head),
    drop_path (the largest stochastic depth rate), patch_embed ("linear" | "conv": PatchEmbed),
    pool ("mean": VideoMAE's head | "attentive": AttentiveHead, for a classifier)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    dim, blocks, heads = SIZES[size]
    return Encoder(dim, depth or blocks, heads, num_frames, img_size, **kw)


# --- the MME pre-training model ----------------------------------------------------------------

class Decoder(nn.Module):
    """Blocks + norm + a Linear head; state_dict decoder.{blocks, norm, head} as VideoMAE's."""

    def __init__(self, dim, depth, heads, out_dim, drop_path=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, r) for r in _rates(drop_path, depth))
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x, num_masked):                                        # x [B, N, Cd]: visible, then masked
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -num_masked:]))                     # [B, N_masked, out_dim]


class PretrainModel(nn.Module):
    """MME pre-training (§3, Fig. 2): the encoder sees the visible tokens only; a light decoder sees
    them (projected to its width) plus a learned [MASK] token at every masked position, and regresses
    the target of the masked tokens.

    Decoder: the paper's best is one joint decoder of depth 1 (Table 12: 1 block beats 2 blocks and
    two separate decoders); width 192 and 6 heads are the authors' code. The authors' code ends it with
    two heads (HOG through a sigmoid, trajectory through a tanh) and averages two MSEs; we use one
    Linear head on the patch-normalised target (mme.online.targets: position part then shape part), whose
    values are unbounded, so no squashing. state_dict: encoder.*, encoder_to_decoder.weight,
    mask_token, decoder.{blocks, norm, head}.* (VideoMAE's names)."""

    def __init__(self, size="base", num_frames=16, img_size=224, target_dim=264, decoder_depth=1,
                 decoder_embed_dim=192, decoder_num_heads=6, drop_path=0.0, depth=None, patch_embed="linear"):
        super().__init__()
        self.encoder = encoder(size, num_frames, img_size, depth, drop_path=drop_path, patch_embed=patch_embed)
        self.target_dim = target_dim
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_embed_dim, decoder_depth, decoder_num_heads
        self.encoder_to_decoder = nn.Linear(self.encoder.dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))            # [1, 1, Cd]
        self.register_buffer("decoder_pos_embed", sinusoid_table(self.encoder.num_tokens, decoder_embed_dim),
                             persistent=False)                                            # [1, N, Cd]
        self.decoder = Decoder(decoder_embed_dim, decoder_depth, decoder_num_heads, target_dim, drop_path)
        self.encoder_to_decoder.apply(_init)
        self.decoder.apply(_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @classmethod
    def from_recipe(cls, recipe, target_dim):
        """From a mme.recipe dict; target_dim is the loader's target width (mme: 264 for L=6, K=4)."""
        return cls(recipe["model"], recipe["num_frames"], recipe["input_size"], target_dim, recipe["decoder_depth"],
                   recipe["decoder_embed_dim"], recipe["decoder_num_heads"], recipe["drop_path"], recipe["depth"],
                   recipe["patch_embed"])

    def forward(self, video, mask, every_token=False):
        """video [B, 3, T, S, S], mask bool [B, N] (True = masked) -> pred [B, N_masked, target_dim],
        the masked tokens in increasing token index (the order of target[mask].reshape(B, -1, D));
        every_token: [B, N, target_dim], the visible tokens first, then the masked (see decode)."""
        mask = mask.to(video.device)
        return self.decode(self.encoder(video, mask), mask, every_token)

    def decode(self, feats, mask, every_token=False):
        """Encoder features of the visible tokens [B, N_visible, C], mask [B, N] -> predictions of the
        masked tokens [B, N_masked, D] (every_token: of all tokens, [B, N, D], visible first, then
        masked, each in increasing index)."""
        x = self.encoder_to_decoder(feats)                                   # [B, N_visible, Cd]
        B, _, Cd = x.shape
        pos = self.decoder_pos_embed.to(x.dtype).expand(B, -1, -1)           # [B, N, Cd]
        pos_vis, pos_masked = pos[~mask].reshape(B, -1, Cd), pos[mask].reshape(B, -1, Cd)
        x = torch.cat([x + pos_vis, self.mask_token.to(x.dtype) + pos_masked], 1)   # [B, N, Cd]
        return self.decoder(x, x.shape[1] if every_token else pos_masked.shape[1])   # [B, N_masked or N, D]

    def loss(self, pred, target, mask, weight=None, widths=None, visible=0.0, per_clip=False):
        return mme_loss(pred, target, mask, weight, widths, visible, per_clip)


def mme_loss(pred, target, mask, weight=None, widths=None, visible=0.0, per_clip=False):
    """Masked MSE (eq. 1) with the loss mask of eq. 7, in float32.

    pred [B, N_masked, D] (PretrainModel's order), or with visible > 0 every token's prediction
    [B, N, D] (decode(every_token=True): visible first, then masked), target [B, N, D], mask bool
    [B, N], weight [B, N] (the loader's 0/1 per token, eq. 7; None = all 1). Each token's squared
    error is averaged over D; the loss is sum_i w_i * err_i / sum_i w_i over the masked tokens of the
    batch, so tokens with weight 0 neither count nor dilute. (Eq. 7 as printed divides by the number
    of patches N_p instead.) All weights 0 gives 0 (with a graph, so backward works).

    widths: None, or the target's part widths (mme.online.targets.mme_parts: position, shape; the recipe's
      loss_balance): each part of the target is divided by its rms over the batch (part_rms), so the
      model predicts it in those units, and a token's error is the mean of the parts' MSEs (the
      authors' code averages the two parts' MSEs). Without patch norm raw HOG is ~30x smaller than
      displacements in px and would otherwise not count.
    per_clip: with widths, each part's rms over each clip's tokens instead of the batch's (balance_per_clip).
    visible: weight of the same loss on the visible tokens (the recipe's loss_visible; 0 = the paper)."""
    B, N, D = target.shape
    mask = mask.to(target.device)
    n_masked = int(mask[0].sum())
    if mask.shape != (B, N) or pred.shape[0] != B or pred.shape[2] != D or \
            pred.shape[1] != (N if visible else n_masked):
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)} disagree"
                         + (" (visible > 0 needs every token's prediction)" if visible else ""))
    w = torch.ones(B, N, device=target.device) if weight is None else weight.to(target.device).float()
    target = target.float()
    if widths is not None:
        rms = part_rms(target, w, widths, per_clip)
        target = torch.cat([p / s for p, s in zip(target.split(list(widths), -1), rms)], -1)

    def part(p, select):                                                     # p [B, n, D] for the tokens select picks
        t = target[select].reshape(B, -1, D)                                 # [B, n, D]
        sq = (p.float() - t).pow(2)
        err = sq.mean(-1) if widths is None else \
            sum(q.mean(-1) for q in sq.split(list(widths), -1)) / len(widths)   # [B, n]
        ws = w[select].reshape(B, -1)
        return (err * ws).sum() / ws.sum().clamp_min(1e-6)

    if not visible:
        return part(pred, mask)
    n_vis = N - n_masked
    return part(pred[:, n_vis:], mask) + visible * part(pred[:, :n_vis], ~mask)


def part_rms(target, weight, widths, per_clip=False):
    """Each part's root mean square over the tokens of a batch with weight 1 (no gradient): target
    [B, N, D], weight [B, N], widths (part widths summing to D) -> a list of len(widths) scalars, or
    with per_clip of [B, 1, 1] tensors (each clip's own; a clip's rms is kept at >= a tenth of the
    batch's, so a clip without motion does not blow its flow noise up to unit size). A model trained
    with loss_balance predicts part j in units of part_rms(...)[j]."""
    w = weight.float()
    out = []
    for p in target.split(list(widths), -1):
        sq = p.detach().float().pow(2).mean(-1) * w                                  # [B, N]
        batch = (sq.sum() / w.sum().clamp_min(1e-6)).sqrt().clamp_min(1e-6)
        if per_clip:
            clip = (sq.sum(1) / w.sum(1).clamp_min(1e-6)).sqrt()                     # [B]
            out.append(torch.maximum(clip, 0.1 * batch)[:, None, None])
        else:
            out.append(batch)
    return out


def add_probe_norm(clf):
    """The linear probe's head (MAE's protocol): BatchNorm without affine parameters (eps 1e-6) before
    the Linear head. Features of masked-modelling encoders share a large common component (the mean
    token after fc_norm varies ~2% between clips), which a bare Linear head learns from very slowly."""
    clf.head = nn.Sequential(nn.BatchNorm1d(clf.dim, affine=False, eps=1e-6), clf.head)
    return clf


def fold_probe_norm(state_dict):
    """A probe's state_dict (head.0 = the BatchNorm's running statistics, head.1 = the Linear) -> the
    released layout's head.weight / head.bias computing the same function as the probe in eval mode."""
    sd = dict(state_dict)
    mean, var = sd.pop("head.0.running_mean").double(), sd.pop("head.0.running_var").double()
    sd.pop("head.0.num_batches_tracked", None)
    weight, bias = sd.pop("head.1.weight").double(), sd.pop("head.1.bias").double()
    scaled = weight / torch.sqrt(var + 1e-6)                                  # [classes, C]
    sd["head.weight"], sd["head.bias"] = scaled.float(), (bias - scaled @ mean).float()
    return sd


# --- checkpoints ----------------------------------------------------------------------------------

def _peel(model):
    """The module inside DDP (.module) or torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _unwrap(model):
    """The Encoder of an Encoder or PretrainModel, wrapped or not."""
    model = _peel(model)
    return model.encoder if isinstance(model, PretrainModel) else model


def read_checkpoint(path):
    """torch.load(path, map_location='cpu', weights_only=True) -- never full unpickling. The released
    VideoMAE/MME files also store their argparse.Namespace `args`, which is allowed as plain data. A folder
    is one of pretrain.py's checkpoints (runs/NAME/checkpoints/step_N): its model, verified, then read by DCP."""
    if Path(path).is_dir():
        # the training side owns checkpoints (and imports this module, hence here)
        from mme.train import checkpoint_model_state
        return checkpoint_model_state(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone(model, checkpoint):
    """Load a backbone, strictly, into an Encoder (or the encoder of a PretrainModel).

    checkpoint: a path (read_checkpoint) or a dict in any released wrapping: {'model': sd},
    {'module': sd}, {'state_dict': sd} or sd itself; keys may carry 'encoder.' (pre-training
    checkpoints: only those keys are the backbone; decoder.*, encoder_to_decoder.*, mask_token are
    skipped), 'module.' (DDP) or '_orig_mod.' (torch.compile) prefixes. The final norm maps
    norm <-> fc_norm to whichever the model has. head.* is loaded when the model has a head of the
    same shape, else skipped. Every backbone key must be there with its shape, and no other key may
    look like the backbone's (e.g. pos_embed, an extra block): else KeyError/ValueError naming them.
    Returns the checkpoint keys that were not loaded."""
    enc = _unwrap(model)
    sd = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    for wrap in ("model", "module", "state_dict"):
        if isinstance(sd.get(wrap), dict):
            sd = sd[wrap]
            break
    sd = {_strip(k): v for k, v in sd.items()}
    skipped = []
    if any(k.startswith("encoder.") for k in sd):                            # a pre-training checkpoint
        skipped = [k for k in sd if not k.startswith("encoder.")]
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    final = "fc_norm" if enc.num_classes else "norm"
    renamed = {}
    for k, v in sd.items():
        if _rename_norm(k, final) in renamed:
            raise KeyError(f"checkpoint has both norm.* and fc_norm.* ({k}); which is the final norm?")
        renamed[_rename_norm(k, final)] = v
    sd, own = renamed, enc.state_dict()
    head = sorted(k for k in sd if k.startswith("head."))
    own_head = sorted(k for k in own if k.startswith("head."))
    if head != own_head or any(sd[k].shape != own[k].shape for k in head):    # no head, or another task's
        skipped += head
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: own[k] for k in own_head})                            # keep the model's own head
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if blocks and blocks != enc.depth:
        raise KeyError(f"checkpoint has {blocks} blocks, the model {enc.depth}: set the recipe key depth to {blocks}")
    stem = "linear" if not any(k.startswith("patch_embed.stem.") for k in sd) else \
        "linear+conv_grad" if sd["patch_embed.stem.0.weight"].shape[1] == 3 * TUBELET + 2 else \
        "linear+conv_diff" if "patch_embed.conv_proj.weight" in sd else "conv_diff" if "patch_embed.frame_mix" in sd else "conv"
    if any(k.startswith("patch_embed.") for k in sd) and stem != enc.patch_embed.kind:
        raise KeyError(f"checkpoint has a {stem} patch embedding, the model a {enc.patch_embed.kind} one: "
                       f"set the recipe key patch_embed to {stem}")
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the {enc.dim}-wide, {enc.depth}-deep backbone: "
                       f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    bad = [f"{k} {tuple(v.shape)} vs ours {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"checkpoint shapes differ: {bad[:8]}")
    enc.load_state_dict(sd, strict=True)
    return skipped


class WeightsError(ValueError):
    """A weights file that cannot be used for what was asked: one line, naming the file and what to do."""


CLASSIFIER = "a classifier checkpoint (model.pth of finetune.py probe or full, or a released fine-tuned one)"


def check_weights(path, need_head=False):
    """Before any work: WeightsError if `path` (not None) is neither a file nor a finished checkpoint folder,
    saying where weights come from."""
    if path and not Path(path).is_file() and not (Path(path) / "done").is_file():
        what = "is a folder, neither a weights file nor a checkpoint (checkpoints/step_N)" if Path(path).is_dir() \
            else "does not exist"
        if need_head:
            raise WeightsError(f"finetune {path} {what}: eval needs {CLASSIFIER}")
        raise WeightsError(f"finetune {path} {what}: run pretrain.py first (python pretrain.py --recipe recipes/tiny.yaml "
                           f"writes runs/tiny/encoder.pth), point --finetune at a pre-trained encoder (encoder.pth, or one "
                           f"of a run's checkpoints: runs/NAME/checkpoints/step_N), or use "
                           f"--finetune null for a random one (the baseline)")


def load_weights(model, path, need_head=False):
    """load_backbone(model, path) with one-line WeightsErrors: an unreadable file, a mismatched backbone, or
    (need_head: eval) a checkpoint without a head of this model's classes. Returns the keys not loaded."""
    import pickle
    before = {k: v.clone() for k, v in model.head.state_dict().items()} if need_head else {}
    try:
        skipped = load_backbone(model, path)
    except pickle.UnpicklingError:
        raise WeightsError(f"finetune {path}: not a checkpoint of tensors that torch.load(weights_only=True) reads") from None
    except (OSError, KeyError, ValueError, RuntimeError, AttributeError, TypeError) as e:
        raise WeightsError(f"finetune {path}: {' '.join(str(e).split())[:300]}") from None
    if need_head and all(torch.equal(v, model.head.state_dict()[k]) for k, v in before.items()):
        heads = [k for k in skipped if k.startswith("head.")]
        kind = "attentive" if "head.query" in heads else "mean"
        why = "it has no head (an encoder such as pretrain.py's encoder.pth?)" if not heads else \
            f"its head is for pool: {kind} (set pool to match)" if kind != model.pool else \
            "its head has another number of classes"
        raise WeightsError(f"finetune {path}: {why}; eval needs {CLASSIFIER} for num_classes {model.num_classes}")
    return skipped


def classifier_checkpoint(state_dict, class_names, recipe, extraction=None):
    """What model.pth / best.pth hold: the released VideoMAE wrapping {"model": state dict} (any VideoMAE loader
    reads it), plus what prediction needs to need nothing else: the class names in label order, the recipe
    (architecture, frames, stride, test views) and the extraction parameters of the shards it was tested on
    (short side, windows; None when they had no manifest)."""
    return {"model": state_dict, "class_names": list(class_names) if class_names else None, "recipe": dict(recipe),
            "extraction": extraction}


def _strip(key):
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _rename_norm(key, final):
    for name in ("norm.", "fc_norm."):
        if key.startswith(name):
            return final + key[len(name) - 1:]
    return key


def backbone_state_dict(model):
    """The backbone of an Encoder or PretrainModel in the released layout (no prefix): patch_embed.*,
    blocks.*, then norm.* (pre-training encoder) or fc_norm.* + head.* (classifier). Prefix the keys
    with 'encoder.' and wrap in {'model': ...} for a VideoMAE-style pre-training checkpoint."""
    return {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}


# --- FLOPs ---------------------------------------------------------------------------------------

def _block_flops(n, dim, mlp_ratio=4.0):
    """One block on n tokens of width C: qkv 2nC*3C + q k^T 2n^2C + attn v 2n^2C + proj 2nC^2
    + mlp 2 * 2nC*(rC) = (8 + 4r) n C^2 + 4 n^2 C."""
    return (8 + 4 * mlp_ratio) * n * dim * dim + 4 * n * n * dim


def flops_per_clip(model, num_frames=None, img_size=None, mask_ratio=0.0, mask_type="tube"):
    """Analytic forward FLOPs for one clip (a multiply-add = 2 FLOPs; one training step is ~3x this).

    Counts the matmuls and attention, which are all but ~1% of the work; LayerNorm, softmax, GELU,
    residual adds and the position add are left out. With N = T/2 * (S/16)^2 tokens of which N_v
    are visible (tube masking: round(ratio * h * w) masked per time step, as mme.online.targets.tube_mask;
    'random': round(ratio * N)), encoder width C and depth L:
      patch embedding (the N_v visible tokens)     2 * N_v * (3*2*16*16) * C
      encoder blocks                                L * [(8 + 4*4) N_v C^2 + 4 N_v^2 C]
      classifier (num_classes K)                    2 * C * K
    PretrainModel adds, with decoder width Cd, depth Ld, target D, N_m = N - N_v:
      encoder_to_decoder                            2 * N_v * C * Cd
      decoder blocks (all N tokens)                 Ld * [24 N Cd^2 + 4 N^2 Cd]
      decoder head (masked tokens only)             2 * N_m * Cd * D
    num_frames / img_size default to the model's."""
    net = _peel(model)
    enc = _unwrap(net)
    T = num_frames or enc.num_frames
    S = img_size or enc.img_size
    t, h, w = T // TUBELET, S // PATCH, S // PATCH
    n = t * h * w
    if mask_type == "tube":
        n_masked = t * int(round(mask_ratio * h * w))
    elif mask_type == "random":
        n_masked = int(round(mask_ratio * n))
    else:
        raise ValueError(f"mask_type must be 'tube' or 'random', got {mask_type!r}")
    n_vis = n - n_masked
    C = enc.dim
    flops = n_vis * enc.patch_embed.flops()
    flops += enc.depth * _block_flops(n_vis, C, enc.mlp_ratio)
    flops += 2 * C * enc.num_classes
    if isinstance(net, PretrainModel):
        Cd = net.decoder_dim
        flops += 2 * n_vis * C * Cd
        flops += net.decoder_depth * _block_flops(n, Cd)
        flops += 2 * n_masked * Cd * net.target_dim
    return int(flops)
