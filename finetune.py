"""Linear probing, fine-tuning and multi-view evaluation of a pre-trained encoder (paper Tables 4, 15).

    python pretrain.py --recipe recipes/tiny.yaml                      # -> runs/tiny/encoder.pth
    python finetune.py probe --recipe recipes/probe_tiny.yaml          # frozen encoder, linear head (Table 4)
    python finetune.py full --recipe recipes/finetune_tiny.yaml        # every layer (Table 15)
    python finetune.py full --recipe recipes/finetune_tiny.yaml --pool attentive   # ours: a head that reads every token
    python finetune.py full --recipe recipes/finetune_tiny.yaml --head_init probe  # LP-FT: the head fitted on the frozen encoder first
    python finetune.py eval --recipe recipes/probe_tiny.yaml --finetune runs/probe_tiny/model.pth
    torchrun --nproc_per_node=8 finetune.py full --recipe recipes/ssv2_finetune.yaml --finetune runs/ssv2/encoder.pth
    python finetune.py probe --recipe recipes/probe_tiny.yaml --finetune null --name probe_random   # the random baseline
    python finetune.py frozen --recipe recipes/probe_tiny.yaml        # frozen features: probe, k-NN, attentive probe
    python finetune.py frozen --recipe recipes/probe_tiny.yaml --finetune runs/tiny/checkpoints/step_100 --name at_100
    python finetune.py report --recipe recipes/probe_tiny.yaml --finetune runs/learn_tiny/encoder.pth   # -> runs/learn_tiny/report.md
    python finetune.py predict --finetune runs/finetune_tiny/model.pth clip1.mp4 videos/   # top-5 classes per video
    python finetune.py export hf_model/ --finetune runs/finetune_tiny/model.pth --to hf       # transformers' VideoMAE

The recipe's `finetune` names the weights to start from: pretrain.py's encoder.pth, one of its
checkpoints (runs/NAME/checkpoints/step_N: the encoder as it was at step N, e.g. to see when a run learnt
what), a released VideoMAE/MME checkpoint (any wrapping), or null for a randomly initialised encoder. probe trains only
the head on the frozen encoder (mean of the tokens -> fc_norm, loaded from the pre-training's final norm
-> head; MAE's BatchNorm before it, folded into it when saved), with the recipe's crops and flips only;
full trains everything with layer decay, drop path, label smoothing, mixup/cutmix, RandAugment and
repeated sampling as the recipe says (Table 15); with pool: attentive its head is a query attending to
every token, told where each is (mme/model.py AttentiveHead), instead of the mean token (export needs
the mean); with head_init: probe the head is first fitted on the frozen encoder's features of the training
clips as `frozen` fits its probe (LP-FT; mme/frozen.py fit_head), then everything trains. Both write
runs/<name>/ as pretrain.py does (mme/run.py: recipe.yaml, log.txt, metrics.jsonl, TensorBoard events,
loss.png, checkpoints/ that a killed run resumes from), then model.pth ({"model":
the classifier in the released layout, backbone + fc_norm + head, with the class names, the recipe and
the extraction params, so that predict needs nothing else}), eval.json (top-1/top-5 and recall per
class over videos: every clip window, or test_num_segment of them, x test_num_crop crops, softmax
averaged) and confusion.png; with eval_every N also val.jsonl and best.pth."""
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # before torch: see pretrain.py

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mme import (
    export as export_lib,
    frozen as frozen_lib,
    model as models,
    predict as predict_lib,
    recipe as recipes,
    report as report_lib,
)
from mme.finetuning import classifier, classifier_state, finish, score, start
from mme.online import augment, data
from mme.progress import Board, console, fail
from mme.run import Run, timed
from mme.train import autocast, command_line, optimizer_step, param_groups, set_lr, setup_distributed


