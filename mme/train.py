"""Running a training job: the process group, the learning-rate schedule, parameter groups, and
checkpoints that resume exactly (pretrain.py and finetune.py share these).

    rank, world, device = setup_distributed("auto", num_workers)   # torchrun's env, or a 1-process group
    if world > 1: shard(net)                               # FSDP2: each transformer block, then the root
    lr = lr_at(step, recipe, steps_per_epoch, peak, floor)  # linear warmup, then cosine (Tables 14/15)
    groups = param_groups(net, weight_decay, layer_decay=None)   # no decay on 1-D params; layer-wise lr scale
    set_lr(opt, lr); loss = optimizer_step(net, opt, loss, clip_grad, world)   # after backward
    with autocast(device, recipe["precision"]): ...             # bf16 on GPUs (auto), or as the recipe says
    path = save_checkpoint(run, step, net, opt, loader, rank)    # DCP shards + each rank's loader/RNG state, checksummed
    step, path = resume(run, recipe, net, opt, loader, rank)     # the newest checkpoint that verifies, same recipe
    command_line(main, usage)                                    # a stage script's __main__ (fire; --help; Ctrl-C)

The run folder must not be writable by anyone you do not trust: the checksums in a checkpoint's done
marker catch damage and files replaced after the save, but someone who can write there can also write
a matching marker, and DCP reads a checkpoint's .metadata with pickle.
"""
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import fire
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from mme.online.s3 import S3Error
from mme.progress import fail

log = logging.getLogger(__name__)


def setup_distributed(device_choice, num_workers=0):
    """torchrun's environment, or a one-process group when run with plain python (FSDP2 needs one);
    on a CPU, torch's threads leave a core to each of the loader's num_workers (cpu_threads).
    Raises ValueError when the device asked for is not there."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 20000))
    if device_choice.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device_choice}: {why}; use device auto or cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda") or device_choice.startswith("cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    cpu_threads(device, num_workers)
    return rank, world, device


def cpu_threads(device, num_workers):
    """On a CPU, torch's threads for this process: its default, but no more than the cores it may run on
    less one per loader worker (each worker decodes on a core of its own), and at least one. On 2 cores
    with 1 worker, quick_tiny ran 1.06x faster through pretrain.py on 1 thread than on 2, learn_tiny
    0.95x (within the noise; docs/benchmarks.md). OMP_NUM_THREADS, when set, wins (torchrun sets it to
    1 for several processes per node). Returns the thread count."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - num_workers)))
    return torch.get_num_threads()


def shard(net):
    """FSDP2 over the processes: every transformer block (mme.model.Block) its own unit, then the rest at
    the root. Callers wrap only when world > 1: one process has nothing to shard, and there the wrapping's
    per-block hooks and copies cost 1.3-1.5x a tiny model's CPU step (docs/benchmarks.md) for the same numbers."""
    from mme.model import Block
    for block in [m for m in net.modules() if isinstance(m, Block)]:
        fully_shard(block)
    fully_shard(net)
    return net


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


last_checkpoint = None      # the newest checkpoint this process saved or resumed from (for interrupted())
last_step = None            # the last optimizer step done (reached())


def reached(step):
    """The training loop's step, for the line interrupted() prints."""
    global last_step
    last_step = step


def interrupted():
    """The one line for Ctrl-C: the step the run stopped at, and where a rerun of the same command resumes."""
    at = f" at step {last_step}" if last_step is not None else ""
    if last_checkpoint is None:
        return f"interrupted{at} before the first checkpoint: rerunning the same command starts from the beginning"
    step = last_checkpoint.name.removeprefix("step_")
    return f"interrupted{at}: rerun the same command to resume from step {step} ({last_checkpoint})"


def command_line(commands, usage):
    """A stage script's __main__: -h/--help (or no arguments, for a script of several commands) prints
    usage(args), ours rather than fire's, since the recipe keys are the flags; otherwise fire runs
    `commands` (a function, or a dict of them). Ctrl-C and an S3 error end in one line (fail)."""
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args) or (not args and isinstance(commands, dict)):
        print(usage(args))
        sys.exit(0)
    try:
        fire.Fire(commands)
    except KeyboardInterrupt:
        fail(interrupted())
    except S3Error as e:                           # credentials refused, or S3 gone past the patience
        fail(str(e))


