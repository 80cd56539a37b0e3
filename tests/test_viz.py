"""Pictures (mme/viz.py): trajectories are drawn from the right start points, and a model's
prediction is mapped back to the tokens and units of the true target before drawing."""
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
