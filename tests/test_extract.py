"""End-to-end tests of extract.py: run as a subprocess (real exit codes and logs), read the shards back.

Every input video is generated here (tests/videos.py); sizes are tiny (--short_side 64) so the
module runs in well under a minute on 2 cores. Expensive runs are shared by module-scoped fixtures (the
synthetic dataset's by conftest.py's session-scoped synthetic_shards, with other test files); independent
runs are started side by side.
"""
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
from helpers import clean_env  # what a batch job sees (no terminal width, not in a SLURM array or torchrun group)
from videos import truncate, write_mjpeg_avi, write_video

from mme import shards as shardlib
from mme.offline import writer

SMALL = ["--short_side", "64"]


def start(*args, env=None):
    """Start `python extract.py args...` in the repo root; returns the Popen."""
    return subprocess.Popen([sys.executable, "extract.py", *map(str, args)], cwd=REPO, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def extract(*args, env=None):
    return finish(start(*args, env=env))


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def squash(text):
    """Text without any whitespace: what a log says, however the console wrapped it."""
    return re.sub(r"\s+", "", text)


# --- reading shards back ------------------------------------------------------------------------

def read_tar(path):
    """[(key, raw sample dict)] in tar order; a key is the member name up to the first dot."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, component = m.name.split(".", 1)
            sample = samples.setdefault(key, {"__key__": key})
            assert component not in sample, f"{path.name}: {m.name} twice"
            sample[component] = tar.extractfile(m).read()
    return list(samples.items())


def shard_keys(out):
    """[(sample key, shard name)] over every final shard in `out`, duplicates kept."""
    return [(key, p.name) for p in sorted(Path(out).glob("*.tar")) for key, _ in read_tar(p)]


def decoded(out):
    """{shard name: [decoded samples]} over every final shard in `out`."""
    return {p.name: [shardlib.decode(raw) for _, raw in read_tar(p)] for p in sorted(Path(out).glob("*.tar"))}


def assert_clean(out):
    leftovers = [str(p) for p in Path(out).rglob("*.tmp")]
    assert not leftovers, f"unfinished files left: {leftovers}"


def assert_unique(pairs):
    dup = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    assert not dup, f"samples stored twice: {dup}"


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


def file_hashes(out, pattern="*.tar"):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in Path(out).glob(pattern)}


def assert_manifest_matches_shards(out, m, classes=True):
    """manifest.json lists exactly the shards on disk, with their sample counts, and adds up."""
    on_disk = {p.name: len(read_tar(p)) for p in Path(out).glob("*.tar")}
    listed = {name: n for s in m["splits"].values() for name, n in s["shards"].items()}
    assert listed == on_disk
    for split, s in m["splits"].items():
        assert all(name.startswith(f"{split}-") for name in s["shards"])
        assert s["samples"] == sum(s["shards"].values())
        if classes:
            assert sum(s["classes"].values()) == s["samples"], f"{split}: class counts do not add up"
    assert m["samples"] == sum(s["samples"] for s in m["splits"].values()) == sum(on_disk.values())
    assert m["videos"] == sum(s["videos"] for s in m["splits"].values())


def assert_windows_in_one_shard(by_shard):
    shard_of = defaultdict(set)
    for name, samples in by_shard.items():
        for s in samples:
            shard_of[s["meta"]["video_key"]].add(name)
    straddling = {v: sorted(n) for v, n in shard_of.items() if len(n) > 1}
    assert not straddling, f"a video's windows straddle shards: {straddling}"


# --- 1. the built-in synthetic dataset ----------------------------------------------------------

# synthetic_shards (conftest.py): --split train,val --limit 6 --short_side 64 --shard_samples 4 --workers 2

def test_synthetic_manifest(synthetic_shards):
    out, r = synthetic_shards
    ok(r)
    m = manifest(out)
    assert m["schema"] == shardlib.SCHEMA_VERSION
    assert set(m["splits"]) == {"train", "val"}
    assert m["videos"] == 12 and m["samples"] == 12       # synthetic clips are one window long
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["videos"] == 6 and s["samples"] == 6
        # --limit 6: clip i has class i % 10, so six different classes, one sample each
        assert len(s["classes"]) == 6 and set(s["classes"].values()) == {1}
        # 6 one-window videos at 4 samples per shard: 4 + 2
        assert sorted(s["shards"].values()) == [2, 4]
        for name in s["shards"]:
            assert (out / name).is_file()
    assert m["params"]["short_side"] == 64 and m["params"]["stride"] == 3 and m["params"]["src"] == "synthetic"
    assert m["skipped"] == [] and m["warnings"] == []
    assert_manifest_matches_shards(out, m)
    assert_clean(out)


def test_progress_lines_when_stderr_is_a_file(synthetic_shards):
    """A batch job's log gets plain progress lines (the first and the last video of each split at least)."""
    out, r = synthetic_shards
    lines = [x for x in ok(r).stderr.splitlines() if x.startswith("videos ")]
    assert [x.split()[1] for x in lines] == ["1/6", "6/6", "1/6", "6/6"], r.stderr
    assert all(w in lines[-1] for w in ("frames/s", "0 skipped", "ETA 0s")), lines[-1]


def test_synthetic_samples_decode(synthetic_shards):
    out, r = synthetic_shards
    ok(r)
    by_shard = decoded(out)
    samples = [s for ss in by_shard.values() for s in ss]
    assert len(samples) == 12
    assert len({s["key"] for s in samples}) == 12
    for s in samples:
        meta = s["meta"]
        assert s["frames"].shape == (16, 64, 80, 3) and s["frames"].dtype.name == "uint8"
        assert s["disp"].shape == (8, 8, 10, 6, 2)
        assert s["hog"].shape == (8, 8, 10, 6, 9)
        assert s["valid"].shape == (8, 8, 10) and s["valid"].dtype == bool
        assert meta["schema"] == shardlib.SCHEMA_VERSION
        idx = meta["frame_indices"]
        assert len(idx) == 16 and all(b - a == 3 for a, b in zip(idx, idx[1:]))
        assert s["key"] == f"{meta['video_key']}_w00"
        assert meta["split"] in ("train", "val") and meta["video_key"].startswith(f"synthetic_{meta['split']}_")
        assert s["label"] == int(meta["video_key"].rsplit("_", 1)[1]) % 10
        assert s["valid"].any() and s["frames"].std() > 1       # real content, not a blank clip
    # the class counts of the manifest are those of the samples
    m = manifest(out)
    for split in ("train", "val"):
        assert Counter(s["meta"]["label_name"] for s in samples if s["meta"]["split"] == split) \
            == Counter(m["splits"][split]["classes"])
    assert_windows_in_one_shard(by_shard)


# --- 2. a folder of videos, good and bad --------------------------------------------------------

# what must happen to each unusable or unusual file: "skip" with a reason matching the pattern,
# "warn" (extracted, with one warning matching it) or "ok" (extracted, no warning)
EXPECTED = {
    "random_bytes_named_like_a_video.mp4": ("skip", r"cannot open|not a video|corrupt"),
    "zero_bytes.mp4": ("skip", r"cannot open|zero frames|empty"),
    "too_short_3_frames.mp4": ("skip", r"too short"),
    "tiny_16x16.mp4": ("skip", r"tiny"),
    "grayscale.mp4": ("warn", r"grayscale"),
    # cv2.VideoWriter rounds odd sizes down to even ones (99x71 -> 98x70) whatever the codec, so this
    # one is only "not a multiple of 16"; the truly odd-sized one is the hand-written odd_99x71.avi
    "odd_99x71.mp4": ("ok", None),
    "odd_99x71.avi": ("warn", r"odd size 99x71"),
    "truncated_header_at_end.avi": ("warn", r"truncated"),
    # truncated_40_percent.mp4 (moov atom lost) may be skipped or extracted with a warning
}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder")
    root = base / "videos"
    # 2 classes x 2 videos of a moving random texture, 44 frames at 128x96
    good = [write_video(root / c / f"{c}_{i}.mp4", frames=44, seed=10 * k + i, speed=(2, 1) if i else (-1, 2))
            for k, c in enumerate(["cats", "dogs"]) for i in range(2)]
    misc = root / "misc"
    misc.mkdir()
    (misc / "random_bytes_named_like_a_video.mp4").write_bytes(os.urandom(20_000))
    (misc / "zero_bytes.mp4").write_bytes(b"")
    truncate(write_video(base / "full.mp4", frames=44, seed=99), misc / "truncated_40_percent.mp4", 0.4)
    write_video(misc / "too_short_3_frames.mp4", frames=3)
    write_video(misc / "tiny_16x16.mp4", frames=44, size=(16, 16))
    write_video(misc / "grayscale.mp4", frames=40, color=False)
    write_video(misc / "odd_99x71.mp4", frames=30, size=(99, 71))
    write_mjpeg_avi(misc / "odd_99x71.avi", frames=30, size=(99, 71))
    # an AVI cut short: its header promises 60 frames, about 24 decode
    truncate(write_mjpeg_avi(base / "full.avi", frames=60, size=(128, 96)), misc / "truncated_header_at_end.avi", 0.4)
    out = base / "out"
    # --stride 1: a 44-frame video gives 2 windows (span 21); 3 samples per shard cannot hold two such videos.
    # One worker: videos finish in list order, so which shard is full when is the same every run.
    r = extract("--src", "folder", "--root", root, "--out", out, *SMALL, "--stride", 1, "--shard_samples", 3,
                "--workers", 1)
    return root, good, out, r


def test_folder_every_video_accounted_for(folder_run):
    root, good, out, r = folder_run
    ok(r)
    m = manifest(out)
    samples = [s for ss in decoded(out).values() for s in ss]
    extracted = {s["meta"]["video"] for s in samples}
    skipped = Counter(e["video"] for e in m["skipped"])
    assert all(n == 1 for n in skipped.values()), f"skipped more than once: {skipped}"
    every = {str(p) for p in root.rglob("*") if p.is_file()}
    assert not extracted & set(skipped)
    assert extracted | set(skipped) == every, "some video was dropped silently"
    assert {str(p) for p in good} <= extracted
    # the cut mp4 (its index is at the end) cannot open; either outcome is fine, never silence
    cut = str(root / "misc" / "truncated_40_percent.mp4")
    warned = {e["video"]: e["reason"] for e in m["warnings"]}
    assert cut in skipped or (cut in extracted and "truncated" in warned.get(cut, ""))
    assert m["videos"] == len(extracted)
    assert m["samples"] == len(samples)
    assert_manifest_matches_shards(out, m)
    assert_clean(out)


def test_folder_skips_and_warnings_name_the_cause(folder_run):
    root, good, out, r = folder_run
    ok(r)
    m = manifest(out)
    skipped = {Path(e["video"]).name: e["reason"] for e in m["skipped"]}
    warned = defaultdict(list)
    for e in m["warnings"]:
        warned[Path(e["video"]).name].append(e["reason"])
    for e in m["skipped"] + m["warnings"]:
        assert e["reason"].strip() and "\n" not in e["reason"], e
        # the log names the file and says why (checked however the console wrapped the line)
        assert squash(f"{e['video']}: {e['reason']}") in squash(r.stderr), f"not in the log: {e}"
    for name, (outcome, pattern) in EXPECTED.items():
        if outcome == "skip":
            assert re.search(pattern, skipped.get(name, ""), re.I), f"{name}: skipped {skipped.get(name)!r}"
        else:
            assert name not in skipped, f"{name} skipped: {skipped[name]}"
        if outcome == "warn":
            assert len(warned.get(name, [])) == 1 and re.search(pattern, warned[name][0]), f"{name}: {warned.get(name)}"
        if outcome == "ok":
            assert name not in warned, f"{name}: {warned[name]}"
    assert not set(warned) - {n for n, (o, _) in EXPECTED.items() if o == "warn"} - {"truncated_40_percent.mp4"}


def test_folder_samples(folder_run):
    root, good, out, r = folder_run
    ok(r)
    m = manifest(out)
    by_shard = decoded(out)
    samples = [s for ss in by_shard.values() for s in ss]
    assert len({s["key"] for s in samples}) == len(samples)
    classes = sorted({p.parent.name for p in root.rglob("*") if p.is_file()})      # cats, dogs, misc
    by_video = defaultdict(list)
    for s in samples:
        meta = s["meta"]
        by_video[Path(meta["video"]).name].append(s)
        assert meta["label_name"] == Path(meta["video"]).parent.name
        assert s["label"] == classes.index(meta["label_name"])
        H, W = s["frames"].shape[1:3]
        assert s["frames"].shape[0] == 16 and H == 64 and W % 16 == 0 and meta["size"] == [W, H]
        assert s["disp"].shape == (8, H // 8, W // 8, 6, 2) and s["valid"].shape == (8, H // 8, W // 8)
        assert s["hog"].shape == (8, H // 8, W // 8, 6, 9)
        idx = meta["frame_indices"]
        assert all(0 <= i < meta["video_frames"] for i in idx)
        assert s["frames"].std() > 1
    for p in good:                              # 44 frames, 128x96 -> 2 windows at 80x64, both tracked
        got = by_video[p.name]
        assert sorted(s["key"] for s in got) == [f"{p.parent.name}__{p.stem}_w00", f"{p.parent.name}__{p.stem}_w01"]
        assert all(s["frames"].shape == (16, 64, 80, 3) and s["meta"]["windows"] == 2 for s in got)
        assert all(s["valid"].mean() > 0.5 for s in got)
    gray = by_video["grayscale.mp4"][0]["frames"].astype(int)
    assert abs(gray[..., 0] - gray[..., 1]).max() <= 2 and abs(gray[..., 1] - gray[..., 2]).max() <= 2
    assert by_video["odd_99x71.avi"][0]["meta"]["video_size"] == [99, 71]
    assert by_video["odd_99x71.avi"][0]["frames"].shape == (16, 64, 96, 3)
    # the cut AVI: the windows are planned on the frames that decode, not the header's 60
    cut = by_video["truncated_header_at_end.avi"]
    decodable = int(re.search(r"(\d+) of 60", next(e["reason"] for e in m["warnings"]
                                                   if e["video"].endswith("truncated_header_at_end.avi"))).group(1))
    assert len(cut) == 1 and cut[0]["meta"]["video_frames"] == decodable < 60
    assert max(cut[0]["meta"]["frame_indices"]) < decodable
    assert_windows_in_one_shard(by_shard)
    # --shard_samples 3 is a limit (a shard holding a single video may exceed it; none here has 4 windows),
    # and a shard is closed only when the next video does not fit in it
    sizes = {n: len(ss) for n, ss in by_shard.items()}
    assert all(n <= 3 for n in sizes.values()), sizes
    names = sorted(by_shard)
    for this, nxt in zip(names, names[1:]):
        assert sizes[this] + by_shard[nxt][0]["meta"]["windows"] > 3, f"{this} closed early: {sizes}"


def test_folder_log_lines_are_one_line(folder_run):
    root, good, out, r = folder_run
    ok(r)
    lines = r.stderr.splitlines()
    for e in manifest(out)["skipped"] + manifest(out)["warnings"]:
        assert any(f"{e['video']}: {e['reason']}" in line for line in lines), f"no log line for {e}"


def test_folder_log_names_files_with_brackets(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "cats" / "good.mp4", frames=44)
    names = ["Rick Astley - Never Gonna [dqw4w9wgxcq].mp4", "clip [b].mp4"]
    for n in names:
        (root / "cats" / n).write_bytes(os.urandom(5000))
    out = tmp_path / "out"
    r = ok(extract("--src", "folder", "--root", root, "--out", out, *SMALL, "--workers", 1))
    assert sorted(Path(e["video"]).name for e in manifest(out)["skipped"]) == sorted(names)
    for n in names:
        assert squash(n) in squash(r.stderr), f"{n!r} not in the log:\n{r.stderr}"


# --- 3. errors: exit 2, a message, nothing written ----------------------------------------------

@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("errors")
    (base / "file.txt").write_text("not a folder")
    cases = {
        "unknown_src": ["--src", "nope", "--out", base / "out_nope"],
        "missing_root": ["--src", "k400", "--root", base / "no_such_dataset", "--out", base / "out_k400"],
        "out_under_file": ["--src", "synthetic", "--limit", 1, *SMALL, "--out", base / "file.txt" / "out"],
        "part_out_of_range": ["--src", "synthetic", "--limit", 1, *SMALL, "--part", "2/2", "--out", base / "out_part"],
        "bad_short_side": ["--src", "synthetic", "--limit", 1, "--short_side", 50, "--out", base / "out_short"],
        "malformed_part": ["--src", "synthetic", "--limit", 1, *SMALL, "--part", "x/2", "--out", base / "out_malformed"],
        # issue #10, points 11 and 12: a misspelled flag, or a value no run can use, stops before any work
        "misspelled_flag": ["--src", "synthetic", "--limt", 2, *SMALL, "--out", base / "out_limt"],
        "split_typo": ["--src", "synthetic", "--limit", 1, *SMALL, "--split", "trian", "--out", base / "out_trian"],
        "split_path": ["--src", "synthetic", "--limit", 1, *SMALL, "--split", "../../x", "--out", base / "out_dots"],
        "negative_limit": ["--src", "synthetic", "--limit", -5, *SMALL, "--out", base / "out_negative"],
        "zero_grid": ["--src", "synthetic", "--limit", 1, *SMALL, "--grid", 0, "--out", base / "out_grid"],
    }
    procs = {name: start(*args) for name, args in cases.items()}      # side by side: each is mostly start-up
    return base, {name: finish(p) for name, p in procs.items()}


def assert_error(r, out, *words):
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    assert "error" in r.stderr.lower()
    for w in words:
        assert squash(str(w)) in squash(r.stderr), f"{w!r} not in: {r.stderr}"
    assert not Path(out).exists(), f"{out} was created"


def test_error_unknown_source(error_runs):
    base, r = error_runs
    assert_error(r["unknown_src"], base / "out_nope", "nope", "synthetic")


def test_error_missing_root(error_runs):
    base, r = error_runs
    assert_error(r["missing_root"], base / "out_k400", base / "no_such_dataset", "--root")


def test_error_out_under_a_file(error_runs):
    base, r = error_runs
    assert_error(r["out_under_file"], base / "file.txt" / "out", "--out")
    assert (base / "file.txt").read_text() == "not a folder"


def test_error_bad_part_and_short_side(error_runs):
    base, r = error_runs
    assert_error(r["part_out_of_range"], base / "out_part", "2/2")
    assert_error(r["bad_short_side"], base / "out_short", "--short_side")


def test_error_malformed_part(error_runs):
    base, r = error_runs
    assert_error(r["malformed_part"], base / "out_malformed", "--part")


def test_error_unknown_flag_before_any_work(error_runs):
    base, r = error_runs
    assert_error(r["misspelled_flag"], base / "out_limt", "--limt", "--limit")


def test_error_invalid_values_name_the_flag(error_runs):
    base, r = error_runs
    assert_error(r["split_typo"], base / "out_trian", "--split", "trian", "train")
    assert_error(r["split_path"], base / "out_dots", "--split")
    assert not (base.parent / "x").exists()
    assert_error(r["negative_limit"], base / "out_negative", "--limit", "at least 1")
    assert_error(r["zero_grid"], base / "out_grid", "--grid")


# --- 4. resuming after an interruption ---------------------------------------------------------

RESUMABLE = ["--src", "synthetic", "--limit", 8, "--shard_samples", 2, "--workers", 1, *SMALL]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run: (out dir, sorted sample keys, manifest)."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    ok(extract(*RESUMABLE, "--out", out))
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert len(pairs) == 8 and len(list(out.glob("train-000-*.tar"))) == 4
    return out, sorted(k for k, _ in pairs), manifest(out)


def test_resume_after_kill(baseline, tmp_path):
    _, keys, m0 = baseline
    out = tmp_path / "out"
    proc = start(*RESUMABLE, "--out", out)
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("train-000-*.tar")):        # the first finished shard (not .tar.tmp)
            assert proc.poll() is None, f"finished before a shard appeared: {finish(proc).stderr[-2000:]}"
            assert time.monotonic() < deadline, "no shard after 90 s"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)                 # kill -9: no cleanup, no manifest
        finish(proc)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "manifest.json").exists()
    kept = file_hashes(out)
    assert kept and len(kept) < 4

    r = ok(extract(*RESUMABLE, "--out", out))
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert sorted(k for k, _ in pairs) == keys
    assert {n: h for n, h in file_hashes(out).items() if n in kept} == kept, "finished shards were rewritten"
    assert_clean(out)
    m = manifest(out)
    assert (m["videos"], m["samples"]) == (8, 8)
    assert_manifest_matches_shards(out, m)
    # the rerun skipped exactly the videos of the shards that survived the kill (2 per shard)
    assert re.search(r"8videos,(\d+)alreadydone", squash(r.stderr)).group(1) == str(2 * len(kept))


