"""The report of a pre-training run (finetune.py report wires it): what a predict-the-mean model's loss
is, which ablation runs exist beside it, and report.md, the page a newcomer reads.

    floor = mean_loss(batches, widths, visible)   # batches: loader dicts (target [B, N, D], mask, weight
                                                  #   [B, N]) -> the loss of predicting the mean target
    floor, label = loss_floor(run, recipe, samples)   # the same over a run's first training clips, cached
    name = trajectory_figure(run, recipe, rank, world, device)   # Fig. 4 on validation clips -> its file name
    rows = ablation_rows(runs, ledger)           # runs/ablate/headline/<row>/s<seed>/frozen/eval.json, else
                                                 #   the ledger (docs/ablate_cells.jsonl) -> rows
    tuned = finetune_rows(runs, ledger)          # runs/ablate/**/s<seed>/finetune/eval.json (or ledger) -> rows
    text = markdown(run, recipe, this, random, ...)   # report.md
    cells = table_cells(text)                    # {row label: [cell, ...]} of report.md's accuracy table

The loss floor: for each token position n, the mean over the samples of the target as the loss sees
it (each part divided by its rms over the batch with loss_balance, mme.model.part_rms; weighted by the
loader's 0/1 token weights), predicted for every clip; its mme.model.mme_loss per batch (masked tokens,
plus loss_visible x the visible ones), averaged over the batches. A model that has learnt nothing about
the clip it sees cannot do better per position; the training loss below that line is learnt motion.

An ablation row is the mean ± std over the seeds found (bench/ablate.py's cells, each its own pre-training
and frozen evaluation), dated by its newest eval.json: they are other runs than the reported one. A cell
whose folder is not on this machine is read from bench/ablate.py's ledger (docs/ablate_cells.jsonl, kept
in git), where made with ablate.py's default recipes; the report says which seeds come from where.
"""
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mme import data, model, targets, viz
from mme.train import autocast, checkpoints, load_checkpoint, verify_checkpoint

TARGET_NAMES = {"mme": "MME", "pixel": "pixel (VideoMAE)", "hog": "HOG (MaskFeat)"}
# bench/ablate.py's headline rows: (folder, label); a folder is ablate.slug(label) (tests/test_ablate.py holds the two equal)
HEADLINE_ROWS = (("random_encoder", "random encoder"), ("mme_trajectory", "MME (trajectory)"),
                 ("pixel_videomae", "pixel (VideoMAE)"), ("hog_maskfeat", "HOG (MaskFeat)"))
# the recipes of bench/ablate.py's cells when it runs with its defaults (those the report reads from the ledger)
ABLATE_RECIPES = {"pretrain": "recipes/learn_tiny.yaml", "frozen": "recipes/probe_tiny.yaml",
                  "finetune": "recipes/finetune_learn_tiny.yaml"}


def balanced(target, weight, widths):
    """The target in the units the loss compares (mme_loss): each part over its rms over the batch."""
    if widths is None:
        return target.float()
    rms = model.part_rms(target, weight, widths)
    return torch.cat([p / s for p, s in zip(target.float().split(list(widths), -1), rms)], -1)


def mean_loss(batches, widths=None, visible=0.0):
    """batches: a list of {"target" [B, N, D], "mask" bool [B, N], "weight" [B, N]} -> (loss, mean
    [N, D]): the mean target per token position (module docstring) and the mme_loss of predicting it,
    averaged over the batches."""
    total = count = 0
    for b in batches:
        w = b["weight"].float()
        total = total + (balanced(b["target"], w, widths) * w[..., None]).sum(0)     # [N, D]
        count = count + w.sum(0)                                                    # [N]
    mean = total / count.clamp_min(1e-6)[:, None]
    losses = []
    for b in batches:
        mask = b["mask"].bool()
        B, N, D = b["target"].shape
        full = mean.expand(B, N, D)
        masked = full[mask].reshape(B, -1, D)
        pred = torch.cat([full[~mask].reshape(B, -1, D), masked], 1) if visible else masked   # PretrainModel's order
        losses.append(model.mme_loss(pred, b["target"], mask, b["weight"], widths, visible).item())
    return sum(losses) / len(losses), mean


