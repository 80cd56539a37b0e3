"""The report of a pre-training run (finetune.py report wires it): report.md, the page a newcomer reads,
with this run against a random encoder of its architecture first, and what a predict-the-mean model's
loss would be.

    write(run, pre, r, this, random, floor_samples, rank, world, device)   # -> runs/<run>/report.md (+ figures)
    floor, label = loss_floor(run, recipe, samples)   # the loss of predicting the mean target, cached
    line = plateau_line(metrics_path, floor)           # pretrain.py's last word: did the loss leave that level?
    floor = mean_loss(batches, widths, visible)        # batches: loader dicts -> (loss, mean target [N, D])
    text = markdown(run, pre, steps, this, random, ...)  # report.md's text
    others = same_recipe_runs(run, pre)                # other pre-trainings of this recipe (seeds) with a frozen eval
    cells = table_cells(text)                          # {row label: [cell, ...]} of report.md's tables
    print_frozen(result, name)                          # a frozen evaluation's table on the console

The loss floor: for each token position n, the mean over the samples of the target as the loss sees
it (each part divided by its rms over the batch with loss_balance, mme.model.part_rms; weighted by the
loader's 0/1 token weights), predicted for every clip; its mme.model.mme_loss per batch (masked tokens,
plus loss_visible x the visible ones), averaged over the batches. A model that has learnt nothing about
the clip it sees cannot do better per position; the training loss below that line is learnt motion.

Other runs of the same recipe (the run folders beside this one whose recipe.yaml differs only in name,
seed or output_dir, and that have their own frozen/eval.json) go in a separate, labelled table: they are
other pre-trainings, shown with the seeds found, never mixed into this run's row.
"""
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.table import Table

from mme import evaluate, figures, model, recipe as recipes
from mme.online import data, targets
from mme.progress import console
from mme.train import autocast, checkpoints, load_checkpoint, verify_checkpoint

TARGET_NAMES = {"mme": "MME", "pixel": "pixel (VideoMAE)", "hog": "HOG (MaskFeat)"}
FROM_RUN = ("model", "depth", "patch_embed", "num_frames", "input_size", "sampling_rate")  # what the frozen evaluations take from the run
SEED_LIKE = ("name", "seed", "output_dir", "resume", "wandb", "log_every", "log_seconds", "save_every", "keep_checkpoints",
             "num_workers", "device")
READOUTS = (("probe", "linear probe (mean token)"), ("knn", "k-NN (mean token)"), ("attentive", "attentive probe (all tokens)"))


def balanced(target, weight, widths, per_clip=False):
    """The target in the units the loss compares (mme_loss): each part over its rms over the batch (or clip)."""
    if widths is None:
        return target.float()
    rms = model.part_rms(target, weight, widths, per_clip)
    return torch.cat([p / s for p, s in zip(target.float().split(list(widths), -1), rms)], -1)


def mean_loss(batches, widths=None, visible=0.0, per_clip=False):
    """batches: a list of {"target" [B, N, D], "mask" bool [B, N], "weight" [B, N]} -> (loss, mean
    [N, D]): the mean target per token position (module docstring) and the mme_loss of predicting it,
    averaged over the batches."""
    total = count = 0
    for b in batches:
        w = b["weight"].float()
        total = total + (balanced(b["target"], w, widths, per_clip) * w[..., None]).sum(0)     # [N, D]
        count = count + w.sum(0)                                                    # [N]
    mean = total / count.clamp_min(1e-6)[:, None]
    losses = []
    for b in batches:
        mask = b["mask"].bool()
        B, N, D = b["target"].shape
        full = mean.expand(B, N, D)
        masked = full[mask].reshape(B, -1, D)
        pred = torch.cat([full[~mask].reshape(B, -1, D), masked], 1) if visible else masked   # PretrainModel's order
        losses.append(model.mme_loss(pred, b["target"], mask, b["weight"], widths, visible, per_clip).item())
    return sum(losses) / len(losses), mean


