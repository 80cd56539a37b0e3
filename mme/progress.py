"""Progress and messages: what a person reads while a stage runs, on a terminal and in a log file alike.

    console                                   # rich, on stderr; soft wrap keeps a log line one line
    fail("data_path x: no shards", rank)      # the one red line of an error the user can act on; exit 2
    p = Progress(console, total, start, log="runs/x/log.txt", device=device)   # a live bar on a terminal, else lines
    p.note("header line")                     # to the console and the log file
    p.update(step, epoch=1, loss=..., lr=..., clips=8, seconds=0.5, wait=0.1); p.stop()
    c = Counter(console, total, done, "videos", log=...); c.update(1, "312 frames/s  0 skipped"); c.stop()
    every(20, 60).due(done, total)            # a plain line every 20 items and at least every 60 s
    eta(seconds)                              # '1h02m', '3m05s', '12s'
    board = Board(run, start_step); board.add(step, **{"train/loss": 0.5}); board.close()   # TensorBoard (+ W&B if asked)
    shown(text)                               # a file name or message made safe for a log line
"""
import os
import sys
import time

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)     # soft wrap: a log line stays one line in files


def fail(msg, rank=None):
    """Stop on an error the user can act on: one red line from rank 0 (every rank exits with status 2),
    never a traceback. rank None: torchrun's RANK (before a process group exists), else 0."""
    if (int(os.environ.get("RANK", 0)) if rank is None else rank) == 0:
        console.print(f"[red]error:[/red] {shown(msg)}")
    sys.exit(2)


def shown(text):
    """text for a log line: markup escaped, and control characters (a newline, an ANSI escape in a file
    name) written as escapes, so no name can forge or recolour a line."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)))


def log_line(log, line):
    """Append a time-stamped line to the log file `log` (None: nowhere); opened per line, nothing left open."""
    if log:
        with open(log, "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")


def eta(seconds):
    """A duration as people read it in a log: '2h05m', '3m05s', '12s'; '?' when unknown."""
    if seconds is None or not np.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class every:
    """When a plain progress line is due: every `n` items, and at least every `seconds` s, the first
    and the last item always (a batch job's log shows at once that the run is going, and how far)."""

    def __init__(self, n, seconds):
        self.n, self.seconds = max(1, int(n)), seconds
        self.last_item, self.last_time = None, time.monotonic()

    def due(self, item, total):
        now = time.monotonic()
        if (self.last_item is None or item >= total or item - self.last_item >= self.n
                or now - self.last_time >= self.seconds):
            self.last_item, self.last_time = item, now
            return True
        return False


class Rate:
    """Seconds per item for the ETA, from the second item on: the first carries the start-up (workers
    spawning, the first batch, allocator warm-up), which made rich's ETA read hours at step 6."""

    def __init__(self):
        self.first = None                      # (time, item) once the first item is done

    def eta(self, done, total):
        now = time.monotonic()
        if self.first is None:
            self.first = (now, done)
            return None
        t0, d0 = self.first
        return (now - t0) / (done - d0) * (total - done) if done > d0 else None


class Progress:
    """Rank 0's training progress: a live bar when the console is a terminal, else a plain line every
    `every_steps` steps and at least every `every_seconds` s (a batch job's log file); the same lines,
    time-stamped, in `log` (the run's log.txt) either way."""

    def __init__(self, console, total, start, log=None, every_steps=20, every_seconds=60, device=None):
        self.console, self.total, self.live = console, total, console.is_terminal
        self.log = log
        self.device = device
        self.when, self.rate = every(every_steps, every_seconds), Rate()
        self.clips = self.seconds = self.wait = 0.0           # summed since the last line
        self.bar = None
        if self.live:
            self.bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[text]}"),
                                console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, text="")
            self.bar.start()

    def note(self, text):
        """A line (rich markup) to the console and, plain, to the log file."""
        self.console.print(text)
        self._log(Text.from_markup(text).plain)

    def _log(self, line):
        log_line(self.log, line)

    def update(self, step, epoch=None, loss=float("nan"), lr=0.0, clips=0, seconds=0.0, wait=0.0):
        """Step `step` is done: `clips` clips (all ranks) in `seconds` s, `wait` of them waiting for data."""
        self.clips, self.seconds, self.wait = self.clips + clips, self.seconds + seconds, self.wait + wait
        left = self.rate.eta(step, self.total)
        speed = self.clips / self.seconds if self.seconds else 0.0
        text = (f"loss {loss:.4f}  lr {lr:.2e}  {speed:.1f} clips/s  data {self.wait / max(self.seconds, 1e-9):.0%}"
                f"  ETA {eta(left)}")
        if self.device is not None and self.device.type == "cuda":
            import torch
            text += f"  mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.1f} GiB"
        if self.bar:
            self.bar.update(self.task, completed=step, text=text)
        if self.when.due(step, self.total):
            line = f"step {step}/{self.total}" + (f"  epoch {epoch}" if epoch is not None else "") + "  " + text
            if not self.live:
                self.console.print(line, markup=False, highlight=False)
            self._log(line)
            self.clips = self.seconds = self.wait = 0.0

    def stop(self):
        if self.bar:
            self.bar.stop()


