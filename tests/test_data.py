"""The loader (mme/data.py): DALI and the PyTorch reference agree, trajectories keep their units
through it, every rank gets the same batches per epoch, and a restored state resumes exactly."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_shard

from mme import recipe, shards
from mme.offline import clips, sources, synthetic
from mme.online import data

T, S = 8, 64                                      # small clips: 8 frames, 64 px crops


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """6 synthetic videos (one window each) at 80 x 96, stride 2, L 4, in 3 shards of 2."""
    out = tmp_path_factory.mktemp("shards")
    p = clips.Params(frames=T, stride=2, length=4, short_side=80)
    samples = []
    for i in range(6):
        v = sources.Video(path=f"synthetic:train/{i}", key=f"v{i}", label=i % 10, label_name="", split="train")
        samples += clips.video_samples(v, p)[0]
    for k in range(3):
        write_shard(out / f"train-000-{k:06d}.tar", samples[2 * k:2 * k + 2])
    return str(out / "train-000-{000000..000002}.tar")


def make_recipe(**kw):
    base = dict(data_path="x", num_frames=T, sampling_rate=2, trajectory_length=4, input_size=S, batch_size=2,
                num_workers=0, flip=True, model="tiny")
    return recipe.load(None, **(base | kw))


@pytest.mark.parametrize("patch_norm", [False, True])
def test_dali_equals_reference(synth, patch_norm):
    r = make_recipe(patch_norm=patch_norm)
    a = next(iter(data.build_loader(synth, r, backend="torch")))
    b = next(iter(data.build_loader(synth, r, backend="dali")))
    assert torch.equal(a["box"], b["box"]) and torch.equal(a["flip"], b["flip"]) and torch.equal(a["mask"], b["mask"])
    assert a["target"].shape == b["target"].shape == (2, T // 2 * (S // 16) ** 2, 4 * 4 * 2 + 4 * 4 * 9)
    torch.testing.assert_close(a["target"], b["target"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["weight"], b["weight"])
    # frames: DALI's antialiasing filter also reads the pixels just outside the crop, the reference
    # clamps at its edge; inside they agree up to rounding to uint8 (one grey level = 0.0175 here:
    # torch's fixed-point uint8 kernel and DALI's float one round ~20% of the pixels differently)
    inner = (a["video"] - b["video"])[..., 2:-2, 2:-2].abs()
    assert inner.max() < 0.018 and inner.mean() < 0.3 * 0.0175
    assert (a["video"] - b["video"]).abs().mean() < 0.01
    assert a["video"].is_contiguous(memory_format=torch.channels_last_3d) and b["video"].shape == (2, 3, T, S, S)


def write_known_motion(path, step, schema=shards.SCHEMA_VERSION):
    """A shard of 4 samples (label 3) of one 80 x 96 clip whose every trajectory moves by `step` (dx, dy) px
    per step, HOG bins = 0.01 * (1..9), all valid (stride 2, L 4). Returns the path as a str."""
    h, w, L = 80, 96, 4
    frames = np.stack([synthetic.texture(np.random.default_rng(i), h, w) for i in range(T)])
    disp = np.broadcast_to(np.float32(step), (T // 2, h // 8, w // 8, L, 2))
    hog = np.broadcast_to(np.arange(1, 10, dtype=np.float32) * 0.01, (T // 2, h // 8, w // 8, L, 9))
    valid = np.ones((T // 2, h // 8, w // 8), bool)
    meta = {"schema": schema, "num_frames": T, "size": [w, h], "video_key": "k",
            "params": {"stride": 2, "length": L, "grid": 8}}
    write_shard(path, [shards.encode(f"k_w{i:02d}", frames, disp, hog, valid, 3, meta) for i in range(4)])
    return str(path)


@pytest.fixture(scope="module")
def known_motion(tmp_path_factory):
    """One clip whose every trajectory moves by (1.25, -0.5) px per step, HOG bins = 0.01 * (1..9)."""
    return write_known_motion(tmp_path_factory.mktemp("known") / "train-000-000000.tar", (1.25, -0.5))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_targets_are_true_motion_times_scale(known_motion, backend):
    r = make_recipe(patch_norm=False, batch_size=4)
    b = next(iter(data.build_loader(known_motion, r, backend=backend)))
    for i in range(4):
        x0, y0, cw, ch = b["box"][i].tolist()
        sign = -1.0 if b["flip"][i] else 1.0
        pos = b["target"][i, :, :4 * 4 * 2].reshape(-1, 4, 4, 2)
        torch.testing.assert_close(pos[..., 0], torch.full_like(pos[..., 0], sign * 1.25 * S / cw), atol=2e-3, rtol=0)
        torch.testing.assert_close(pos[..., 1], torch.full_like(pos[..., 1], -0.5 * S / ch), atol=2e-3, rtol=0)
        hog = b["target"][i, :, 4 * 4 * 2:].reshape(-1, 4, 4, 9)
        bins = torch.from_numpy(shards.decode_hog(shards.encode_hog(np.arange(1, 10, dtype=np.float32) * 0.01)))  # as stored
        expect = bins.flip(0) if b["flip"][i] else bins
        torch.testing.assert_close(hog, expect.expand_as(hog), atol=1e-6, rtol=1e-5)
        assert torch.all(b["weight"][i] == 1) and b["label"][i] == 3
    assert b["video"].shape == (4, 3, T, S, S)


def test_flip_follows_the_recipe(known_motion):
    flips = torch.cat([next(iter(data.build_loader(known_motion, make_recipe(batch_size=4, seed=s), backend="torch")))["flip"]
                       for s in range(6)])
    assert flips.any() and not flips.all()
    none = next(iter(data.build_loader(known_motion, make_recipe(batch_size=4, flip=False), backend="torch")))
    assert not none["flip"].any()


def test_equal_batches_per_rank_and_determinism(synth):
    r = make_recipe(batch_size=4)                                 # 2 ranks x 2 clips
    counts = []
    for rank in (0, 1):
        loader = data.build_loader(synth, r, rank=rank, world_size=2, backend="torch")
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        assert not any(b["pad"].any() for b in batches)                 # padding is for evaluation only
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0
    a = next(iter(data.build_loader(synth, r, rank=1, world_size=2, backend="torch")))
    b = next(iter(data.build_loader(synth, r, rank=1, world_size=2, backend="torch")))
    assert torch.equal(a["box"], b["box"]) and torch.equal(a["target"], b["target"])


@pytest.mark.parametrize("backend,workers", [("torch", 0), ("dali", 0), ("torch", 2)])
def test_evaluation_sees_every_sample_once_in_equal_batches(synth, backend, workers):
    """6 samples over 4 ranks: shares of 2, 2, 1, 1 are padded to 2 with copies marked pad, so every
    rank runs the same batches and the unpadded samples are the dataset, once each, in 3 crops."""
    r = make_recipe(batch_size=4 * 2, num_workers=workers, test_num_crop=3)   # 2 clips per rank
    seen, counts, boxes = [], [], {}
    for rank in range(4):
        loader = data.build_loader(synth, r, train=False, rank=rank, world_size=4, backend=backend)
        batches = list(loader)
        counts.append((len(loader), len(batches), sum(len(b["key"]) for b in batches)))
        for b in batches:
            assert not b["flip"].any() and b["pad"].dtype == torch.bool
            seen += [k for k, pad in zip(b["key"], b["pad"].tolist()) if not pad]
            for k, box in zip(b["key"], b["box"].tolist()):
                boxes.setdefault(k, set()).add(tuple(box))
    assert len(set(counts)) == 1, counts
    assert sorted(seen) == sorted([f"v{i}_w00" for i in range(6)] * 3)
    assert all(v == {(0, 0, 80, 80), (8, 0, 80, 80), (16, 0, 80, 80)} for v in boxes.values())   # 96 x 80 frames


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_the_same_batches(synth, workers):
    r = make_recipe(num_workers=workers)
    full = data.build_loader(synth, r, backend="dali")
    batches = [b for _, b in zip(range(4), full)]
    first = data.build_loader(synth, r, backend="dali")
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    resumed = data.build_loader(synth, r, backend="dali")
    resumed.load_state_dict(json.loads(json.dumps(state)))           # survives a checkpoint round trip
    again = [b for _, b in zip(range(2), resumed)]
    for x, y in zip(batches[2:], again):
        assert torch.equal(x["box"], y["box"]) and torch.equal(x["mask"], y["mask"])
        torch.testing.assert_close(x["target"], y["target"])


def test_mismatched_recipe_is_refused_at_start(synth):
    with pytest.raises(ValueError, match="stride 2 in the shards, 3 in the recipe"):
        data.build_loader(synth, make_recipe(sampling_rate=3), backend="torch")
    with pytest.raises(ValueError, match="trajectory length 4 in the shards, 6 in the recipe"):
        data.build_loader(synth, make_recipe(trajectory_length=6), backend="torch")


@pytest.mark.parametrize("target,dim", [("pixel", 2 * 16 * 16 * 3), ("hog", 108)])
def test_baseline_targets(synth, target, dim):
    b = next(iter(data.build_loader(synth, make_recipe(target=target), backend="dali")))
    assert b["target"].shape == (2, T // 2 * (S // 16) ** 2, dim) and torch.all(b["weight"] == 1)
    assert torch.isfinite(b["target"]).all()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_undecodable_frames_are_skipped_with_a_warning(known_motion, tmp_path, backend, caplog):
    """A complete sample whose JPEG is garbage: one warning naming it, the batch goes on without it."""
    import tarfile
    good = tarfile.open(known_motion)
    out = tmp_path / "train-000-000000.tar"
    with tarfile.open(out, "w") as tar:
        for m in good:
            data_ = good.extractfile(m).read()
            if m.name == "k_w01.frames.jpg":
                data_ = data_[:200] + bytes(len(data_) - 200)          # header kept, scan data zeroed
            info = tarfile.TarInfo(m.name)
            info.size = len(data_)
            tar.addfile(info, __import__("io").BytesIO(data_))
    with caplog.at_level("WARNING", logger="mme.online.data"):
        b = next(iter(data.build_loader(str(out), make_recipe(batch_size=4, flip=False), backend=backend)))
    assert b["video"].shape[0] == 3 and torch.all(b["label"] == 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "mme.online.data"]
    assert len(lines) == 1 and "k_w01" in lines[0] and str(out) in lines[0]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_labels_only_for_fine_tuning(synth, backend):
    """target: none reads no trajectories and yields clips and labels, no targets or masks."""
    b = next(iter(data.build_loader(synth, make_recipe(target="none"), backend=backend)))
    assert set(b) == {"video", "label", "key", "pad", "box", "flip"}
    assert b["video"].shape == (2, 3, T, S, S) and b["label"].tolist() == [int(k[1]) % 10 for k in b["key"]]


def test_repeated_sampling_and_randaugment(synth):
    """Table 15's repeated sampling: each sample gives 2 differently augmented clips, consecutive in a
    batch; an epoch gives every sample's clips; RandAugment changes the clips and is the torch backend's."""
    r = make_recipe(batch_size=4, target="none", repeated_aug=2, rand_aug=[2, 9, 0.5])
    loader = data.build_loader(synth, r)
    b = next(iter(loader))
    assert b["key"][0] == b["key"][1] and b["key"][2] == b["key"][3]
    assert not torch.equal(b["video"][0], b["video"][1])
    assert loader.epoch_samples == 6 and len(loader) == 3                 # 6 samples x 2 clips = 3 batches of 4
    plain = next(iter(data.build_loader(synth, make_recipe(batch_size=4, target="none", repeated_aug=2))))
    assert torch.equal(plain["box"], b["box"]) and not torch.equal(plain["video"], b["video"])   # same crops, RandAugment on top
    with pytest.raises(ValueError, match="rand_aug"):
        data.build_loader(synth, r, backend="dali")
    with pytest.raises(ValueError, match="divide"):
        data.build_loader(synth, make_recipe(batch_size=3, repeated_aug=2))


@pytest.mark.parametrize("k", [2, 4])
def test_repeated_aug_in_pretraining_reads_and_decodes_once(synth, monkeypatch, k):
    """Issue #12 (b): with repeated_aug k in pre-training, one read and one JPEG decode of a sample serve
    k clips, each with its own crop, flip, mask and MME target."""
    decoded, read = [], []
    real_decode, real_prepare = data.decode_frames, data.prepare
    monkeypatch.setattr(data, "decode_frames", lambda item: decoded.append(item["key"]) or real_decode(item))
    monkeypatch.setattr(data, "prepare", lambda raw, *a, **kw: read.append(raw["__key__"]) or real_prepare(raw, *a, **kw))
    r = make_recipe(batch_size=2 * k, repeated_aug=k, seed=3)
    b = next(iter(data.build_loader(synth, r, backend="torch")))
    assert len(b["key"]) == 2 * k and len(set(b["key"])) == 2
    assert sorted(decoded) == sorted(read) == sorted(set(b["key"])), (decoded, read)      # 1 read, 1 decode per sample
    for i in range(0, 2 * k, k):
        clips = range(i, i + k)
        assert len({tuple(b["box"][j].tolist()) + (bool(b["flip"][j]),) for j in clips}) > 1      # different crops
        assert len({tuple(b["mask"][j].tolist()) for j in clips}) == k                          # different masks
        assert b["target"][i].shape == (T // 2 * (S // 16) ** 2, 4 * 4 * 2 + 4 * 4 * 9)


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("version,step", [(1, (1.3, -0.45)), (2, (1.25, -0.5))])    # v1: float16, off v2's 1/16 px steps
def test_older_shards_are_still_read(tmp_path, backend, version, step):
    """Shards of older schema versions (1: float16 disp.npy, 8-bit hog.npy; 2: 6-bit HOG code) need no
    re-extraction: the loader looks each version's codes up in its own tables."""
    url = write_known_motion(tmp_path / "train-000-000000.tar", step, schema=version)
    b = next(iter(data.build_loader(url, make_recipe(patch_norm=False, batch_size=4), backend=backend)))
    for i in range(4):
        x0, y0, cw, ch = b["box"][i].tolist()
        pos = b["target"][i, :, :4 * 4 * 2].reshape(-1, 4, 4, 2)
        sign = -1.0 if b["flip"][i] else 1.0
        torch.testing.assert_close(pos[..., 0], torch.full_like(pos[..., 0], sign * step[0] * S / cw), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(pos[..., 1], torch.full_like(pos[..., 1], step[1] * S / ch), atol=2e-3, rtol=1e-3)
        bins = np.arange(1, 10, dtype=np.float32) * 0.01
        bins = torch.from_numpy(shards.decode_hog(shards.encode_hog(bins, version), version))
        hog_t = b["target"][i, :, 4 * 4 * 2:].reshape(-1, 4, 4, 9)
        torch.testing.assert_close(hog_t, (bins.flip(0) if b["flip"][i] else bins).expand_as(hog_t), atol=1e-6, rtol=1e-5)


def test_shuffled_frames_keep_each_frame_s_own_trajectories(synth):
    """Fig. 3's switch: every clip's frames come in a random order (the same crop as without it), and
    tubelet j's target is the trajectory map of the tubelet its first frame came from."""
    r = make_recipe(batch_size=4, flip=False, patch_norm=False)
    plain = next(iter(data.build_loader(synth, r, backend="torch")))
    mixed = next(iter(data.build_loader(synth, dict(r, shuffle_frames=True), backend="torch")))
    assert torch.equal(plain["box"], mixed["box"]) and plain["key"] == mixed["key"]
    n = (S // 16) ** 2
    for i in range(4):
        perm = [next(k for k in range(T) if torch.equal(mixed["video"][i, :, j], plain["video"][i, :, k])) for j in range(T)]
        assert sorted(perm) == list(range(T)) and perm != list(range(T))
        for j in range(T // 2):
            src = perm[2 * j] // 2
            assert torch.equal(mixed["target"][i, j * n:(j + 1) * n], plain["target"][i, src * n:(src + 1) * n])
    evaluation = next(iter(data.build_loader(synth, dict(r, shuffle_frames=True), train=False, backend="torch")))
    same = next(iter(data.build_loader(synth, r, train=False, backend="torch")))
    assert torch.equal(evaluation["video"], same["video"])                 # only pre-training shuffles
    with pytest.raises(ValueError, match="shuffle_frames"):
        data.build_loader(synth, dict(r, shuffle_frames=True), backend="dali")


def _npy(a, allow_pickle=False):
    import io
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def _zst(a, allow_pickle=False):
    return shards.zst(_npy(a, allow_pickle))


def _stored(s, name):
    return shards.npy_load(shards.unzst(s[name], 10 ** 7))


MALFORMED = {   # issue #10 point 2: each crashed the DataLoader with a long traceback
    "valid.npy wrong shape": lambda s: {"valid.npy.zst": _zst(np.zeros((1, 2, 3), bool))},
    "garbage .npy": lambda s: {"disp.npy.zst": shards.zst(b"\x93NUMPY garbage" + bytes(range(200)))},
    "garbage zstd": lambda s: {"disp.npy.zst": b"\x28\xb5\x2f\xfd garbage" + bytes(range(200))},
    "zstd bomb": lambda s: {"hog.npy.zst": shards.zst(bytes(10 ** 7))},
    "object-dtype .npy": lambda s: {"hog.npy.zst": _zst(np.array([{"a": 1}], dtype=object), allow_pickle=True)},
    "cls abc": lambda s: {"cls": b"abc"},
    "invalid json": lambda s: {"json": b"{not json"},
    "float64 hog.npy": lambda s: {"hog.npy.zst": _zst(_stored(s, "hog.npy.zst").astype(np.float64))},
    "float16 disp.npy (version 1's) in a version 2 sample": lambda s: {"disp.npy.zst": _zst(_stored(s, "disp.npy.zst").astype(np.float16))},
    "json without size": lambda s: {"json": json.dumps({k: v for k, v in json.loads(s["json"]).items() if k != "size"}).encode()},
}


@pytest.mark.parametrize("how", MALFORMED)
def test_malformed_sample_is_skipped_with_one_line(synth, tmp_path, caplog, how):
    p = clips.Params(frames=T, stride=2, length=4, short_side=80)
    samples = [s for i in range(3) for s in clips.video_samples(
        sources.Video(path=f"synthetic:train/{i}", key=f"v{i}", label=i, label_name="", split="train"), p)[0]]
    samples[1] = samples[1] | MALFORMED[how](samples[1])
    url = str(tmp_path / "train-000-000000.tar")
    write_shard(url, samples)
    with caplog.at_level("WARNING", logger="mme.online.data"):
        seen = [k for b in data.build_loader(url, make_recipe(test_num_crop=1), train=False, backend="torch") for k in b["key"]]
    assert sorted(set(seen)) == ["v0_w00", "v2_w00"], seen                   # (evaluation pads with copies)
    lines = [r.getMessage() for r in caplog.records if r.name == "mme.online.data"]
    assert len(lines) == 1 and url in lines[0] and "v1_w00" in lines[0] and "\n" not in lines[0], lines
    # training, in a worker process, goes on past it too
    assert len(list(data.build_loader(url, make_recipe(num_workers=1), backend="torch"))) == 1


def test_dali_is_optional(synth, monkeypatch):
    """Issue #11: DALI (~1 GB of NVIDIA libraries) is imported only by its backend; without it the default is the
    torch backend, and asking for DALI says how to install it."""
    import subprocess
    import sys
    code = ("import sys; from mme import recipe; from mme.online import data; "
            "r = recipe.load(None, data_path='x', num_frames=8, sampling_rate=2, trajectory_length=4, input_size=64, "
            f"batch_size=2, num_workers=0, model='tiny'); l = data.build_loader({synth!r}, r); next(iter(l)); "
            "assert l.backend == 'torch'; print(sorted(m for m in sys.modules if m.startswith('nvidia')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).parents[1]))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
    monkeypatch.setattr(data, "dali_installed", lambda: False)
    with pytest.raises(ValueError, match="requirements-gpu.txt"):
        data.build_loader(synth, make_recipe(), backend="dali")
    assert data.build_loader(synth, make_recipe()).backend == "torch"


def test_test_num_segment_picks_windows_spread_over_the_video(tmp_path):
    """Two videos of 3 evaluation windows each (as extract.py --views val=3 stores them; the windows
    here are other synthetic clips relabelled, which the loader cannot tell): test_num_segment 2 tests
    the first and the last of each, 1 the middle one, none (or more than stored) all three; the others
    never reach a batch, real or padding."""
    p = clips.Params(frames=T, stride=2, length=4, short_side=80)
    samples = []
    for i in range(2):
        for k in range(3):
            v = sources.Video(path=f"synthetic:val/{3 * i + k}", key=f"v{i}", label=i, label_name="", split="val")
            (sample,), _, _ = clips.video_samples(v, p)
            meta = json.loads(sample["json"]) | {"window": k, "windows": 3}
            samples.append(dict(sample, __key__=f"v{i}_w{k:02d}", json=json.dumps(meta).encode()))
    write_shard(tmp_path / "val-000-000000.tar", samples)
    url = str(tmp_path / "val-000-000000.tar")

    def tested(**kw):
        r = make_recipe(test_num_crop=1, **kw)
        return sorted(k for b in data.build_loader(url, r, train=False, backend="torch") for k, pad in zip(b["key"], b["pad"])
                      if not pad)
    every = tested()
    assert len(every) == 6 and tested(test_num_segment=3) == tested(test_num_segment=7) == every
    assert tested(test_num_segment=2) == ["v0_w00", "v0_w02", "v1_w00", "v1_w02"]
    assert tested(test_num_segment=1) == ["v0_w01", "v1_w01"]
    with pytest.raises(recipe.RecipeError, match="test_num_segment"):
        make_recipe(test_num_segment=0)