def summary(values):
    """'35.0' for one value, '35.0 ± 2.1' (sample std) for more; '–' where a value is missing."""
    if not values or any(v is None for v in values):
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def day(seconds):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def headline(target, this, random):
    """'MME 35.0 % vs random 6.0 % top-1 (frozen linear probe; attentive probe 49.0 % vs 9.0 %; 100 videos)'. The
    attentive probe is named beside the linear one where both ran: the mean token cancels what tells a motion from
    its time reversal, so on such classes the attentive probe is the read-out that shows what was learnt."""
    both = "attentive" in this and "attentive" in random
    attentive = f"attentive probe {this['attentive']['top1']:.1f} % vs {random['attentive']['top1']:.1f} %; " if both else ""
    return (f"{TARGET_NAMES.get(target, target)} {this['probe']['top1']:.1f} % vs random {random['probe']['top1']:.1f} % "
            f"top-1 (frozen linear probe; {attentive}{this['videos']} videos)")


def same_recipe_runs(run, pre):
    """[(run folder, eval.json of its frozen/)] of the other pre-training runs beside `run` whose recipe equals
    `pre` but for SEED_LIKE keys, and which have a frozen evaluation of their encoder."""
    found = []
    for other in sorted(Path(run).parent.iterdir()):
        if other.resolve() == Path(run).resolve() or not (other / "recipe.yaml").is_file():
            continue
        try:
            theirs = recipes.load(str(other / "recipe.yaml"))
            result = json.loads((other / "frozen" / "eval.json").read_text())
        except (ValueError, OSError):
            continue
        if all(theirs[k] == pre[k] for k in pre if k not in SEED_LIKE):
            found.append((other, result))
    return found


def readout_rows(label, results, seeds, date):
    """Table rows (one per read-out present) of frozen evaluations: mean ± std over `results`."""
    rows = []
    for key, name in READOUTS:
        if all(key in x for x in results):
            rows.append(f"| {label} | {name} | {summary([x[key]['top1'] for x in results])} | "
                        f"{summary([x[key].get('top5') for x in results])} | {seeds} | {date} |")
    return rows


def recall_table(this, random, names):
    """Per-class recall % of each read-out, this run and the random encoder (and per family for the built-in
    synthetic classes)."""
    from mme.offline import synthetic
    keys = [k for k, _ in READOUTS if k in this and "recall" in this[k]]
    if not keys or not names:
        return []
    head = "| class | " + " | ".join(f"{dict(READOUTS)[k].split(' (')[0]} (this run) | random" for k in keys) + " |"
    out = ["## Recall per class", "", head, "|---|" + "---:|---:|" * len(keys)]
    for c, name in enumerate(names):
        cells = [f"{this[k]['recall'][c]:.0f} | {random[k]['recall'][c]:.0f}" if this[k]["recall"][c] is not None else "– | –"
                 for k in keys]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if list(names) == list(synthetic.CLASSES):
        out += ["", "Mean recall per motion family of the built-in classes:", "",
                "| family | " + " | ".join(f"{dict(READOUTS)[k].split(' (')[0]} (this run) | random" for k in keys) + " |",
                "|---|" + "---:|---:|" * len(keys)]
        for family, members in synthetic.FAMILIES.items():
            idx = [synthetic.CLASSES.index(m) for m in members]
            mean = lambda res, k: statistics.fmean(res[k]["recall"][i] for i in idx)
            out.append(f"| {family} | " + " | ".join(f"{mean(this, k):.0f} | {mean(random, k):.0f}" for k in keys) + " |")
    return out + [""]


