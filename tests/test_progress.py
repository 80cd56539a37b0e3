"""Progress (mme/progress.py): lines when they are due and ETAs as people read them; the TensorBoard board
sends the same scalars to W&B when asked; a failure is one line."""
import pytest

from mme import progress, recipe


def test_progress_lines_when_due_and_eta_as_people_read_it(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    when = progress.every(10, 60)
    due = []
    for step in range(1, 31):
        clock[0] += 1 if step < 20 else 100                   # slow steps from 20 on: a line at least every 60 s
        if when.due(step, 30):
            due.append(step)
    assert due == [1, 11, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    assert [progress.eta(s) for s in (None, 12.4, 185, 7500)] == ["?", "12s", "3m05s", "2h05m"]
    rate = progress.Rate()                                          # started long ago: the first step's start-up
    clock[0] = 1000.0                                          # (500 s here) does not count
    assert rate.eta(1, 100) is None
    clock[0] = 1002.0
    assert rate.eta(3, 100) == 97.0                            # 1 s a step since step 1, 97 steps left


def test_board_sends_the_scalars_to_wandb_when_asked(tmp_path, monkeypatch):
    """recipe key wandb: the same scalars go to a W&B run whose id is the run folder's (a resumed run
    continues it); without the package the recipe is refused before any work."""
    import sys
    import types
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    said = []
    for start in (0, 5):                                          # a run, then the same run resumed
        board = progress.Board(run, start, said.append, wandb="proj", config={"lr": 1})
        board.add(start + 1, **{"train/loss": 0.5})
        board.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0] == inits[1] and inits[0]["project"] == "proj" and inits[0]["name"] == "x"
    assert inits[0]["resume"] == "allow" and inits[0]["config"] == {"lr": 1}
    assert [c for c in calls if c[0] == "log"] == [("log", {"train/loss": 0.5}, 1), ("log", {"train/loss": 0.5}, 6)]
    assert calls[-1] == ("finish",) and any("Weights & Biases: project proj" in s for s in said)
    assert list(run.glob("events.out.tfevents.*"))                 # TensorBoard as well

    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)     # as where wandb is not installed
    with pytest.raises(recipe.RecipeError, match="wandb package is not installed"):
        recipe.load(None, data_path="x", wandb="proj")
    assert recipe.load(None, data_path="x")["wandb"] is None


def test_fail_is_one_red_line_from_rank_0_only(capsys, monkeypatch):
    for rank, shown in ((0, True), (1, False)):
        with pytest.raises(SystemExit) as e:
            progress.fail("data_path x: no shards\nsecond line", rank)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (err.count("\n") == 1 and "error: data_path x: no shards\\nsecond line" in err) if shown else err == ""
    monkeypatch.setenv("RANK", "3")                                   # before a process group: torchrun's RANK
    with pytest.raises(SystemExit):
        progress.fail("x")
    assert capsys.readouterr().err == ""
