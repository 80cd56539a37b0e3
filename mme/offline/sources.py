"""Video dataset sources: standard on-disk layouts and label files -> a deterministic list of videos.

This module owns *finding* videos and their labels; it never opens a video file. `list_videos`
returns (videos sorted by key, problems): each Video has an absolute path, a key that is unique
and safe as a WebDataset key, a class index and name, and its split. Problems are entries that
could not be used (a labelled video missing on disk, a file with no label), so a long extraction
run reports them instead of dying on the first one. Class indices are the sorted class names
(identical across splits), except SSv2 (labels.json) and UCF101 (classInd.txt), which ship one.

Accepted layouts (ROOT = --root; "a | b" = the first one that exists):
  k400    csv: ROOT/annotations/X.csv | ROOT/X.csv, X = train, val|validate, test; header
          label,youtube_id,time_start,time_end[,split,is_cc] (no label column -> label -1).
          clips: ROOT[/videos]/{train,val|validate,test}/[any folders/]<youtube_id>_<start:06d>_<end:06d>
          .mp4|.mkv|.webm. Clips are found by name, so class folders may be named anyhow ("air
          drumming", "air_drumming"); files in the split folder that no csv row names are problems.
  ssv2    ROOT/labels/ | ROOT/ holding labels.json, train.json, validation.json (= val), test.json;
          videos ROOT/20bn-something-something-v2/<id>.* | ROOT/videos/<id>.* | ROOT/<id>.*.
          class = template without "[" "]", looked up in labels.json (case/space-insensitive).
  ucf101  ROOT/ucfTrainTestlist/ | ROOT/ holding classInd.txt, trainlist0F.txt, testlist0F.txt
          (val = test); videos ROOT/UCF-101/ | ROOT/UCF101/ | ROOT/videos/ | ROOT/ + <Class>/<file>.
  hmdb51  ROOT/testTrainMulti_7030_splits/ | ROOT/splits/ | ROOT/ holding <class>_test_splitF.txt
          ("<file> <id>": 1 train, 2 test = val, 0 unused); videos ROOT/hmdb51_org/ | ROOT/videos/
          | ROOT/ + <class>/<file>.
  folder  every VIDEO_EXTS file under ROOT; class = parent folder name ("" and -1 directly in ROOT);
          split recorded as given; key = path relative to ROOT without suffix, "/" -> "__". Such names
          that are no file (dangling symlink, symlink loop, FIFO) are problems.
UCF101 and HMDB51 videos are also found without their class folder (flattened copies). Hidden
files (e.g. macOS "._clip.mp4" resource forks) are never videos.
"""
import csv
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

SOURCES = ("k400", "ssv2", "ucf101", "hmdb51", "folder", "synthetic")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Video:
    path: str        # absolute path of the video file
    key: str         # unique id within the dataset, only [A-Za-z0-9_-]; stable across runs
    label: int       # class index, -1 when unknown
    label_name: str  # class name, "" when unknown
    split: str       # "train" | "val" | "test"


class SourceError(Exception):
    """One-line, user-facing reason (names the path looked at and what was expected)."""


def list_videos(src: str, root: str, split: str = "train", fold: int = 1) -> tuple[list[Video], list[dict]]:
    """Return (videos sorted by key, problems); problems are {"video": path_or_id, "reason": text}."""
    root = _root(src, root, fold)
    if split not in SPLITS:
        raise SourceError(f"{src}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if src == "k400":
        videos, problems, dirs = _k400(root, split)
    elif src == "ssv2":
        videos, problems, dirs = _ssv2(root, split)
    elif src == "ucf101":
        videos, problems, dirs = _ucf(root, split, fold)
    elif src == "hmdb51":
        videos, problems, dirs = _hmdb(root, split, fold)
    else:
        videos, problems, dirs = _folder(root, split), _unreadable(root), [root]
    if not videos:
        raise SourceError(f"{src}: no {split} videos found; searched {' and '.join(map(str, dirs))}")
    videos = sorted(_unique(videos, root, problems), key=lambda v: v.key)
    assert len({v.key for v in videos}) == len(videos), f"{src}: duplicate video keys"
    return videos, problems


def class_names(src: str, root: str, fold: int = 1) -> list[str]:
    """The class list of the dataset: index in this list = Video.label."""
    root = _root(src, root, fold)
    if src == "k400":
        return _k400_classes(root)
    if src == "ssv2":
        return _ssv2_classes(root)
    if src == "ucf101":
        return _ucf_classes(root)
    if src == "hmdb51":
        return sorted(_hmdb_split_files(root, fold))
    return sorted({p.parent.name for p in _folder_files(root) if p.parent != root})


# --- shared helpers ---------------------------------------------------------------------------

def _root(src, root, fold):
    if src == "synthetic":
        raise ValueError("synthetic: clips are generated by mme.offline.synthetic, there is no dataset root to list")
    if src not in SOURCES:
        raise ValueError(f"unknown source {src!r}; expected one of {', '.join(SOURCES)}")
    path = Path(root).expanduser().absolute()   # absolute(), not resolve(): keep the user's symlinks
    if not path.is_dir():
        raise SourceError(f"{src}: dataset root {path} does not exist; pass --root DIR")
    if src in ("ucf101", "hmdb51") and fold not in (1, 2, 3):
        raise SourceError(f"{src}: unknown fold {fold!r}; expected 1, 2 or 3")
    return path


def _need(src, candidates, what):
    """The first existing file of candidates, else a SourceError naming all of them."""
    for path in candidates:
        if path.is_file():
            return path
    raise SourceError(f"{src}: {what} not found; looked for {' or '.join(map(str, candidates))}")


def _is_video(path, exts=VIDEO_EXTS):
    return path.suffix.lower() in exts and not path.name.startswith(".") and path.is_file()


def _index(dirs, exts=VIDEO_EXTS, recursive=False):
    """stem -> path of the videos in dirs. First dir, then first sorted path wins: deterministic."""
    found = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.rglob("*") if recursive else d.iterdir()):
                if _is_video(p, exts):
                    found.setdefault(p.stem, p)
    return found