def descendants(pid):
    """The pids of every process below `pid` (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def test_sigterm_stops_the_workers_too_and_the_rerun_completes(baseline, tmp_path):
    """Issue #25: SIGTERM (a batch system's stop) takes Ctrl-C's way: one line, the worker pool stopped (no
    forkserver or worker left blocked), finished shards kept; the rerun completes without duplicates."""
    _, keys, _ = baseline
    out = tmp_path / "out"
    proc = start(*[a if a != 1 else 2 for a in RESUMABLE], "--out", out)
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("train-000-*.tar")) or not descendants(proc.pid):
            assert proc.poll() is None, f"finished first: {finish(proc).stderr[-2000:]}"
            assert time.monotonic() < deadline, "no shard after 90 s"
            time.sleep(0.005)
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        r = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted: finished shards are kept" in r.stderr and "Traceback" not in r.stderr
    deadline = time.monotonic() + 10
    def alive(pid):
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
    while any(alive(p) for p in below):
        assert time.monotonic() < deadline, "worker processes left behind"
        time.sleep(0.1)
    ok(extract(*RESUMABLE, "--out", out))
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert sorted(k for k, _ in pairs) == keys


@pytest.fixture(scope="module")
def lost_journal_line(baseline, tmp_path_factory):
    """The baseline after a kill between a shard's rename and its journal line, then rerun."""
    src, keys, m0 = baseline
    out = tmp_path_factory.mktemp("lost_line") / "out"
    shutil.copytree(src, out)
    journal = out / ".extract" / "train-000.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    assert '"shard": "train-000-000003.tar"' in lines[-1]
    journal.write_text("".join(lines[:-1]))
    before = file_hashes(out)
    return out, before, extract(*RESUMABLE, "--out", out)


