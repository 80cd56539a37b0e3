"""Pictures (mme/figures.py): trajectories are drawn from the right start points, coloured by time and
labelled; confusion matrices name the classes; loss curves mark epochs and the floor."""
import json

import numpy as np

from mme import figures as figs


def test_token_paths_start_on_the_grid_and_add_up_the_steps():
    pos = np.zeros((16, 4, 3, 2))
    pos[..., 0], pos[..., 1] = 1.5, -0.5                                      # every step (1.5, -0.5) px
    paths = figs.token_paths(pos, 4, 4)
    assert paths.shape == (16, 4, 4, 2)
    # token 6 = row 1, column 2; its trajectory k = 3 is grid point (2*1 + 1, 2*2 + 1) = (3, 5)
    np.testing.assert_allclose(paths[6, 3, 0], [8 * 5 + 3.5, 8 * 3 + 3.5])
    np.testing.assert_allclose(paths[6, 3, -1] - paths[6, 3, 0], [4.5, -1.5])
    sparse = figs.token_paths(pos[:, :1], 4, 4)
    np.testing.assert_allclose(sparse[6, 0, 0], [16 * 2 + 7.5, 16 * 1 + 7.5])


def drawn(monkeypatch):
    """The figures mme.figures saves, kept (plt.close does not empty them) for their axes to be read."""
    import matplotlib.figure
    saved, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), save(fig, *a, **k)))
    return saved


def test_confusion_matrix_names_the_classes(tmp_path, monkeypatch):
    figures = drawn(monkeypatch)
    names = ["moving left", "moving right", "approaching"]
    counts = figs.confusion_matrix(tmp_path / "c.png", [0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3, names)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_xticklabels()[0].get_rotation() == 45
    figs.confusion_matrix(tmp_path / "c.png", [0, 1], [0, 1], 3)                   # no names: indices
    assert "moving left" not in [t.get_text() for t in figures[-1].axes[0].get_xticklabels()]


def test_loss_curve_marks_epochs_and_the_floor(tmp_path, monkeypatch):
    figures = drawn(monkeypatch)
    rows = [{"step": s, "epoch": (s - 1) // 4, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 13)]   # 3 epochs of 4 steps
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs.loss_curve(tmp_path / "m.jsonl", tmp_path / "l.png", title="run: MME", floor=0.9, floor_label="mean: 0.9")
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
    figs.trajectory_figure(tmp_path / "t.png", np.zeros((1, 64, 64, 3), np.uint8), mask, pos, pos, ["receding"], "validation clips")
    fig = figures[-1]
    (lines,) = [c for c in fig.axes[1].collections if isinstance(c, LineCollection)]
    colours = lines.get_colors()
    assert len(lines.get_segments()) == 2 * 4 * 3 and lines.get_linewidths()[0] >= 1.5
    assert np.allclose(colours[:3], colours[3:6]) and colours[0, :3].sum() < colours[1, :3].sum() < colours[2, :3].sum()
    assert "receding" in [t.get_text() for t in fig.axes[0].texts]
    assert figs.figure_note(tmp_path / "t.png") == "validation clips"


