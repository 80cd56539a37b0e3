"""The paper's ablations at small scale, on the built-in synthetic data: each cell pre-trains with one
recipe change and scores the encoder by the frozen-feature evaluation (docs/results.md).

    python experiments/ablate.py                                   # every table, 3 seeds (hours on 2 cores)
    python experiments/ablate.py --only table5,fig3 --seeds 1      # some tables, one seed
    python experiments/ablate.py --dry_run                         # print the commands, run nothing
    python experiments/ablate.py --only table8 --override epochs=2      # a quick pass (any recipe key)

A cell is `pretrain.py --recipe RECIPE --seed S --output_dir runs/ablate/<table>/<row> --name s<S> <row's keys>`,
then `finetune.py frozen --recipe EVAL --finetune runs/ablate/.../s<S>/encoder.pth` (logistic-regression probe
and k-NN on frozen features of the val split; "random encoder" rows skip pre-training); the headline's
cells are also fine-tuned, every layer, with the same small budget for every row (`finetune.py full
--recipe recipes/finetune_learn_tiny.yaml`; the random row from scratch). Killed? Rerun
the same command: finished cells (their eval.json) are read back, an interrupted pre-training resumes
from its last checkpoint, so nothing is run twice. Cells that need other shards (L = 8) extract them
once. A row whose recipe is another table's row (Fig. 3's MME, Table 5's trajectory and Table 8's
w/o patch norm are all the base recipe) is one cell, run once and read by every table that has it,
under the first table's name. Each table is written into experiments/tables.md (docs/results.md quotes
them) between `<!-- ablate:NAME -->` markers, mean ± std
over seeds, with the command that runs (or reads back) the whole table. Every finished evaluation is also
recorded, scores only, in experiments/cells.jsonl (committed: one line per cell and part, with its recipes,
overrides, date and commit), so the tables survive a machine whose runs/ folder is gone: a cell whose
eval.json is absent is read from there (same recipes and overrides) instead of being run again.
"""
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

from mme import recipe as recipes

ROOT = Path(__file__).resolve().parents[1]   # where runs, shards and docs are (the commands' cwd)
REPO = ROOT                                  # where the recipes are read from
RANDOM = {"random encoder": True}        # a row marker: no pre-training, the encoder's initial weights

# name -> (title as in the paper, rows: (label, recipe overrides)); the base recipe's own value of
# a key is the row without overrides. L = 8 needs shards extracted with --length 8 (EXTRA_SHARDS).
TABLES = {
    "headline": ("MME against a random encoder and the VideoMAE / MaskFeat targets", [
        ("random encoder", RANDOM), ("MME (trajectory)", {}), ("pixel (VideoMAE)", {"target": "pixel"}),
        ("HOG (MaskFeat)", {"target": "hog"})]),
    "loss": ("The loss (our departures, docs/results.md): what makes the tiny model learn", [
        ("the paper's: patch norm, masked tokens", {"patch_norm": "paper", "loss_balance": False, "loss_visible": 0.0}),
        ("parts balanced, masked tokens", {"loss_visible": 0.0}),
        ("parts balanced, + visible tokens", {})]),
    "fig3": ("Fig. 3: pre-training on temporally shuffled frames", [
        ("pixel", {"target": "pixel"}), ("pixel, shuffled frames", {"target": "pixel", "shuffle_frames": True}),
        ("MME", {}), ("MME, shuffled frames", {"shuffle_frames": True})]),
    "table5": ("Table 5: reconstruction target", [
        ("pixel", {"target": "pixel"}), ("HOG", {"target": "hog"}), ("trajectory w/o shape", {"shape_target": False}),
        ("trajectory", {})]),
    "table6": ("Table 6: sparse vs dense (interpolated) trajectories", [
        ("sparse (input stride)", {"interpolation": False}), ("dense, interpolated", {})]),
    "table7": ("Table 7: trajectory length L", [
        ("L = 4", {"trajectory_length": 4}), ("L = 6", {}), ("L = 8", {"trajectory_length": 8})]),
    "table8": ("Table 8: trajectory normalisation", [
        ("w/o patch norm", {"patch_norm": "none"}), ("w/ patch norm", {"patch_norm": "paper"})]),
    "table9": ("Table 9: trajectories per patch", [
        ("one (mean of the K)", {"trajectory_density": "mean"}), ("K = 4", {})]),
    "table11": ("Table 11: mask ratio (tube)", [
        ("0.4", {"mask_ratio": 0.4}), ("0.7", {"mask_ratio": 0.7}), ("0.9", {"mask_ratio": 0.9})]),
}
TUNED = ("headline",)   # tables whose cells are fine-tuned too (issue #8: the headline rows by probe, k-NN and fine-tuning)
EXTRA_SHARDS = {8: "shards/synthetic4k_L8/"}   # trajectory_length -> shards holding that long a trajectory
EXTRA_CLIPS = 4000                              # training clips in those shards, as recipes/learn_tiny.yaml's
LEDGER = "experiments/cells.jsonl"              # every finished cell's scores (under ROOT), kept in git


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def run(cmd, dry_run, log):
    line = " ".join(cmd)
    print(("(dry run) " if dry_run else "") + line, flush=True)
    if dry_run:
        return
    with open(log, "a") as f:
        f.write(f"\n$ {line}\n")
        f.flush()
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {line}; its output is in {log}")


