"""The shard schema (docs/shards.md), version SCHEMA_VERSION: the contract between extract.py and the loader.

A shard is a WebDataset tar; a sample is one clip window of a video, keyed `<video key>_w<k>`:

    frames.jpg      the T sampled frames stacked vertically: one JPEG of [T*H, W, 3] (H, W multiples of 16)
    disp.npy.zst    int8  [T/2, H/g, W/g, L, 2]  per-step (dx, dy) px, camera removed, from each tubelet's
                    first frame, in a fixed-point code (decode_disp: 1/16 px to 3.75 px, 1/4 px to 20.5 px)
    hog.npy.zst     uint8 [T/2, H/g, W/g, L, 9]  trajectory-aligned HOG, 6-bit log code 0..63 (decode_hog)
    valid.npy.zst   bool  [T/2, H/g, W/g]        eq. 7: the track stayed in the frame (and in the video)
    cls             class index as text, "-1" when unknown
    json            metadata: source video, frame indices, fps, sizes, label name, extractor params, schema

The .npy.zst members are .npy files compressed with Zstandard (a frame each). Version 1 shards (float16
disp.npy, 8-bit hog.npy, plain .npy members) are still read (READABLE); anything else is refused.

    sample = encode(key, frames, traj, label, meta)   # -> dict for webdataset.TarWriter
    clip = decode(sample)                             # -> dict of numpy arrays (the reference decoder)

ShardWriter writes shards atomically (a tar appears under its final name only once complete) and
keeps a journal so an interrupted extraction resumes without duplicates; manifests summarise a run.
"""
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import zstandard

SCHEMA_VERSION = 2
READABLE = (1, 2)     # versions the loader reads: 1 as extracted before, without re-extraction
JPEG_QUALITY = 90
ZSTD_LEVEL = 9        # compression level of the .npy.zst members (decoding speed is the same at any level)

# HOG (eq. 5): mean Sobel magnitude per bin, intensity/px, log-companded (mu-law) into HOG_CODES + 1 levels
# from 0 to HOG_MAX (larger values clip), ~linear below the knee, ~logarithmic above it. Under patch norm
# the target's shape part moves by 0.07 of its std rms (v1's 8-bit code: 0.01), docs/shards.md.
HOG_MAX = 0.25
HOG_KNEE = {1: 1e-3, 2: 1e-2}
HOG_CODES = {1: 255, 2: 63}


def _hog_table(version):
    top, knee = HOG_CODES[version], HOG_KNEE[version]
    codes = np.minimum(np.arange(256), top)            # bytes past the top code (a damaged file) read as HOG_MAX
    return (knee * np.expm1(codes * (np.log1p(HOG_MAX / knee) / top))).astype(np.float32)


HOG_TABLES = {v: _hog_table(v) for v in READABLE}
HOG_TABLE = HOG_TABLES[SCHEMA_VERSION]                 # the table of what encode_hog writes


def encode_hog(hog, version=SCHEMA_VERSION):
    """float HOG -> uint8 codes 0..HOG_CODES[version]."""
    top, knee = HOG_CODES[version], HOG_KNEE[version]
    q = np.log1p(np.clip(hog, 0, HOG_MAX) / knee) * (top / np.log1p(HOG_MAX / knee))
    return np.round(q).astype(np.uint8)


def decode_hog(q, version=SCHEMA_VERSION):
    """uint8 codes -> float32 HOG, by table (8x faster than expm1 per element)."""
    return HOG_TABLES[version][q]


# Displacements (version 2): int8 fixed point, 1/16 px steps up to DISP_KNEE codes (3.75 px), then 1/4 px
# steps up to code 127 (20.5 px), which covers every displacement the tracker makes (mme.flow.MAX_FLOW, 20 px):
# nothing saturates. Error added: at most 1/32 px per coordinate below 3.75 px, 1/8 px above.
DISP_FINE, DISP_COARSE, DISP_KNEE = 16, 4, 60


def encode_disp(disp):
    """float px -> int8 codes (see DISP_FINE); values past 20.5 px (none from mme.trajectory) saturate."""
    a = np.abs(np.asarray(disp, np.float32))
    knee = DISP_KNEE / DISP_FINE
    q = np.where(a <= knee, np.round(a * DISP_FINE), DISP_KNEE + np.round((a - knee) * DISP_COARSE))
    return (np.sign(disp) * np.minimum(q, 127)).astype(np.int8)