def test_resume_after_lost_journal_line(baseline, lost_journal_line):
    _, keys, m0 = baseline
    out, before, r = lost_journal_line
    ok(r)
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert sorted(k for k, _ in pairs) == keys
    assert file_hashes(out) == before, "the recovered shard should be kept, nothing rewritten or added"
    assert_clean(out)
    m = manifest(out)
    assert (m["videos"], m["samples"], m["splits"]["train"]["shards"]) == (8, 8, m0["splits"]["train"]["shards"])
    assert "8videos,8alreadydone" in squash(r.stderr)


def test_resume_after_lost_journal_line_keeps_class_counts(baseline, lost_journal_line):
    _, keys, m0 = baseline
    out, before, r = lost_journal_line
    ok(r)
    assert manifest(out)["splits"]["train"]["classes"] == m0["splits"]["train"]["classes"]


def test_resume_after_torn_journal_line(baseline, tmp_path):
    src, keys, _ = baseline
    out = tmp_path / "out"
    shutil.copytree(src, out)
    journal = out / ".extract" / "train-000.jsonl"
    text = journal.read_text()
    journal.write_text(text[: len(text) - 25])           # the last line cut mid-way, no newline
    ok(extract(*RESUMABLE, "--out", out))
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert sorted(k for k, _ in pairs) == keys