def _first_file(dirs, rel):
    """dir/rel, or dir/<file name> for flattened copies, in the first dir that has it."""
    for d in dirs:
        for path in (d / rel, d / PurePosixPath(rel).name):
            if path.is_file():
                return path
    return None


def _problem(video, reason):
    return {"video": str(video), "reason": reason}


def _missing(vid, dirs):
    where = " or ".join(str(d) for d in dirs if d.is_dir()) or " or ".join(map(str, dirs))
    return _problem(vid, f"missing: no video file for {vid} under {where}")


def _sanitize(s):
    return re.sub(r"[^A-Za-z0-9_-]", "_", s)


def _lines(path):
    # strip() also eats the \r of the CRLF list files UCF101 ships
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _unique(videos, root, problems):
    """Make keys unique. The same file named twice is a duplicate entry (reported, first kept);
    different files whose names sanitize to the same key all get a short hash of their path
    relative to ROOT, which does not depend on what else is listed, so keys stay stable."""
    groups = {}
    for v in videos:
        groups.setdefault(v.key, {}).setdefault(v.path, []).append(v)
    out = []
    for key, by_path in groups.items():
        for path, same in by_path.items():
            problems += [_problem(path, f"duplicate: listed more than once as {key}") for _ in same[1:]]
            if len(by_path) == 1:
                out.append(same[0])
            else:
                digest = hashlib.sha1(Path(os.path.relpath(path, root)).as_posix().encode()).hexdigest()[:8]
                out.append(replace(same[0], key=f"{key}_{digest}"))
    return out


# --- Kinetics-400 -----------------------------------------------------------------------------

_K400_CSV = {"train": ("train.csv",), "val": ("val.csv", "validate.csv"), "test": ("test.csv",)}
_K400_DIRS = {"train": ("train",), "val": ("val", "validate"), "test": ("test",)}


def _k400_csvs(root, split):
    return [d / name for d in (root / "annotations", root) for name in _K400_CSV[split]]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        # stripped because some copies write "label, youtube_id, ..."; k is None for surplus cells
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]


def _k400_classes(root):
    candidates = [p for s in SPLITS for p in _k400_csvs(root, s)]
    files = [p for p in candidates if p.is_file()]
    if not files:
        raise SourceError(f"k400: annotation csv not found; looked for {' or '.join(map(str, candidates))}")
    # the union over all csvs, so the index does not depend on which split was asked for
    return sorted({row.get("label", "") for p in files for row in _read_csv(p)} - {""})


def _k400(root, split):
    csv_path = _need("k400", _k400_csvs(root, split), f"{split} annotation csv")
    rows = _read_csv(csv_path)
    if rows and not {"youtube_id", "time_start", "time_end"} <= rows[0].keys():
        raise SourceError(f"k400: {csv_path} lacks the columns youtube_id,time_start,time_end")
    index = {name: i for i, name in enumerate(_k400_classes(root))}
    dirs = [base / d for base in (root, root / "videos") for d in _K400_DIRS[split]]
    found = _index(dirs, (".mp4", ".mkv", ".webm"), recursive=True)
    videos, problems, used = [], [], set()
    for row in rows:
        try:   # times are integers, but some csvs write them as floats ("10.0")
            key = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except ValueError:
            problems.append(_problem(row["youtube_id"], f"bad row in {csv_path}: {row}"))
            continue
        if key not in found:
            problems.append(_missing(key, dirs))
            continue
        used.add(found[key])
        name = row.get("label", "")
        videos.append(Video(str(found[key]), _sanitize(key), index.get(name, -1), name, split))
    problems += [_problem(p, f"unlabelled: not listed in {csv_path}") for p in sorted(set(found.values()) - used)]
    return videos, problems, dirs


# --- Something-Something V2 -------------------------------------------------------------------

def _ssv2_json(root, name):
    with open(_need("ssv2", [root / "labels" / name, root / name], name), encoding="utf-8") as f:
        return json.load(f)