def recipe_depth(recipe, keys, sets):
    """The encoder's blocks as pre-trained (row key, --override, recipe, in that order), which the frozen
    evaluation must build too (its own recipe is the model size's depth); None: the size's."""
    for source in (keys, sets):
        if "depth" in source:
            return source["depth"]
    return recipes.load(REPO / recipe)["depth"]


def home(keys, recipe):
    """(table, label) of the first row in TABLES whose pre-training is the same as `keys`' once keys
    equal to the recipe file's values are dropped: that row's folder holds the cell. (--override
    applies to every cell alike and is not part of a cell's name.)"""
    base = recipes.load(REPO / recipe)

    def changes(row):
        return row if row == RANDOM else {k: v for k, v in row.items() if base[k] != v}
    return next((t, label) for t, (_, rows) in TABLES.items() for label, k in rows if changes(k) == changes(keys))


def ledger_key(name, part, recipe, by, sets):
    """What makes two evaluations the same cell: its folder, the part, the recipes and the --override keys."""
    return json.dumps([name, part, recipe, by, {k: str(v) for k, v in sorted(sets.items())}])


def read_ledger():
    path = ROOT / LEDGER
    lines = path.read_text().splitlines() if path.exists() else []
    entries = [json.loads(line) for line in lines if line.strip()]
    return {ledger_key(e["cell"], e["part"], e["recipe"], e["by"], e["override"]): e for e in entries}