def train(mode, recipe, **overrides):
    r, rank, world, device = start(recipe, overrides)
    if mode == "probe" and r["pool"] != "mean":
        fail("pool attentive: probe trains a Linear head on the mean token (Table 4); the attentive probe of the "
             "frozen tokens is `finetune.py frozen`, an attentive head trained with the encoder `finetune.py full`", rank)
    if mode == "probe" and r["head_init"] != "random":
        fail("head_init probe: for full (LP-FT); probe trains its head alone from the start", rank)
    if mode == "probe":                      # a frozen encoder: the recipe's crops and flips only
        r.update(drop_path=0.0, rand_aug=None, repeated_aug=1, mixup=0.0, cutmix=0.0, smoothing=0.0)
    if r["batch_size"] % world:
        fail(f"batch_size {r['batch_size']} must divide by world size {world}", rank)
    try:                                     # the evaluation data too, before any training
        loader = data.build_loader(r["data_path"], dict(r, target="none"), train=True, rank=rank, world_size=world, device=device)
        data.shard_urls(r["eval_data_path"] or r["data_path"], "val")
    except (FileNotFoundError, ValueError) as e:
        fail(f"data_path {r['data_path']}: {e}", rank)
    clf = classifier(r, rank, world, device, probe=mode == "probe")
    opt = torch.optim.AdamW(param_groups(clf, r["weight_decay"], r["layer_decay"] if mode == "full" else None),
                            lr=0.0, betas=tuple(r["opt_betas"]))
    run = Run(r, clf, opt, loader, rank, world, device, len(loader), mode)
    if mode == "full" and r["head_init"] == "probe" and run.step == 0:   # LP-FT; a resumed run has its head
        run.note("head: fitting the probe on the frozen encoder's training clips first (head_init probe)")
        try:
            run.note(frozen_lib.fit_head(clf, r, rank, world, device))
        except (FileNotFoundError, ValueError) as e:
            fail(f"head_init probe: data_path {r['data_path']}: {e}", rank)
    amp, best, last = autocast(device, r["precision"]), run.best_so_far() if rank == 0 else None, None
    mixing, smoothing = r["mixup"] > 0 or r["cutmix"] > 0, r["smoothing"]
    clf.train()
    while not run.done:
        tick = time.perf_counter()
        for b, wait in timed(loader):
            lr = run.lr()
            set_lr(opt, lr)
            video, labels = b["video"], b["label"]
            rng = np.random.default_rng([r["seed"], rank, run.step, 11])       # mixing draws, the same on resume
            if mixing:
                video, soft, _ = augment.mix(video, labels, rng, r["num_classes"], r["mixup"], r["cutmix"], smoothing=smoothing)
            else:
                soft = augment.smooth_one_hot(labels, r["num_classes"], smoothing)
            with amp:
                loss = augment.soft_cross_entropy(clf(video).float(), soft)
            loss.backward()
            run.log(optimizer_step(clf, opt, loss, r["clip_grad"], world), lr, len(labels) * world, time.perf_counter() - tick, wait)
            epoch, epoch_end = divmod(run.step, run.steps_per_epoch)
            if r["eval_every"] and not epoch_end and (epoch % r["eval_every"] == 0 or run.done):
                # before the checkpoint: a run killed while validating validates again when it resumes
                last = validate(clf, r, run, mode, epoch, best, device)
                best = last[-1]
                clf.train()
            if run.save_due():
                run.checkpoint(clf, opt, loader)
            tick = time.perf_counter()
            if run.done:
                break
    run.finish({"model.pth": classifier_state(clf, mode, r)}, curve_label="loss (cross-entropy)")
    if last is not None and last[0] == run.step:          # the last model was just validated: the same views
        result, truth, predicted = last[1:4]
    else:
        result, truth, predicted = score(clf, r, rank, world, device)
        if rank == 0:
            run.board.add(run.step, **{"val/top1": result["top1"], "val/top5": result["top5"]})
    if rank == 0 and r["eval_every"] and best is not None:
        result["best"] = {"step": best[1], "top1": best[0], "weights": str(run.path / "best.pth")}
    run.close()
    finish(r, rank, run.path, result, truth, predicted, run.note)


def validate(clf, r, run, mode, epoch, best, device):
    """A validation during training (mme.run.Run.validated); best.pth is the classifier of the best top-1 so far.
    Returns (step, result, truth, predicted, best)."""
    run.check_finite(clf)                                # never score (or keep as best.pth) blown weights
    result, truth, predicted = score(clf, r, run.rank, dist.get_world_size(), device)
    state = classifier_state(clf, mode, r) if run.is_best(result, best) else None   # every rank gathers the state dict
    return run.step, result, truth, predicted, run.validated(result, epoch, best, state)