def _disp_table():
    q = np.arange(256).astype(np.uint8).view(np.int8).astype(np.float64)    # table index: the code's byte
    a = np.abs(q)
    v = np.where(a <= DISP_KNEE, a / DISP_FINE, DISP_KNEE / DISP_FINE + (a - DISP_KNEE) / DISP_COARSE)
    return (np.sign(q) * v).astype(np.float32)


DISP_TABLE = _disp_table()                             # indexed by the code's byte (uint8 view of the int8)


def decode_disp(q):
    """int8 codes (or their uint8 view) -> float32 px, by table."""
    return DISP_TABLE[np.asarray(q).view(np.uint8)]


def tables(version):
    """(disp table, HOG table) a loader looks the stored codes up in: disp None where it is stored as
    float16 (version 1)."""
    return (DISP_TABLE if version >= 2 else None), HOG_TABLES[version]


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b):
    return np.load(io.BytesIO(b), allow_pickle=False)


def zst(b):
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b)


def unzst(b, limit):
    """Decompress one zstd frame of at most `limit` bytes (a damaged or hostile member cannot blow up memory)."""
    size = zstandard.frame_content_size(b)
    if size > limit:
        raise ValueError(f"says it holds {size} bytes, more than the schema's {limit}")
    return _DECOMPRESSOR.decompress(b, max_output_size=limit)


_DECOMPRESSOR = zstandard.ZstdDecompressor()


TRACKS = {1: ("disp.npy", "hog.npy", "valid.npy"), 2: ("disp.npy.zst", "hog.npy.zst", "valid.npy.zst")}


