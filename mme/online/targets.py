"""What the decoder reconstructs, per token, and which tokens are masked (paper §3, Tables 5-9, 11).

A token is a tubelet of 2 frames x 16 x 16 pixels; tokens are ordered (t, h, w): N = T/2 * (S/16)^2.
Trajectory maps come from the loader already cropped, resized and flipped (mme.online.transforms), one per
tubelet with a point every 8 px, so each 16 x 16 patch holds K = 4 trajectories (2 x 2, row-major).

    target, weight = mme_target(disp, hog, valid)   # disp [B, T/2, S/8, S/8, L, 2] px, hog [..., L, 9], valid [B, T/2, S/8, S/8]
    # target [B, N, D]: the position part first, K*L*2 values ordered (trajectory k, step l, (dx, dy)),
    #                   then the shape part, K*L*9 values ordered (k, l, bin). L=6, K=4: D = 48 + 216 = 264.
    # weight [B, N]: 1 where all K trajectories stayed in the frame, else 0 (eq. 7)
    raw = unnormalize(target, raw_target, mme_parts(recipe).values())   # patch-normalised -> px (for pictures)
    widths = loss_widths(recipe)                   # the parts the loss balances (loss_balance), or None
    target = pixel_target(video)                   # [B, N, 2*16*16*3]: VideoMAE's normalised pixels
    target = hog_target(video)                     # [B, N, 2*2*3*9 = 108]: MaskFeat-style HOG of each tubelet's 2nd frame
    mask = tube_mask(rng, B, T/2, S/16, S/16, 0.7) # bool [B, N], True = masked; same spatial mask at every t

Patch norm (Table 8, the recipe's patch_norm):
  'paper'   each part is standardised over all values of the K trajectories of the patch, as MAE
            normalises a patch ("the mean and variance are calculated by all K = 4 trajectories in a
            patch"). It keeps the relative size of x and y steps, but a rigid translation of a patch
            becomes the same unit-variance pattern for every speed (docs/results.md).
  'authors' the authors' released code (traj_norm 'PatchStd'): displacements / 20, then each (step,
            coordinate) standardised across the K trajectories of the patch with the unbiased std
            (+1e-6). The patch's common motion is removed; what is left is the motion of its
            trajectories relative to each other (rotation, scaling, deformation within the patch).
            The shape part is standardised as 'paper' (their HOG target is a static one, Appendix C).
  'none'    raw px and HOG (with loss_balance, the loss scales each part by its rms instead).
Density 'mean+relative' splits the position part in two balanced parts: the patch's mean path (L*2)
and each trajectory's path relative to that mean (K*L*2), so the common motion and the relative
motion each count for as much as the other in the loss, whatever their sizes.
"""
import numpy as np
import torch
from einops import rearrange

PATCH, TUBELET, HOG_CELL, BINS = 16, 2, 8, 9


def target_dim(recipe):
    """D of recipe's target (what the decoder's head must output)."""
    if recipe["target"] == "pixel":
        return TUBELET * PATCH * PATCH * 3
    if recipe["target"] == "hog":
        return 2 * 2 * 3 * BINS
    return sum(mme_parts(recipe).values())


