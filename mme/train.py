"""Running a training job: the process group, the learning-rate schedule, parameter groups, and
checkpoints that resume exactly (pretrain.py and finetune.py share these).

    rank, world, device = setup_distributed("auto")       # torchrun's env, or a 1-process group
    lr = lr_at(step, recipe, steps_per_epoch, peak, floor)  # linear warmup, then cosine (Tables 14/15)
    groups = param_groups(net, weight_decay, layer_decay=None)   # no decay on 1-D params; layer-wise lr scale
    set_lr(opt, lr); loss = optimizer_step(net, opt, loss, clip_grad, world)   # after backward
    with autocast(device, recipe["precision"]): ...             # bf16 on GPUs (auto), or as the recipe says
    path = save_checkpoint(run, step, net, opt, loader, rank)    # DCP shards + each rank's loader/RNG state
    step = load_checkpoint(latest_checkpoint(run), net, opt, loader, rank)
"""
import json
import math
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def setup_distributed(device_choice):
    """torchrun's environment, or a one-process group when run with plain python (FSDP2 needs one)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 20000))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda") or device_choice.startswith("cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device


def lr_at(step, r, steps_per_epoch, peak, floor):
    """Linear warmup to `peak` over warmup_epochs, then cosine decay to `floor` (Table 14)."""
    warm = r["warmup_epochs"] * steps_per_epoch
    total = r["epochs"] * steps_per_epoch
    if step < warm:
        return peak * step / warm
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def autocast(device, precision="auto"):
    """The forward pass's autocast: 'auto' is bf16 on a GPU that supports it and fp32 elsewhere;
    'bf16' asks for it on any device (CPU autocast included); 'fp32' turns it off."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def param_groups(net, weight_decay, layer_decay=None):
    """AdamW groups: no weight decay on biases, norms and tokens (1-D parameters), as MAE/VideoMAE.
    layer_decay (Table 15: 0.75) scales a layer's lr by layer_decay^(depth + 1 - layer), layer 0
    being the patch embedding, layer i + 1 block i and depth + 1 the head (VideoMAE's layer ids);
    the scale is each group's "lr_scale", which the training loop multiplies into the lr."""
    depth = 1 + max((int(n.split(".")[1]) for n, _ in net.named_parameters() if n.startswith("blocks.")), default=-1)
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        layer = 0 if name.startswith("patch_embed") else int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        decay = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def set_lr(opt, lr):
    """The schedule's lr into every group, times the group's layer-decay scale."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]


def optimizer_step(net, opt, loss, clip_grad, world):
    """After backward: clip the gradient norm (if clip_grad), step, zero the gradients. Returns the
    loss averaged over the ranks, as a float (for the log and the non-finite check)."""
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    reduced = loss.detach().clone()
    dist.all_reduce(reduced)
    return reduced.item() / world


def latest_checkpoint(run):
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if (p / "done").exists()]
    return (run / "checkpoints" / f"step_{max(steps)}") if steps else None


def save_checkpoint(run, step, net, opt, loader, rank, keep=2):
    """Model + optimizer through DCP (each rank writes its shards), then each rank's own state as
    JSON; a `done` marker makes the checkpoint count only once everything is on disk."""
    path = run / "checkpoints" / f"step_{step}"
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    rng = {"torch": torch.get_rng_state().tolist()}      # the loader's and masks' RNGs derive from its state
    (path / f"rank{rank}.json").write_text(json.dumps({"step": step, "loader": loader.state_dict(), "rng": rng}))
    dist.barrier()
    if rank == 0:
        (path / "done").touch()
        for old in sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(path, net, opt, loader, rank):
    msd, osd = get_state_dict(net, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = json.loads((path / f"rank{rank}.json").read_text())
    loader.load_state_dict(mine["loader"])
    torch.set_rng_state(torch.tensor(mine["rng"]["torch"], dtype=torch.uint8))
    return mine["step"]


def keep_metrics(path, step):
    """Drop the metrics.jsonl lines a killed run logged past the checkpoint it resumes from."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