def markdown(run, recipe, steps, this, random, dates, command, floor_label, figure, others, num_classes, names=None):
    """report.md. run: the run folder; recipe: its recipe.yaml; steps: how many it ran; this / random: the frozen
    evaluations' eval.json; dates: {"run", "this", "random"}; command: the report's command line; floor_label:
    what the loss curve's dashed line is (None: no line); figure: the Fig. 4 file name, or why there is none;
    others: same_recipe_runs(run, recipe); names: class names."""
    target = recipe["target"]
    name = TARGET_NAMES.get(target, target)
    keys = ("target", "model", "depth", "patch_embed", "data_path", "batch_size", "input_size", "num_frames", "mask_ratio",
            "loss_balance", "loss_visible", "patch_norm", "trajectory_density", "shape_target", "seed")   # what a reader compares runs by
    out = [f"# {run.name}: {headline(target, this, random)}", "",
           f"Pre-training run `{run}` ({dates['run']}): {name} target, ViT-{recipe['model']} with "
           f"{recipe['depth'] or 'its default number of'} blocks, {steps} steps of batch "
           f"{recipe['batch_size']} on `{recipe['data_path']}`. Its recipe (every key in `{run / 'recipe.yaml'}`):", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
           "| " + " | ".join(str(recipe.get(k)) for k in keys) + " |", "",
           "Reproduce it:", "", "```bash",
           f"python pretrain.py --recipe {run / 'recipe.yaml'}   # the recipe as run (on another machine, or with --name NEW)",
           command, "```", "",
           "## Does the encoder know the motion classes?", "",
           f"Frozen features of the validation videos ({this['videos']} videos, {this['views']} views, `{this['data']}`), "
           f"the encoder untouched (`finetune.py frozen`, mme/frozen.py): a logistic-regression probe and a "
           f"{this['knn']['k']}-NN on the mean token, and an attentive probe (a learned query attending to every token and its position) "
           f"where it ran. The random encoder is the same architecture, untrained. Chance is {100 / num_classes:.0f} %.", "",
           "| encoder | read-out | top-1 % | top-5 % | seeds | date |", "|---|---|---:|---:|---|---|"]
    out += readout_rows(f"{name} (this run)", [this], str(recipe["seed"]), dates["this"])
    out += readout_rows("random encoder", [random], "–", dates["random"])
    out.append("")
    if others:
        seeds = ", ".join(str(recipes.load(str(o / "recipe.yaml"))["seed"]) for o, _ in others)
        out += ["### Other pre-trainings of this recipe", "",
                f"Not this run: the run folders beside it with the same recipe but for the seed ({', '.join(o.name for o, _ in others)}), "
                "each with its own frozen evaluation; mean ± std over them.", "",
                "| encoder | read-out | top-1 % | top-5 % | seeds | date |", "|---|---|---:|---:|---|---|"]
        out += readout_rows(f"{name} (other runs)", [r for _, r in others], seeds,
                            max(day((o / "frozen" / "eval.json").stat().st_mtime) for o, _ in others))
        out.append("")
    out += recall_table(this, random, names)
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
    loss, _ = mean_loss(batches, targets.loss_widths(pre), pre["loss_visible"], pre["balance_per_clip"])
    balance = "; each part in units of its rms over the batch" if pre["loss_balance"] else ""
    tokens = f"masked tokens + {pre['loss_visible']:g} x visible tokens" if pre["loss_visible"] else "masked tokens"
    label = (f"{loss:.3f}, the loss of predicting, at each token position, the mean training target ({seen} clips, "
             f"the run's augmentation and masks{balance}; {tokens})")
    cache.write_text(json.dumps({"source": source, "loss": loss, "label": label}, indent=1) + "\n")
    note(f"loss floor: {loss:.4f} from {seen} training clips in {time.perf_counter() - tick:.0f} s -> {cache}")
    return loss, label