def record(name, part, recipe, by, sets, result, source):
    """Append one finished evaluation's scores (eval.json less its provenance fields) to the ledger."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    entry = {"cell": name, "part": part, "recipe": recipe, "by": by, "override": {k: str(v) for k, v in sorted(sets.items())},
             "scores": {k: result[k] for k in ("top1", "top5", "probe", "knn", "videos", "views") if k in result},
             "date": time.strftime("%Y-%m-%d", time.localtime(Path(source).stat().st_mtime)), "commit": commit or "unknown",
             "source": str(Path(source).relative_to(ROOT))}
    path = ROOT / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def cell(table, label, keys, seed, recipe, eval_recipe, sets, dry_run, read_only=False, tune_recipe=None):
    # sets: overrides for every pre-training (--override); keys: the row's own
    """Pre-train (unless a random-encoder row) and evaluate one cell by the frozen evaluation and, with
    tune_recipe, by fine-tuning too; returns {"frozen": eval.json, "finetune": eval.json} with None for
    a part not finished (read_only: nothing runs), or None on a dry run."""
    table, label = home(keys, recipe)
    name = f"ablate/{table}/{slug(label)}/s{seed}"
    out = ROOT / "runs" / name
    results = {"frozen": out / "frozen" / "eval.json", "finetune": out / "finetune" / "eval.json" if tune_recipe else None}
    by = {"frozen": eval_recipe, "finetune": tune_recipe}

    def read():
        """Each part's scores: its eval.json (recorded in the ledger if it is not yet), else the ledger's."""
        ledger, found = read_ledger(), {}
        for part, path in results.items():
            key = ledger_key(name, part, recipe, by[part], sets)
            if path is not None and path.exists():
                found[part] = json.loads(path.read_text())
                if key not in ledger and not dry_run:
                    record(name, part, recipe, by[part], sets, found[part], path)
            else:
                found[part] = ledger[key]["scores"] if path is not None and key in ledger else None
        return found
    done = read()
    if read_only or all(results[p] is None or done[p] is not None for p in results):
        return done
    if not dry_run:                              # a dry run leaves no trace
        out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    keys = dict(keys)
    data = EXTRA_SHARDS.get(keys.get("trajectory_length"))
    if data and not (ROOT / data / "manifest.json").exists():
        for split, limit in (("train", ["--limit", str(EXTRA_CLIPS)]), ("val", [])):
            run(["extract.py", "--src", "synthetic", "--out", data, "--split", split, *limit,
                 "--length", str(keys["trajectory_length"])], dry_run, log)
    common = [f"--{k}={v}" for k, v in sets.items()] + (["--data_path", data] if data else [])
    weights = "null" if keys == RANDOM else str((out / "encoder.pth").relative_to(ROOT))
    depth = [f"--depth={d}"] if (d := recipe_depth(recipe, keys, sets)) is not None else []   # random rows too
    # pre-train unless the frozen part is done and the encoder is there (a killed pre-training resumes)
    if keys != RANDOM and (done["frozen"] is None or not (out / "encoder.pth").exists()):
        overrides = [f"--{k}={v}" for k, v in keys.items()]
        run(["pretrain.py", "--recipe", recipe, "--seed", str(seed), "--output_dir", str(out.parent.relative_to(ROOT)), "--name", out.name,
             *common, *overrides], dry_run, log)
    for part, path in results.items():
        if path is None or done[part] is not None:
            continue
        # every row is scored on the evaluation recipe's own data (frames only: L plays no part there)
        how = ["frozen", "--recipe", eval_recipe] if part == "frozen" else ["full", "--recipe", tune_recipe]
        run(["finetune.py", *how, "--finetune", weights, "--seed", str(seed), "--output_dir", str(out.relative_to(ROOT)),
             "--name", part, *depth], dry_run, log)
    return None if dry_run else read()


def summarise(values, seeds):
    if not values:
        return "–"
    mean = statistics.fmean(values)
    text = f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"
    return text if len(values) == len(seeds) else f"{text} ({len(values)} of {len(seeds)} seeds)"


def write_table(doc, table, rows, seeds, command):
    """Replace (or append) the table between its markers in `doc` (experiments/tables.md)."""
    title = TABLES[table][0]
    lines = [f"<!-- ablate:{table} -->", f"**{title}** ({len(seeds)} seed(s): {', '.join(map(str, seeds))}; "
             f"{time.strftime('%Y-%m-%d')}; `{command}`)", "",
             "| row | frozen probe top-1 % | k-NN top-1 % |" + (" fine-tuned top-1 % |" if table in TUNED else ""),
             "|---|---:|---:|" + ("---:|" if table in TUNED else "")]
    for label, results in rows:
        frozen = [r["frozen"] for r in results if r["frozen"]]
        columns = [[r["probe"]["top1"] for r in frozen], [r["knn"]["top1"] for r in frozen]]
        if table in TUNED:
            columns.append([r["finetune"]["top1"] for r in results if r["finetune"]])
        lines.append(f"| {label} | " + " | ".join(summarise(c, seeds) for c in columns) + " |")
    lines.append(f"<!-- /ablate:{table} -->")
    block = "\n".join(lines)
    text = doc.read_text() if doc.exists() else "# Results\n"
    pattern = re.compile(rf"<!-- ablate:{table} -->.*?<!-- /ablate:{table} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(only=None, seeds=3, recipe="recipes/learn_tiny.yaml", eval_recipe="recipes/probe_tiny.yaml", override=None,
         rows=None, dry_run=False, doc="experiments/tables.md", tune_recipe="recipes/finetune_learn_tiny.yaml"):
    """Run the ablation tables (only: comma-separated names among headline, loss, fig3, table5-9, table11)
    over `seeds` pre-training seeds (0..seeds-1), seed by seed (every row's seed 0, then seed 1...) so
    that a stopped run leaves whole comparisons; override: recipe keys for every pre-training,
    'key=value,key=value' (e.g. 'epochs=2' for a quick pass); rows: run only the rows whose label
    contains one of these comma-separated words (the tables still show every finished cell); tune_recipe:
    the fine-tuning of the TUNED tables' cells (None: frozen evaluation only)."""
    names = list(TABLES) if only is None else [n.strip() for n in (only if isinstance(only, (list, tuple)) else str(only).split(","))]
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise SystemExit(f"unknown table(s) {unknown}; choose from {', '.join(TABLES)}")
    sets = dict(kv.split("=", 1) for kv in (override.split(",") if isinstance(override, str) else override or []))
    seed_list = list(range(int(seeds)))
    # the command that makes the whole table (whichever --rows ran last), with the options that change cells
    options = "".join(f" --{k} {v}" for k, v, default in (
        ("recipe", recipe, "recipes/learn_tiny.yaml"), ("eval_recipe", eval_recipe, "recipes/probe_tiny.yaml"),
        ("tune_recipe", tune_recipe, "recipes/finetune_learn_tiny.yaml"),
        ("override", ",".join(f"{k}={v}" for k, v in sets.items()) or None, None)) if v != default)
    # fire reads --rows 0.4,0.9 as a tuple of floats: words are compared as text
    words = [str(w).strip().lower() for w in (rows if isinstance(rows, (list, tuple)) else str(rows).split(","))] if rows else None
    for table in names:
        chosen = [words is None or any(w in label.lower() for w in words) for label, _ in TABLES[table][1]]
        if not any(chosen):
            raise SystemExit(f"no row of {table} matches --rows {rows}; its rows: {[label for label, _ in TABLES[table][1]]}")
        results = {label: [] for label, _ in TABLES[table][1]}
        for s in seed_list:
            for (label, keys), run_it in zip(TABLES[table][1], chosen):
                r = cell(table, label, keys, s, recipe, eval_recipe, sets, dry_run, read_only=not run_it,
                         tune_recipe=tune_recipe if table in TUNED else None)
                if r:
                    results[label].append(r)
        if not dry_run:
            command = f"python experiments/ablate.py --only {table} --seeds {len(seed_list)}{options}"
            write_table(ROOT / doc, table, list(results.items()), seed_list, command)
            print(f"{table}: written to {doc}", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
