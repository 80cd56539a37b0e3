"""Pictures: what a person looks at after a run. Every function takes arrays the caller computed and
writes one labelled PNG; none builds a loader or runs a model.

    loss_curve("runs/x/metrics.jsonl", "runs/x/loss.png", title=..., floor=...)   # loss (log) and lr against step
    confusion_matrix("runs/x/confusion.png", truth, predicted, num_classes, names)   # row-normalised, counts in cells
    shard_figure("runs/show_x.png", [mme.shards.decode(raw), ...])   # samples as stored: frames + trajectories
    paths = token_paths(pos, h, w)           # pos [h*w, K, L, 2] px -> pixel paths [h*w, K, L+1, 2]
    trajectory_figure("runs/x/trajectories.png", frames, mask, true_pos, pred_pos, labels, note)   # the paper's Fig. 4
    figure_note("runs/x/trajectories.png")   # the note it was saved with ("validation clips ..."), or None
"""
import json

import numpy as np


def loss_curve(metrics_path, png_path, label="loss (masked MSE, eq. 1)", title=None, floor=None, floor_label=None):
    """Plot loss (log scale) and learning rate against step from a metrics.jsonl, a dotted line at the
    end of each epoch (its rows' "epoch"); title: above the plot; floor: a horizontal line at that loss
    (e.g. what predicting the mean target reaches, mme.report.mean_loss), labelled floor_label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], lw=1, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(label, color="tab:blue")
    ends = [a["step"] for a, b in zip(rows, rows[1:]) if "epoch" in a and a["epoch"] != b.get("epoch")]
    for i, step in enumerate(ends):
        ax.axvline(step, color="grey", lw=0.6, ls=":")
        if len(ends) <= 20:
            ax.text(step, 1.0, f" {i + 1}", transform=ax.get_xaxis_transform(), fontsize=6, color="grey", va="top")
    if ends:
        ax.plot([], [], color="grey", lw=0.6, ls=":", label="end of epoch")
    if floor is not None:
        ax.axhline(floor, color="tab:red", lw=1, ls="--", label=floor_label or f"{floor:.3g}")
    if ends or floor is not None:
        ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in rows], lw=1, color="tab:orange")
    lr.set_ylabel("learning rate", color="tab:orange")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def token_paths(pos, h, w, grid=8):
    """The pixel paths of the trajectories of one tubelet's h*w tokens (row-major, as mme.online.targets):
    pos [h*w, K, L, 2] per-step displacements in px of the frames -> [h*w, K, L+1, 2] points (x, y).
    K = 4 trajectories start at the token's 2 x 2 grid points, pixel (g*j + (g-1)/2, g*i + (g-1)/2) for
    grid point (i, j) (mme.online.transforms); K = 1 (the sparse targets) at the patch centre."""
    pos = np.asarray(pos, np.float64)
    n, K, L, _ = pos.shape
    ti, tj = np.divmod(np.arange(h * w), w)                                   # token row, column
    if K == 4:
        ki, kj = np.divmod(np.arange(4), 2)                                   # (kh, kw), row-major
        x = grid * (2 * tj[:, None] + kj[None]) + (grid - 1) / 2
        y = grid * (2 * ti[:, None] + ki[None]) + (grid - 1) / 2
    else:
        x, y = (16 * tj + 7.5)[:, None], (16 * ti + 7.5)[:, None]
    start = np.stack([x, y], -1)[:, :, None]                                  # [n, K, 1, 2]
    return np.concatenate([start, start + np.cumsum(pos, 2)], 2)


def trajectory_figure(path, frames, mask, true_pos, pred_pos, labels=None, note=None, min_motion=1.0):
    """The paper's Fig. 4, one row per clip: (a) the frame with its masked patches greyed out; (b) the
    true and (c) the predicted trajectories of the masked patches drawn on it; (d) the frame.
    frames uint8 [n, S, S, 3] (the first frame of one tubelet per clip), mask bool [n, h*w] (that
    tubelet's tokens), true_pos / pred_pos [n, h*w, K, L, 2] displacements in px of these frames;
    labels: a row label per clip (its class); note: a line above the figure, also stored as the PNG's
    Description (figure_note reads it back). Each trajectory is coloured from dark to light along its
    L steps (time), a red dot where it ends. Trajectories that move less than min_motion px in both
    the truth and the prediction (still background) are left out of (b) and (c) alike."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.lines import Line2D

    n, S = len(frames), frames.shape[1]
    h = w = S // 16
    L = np.asarray(true_pos).shape[3]
    time_colours = LinearSegmentedColormap.from_list("time", ["#6b3d00", "#ffd000", "#ffffa0"])(np.linspace(0, 1, L))
    fig, axes = plt.subplots(n, 4, figsize=(12, 3.1 * n + 0.8), squeeze=False)   # ~3x the pixels: paths of a few px show
    for row, (frame, m, true, pred) in enumerate(zip(frames, mask, true_pos, pred_pos)):
        m = np.asarray(m, bool)
        travel = lambda pos: np.abs(np.asarray(pos, np.float64)[m]).sum((2, 3))          # [masked, K] px moved
        moving = ((travel(true) >= min_motion) | (travel(pred) >= min_motion)).reshape(-1)   # the same in (b), (c)
        grey = frame.copy()
        for t in np.flatnonzero(m):
            i, j = divmod(int(t), w)
            grey[16 * i:16 * i + 16, 16 * j:16 * j + 16] = grey[16 * i:16 * i + 16, 16 * j:16 * j + 16] // 3 + 85
        for col, (img, pos, title) in enumerate([(grey, None, "(a) masked"), (frame, true, "(b) ground truth"),
                                                 (frame, pred, "(c) prediction"), (frame, None, "(d) frame")]):
            ax = axes[row, col]
            ax.imshow(img)
            if pos is not None:
                paths = token_paths(pos, h, w)[m]                              # masked tokens only
                lines = paths.reshape(-1, paths.shape[2], 2)[moving]           # [M, L+1, 2]
                segments = np.stack([lines[:, :-1], lines[:, 1:]], 2).reshape(-1, 2, 2)   # [M*L, 2, 2]: each line's L steps in turn
                ax.add_collection(LineCollection(segments, colors=np.tile(time_colours, (len(lines), 1)), linewidths=1.5))
                ax.scatter(lines[:, -1, 0], lines[:, -1, 1], s=6, c="red", lw=0, zorder=3)   # where each one ends
            ax.set_xlim(-0.5, S - 0.5)
            ax.set_ylim(S - 0.5, -0.5)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
        if labels is not None:
            axes[row, 0].text(-0.06, 0.5, labels[row], transform=axes[row, 0].transAxes, rotation=90,
                              ha="right", va="center", fontsize=8)
    legend = [Line2D([], [], color="#ffd000", lw=2, label=f"path of a masked patch's trajectory over the next {L} frames "
                                                           f"(dark to light: time)"),
              Line2D([], [], color="red", marker="o", ls="", markersize=4, label="where it ends"),
              Line2D([], [], ls="", label=f"not drawn: trajectories moving < {min_motion:g} px in both truth and prediction")]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout(rect=(0.03, 0.5 / (3.1 * n + 0.8), 1, 1))
    fig.savefig(path, dpi=120, metadata={"Description": note or ""})
    plt.close(fig)


def figure_note(path):
    """The note a figure of trajectory_figure was saved with (its PNG Description), or None."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.text.get("Description") or None
    except OSError:
        return None


def confusion_matrix(path, truth, predicted, num_classes, names=None):
    """Rows: true class, columns: predicted; each row normalised to the fraction of its videos (colour),
    the count written in each non-empty cell; names: the classes' names as tick labels (else indices).
    Returns the count matrix [num_classes, num_classes]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(truth), np.asarray(predicted)), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(12, 2 + 0.35 * num_classes) + (2 if names is not None else 0)     # room for the names
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if num_classes <= 30:
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    if names is not None and num_classes <= 60:
        ax.set_xticks(range(num_classes), [str(x) for x in names], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(num_classes), [str(x) for x in names], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{counts.sum()} videos, top-1 {np.trace(counts) / max(counts.sum(), 1):.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return counts


def shard_figure(path, clips, columns=4, min_motion=0.5):
    """What a shard holds, drawn before anyone trains on it (`python extract.py show`): one row per
    sample, `columns` tubelets spread over the clip, each the tubelet's first frame with the stored
    trajectories over it: a line per moving track (total path >= min_motion px), coloured along its
    L steps from dark (start) to light (end); a red x where a track is invalid (eq. 7: it left the
    frame). Static tracks (camera motion removed: still background) are not drawn.
    clips: mme.shards.decode outputs (frames [T, H, W, 3], disp [T/2, H/g, W/g, L, 2] px, valid
    [T/2, H/g, W/g], meta). Returns the number of moving and invalid tracks drawn, per sample."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    n = len(clips)
    H, W = clips[0]["frames"].shape[1:3]
    fig, axes = plt.subplots(n, columns, figsize=(2.6 * columns * W / H, 2.6 * n + 0.5), squeeze=False)
    counts = []
    for row, clip in enumerate(clips):
        disp, valid, meta = clip["disp"], clip["valid"], clip["meta"]
        tubes, gh, gw, L = disp.shape[:4]
        g = meta["params"]["grid"]
        rows, cols = np.mgrid[0:gh, 0:gw]
        start = np.stack([g * cols + (g - 1) / 2, g * rows + (g - 1) / 2], -1).reshape(-1, 1, 2)   # (x, y) px
        moving = invalid = 0
        for col, t in enumerate(np.linspace(0, tubes - 1, columns).round().astype(int)):
            ax = axes[row, col]
            ax.imshow(clip["frames"][2 * t])
            steps = disp[t].reshape(-1, L, 2)
            points = np.concatenate([start, start + np.cumsum(steps, 1)], 1)           # [tracks, L+1, 2]
            ok = valid[t].reshape(-1)
            move = ok & (np.abs(steps).sum((1, 2)) >= min_motion)
            segments = np.stack([points[move, :-1], points[move, 1:]], 2).reshape(-1, 2, 2)   # [tracks*L, 2, 2]
            ax.add_collection(LineCollection(segments, array=np.tile(np.arange(L), int(move.sum())), cmap="plasma",
                                             norm=plt.Normalize(0, L - 1), linewidths=1.5))
            bad = start[~ok, 0]
            ax.scatter(bad[:, 0], bad[:, 1], marker="x", s=10, c="red", lw=0.8)
            moving, invalid = moving + int(move.sum()), invalid + int((~ok).sum())
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            frame = meta["frame_indices"][2 * t]
            ax.set_xlabel(f"frame {frame}: next {L} steps", fontsize=7)
            if col == 0:
                ax.set_ylabel(meta.get("label_name") or f"class {clip['label']}", fontsize=8)
        axes[row, 0].set_title(f"{meta.get('video', clip['key'])}  window {meta.get('window', 0)} "
                               f"(frames {meta['frame_indices'][0]}-{meta['frame_indices'][-1]})  class: "
                               f"{meta.get('label_name') or clip['label']}", fontsize=8, loc="left")
        counts.append((moving, invalid))
    fig.suptitle("Trajectories stored in the shards (camera motion removed): dark = start, light = "
                 "after L steps; red x = invalid track; still tracks not drawn", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return counts