def summary(values):
    """'35.0' for one value, '35.0 ± 2.1' (sample std) for more; '–' where a value is missing (the
    ledger keeps top-5 only for cells recorded from their eval.json)."""
    if not values or any(v is None for v in values):
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def day(seconds):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def ablation_cells(runs, part, ledger=None):
    """{"ablate/<table>/<row>/s<seed>": (scores, date, source)} of bench/ablate.py's finished `part`
    ("frozen" or "finetune") evaluations: runs/ablate/<table>/<row>/s<seed>/<part>/eval.json, else the
    line of `ledger` (docs/ablate_cells.jsonl: the scores of cells run on other machines) for the same
    cell made with ablate.py's default recipes and no --override. source: "run" or the ledger's commit."""
    cells = {}
    if ledger is not None and Path(ledger).exists():
        for line in Path(ledger).read_text().splitlines():
            e = json.loads(line) if line.strip() else {}
            if e.get("part") == part and e["recipe"] == ABLATE_RECIPES["pretrain"] and e["by"] == ABLATE_RECIPES[part] \
                    and not e["override"]:
                cells[e["cell"]] = (e["scores"], e["date"], e["commit"])
    for p in sorted((runs / "ablate").glob(f"*/*/s*/{part}/eval.json")):
        if re.fullmatch(r"s\d+", p.parent.parent.name):
            cells["/".join(("ablate", *p.parts[-5:-2]))] = (json.loads(p.read_text()), day(p.stat().st_mtime), "run")
    return cells


def _row(label, found, ledger):
    """One table row from [(seed, (scores, date, source))]: its results, seeds, newest date, and where
    the scores come from."""
    found = sorted(found)
    commits = sorted({src for _, (_, _, src) in found if src != "run"})
    here = sum(src == "run" for _, (_, _, src) in found)
    where = (f"{here} run folder(s) here" if here else "") + (", " if here and commits else "") + \
        (f"{len(found) - here} from {ledger} (commit {', '.join(commits)})" if commits else "")
    return {"label": label, "results": [s for _, (s, _, _) in found], "seeds": [k for k, _ in found],
            "date": max(d for _, (_, d, _) in found), "where": where}


def ablation_rows(runs, ledger=None):
    """The headline rows bench/ablate.py has finished (ablation_cells, frozen part; runs/ablate/headline
    or the ledger): [{label, results (eval.json dicts, by seed), seeds, date, where}]; rows without a
    finished seed are left out."""
    cells, rows = ablation_cells(runs, "frozen", ledger), []
    for folder, label in HEADLINE_ROWS:
        found = [(int(m[1]), v) for c, v in cells.items() if (m := re.fullmatch(rf"ablate/headline/{folder}/s(\d+)", c))]
        if found:
            rows.append(_row(label, found, ledger))
    return rows


def finetune_rows(runs, ledger=None):
    """Fine-tuning cells (ablation_cells, finetune part): [{label "<table>/<row>", results, seeds, date,
    where}], one per <table>/<row>."""
    groups = {}
    for c, v in ablation_cells(runs, "finetune", ledger).items():
        _, table, row, seed = c.split("/")
        groups.setdefault(f"{table}/{row}", []).append((int(seed[1:]), v))
    return [_row(label, found, ledger) for label, found in sorted(groups.items())]


def headline(target, this, random):
    """'MME 35.0 % vs random 6.0 % top-1 (frozen probe, 100 videos)'."""
    return (f"{TARGET_NAMES.get(target, target)} {this['probe']['top1']:.1f} % vs random {random['probe']['top1']:.1f} % "
            f"top-1 (frozen probe, {this['videos']} videos)")


