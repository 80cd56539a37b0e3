"""The shard schema: encode/decode round trip, quantisation, errors, clip windows."""
import io

import numpy as np
import pytest
from helpers import fake_clip

from mme import shards
from mme.offline import clips


def fake(T=4):
    """A T-frame 32 x 48 clip's arrays (grid 8, L 3) and its metadata (what parse requires of it)."""
    meta = {"schema": shards.SCHEMA_VERSION, "num_frames": T, "size": [48, 32], "params": {"grid": 8, "length": 3, "stride": 2}}
    return (*fake_clip(T=T, H=32, W=48, L=3), meta)


def test_round_trip():
    frames, disp, hog, valid, meta = fake()
    s = shards.decode(shards.encode("vid_w00", frames, disp, hog, valid, 7, meta))
    assert s["key"] == "vid_w00" and s["label"] == 7 and s["meta"] == meta
    assert s["frames"].shape == frames.shape
    psnr = 10 * np.log10(255 ** 2 / np.mean((s["frames"].astype(float) - frames) ** 2))
    assert psnr > 30, psnr                                                 # quality 85 (mixed-up frames: ~10 dB)
    slow = np.abs(disp) <= 3.75
    np.testing.assert_allclose(s["disp"][slow], disp[slow], atol=1 / 32 + 1e-6)     # 1/16 px steps
    np.testing.assert_allclose(s["disp"], disp, atol=1 / 8 + 1e-6)                  # 1/4 px steps past 3.75 px
    np.testing.assert_allclose(s["hog"], hog, rtol=0.055, atol=5.5e-4)      # 5-bit log code: ~11% steps
    assert np.array_equal(s["valid"], valid)


def test_version_2_is_still_read():
    """Version 2 shards (the same members, a 6-bit HOG code, JPEG quality 90) decode by their own table."""
    frames, disp, hog, valid, meta = fake()
    s = shards.encode("vid_w00", frames, disp, hog, valid, 7, dict(meta, schema=2), quality=90)
    assert shards.npy_load(shards.unzst(s["hog.npy.zst"], 1 << 20)).max() > 31    # its 6-bit codes
    d = shards.decode(s)
    np.testing.assert_allclose(d["disp"], disp, atol=1 / 8 + 1e-6)
    np.testing.assert_allclose(d["hog"], hog, rtol=0.027, atol=3e-4)        # 6-bit log code: ~5% steps
    assert np.array_equal(d["valid"], valid)


def test_version_1_is_still_read():
    """Shards extracted before version 2 (float16 disp.npy, 8-bit hog.npy, no compression) decode as they did."""
    frames, disp, hog, valid, meta = fake()
    s = shards.encode("vid_w00", frames, disp, hog, valid, 7, dict(meta, schema=1))
    assert {"disp.npy", "hog.npy", "valid.npy"} < set(s) and shards.npy_load(s["disp.npy"]).dtype == np.float16
    d = shards.decode(s)
    np.testing.assert_allclose(d["disp"], disp, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(d["hog"], hog, rtol=0.025)                   # v1's 8-bit code: ~2% steps
    assert np.array_equal(d["valid"], valid)


def test_displacement_code():
    """int8 fixed point: 1/16 px to 3.75 px, 1/4 px to 20.5 px, so every displacement the tracker makes
    (clipped at mme.flow.MAX_FLOW) is stored without saturating; beyond 20.5 px the code saturates."""
    from mme.offline.flow import MAX_FLOW
    d = np.linspace(-MAX_FLOW, MAX_FLOW, 200001, dtype=np.float32)
    q = shards.encode_disp(d)
    assert q.dtype == np.int8 and np.all(np.diff(q.astype(int)) >= 0)      # monotone
    err = np.abs(shards.decode_disp(q) - d)
    assert err[np.abs(d) <= 3.75].max() <= 1 / 32 + 1e-6 and err.max() <= 1 / 8 + 1e-6
    assert shards.decode_disp(shards.encode_disp(np.float32([25, -25]))).tolist() == [20.5, -20.5]
    np.testing.assert_array_equal(shards.decode_disp(q.view(np.uint8)), shards.decode_disp(q))


def test_hog_code_is_monotone_and_clips():
    h = np.linspace(0, 0.5, 10001, dtype=np.float32)
    for version, top in ((3, 31), (2, 63), (1, 255)):
        q = shards.encode_hog(h, version)
        assert np.all(np.diff(q.astype(int)) >= 0) and q[0] == 0 and q[-1] == top
        assert shards.decode_hog(np.uint8([top]), version)[0] == pytest.approx(shards.HOG_MAX)
    assert shards.decode_hog(np.uint8([255]))[0] == pytest.approx(shards.HOG_MAX)          # a damaged code: the top


def _header_dtype(npy):
    """The dtype a .npy file's header declares (object for a pickle), read without loading the file."""
    f = io.BytesIO(npy)
    major, _ = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)[2]


def test_no_pickle_in_arrays():
    """Shards hold plain .npy members, never pickles: the encoder refuses object arrays (which np.save would
    pickle), and a pickled member (a hostile or foreign shard) is refused by every reader, not unpickled."""
    frames, disp, hog, valid, meta = fake()
    for version, names in shards.TRACKS.items():
        s = shards.encode("k", frames, disp, hog, valid, 0, dict(meta, schema=version))
        for name in names:
            npy = shards.unzst(s[name], 10 ** 6) if name.endswith(".zst") else s[name]
            assert not _header_dtype(npy).hasobject, name
    for i, name in enumerate(("frames", "disp", "hog", "valid")):
        arrays = [frames, disp, hog, valid]
        arrays[i] = arrays[i].astype(object)              # the same numbers, as Python objects
        with pytest.raises(ValueError, match=f"^{name}: an object array"):
            shards.encode("k", *arrays, 0, meta)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        shards.npy_load(pickled.getvalue())
    s = shards.encode("k", frames, disp, hog, valid, 0, meta)
    bad = s | {"hog.npy.zst": shards.zst(pickled.getvalue())}
    for decoder in (shards.decode, shards.decode_sample):
        with pytest.raises(ValueError, match="allow_pickle=False"):
            decoder(bad)


def test_decode_errors_name_the_sample():
    frames, disp, hog, valid, meta = fake()
    s = shards.encode("clip_w01", frames, disp, hog, valid, 0, meta)
    with pytest.raises(ValueError, match="clip_w01.*missing hog.npy.zst"):
        shards.decode({k: v for k, v in s.items() if k != "hog.npy.zst"})
    s["json"] = b'{"schema": 99, "num_frames": 4}'
    with pytest.raises(ValueError, match="^sample clip_w01: shard schema 99, this code reads 1, 2 and 3: re-extract with extract.py$"):
        shards.decode(s)


def test_bytes_per_clip_on_the_schema_table():
    """docs/shards.md's table: a 16-frame clip at 336 x 256 (grid 8, L 6) stores 8 x 32 x 42 trajectories;
    version 2's trajectory members, raw, are half of version 1's (int8 vs float16 disp; HOG codes one byte,
    6 bits used, which zstd then takes down to ~2.2 bits on the synthetic clips)."""
    rng = np.random.default_rng(0)
    disp = rng.normal(0, 0.5, (8, 32, 42, 6, 2)).astype(np.float32)
    assert len(shards.npy_bytes(shards.encode_disp(disp))) == 8 * 32 * 42 * 6 * 2 + 128
    assert len(shards.npy_bytes(disp.astype(np.float16))) == 2 * 8 * 32 * 42 * 6 * 2 + 128


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
