"""What finetune.py's commands share: the checks before any work, the classifier they train or score (built
from the recipe, weights loaded, frozen for a probe, sharded), its file (model.pth), and its final scores.

    r, rank, world, device = start(recipe, overrides)          # recipe, weights, labels, process group: or one line
    clf = classifier(r, rank, world, device, probe=False)      # the Encoder with its head (mme.model)
    result, truth, predicted = score(clf, r, rank, world, device)   # evaluate.classify, or one line
    state = classifier_state(clf, mode, r)                     # model.pth's content
    finish(r, rank, path, result, truth, predicted)            # eval.json, confusion.png, the lines; leaves the group
"""

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mme import evaluate, model as models, recipe as recipes
from mme.online import data
from mme.progress import console, fail
from mme.train import setup_distributed, shard


def start(recipe, overrides, need_head=False):
    """The recipe (finetune.py needs num_classes), the weights, the shards' labels (within num_classes, and some
    evaluation samples) and the process group, checked before any work: one line and exit 2 for any of them."""
    try:
        r = recipes.load(recipe, **overrides)
        if r["num_classes"] is None:
            raise recipes.RecipeError(f"{recipe}: num_classes is required for finetune.py")
        models.check_weights(r["finetune"], need_head)
        if not need_head:                                        # eval reads the evaluation split only
            data.check_labels(r["data_path"], "train", r["num_classes"])
        data.check_labels(r["eval_data_path"] or r["data_path"], "val", r["num_classes"])
        rank, world, device = setup_distributed(r["device"], r["num_workers"])
    except (ValueError, FileNotFoundError) as e:               # RecipeError, WeightsError, no such device
        fail(e)
    return r, rank, world, device


def classifier(r, rank, world, device, probe=False, need_head=False):
    """The classifier, loaded from r["finetune"] (random when null) and sharded with FSDP2 over several
    processes; probe: everything frozen but the head, with MAE's BatchNorm before it (mme.model.add_probe_norm)."""
    torch.manual_seed(r["seed"] + rank)
    clf = models.encoder(r["model"], r["num_frames"], r["input_size"], r["depth"], patch_embed=r["patch_embed"],
                         num_classes=r["num_classes"], drop_path=r["drop_path"], pool=r["pool"])
    if r["finetune"]:
        try:
            skipped = models.load_weights(clf, r["finetune"], need_head)
        except models.WeightsError as e:
            fail(e, rank)
        if rank == 0:
            console.print(f"weights: {r['finetune']}" + (f" ({len(skipped)} keys not for this model)" if skipped else ""))
    elif need_head:
        fail(f"finetune null: eval needs {models.CLASSIFIER}", rank)
    if probe:
        clf.requires_grad_(False)
        models.add_probe_norm(clf)
        clf.head.requires_grad_(True)       # the head (BatchNorm + Linear) is all that trains
    clf.to(device)
    if world > 1:                            # one process runs unwrapped (mme.train.shard says why)
        shard(clf)
    return clf


def score(clf, r, rank, world, device):
    """evaluate.classify, or one line when the evaluation data cannot be read."""
    try:
        return evaluate.classify(clf, r, rank, world, device)
    except (FileNotFoundError, ValueError) as e:
        fail(f"eval data {r['eval_data_path'] or r['data_path']}: {e}", rank)


def classifier_state(clf, mode, r):
    """model.pth's content (mme.model.classifier_checkpoint): the classifier's full state dict in the released
    layout (a probe's BatchNorm folded into its head), the class names, the recipe and the extraction params."""
    full = get_model_state_dict(clf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    manifest = data.stream.read_manifest(str(r["eval_data_path"] or r["data_path"]).rstrip("/")) \
        if isinstance(r["eval_data_path"] or r["data_path"], str) else None
    return models.classifier_checkpoint(models.fold_probe_norm(full) if mode == "probe" else full, evaluate.class_names(r),
                                        r, (manifest or {}).get("params"))


def finish(r, rank, path, result, truth, predicted, note=console.print):
    """Rank 0 writes eval.json and confusion.png and prints the scores; every rank leaves the process group."""
    if rank == 0:
        evaluate.write(path, result, truth, predicted, r["num_classes"], evaluate.class_names(r))
        note(f"eval (the last model): top-1 {result['top1']:.1f} %, top-5 {result['top5']:.1f} % "
             f"({result['videos']} videos, {result['views']} views)")
        if "best" in result:
            note(f"best validation: top-1 {result['best']['top1']:.1f} % at step {result['best']['step']} -> {result['best']['weights']}")
        note(f"done: {path / 'eval.json'}, {path / 'confusion.png'}")
    dist.barrier()
    dist.destroy_process_group()