def markdown(run, recipe, steps, this, random, dates, commands, floor_label, figure, ablation, tuned, num_classes):
    """report.md. run: the run folder; recipe: its recipe.yaml; steps: how many it ran; this / random:
    the frozen evaluations' eval.json; dates: {"run", "this", "random"} strings; commands: {"report"};
    floor_label: what the loss curve's dashed line is (None: no line); figure: the Fig. 4 file name, or
    why there is none; ablation / tuned: ablation_rows / finetune_rows."""
    target = recipe["target"]
    name = TARGET_NAMES.get(target, target)
    knn = this["knn"]["k"]
    keys = ("target", "model", "depth", "data_path", "batch_size", "input_size", "num_frames", "mask_ratio",
            "loss_balance", "loss_visible", "patch_norm", "trajectory_density", "seed")   # what a reader compares runs by
    out = [f"# {run.name}: {headline(target, this, random)}", "",
           f"Pre-training run `{run}` ({dates['run']}): {name} target, ViT-{recipe['model']} with "
           f"{recipe['depth'] or 'its default number of'} blocks, {steps} steps of batch "
           f"{recipe['batch_size']} on `{recipe['data_path']}`. Its recipe (every key in `{run / 'recipe.yaml'}`):", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
           "| " + " | ".join(str(recipe.get(k)) for k in keys) + " |", "",
           "Reproduce it:", "", "```bash",
           f"python pretrain.py --recipe {run / 'recipe.yaml'}   # the recipe as run (on another machine, or with --name NEW)",
           commands["report"], "```", "",
           "## Does the encoder know the motion classes?", "",
           f"Frozen features of the validation videos ({this['videos']} videos, {this['views']} views, `{this['data']}`): "
           f"a logistic-regression probe and a {knn}-NN on the encoder's mean token, the encoder untouched "
           f"(`finetune.py frozen`, mme/frozen.py). The random encoder is the same architecture, untrained "
           f"(seed {random.get('fitted_from', {}).get('weights', {}).get('seed', '?')}). Chance is {100 / num_classes:.0f} %.", "",
           f"| encoder | frozen probe top-1 % | frozen probe top-5 % | {knn}-NN top-1 % | seeds | date |",
           "|---|---:|---:|---:|---:|---|",
           f"| {name} (this run) | {this['probe']['top1']:.1f} | {this['probe']['top5']:.1f} | {this['knn']['top1']:.1f} "
           f"| 1 | {dates['this']} |",
           f"| random encoder | {random['probe']['top1']:.1f} | {random['probe']['top5']:.1f} | {random['knn']['top1']:.1f} "
           f"| 1 | {dates['random']} |"]
    for row in ablation:
        res = row["results"]
        out.append(f"| {row['label']} (ablation runs) | {summary([x['probe']['top1'] for x in res])} | "
                   f"{summary([x['probe'].get('top5') for x in res])} | {summary([x['knn']['top1'] for x in res])} | "
                   f"{len(res)} ({', '.join(map(str, row['seeds']))}) | {row['date']} |")
    out.append("")
    if ablation:
        out += ["Rows marked *ablation runs* are other pre-trainings, not this run, with another recipe unless this run's "
                f"is `{ABLATE_RECIPES['pretrain']}`: bench/ablate.py's headline cells (pre-trained by that recipe, scored "
                f"by `{ABLATE_RECIPES['frozen']}` on its own shards) "
                "under `runs/ablate/headline/`, or where a cell's folder is not on this machine its scores as "
                "recorded in bench/ablate.py's ledger, `docs/ablate_cells.jsonl` (mean ± std over the seeds found, "
                "listed in brackets; dated by their newest eval.json or ledger line), made by "
                "`python bench/ablate.py --only headline`; `python bench/ablate.py --only headline --seeds 3` "
                "completes every row to seeds 0-2. Where each row's seeds come from: "
                + "; ".join(f"{row['label']}: {row['where']}" for row in ablation) + ".", ""]
    else:
        out += ["No ablation runs yet (`python bench/ablate.py --only headline --seeds 3` adds their rows).", ""]
    if tuned:
        out += ["Fine-tuning (ablation runs, mean ± std over seeds; `python bench/ablate.py --only headline` "
                "fine-tunes its cells with recipes/finetune_learn_tiny.yaml):", "",
                "| cell | fine-tuned top-1 % | top-5 % | seeds | date |", "|---|---:|---:|---:|---|"]
        out += [f"| {row['label']} | {summary([x['top1'] for x in row['results']])} | "
                f"{summary([x.get('top5') for x in row['results']])} | {len(row['results'])} | {row['date']} |" for row in tuned]
        out += ["", "Where they come from: " + "; ".join(f"{row['label']}: {row['where']}" for row in tuned) + ".", ""]
    else:
        out += ["fine-tuning rows: none run yet", ""]
    out += ["## The loss", "", "![loss](loss.png)", ""]
    if floor_label:
        out += [f"The dashed line: {floor_label}.", ""]
    out += ["## Fig. 4: trajectories of masked patches", ""]
    if figure.endswith(".png"):
        out += [f"![trajectories]({figure})", "",
                "For the first validation clips (row label: the clip's class): (a) the frame, masked patches greyed; "
                "(b) the true trajectories of the masked patches, (c) the model's prediction, (d) the frame. Each line "
                "is where a point of a masked patch moves over the next frames, dark to light with time; the red dot is "
                "where it ends.", ""]
    else:
        out += [figure, ""]
    out += ["## Confusion matrix of the frozen probe (this run)", "", "![confusion](frozen/confusion.png)", "",
            "The random encoder's: [frozen_random/confusion.png](frozen_random/confusion.png).", ""]
    return "\n".join(out)