def _ssv2_classes(root):
    mapping = _ssv2_json(root, "labels.json")   # {"Approaching something with your camera": "0", ...}
    names = sorted(mapping, key=lambda n: int(mapping[n]))
    if [int(mapping[n]) for n in names] != list(range(len(names))):
        raise SourceError("ssv2: labels.json indices are not 0..N-1")
    return names


def _ssv2(root, split):
    entries = _ssv2_json(root, {"train": "train.json", "val": "validation.json", "test": "test.json"}[split])
    norm = lambda text: " ".join(text.replace("[", "").replace("]", "").lower().split())
    # test.json has no templates: labels.json is only needed when there is something to look up
    labelled = any("template" in e for e in entries)
    index = {norm(n): (i, n) for i, n in enumerate(_ssv2_classes(root))} if labelled else {}
    dirs = [root / "20bn-something-something-v2", root / "videos", root]
    found = _index(dirs)
    videos, problems = [], []
    for e in entries:
        vid = str(e["id"])
        label, name = index.get(norm(e["template"]), (None, "")) if "template" in e else (-1, "")
        if vid not in found:
            problems.append(_missing(vid, dirs))
        elif label is None:
            problems.append(_problem(vid, f"unknown class: template {e['template']!r} not in labels.json"))
        else:
            videos.append(Video(str(found[vid]), _sanitize(vid), label, name, split))
    return videos, problems, dirs


# --- UCF101 -----------------------------------------------------------------------------------

def _ucf_file(root, name):
    return _need("ucf101", [root / "ucfTrainTestlist" / name, root / name], name)


def _ucf_classes(root):
    lines = _lines(_ucf_file(root, "classInd.txt"))   # "1 ApplyEyeMakeup"
    pairs = sorted((int(n), name) for n, name in (line.split(maxsplit=1) for line in lines))
    if [n for n, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise SourceError("ucf101: classInd.txt indices are not 1..N")
    return [name for _, name in pairs]   # 1-based in the file; our label = n - 1


def _ucf(root, split, fold):
    listfile = _ucf_file(root, f"{'train' if split == 'train' else 'test'}list0{fold}.txt")
    index = {name: i for i, name in enumerate(_ucf_classes(root))}
    dirs = [root / "UCF-101", root / "UCF101", root / "videos", root]
    videos, problems = [], []
    for line in _lines(listfile):
        rel = PurePosixPath(line.split()[0].replace("\\", "/"))
        name = rel.parent.name   # testlist has no label column: the label comes from the class folder
        path = _first_file(dirs, str(rel))
        if name not in index:
            problems.append(_problem(rel, f"unknown class: {name!r} not in classInd.txt"))
        elif path is None:
            problems.append(_missing(rel, dirs))
        else:
            videos.append(Video(str(path), _sanitize(rel.stem), index[name], name, split))
    return videos, problems, dirs


# --- HMDB51 -----------------------------------------------------------------------------------

def _hmdb_split_files(root, fold):
    suffix = f"_test_split{fold}.txt"
    dirs = [root / "testTrainMulti_7030_splits", root / "splits", root]
    for d in dirs:
        files = sorted(d.glob(f"*{suffix}")) if d.is_dir() else []
        if files:
            return {f.name[: -len(suffix)]: f for f in files}   # class -> split file
    raise SourceError(f"hmdb51: split files <class>{suffix} not found in {' or '.join(map(str, dirs))}")


def _hmdb(root, split, fold):
    files = _hmdb_split_files(root, fold)
    want = "1" if split == "train" else "2"   # 0 = not used by this fold
    dirs = [root / "hmdb51_org", root / "videos", root]
    videos, problems = [], []
    for label, name in enumerate(sorted(files)):
        for parts in (line.rsplit(maxsplit=1) for line in _lines(files[name])):
            if len(parts) != 2 or parts[1] != want:
                continue
            path = _first_file(dirs, f"{name}/{parts[0]}")
            if path is None:
                problems.append(_missing(parts[0], dirs))
            else:
                videos.append(Video(str(path), _sanitize(Path(parts[0]).stem), label, name, split))
    return videos, problems, dirs


# --- any folder of videos ---------------------------------------------------------------------

def _folder_files(root):
    return [p for p in sorted(root.rglob("*")) if _is_video(p)]


def _unreadable(root):
    """Problems for the video-named paths under root that are no file to read (skipped otherwise unseen)."""
    problems = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTS and not p.name.startswith(".") and not p.is_file() and not p.is_dir():
            try:
                p.stat()
                why = "not a regular file (a FIFO, socket or device)"
            except OSError as e:
                why = "symlink loop" if e.errno == errno.ELOOP else "dangling symlink" if p.is_symlink() else e.strerror
            problems.append(_problem(p, f"cannot read: {why}"))
    return problems


def _folder(root, split):
    files = _folder_files(root)
    index = {name: i for i, name in enumerate(sorted({p.parent.name for p in files if p.parent != root}))}
    videos = []
    for p in files:
        # the relative path, not the stem: "cat/001.mp4" and "dog/001.mp4" must not collide
        key = _sanitize("__".join(p.relative_to(root).with_suffix("").parts))
        name = p.parent.name if p.parent != root else ""
        videos.append(Video(str(p), key, index.get(name, -1), name, split))
    return videos
