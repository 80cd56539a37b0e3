"""The loader: shards -> augmented clips, masks and reconstruction targets, batched per rank.

    loader = build_loader(urls, recipe, train=True)      # urls: paths, globs, brace patterns, s3:// URLs
    for b in loader:
        b["video"]    # float [B, 3, T, S, S], ImageNet-normalised (channels_last_3d in memory)
        b["mask"]     # bool  [B, N], True = masked (hidden from the encoder); N = T/2 * (S/16)^2
        b["target"]   # float [B, N, D]: recipe["target"] (mme | pixel | hog), layout in mme/online/targets.py
        b["weight"]   # float [B, N]: 0 for tokens whose trajectories left the frame (eq. 7)
                      # (no mask, target, weight for target "none": fine-tuning reads labels only)
        b["label"]    # long  [B], -1 where the shards carry no label
        b["key"]      # list of B sample keys ("<video key>_w<window>"), to gather a video's views
        b["pad"]      # bool  [B]: True for the copies that even out evaluation epochs (never in training)
        b["box"], b["flip"]   # the augmentation drawn for each clip (for pictures and tests)
    state = loader.state_dict(); loader.load_state_dict(state)   # resume mid-epoch, same next batch
    names = class_names(shard_urls("shards/x/", "val"), range(10))   # {label: name}, from the samples' json

Training draws a MultiScaleCrop and flip per clip (recipe["repeated_aug"] clips per sample, with
RandAugment if recipe["rand_aug"]); evaluation (train=False) gives every sample once, in
recipe["test_num_crop"] crops along the long side, with equal batch counts on every rank.

Per sample, DataLoader worker processes read the stream (mme.online.stream: rank/worker split, equal
epochs, bad input skipped) and draw the augmentation: a MultiScaleCrop box and a flip (seeded by
seed, epoch, rank and sample). It is applied to the frames and to the trajectory maps alike by one
of two backends, which tests hold equal:
  - "dali" (the default with a GPU and DALI installed, requirements-gpu.txt; imported only by this backend):
    the main process feeds each batch to a DALI pipeline, "mixed"
    nvJPEG decoding and GPU resize; the same operators run on CPU when asked for there.
  - "torch" (the default without a GPU): each worker decodes (OpenCV) and applies mme.online.transforms,
    the pure-PyTorch reference. On CPU it is the faster of the two: DALI's CPU resize costs ~5x
    torch's uint8 kernel (docs/benchmarks.md), and the work spreads over the workers.
Frames leave either backend as uint8; normalisation, targets and masks are computed in torch on the
batch's device (on a GPU the float video never crosses the PCIe bus).
"""
import functools
import json
import logging
import os

import cv2
import numpy as np
import torch

from mme import shards
from mme.online import augment, dali, s3, stream, targets, transforms

SHUFFLE = 32                        # samples shuffled in each worker's buffer (~40 MB); shards are shuffled at extraction
log = logging.getLogger(__name__)
GRID = 8                            # px between trajectories, in the shards and at the output: K = 4 per 16 x 16 patch


@functools.cache
def dali_installed():
    """Whether NVIDIA DALI can be imported. It is optional (requirements-gpu.txt): without it a GPU run
    decodes in the torch backend's workers, said once in the log."""
    import importlib.util
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:                    # no nvidia namespace at all
        found = False
    if not found and torch.cuda.is_available():
        log.warning("NVIDIA DALI is not installed: the loader decodes on CPU workers (pip install -r "
                    "requirements-gpu.txt for GPU decoding)")
    return found


def shard_urls(urls, split):
    """A folder holding manifest.json means its `split` shards; anything else goes to stream.expand."""
    if isinstance(urls, str) and (urls.endswith("/") or os.path.isdir(urls)) and stream.read_manifest(urls.rstrip("/")):
        return stream.split_urls(urls.rstrip("/"), split)
    return stream.expand(urls)


def check_labels(urls, split, num_classes):
    """Before any work: ValueError (one line) when the manifest of the shards folder `urls` says its `split` holds
    labels outside [0, num_classes), or holds no sample at all. Shards without a manifest (globs, URLs) are not
    checked here; manifests of extractions older than the "labels" field give the number of class names, a
    lower bound of the largest label + 1."""
    folder = urls.rstrip("/") if isinstance(urls, str) and (urls.endswith("/") or os.path.isdir(urls)) else None
    manifest = stream.read_manifest(folder) if folder else None
    if not manifest:
        return
    s = manifest.get("splits", {}).get(split)
    if not s or not s.get("samples"):
        raise ValueError(f"{folder}: its manifest lists no {split} sample")
    labels = s.get("labels") or {}
    top = max(labels.values(), default=len(s.get("classes", {})) - 1)
    named = max(labels, key=labels.get) if labels else f"{len(s.get('classes', {}))} classes"
    if top >= num_classes or min(labels.values(), default=0) < -1:
        raise ValueError(f"{folder}: its {split} split holds label {top} ({named}), outside num_classes {num_classes}: "
                         f"set --num_classes {top + 1} (or more)")


def class_names(urls, labels, limit=None):
    """{label: class name} for each of `labels` that the samples' metadata (label_name) of `urls` name,
    reading samples until every one is named (or `limit` samples are read)."""
    wanted, names, seen = {int(x) for x in labels}, {}, 0
    for url in urls:
        for sample in stream.read_shard(url, required=("json", "cls"), warn=False):
            seen += 1
            try:
                label, name = int(sample["cls"].decode().strip()), json.loads(sample["json"]).get("label_name", "")
            except (ValueError, UnicodeDecodeError, AttributeError):
                continue
            if label in wanted and name:
                names[label] = name
            if len(names) == len(wanted) or (limit and seen >= limit):
                return names
    return names


def check_recipe(meta, recipe, url):
    """Shards and recipe must agree on what a sample is; say so before anything starts."""
    p = meta["params"]
    wrong = [f"{name} {p[key]} in the shards, {recipe[rkey]} in the recipe" for name, key, rkey, bad in (
        ("frames", "frames", "num_frames", meta["num_frames"] != recipe["num_frames"]),
        ("stride", "stride", "sampling_rate", p["stride"] != recipe["sampling_rate"]),
        ("trajectory length", "length", "trajectory_length",
         recipe["target"] == "mme" and p["length"] < recipe["trajectory_length"])) if bad]
    if recipe["target"] == "mme" and not p.get("tracks", True):
        wrong.append("no trajectories in the shards (extracted for prediction, frames only)")
    if p["grid"] != GRID:
        wrong.append(f"grid {p['grid']} in the shards, the loader needs {GRID}")
    if wrong:
        raise ValueError(f"{url}: " + "; ".join(wrong) + ": re-extract, or change the recipe")


def tested_window(meta, segments):
    """Whether evaluation tests this sample under test_num_segment = segments: of a video's W stored
    windows (meta "window" of "windows", spread over the video by extract.py), `segments` evenly spread
    ones, the first and the last among them (VideoMAE's test clips); one segment: the middle window;
    None, or segments >= W: every window."""
    W, k = meta.get("windows", 1), meta.get("window", 0)
    if segments is None or segments >= W:
        return True
    picked = [(W - 1) // 2] if segments == 1 else np.round(np.linspace(0, W - 1, segments)).astype(int).tolist()
    return k in picked


def prepare(raw, rng, recipe, train, decode=False):
    """Worker side: parse one raw sample and draw its augmentation. Returns a list of items: in
    training recipe["repeated_aug"] differently augmented ones (Table 15's repeated sampling; 1 in
    pre-training), in evaluation one per crop (recipe["test_num_crop"]). Items are dicts of numpy
    arrays (the JPEG bytes undecoded) that the DALI backend finishes; with decode=True (the torch
    backend) the worker also applies the augmentation: video uint8 [T, S, S, 3] (RandAugment too, if
    the recipe asks) and the trajectories in output units. Trajectory arrays are read only for the
    mme target. None items (with a one-line warning naming shard, key and reason) for a sample that
    breaks the schema (mme.shards.parse) or the recipe, or whose frames do not decode. In evaluation, a
    window that recipe["test_num_segment"] does not test (tested_window) gives items marked pad."""
    name = f"{raw.get('__url__')} sample {raw['__key__']}"
    T, L = recipe["num_frames"], recipe["trajectory_length"]
    size, tracks = recipe["input_size"], recipe["target"] == "mme"
    try:
        meta, label, disp, hog, valid = shards.parse(raw, tracks)
        check_recipe(meta, recipe, name)
    except ValueError as e:
        log.warning("%s: %s; skipped", name, " ".join(str(e).removeprefix(f"{name}: ").split()))
        return [None] * (recipe["repeated_aug"] if train else recipe["test_num_crop"])
    w, h = meta["size"]
    if train:
        draws = [(transforms.crop_box(rng, h, w, size, recipe["crop_scales"]), bool(recipe["flip"] and rng.random() < 0.5))
                 for _ in range(recipe["repeated_aug"])]
    else:
        draws = [(box, False) for box in transforms.eval_boxes(h, w, recipe["test_num_crop"])]
    sample = {
        "jpg": np.frombuffer(raw["frames.jpg"], np.uint8),
        "shape": np.array([T, h, w, 3], np.int64),
        "label": np.array(label, np.int64),
        "key": raw["__key__"],
        # a window test_num_segment leaves out goes through as padding (ignored in the scores): dropping
        # it could empty a whole batch on some rank, and every rank must run the same batches
        "pad": np.array(not train and not tested_window(meta, recipe["test_num_segment"])),
        "name": name,
    }
    if tracks:
        sample.update(disp=disp[..., :L, :], hog=hog[..., :L, :], valid=valid, schema=meta["schema"])
    frames = decode_frames(sample) if decode else None
    if decode and frames is None:
        return [None] * len(draws)
    if train and recipe["shuffle_frames"]:              # Fig. 3: no temporal order left in the input
        frames = shuffle_frames(rng, frames, sample, tracks)
    items = []
    for box, flip in draws:
        item = dict(sample, box=np.array(box, np.int64), flip=np.array(flip))
        if decode:
            del item["jpg"]
            item["video"] = transforms.crop_frames(frames, box, size, flip)
            if train and recipe["rand_aug"]:
                ops, magnitude, std = recipe["rand_aug"]
                item["video"] = augment.rand_augment(item["video"], rng, int(ops), magnitude, std)
            if tracks:
                disp_table, hog_table = shards.tables(sample["schema"])
                item["disp"], item["hog"], item["valid"] = transforms.crop_tracks(
                    sample["disp"], sample["hog"], sample["valid"], box, size, GRID, flip, hog_table=hog_table,
                    disp_table=disp_table)
        items.append(item)
    return items


def shuffle_frames(rng, frames, sample, tracks):
    """Permute the T frames of a clip (uint8 [T, h, w, 3]) at random; tubelet j (frames 2j, 2j+1 after
    the shuffle) keeps the trajectory map that starts at its first frame's original tubelet, so the
    target still describes that frame's true motion while the input carries no temporal order. The
    trajectory arrays are permuted in `sample` itself (tracks: whether it holds them)."""
    perm = rng.permutation(len(frames))
    if tracks:
        first = perm[0::2] // 2                           # [T/2]: original tubelet of each new tubelet's first frame
        for k in ("disp", "hog", "valid"):
            sample[k] = sample[k][first]
    return frames[perm]


def decode_frames(item):
    """frames.jpg -> uint8 [T, h, w, 3] RGB, or None with a one-line warning naming the sample."""
    T, h, w, _ = item["shape"]
    tile = cv2.imdecode(item["jpg"], cv2.IMREAD_COLOR_RGB)
    if tile is None or tile.shape[:2] != (T * h, w):
        log.warning("%s: frames.jpg does not decode to %dx%d frames: skipped", item["name"], T, h)
        return None
    return tile.reshape(T, h, w, 3)


class _Samples(torch.utils.data.IterableDataset):
    """One rank's prepared samples; each DataLoader worker reads its own part of the stream."""

    def __init__(self, urls, recipe, train, rank, world_size, epoch_samples, num_workers, decode):
        """epoch_samples: samples per worker per epoch; training stops its endless stream there,
        evaluation pads its share of the data up to it (see __iter__)."""
        self.urls, self.recipe, self.train, self.decode = urls, recipe, train, decode
        self.rank, self.world_size, self.epoch_samples, self.num_workers = rank, world_size, epoch_samples, num_workers
        self.epoch, self.skip = 0, [0] * max(num_workers, 1)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        seed, start = self.recipe["seed"], self.skip[worker]
        raws = stream.samples(self.urls, rank=self.rank, world_size=self.world_size, worker=worker,
                              num_workers=max(self.num_workers, 1), seed=seed, epoch=self.epoch, resampled=self.train,
                              epoch_samples=self.epoch_samples if self.train else None,
                              shuffle_buffer=SHUFFLE if self.train else 0, start=start)
        n, last = start, None
        for n, raw in enumerate(raws, start + 1):
            # one generator per sample: a resumed stream draws the same crops as an uninterrupted one
            rng = np.random.default_rng([seed, self.epoch, self.rank, worker, n - 1])
            yield from prepare(raw, rng, self.recipe, self.train, self.decode)   # None: skipped, batch one smaller
            last = raw
        # Evaluation gives every sample once, so workers' shares differ by one (more with damaged
        # shards), and ranks with them: pad each share with copies marked pad, so that every rank
        # runs the same number of batches (collectives in the model would hang otherwise).
        if not self.train and n < self.epoch_samples:
            last = last or next(stream.samples(self.urls, resampled=False))
            for _ in range(n, self.epoch_samples):
                for item in prepare(last, None, self.recipe, False, self.decode):
                    if item is not None:
                        item["pad"] = np.array(True)
                    yield item


def _collate(items, recipe, decoded):
    """Worker side: a batch of prepared samples. A skipped sample (None) leaves its batch one smaller
    rather than shifting the stream, so every rank keeps the same batch count. The torch backend's
    samples are decoded: stack them (default_collate, which stacks straight into shared memory in a
    worker) and compute the targets here."""
    items = [it for it in items if it is not None]
    if not decoded or not items:
        return items                                    # DALI: frames differ in size until decoded
    keys = ("video", "label", "key", "pad", "box", "flip") + (("disp", "hog", "valid") if recipe["target"] == "mme" else ())
    batch = torch.utils.data.default_collate([{k: it[k] for k in keys} for it in items])
    tracks = [batch.pop(k, None) for k in ("disp", "hog", "valid")]
    if recipe["target"] != "none":
        batch["target"], batch["weight"] = make_target(recipe, batch["video"], *tracks)
    return batch


def make_target(recipe, clip, disp, hog, valid):
    """recipe["target"] of a batch: clip uint8 [B, T, S, S, 3], trajectories as Loader.decode gives them
    (None unless the target is mme) -> (target [B, N, D], weight [B, N])."""
    r = recipe
    if r["target"] == "mme":
        target, weight = targets.mme_target(disp, hog, valid, patch_norm=r["patch_norm"], shape=r["shape_target"],
                                            density=r["trajectory_density"],
                                            stride=None if r["interpolation"] else r["sampling_rate"])
    else:
        pixels = clip.movedim(-1, 1).float() / 255                           # [B, 3, T, S, S] in [0, 1]
        target = targets.pixel_target(pixels, r["patch_norm"] != "none") if r["target"] == "pixel" else targets.hog_target(pixels)
        weight = torch.ones(target.shape[:2], device=target.device)
    return target, weight


class Loader:
    """Iterable over batches of one epoch at a time (see the module docstring); `epoch` advances
    after each full pass. state_dict()/load_state_dict() capture (epoch, batches done)."""

    def __init__(self, urls, recipe, train=True, rank=0, world_size=1, backend=None, device=None):
        self.recipe, self.train = recipe, train
        self.urls = shard_urls(urls, "train" if train else "val")
        first = stream.check_schema(self.urls[0])
        check_recipe(first, recipe, self.urls[0])
        self.schema = first["schema"]                 # the DALI graph looks codes up in this version's tables
        self.batch = max(1, recipe["batch_size"] // (world_size * recipe.get("accum_steps", 1)))
        self.workers = recipe["num_workers"]
        self.per_sample = recipe["repeated_aug"] if train else recipe["test_num_crop"]   # items a sample gives
        if train and self.batch % self.per_sample:
            raise ValueError(f"batch per rank {self.batch} must divide by repeated_aug {self.per_sample}")
        parts = world_size * max(self.workers, 1)
        if train:
            self.epoch_samples = stream.epoch_length(self.urls, world_size, max(self.workers, 1), self.batch // self.per_sample)
        else:                                 # every sample once, each worker's share padded to the largest
            self.epoch_samples = -(-sum(stream.shard_sizes(self.urls).values()) // parts)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # RandAugment and frame shuffling run in the torch backend's workers, on CPU
        cpu_only = recipe["rand_aug"] or (train and recipe["shuffle_frames"])
        self.backend = backend or ("dali" if self.device.type == "cuda" and not cpu_only and dali_installed() else "torch")
        if self.backend not in ("dali", "torch"):
            raise ValueError(f"backend {backend!r}: use 'dali' or 'torch'")
        if self.backend == "dali" and not dali_installed():
            raise ValueError("backend dali: NVIDIA DALI is not installed (pip install -r requirements-gpu.txt)")
        if self.backend == "dali" and recipe["rand_aug"]:
            raise ValueError("rand_aug runs in the torch backend's workers (mme/online/augment.py), not in DALI")
        if self.backend == "dali" and train and recipe["shuffle_frames"]:
            raise ValueError("shuffle_frames runs in the torch backend's workers, not in DALI")
        self.dataset = _Samples(self.urls, recipe, train, rank, world_size, self.epoch_samples, self.workers,
                                decode=self.backend == "torch")
        self.pipe = dali.pipeline(recipe, self.batch, self.device, self.schema) if self.backend == "dali" else None
        self.epoch, self.done, self.rank = 0, 0, rank

    def __len__(self):
        """Batches per epoch: the same on every rank."""
        if self.train:
            return max(self.workers, 1) * (self.epoch_samples * self.per_sample // self.batch)
        return max(self.workers, 1) * -(-self.epoch_samples * self.per_sample // self.batch)

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.done}

    def load_state_dict(self, state):
        self.epoch, self.done = state["epoch"], state["batches"]

    def __iter__(self):
        workers = max(self.workers, 1)
        # DataLoader takes batches from its workers in turn: after `done` batches, worker w has made
        # ceil((done - w) / workers) of them, which its stream skips on resume.
        self.dataset.epoch = self.epoch
        self.dataset.skip = [max(0, -(-(self.done - w) // workers)) * self.batch // self.per_sample for w in range(workers)]
        collate = functools.partial(_collate, recipe=self.recipe, decoded=self.pipe is None)
        # A generator of its own: DataLoader draws a seed from the global torch RNG at every iter()
        # otherwise, and a resumed run (which starts an iterator mid-epoch) would drift from an
        # uninterrupted one wherever that RNG is used (drop path). Nothing here needs its seeds.
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch, num_workers=self.workers,
                                         collate_fn=collate, drop_last=self.train, generator=torch.Generator(),
                                         persistent_workers=False, prefetch_factor=4 if self.workers else None)
        for batch in stream_errors(dl):
            if not len(batch):
                raise RuntimeError(f"{self.urls[0]}...: no sample of batch {self.done} decodes (see the warnings)")
            # masks are drawn per batch from (seed, rank, epoch, batch): a resumed epoch draws the same
            mask_rng = np.random.default_rng([self.recipe["seed"], self.rank, self.epoch, self.done, 7])
            self.done += 1
            yield self.finish(batch, mask_rng)
        self.epoch, self.done = self.epoch + 1, 0

    def decode(self, items):
        """DALI: prepared samples -> video uint8 [B, T, S, S, 3], disp [B, T', n, n, L, 2], hog [..., L, 9],
        valid bool [B, T', n, n], on the loader's device. Undecodable samples are dropped from `items`."""
        try:
            return dali.run(self.pipe, items, self.recipe, self.device)
        except Exception:
            # A JPEG that does not decode fails the whole batch: find it, warn, go on without it.
            # (DALI's pipeline is unusable after an error, so it is rebuilt.)
            good = [it for it in items if decode_frames(it) is not None]
            if len(good) == len(items) or not good:
                raise
            items[:] = good
            self.pipe = dali.pipeline(self.recipe, self.batch, self.device, self.schema)
            return dali.run(self.pipe, items, self.recipe, self.device)

    def finish(self, batch, mask_rng):
        """A batch from the workers (torch backend: augmented, with targets; DALI: a list of prepared
        samples, decoded and augmented here) -> the batch dict of the module docstring."""
        r = self.recipe
        if isinstance(batch, list):
            items = batch
            clip, *tracks = self.decode(items)
            batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in ("label", "pad", "box", "flip")}
            batch["key"] = [it["key"] for it in items]
            batch["video"] = clip
            if r["target"] != "none":
                batch["target"], batch["weight"] = make_target(r, clip, *tracks)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["video"] = transforms.normalize(batch["video"])
        B, T, size = len(batch["label"]), r["num_frames"], r["input_size"]
        if r["target"] != "none":
            batch["mask"] = targets.tube_mask(mask_rng, B, T // 2, size // 16, size // 16, r["mask_ratio"],
                                              r["mask_type"]).to(self.device)
        batch["box"], batch["flip"] = batch["box"].cpu(), batch["flip"].cpu()    # (x0, y0, w, h) in the shard's frames
        batch["pad"] = batch["pad"].cpu()
        return batch


def stream_errors(batches):
    """The batches; an S3Error raised in a DataLoader worker (whose copy carries the worker's traceback)
    comes out as the one-line S3Error it was."""
    try:
        yield from batches
    except s3.S3Error as e:
        raise s3.S3Error(str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.S3Error: ")) from None


def build_loader(urls, recipe, train=True, rank=None, world_size=None, backend=None, device=None):
    """The loader of this rank (rank/world size default to torchrun's environment; backend to "dali"
    on a GPU, "torch" on CPU)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return Loader(urls, recipe, train, rank, world_size, backend, device)