def mme_parts(recipe):
    """The mme target's parts and widths, in order: {"position": K*L*2, "shape": K*L*9 (if on)}, with
    K trajectories per patch and L steps (ceil(L / stride) without interpolation); density
    'mean+relative': {"position": L*2 (the mean path), "relative": 4*L*2, "shape": 4*L*9}."""
    density = recipe["trajectory_density"]
    K = 4 if density in ("dense", "mean+relative") else 1
    L = recipe["trajectory_length"]
    if not recipe["interpolation"]:
        L = -(-L // recipe["sampling_rate"])
    position = {"position": L * 2, "relative": K * L * 2} if density == "mean+relative" else {"position": K * L * 2}
    return {**position, **({"shape": K * L * BINS} if recipe["shape_target"] else {})}


def loss_widths(recipe):
    """The part widths mme.model.mme_loss balances (the recipe's loss_balance): mme's parts, any other
    target as one part; None without loss_balance."""
    if not recipe["loss_balance"]:
        return None
    return list(mme_parts(recipe).values()) if recipe["target"] == "mme" else [target_dim(recipe)]


def unnormalize(pred, raw, widths):
    """Patch-normalised values pred [..., D] back to the units of raw [..., D] (the unnormalised target of
    the same tokens), part by part (widths: mme_parts' values): MAE's way of showing what a model
    trained with patch norm predicts."""
    out = []
    for p, t in zip(pred.split(list(widths), -1), raw.split(list(widths), -1)):
        var, mean = torch.var_mean(t.float(), -1, keepdim=True, unbiased=False)
        out.append(p.float() * (var + 1e-6).sqrt() + mean)
    return torch.cat(out, -1)


def paths(pred, raw, weight, recipe):
    """Trajectories in px, true and predicted, of the tokens pred covers: pred [B, n, D] the model's output
    in the recipe's target space, raw [B, n, D] the target of the same tokens with patch_norm 'none' (the
    same density), weight [B, n] -> (true, predicted), each [B, n, K', L, 2] (K' = 4, or 1 for 'mean'/'max').
    Patch norm is undone with the true target's statistics, as MAE shows its pixels; loss_balance's part
    units with the parts' rms over these tokens."""
    from mme.model import part_rms  # the loss's own rms

    widths = list(mme_parts(recipe).values())
    pred, raw = pred.detach().float(), raw.detach().float()
    L = recipe["trajectory_length"] if recipe["interpolation"] else -(-recipe["trajectory_length"] // recipe["sampling_rate"])
    if recipe["loss_balance"]:                                           # the loss's units: each part's rms in target space
        normed = list(raw.split(widths, -1))
        if recipe["patch_norm"] == "paper":
            normed = [_norm(p) for p in normed]
        elif recipe["patch_norm"] == "authors":
            normed[0] = _authors_norm(normed[0].unflatten(-1, (-1, L, 2))).flatten(-3)
            normed[1:] = [_norm(p) for p in normed[1:]]
        rms = part_rms(torch.cat(normed, -1), weight, widths, recipe["balance_per_clip"])
        pred = torch.cat([p * s for p, s in zip(pred.split(widths, -1), rms)], -1)
    if recipe["patch_norm"] == "paper":
        pred = unnormalize(pred, raw, widths)
    true_parts, pred_parts = raw.split(widths, -1), pred.split(widths, -1)
    B, n = raw.shape[:2]
    as_paths = lambda x: x.reshape(B, n, -1, L, 2)
    if recipe["trajectory_density"] == "mean+relative":
        true = as_paths(true_parts[0]) + as_paths(true_parts[1])
        guess = as_paths(pred_parts[0]) + as_paths(pred_parts[1])
    else:
        true, guess = as_paths(true_parts[0]), as_paths(pred_parts[0])
    if recipe["patch_norm"] == "authors":                              # invert PatchStd with the true paths' statistics
        mean, std = (true / 20).mean(2, keepdim=True), (true / 20).std(2, keepdim=True, unbiased=True)
        guess = 20 * (guess * (std + 1e-6) + mean)
    return true, guess


def _norm(x):
    """Standardise over the last dim (MAE's patch norm: mean, variance + 1e-6). layer_norm computes
    exactly that and is ~8x faster on CPU than var_mean."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)


def _authors_norm(pos):
    """The authors' PatchStd: pos [..., K, L, 2] px -> (pos / 20 - mean over K) / (unbiased std over K + 1e-6),
    per step and coordinate."""
    pos = pos / 20
    mean, std = pos.mean(-3, keepdim=True), pos.std(-3, keepdim=True, unbiased=True)
    return (pos - mean) / (std + 1e-6)


def mme_target(disp, hog, valid, patch_norm="paper", shape=True, density="dense", stride=None):
    """Motion trajectory target (eqs. 3-5) of every token, and its loss weight (eq. 7).

    patch_norm: 'paper' | 'authors' | 'none' (module docstring; True / False mean 'paper' / 'none').
    density: 'dense' keeps the K trajectories of a patch (Table 9); 'mean' averages them into one,
      'max' keeps the one that moves most (the sparse baselines); 'mean+relative' gives the mean path
      and the K paths relative to it as two parts (module docstring).
    stride: None for the dense, interpolated trajectory (every raw frame, Table 6); an int s keeps
      only steps at the input stride: displacements summed over s raw steps, HOG at each s-th step.
    shape: False drops the HOG part (Table 5, 'Traj. w/o shape').
    """
    per_patch = "b t (h kh) (w kw) l c -> b (t h w) (kh kw) l c"
    pos = rearrange(disp.float(), per_patch, kh=2, kw=2)                   # [B, N, K, L, 2]
    hogs = rearrange(hog.float(), per_patch, kh=2, kw=2)                   # [B, N, K, L, 9]
    ok = rearrange(valid, "b t (h kh) (w kw) -> b (t h w) (kh kw)", kh=2, kw=2).all(-1)
    if stride:
        L = pos.shape[3]
        pos = torch.stack([pos[:, :, :, i:i + stride].sum(3) for i in range(0, L, stride)], 3)
        hogs = hogs[:, :, :, ::stride]
    patch_norm = {True: "paper", False: "none"}.get(patch_norm, patch_norm)
    if patch_norm == "authors":                                           # before any merging: per (l, c) across K
        pos = _authors_norm(pos)
    if density == "mean":
        pos, hogs = pos.mean(2, keepdim=True), hogs.mean(2, keepdim=True)
    elif density == "mean+relative":
        mean_path = pos.mean(2, keepdim=True)                              # [B, N, 1, L, 2]
        pos = [mean_path, pos - mean_path]
    elif density == "max":
        pick = pos.norm(dim=-1).sum(-1).argmax(2)                          # [B, N]: the longest path
        idx = pick[:, :, None, None, None]
        pos = pos.gather(2, idx.expand(-1, -1, 1, *pos.shape[3:]))
        hogs = hogs.gather(2, idx.expand(-1, -1, 1, *hogs.shape[3:]))
    pos = pos if isinstance(pos, list) else [pos]
    parts = [p.flatten(2) for p in pos + ([hogs] if shape else [])]      # [B, N, K*L*c] each
    if patch_norm == "paper":
        parts = [_norm(p) for p in parts]
    elif patch_norm == "authors" and shape:
        parts[-1] = _norm(parts[-1])
    target = torch.cat(parts, -1)
    return target, ok.float()


def pixel_target(video, patch_norm=True):
    """VideoMAE's target: video [B, 3, T, S, S] in [0, 1] -> [B, N, 2*16*16*3], each tubelet patch
    standardised per colour channel (patch_norm) or raw."""
    x = rearrange(video.float(), "b c (t p0) (h p1) (w p2) -> b (t h w) c (p0 p1 p2)", p0=TUBELET, p1=PATCH, p2=PATCH)
    if patch_norm:
        x = _norm(x)                                        # per channel over the tubelet's pixels
    return rearrange(x, "b n c p -> b n (p c)")


def _sobel(x):
    """Sobel gradients of [M, 1, H, W] (reflect-101 border, scaled to intensity per pixel, as mme.offline.hog)."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    gx = torch.nn.functional.conv2d(xp, k[None, None])
    gy = torch.nn.functional.conv2d(xp, k.t()[None, None])
    return gx, gy


def hog_target(video):
    """MaskFeat-style HOG of each tubelet's second frame (the paper's HOG baseline, Appendix C: 9
    unsigned bins, magnitude-weighted, 8 x 8 cells, per RGB channel, no L2 normalisation) ->
    [B, N, 2*2 cells * 3 channels * 9 bins]. Same bins as mme.offline.hog: bin k = [20k, 20k + 20) degrees."""
    B, C, T, S, _ = video.shape
    frames = video[:, :, 1::TUBELET].float()                              # [B, 3, T/2, S, S]
    x = rearrange(frames, "b c t h w -> (b c t) 1 h w")
    gx, gy = _sobel(x)
    mag = torch.sqrt(gx * gx + gy * gy)
    ang = torch.atan2(gy, gx) % np.pi
    bins = (ang * (BINS / np.pi)).long().clamp_(max=BINS - 1)
    onehot = torch.zeros(*mag.shape[:1], BINS, *mag.shape[2:], device=video.device)
    onehot.scatter_(1, bins, mag)                                         # [(b c t), 9, S, S]
    cells = torch.nn.functional.avg_pool2d(onehot, HOG_CELL)              # mean per 8 x 8 cell
    return rearrange(cells, "(b c t) k (h ch) (w cw) -> b (t h w) (ch cw c k)", b=B, c=C, ch=2, cw=2)


def tube_mask(rng, batch, t, h, w, ratio, kind="tube"):
    """bool [batch, t*h*w], exactly round(ratio * count) masked per sample (a fixed count keeps the
    encoder's visible-token count constant). 'tube': one spatial mask repeated over t (VideoMAE);
    'random': tokens masked independently (the 'cube' rows of Table 11)."""
    n = h * w if kind == "tube" else t * h * w
    masked = int(round(ratio * n))
    m = np.zeros((batch, n), bool)
    for row in m:
        row[rng.permutation(n)[:masked]] = True
    if kind == "tube":
        m = np.repeat(m[:, None], t, 1).reshape(batch, t * n)
    return torch.from_numpy(m)