def probe(recipe, **overrides):
    """Linear probe (Table 4): train the head on the frozen encoder, then evaluate. Any recipe key can
    be given as --key value (every key, its default and its table: mme/recipe.py DEFAULTS)."""
    train("probe", recipe, **overrides)


def full(recipe, **overrides):
    """Fine-tune every layer (Table 15), then evaluate. Any recipe key can be given as --key value
    (every key, its default and its table: mme/recipe.py DEFAULTS)."""
    train("full", recipe, **overrides)


def eval(recipe, **overrides):
    """Evaluate a classifier (model.pth of probe/full, or a released fine-tuned checkpoint). recipe["finetune"]
    names it; it is scored on eval_data_path (default: the val split of data_path); --key value overrides any key."""
    r, rank, world, device = start(recipe, overrides, need_head=True)
    clf = classifier(r, rank, world, device, need_head=True)
    result, truth, predicted = score(clf, r, rank, world, device)
    path = Path(r["output_dir"]) / r["name"]
    if rank == 0:                                         # TensorBoard (and W&B if asked), as a training run's validation
        board = Board(path, 0, console.print, r["wandb"], r)
        board.add(0, **{"val/top1": result["top1"], "val/top5": result["top5"]})
        board.close()
    finish(r, rank, path, result, truth, predicted)


def frozen(recipe, knn_k=10, knn_T=0.07, attentive=True, attentive_steps=frozen_lib.ATTENTIVE["steps"], **overrides):
    """Frozen features: logistic regression + k-NN + attentive probe, no fine-tuning. mme/frozen.py: tokens of
    the encoder in recipe["finetune"] (null: random), once per view, cached in runs/<name>/features.pt; a
    logistic-regression probe (l2 chosen on held-out training videos) and a k-NN (knn_k neighbours, temperature
    knn_T) on their mean, and (attentive) an attentive probe on all of them (attentive_steps AdamW steps of
    batch 32). --key value overrides any key."""
    try:
        attentive = recipes.cli_bool(attentive, "attentive")
        attentive_steps = recipes.cli_count(attentive_steps, "attentive_steps")
    except ValueError as e:
        fail(e)
    r, rank, world, device = start(recipe, overrides)
    result = run_frozen(r, Path(r["output_dir"]) / r["name"], rank, world, device, knn_k, knn_T, attentive, attentive_steps)
    if rank == 0:
        report_lib.print_frozen(result, r["name"])
    dist.barrier()
    dist.destroy_process_group()


def run_frozen(r, folder, rank, world, device, knn_k, knn_T, attentive, attentive_steps, reuse=False):
    try:
        return frozen_lib.run(r, folder, rank, world, device, knn_k, knn_T, attentive, reuse, say=console.print,
                              attentive_steps=attentive_steps)
    except (FileNotFoundError, ValueError) as e:             # no shards, no split, labels out of range, a bad weights file
        fail(e, rank)


def report(recipe, knn_k=10, knn_T=0.07, attentive=True, attentive_steps=frozen_lib.ATTENTIVE["steps"], floor_samples=256, **overrides):
    """A pre-training run's report.md, against a random encoder of its architecture. --finetune
    runs/<run>/encoder.pth (a pretrain.py run folder, with its recipe.yaml and metrics.jsonl). Runs the frozen
    evaluation (as `frozen`) of that encoder into runs/<run>/frozen/ and of a random encoder of the same
    architecture (the recipe's seed) into runs/<run>/frozen_random/, with model, depth, patch_embed, num_frames, input_size,
    sampling_rate taken from the run's recipe.yaml unless given here (an eval.json of the same weights, shards and keys is
    read back, not recomputed). Writes runs/<run>/report.md (mme/report.py): this run against the random
    encoder, recall per class, the loss curve with the loss of predicting the mean target (from floor_samples
    training clips), Fig. 4 for validation clips, the confusion matrix; other runs of the same recipe (other
    seeds) in a table of their own."""
    try:
        attentive = recipes.cli_bool(attentive, "attentive")
        attentive_steps = recipes.cli_count(attentive_steps, "attentive_steps")
        weights = recipes.load(recipe, **overrides)["finetune"]
        if not weights:
            raise ValueError("report needs a pre-trained encoder: --finetune runs/<run>/encoder.pth")
        run = Path(weights).parent
        pre = recipes.load(str(run / "recipe.yaml"))
    except FileNotFoundError as e:
        fail(f"{e}: report reads the pre-training's recipe.yaml beside the encoder (a pretrain.py run folder)")
    except ValueError as e:
        fail(e)
    taken = {k: pre[k] for k in report_lib.FROM_RUN if k not in overrides}
    r, rank, world, device = start(recipe, {**taken, **overrides})
    if rank == 0:
        console.print(f"from {run / 'recipe.yaml'}: " + ", ".join(f"{k} {v}" for k, v in taken.items()))
    this = run_frozen(r, run / "frozen", rank, world, device, knn_k, knn_T, attentive, attentive_steps, reuse=True)
    random = run_frozen(dict(r, finetune=None), run / "frozen_random", rank, world, device, knn_k, knn_T, attentive, attentive_steps,
                        reuse=True)
    report_lib.write(run, pre, r, this, random, floor_samples, rank, world, device, say=console.print)
    dist.barrier()
    dist.destroy_process_group()


