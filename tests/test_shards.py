"""The shard schema: encode/decode round trip, quantisation, errors, clip windows."""
import numpy as np
import pytest

from mme import clips, shards, synthetic


def fake(T=4, H=32, W=48, L=3, g=8, seed=0):
    rng = np.random.default_rng(seed)
    frames = np.stack([synthetic.texture(rng, H, W) for _ in range(T)])
    disp = rng.normal(0, 3, (T // 2, H // g, W // g, L, 2)).astype(np.float32)
    hog = np.exp(rng.uniform(np.log(1e-3), np.log(0.25), (T // 2, H // g, W // g, L, 9))).astype(np.float32)
    valid = rng.random((T // 2, H // g, W // g)) > 0.3
    meta = {"schema": shards.SCHEMA_VERSION, "num_frames": T}
    return frames, disp, hog, valid, meta


def test_round_trip():
    frames, disp, hog, valid, meta = fake()
    s = shards.decode(shards.encode("vid_w00", frames, disp, hog, valid, 7, meta))
    assert s["key"] == "vid_w00" and s["label"] == 7 and s["meta"] == meta
    assert s["frames"].shape == frames.shape
    psnr = 10 * np.log10(255 ** 2 / np.mean((s["frames"].astype(float) - frames) ** 2))
    assert psnr > 30, psnr                                                 # quality 90 (mixed-up frames: ~10 dB)
    np.testing.assert_allclose(s["disp"], disp, rtol=1e-3, atol=1e-3)       # float16
    np.testing.assert_allclose(s["hog"], hog, rtol=0.025)                   # log code: ~2% steps
    assert np.array_equal(s["valid"], valid)


def test_hog_code_is_monotone_and_clips():
    h = np.linspace(0, 0.5, 10001, dtype=np.float32)
    q = shards.encode_hog(h)
    assert np.all(np.diff(q.astype(int)) >= 0) and q[0] == 0 and q[-1] == 255
    assert shards.decode_hog(np.uint8([255]))[0] == pytest.approx(shards.HOG_MAX)


def test_no_pickle_in_arrays():
    frames, disp, hog, valid, meta = fake()
    s = shards.encode("k", frames, disp, hog, valid, 0, meta)
    for name in ("disp.npy", "hog.npy", "valid.npy"):
        shards.npy_load(s[name])          # allow_pickle=False inside: would raise on an object array


def test_decode_errors_name_the_sample():
    frames, disp, hog, valid, meta = fake()
    s = shards.encode("clip_w01", frames, disp, hog, valid, 0, meta)
    with pytest.raises(ValueError, match="clip_w01.*missing hog.npy"):
        shards.decode({k: v for k, v in s.items() if k != "hog.npy"})
    s["json"] = b'{"schema": 99, "num_frames": 4}'
    with pytest.raises(ValueError, match="clip_w01: schema 99"):
        shards.decode(s)


def test_windows():
    p = clips.Params(frames=16, stride=3, length=6)
    assert p.span() == 49                                                   # tracks of tubelet 7 end at 42 + 6
    assert clips.Params(frames=16, stride=4, length=6).span() == 63          # 56 + 6 + 1
    assert clips.window_starts(300, p) == [0, 84, 167, 251]                 # 4 evenly, no overlap
    assert clips.window_starts(120, p) == [0, 71]
    assert clips.window_starts(30, p) == [0]
    sampled, needed = clips.window_frames(0, 30, p)
    assert sampled.tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29, 29, 29, 29, 29, 29]   # clamped
    assert max(needed) == 29 and 28 in needed
    sampled, needed = clips.window_frames(10, 300, clips.Params(frames=4, stride=4, length=2))
    assert sampled.tolist() == [10, 14, 18, 22]
    assert needed == {10, 11, 12, 14, 18, 19, 20, 22}                       # tubelets at 10, 18 track 2 frames