# --- 5. parts: --part i/N, SLURM arrays, torchrun -----------------------------------------------

PARTS = RESUMABLE       # the same videos as the baseline, so the parts' union must equal it


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("parts")
    out = base / "out"
    # the SLURM-array and torchrun routes run side by side with the explicit parts
    env_runs = {
        "slurm": start(*PARTS, "--out", base / "slurm",
                       env=clean_env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")),
        "torchrun": start(*PARTS, "--out", base / "torchrun", env=clean_env(RANK="1", WORLD_SIZE="2")),
    }
    try:
        ok(extract(*PARTS, "--part", "0/2", "--out", out))
        names0 = sorted(p.name for p in out.glob("*.tar"))
        ok(extract(*PARTS, "--part", "1/2", "--out", out))
        names1 = sorted(p.name for p in out.glob("*.tar") if p.name not in names0)
    finally:
        env_results = {k: finish(p) for k, p in env_runs.items()}
    return base, out, names0, names1, env_results


def test_parts_are_disjoint_and_complete(baseline, parts_run):
    _, keys, _ = baseline
    base, out, names0, names1, _ = parts_run
    assert names0 and all(n.startswith("train-000-") for n in names0)
    assert names1 and all(n.startswith("train-001-") for n in names1)
    keys0 = {k for n in names0 for k, _ in read_tar(out / n)}
    keys1 = {k for n in names1 for k, _ in read_tar(out / n)}
    assert keys0 and keys1 and not keys0 & keys1
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert sorted(k for k, _ in pairs) == keys
    parts = [json.loads((out / f"manifest-train-{i:03d}.json").read_text()) for i in range(2)]
    m = manifest(out)
    assert m["videos"] == sum(p["splits"]["train"]["videos"] for p in parts) == len(keys)
    assert m["samples"] == sum(p["splits"]["train"]["samples"] for p in parts) == len(keys)
    assert sorted(m["parts"]) == ["train-0/2", "train-1/2"]
    assert_manifest_matches_shards(out, m)
    assert_clean(out)


@pytest.mark.parametrize("route", ["slurm", "torchrun"])
def test_part_from_environment(parts_run, route):
    base, out, names0, names1, env_results = parts_run
    ok(env_results[route])
    env_out = base / route
    assert sorted(p.name for p in env_out.glob("*.tar")) == names1          # train-001-*: part 1 of 2
    assert sorted(k for k, _ in shard_keys(env_out)) == sorted(k for n in names1 for k, _ in read_tar(out / n))


def test_part_from_stepped_slurm_array(parts_run):
    base, out, names0, names1, _ = parts_run
    env_out = base / "slurm_step"
    ok(extract(*PARTS, "--out", env_out, env=clean_env(
        SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="2",
        SLURM_ARRAY_TASK_STEP="2", SLURM_ARRAY_TASK_COUNT="2")))
    assert sorted(p.name for p in env_out.glob("*.tar")) == names1


# --- 6. --help ----------------------------------------------------------------------------------

def main_flags():
    tree = ast.parse((REPO / "extract.py").read_text())
    main = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main")
    return [a.arg for a in main.args.args + main.args.kwonlyargs]


def test_help_lists_every_flag():
    r = ok(extract("--help"))
    text = r.stdout + r.stderr
    flags = main_flags()
    assert len(flags) >= 18
    for name in flags:
        assert re.search(rf"^  --{name}\b", text, re.M), f"--help does not mention --{name} as users type it"
    assert "INFO: Showing help" not in text and "SRC" not in text


# --- 7. a worker process killed (the OOM killer, kill -9) -----------------------------------------

def children(pid):
    """{child pid: command line} of process `pid`, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            pass                                          # a process that ended while we looked
    return found


def pool_workers(pid):
    """The pool workers of extract.py process `pid`: the children of its forkserver."""
    return [w for server, cmd in children(pid).items() if b"forkserver" in cmd for w in children(server)]


def test_killed_worker_loses_nothing_and_the_run_ends(tmp_path):
    """Issue #10 point 1: multiprocessing.Pool lost the task and waited forever."""
    out = tmp_path / "out"
    proc = start("--src", "synthetic", "--limit", 10, "--shard_samples", 2, "--workers", 2, *SMALL, "--out", out)
    try:
        deadline = time.monotonic() + 90
        while not (list(out.glob("train-000-*.tar")) and (workers := pool_workers(proc.pid))):
            assert proc.poll() is None, f"finished before a worker could be killed: {finish(proc).stderr[-2000:]}"
            assert time.monotonic() < deadline, "no shard after 90 s"
            time.sleep(0.005)
        os.kill(workers[0], signal.SIGKILL)
        r = ok(finish(proc, timeout=120))                 # ends, by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "workerprocessdied" in squash(r.stderr)
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert len(pairs) == 10 and manifest(out)["skipped"] == []
    assert_clean(out)


def _dies_on_bad(video):
    """_extract for test_worker_killed_by_one_video: the worker of video 'bad' is killed every time."""
    if video == "bad":
        os.kill(os.getpid(), signal.SIGKILL)
    return video, [], [], 1, None


def test_worker_killed_by_one_video_reports_it_and_goes_on(monkeypatch):
    from mme.offline import pipeline
    monkeypatch.setattr(pipeline, "_extract", _dies_on_bad)
    todo = ["a", "b", "bad", "c", "d", "e"]
    results = {video: error for video, _, _, _, error in pipeline.extract_all(todo, None, 0, 2)}
    assert sorted(results) == sorted(todo)                # each once
    assert results.pop("bad") == pipeline.WORKER_DIED and set(results.values()) == {None}


def _dies_mid_message(video):
    """_extract for the test below: the worker of video 'half' writes the start of a result and is killed."""
    if video == "half":
        import gc
        import struct
        from multiprocessing.connection import Connection
        conn = next(o for o in gc.get_objects() if isinstance(o, Connection) and not o.closed)
        os.write(conn.fileno(), struct.pack("!i", 1000) + b"x" * 10)     # a header for 1000 bytes, then 10 of them
        os.kill(os.getpid(), signal.SIGKILL)
    return video, [], [], 1, None


def test_worker_killed_halfway_through_its_result_costs_that_video_only(monkeypatch):
    """ProcessPoolExecutor's manager thread waited forever on the rest of such a message (CI: SIGTERM hung)."""
    from mme.offline import pipeline
    monkeypatch.setattr(pipeline, "_extract", _dies_mid_message)
    signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(60)                                      # a hang fails the test instead of the whole run
    try:
        results = {video: error for video, _, _, _, error in pipeline.extract_all(["a", "half", "b", "c"], None, 0, 2)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert results == {"a": None, "half": pipeline.WORKER_DIED, "b": None, "c": None}


def test_skip_for_a_passing_reason_is_retried(tmp_path):
    w = writer.ShardWriter(tmp_path, "train-000")
    w.skip("v1", "a.mp4", "died", retry=True)
    w.skip("v2", "b.mp4", "cannot open", retry=False)
    assert writer.ShardWriter(tmp_path, "train-000").done() == {"v2"}
    w = writer.ShardWriter(tmp_path, "train-000")
    w.write_video("v1", [], "cats")
    w.close()
    m = writer.part_manifest(writer.ShardWriter(tmp_path, "train-000").entries, "train", {}, "train-0/1", 2)
    assert [e["video"] for e in m["skipped"]] == ["b.mp4"]


def test_files_that_are_no_video_file_get_a_line_and_names_cannot_forge_lines(tmp_path):
    """Issue #10, smaller points: a dangling symlink, a symlink loop and a FIFO named .mp4 were skipped
    without a line; a name with a newline or an ANSI escape could forge or recolour log lines."""
    root = tmp_path / "videos"
    write_video(root / "cats" / "good.mp4", frames=44)
    (root / "cats" / "dangling.mp4").symlink_to(root / "nowhere.mp4")
    (root / "cats" / "loop.mp4").symlink_to(root / "cats" / "loop.mp4")
    os.mkfifo(root / "cats" / "fifo.mp4")
    forged = "x\nskip good.mp4: fake\x1b[31m.mp4"
    (root / "cats" / forged).write_bytes(os.urandom(3000))
    out = tmp_path / "out"
    r = ok(finish(start("--src", "folder", "--root", root, "--out", out, *SMALL, "--workers", 1), timeout=60))
    reasons = {Path(e["video"]).name: e["reason"] for e in manifest(out)["skipped"]}
    assert reasons["dangling.mp4"] == "cannot read: dangling symlink" and reasons["loop.mp4"] == "cannot read: symlink loop"
    assert "FIFO" in reasons["fifo.mp4"] and forged in reasons and manifest(out)["videos"] == 1
    for name in ("dangling.mp4", "loop.mp4", "fifo.mp4"):
        assert len([line for line in r.stderr.splitlines() if name in line and "cannot read" in line]) == 1
    assert "\x1b" not in r.stderr and not any(line.startswith("skip good.mp4") for line in r.stderr.splitlines())
    assert "\\nskip good.mp4: fake\\x1b[31m.mp4" in r.stderr


# --- 8. evaluation views (issue #11): the papers' test clips ------------------------------------

def test_evaluation_views_follow_the_protocols():
    """Kinetics (VideoMAE: 5 clips, the authors' code: 7) on a 10-s video at 30 fps, stride 4; SSv2 (2 clips)
    on 3-s and 6-s videos at 12 fps, stride 3: exactly that many windows over the whole video, overlapping
    where it is short; training windows stay at most --windows, never overlapping."""
    from mme.offline.clips import Params, window_starts
    k400 = Params(stride=4, views=5)
    span = k400.span()                                                    # 63 raw frames
    starts = window_starts(300, k400)
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == 300 - span       # first to last frame
    assert min(b - a for a, b in zip(starts, starts[1:])) < span                    # overlapping: 5 x 63 > 300
    seven = window_starts(300, Params(stride=4, views=7))
    assert len(seven) == 7 and seven[-1] == 300 - span
    assert window_starts(300, Params(stride=4, windows=4)) == [0, 79, 158, 237]     # training: 4, no overlap
    ssv2 = Params(stride=3, views=2)
    assert window_starts(72, ssv2) == [0, 72 - ssv2.span()]                         # 6 s: both ends
    assert window_starts(36, ssv2) == [0, 2]           # 3 s, shorter than a window: offsets within one stride
    assert window_starts(36, Params(stride=3, windows=4)) == [0]


def test_views_per_split_at_extraction(tmp_path):
    out = tmp_path / "out"
    ok(extract("--src", "synthetic", "--out", out, "--split", "train,val", "--limit", 3, *SMALL, "--views", "val=3",
               "--workers", 1))
    m = manifest(out)
    assert m["splits"]["train"]["samples"] == 3 and m["splits"]["val"]["samples"] == 9 and m["params"]["views"] == {"val": 3}
    metas = [json.loads(raw["json"]) for tar in sorted(out.glob("val-*.tar")) for _, raw in read_tar(tar)]
    assert sorted((x["video_key"], x["window"], x["windows"]) for x in metas) == [
        (f"synthetic_val_{i:06d}", w, 3) for i in range(3) for w in range(3)]
    assert len({(x["video_key"], tuple(x["frame_indices"])) for x in metas}) == 9    # 3 different clips a video
    r = extract("--src", "synthetic", "--out", tmp_path / "bad", "--split", "val", "--views", "vla=2")
    assert r.returncode == 2 and "--views" in r.stderr and "Traceback" not in r.stderr


def test_limit_per_split(tmp_path):
    """--limit train=3,val=2: each split its own count (the built-in data: 4,000 training clips and the
    usual 100 validation clips in one command)."""
    out = tmp_path / "out"
    ok(extract("--src", "synthetic", "--out", out, "--split", "train,val", "--limit", "train=3,val=2", *SMALL))
    m = manifest(out)
    assert m["splits"]["train"]["samples"] == 3 and m["splits"]["val"]["samples"] == 2
    r = extract("--src", "synthetic", "--out", tmp_path / "bad", "--split", "val", "--limit", "val=0")
    assert r.returncode == 2 and "--limit 'val=0'" in r.stderr and "at least 1" in r.stderr


def test_refuses_to_resume_into_an_older_schema(tmp_path):
    """Issue #12: schema 2 extraction into a folder of version 1 shards would mix versions: one line, no work."""
    (tmp_path / "manifest.json").write_text('{"schema": 1, "splits": {}}')
    r = subprocess.run([sys.executable, str(REPO / "extract.py"), "--src", "synthetic", "--out", str(tmp_path), "--limit", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds shards of schema 1" in r.stderr and "new folder" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.tar"))


def test_show_draws_samples_with_their_tracks(synthetic_shards, tmp_path):
    """extract.py show: a PNG of the first samples, and per sample the moving / invalid tracks it drew,
    counted here again from the decoded arrays (every tubelet of a 4-frame clip is one column)."""
    out, _ = synthetic_shards
    png = tmp_path / "show.png"
    r = ok(subprocess.run([sys.executable, "extract.py", "show", out, "--n", "2", "--split", "val", "--out", png],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True))
    assert png.stat().st_size > 10_000 and r.stderr.strip().endswith(f"done: {png}")
    in_order = [c for name, samples in decoded(out).items() if name.startswith("val") for c in samples]   # shard order
    clips = {c["key"]: c for c in in_order}
    keys = [c["key"] for c in in_order[:2]]
    lines = [x for x in r.stderr.splitlines() if x.startswith("synthetic_val_")]
    assert [x.split(":")[0] for x in lines] == keys
    for key, line in zip(keys, lines):
        c = clips[key]
        tubes = np.linspace(0, c["disp"].shape[0] - 1, 4).round().astype(int)
        steps, valid = c["disp"][tubes], c["valid"][tubes]
        moving = int((valid & (np.abs(steps).sum((-1, -2)) >= 0.5)).sum())
        assert f"{c['meta']['label_name']}, " in line and f"{moving} moving and {int((~valid).sum())} invalid" in line
    bad = subprocess.run([sys.executable, "extract.py", "show", out, "--n", "0"], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--n 0: must be between 1 and 64" in bad.stderr


def test_a_second_extraction_of_the_same_part_is_refused(tmp_path):
    """Issue #25: two extract.py into one --out (the same part) renamed each other's half-written shards; the second
    is now refused in one line naming the first, which finishes whole."""
    out = tmp_path / "out"
    first = start(*RESUMABLE, "--out", out)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".extract" / "part-000.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        second = extract(*RESUMABLE, "--out", out)
    finally:
        r = finish(first)
    assert second.returncode == 2 and f"pid {first.pid} on" in second.stderr and "Traceback" not in second.stderr
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = shard_keys(out)
    assert_unique(pairs)
    assert len(pairs) == 8


def test_a_full_disk_is_one_line_and_the_rerun_completes(small_disk, tmp_path):
    """Issue #25: extraction on a full disk gave a 23-line traceback; now one line, the finished shards kept."""
    r = extract("--src", "synthetic", "--limit", 300, "--workers", 1, *SMALL, "--out", small_disk / "out")
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "no space left on" in lines[0] and "rerun the same command" in lines[0]