class Board:
    """TensorBoard event files in the run folder, beside metrics.jsonl (`tensorboard --logdir runs` shows
    every run by its name). A run resumed from step s hides the events a killed run wrote past s
    (purge_step). Without the tensorboard package it writes nothing and says so once.
    wandb: a Weights & Biases project to send the same scalars to (the recipe key `wandb`; off unless
    asked). The W&B run's id comes from the run folder, so a resumed run continues the same W&B run;
    credentials are wandb's own (WANDB_API_KEY or `wandb login`; WANDB_MODE=offline works), never ours."""

    def __init__(self, run, start_step=0, say=print, wandb=None, config=None):
        self.wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ValueError(f"wandb: {wandb}: the wandb package is not installed (pip install wandb), "
                                 f"or leave the recipe key wandb unset") from None
            import hashlib
            from pathlib import Path
            run_id = hashlib.sha1(str(Path(run).resolve()).encode()).hexdigest()[:16]
            self.wandb = wandb_lib.init(project=wandb, name=Path(run).name, id=run_id, resume="allow",
                                        dir=str(run), config=config)
            say(f"Weights & Biases: project {wandb}, run {Path(run).name} (id {run_id})")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            say("no TensorBoard event files: the tensorboard package is not installed (pip install tensorboard)")
            return
        self.writer = SummaryWriter(str(run), purge_step=start_step + 1 if start_step else None, flush_secs=30)

    def add(self, step, **scalars):
        """add(step, **{"train/loss": 0.5, ...}): one scalar per tag at this step."""
        if self.writer:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb:
            self.wandb.log(dict(scalars), step=step)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()




class Counter:
    """Progress over items (extract.py's videos): a live bar on a terminal, else a plain line every
    `every_items` items and at least every `every_seconds` s; the same lines, time-stamped, in `log`."""

    def __init__(self, console, total, done=0, unit="videos", log=None, every_items=100, every_seconds=60):
        self.console, self.total, self.done, self.unit, self.log = console, total, done, unit, log
        self.when, self.rate, self.bar = every(every_items, every_seconds), Rate(), None
        if console.is_terminal:
            self.bar = RichProgress(TextColumn(unit), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[text]}"),
                                    TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task(unit, total=total, completed=done, text="")
            self.bar.start()

    def update(self, advance=1, text=""):
        self.done += advance
        left = self.rate.eta(self.done, self.total)
        if self.bar:
            self.bar.update(self.task, advance=advance, text=text)
        if self.when.due(self.done, self.total):
            line = f"{self.unit} {self.done}/{self.total}  {text}  ETA {eta(left)}"
            if not self.bar:
                self.console.print(line, markup=False, highlight=False)
            log_line(self.log, line)

    def stop(self):
        if self.bar:
            self.bar.stop()