def predict(*videos, finetune=None, out="predictions.jsonl", top=5):
    """Classify raw videos (files, or folders of them) with a fine-tuned model.pth. mme/predict.py: decoded and cut
    into clip windows as extract.py does, scored as `eval` scores (the recipe's views x crops, softmax averaged);
    prints each video's top classes and writes one JSON line per video to `out`. An unusable video is one line,
    the others go on."""
    try:
        setup_distributed("auto", 0)
        predict_lib.run(videos, finetune, out, top, say=console.print)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    dist.destroy_process_group()


def export(out=None, finetune=None, to="hf"):
    """Weights for other tools (mme/export.py): --to hf writes OUT/ for transformers' VideoMAE (config.json +
    model.safetensors; a model.pth loads as VideoMAEForVideoClassification, an encoder.pth as VideoMAEModel);
    --to safetensors writes the state dict beside --finetune as .safetensors (OUT unused)."""
    try:
        if to not in ("hf", "safetensors") or (to == "hf" and not out):
            raise ValueError(f"--to {to!r}: hf (with an OUT folder) or safetensors")
        models.check_weights(finetune or "")
        done = export_lib.to_hf(finetune, out) if to == "hf" else export_lib.safetensors_beside(finetune)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    console.print(f"done: {out} ({done})" if to == "hf" else f"done: {done}")


COMMANDS = {"probe": probe, "full": full, "eval": eval, "frozen": frozen, "report": report, "predict": predict, "export": export}


def usage(command=None):
    """--help: the module's text and its commands, or one command's with every recipe key (type, default, table)."""
    import inspect
    if command is None:
        listed = "\n".join(f"  {name:7s} {' '.join(inspect.getdoc(fn).split('. ')[0].split())}" for name, fn in COMMANDS.items())
        return (f"{__doc__.strip()}\n\nusage: python finetune.py COMMAND --recipe FILE [--key value ...]\n\n"
                f"commands:\n{listed}\n\npython finetune.py COMMAND --help lists every recipe key.")
    if command in ("predict", "export"):
        use = {"predict": "--finetune MODEL.pth VIDEO|FOLDER [...] [--out F] [--top K]",
               "export": "[OUT] --finetune WEIGHTS [--to hf|safetensors]"}
        return f"usage: python finetune.py {command} {use[command]}\n\n{inspect.getdoc(COMMANDS[command])}"
    extra = {"frozen": " [--knn_k K] [--knn_T T] [--attentive false] [--attentive_steps N]",
             "report": " --finetune runs/RUN/encoder.pth [--knn_k K] [--knn_T T] [--attentive false] [--attentive_steps N]"
                       " [--floor_samples N]"}
    return (f"usage: python finetune.py {command} --recipe FILE{extra.get(command, '')} [--key value ...]\n\n"
            f"{inspect.getdoc(COMMANDS[command])}\n\n"
            f"Recipe keys: a recipe file sets them as 'key: value' lines; --key value on the command line wins.\n\n"
            f"{recipes.keys_help()}")


if __name__ == "__main__":
    command_line(COMMANDS, lambda args: usage(args[0] if args and args[0] in COMMANDS else None))