def plateau_line(metrics_path, floor, share=0.1, stayed_at=0.98, begun_at=0.9):
    """One line on where a run's loss ended against its loss floor: the mean loss over the last `share`
    of its steps (metrics.jsonl) over the floor. At `stayed_at` or above the run has stayed on the plateau where
    the model predicts the mean target whatever the clip; between `begun_at` and that it has only begun to
    leave it. docs/results.md, Learning depth: conv_tiny (conv stem) seed 1 on the built-in clips ended at 1.00, read at
    chance; on the held-out sets runs ending at 0.90-0.97 read 29-55 % (random 8-9), the built-in ones at 0.70-0.91."""
    losses = [json.loads(line)["loss"] for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    last = losses[-max(1, round(len(losses) * share)):]
    end = sum(last) / len(last)
    ratio = end / floor if floor > 0 else float("inf")                     # floor 0: the target never varies
    where = f"the last {len(last)} steps' loss is {end:.3f}, {ratio:.2f} x the loss of predicting the mean target ({floor:.3f})"
    if ratio < begun_at:
        return f"{where}: the model has learnt from the clips it sees"
    if ratio < stayed_at:
        return f"{where}: the run has begun to leave that plateau; more steps (--min_steps) may teach it more"
    return (f"{where}: the run has not left the plateau and its encoder has likely learnt nothing; run it again with "
            f"another --seed, or more steps (--min_steps)")


def trajectory_figure(run, pre, rank, world, device, note=print):
    """Fig. 4 of the run for validation clips: its trajectories.png if pretrain.py drew them, else redrawn there
    from the run's newest good checkpoint (every rank loads it). Returns the file's name, or a line saying why
    there is none."""
    name = TARGET_NAMES.get(pre["target"], pre["target"])
    if pre["target"] != "mme":
        return f"No Fig. 4: this run's target is {name}; trajectories are drawn for the MME target only."
    path = run / "trajectories.png"
    found = [None]
    if rank == 0 and not (figures.figure_note(path) or "").startswith("validation clips"):
        found = [next((str(p) for p in checkpoints(run) if verify_checkpoint(p) is None), "none")]
    dist.broadcast_object_list(found)                       # rank 0 decides: every rank loads, or none
    if found[0] == "none":
        return (f"No Fig. 4 for validation clips: {path.name} shows training clips and {run / 'checkpoints'} holds no "
                "good checkpoint to redraw from.")
    if found[0]:
        net = model.PretrainModel.from_recipe(pre, targets.target_dim(pre)).to(device)
        load_checkpoint(Path(found[0]), net, rank=rank)   # the model alone
        fig = evaluate.trajectories(net, pre, rank, world, device, autocast(device, pre["precision"]))
        if rank == 0:
            figures.trajectory_figure(path, **fig)
            note(f"Fig. 4 for validation clips, from {found[0]} -> {path}")
    return path.name


def write(run, pre, r, this, random, floor_samples, rank, world, device, say=print):
    """report.md of the pre-training run folder `run` (recipe `pre`), from the frozen evaluations of its encoder
    (`this`) and of a random one (`random`) under the evaluation recipe `r`; the loss curve with the loss floor
    and Fig. 4 beside it. Every rank calls it (Fig. 4 may run the model); rank 0 writes and prints the headline."""
    import shlex
    import sys
    figure = trajectory_figure(run, pre, rank, world, device, note=say)
    if rank:
        return
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").exists() else []
    try:
        floor, floor_label = loss_floor(run, pre, floor_samples, note=say)
    except (FileNotFoundError, ValueError) as e:          # the run's training shards are not here
        say(f"no loss floor: data_path {pre['data_path']}: {e}")
        floor, floor_label = None, None
    if rows:
        figures.loss_curve(run / "metrics.jsonl", run / "loss.png", label="training loss",
                           title=f"{run.name}: {TARGET_NAMES.get(pre['target'], pre['target'])} pre-training",
                           floor=floor, floor_label=floor_label and f"predicting the mean target: {floor:.3f}")
    when = lambda path: day(path.stat().st_mtime)
    text = markdown(run, pre, rows[-1]["step"] if rows else "?", this, random,
                    {"run": when(Path(r["finetune"])), "this": when(run / "frozen" / "eval.json"),
                     "random": when(run / "frozen_random" / "eval.json")},
                    "python finetune.py " + shlex.join(sys.argv[1:]), floor_label, figure, same_recipe_runs(run, pre),
                    r["num_classes"], evaluate.class_names(r))
    (run / "report.md").write_text(text)
    print(run / "report.md")
    print(headline(pre["target"], this, random))


def print_frozen(result, name):
    """A frozen evaluation's scores as a table on the console."""
    table = Table(title=f"{name} (frozen): {result['videos']} videos, {result['views']} views")
    for col in ("", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    for key, label in READOUTS:
        if key in result:
            extra = {"probe": f" (l2 {result['probe'].get('l2', 0):g})", "knn": f" (k {result['knn'].get('k')})"}.get(key, "")
            table.add_row(label + extra, f"{result[key]['top1']:.1f}", f"{result[key]['top5']:.1f}")
    console.print(table)


def table_cells(text):
    """{row label: [cells after the label]} of every markdown table row in `text`."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows
