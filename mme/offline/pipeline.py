"""The extraction pipeline (extract.py wires it): which videos a part extracts, a pool of worker processes
that turns each into samples (mme.offline.clips), and the shard writer they feed; progress on the console
and in OUT/log.txt. Interrupted work resumes (ShardWriter's journal); a worker killed mid-video (out of
memory) costs that video a retry in a process of its own, never the run.

    i, n = which_part("0/4")                              # or SLURM_ARRAY_TASK_ID/COUNT, or RANK/WORLD_SIZE
    videos, problems = list_split("k400", "data/k400", "train", fold=1, limit=None)
    run(writer, todo, total, params, seed, workers, log)  # todo: Videos not yet in writer.done()
"""
import multiprocessing
import os
import random
import signal
import time

import cv2

from mme.offline import clips, sources, synthetic
from mme.offline.video import VideoError
from mme.progress import Counter, console, log_line, shown

DEFAULTS = {   # per source: stride s (paper §4: K400 4, SSv2 3) and short side
    "k400": dict(stride=4, short_side=256), "ssv2": dict(stride=3, short_side=256),
    "ucf101": dict(stride=4, short_side=256), "hmdb51": dict(stride=4, short_side=256),
    "folder": dict(stride=4, short_side=256), "synthetic": dict(stride=3, short_side=128),
}


WORKER_DIED = "the process extracting it died twice (killed by a signal: out of memory?)"
UNREADABLE = "cannot read:"


def which_part(part):
    """(i, N) from --part 'i/N', else a SLURM array, else torchrun, else (0, 1)."""
    if part:
        try:
            i, n = (int(x) for x in str(part).split("/"))
        except ValueError:
            raise ValueError(f"--part {part!r}: expected i/N, e.g. --part 0/4") from None
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ:          # ids run MIN, MIN+STEP, ... (sbatch --array=0-6:2)
        step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", 1))
        i = (int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))) // step
        n = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= i < n:
        raise ValueError(f"part {i}/{n}: need 0 <= i < N")
    return i, n


def list_split(src, root, split, fold, limit):
    """(videos, problems) of one split, shuffled deterministically and cut to `limit`."""
    if src == "synthetic":
        n = limit or synthetic.DEFAULT_COUNT.get(split, 100)        # clips are made, not listed
        videos = [sources.Video(path=f"synthetic:{split}/{i}", key=f"synthetic_{split}_{i:06d}", label=i % len(synthetic.CLASSES),
                                label_name=synthetic.CLASSES[i % len(synthetic.CLASSES)], split=split) for i in range(n)]
        return videos, []
    videos, problems = sources.list_videos(src, root, split=split, fold=fold)
    random.Random(0).shuffle(videos)        # shards mix classes; parts get similar work
    return videos[:limit] if limit else videos, problems


_worker = {}


def _init(params, seed):
    cv2.setNumThreads(1)                    # one video per process; OpenCV's own threads would fight
    _worker.update(params=params, seed=seed)


