"""Pictures (mme/viz.py): trajectories are drawn from the right start points, and a model's
prediction is mapped back to the tokens and units of the true target before drawing."""
import json

import numpy as np
import torch

from mme import recipe, targets, viz

T, S = 4, 64                                       # 2 tubelets of 4 x 4 tokens


def test_token_paths_start_on_the_grid_and_add_up_the_steps():
    pos = np.zeros((16, 4, 3, 2))
    pos[..., 0], pos[..., 1] = 1.5, -0.5                                      # every step (1.5, -0.5) px
    paths = viz.token_paths(pos, 4, 4)
    assert paths.shape == (16, 4, 4, 2)
    # token 6 = row 1, column 2; its trajectory k = 3 is grid point (2*1 + 1, 2*2 + 1) = (3, 5)
    np.testing.assert_allclose(paths[6, 3, 0], [8 * 5 + 3.5, 8 * 3 + 3.5])
    np.testing.assert_allclose(paths[6, 3, -1] - paths[6, 3, 0], [4.5, -1.5])
    sparse = viz.token_paths(pos[:, :1], 4, 4)
    np.testing.assert_allclose(sparse[6, 0, 0], [16 * 2 + 7.5, 16 * 1 + 7.5])


def test_a_perfect_prediction_is_drawn_as_the_truth(tmp_path):
    r = recipe.load(None, data_path="x", num_frames=T, input_size=S, trajectory_length=3, model="tiny")
    g = torch.Generator().manual_seed(0)
    B, n = 2, S // 8
    disp = torch.randn(B, T // 2, n, n, 3, 2, generator=g) * 2
    hog = torch.rand(B, T // 2, n, n, 3, 9, generator=g)
    valid = torch.ones(B, T // 2, n, n, dtype=torch.bool)
    raw, _ = targets.mme_target(disp, hog, valid, patch_norm=False)
    normed, _ = targets.mme_target(disp, hog, valid, patch_norm=True)
    mask = targets.tube_mask(np.random.default_rng(0), B, T // 2, S // 16, S // 16, 0.5)
    batch = {"target": raw, "mask": mask, "video": torch.zeros(B, 3, T, S, S)}
    pred = normed[mask].reshape(B, -1, normed.shape[-1])                      # the model's order
    true_pos, pred_pos = viz.prediction_figure(tmp_path / "f.png", batch, pred, r)
    # the middle tubelet (t = 1), its tokens' true displacements, trajectory k row-major in the patch
    expect = disp[:, 1].reshape(B, 4, 2, 4, 2, 3, 2).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, 16, 4, 3, 2)
    np.testing.assert_allclose(true_pos, expect.numpy(), atol=1e-6)
    m = mask[:, 16:32].numpy()
    np.testing.assert_allclose(pred_pos[m], true_pos[m], atol=1e-4)
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_progress_lines_when_due_and_eta_as_people_read_it(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(viz.time, "monotonic", lambda: clock[0])
    when = viz.every(10, 60)
    due = []
    for step in range(1, 31):
        clock[0] += 1 if step < 20 else 100                   # slow steps from 20 on: a line at least every 60 s
        if when.due(step, 30):
            due.append(step)
    assert due == [1, 11, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    assert [viz.eta(s) for s in (None, 12.4, 185, 7500)] == ["?", "12s", "3m05s", "2h05m"]
    rate = viz.Rate()                                          # started long ago: the first step's start-up
    clock[0] = 1000.0                                          # (500 s here) does not count
    assert rate.eta(1, 100) is None
    clock[0] = 1002.0
    assert rate.eta(3, 100) == 97.0                            # 1 s a step since step 1, 97 steps left


def drawn(monkeypatch):
    """The figures viz saves, kept (plt.close does not empty them) for their axes to be read."""
    import matplotlib.figure
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    return figures


def test_confusion_matrix_names_the_classes(tmp_path, monkeypatch):
    figures = drawn(monkeypatch)
    names = ["moving left", "moving right", "approaching"]
    counts = viz.confusion_matrix(tmp_path / "c.png", [0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3, names)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_xticklabels()[0].get_rotation() == 45
    viz.confusion_matrix(tmp_path / "c.png", [0, 1], [0, 1], 3)                   # no names: indices
    assert "moving left" not in [t.get_text() for t in figures[-1].axes[0].get_xticklabels()]


def test_loss_curve_marks_epochs_and_the_floor(tmp_path, monkeypatch):
    figures = drawn(monkeypatch)
    rows = [{"step": s, "epoch": (s - 1) // 4, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 13)]   # 3 epochs of 4 steps
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    viz.loss_curve(tmp_path / "m.jsonl", tmp_path / "l.png", title="run: MME", floor=0.9, floor_label="mean: 0.9")
    ax = figures[-1].axes[0]
    vertical = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":" and len(line.get_xdata())]
    assert vertical == [4, 8] and ax.get_title() == "run: MME"
    (floor,) = [line for line in ax.get_lines() if line.get_label() == "mean: 0.9"]
    assert list(floor.get_ydata()) == [0.9, 0.9]


def test_trajectories_are_coloured_by_time_and_labelled(tmp_path, monkeypatch):
    from matplotlib.collections import LineCollection
    figures = drawn(monkeypatch)
    pos = np.ones((1, 16, 4, 3, 2))                                            # 1 clip, 16 tokens, K 4, L 3
    mask = np.zeros((1, 16), bool)
    mask[0, :2] = True
    viz.trajectory_figure(tmp_path / "t.png", np.zeros((1, 64, 64, 3), np.uint8), mask, pos, pos, ["receding"], "validation clips")
    fig = figures[-1]
    (lines,) = [c for c in fig.axes[1].collections if isinstance(c, LineCollection)]
    colours = lines.get_colors()
    assert len(lines.get_segments()) == 2 * 4 * 3 and lines.get_linewidths()[0] >= 1.5
    assert np.allclose(colours[:3], colours[3:6]) and colours[0, :3].sum() < colours[1, :3].sum() < colours[2, :3].sum()
    assert "receding" in [t.get_text() for t in fig.axes[0].texts]
    assert viz.figure_note(tmp_path / "t.png") == "validation clips"


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
        board = viz.Board(run, start, said.append, wandb="proj", config={"lr": 1})
        board.add(start + 1, **{"train/loss": 0.5})
        board.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0] == inits[1] and inits[0]["project"] == "proj" and inits[0]["name"] == "x"
    assert inits[0]["resume"] == "allow" and inits[0]["config"] == {"lr": 1}
    assert [c for c in calls if c[0] == "log"] == [("log", {"train/loss": 0.5}, 1), ("log", {"train/loss": 0.5}, 6)]
    assert calls[-1] == ("finish",) and any("Weights & Biases: project proj" in s for s in said)
    assert list(run.glob("events.out.tfevents.*"))                 # TensorBoard as well

    import importlib.util
    import pytest
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)     # as where wandb is not installed
    with pytest.raises(recipe.RecipeError, match="wandb package is not installed"):
        recipe.load(None, data_path="x", wandb="proj")
    assert recipe.load(None, data_path="x")["wandb"] is None
