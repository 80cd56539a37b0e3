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
same scalars as TensorBoard event files (events.out.tfevents.*: tensorboard --logdir runs), loss.png (dashed: the
loss of predicting the mean target, loss_floor.json; the last line says whether the run's loss left it),
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

import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mme import evaluate, figures, model as models, recipe as recipes, report
from mme.online import data, targets
from mme.progress import fail
from mme.run import Run, timed
from mme.train import autocast, command_line, optimizer_step, param_groups, set_lr, setup_distributed, shard

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
        fail(e)
    torch.manual_seed(r["seed"] + rank)
    accum = r["accum_steps"]
    micro = r["batch_size"] // (world * accum)
    if micro * world * accum != r["batch_size"]:
        fail(f"batch_size {r['batch_size']} must divide by world size {world} x accum_steps {accum}", rank)
    try:
        loader = data.build_loader(r["data_path"], r, train=True, rank=rank, world_size=world, device=device)
    except (FileNotFoundError, ValueError) as e:
        fail(f"data_path {r['data_path']}: {e}", rank)

    # The model, sharded with FSDP2 over the processes (mme.train.shard); one process runs it unwrapped.
    net = models.PretrainModel.from_recipe(r, targets.target_dim(r)).to(device)
    if world > 1:
        shard(net)
    opt = torch.optim.AdamW(param_groups(net, r["weight_decay"]), lr=0.0, betas=tuple(r["opt_betas"]))
    r, raised = recipes.with_min_steps(r, len(loader) // accum)      # a small dataset still gets min_steps steps
    run = Run(r, net, opt, loader, rank, world, device, len(loader) // accum, "pre-training",
              header=f" = {world} x {micro} x {accum}")
    if raised:
        run.note(raised)
    if r["epochs"] > 16:                           # docs/results.md: twice the passes over 2,000 clips read no better
        run.note(f"few distinct clips: {len(loader) * micro * world} a pass, seen {r['epochs']} times each; on the built-in "
                 f"data more passes over the same clips lowered the loss but no read-out (docs/results.md)")
    amp = autocast(device, r["precision"])
    # The loss (mme.model.mme_loss): parts balanced (loss_balance), visible tokens too (loss_visible).
    widths, every_token = targets.loss_widths(r), r["loss_visible"] > 0

    while not run.done:
        tick, clips, micro_i, wait = time.perf_counter(), 0, 0, 0.0
        for b, waited in timed(loader):
            wait += waited
            lr = run.lr()
            set_lr(opt, lr)
            with amp:
                pred = net(b["video"], b["mask"], every_token=every_token)
                loss = net.loss(pred.float(), b["target"], b["mask"], b["weight"], widths, r["loss_visible"],
                                r["balance_per_clip"])
            (loss / accum).backward()
            clips += b["video"].shape[0] * world
            micro_i += 1
            if micro_i % accum:
                continue
            run.log(optimizer_step(net, opt, loss, r["clip_grad"], world), lr, clips, time.perf_counter() - tick, wait)
            if run.save_due():
                run.checkpoint(net, opt, loader)
            tick, clips, wait = time.perf_counter(), 0, 0.0
            if run.done:
                break

    # Did the loss leave the level of predicting the mean target (mme.report)? A run that stayed there has learnt
    # nothing (docs/results.md, Learning depth): say so now, not after the evaluation. Rank 0, one pass at most.
    floor = floor_label = None
    if rank == 0:
        try:
            floor, floor_label = report.loss_floor(run.path, r, min(256, len(loader) * micro * world), note=run.note)
        except (FileNotFoundError, ValueError) as e:
            run.note(f"no loss floor: data_path {r['data_path']}: {e}")
    # The backbone in the released layout, for finetune.py and the VideoMAE/MME code alike.
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    run.finish({"encoder.pth": {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}},
               floor=floor, floor_label=floor_label)
    if floor is not None:
        run.note(report.plateau_line(run.path / "metrics.jsonl", floor))
    run.close()
    if r["target"] == "mme":                   # the paper's Fig. 4 for validation clips: true and predicted trajectories
        fig = evaluate.trajectories(net, r, rank, world, device, amp)
        if rank == 0:
            figures.trajectory_figure(run.path / "trajectories.png", **fig)
    run.note(f"done: {run.path / 'encoder.pth'}, {run.path / 'loss.png'}" + (", trajectories.png" if r["target"] == "mme" else ""))
    dist.barrier()
    dist.destroy_process_group()


def usage():
    """--help: what the script does, and every recipe key with its type, default and paper table."""
    return (f"{__doc__.strip()}\n\nusage: python pretrain.py --recipe FILE [--key value ...]\n\n"
            f"Recipe keys: a recipe file sets them as 'key: value' lines; --key value on the command line wins.\n\n"
            f"{recipes.keys_help()}")


if __name__ == "__main__":
    command_line(main, lambda args: usage())
