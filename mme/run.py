"""A training run's folder and everything it writes around the training loop (pretrain.py and finetune.py
share it), so that the loop itself is forward, loss, backward, step, log.

    run = Run(recipe, net, opt, loader, rank, world, device, steps_per_epoch, what="pre-training")
    while not run.done:                          # resumed from runs/<name>/checkpoints if there is one
        for b, wait in timed(loader):
            lr = run.lr(); set_lr(opt, lr)
            ...forward, loss, backward, value = optimizer_step(...)
            run.log(value, lr, clips, seconds, wait)   # metrics.jsonl, TensorBoard (+ W&B), progress, non-finite check
            if run.save_due(): run.checkpoint(net, opt, loader)
            if run.done: break
    run.finish({"encoder.pth": state_dict}, curve_label="...")   # rank 0: the exports and loss.png

Preemption (SLURM sends SIGTERM before it kills a job; `sbatch --signal=USR1@120` sends SIGUSR1): the loop
finishes its step, every rank saves the checkpoint, one line says where it stopped, and the process exits with
PREEMPTED (75, EX_TEMPFAIL), which a requeue script can act on; the rerun resumes exactly where it stopped.

A second process started on the same run folder is refused in one line naming the first (mme.lock).

runs/<name>/ holds: .lock, recipe.yaml (what ran; a rerun with another recipe under the same name is refused),
log.txt (the progress lines, time-stamped), metrics.jsonl (one line per step: step, epoch, loss, lr,
clips/s, data wait; lines a killed run wrote past its last checkpoint are dropped on resume), TensorBoard
event files, checkpoints/step_<N>/ (mme.train) and the exports.
"""
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mme import figures, lock, recipe as recipes
from mme.progress import Board, Progress, console, fail
from mme.train import NoSpaceError, ResumeError, all_finite, keep_metrics, lr_at, reached, resume, save_checkpoint

PREEMPTED = 75          # exit status after a checkpoint forced by SIGTERM / SIGUSR1 (EX_TEMPFAIL: run it again)


