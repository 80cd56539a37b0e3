"""Training step speed: our ViT blocks against timm's on the same visible tokens, and a full MME step.

    pip install timm        # benchmark only; timm needs a torchvision matching your torch
    python bench/train_bench.py                                   # CPU: tiny and small, 16 x 224^2, mask 0.7
    python bench/train_bench.py --sizes base --batch 32           # on a GPU: bf16 autocast, adds MFU
    python bench/train_bench.py --sizes base --batch 32 --compile # the full step's model under torch.compile
    python bench/train_bench.py --recipe recipes/learn_tiny.yaml --fsdp --timm false --steps 21
        # a recipe's own model and batch; its full step also with the model FSDP2-wrapped on one process

Side by side in the same process, median of several steps after warm-up:
  - encoder: forward + backward of the transformer (blocks + final norm) on the visible tokens
    [B, N_visible, C] of a 16 x 224^2 clip at mask 0.7, ours (mme.model) vs timm's Block of the
    same width, depth, heads and MLP ratio (qkv bias on, as VideoMAE's q/v biases);
  - a full MME pre-training step of ours (patch embedding, encoder, decoder, loss, AdamW);
  - with --fsdp, the same full step with the model wrapped as pretrain.py wraps it over several
    processes (fully_shard per block, then the root), here on a one-process group: what the wrapping
    alone costs, and why pretrain.py runs one process unwrapped.
--recipe takes model, depth, decoder, frames, input size, target and batch from a recipe file instead of
--sizes/--frames/--img/--batch; --timm false skips the timm baseline (no timm needed).
On a GPU, model FLOPs utilisation = 3 x forward FLOPs (mme.model.flops_per_clip) x clips/s / peak.
"""
import statistics
import time

import fire
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mme import model as models, recipe as recipes
from mme.online import targets
from mme.train import setup_distributed, shard

console = Console()
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}      # dense bf16 FLOP/s


def timed(fn, steps, sync):
    fn(), fn()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(sizes="tiny,small", batch=2, frames=16, img=224, mask_ratio=0.7, steps=5, compile=False, recipe=None,
         fsdp=False, timm=True):
    # Prints the table; returns its rows as data (for tests; a comment, not a docstring, which fire would show
    # as --help), one dict per model size: {"model", "ours_encoder_ms", "timm_encoder_ms" (None without timm),
    # "full_step_ms", "clips_per_s", "mfu" (a fraction; None on a CPU or an unknown GPU), and with fsdp
    # "wrapped_step_ms", "wrapped_over_plain"}; times are medians.
    TimmBlock = None
    if str(timm).lower() not in ("false", "0", "no"):
        try:
            from timm.models.vision_transformer import Block as TimmBlock
        except ImportError as e:
            raise SystemExit(f"timm is needed for the baseline ({e}); pip install timm (with a torchvision matching "
                             f"torch), or --timm false")
    r = dict(recipes.DEFAULTS, model="tiny", num_frames=frames, input_size=img, mask_ratio=mask_ratio, batch_size=batch)
    if recipe:
        r = recipes.load(recipe)
        sizes, batch, frames, img, mask_ratio = [r["model"]], r["batch_size"], r["num_frames"], r["input_size"], r["mask_ratio"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    if fsdp:                                                   # a one-process group, as pretrain.py makes one
        setup_distributed("auto")
    t = Table(title=f"train step, {frames} x {img}^2, mask {mask_ratio}, batch {batch}, {name}, torch {torch.__version__}"
                    + (f", {recipe}" if recipe else "") + (", full step torch.compile'd" if compile else ""))
    for col in ("model", "ours encoder ms", "timm encoder ms", "ours / timm", "full MME step ms", "clips/s", "MFU") + \
               (("FSDP2-wrapped step ms", "wrapped / plain") if fsdp else ()):
        t.add_column(col, justify="right")
    rows = []
    for size in (sizes.split(",") if isinstance(sizes, str) else sizes):
        dim, heads = models.SIZES[size][0], models.SIZES[size][2]
        depth = r["depth"] if recipe and r["depth"] else models.SIZES[size][1]
        r["model"] = size
        ours = models.encoder(size, num_frames=frames, img_size=img, depth=depth).to(device)
        n = frames // 2 * (img // 16) ** 2
        visible = n - int(round(mask_ratio * (img // 16) ** 2)) * frames // 2
        x = torch.randn(batch, visible, dim, device=device, requires_grad=True)

        def step(blocks, norm=None):
            def run():
                with amp:
                    h = x
                    for blk in blocks:
                        h = blk(h)
                    if norm is not None:
                        h = norm(h)
                    h.float().square().mean().backward()
            return run

        ours_ms = timed(step(ours.blocks, ours.norm), steps, sync) * 1e3
        timm_ms = None
        if TimmBlock is not None:
            timm_blocks = torch.nn.Sequential(*[TimmBlock(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)],
                                              torch.nn.LayerNorm(dim, eps=1e-6)).to(device)
            timm_ms = timed(step(timm_blocks), steps, sync) * 1e3

        target_dim = targets.target_dim(r)
        mask = targets.tube_mask(np.random.default_rng(0), batch, frames // 2, img // 16, img // 16, mask_ratio).to(device)
        video = torch.randn(batch, 3, frames, img, img, device=device)
        target = torch.randn(batch, n, target_dim, device=device)
        weight = torch.ones(batch, n, device=device)

        def full_step(wrap):
            torch.manual_seed(0)
            net = models.PretrainModel.from_recipe(r, target_dim).to(device)
            if wrap:
                shard(net)                                      # as pretrain.py wraps it over several processes
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            step_net = torch.compile(net) if compile else net       # timed() warms up twice: compilation is not timed

            def full():
                with amp:
                    loss = net.loss(step_net(video, mask).float(), target, mask, weight)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return full, net

        # plain and wrapped alternate, so that a slow spell of the machine falls on both
        plain_s, wrapped_s = [], []
        plain, net = full_step(False)
        wrapped = full_step(True)[0] if fsdp else None
        for _ in range(3 if fsdp else 1):
            plain_s.append(timed(plain, steps, sync))
            if fsdp:
                wrapped_s.append(timed(wrapped, steps, sync))
        full_s = statistics.median(plain_s)
        clips = batch / full_s
        mfu = None
        if cuda:
            peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
            flops = 3 * models.flops_per_clip(net, frames, img, mask_ratio)
            mfu = flops * clips / peak if peak else None
        rows.append({"model": size, "ours_encoder_ms": ours_ms, "timm_encoder_ms": timm_ms, "full_step_ms": full_s * 1e3,
                     "clips_per_s": clips, "mfu": mfu})
        row = [size, f"{ours_ms:.1f}", "-" if timm_ms is None else f"{timm_ms:.1f}",
               "-" if timm_ms is None else f"{ours_ms / timm_ms:.2f}", f"{full_s * 1e3:.0f}", f"{clips:.1f}",
               f"{mfu:.0%}" if mfu is not None else "?" if cuda else "-"]
        if fsdp:
            w = statistics.median(wrapped_s)
            rows[-1] |= {"wrapped_step_ms": w * 1e3, "wrapped_over_plain": w / full_s}
            row += [f"{w * 1e3:.0f} ({', '.join(f'{v * 1e3:.0f}' for v in wrapped_s)})", f"{w / full_s:.2f}"]
            row[4] += f" ({', '.join(f'{v * 1e3:.0f}' for v in plain_s)})"
        t.add_row(*row)
    console.print(t)
    if fsdp:
        torch.distributed.destroy_process_group()
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda rows: None)      # the table is printed; fire would print the rows again