def _serve(conn, work, params, seed):
    """A worker process: says it is ready, then runs `work` on each video sent over `conn` and sends the
    result back, until the main process closes its end (it exited, or stopped its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the main process stops its workers, quietly
    _init(params, seed)
    try:
        conn.send("ready")
        while True:
            conn.send(work(conn.recv()))
    except (EOFError, OSError):                    # the main process is gone or stopped us: nothing to report
        return


def _extract(video):
    if not video.path.startswith("synthetic:"):
        try:
            open(video.path, "rb").close()
        except OSError as e:                # permissions, a file gone: may pass, so a rerun tries again
            return video, [], [], 0, f"{UNREADABLE} {e.strerror}"
    try:
        samples, warnings, decoded = clips.video_samples(video, _worker["params"], _worker["seed"])
        return video, samples, warnings, decoded, None
    except VideoError as e:
        return video, [], [], 0, str(e)
    except Exception as e:                  # a decoder or codec failure of this one video: skip it, go on
        return video, [], [], 0, f"failed: {type(e).__name__}: {e}"


def run(writer, todo, total, params, seed, workers, log=None):
    """Extract `todo` with worker processes (extract_all), writing samples as videos finish; progress on the console
    (a live bar on a terminal, plain lines in a log file) and in `log`."""
    start, frames, skipped = time.perf_counter(), 0, 0
    progress = Counter(console, total, total - len(todo), "videos", log)
    try:
        parallel = workers > 1 and len(todo) > 1
        if not parallel:
            _init(params, seed)
        results = extract_all(todo, params, seed, workers) if parallel else iter(map(_extract, todo))
        try:
            for video, samples, warnings, decoded, error in results:
                if error:
                    say(f"[yellow]skip[/yellow] {shown(f'{video.path}: {error}')}", log)
                    writer.skip(video.key, video.path, error, retry=error == WORKER_DIED or error.startswith(UNREADABLE))
                else:
                    writer.write_video(video.key, samples, video.label_name)
                for w in warnings:
                    say(f"[yellow]note[/yellow] {shown(f'{video.path}: {w}')}", log)
                    writer.warn(video.key, video.path, w)
                frames += decoded
                skipped += bool(error)
                progress.update(1, f"{frames / (time.perf_counter() - start):.0f} frames/s  {skipped} skipped")
        finally:
            if parallel:
                results.close()                          # stops the pool now, even on an exception
        writer.close()
    finally:
        progress.stop()


def extract_all(todo, params, seed, workers):
    """_extract over `todo` in `workers` processes, yielding results as videos finish. Each worker has a pipe
    of its own, so the main process knows which video a dead worker (the OOM killer, kill -9) was on, and no
    thread of ours can wait forever on a message a killed worker left half written (ProcessPoolExecutor's
    manager thread did, on Ctrl-C or SIGTERM). That video is redone alone, in a process of its own while no
    other runs; if that process dies too, it is reported failed (WORKER_DIED). Nothing waits forever,
    nothing is lost."""
    # forkserver: workers are forked from a clean single-threaded server, never from this process, whose
    # progress thread (and a test's OpenCV threads) may hold locks at the fork that the child waits on forever
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["mme.offline.clips"])
    queue, suspects, pool = list(reversed(todo)), [], []
    try:
        while queue or suspects or pool:
            alone = bool(suspects)
            if alone and all(w.video is None for w in pool):   # a suspect runs alone, in a fresh process
                _stop_workers(pool)
                pool = [_Worker(fork, params, seed)]
                pool[0].give(suspects, alone=True)
            elif not alone:
                pool += [_Worker(fork, params, seed) for _ in range(min(workers, len(queue)) - len(pool))]
                for w in pool:
                    if w.video is None and queue:
                        w.give(queue)
            idle = [w for w in pool if w.video is None]
            if idle and not queue and not suspects:
                _stop_workers(idle)
                pool = [w for w in pool if w.video is not None]
            if not pool:
                continue
            for w in _ready(pool):
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):                 # the worker died (its end of the pipe closed)
                    pool.remove(w)
                    _stop_workers([w])
                    if not w.started:
                        raise RuntimeError("the extraction worker processes die as they start") from None
                    if w.video is None:
                        continue
                    if w.alone:
                        yield w.video, [], [], 0, WORKER_DIED
                    else:
                        say("[yellow]note[/yellow] a worker process died (killed: out of memory?); "
                            "redoing its video in a process of its own")
                        suspects.append(w.video)
                    continue
                if message == "ready":
                    w.started = True
                    continue
                w.video = None
                yield message
    finally:
        _stop_workers(pool)


class _Worker:
    """One worker process (_serve) and the main process's end of its pipe; `video`: the one it is on."""

    def __init__(self, fork, params, seed):
        self.conn, there = fork.Pipe()
        self.proc = fork.Process(target=_serve, args=(there, _extract, params, seed), daemon=True)
        self.proc.start()
        there.close()                          # only the worker holds its end: its death reads as end of file here
        self.video, self.alone, self.started = None, False, False

    def give(self, videos, alone=False):
        """Send it the last of `videos`, taken off that list; a dead worker leaves it there (its end of file is
        read next)."""
        try:
            self.conn.send(videos[-1])
        except OSError:
            return
        self.video, self.alone = videos.pop(), alone


def _ready(pool):
    """The workers with something to read: a result, a ready line, or end of file (a dead worker)."""
    from multiprocessing.connection import wait
    ready = wait([w.conn for w in pool])                  # blocks until one has
    return [w for w in pool if w.conn in ready]


def _stop_workers(pool):
    """Stop workers without waiting for videos in progress (an interrupted run, or idle ones), leaving no process."""
    started = [w for w in pool if w.proc.pid]             # a start cut short by Ctrl-C has no process to stop
    for w in started:
        if w.proc.exitcode is None:
            w.proc.terminate()
    for w in started:
        w.proc.join(5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
    for w in pool:
        w.conn.close()


def say(text, log=None):
    """A line (rich markup) to the console and, plain, to the log file."""
    console.print(text)
    from rich.text import Text
    log_line(log, Text.from_markup(text).plain)