def encode(key, frames, disp, hog, valid, label, meta, quality=JPEG_QUALITY):
    """One sample (of meta["schema"], SCHEMA_VERSION unless a test writes version 1). frames uint8
    [T, H, W, 3] RGB; disp/hog/valid as trajectories() returns them for the T/2 tubelet starts (float)."""
    T, H, W, _ = frames.shape
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(frames.reshape(T * H, W, 3), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok, "JPEG encoding failed"
    if meta.get("schema", SCHEMA_VERSION) == 1:
        arrays = (disp.astype(np.float16), encode_hog(hog, 1), valid.astype(bool))
        tracks = dict(zip(TRACKS[1], map(npy_bytes, arrays)))
    else:
        arrays = (encode_disp(disp), encode_hog(hog), valid.astype(bool))
        tracks = {name: zst(npy_bytes(a)) for name, a in zip(TRACKS[2], arrays)}
    return {"__key__": key, "frames.jpg": jpg.tobytes(), **tracks,
            "cls": str(int(label)).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


COMPONENTS = ("frames.jpg", *TRACKS[SCHEMA_VERSION], "cls", "json")


def components(version):
    return ("frames.jpg", *TRACKS[version], "cls", "json")


def refusal(version):
    """The one line for shards of a version this code does not read."""
    return f"shard schema {version!r}, this code reads {' and '.join(map(str, READABLE))}: re-extract with extract.py"


def decode(sample):
    """Reference decoder of one raw sample (dict of bytes, as a tar yields it) into numpy arrays:
    frames uint8 [T, H, W, 3] RGB, disp float32, hog float32, valid bool, label int, meta dict."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    version = meta.get("schema")
    missing = [c for c in components(version if version in READABLE else SCHEMA_VERSION) if c not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')}: missing {', '.join(missing)}")
    if version not in READABLE:
        raise ValueError(f"sample {sample.get('__key__')}: {refusal(version)}")
    disp, hog, valid = (npy_load(unzst(sample[n], 1 << 30) if n.endswith(".zst") else sample[n]) for n in TRACKS[version])
    disp_table, hog_table = tables(version)
    tile = cv2.imdecode(np.frombuffer(sample["frames.jpg"], np.uint8), cv2.IMREAD_COLOR)
    T = meta["num_frames"]
    frames = cv2.cvtColor(tile, cv2.COLOR_BGR2RGB).reshape(T, tile.shape[0] // T, tile.shape[1], 3)
    return {
        "key": sample["__key__"], "frames": frames,
        "disp": disp.astype(np.float32) if disp_table is None else decode_disp(disp),
        "hog": hog_table[hog], "valid": valid,
        "label": int(sample["cls"]), "meta": meta,
    }


def parse(sample, tracks=True):
    """Check one raw sample against the schema (a version in READABLE) and parse what the loader reads:
    (meta, label, disp, hog, valid), the arrays as stored, their codes looked up in tables(meta["schema"])
    (version 2: disp uint8, the bytes of the int8 codes; hog uint8 codes; valid bool. Version 1: disp
    float16, hog uint8 codes; None unless `tracks`). The JPEG is left to the decoder. Raises ValueError
    naming the component and what is wrong: one bad sample in a million is skipped by the loader with
    that line, not a crash."""
    for c in ("json", "frames.jpg", "cls"):
        if c not in sample:
            raise ValueError(f"missing {c}")
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError(f"a {type(meta).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"json: not a JSON object ({' '.join(str(e).split())})") from None
    version = meta.get("schema")
    if version not in READABLE:
        raise ValueError(f"json: {refusal(version)}")
    missing = [c for c in TRACKS[version] if c not in sample] if tracks else []
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    p, size, T = meta.get("params"), meta.get("size"), meta.get("num_frames")
    if not (_whole(T) and T > 0 and T % 2 == 0 and isinstance(p, dict) and all(_whole(p.get(k)) and p[k] > 0 for k in
            ("grid", "length", "stride")) and isinstance(size, list) and len(size) == 2
            and all(_whole(x) and x > 0 and x % 16 == 0 and x % p["grid"] == 0 for x in size)):
        raise ValueError("json: num_frames (even), size [W, H] (multiples of 16 and of the grid) and params "
                         "grid, length, stride (positive) are required")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"cls: {bytes(sample['cls'][:20])!r} is not a class index") from None
    if label < -1:
        raise ValueError(f"cls: {label} is not a class index (-1 = unknown)")
    if not tracks:
        return meta, label, None, None, None
    (w, h), g, L = size, p["grid"], p["length"]
    grid = (T // 2, h // g, w // g)
    dtypes = (np.float16, np.uint8, np.bool_) if version == 1 else (np.int8, np.uint8, np.bool_)
    disp, hog, valid = [_array(sample, name, dtype, grid + tail) for name, dtype, tail in
                        zip(TRACKS[version], dtypes, ((L, 2), (L, 9), ()))]
    return meta, label, (disp.view(np.uint8) if version > 1 else disp), hog, valid


def _whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _array(sample, name, dtype, shape):
    try:
        b = sample[name]
        if name.endswith(".zst"):                        # the .npy inside: 128-byte header + the array
            b = unzst(b, 4096 + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        a = npy_load(b)
    except Exception as e:                               # garbage, a pickle (object dtype), a cut file
        raise ValueError(f"{name}: not a NumPy array file ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if a.dtype != dtype or a.shape != shape:
        raise ValueError(f"{name}: {a.dtype} {list(a.shape)}, the schema says {np.dtype(dtype)} {list(shape)}")
    return a


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
            self.count, self.videos, self.classes = 0, [], Counter()
        for s in samples:
            write_sample(self.tar, s)
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
        entry = {"shard": self.name, "videos": self.videos, "samples": self.count, "classes": dict(self.classes)}
        self._append(entry)
        self.entries.append(entry)
        self.tar, self.seq = None, self.seq + 1


def shard_entry(path):
    """A journal entry rebuilt from a finished shard itself: its videos, samples and classes."""
    videos, classes = set(), Counter()
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                videos.add(meta["video_key"])
                classes[meta["label_name"]] += 1
    return {"shard": Path(path).name, "videos": sorted(videos), "samples": sum(classes.values()), "classes": dict(classes)}


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
    classes = Counter()
    for e in shards:
        classes.update(e.get("classes", {}))
    return {
        "schema": SCHEMA_VERSION, "params": params, "part": part,
        "splits": {split: {
            "videos": sum(len(e["videos"]) for e in shards),
            "samples": sum(e["samples"] for e in shards),
            "classes": dict(sorted(classes.items())),
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
            d = merged["splits"].setdefault(split, {"videos": 0, "samples": 0, "classes": {}, "shards": {}})
            d["videos"] += s["videos"]
            d["samples"] += s["samples"]
            for c, n in s["classes"].items():
                d["classes"][c] = d["classes"].get(c, 0) + n
            d["shards"].update(s["shards"])
    for d in merged["splits"].values():
        merged["videos"] += d["videos"]
        merged["samples"] += d["samples"]
        d["classes"] = dict(sorted(d["classes"].items()))
        d["shards"] = dict(sorted(d["shards"].items()))
    write_json(out / "manifest.json", merged)
    return merged