class Run:
    def __init__(self, r, net, opt, loader, rank, world, device, steps_per_epoch, what, header=""):
        self.r, self.rank, self.loader, self.device = r, rank, loader, device
        self.signalled, self.preempted = None, False              # the signal that asked this process to stop
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.path = Path(r["output_dir"]) / r["name"]
        self.steps_per_epoch, self.total = steps_per_epoch, r["epochs"] * steps_per_epoch
        refused = [None]
        if rank == 0:                                             # one process (group) per run folder
            try:
                lock.hold(self.path / ".lock", f"run folder {self.path}")
            except lock.LockedError as e:
                refused = [str(e)]
        dist.broadcast_object_list(refused)                       # every rank stops, or none
        if refused[0]:
            fail(refused[0], rank)
        self.peak, self.floor = recipes.lr(r, r["batch_size"]), recipes.lr(r, r["batch_size"], "min_lr")
        try:
            self.step, self.last = resume(self.path, r, net, opt, loader, rank)   # the newest checkpoint that verifies
        except ResumeError as e:                                  # the recipe changed under the same name
            fail(str(e), rank)
        self.progress = self.metrics = self.board = None
        if rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.yaml").write_text(recipes.dump(r))
            keep_metrics(self.path / "metrics.jsonl", self.step)   # drop lines a killed run logged past its checkpoint
            self.progress = Progress(console, self.total, self.step, self.path / "log.txt", r["log_every"],
                                     r["log_seconds"], device)
            self.progress.note(f"[bold]{r['name']}[/bold] ({what}): {world} process(es) on {device}"
                               f"{' (FSDP2)' if world > 1 else ''}, {self.total} steps ({steps_per_epoch}/epoch), "
                               f"batch {r['batch_size']}{header}, peak lr {self.peak:.2e}"
                               + (f", resuming at step {self.step}" if self.step else ""))
            self.metrics = open(self.path / "metrics.jsonl", "a")
            self.board = Board(self.path, self.step, self.progress.note, r["wandb"], r)

    @property
    def done(self):
        return self.step >= self.total

    def lr(self):
        """The schedule's lr for the step about to run (linear warm-up, then cosine; Tables 14/15)."""
        return lr_at(self.step, self.r, self.steps_per_epoch, self.peak, self.floor)

    def log(self, loss, lr, clips, seconds, wait):
        """An optimizer step is done: `loss` (averaged over ranks), `clips` (all ranks) in `seconds`, `wait` of
        them waiting for data. A non-finite loss stops the run in one line naming the last good checkpoint."""
        self.step += 1
        reached(self.step)
        if not math.isfinite(loss):
            self.blown(f"loss is {loss} at step {self.step}")
        if self.rank == 0:
            scalars = {"loss": loss, "lr": lr, "clips_per_s": clips / seconds, "data_wait": wait / seconds}
            self.metrics.write(json.dumps({"step": self.step, "epoch": self.loader.epoch, **scalars}) + "\n")
            self.metrics.flush()
            self.board.add(self.step, **{f"train/{k}": v for k, v in scalars.items()})
            self.progress.update(self.step, epoch=f"{self.loader.epoch + 1}/{self.r['epochs']}", loss=loss, lr=lr,
                                 clips=clips, seconds=seconds, wait=wait)

    def note(self, text):
        """A line to the console and log.txt (rank 0)."""
        if self.rank == 0:
            self.progress.note(text)

    def _on_signal(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def save_due(self):
        """A checkpoint now: every save_every steps, at the end, or (all ranks agreeing) when a rank was signalled."""
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.preempted = bool(flag.item())
        return self.preempted or self.step % self.r["save_every"] == 0 or self.done

    def blown(self, what):
        """Stop on non-finite numbers in one line: nothing is saved, and the line says how to continue from the
        last good checkpoint with a lower lr or gradient clipping."""
        lr = self.r["base_lr"] / 10
        fail(f"{what}; nothing saved. Last good checkpoint: {self.last or 'none (rerun starts from step 0)'}. "
             f"To continue from it with a lower lr and clipping: rerun with --base_lr {lr:g} --clip_grad 1.0 "
             f"--resume_changes base_lr,clip_grad", self.rank)

    def check_finite(self, net):
        """Stop (blown) when the weights hold a non-finite value: the update after a finite loss can still blow up,
        and such weights must never be saved or exported."""
        if not all_finite(net):
            self.blown(f"the weights hold non-finite values after step {self.step}")

    def checkpoint(self, net, opt, loader):
        """Save (after check_finite); after a stop signal, say so in one line and exit with PREEMPTED."""
        self.check_finite(net)
        try:
            self.last = save_checkpoint(self.path, self.step, net, opt, loader, self.rank, self.r["keep_checkpoints"])
        except NoSpaceError as e:
            fail(e, self.rank)
        if self.preempted:
            self.note(f"stopped by {self.signalled or 'a signal to another rank'} at step {self.step}: saved {self.last}; "
                      f"rerun the same command to resume (exit status {PREEMPTED}: requeue)")
            if self.rank == 0:
                self.progress.stop()
                self.metrics.close()
                self.board.close()
            dist.barrier()
            dist.destroy_process_group()
            sys.exit(PREEMPTED)

    def finish(self, exports, curve_label="loss (masked MSE, eq. 1)", floor=None, floor_label=None):
        """Rank 0: stop the progress display, close metrics.jsonl, save each {file name: state dict} in the run
        folder (torch.save: weights only) and draw loss.png (with a dashed line at `floor`, labelled
        floor_label). The TensorBoard board stays open (close())."""
        if self.rank:
            return
        self.progress.stop()
        self.metrics.close()
        for name, state in exports.items():
            torch.save(state, self.path / name)
        figures.loss_curve(self.path / "metrics.jsonl", self.path / "loss.png", label=curve_label, floor=floor,
                           floor_label=floor_label)

    def close(self):
        if self.rank == 0:
            self.board.close()

    # --- validations while fine-tuning (finetune.py's eval_every) ------------------------------------

    def best_so_far(self):
        """(top-1, step) of the best validation in val.jsonl up to this step (a resumed run drops the rows past
        its checkpoint, as metrics.jsonl's), or None. Rank 0."""
        keep_metrics(self.path / "val.jsonl", self.step)
        path = self.path / "val.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return max(((row["top1"], row["step"]) for row in rows), key=lambda x: (x[0], -x[1]), default=None)

    def is_best(self, result, best):
        """Whether `result` (rank 0's; None elsewhere) beats `best`: rank 0 decides for every rank."""
        new = [self.rank == 0 and (best is None or result["top1"] > best[0])]
        dist.broadcast_object_list(new)
        return new[0]

    def validated(self, result, epoch, best, state=None):
        """Rank 0: a validation's scores into val.jsonl, TensorBoard and the log; `state` (when it is the best
        so far) saved as best.pth. Returns the best (top-1, step)."""
        if self.rank:
            return best
        if state is not None:
            torch.save(state, self.path / "best.pth")
            best = (result["top1"], self.step)
        with open(self.path / "val.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "epoch": epoch, **{k: result[k] for k in ("top1", "top5", "videos", "views")}}) + "\n")
        self.board.add(self.step, **{"val/top1": result["top1"], "val/top5": result["top5"]})
        self.note(f"val step {self.step} (epoch {epoch}): top-1 {result['top1']:.1f} %, top-5 {result['top5']:.1f} % "
                  f"({result['videos']} videos, {result['views']} views); best top-1 {best[0]:.1f} % at step {best[1]}"
                  + (" -> best.pth" if state is not None else ""))
        return best


def timed(batches):
    """Yield (batch, seconds spent waiting for it): the loader's share of a step (the data wait)."""
    it = iter(batches)
    while True:
        tick = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        yield b, time.perf_counter() - tick
