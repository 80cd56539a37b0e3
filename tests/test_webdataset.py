"""Plain WebDataset reads our shards: `webdataset.WebDataset(urls).map(mme.shards.decode_sample)` gives the
arrays that mme.shards.decode gives for the same samples read by this package's reader (mme.online.stream),
for shards extract.py writes and for schema version 1's; a sample that breaks the schema raises one
ValueError naming it, which WebDataset's handlers can skip."""
import io

import numpy as np
import pytest
import webdataset
from helpers import fake_clip, write_shard

from mme import shards
from mme.online import stream


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def read_both(urls):
    """(plain WebDataset + decode_sample, mme.online.stream + decode): the decoded samples of `urls` in order."""
    plain = list(webdataset.WebDataset(urls, shardshuffle=False).map(shards.decode_sample))
    ours = [shards.decode(s) for s in stream.samples(urls, resampled=False)]
    for c in plain:
        assert c.pop("__key__") == c["key"]                # WebDataset's map copies the raw sample's key in
    return plain, ours


def test_extracted_shards(synthetic_shards):
    out, r = synthetic_shards
    assert r.returncode == 0, r.stderr[-2000:]
    urls = sorted(str(p) for p in out.glob("*.tar"))
    plain, ours = read_both(urls)
    assert len(ours) == 12 and [c["key"] for c in plain] == [c["key"] for c in ours]
    for a, b in zip(plain, ours):
        assert_same(a, b)
    assert {c["meta"]["schema"] for c in plain} == {shards.SCHEMA_VERSION}
    c = plain[0]                                       # decoded, not codes: float px, float HOG, RGB frames
    assert c["frames"].dtype == np.uint8 and c["frames"].shape[0] == c["meta"]["num_frames"]
    assert c["disp"].dtype == np.float32 and c["hog"].dtype == np.float32 and c["valid"].dtype == bool


def clip_samples(schema, n=3):
    """n raw samples of 4-frame 32 x 48 clips (grid 8, L 3) in shard schema `schema`."""
    meta = {"schema": schema, "num_frames": 4, "size": [48, 32], "params": {"grid": 8, "length": 3, "stride": 2}}
    return [shards.encode(f"k{i}_w00", *fake_clip(T=4, H=32, W=48, L=3, seed=i), i, meta) for i in range(n)]


@pytest.mark.parametrize("version", [1, 2])
def test_older_shards(tmp_path, version):
    url = str(tmp_path / "train-000-000000.tar")
    write_shard(url, clip_samples(version))
    plain, ours = read_both([url])
    assert [c["key"] for c in plain] == ["k0_w00", "k1_w00", "k2_w00"]
    for a, b in zip(plain, ours):
        assert_same(a, b)
    assert plain[0]["meta"]["schema"] == version


def test_a_bad_sample_is_one_value_error_naming_it(tmp_path):
    samples = clip_samples(shards.SCHEMA_VERSION)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    samples[1]["hog.npy.zst"] = shards.zst(pickled.getvalue())
    url = str(tmp_path / "train-000-000000.tar")
    write_shard(url, samples)
    with pytest.raises(ValueError, match="^sample k1_w00: hog.npy.zst: not a NumPy array file"):
        list(webdataset.WebDataset(url, shardshuffle=False).map(shards.decode_sample))
    kept = webdataset.WebDataset(url, shardshuffle=False).map(shards.decode_sample, handler=webdataset.ignore_and_continue)
    assert [c["key"] for c in kept] == ["k0_w00", "k2_w00"]
