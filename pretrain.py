"""MME pre-training (paper §3, Table 14): a ViT learns to reconstruct motion trajectories of masked tubes.

    python extract.py --src synthetic --out shards/synthetic --split train,val
    python pretrain.py --recipe recipes/tiny.yaml                        # one process, CPU is fine
    torchrun --nproc_per_node=8 pretrain.py --recipe recipes/ssv2.yaml   # one node of 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        pretrain.py --recipe recipes/k400.yaml
    python pretrain.py --recipe recipes/tiny.yaml --epochs 1 --batch_size 4     # any recipe key overrides

Progress: a live bar on a terminal; in a batch job's log (stderr not a terminal) a plain line every
log_every steps and at least every log_seconds s (step/total, epoch, loss, lr, clips/s, the share of
time spent waiting for data, ETA, peak GPU memory); the same lines in runs/<name>/log.txt.
Writes runs/<name>/: recipe.yaml, log.txt, metrics.jsonl (step, epoch, loss, lr, clips/s, data wait) and the
same scalars as TensorBoard event files (events.out.tfevents.*: tensorboard --logdir runs), loss.png,
trajectories.png (the paper's Fig. 4: true and predicted trajectories of masked patches of the first
validation clips, or training clips when the data has no val split),
checkpoints/step_<N>/ (torch.distributed.checkpoint: model and optimizer shards, plus each rank's
step, loader position and RNG state) and encoder.pth (the backbone in the released VideoMAE/MME
layout). Killed? Run the same command again: it continues from the last checkpoint, same curve.
"""
import os

# Before torch allocates: 2 MiB pages for large CPU tensors. Each batch's float video is ~10 MB a clip
# of fresh memory, and faulting it in 4 KiB pages costs as much as computing it (docs/benchmarks.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mme import data, model as models, recipe as recipes, targets, viz
from mme.train import (ResumeError, autocast, command_line, fail, keep_metrics, lr_at, optimizer_step, param_groups, resume,
                       reached, save_checkpoint, set_lr, setup_distributed, shard, timed)

