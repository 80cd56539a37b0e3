"""Shards on disk: ShardWriter writes them atomically (a tar appears under its final name only once
complete) and keeps a journal so an interrupted extraction resumes without duplicates; manifests say
what a folder holds (docs/shards.md). The samples themselves are mme.shards.encode's.

    with ShardWriter(out, "train-000") as w: w.write(sample, video_key)   # w.done(): videos already written
    write_json(out / "manifest-train-000.json", part_manifest(entries, split, params, part, total))
    merge_manifests(out)                                                   # -> out/manifest.json
"""
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

from mme.shards import SCHEMA_VERSION


def write_sample(tar, sample):
    """Add one sample's components to an open tarfile as `<key>.<component>` members (WebDataset's
    convention), with fixed metadata so identical samples give identical bytes."""
    for name, data in sample.items():
        if name.startswith("__"):
            continue
        info = tarfile.TarInfo(f"{sample['__key__']}.{name}")
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes `{prefix}-{seq:06d}.tar` shards into `out`, rotating between videos after `max_samples`.

    A shard is written as `.tmp` and renamed when complete; then a journal line records which videos
    it holds. `done()` tells a resumed run which videos are already in finished shards.
    """

    def __init__(self, out, prefix, max_samples=256):
        self.out, self.prefix, self.max_samples = Path(out), prefix, max_samples
        self.journal = self.out / ".extract" / f"{prefix}.jsonl"
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        for tmp in self.out.glob(f"{prefix}-*.tar.tmp"):        # a killed run's unfinished shard
            tmp.unlink()
        self.entries = self._recover()
        self.seq = 1 + max((int(e["shard"][len(prefix) + 1:-4]) for e in self.entries if "shard" in e), default=-1)
        self.tar = None

    def _recover(self):
        entries = []
        if self.journal.exists():
            for line in self.journal.read_text().splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:                     # a line torn by a crash mid-write: that
                    pass                                         # shard is re-read below, a skip redone
        known = {e["shard"] for e in entries if "shard" in e}
        for path in sorted(self.out.glob(f"{self.prefix}-*.tar")):
            if path.name not in known:                          # renamed, but killed before the journal line
                entry = shard_entry(path)
                self._append(entry)
                entries.append(entry)
        return entries

    def _append(self, entry):
        with open(self.journal, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def done(self):
        """Video keys already handled: in a finished shard, or skipped for a reason that lasts (a skip
        marked retry, such as a worker killed for memory, is tried again by the next run)."""
        return {v for e in self.entries for v in e.get("videos", [])} | \
            {e["skipped"] for e in self.entries if "skipped" in e and not e.get("retry")}

    def write_video(self, video_key, samples, label_name):
        """Write all samples of one video (never split across shards)."""
        if self.tar is not None and self.count + len(samples) > self.max_samples and self.count > 0:
            self.close()
        if self.tar is None:
            self.name = f"{self.prefix}-{self.seq:06d}.tar"
            self.tar = tarfile.open(self.out / (self.name + ".tmp"), "w")
            self.count, self.videos, self.classes, self.labels = 0, [], Counter(), {}
        for s in samples:
            write_sample(self.tar, s)
            self.labels[label_name] = int(s["cls"])
        self.count += len(samples)
        self.videos.append(video_key)
        self.classes[label_name] += len(samples)

    def skip(self, video_key, path, reason, retry=False):
        entry = {"skipped": video_key, "video": str(path), "reason": reason} | ({"retry": True} if retry else {})
        self._append(entry)
        self.entries.append(entry)

    def warn(self, video_key, path, reason):
        entry = {"warning": video_key, "video": str(path), "reason": reason}
        self._append(entry)
        self.entries.append(entry)

    def close(self):
        if self.tar is None:
            return
        self.tar.close()
        with open(self.out / (self.name + ".tmp"), "rb") as f:
            os.fsync(f.fileno())                                # on disk before its name says it is finished
        os.replace(self.out / (self.name + ".tmp"), self.out / self.name)
        entry = {"shard": self.name, "videos": self.videos, "samples": self.count, "classes": dict(self.classes),
                 "labels": dict(self.labels)}
        self._append(entry)
        self.entries.append(entry)
        self.tar, self.seq = None, self.seq + 1


def shard_entry(path):
    """A journal entry rebuilt from a finished shard itself: its videos, samples, classes and their labels."""
    videos, classes, names, labels = set(), Counter(), {}, {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, member = m.name.partition(".")
            if member == "json":
                meta = json.loads(tar.extractfile(m).read())
                videos.add(meta["video_key"])
                classes[meta["label_name"]] += 1
                names[key] = meta["label_name"]
            elif member == "cls":
                labels[key] = int(tar.extractfile(m).read())
    return {"shard": Path(path).name, "videos": sorted(videos), "samples": sum(classes.values()), "classes": dict(classes),
            "labels": {names[k]: v for k, v in labels.items() if k in names}}


def write_json(path, obj):
    """Write JSON atomically (a unique temporary name, then rename): parts finishing together never
    see each other's half-written files."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def part_manifest(entries, split, params, part, total_videos):
    """Summary of one part's journal entries."""
    shards = [e for e in entries if "shard" in e]
    stored = {v for e in shards for v in e["videos"]}
    classes, labels = Counter(), {}
    for e in shards:
        classes.update(e.get("classes", {}))
        labels.update(e.get("labels", {}))
    return {
        "schema": SCHEMA_VERSION, "params": params, "part": part,
        "splits": {split: {
            "videos": sum(len(e["videos"]) for e in shards),
            "samples": sum(e["samples"] for e in shards),
            "classes": dict(sorted(classes.items())),
            "labels": dict(sorted(labels.items())),                # class name -> the label index its samples hold
            "shards": {e["shard"]: e["samples"] for e in shards},
            "listed": total_videos,
        }},
        # dict.fromkeys: a resumed run may have noted the same thing twice; a retried skip that worked is gone
        "skipped": [dict(video=v, reason=r) for v, r in dict.fromkeys(
            (e["video"], e["reason"]) for e in entries if "skipped" in e and e["skipped"] not in stored)],
        "warnings": [dict(video=v, reason=r) for v, r in dict.fromkeys((e["video"], e["reason"]) for e in entries if "warning" in e)],
    }


def merge_manifests(out):
    """Merge every `manifest-*.json` part manifest in `out` into `out/manifest.json` (atomically)."""
    out = Path(out)
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("manifest-*.json"))]
    merged = {"schema": SCHEMA_VERSION, "videos": 0, "samples": 0, "splits": {}, "skipped": [], "warnings": [],
              "params": parts[0]["params"] if parts else {}, "parts": []}
    for m in parts:
        merged["parts"].append(m["part"])
        merged["skipped"] += m["skipped"]
        merged["warnings"] += m["warnings"]
        for split, s in m["splits"].items():
            d = merged["splits"].setdefault(split, {"videos": 0, "samples": 0, "classes": {}, "labels": {}, "shards": {}})
            d["videos"] += s["videos"]
            d["samples"] += s["samples"]
            for c, n in s["classes"].items():
                d["classes"][c] = d["classes"].get(c, 0) + n
            d["labels"].update(s.get("labels", {}))
            d["shards"].update(s["shards"])
    for d in merged["splits"].values():
        merged["videos"] += d["videos"]
        merged["samples"] += d["samples"]
        d["classes"] = dict(sorted(d["classes"].items()))
        d["labels"] = dict(sorted(d["labels"].items()))
        d["shards"] = dict(sorted(d["shards"].items()))
    write_json(out / "manifest.json", merged)
    return merged
