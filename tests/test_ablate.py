"""experiments/ablate.py: the commands of each cell, resuming from finished cells, the tables it writes."""
import json
import shutil
import statistics

import ablate
import pytest


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    """Runs go to tmp_path; 'running' finetune.py frozen writes an eval.json whose top-1 is a function
    of the run's name, so the tables can be checked against it."""
    monkeypatch.setattr(ablate, "ROOT", tmp_path)
    calls = []

    def run(cmd, dry_run, log):
        calls.append(cmd)
        if cmd[0] in ("pretrain.py", "finetune.py"):                # a plain run name, as recipe.load demands
            assert "/" not in cmd[cmd.index("--name") + 1]
        if cmd[0] == "pretrain.py" and not dry_run:
            out = tmp_path / cmd[cmd.index("--output_dir") + 1] / cmd[cmd.index("--name") + 1]
            out.mkdir(parents=True, exist_ok=True)
            (out / "encoder.pth").write_bytes(b"weights")
        if cmd[0] == "finetune.py" and not dry_run:
            out = tmp_path / cmd[cmd.index("--output_dir") + 1] / cmd[cmd.index("--name") + 1]   # cwd: ROOT
            name = out.relative_to(tmp_path / "runs").as_posix()
            out.mkdir(parents=True, exist_ok=True)
            score = float(len(name) + int(name.split("/s")[-1].split("/")[0]))
            scores = {"top1": score, "top5": 100.0} if cmd[1] == "full" else {"probe": {"top1": score}, "knn": {"top1": score / 2}}
            (out / "eval.json").write_text(json.dumps(scores))
    monkeypatch.setattr(ablate, "run", run)
    return tmp_path, calls


def kill(root, folder):
    """As if the evaluation in runs/<folder> had been killed: no eval.json, nothing in the ledger."""
    (root / "runs" / folder / "eval.json").unlink()
    cell, part = folder.rsplit("/", 1)
    ledger = root / ablate.LEDGER
    ledger.write_text("".join(line + "\n" for line in ledger.read_text().splitlines()
                              if (json.loads(line)["cell"], json.loads(line)["part"]) != (cell, part)))