console = Console(stderr=True, soft_wrap=True)
# The decoder head returns a view of its matmul; FSDP2 warns in case someone modifies it in place.
# Nothing here does (the loss reads it), so the warning is noise in every run's log.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def main(recipe, **overrides):
    """Pre-train with the recipe (a YAML file in recipes/); any recipe key can be given as --key value
    (every key, its default and the paper table it mirrors: mme/recipe.py DEFAULTS)."""
    try:
        r = recipes.load(recipe, **overrides)
        rank, world, device = setup_distributed(r["device"], r["num_workers"])
    except (ValueError, FileNotFoundError) as e:           # a RecipeError, or a device that is not there
        fail(None, e)
    torch.manual_seed(r["seed"] + rank)
    run = Path(r["output_dir"]) / r["name"]
    micro = r["batch_size"] // (world * r["accum_steps"])
    if micro * world * r["accum_steps"] != r["batch_size"]:
        fail(rank, f"batch_size {r['batch_size']} must divide by world size {world} x accum_steps {r['accum_steps']}")
    try:
        loader = data.build_loader(r["data_path"], r, train=True, rank=rank, world_size=world, device=device)
    except (FileNotFoundError, ValueError) as e:
        fail(rank, f"data_path {r['data_path']}: {e}")

    # The model, sharded with FSDP2 over the processes (mme.train.shard); one process runs it unwrapped.
    net = models.PretrainModel(size=r["model"], num_frames=r["num_frames"], img_size=r["input_size"],
                               target_dim=targets.target_dim(r), decoder_depth=r["decoder_depth"],
                               decoder_embed_dim=r["decoder_embed_dim"], decoder_num_heads=r["decoder_num_heads"],
                               drop_path=r["drop_path"], depth=r["depth"]).to(device)
    if world > 1:
        shard(net)
    opt = torch.optim.AdamW(param_groups(net, r["weight_decay"]), lr=0.0, betas=tuple(r["opt_betas"]))
    peak, floor = recipes.lr(r, r["batch_size"]), recipes.lr(r, r["batch_size"], "min_lr")
    steps_per_epoch = len(loader) // r["accum_steps"]
    total_steps = r["epochs"] * steps_per_epoch

    try:
        step, last = resume(run, r, net, opt, loader, rank)      # the newest checkpoint that verifies
    except ResumeError as e:                                      # the recipe changed under the same name
        fail(rank, str(e))
    progress = None
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(recipes.dump(r))
        keep_metrics(run / "metrics.jsonl", step)          # drop lines a killed run logged past its checkpoint
        progress = viz.progress(console, total_steps, step, run / "log.txt", r["log_every"], r["log_seconds"], device)
        progress.note(f"[bold]{r['name']}[/bold]: {world} process(es) on {device}"
                      f"{' (FSDP2)' if world > 1 else ''}, {total_steps} steps "
                      f"({steps_per_epoch}/epoch), batch {r['batch_size']} = {world} x {micro} x {r['accum_steps']}, "
                      f"peak lr {peak:.2e}" + (f", resuming at step {step}" if step else ""))
    amp = autocast(device, r["precision"])
    # The loss (mme.model.mme_loss): parts balanced (loss_balance), visible tokens too (loss_visible).
    widths = targets.loss_widths(r)
    every_token = r["loss_visible"] > 0

    metrics = open(run / "metrics.jsonl", "a") if rank == 0 else None
    board = viz.Board(run, step, progress.note, r["wandb"], r) if rank == 0 else None
    last_good = last
    while step < total_steps:
        tick, clips, micro_i, wait = time.perf_counter(), 0, 0, 0.0
        for b, waited in timed(loader):
            wait += waited
            lr = lr_at(step, r, steps_per_epoch, peak, floor)
            set_lr(opt, lr)
            with amp:
                pred = net(b["video"].to(device, non_blocking=True), b["mask"].to(device), every_token=every_token)
                loss = net.loss(pred.float(), b["target"].to(device), b["mask"].to(device), b["weight"].to(device),
                                widths, r["loss_visible"])
            (loss / r["accum_steps"]).backward()
            clips += b["video"].shape[0] * world
            micro_i += 1
            if micro_i % r["accum_steps"]:
                continue
            value = optimizer_step(net, opt, loss, r["clip_grad"], world)
            step += 1
            reached(step)
            if not math.isfinite(value):
                fail(rank, f"loss is {value} at step {step}; last good checkpoint: {last_good or 'none'} "
                           f"(lower base_lr or set clip_grad, then rerun to resume from it)")
            if rank == 0:
                seconds = time.perf_counter() - tick
                metrics.write(json.dumps({"step": step, "epoch": loader.epoch, "loss": value, "lr": lr,
                                          "clips_per_s": clips / seconds, "data_wait": wait / seconds}) + "\n")
                metrics.flush()
                board.add(step, **{"train/loss": value, "train/lr": lr, "train/clips_per_s": clips / seconds,
                                   "train/data_wait": wait / seconds})
                progress.update(step, epoch=f"{loader.epoch + 1}/{r['epochs']}", loss=value, lr=lr, clips=clips,
                                seconds=seconds, wait=wait)
            if step % r["save_every"] == 0 or step == total_steps:
                last_good = save_checkpoint(run, step, net, opt, loader, rank)
            tick, clips, wait = time.perf_counter(), 0, 0.0
            if step >= total_steps:
                break

    # The backbone in the released layout, for finetune.py and the VideoMAE/MME code alike.
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        progress.stop()
        encoder = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
        torch.save(encoder, run / "encoder.pth")
        metrics.close()
        board.close()
        viz.loss_curve(run / "metrics.jsonl", run / "loss.png")
    if r["target"] == "mme":                   # the paper's Fig. 4 for validation clips: true and predicted trajectories
        viz.run_figure(run / "trajectories.png", net, r, rank, world, device, amp)
    if rank == 0:
        progress.note(f"done: {run / 'encoder.pth'}, {run / 'loss.png'}" + (", trajectories.png" if r["target"] == "mme" else ""))
    dist.barrier()
    dist.destroy_process_group()


def usage():
    """--help: what the script does, and every recipe key with its type, default and paper table."""
    return (f"{__doc__.strip()}\n\nusage: python pretrain.py --recipe FILE [--key value ...]\n\n"
            f"Recipe keys: a recipe file sets them as 'key: value' lines; --key value on the command line wins.\n\n"
            f"{recipes.keys_help()}")


if __name__ == "__main__":
    command_line(main, lambda args: usage())
