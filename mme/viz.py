"""Pictures and progress: what a person looks at while and after a run.

    p = progress(console, total_steps, start)   # rich progress: step, loss, lr, clips/s, ETA
    p.update(step, loss=..., lr=..., speed=...); p.stop()
    loss_curve("runs/x/metrics.jsonl", "runs/x/loss.png")   # loss (log scale) and lr against step
"""
import json

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class _Progress:
    def __init__(self, console, total, start):
        self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.1f} clips/s"),
                            TimeRemainingColumn(), console=console)
        self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), lr=0.0, speed=0.0)
        self.bar.start()

    def update(self, step, **fields):
        self.bar.update(self.task, completed=step, **fields)

    def stop(self):
        self.bar.stop()


def progress(console, total, start=0):
    return _Progress(console, total, start)


def loss_curve(metrics_path, png_path):
    """Plot loss (log scale) and learning rate against step from a metrics.jsonl."""
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
    ax.set_ylabel("loss (masked MSE, eq. 1)", color="tab:blue")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in rows], lw=1, color="tab:orange")
    lr.set_ylabel("learning rate", color="tab:orange")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