def loss_floor(run, pre, samples, note=print):
    """(loss, what it is) of predicting the mean target (mme.report.mean_loss) over the first `samples`
    training clips of the run's recipe (its augmentation and masks), kept in runs/<run>/loss_floor.json."""
    cache, source = run / "loss_floor.json", json.loads(json.dumps({"recipe": pre, "samples": samples}))
    try:
        kept = json.loads(cache.read_text())
        if kept["source"] == source:
            return kept["loss"], kept["label"]
    except (OSError, ValueError, KeyError):
        pass
    tick = time.perf_counter()
    batches, seen = [], 0
    for b in data.build_loader(pre["data_path"], pre, train=True, rank=0, world_size=1, device="cpu"):
        batches.append({k: b[k] for k in ("target", "mask", "weight")})
        seen += len(b["target"])
        if seen >= samples:
            break
    loss, _ = mean_loss(batches, targets.loss_widths(pre), pre["loss_visible"])
    balance = "; each part in units of its rms over the batch" if pre["loss_balance"] else ""
    tokens = f"masked tokens + {pre['loss_visible']:g} x visible tokens" if pre["loss_visible"] else "masked tokens"
    label = (f"{loss:.3f}, the loss of predicting, at each token position, the mean training target ({seen} clips, "
             f"the run's augmentation and masks{balance}; {tokens})")
    cache.write_text(json.dumps({"source": source, "loss": loss, "label": label}, indent=1) + "\n")
    note(f"loss floor: {loss:.4f} from {seen} training clips in {time.perf_counter() - tick:.0f} s -> {cache}")
    return loss, label


def trajectory_figure(run, pre, rank, world, device, note=print):
    """Fig. 4 of the run for validation clips (mme.viz.run_figure): its trajectories.png if pretrain.py drew
    them, else redrawn there from the run's newest good checkpoint (every rank loads it). Returns the file's
    name, or a line saying why there is none."""
    name = TARGET_NAMES.get(pre["target"], pre["target"])
    if pre["target"] != "mme":
        return f"No Fig. 4: this run's target is {name}; trajectories are drawn for the MME target only."
    path = run / "trajectories.png"
    found = [None]
    if rank == 0 and not (viz.figure_note(path) or "").startswith("validation clips"):
        found = [next((str(p) for p in checkpoints(run) if verify_checkpoint(p) is None), "none")]
    dist.broadcast_object_list(found)                       # rank 0 decides: every rank loads, or none
    if found[0] == "none":
        return f"No Fig. 4 for validation clips: {path.name} shows training clips and {run / 'checkpoints'} holds no good checkpoint to redraw from."
    if found[0]:
        net = model.PretrainModel.from_recipe(pre, targets.target_dim(pre)).to(device)
        load_checkpoint(Path(found[0]), net, rank=rank)   # the model alone
        viz.run_figure(path, net, pre, rank, world, device, autocast(device, pre["precision"]))
        if rank == 0:
            note(f"Fig. 4 for validation clips, from {found[0]} -> {path}")
    return path.name


def table_cells(text):
    """{row label: [cells after the label]} of every markdown table row in `text`."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows
