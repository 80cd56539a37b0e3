"""The loader: shards -> augmented clips, masks and reconstruction targets, batched per rank.

    loader = build_loader(urls, recipe, train=True)      # urls: paths, globs, brace patterns, s3:// URLs
    for b in loader:
        b["video"]    # float [B, 3, T, S, S], ImageNet-normalised
        b["mask"]     # bool  [B, N], True = masked (hidden from the encoder); N = T/2 * (S/16)^2
        b["target"]   # float [B, N, D]: recipe["target"] (mme | pixel | hog), layout in mme/targets.py
        b["weight"]   # float [B, N]: 0 for tokens whose trajectories left the frame (eq. 7)
        b["label"]    # long  [B], -1 where the shards carry no label
        b["box"], b["flip"]   # the augmentation drawn for each clip (for pictures and tests)
    state = loader.state_dict(); loader.load_state_dict(state)   # resume mid-epoch, same next batch

Per sample, DataLoader worker processes read the stream (mme.stream: rank/worker split, equal
epochs, bad input skipped) and draw the augmentation: a MultiScaleCrop box and a flip (seeded by
seed, epoch, rank and sample). The main process decodes and applies them to the frames and to the
trajectory maps alike: with DALI (backend="dali": GPU "mixed" JPEG decoding and GPU resize when a
GPU is there, the same operators on CPU otherwise) or with the pure-PyTorch reference
(backend="torch", mme.transforms). Targets are then computed in torch on the batch's device.
"""
import json
import logging
import os

import cv2
import numpy as np
import torch

from mme import shards, stream, targets, transforms

MEAN = (0.485, 0.456, 0.406)        # ImageNet, as VideoMAE normalises its input
STD = (0.229, 0.224, 0.225)
SHUFFLE = 32                        # samples shuffled in each worker's buffer (~40 MB); shards are shuffled at extraction
log = logging.getLogger(__name__)
GRID = 8                            # px between trajectories, in the shards and at the output: K = 4 per 16 x 16 patch


def shard_urls(urls, split):
    """A folder holding manifest.json means its `split` shards; anything else goes to stream.expand."""
    if isinstance(urls, str) and (urls.endswith("/") or os.path.isdir(urls)) and stream.read_manifest(urls.rstrip("/")):
        return stream.split_urls(urls.rstrip("/"), split)
    return stream.expand(urls)


def check_recipe(meta, recipe, url):
    """Shards and recipe must agree on what a sample is; say so before anything starts."""
    p = meta["params"]
    wrong = [f"{name} {p[key]} in the shards, {recipe[rkey]} in the recipe" for name, key, rkey, bad in (
        ("frames", "frames", "num_frames", meta["num_frames"] != recipe["num_frames"]),
        ("stride", "stride", "sampling_rate", p["stride"] != recipe["sampling_rate"]),
        ("trajectory length", "length", "trajectory_length", p["length"] < recipe["trajectory_length"])) if bad]
    if p["grid"] != GRID:
        wrong.append(f"grid {p['grid']} in the shards, the loader needs {GRID}")
    if wrong:
        raise ValueError(f"{url}: " + "; ".join(wrong) + ": re-extract, or change the recipe")


def prepare(raw, rng, recipe, train):
    """Worker side: parse one raw sample and draw its augmentation. Returns a dict of numpy arrays
    (the JPEG bytes undecoded) that either backend can finish."""
    meta = json.loads(raw["json"])
    check_recipe(meta, recipe, f"{raw.get('__url__')} sample {raw['__key__']}")
    T, L = recipe["num_frames"], recipe["trajectory_length"]
    w, h = meta["size"]
    size = recipe["input_size"]
    if train:
        box = transforms.crop_box(rng, h, w, size, recipe["crop_scales"])
        flip = bool(recipe["flip"] and rng.random() < 0.5)
    else:
        box, flip = transforms.centre_box(h, w, size), False
    return {
        "jpg": np.frombuffer(raw["frames.jpg"], np.uint8),
        "shape": np.array([T, h, w, 3], np.int64),
        "disp": shards.npy_load(raw["disp.npy"])[..., :L, :],
        "hog": shards.npy_load(raw["hog.npy"])[..., :L, :],
        "valid": shards.npy_load(raw["valid.npy"]),
        "box": np.array(box, np.int64),
        "flip": np.array(flip),
        "label": np.array(int(raw["cls"]), np.int64),
        "name": f"{raw.get('__url__')} sample {raw['__key__']}",
    }


class _Samples(torch.utils.data.IterableDataset):
    """One rank's prepared samples; each DataLoader worker reads its own part of the stream."""

    def __init__(self, urls, recipe, train, rank, world_size, epoch_samples, num_workers):
        self.urls, self.recipe, self.train = urls, recipe, train
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
        for i, raw in enumerate(raws, start):
            # one generator per sample: a resumed stream draws the same crops as an uninterrupted one
            rng = np.random.default_rng([seed, self.epoch, self.rank, worker, i])
            yield prepare(raw, rng, self.recipe, self.train)


def _collate(items):
    return items                     # a list of prepared samples: frames differ in size until cropped


class Loader:
    """Iterable over batches of one epoch at a time (see the module docstring); `epoch` advances
    after each full pass. state_dict()/load_state_dict() capture (epoch, batches done)."""

    def __init__(self, urls, recipe, train=True, rank=0, world_size=1, backend="dali", device=None):
        self.recipe, self.train = recipe, train
        self.urls = shard_urls(urls, "train" if train else "val")
        check_recipe(stream.check_schema(self.urls[0]), recipe, self.urls[0])
        self.batch = max(1, recipe["batch_size"] // (world_size * recipe.get("accum_steps", 1)))
        self.workers = recipe["num_workers"]
        self.epoch_samples = stream.epoch_length(self.urls, world_size, max(self.workers, 1), self.batch) if train else None
        self.dataset = _Samples(self.urls, recipe, train, rank, world_size, self.epoch_samples, self.workers)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backend = backend
        self.pipe = _dali_pipeline(recipe, self.batch, self.device) if backend == "dali" else None
        self.epoch, self.done, self.rank = 0, 0, rank

    def __len__(self):
        """Batches per epoch (training): the same on every rank."""
        return max(self.workers, 1) * (self.epoch_samples // self.batch)

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.done}

    def load_state_dict(self, state):
        self.epoch, self.done = state["epoch"], state["batches"]

    def __iter__(self):
        workers = max(self.workers, 1)
        # DataLoader takes batches from its workers in turn: after `done` batches, worker w has made
        # ceil((done - w) / workers) of them, which its stream skips on resume.
        self.dataset.epoch = self.epoch
        self.dataset.skip = [max(0, -(-(self.done - w) // workers)) * self.batch for w in range(workers)]
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch, num_workers=self.workers,
                                         collate_fn=_collate, drop_last=self.train,
                                         persistent_workers=False, prefetch_factor=4 if self.workers else None)
        for items in dl:
            # masks are drawn per batch from (seed, rank, epoch, batch): a resumed epoch draws the same
            mask_rng = np.random.default_rng([self.recipe["seed"], self.rank, self.epoch, self.done, 7])
            self.done += 1
            yield self.finish(items, mask_rng)
        self.epoch, self.done = self.epoch + 1, 0

    def decode(self, items):
        if self.pipe is not None:
            return _run_dali(self.pipe, items, self.device)
        return _run_torch(items, self.recipe["input_size"], self.device)

    def finish(self, items, mask_rng):
        """Decode and augment a list of prepared samples, then build masks and targets."""
        r = self.recipe
        size, L = r["input_size"], r["trajectory_length"]
        try:
            video, disp, hog, valid = self.decode(items)
        except Exception:
            # A JPEG that does not decode fails the whole batch: find it, warn, go on without it.
            # (DALI's pipeline is unusable after an error, so it is rebuilt.)
            good = []
            for it in items:
                tile = cv2.imdecode(it["jpg"], cv2.IMREAD_COLOR)
                T, h, w, _ = it["shape"]
                if tile is None or tile.shape[:2] != (T * h, w):
                    log.warning("%s: frames.jpg does not decode to %dx%d frames: skipped", it["name"], T, h)
                else:
                    good.append(it)
            if len(good) == len(items) or not good:
                raise
            items = good
            if self.pipe is not None:
                self.pipe = _dali_pipeline(r, self.batch, self.device)
            video, disp, hog, valid = self.decode(items)
        B, Tp, gh, gw = valid.shape
        disp = disp.reshape(B, Tp, gh, gw, L, 2)
        hog = hog.reshape(B, Tp, gh, gw, L, transforms.BINS)
        d, g, v = [], [], []
        for i, it in enumerate(items):
            di, gi, vi = transforms.finish_tracks(disp[i], hog[i], valid[i], tuple(it["box"]), size, bool(it["flip"]))
            d.append(di), g.append(gi), v.append(vi)
        disp, hog, valid = torch.stack(d), torch.stack(g), torch.stack(v)
        if r["target"] == "mme":
            target, weight = targets.mme_target(disp, hog, valid, patch_norm=r["patch_norm"], shape=r["shape_target"],
                                                density=r["trajectory_density"],
                                                stride=None if r["interpolation"] else r["sampling_rate"])
        else:
            mean = torch.tensor(MEAN, device=video.device)[:, None, None, None]
            std = torch.tensor(STD, device=video.device)[:, None, None, None]
            pixels = video * std + mean                                       # back to [0, 1]
            target = targets.pixel_target(pixels, r["patch_norm"]) if r["target"] == "pixel" else targets.hog_target(pixels)
            weight = torch.ones(target.shape[:2], device=target.device)
        T = r["num_frames"]
        mask = targets.tube_mask(mask_rng, B, T // 2, size // 16, size // 16, r["mask_ratio"], r["mask_type"])
        labels = torch.as_tensor(np.stack([it["label"] for it in items]))
        return {"video": video, "mask": mask.to(video.device), "target": target, "weight": weight,
                "label": labels.to(video.device),
                "box": torch.as_tensor(np.stack([it["box"] for it in items])),      # (x0, y0, w, h) in the shard's frames
                "flip": torch.as_tensor(np.stack([it["flip"] for it in items]))}


def build_loader(urls, recipe, train=True, rank=None, world_size=None, backend="dali", device=None):
    """The loader of this rank (rank/world size default to torchrun's environment)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return Loader(urls, recipe, train, rank, world_size, backend, device)


# ---- the two backends: same inputs (prepared samples), same outputs --------------------------

def _run_torch(items, size, device):
    """Reference backend: OpenCV JPEG decoding + mme.transforms, on the CPU."""
    videos, disps, hogs, valids = [], [], [], []
    for it in items:
        T, h, w, _ = it["shape"]
        tile = cv2.imdecode(it["jpg"], cv2.IMREAD_COLOR)
        frames = cv2.cvtColor(tile, cv2.COLOR_BGR2RGB).reshape(T, h, w, 3)
        box, flip = tuple(int(x) for x in it["box"]), bool(it["flip"])
        video = transforms.crop_frames(frames, box, size, flip)
        mean, std = torch.tensor(MEAN)[:, None, None, None], torch.tensor(STD)[:, None, None, None]
        videos.append((video - mean) / std)
        Tp, gh, gw = it["valid"].shape
        disps.append(transforms.crop_maps(it["disp"].astype(np.float32).reshape(Tp, gh, gw, -1), box, size, GRID, flip))
        hogs.append(transforms.crop_maps(shards.decode_hog(it["hog"]).reshape(Tp, gh, gw, -1), box, size, GRID, flip))
        valids.append(transforms.crop_maps(it["valid"].astype(np.float32)[..., None], box, size, GRID, flip)[..., 0])
    return tuple(torch.stack(x).to(device) for x in (videos, disps, hogs, valids))


def _dali_pipeline(recipe, batch, device):
    """DALI graph: JPEG tile -> frames -> crop/resize/flip/normalise; trajectory maps -> the same
    crop/resize/flip in grid coordinates (mme.transforms.crop_maps's mapping: ROI shifted by half a
    source pixel, no antialiasing). A flip is a ROI whose x runs backwards (DALI's resize mirrors
    then; fn.flip cannot take the 54-channel HOG maps). Inputs are fed per batch with feed_input."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline

    gpu = device.type == "cuda"
    size = recipe["input_size"]
    out_grid = size // 8
    pipe = Pipeline(batch_size=batch, num_threads=max(2, min(8, torch.get_num_threads())),
                    device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=1,
                    exec_async=False, exec_pipelined=False)
    with pipe:
        jpg = fn.external_source(name="jpg", dtype=types.UINT8)
        shape = fn.external_source(name="shape", dtype=types.INT64)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT)
        map_start = fn.external_source(name="map_start", dtype=types.FLOAT)
        map_end = fn.external_source(name="map_end", dtype=types.FLOAT)
        disp = fn.external_source(name="disp", dtype=types.FLOAT16, layout="FHWC")
        hog = fn.external_source(name="hog", dtype=types.UINT8, layout="FHWC")
        valid = fn.external_source(name="valid", dtype=types.UINT8, layout="FHWC")
        tile = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        frames = fn.reshape(tile, shape=shape, layout="FHWC")
        frames = fn.resize(frames, roi_start=roi_start, roi_end=roi_end, size=[size, size], antialias=True,
                           interp_type=types.INTERP_LINEAR)              # uint8 out: half the memory traffic of float
        video = fn.crop_mirror_normalize(frames, mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                         output_layout="CFHW", dtype=types.FLOAT)
        disp = fn.cast(disp.gpu() if gpu else disp, dtype=types.FLOAT)
        # undo the HOG's log code before resampling, by table: exp() per element costs more than the resize
        codes = list(range(256))
        hog = fn.lookup_table(hog.gpu() if gpu else hog, keys=codes, values=shards.decode_hog(np.arange(256)).tolist(),
                              dtype=types.FLOAT)
        valid = fn.cast(valid.gpu() if gpu else valid, dtype=types.FLOAT)
        maps = []
        for m in (disp, hog, valid):
            m = fn.resize(m, roi_start=map_start, roi_end=map_end, size=[out_grid, out_grid], antialias=False,
                          interp_type=types.INTERP_LINEAR)
            maps.append(m)
        pipe.set_outputs(video, *maps)
    pipe.build()
    return pipe


def _run_dali(pipe, items, device):
    feed = {
        "jpg": [it["jpg"] for it in items],
        "shape": [it["shape"] for it in items],
        "disp": [_fhwc(it["disp"]) for it in items],
        "hog": [_fhwc(it["hog"]) for it in items],
        "valid": [it["valid"].astype(np.uint8)[..., None] for it in items],
    }
    for name, shift, scale in (("roi", 0.0, 1), ("map", -0.5, GRID)):   # frames in pixels, maps in grid steps
        starts, ends = [], []
        for it in items:
            x0, y0, cw, ch = it["box"]
            start = np.float32([(y0 + shift) / scale, (x0 + shift) / scale])
            end = start + np.float32([ch / scale, cw / scale])
            if it["flip"]:                                    # x runs backwards: a mirrored resize
                start[1], end[1] = end[1], start[1]
            starts.append(start), ends.append(end)
        feed[f"{name}_start"], feed[f"{name}_end"] = starts, ends
    for name, data in feed.items():
        pipe.feed_input(name, data)
    video, disp, hog, valid = (_to_torch(o, device) for o in pipe.run())
    return video, disp, hog, valid[..., 0]


def _fhwc(a):
    """[T', gh, gw, L, C] -> [T', gh, gw, L*C]: DALI resizes channels-last maps."""
    return np.ascontiguousarray(a.reshape(*a.shape[:3], -1))


def _to_torch(out, device):
    """A DALI output (float32, uniform shape) copied into a torch tensor of its own on `device`:
    DALI reuses its buffers at the next run. feed_ndarray is DALI's documented copy for both devices."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    t = out.as_tensor()
    arr = torch.empty(t.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(t, arr, cuda_stream=stream)