class NoSpaceError(ValueError):
    """The disk is full, or would be: one line naming the folder, what is needed and what is free."""


def state_bytes(state):
    """Bytes of the tensors in a (nested) state dict: this rank's share of a checkpoint."""
    if torch.is_tensor(state):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def check_space(folder, needed, what):
    """NoSpaceError unless `folder`'s file system has `needed` bytes free (and 1 % spare)."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed * 1.01:
        raise NoSpaceError(f"no space left on {folder}: {what} needs {needed / 2 ** 20:.0f} MB, "
                           f"{free / 2 ** 20:.0f} MB free")


def no_space(e):
    """Whether an exception (DCP wraps each rank's) comes from a full disk."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def save_checkpoint(run, step, net, opt, loader, rank, keep=2):
    """Model + optimizer through DCP (each rank writes its shards), then each rank's own state as
    JSON; then rank 0 writes the `done` marker with the sha256 of every file, so the checkpoint counts
    only once everything is on disk, and a file damaged or replaced later is caught before it is read.
    The free space is checked first (this rank's share; the checkpoint before it is removed only after);
    a disk that fills anyway raises NoSpaceError, and the half-written checkpoint is never resumed from.
    keep: how many of the newest checkpoints stay on disk (0: all)."""
    path = run / "checkpoints" / f"step_{step}"
    msd, osd = get_state_dict(net, opt)
    check_space(run, state_bytes(msd) + state_bytes(osd), f"checkpoint step_{step} (rank {rank}'s share)")
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    except Exception as e:
        if no_space(e):
            peak = f"it holds keep_checkpoints + 1 = {keep + 1} checkpoints at its peak" if keep else \
                "keep_checkpoints 0 keeps every one: set it to 2"
            raise NoSpaceError(f"no space left on {run} while writing checkpoint step_{step}: free some, or "
                               f"point output_dir elsewhere; {peak}") from None
        raise
    rng = {"torch": torch.get_rng_state().tolist()}      # the loader's and masks' RNGs derive from its state
    write_durably(path / f"rank{rank}.json", json.dumps({"step": step, "loader": loader.state_dict(), "rng": rng}))
    dist.barrier()
    global last_checkpoint
    if rank == 0:
        sums = {f.name: sha256(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != "done"}
        write_durably(path / "done", json.dumps({"step": step, "sha256": sums}, indent=1))
        last_checkpoint = path      # at once: a Ctrl-C while old ones are removed must name this one (it is done)
        for old in sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    last_checkpoint = path
    return path


def write_durably(path, text):
    """Write a small file so that it is either absent or whole after a crash: temporary, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path):
    """None if the checkpoint at `path` is whole (every file its done marker lists, with that sha256, and
    no other), else the reason in a few words. Run before DCP reads anything: its .metadata is a pickle."""
    try:
        sums = json.loads((path / "done").read_text())["sha256"]
        assert isinstance(sums, dict) and ".metadata" in sums and all(isinstance(v, str) for v in sums.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return "its done marker holds no checksums (cut, or written by an older version)"
    on_disk = {f.name for f in path.iterdir() if f.name != "done"}
    if on_disk - set(sums):
        return f"{sorted(on_disk - set(sums))[0]} is not one of its files"
    for name, digest in sums.items():
        if name not in on_disk:
            return f"{name} is missing"
        if sha256(path / name) != digest:
            return f"{name} is damaged (its sha256 differs from the one recorded at save)"
    return None


def load_checkpoint(path, net, opt=None, loader=None, rank=0):
    """Restore checkpoint `path` into net and, resuming a run, opt, the loader's position and the RNG;
    returns its step. opt None: the model alone (the optimizer's state stays on disk)."""
    mine = json.loads((path / f"rank{rank}.json").read_text())
    if opt is None:
        state = {"model": get_model_state_dict(net)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(net, state["model"])
        return mine["step"]
    msd, osd = get_state_dict(net, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loader.load_state_dict(mine["loader"])
    torch.set_rng_state(torch.tensor(mine["rng"]["torch"], dtype=torch.uint8))
    return mine["step"]


def checkpoint_model_state(path):
    """The model's state dict in a checkpoint folder (checkpoints/step_N), read in one process without its
    optimizer, e.g. to fine-tune a run's encoder as it was at step N: PretrainModel's keys (encoder.*,
    decoder.*, ...) as full tensors, whatever the number of ranks that saved it. ValueError (one line) when the
    folder is not a finished, undamaged checkpoint: verified before DCP reads its pickled .metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    path = Path(path)
    why = verify_checkpoint(path) if (path / "done").is_file() else "it has no done marker (not a finished checkpoint)"
    if why:
        raise ValueError(f"{path} cannot be read as a checkpoint: {why}")
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)        # DCP flattens {"model": {k: v}} to "model.k"
          for k, m in meta.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():       # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    return sd


# Keys a run may change when it resumes: they do not change what it computes. epochs continues a finished
# run (or ends one sooner); everything else must match the saved recipe.yaml.
RESUMABLE_CHANGES = ("epochs", "name", "output_dir", "resume", "save_every", "keep_checkpoints", "device", "eval_data_path", "log_every",
                     "log_seconds", "eval_every", "test_num_segment", "wandb")


class ResumeError(ValueError):
    """A run that must not resume as asked; the message is one line saying what to do."""


def checkpoints(run):
    """The run's finished checkpoints (those with a done marker), newest first; not yet verified."""
    done = (run / "checkpoints").glob("step_*/done")
    return [p.parent for p in sorted(done, key=lambda p: int(p.parent.name.split("_")[1]), reverse=True)]


def resume(run, r, net, opt, loader, rank):
    """Where the run in `run` starts: (step, checkpoint) from its newest good checkpoint, or (0, None).

    resume false starts fresh: the run's old checkpoints are removed (else a later rerun would resume
    from them). A checkpoint whose files do not match the checksums of its done marker (cut, emptied,
    missing, replaced) is named in one warning and the one before it is used. Raises ResumeError when
    the recipe differs from the saved recipe.yaml in a key that changes the result."""
    folder = run / "checkpoints"
    if not r["resume"]:
        if rank == 0 and folder.exists():
            log.warning(f"{run}: resume false: starting fresh, its old checkpoints removed")
            shutil.rmtree(folder)
        dist.barrier()
        return 0, None
    found = checkpoints(run)
    if found:
        check_recipe_unchanged(run, r)
    for path in found:
        reason = [verify_checkpoint(path) if rank == 0 else None]
        dist.broadcast_object_list(reason)                 # rank 0 decides for all: they must agree
        if reason[0] is None:
            global last_checkpoint
            last_checkpoint = path
            return load_checkpoint(path, net, opt, loader, rank), path
        if rank == 0:
            log.warning(f"checkpoint {path} not used: {reason[0]}; trying the one before it")
    if found and rank == 0:
        log.warning(f"{run}: no usable checkpoint; starting from step 0")
    return 0, None


def check_recipe_unchanged(run, r):
    """Raise ResumeError naming the keys whose values differ from the run's saved recipe.yaml (other than
    RESUMABLE_CHANGES): resuming would silently mix two recipes, or fail on a model of another size."""
    try:
        saved = yaml.safe_load((run / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return                                             # nothing to compare with (a run of an older version)
    if not isinstance(saved, dict):
        return
    allowed = set(RESUMABLE_CHANGES) | set(r.get("resume_changes") or ()) | {"resume_changes"}
    differ = [k for k in r if k not in allowed and k in saved and saved[k] != r[k]]
    if differ:
        shown = ", ".join(f"{k} {saved[k]!r} -> {r[k]!r}" for k in differ)
        raise ResumeError(f"{run} was trained with another recipe ({shown}): resuming would mix the two. Start a new "
                          f"run with --name NEW, or this one afresh with --resume false (its checkpoints are removed), "
                          f"or rerun with the saved values ({run / 'recipe.yaml'}), or allow these changes with "
                          f"--resume_changes {','.join(differ)}")


def all_finite(net):
    """Whether every parameter of net (every rank's shards, under FSDP2) is finite: the same answer on all ranks."""
    ok = torch.ones(1, device=next(net.parameters()).device)
    for p in net.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            ok.zero_()
            break
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def keep_metrics(path, step):
    """Drop the metrics.jsonl lines a killed run logged past the checkpoint it resumes from, and a last
    line torn by a crash (disk full, power lost)."""
    if path.exists():
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["step"] <= step:
                    rows.append(line)
            except (ValueError, KeyError, TypeError):
                pass                                       # torn or foreign: not a step of this run
        path.write_text("".join(line + "\n" for line in rows))
