"""The table of docs/results.md "Learning depth" from finished experiments/cell.sh runs (issue #23).

    python experiments/cell.py runs/i23/q_base_s0 runs/i23/conv_s0 [...]

For each run folder: probe / 10-NN / attentive top-1 % of its frozen/eval.json and of frozen_random/ (the
random encoder of the same shape), or of its own eval.json (a `finetune.py frozen` folder), and each
motion family's mean recall (linear probe / attentive), as experiments/motion.py's families (the
built-in classes or experiments/heldout.py's).
"""
import json
import sys
from pathlib import Path

import motion  # experiments/motion.py beside this script: families() of the built-in or held-out classes
import numpy as np

from mme.online import data


def row(folder):
    ev = json.loads((Path(folder) / "eval.json").read_text())
    found = data.class_names(data.shard_urls(ev["data"], "val"), range(len(ev["probe"]["recall"])))
    fam = motion.families([found[i] for i in range(len(found))]) if found else {}
    cells = [f"{ev[m]['top1']:.0f}" if m in ev else "–" for m in ("probe", "knn", "attentive")]
    for f, idx in fam.items():
        cells.append(" / ".join(f"{np.mean([ev[m]['recall'][i] for i in idx]):.0f}" for m in ("probe", "attentive") if m in ev))
    return cells, list(fam)


def main(*folders):
    head = None
    for run in folders:
        subs = [("", Path(run).name)] if (Path(run) / "eval.json").exists() else \
            [("frozen", Path(run).name), ("frozen_random", "random")]              # finetune.py frozen / report
        for sub, label in subs:
            if not (Path(run) / sub / "eval.json").exists():
                print(f"{run}/{sub}: no eval.json yet", file=sys.stderr)
                continue
            cells, fams = row(Path(run) / sub)
            if head is None:
                head = ["run", "probe", "10-NN", "attentive"] + fams
                print("| " + " | ".join(head) + " |")
                print("|---" * len(head) + "|")
            print("| " + " | ".join([label] + cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