def test_cells_run_once_and_tables_hold_mean_and_std(fake_runs):
    root, calls = fake_runs
    ablate.main(only="table8,headline", seeds=2, override="epochs=2")
    pretrain = [c for c in calls if c[0] == "pretrain.py"]
    frozen = [c for c in calls if c[:2] == ["finetune.py", "frozen"]]
    # table8's "w/o patch norm" is learn_tiny's own setting: headline's MME cell, run once for both;
    # the random encoder is not pre-trained
    assert len(pretrain) == (1 + 3) * 2 and len(frozen) == (1 + 4) * 2
    assert all("--epochs=2" in c for c in pretrain)
    assert ["--patch_norm=none"] == [a for a in pretrain[0] if a.startswith("--patch_norm")]
    assert pretrain[0][pretrain[0].index("--output_dir") + 1] == "runs/ablate/headline/mme_trajectory"
    random_rows = [c for c in frozen if "random_encoder" in c[c.index("--output_dir") + 1]]
    assert len(random_rows) == 2 and all(c[c.index("--finetune") + 1] == "null" for c in random_rows)
    text = (root / "experiments" / "tables.md").read_text()
    name = "ablate/headline/mme_trajectory/s{}/frozen"
    scores = [len(name.format(s)) + s for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| w/o patch norm"))
    assert row == (f"| w/o patch norm | {statistics.fmean(scores):.1f} ± {statistics.stdev(scores):.1f} | "
                   f"{statistics.fmean(scores) / 2:.1f} ± {statistics.stdev(scores) / 2:.1f} |")
    assert text.count("<!-- ablate:table8 -->") == 1 and "<!-- /ablate:headline -->" in text
    assert "`python experiments/ablate.py --only table8 --seeds 2 --override epochs=2`" in text

    calls.clear()                                  # rerun: every cell is read back, nothing runs again
    ablate.main(only="table8", seeds=2)
    assert calls == []
    assert (root / "experiments" / "tables.md").read_text().count("<!-- ablate:table8 -->") == 1


def test_headline_cells_are_fine_tuned_too_with_one_budget(fake_runs):
    root, calls = fake_runs
    ablate.main(only="headline", seeds=2, rows="random,mme")
    tuned = [c for c in calls if c[:2] == ["finetune.py", "full"]]
    assert [c[c.index("--finetune") + 1] for c in tuned] == [
        "null", "runs/ablate/headline/mme_trajectory/s0/encoder.pth", "null", "runs/ablate/headline/mme_trajectory/s1/encoder.pth"]
    assert all(c[c.index("--recipe") + 1] == "recipes/finetune_learn_tiny.yaml" and c[c.index("--name") + 1] == "finetune"
               for c in tuned)
    row = next(line for line in (root / "experiments" / "tables.md").read_text().splitlines() if line.startswith("| MME"))
    scores = [len(f"ablate/headline/mme_trajectory/s{s}/finetune") + s for s in (0, 1)]
    assert row.endswith(f" | {statistics.fmean(scores):.1f} ± {statistics.stdev(scores):.1f} |")

    # a cell whose frozen evaluation is done but whose fine-tuning was killed: only the fine-tuning runs
    kill(root, "ablate/headline/mme_trajectory/s1/finetune")
    calls.clear()
    ablate.main(only="headline", seeds=2, rows="mme")
    assert [c[:2] for c in calls] == [["finetune.py", "full"]]
    calls.clear()
    ablate.main(only="table8", seeds=1, rows="w/o", tune_recipe=None)     # other tables: frozen only
    assert calls == []


def test_a_row_equal_to_another_tables_row_is_one_cell(fake_runs):
    root, calls = fake_runs
    ablate.main(only="fig3,table5", seeds=1)
    cells = [c[c.index("--output_dir") + 1] for c in calls if c[0] == "finetune.py"]
    # Fig. 3's pixel and MME are Table 5's pixel and trajectory, and under the headline's names
    assert cells == ["runs/ablate/headline/pixel_videomae/s0", "runs/ablate/fig3/pixel_shuffled_frames/s0",
                     "runs/ablate/headline/mme_trajectory/s0", "runs/ablate/fig3/mme_shuffled_frames/s0",
                     "runs/ablate/headline/hog_maskfeat/s0", "runs/ablate/table5/trajectory_w_o_shape/s0"]
    text = (root / "experiments" / "tables.md").read_text()
    score = len("ablate/headline/mme_trajectory/s0/frozen")
    assert f"| MME | {score:.1f} |" in text and f"| trajectory | {score:.1f} |" in text


def test_an_interrupted_table_continues_with_the_missing_cells(fake_runs):
    root, calls = fake_runs
    ablate.main(only="table9", seeds=1)
    kill(root, "ablate/table9/one_mean_of_the_k/s0/frozen")                            # that cell was killed
    calls.clear()
    ablate.main(only="table9", seeds=1)
    assert [c[0] for c in calls] == ["pretrain.py", "finetune.py"]
    assert calls[0][calls[0].index("--output_dir") + 1].endswith("ablate/table9/one_mean_of_the_k")


def test_dry_run_runs_nothing_and_unknown_tables_are_refused(fake_runs, capsys):
    root, calls = fake_runs
    ablate.main(only="table7", seeds=1, dry_run=True)
    assert not (root / "experiments" / "tables.md").exists() and not (root / "runs" / "ablate").exists()
    extract = [c for c in calls if c[0] == "extract.py"]
    assert extract and "--length" in extract[0] and "8" in extract[0]       # L = 8 needs its own shards
    l8 = [c for c in calls if c[0] != "extract.py" and "table7/l_8" in " ".join(c)]
    assert "shards/synthetic4k_L8/" in l8[0]                                  # to pre-train on,
    assert not any("synthetic4k_L8" in a for a in l8[1])                       # not to score on
    with pytest.raises(SystemExit, match="unknown table"):
        ablate.main(only="table99")


def test_rows_run_seed_by_seed_and_the_table_keeps_every_finished_cell(fake_runs):
    root, calls = fake_runs
    ablate.main(only="headline", seeds=2, rows="mme,random")
    cells = [c[c.index("--output_dir") + 1] for c in calls if c[:2] == ["finetune.py", "frozen"]]
    assert cells == [f"runs/ablate/headline/{row}/s{s}" for s in (0, 1) for row in ("random_encoder", "mme_trajectory")]
    assert all(c[-1] == "--depth=4" for c in calls if c[0] == "finetune.py")   # learn_tiny's 4 blocks, random rows too
    text = (root / "experiments" / "tables.md").read_text()
    assert "| pixel (VideoMAE) | – | – | – |" in text                                 # not run, not made up
    ablate.main(only="headline", seeds=3, rows="pixel")                         # pixel alone, for seeds 0-2
    text = (root / "experiments" / "tables.md").read_text()
    assert "(2 of 3 seeds)" in next(l for l in text.splitlines() if l.startswith("| MME"))
    assert "seeds)" not in next(l for l in text.splitlines() if l.startswith("| pixel"))
    assert "; `python experiments/ablate.py --only headline --seeds 3`)" in text         # the whole table's command
    calls.clear()
    ablate.main(only="table11", seeds=1, rows=(0.4, 0.9))                       # as fire parses --rows 0.4,0.9
    assert [c[c.index("--output_dir") + 1] for c in calls if c[0] == "pretrain.py"] == [
        "runs/ablate/table11/0_4", "runs/ablate/table11/0_9"]
    with pytest.raises(SystemExit, match="no row of headline"):
        ablate.main(only="headline", rows="nothing")
    assert ablate.recipe_depth("recipes/learn_tiny.yaml", {}, {"depth": 2}) == 2


def test_the_ledger_keeps_the_tables_when_runs_are_lost(fake_runs):
    root, calls = fake_runs
    ablate.main(only="table9", seeds=2, override="epochs=2")
    table = (root / "experiments" / "tables.md").read_text()
    entries = [json.loads(line) for line in (root / ablate.LEDGER).read_text().splitlines()]
    assert len(entries) == 4 and {e["part"] for e in entries} == {"frozen"}
    mean = next(e for e in entries if e["cell"] == "ablate/table9/one_mean_of_the_k/s1")
    assert mean["scores"]["probe"]["top1"] == len("ablate/table9/one_mean_of_the_k/s1/frozen") + 1
    assert mean["override"] == {"epochs": "2"} and mean["recipe"] == "recipes/learn_tiny.yaml" and mean["commit"]
    shutil.rmtree(root / "runs")                       # a new machine: the runs are gone, the ledger is in git
    calls.clear()
    ablate.main(only="table9", seeds=2, override="epochs=2")
    assert calls == [] and (root / "experiments" / "tables.md").read_text() == table
    assert len((root / ablate.LEDGER).read_text().splitlines()) == 4            # nothing recorded twice
    ablate.main(only="table9", seeds=1)                # other overrides are other cells: they run
    assert [c[0] for c in calls] == ["pretrain.py", "finetune.py"] * 2


def test_a_fine_tuning_whose_encoder_is_lost_pre_trains_again(fake_runs):
    root, calls = fake_runs
    ablate.main(only="headline", seeds=1, rows="mme", tune_recipe=None)          # frozen only
    shutil.rmtree(root / "runs")
    calls.clear()
    ablate.main(only="headline", seeds=1, rows="mme")                              # now fine-tuned too
    assert [c[:2] for c in calls] == [["pretrain.py", "--recipe"], ["finetune.py", "full"]]
    row = next(line for line in (root / "experiments" / "tables.md").read_text().splitlines() if line.startswith("| MME"))
    frozen = len("ablate/headline/mme_trajectory/s0/frozen")
    assert row == f"| MME (trajectory) | {frozen:.1f} | {frozen / 2:.1f} | {len('ablate/headline/mme_trajectory/s0/finetune'):.1f} |"
