"""The augmentation (mme/online/transforms.py) as the loader applies it (mme.online.data.prepare): crop/resize/
flip of frames and trajectories agree, and trajectories come out in output pixels: true motion x scale, dx sign
following the flip."""
import cv2
import numpy as np
import pytest
import torch

from mme import recipe, shards
from mme.offline import synthetic, trajectory
from mme.online import data, transforms

SIZE, GRID = 112, 8


def test_crop_box_follows_multiscale_crop():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        x0, y0, cw, ch = transforms.crop_box(rng, 128, 160, size=SIZE)
        assert cw in (128, 112, 96, 84) and ch in (128, 112, 96, 84)      # 128 * (1, .875, .75, .66)
        assert abs([128, 112, 96, 84].index(cw) - [128, 112, 96, 84].index(ch)) <= 1
        assert 0 <= x0 and x0 + cw <= 160 and 0 <= y0 and y0 + ch <= 128
        assert x0 % ((160 - cw) // 4 or 1) == 0
        seen.add((cw, ch))
    assert len(seen) == 10                                                  # all pairs within one step


def test_map_coords_by_hand():
    """A map whose value is the source x (and y) pixel of each grid point must resample to the source
    pixel each output grid point comes from, worked out here from the resize convention."""
    gh, gw = 16, 20
    ys, xs = np.mgrid[0:gh, 0:gw]
    m = np.stack([xs * GRID + GRID // 2, ys * GRID + GRID // 2], -1)[None].astype(np.float32)   # [1, gh, gw, 2]
    box = (24, 8, 96, 112)
    out = transforms.crop_maps(m, box, SIZE, GRID)[0].numpy()                 # [14, 14, 2]
    u = np.arange(SIZE // GRID) * GRID + 3.5                                   # output cell centres
    expect_x = 24 + (u + 0.5) * 96 / SIZE - 0.5
    expect_y = 8 + (u + 0.5) * 112 / SIZE - 0.5
    np.testing.assert_allclose(out[0, :, 0], expect_x, atol=1e-4)
    np.testing.assert_allclose(out[:, 0, 1], expect_y, atol=1e-4)
    flipped = transforms.crop_maps(m, box, SIZE, GRID, flip=True)[0].numpy()
    np.testing.assert_allclose(flipped[0, :, 0], expect_x[::-1], atol=1e-4)


def test_crop_maps_of_codes_equals_crop_maps_of_values():
    """Looking the HOG code up after cutting out what the samples read = before (every box, flip)."""
    codes = np.random.default_rng(0).integers(0, 256, (2, 16, 20, 9), dtype=np.uint8)
    for box in [(0, 0, 128, 128), (24, 8, 96, 112), (32, 0, 128, 128), (0, 44, 84, 84)]:
        for flip in (False, True):
            a = transforms.crop_maps(codes, box, SIZE, GRID, flip, table=shards.HOG_TABLE)
            b = transforms.crop_maps(shards.decode_hog(codes), box, SIZE, GRID, flip)
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_finish_tracks_units():
    disp = torch.tensor([[1.0, 2.0]])
    hog = torch.arange(9.0)[None]
    d, h, v = transforms.finish_tracks(disp, hog, torch.tensor([1.0, 0.99]), (0, 0, 84, 96), SIZE, flip=True)
    np.testing.assert_allclose(d.numpy(), [[-1.0 * SIZE / 84, 2.0 * SIZE / 96]])
    assert h[0].tolist() == list(range(8, -1, -1)) and v.tolist() == [True, False]


@pytest.fixture(scope="module")
def translating():
    """A raw shard sample (160 x 128, 8 frames, stride 2, L 4) of an object translating at a known sub-pixel
    velocity under no camera motion, whose trajectory arrays are the ground truth itself (so only the
    loader's transform is tested); with its clip and the velocity per frame."""
    T, s, L = 8, 2, 4
    clip = synthetic.clip(0, size=(128, 160), num_frames=T * s + L, camera_prob=0.0, label=0)
    gx, gy = trajectory.grid_points(128, 160, GRID)
    starts = 2 * s * np.arange(T // 2)
    disp, valid = [], []
    for t in starts:
        pos, d, depth = clip.track(gx, gy, t, L)
        disp.append(d.reshape(16, 20, L, 2))
        valid.append(((pos[..., 0] >= 0) & (pos[..., 0] <= 159) & (pos[..., 1] >= 0) & (pos[..., 1] <= 127)).all(1).reshape(16, 20))
    frame_indices = s * np.arange(T)
    meta = {"schema": shards.SCHEMA_VERSION, "num_frames": T, "frame_indices": frame_indices.tolist(), "size": [160, 128],
            "params": {"grid": GRID, "length": L, "stride": s}}
    hog = np.random.default_rng(0).random((T // 2, 16, 20, L, 9)) * 0.1
    raw = shards.encode("t_w00", clip.frames[frame_indices], np.stack(disp), hog, np.stack(valid), 0, meta)
    velocity = clip.b[1] - clip.b[0]                                  # world motion per frame
    return raw, clip, velocity


def loader_recipe(**kw):
    """What the loader needs to take the translating sample (its frames, stride, L), at SIZE, with flips."""
    return recipe.load(None, **{**dict(data_path="x", num_frames=8, sampling_rate=2, trajectory_length=4, input_size=SIZE,
                                       model="tiny", flip=True), **kw})


def test_trajectories_follow_frames_scale_and_flip(translating):
    """Training draws (a MultiScaleCrop box and a flip): on the object, the trajectories the loader gives
    are its velocity in output pixels (x size/cw, y size/ch, dx negated if flipped), where the frames it
    gives show the object; off it, zero."""
    raw, clip, v = translating
    v = shards.decode_disp(shards.encode_disp(v))                   # as stored (1/16 px steps): the transform is tested
    frames = shards.decode(raw)["frames"]
    indices = shards.decode(raw)["meta"]["frame_indices"]
    rng = np.random.default_rng(1)
    r = loader_recipe()
    checked, draws = 0, set()
    for trial in range(12):
        (out,) = data.prepare(raw, rng, r, train=True, decode=True)
        box, flip = tuple(out["box"].tolist()), bool(out["flip"])
        draws.add((box[2:], flip))
        x0, y0, cw, ch = box
        scale = np.array([SIZE / cw, SIZE / ch]) * ([-1, 1] if flip else [1, 1])
        # the frames given are the decoded ones through this box and flip; so the object is where the
        # rendered alpha lands through the same crop_frames
        assert torch.equal(out["video"], transforms.crop_frames(frames, box, SIZE, flip))
        alpha = clip.alpha[indices][..., None].repeat(3, -1) * 255
        alpha_out = transforms.crop_frames(alpha.astype(np.uint8), box, SIZE, flip)[..., 0]   # [T, S, S]
        assert out["disp"].shape == (4, SIZE // GRID, SIZE // GRID, 4, 2)
        for j in range(out["disp"].shape[0]):
            a = alpha_out[2 * j].numpy() / 255
            # bilinear resampling mixes source points up to a grid step (8 px, 11 px here) away
            inner = cv2.erode((a > 0.99).astype(np.uint8), np.ones((25, 25), np.uint8))
            outer = cv2.dilate((a > 0.01).astype(np.uint8), np.ones((25, 25), np.uint8))
            c = np.arange(SIZE // GRID) * GRID + 3                            # output grid points (cell centres)
            on_obj = inner[c][:, c].astype(bool) & out["valid"][j].numpy()
            on_bg = ~outer[c][:, c].astype(bool) & out["valid"][j].numpy()
            d = out["disp"][j].numpy()                                        # [14, 14, L, 2]
            if on_obj.sum():
                np.testing.assert_allclose(d[on_obj], np.broadcast_to(v * scale, d[on_obj].shape), atol=0.02)
                checked += 1
            assert on_bg.sum() and np.abs(d[on_bg]).max() < 0.02
    assert checked >= 10
    assert {f for _, f in draws} == {False, True} and len({size for size, _ in draws}) > 2    # flips and scales drawn


def test_centre_crop_in_evaluation(translating):
    """Evaluation (one crop): the centre square of the short side, never flipped, whatever the recipe's flip
    and without a random generator."""
    raw = translating[0]
    (out,) = data.prepare(raw, None, loader_recipe(test_num_crop=1), train=False, decode=True)
    assert tuple(out["box"].tolist()) == (16, 0, 128, 128) and not out["flip"]
    assert out["video"].shape == (8, SIZE, SIZE, 3) and out["video"].dtype == torch.uint8
    assert torch.equal(out["video"], transforms.crop_frames(shards.decode(raw)["frames"], (16, 0, 128, 128), SIZE))
    assert out["disp"].shape == (4, 14, 14, 4, 2)
    assert out["hog"].shape == (4, 14, 14, 4, 9) and out["valid"].dtype == torch.bool


def test_normalize_is_imagenet_standardisation_in_channels_last_order():
    clip = torch.randint(0, 256, (2, 4, 8, 12, 3), dtype=torch.uint8)                   # [B, T, H, W, 3]
    out = transforms.normalize(clip)
    mean, std = torch.tensor(transforms.MEAN), torch.tensor(transforms.STD)
    expect = ((clip.float() / 255 - mean) / std).permute(0, 4, 1, 2, 3)                  # [B, 3, T, H, W]
    assert out.shape == (2, 3, 4, 8, 12) and out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)


def test_to_uint8_inverts_normalize():
    import torch

    from mme.online import transforms
    v = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = transforms.normalize(v)
    assert x.shape == (2, 3, 4, 16, 16) and torch.equal(transforms.to_uint8(x), v)
