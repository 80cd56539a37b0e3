"""mme.stream: finding shards, the split over ranks and workers, resuming, bad input, S3 (a real
moto_server on 127.0.0.1). Shards are tiny and written here; samples are compared as raw bytes."""
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import fake_clip, write_shard

from mme import shards
from mme.offline import writer
from mme.online import stream

SIZES = {"train-000000.tar": 3, "train-000001.tar": 7, "train-000002.tar": 5}   # + val-000000.tar: 4


def make_sample(key, seed, schema=shards.SCHEMA_VERSION):
    """A raw sample of a 2-frame 16 x 16 clip (one tubelet, 2 x 2 trajectories of 6 steps)."""
    meta = {"schema": schema, "video_key": key, "num_frames": 2}
    return shards.encode(key, *fake_clip(T=2, H=16, W=16, L=6, seed=seed), seed % 5, meta)


def strip(s):
    return {k: v for k, v in s.items() if k != "__url__"}


def keys(stream_):
    return [s["__key__"] for s in stream_]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of 3 train shards (3, 7, 5 samples) and a val shard (4), with manifest.json.
    Returns (folder, {shard path: [its samples]})."""
    d = tmp_path_factory.mktemp("shards")
    content, seed = {}, 0
    for name, n in {**SIZES, "val-000000.tar": 4}.items():
        samples = []
        for i in range(n):
            samples.append(make_sample(f"{name[:-4]}_v{i}_w0", seed))
            seed += 1
        write_shard(d / name, samples)
        content[str(d / name)] = samples
    writer.write_json(d / "manifest.json", {"schema": 1, "splits": {
        "train": {"shards": SIZES}, "val": {"shards": {"val-000000.tar": 4}}}})
    return d, content


def train(data):
    d, content = data
    return [str(d / n) for n in SIZES]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mme.online.stream" and r.levelno == logging.WARNING]

# -----------------------------------------------------------------------------
# finding shards


def test_expand_globs_braces_dirs_manifest(data, tmp_path):
    d, content = data
    tr = train(data)
    assert stream.expand(f"{d}/train-*.tar") == tr
    assert stream.expand(f"{d}/train-{{000000..000002}}.tar") == tr
    assert stream.expand(str(d)) == sorted(content)                         # every *.tar of the folder
    assert stream.expand([tr[2], f"{d}/train-00000[01].tar", tr[0]]) == tr   # sorted, de-duplicated
    assert stream.split_urls(str(d), "train") == tr
    assert stream.split_urls([d], "val") == [f"{d}/val-000000.tar"]
    # braces name shards: a missing one is kept (reading it warns), unless none exists
    assert stream.expand(f"{d}/train-{{000001..000003}}.tar") == tr[1:] + [f"{d}/train-000003.tar"]
    for bad in (f"{d}/test-*.tar", f"{d}/train-000009.tar", f"{d}/train-{{000007..000009}}.tar", str(tmp_path)):
        with pytest.raises(FileNotFoundError, match=re.escape(f"no shards match '{bad}'")):
            stream.expand(bad)
    with pytest.raises(FileNotFoundError, match="no shards match"):
        stream.expand([tr[0], f"{d}/nope-*.tar"])                           # every pattern must match
    with pytest.raises(ValueError, match="no split 'test' \\(has train, val\\)"):
        stream.split_urls(str(d), "test")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        stream.split_urls(str(tmp_path), "train")


def test_schema_check(data, tmp_path):
    tr = train(data)
    assert stream.check_schema(tr[1])["video_key"] == "train-000001_v0_w0"
    write_shard(tmp_path / "old.tar", [make_sample("a_w0", 0, schema=99)])
    said = "shard schema 99, this code reads 1, 2 and 3: re-extract with extract.py"
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}/old.tar: {said}$"):
        stream.check_schema(str(tmp_path / "old.tar"))



def test_every_shard_s_schema_is_checked(data, tmp_path, caplog):
    """Issue #10 point 3: only the first URL's version was checked; now every shard's, as it is opened."""
    d, content = data
    tr = train(data)
    write_shard(tmp_path / "old.tar", [make_sample(f"old{i}_w0", i, schema=4) for i in range(4)])
    urls = [tr[0], str(tmp_path / "old.tar"), tr[2]]
    assert [strip(s) for s in stream.samples(urls, resampled=False)] == content[tr[0]] + content[tr[2]]
    said = "shard schema 4, this code reads 1, 2 and 3: re-extract with extract.py; shard skipped"
    assert warnings_of(caplog) == [f"{tmp_path}/old.tar: {said}"]
    parts = run(urls, world_size=1, num_workers=3, resampled=False)           # every worker refuses it, none drifts
    assert sorted(keys(parts[0, 0] + parts[0, 1] + parts[0, 2])) == sorted(keys(content[tr[0]] + content[tr[2]]))
    assert not [k for k in keys(stream.samples(urls, epoch_samples=40)) if k.startswith("old")]     # training
    (tmp_path / "manifest.json").write_text('{"schema": 4, "splits": {"train": {"shards": {"old.tar": 4}}}}')
    with pytest.raises(ValueError, match="manifest.json: shard schema 4, this code reads 1, 2 and 3: re-extract"):
        stream.split_urls(str(tmp_path), "train")

# -----------------------------------------------------------------------------
# the split over ranks and workers


def run(urls, world_size=2, num_workers=2, **kw):
    """{(rank, worker): [samples]} for every rank and worker."""
    return {(r, w): list(stream.samples(urls, rank=r, world_size=world_size, worker=w, num_workers=num_workers, **kw))
            for r in range(world_size) for w in range(num_workers)}


def test_resampled_epochs(data):
    d, content = data
    tr = train(data)
    originals = {s["__key__"]: s for url in tr for s in content[url]}
    epochs = [run(tr, seed=1, epoch=e, epoch_samples=20) for e in range(4)]
    for streams in epochs:
        for got in streams.values():
            assert len(got) == 20                                             # whatever the shard sizes
            assert all(strip(s) == originals[s["__key__"]] for s in got)     # whole samples, byte for byte
        assert any(streams[0, w] != streams[1, w] for w in range(2))         # ranks differ
        assert any(streams[r, 0] != streams[r, 1] for r in range(2))         # workers differ
    assert run(tr, seed=1, epoch=0, epoch_samples=20) == epochs[0]            # deterministic
    assert run(tr, seed=2, epoch=0, epoch_samples=20) != epochs[0]            # the seed matters
    seqs = [{k: keys(g) for k, g in streams.items()} for streams in epochs]
    assert all(seqs[i] != seqs[j] for i in range(4) for j in range(i))       # every epoch differs
    drawn = {s["__url__"] for streams in epochs for g in streams.values() for s in g}
    assert drawn == set(tr)                                                   # every shard gets drawn


def test_eval_every_sample_once(data):
    d, content = data
    tr = train(data)
    everything = [s for url in tr for s in content[url]]
    streams = run(tr, resampled=False)
    for (r, w), got in streams.items():                                     # sample i -> part i % 4
        assert [strip(s) for s in got] == everything[r * 2 + w::4]
    per_rank = [sum(len(streams[r, w]) for w in range(2)) for r in range(2)]
    assert sum(per_rank) == 15 and max(per_rank) - min(per_rank) <= 1
    one = [strip(s) for s in stream.samples(tr, resampled=False)]             # one worker: everything in order
    assert one == everything


def test_shuffle_buffer(data):
    tr = train(data)
    plain = keys(stream.samples(tr, resampled=False))
    mixed = keys(stream.samples(tr, resampled=False, shuffle_buffer=4, seed=3))
    assert sorted(mixed) == sorted(plain) and mixed != plain                  # a permutation, not the identity
    assert keys(stream.samples(tr, resampled=False, shuffle_buffer=4, seed=3)) == mixed
    firsts = {next(stream.samples(tr, resampled=False, shuffle_buffer=4, seed=k))["__key__"] for k in range(10)}
    assert len(firsts) > 1                                                    # drawn at random from the buffer
    a = keys(stream.samples(tr, shuffle_buffer=4, epoch_samples=12, seed=3))
    assert len(a) == 12 and a == keys(stream.samples(tr, shuffle_buffer=4, epoch_samples=12, seed=3))
    assert a != keys(stream.samples(tr, epoch_samples=12, seed=3))            # the buffer reorders


@pytest.mark.parametrize("kw", [dict(epoch_samples=13, shuffle_buffer=3, rank=1, world_size=2, worker=1, num_workers=2),
                                dict(epoch_samples=13),
                                dict(resampled=False, shuffle_buffer=5)])
def test_resume_continues_the_stream(data, kw):
    tr = train(data)
    full = list(stream.samples(tr, seed=7, epoch=2, **kw))
    assert len(full) >= 7
    for n in (1, 4, len(full) - 1, len(full)):
        assert list(stream.samples(tr, seed=7, epoch=2, start=n, **kw)) == full[n:]


def test_epoch_length(data, tmp_path):
    d, content = data
    tr = train(data)
    assert stream.epoch_length(tr, 2, 1, 2) == 15 // 4 * 2                   # from the manifest
    assert stream.epoch_length(tr, 8, 4, 2) == 2                             # at least one batch
    lying, bare = tmp_path / "lying", tmp_path / "bare"
    for folder in (lying, bare):
        folder.mkdir()
        for n in SIZES:
            shutil.copy(d / n, folder / n)
    writer.write_json(lying / "manifest.json", {"splits": {"train": {"shards": {n: 100 for n in SIZES}}}})
    assert stream.epoch_length(f"{lying}/train-*.tar", 2, 1, 2) == 300 // 4 * 2   # the manifest is what counts
    assert stream.epoch_length(f"{bare}/train-*.tar", 2, 1, 2) == 15 // 4 * 2     # no manifest: counted

# -----------------------------------------------------------------------------
# bad input


def members(path):
    with tarfile.open(path) as tar:
        return tar.getmembers()


CUTS = {   # where to cut train-000001.tar (7 samples): inside sample 3 or just before it
    "mid-member": lambda ms: ms[3 * 6 + 2].offset_data + 50,                 # inside sample 3's hog.npy
    "mid-header": lambda ms: ms[3 * 6 + 2].offset + 100,
    "member boundary": lambda ms: ms[3 * 6 + 2].offset,                       # sample 3 has frames, disp only
    "sample boundary": lambda ms: ms[3 * 6].offset,                           # after sample 2's last member
}


@pytest.mark.parametrize("how", ["file", "pipe"])                           # seekable, and a stream (like S3)
@pytest.mark.parametrize("cut", CUTS)
def test_truncated_shard(data, tmp_path, caplog, cut, how):
    d, content = data
    tr = train(data)
    src = tr[1]
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(Path(src).read_bytes()[:CUTS[cut](members(src))])
    url = str(bad) if how == "file" else f"pipe:cat {bad}"
    got = list(stream.samples([tr[0], url, tr[2]], resampled=False))
    expected = content[tr[0]] + content[src][:3] + content[tr[2]]
    assert [strip(s) for s in got] == expected
    (w,) = warnings_of(caplog)                                                # one line, naming shard and key
    assert w.startswith(f"{url}: ") and "skipping the rest of the shard" in w and "\n" not in w
    assert ("train-000001_v3_w0" in w) == (cut != "sample boundary")
    if cut == "sample boundary":
        assert "train-000001_v2_w0" in w                                      # the last sample read (complete)
    parts = run([tr[0], url, tr[2]], world_size=1, num_workers=2, resampled=False)
    assert sorted(keys(parts[0, 0] + parts[0, 1])) == sorted(keys(expected))  # the split agrees on the damage


@pytest.mark.parametrize("junk", [b"", b"this is not a tar file\n" * 100, bytes(range(256)) * 50])
def test_garbage_and_missing_shards(data, tmp_path, caplog, junk):
    d, content = data
    tr = train(data)
    (tmp_path / "junk.tar").write_bytes(junk)
    urls = [tr[0], str(tmp_path / "junk.tar"), str(tmp_path / "missing.tar"), tr[2]]
    got = list(stream.samples(urls, resampled=False))
    assert [strip(s) for s in got] == content[tr[0]] + content[tr[2]]
    w = warnings_of(caplog)
    assert len(w) == 2 and w[0].startswith(f"{tmp_path}/junk.tar: ") and w[1].startswith(f"{tmp_path}/missing.tar: ")
    assert "No such file" in w[1]


def test_missing_component(data, tmp_path, caplog):
    d, content = data
    samples = [make_sample(f"m{i}_w0", 100 + i) for i in range(4)]
    del samples[1]["hog.npy.zst"], samples[3]["cls"]                              # in the middle and at the end
    write_shard(tmp_path / "m.tar", samples)
    got = list(stream.samples([str(tmp_path / "m.tar")], resampled=False))
    assert [strip(s) for s in got] == [samples[0], samples[2]]
    assert warnings_of(caplog) == [f"{tmp_path}/m.tar: sample m1_w0 lacks hog.npy.zst; skipped",
                                   f"{tmp_path}/m.tar: sample m3_w0 lacks cls; skipped"]
    caplog.clear()                                                           # fewer required: kept
    assert keys(stream.samples([str(tmp_path / "m.tar")], resampled=False, required=("json",))) == [f"m{i}_w0" for i in range(4)]
    assert warnings_of(caplog) == []


def test_bad_and_empty_shards_warn_once_each(data, tmp_path, caplog):
    """Issue #10, smaller points: an empty tar passed without a word; evaluation warned twice per bad
    shard (once when counting samples, once when reading them)."""
    tr = train(data)
    write_shard(tmp_path / "empty.tar", [])
    (tmp_path / "cut.tar").write_bytes(Path(tr[1]).read_bytes()[:5000])
    urls = [tr[0], str(tmp_path / "cut.tar"), str(tmp_path / "empty.tar")]
    assert stream.epoch_length(urls, 1, 1, 1) >= 3 and warnings_of(caplog) == []       # counting says nothing
    list(stream.samples(urls, resampled=False))
    w = warnings_of(caplog)
    assert len(w) == 2 and w[0].startswith(f"{tmp_path}/cut.tar: ") and w[1] == f"{tmp_path}/empty.tar: an empty tar, no samples in it"


def test_training_survives_bad_shards(data, tmp_path, caplog):
    tr = train(data)
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    urls = tr + [str(tmp_path / "junk.tar"), str(tmp_path / "gone.tar")]
    for w in range(2):
        got = list(stream.samples(urls, worker=w, num_workers=2, epoch_samples=20))
        assert len(got) == 20 and all(s["__url__"] in tr for s in got)
    assert any("junk.tar" in m for m in warnings_of(caplog))
    with pytest.raises(RuntimeError, match="no sample in the last 100 shards"):   # never spins forever
        next(stream.samples([str(tmp_path / "gone.tar")]))

# -----------------------------------------------------------------------------
# S3: a real endpoint (moto_server) on 127.0.0.1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    # Linux: the server gets SIGTERM if pytest dies without running the fixture's teardown (kill -9)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)        # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def s3(data):
    """moto_server with bucket 'bucket' holding shards/ (the train shards, manifest, a nested and a
    non-tar object). Yields the endpoint URL; the server is stopped at the end whatever happens."""
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=die_with_parent if sys.platform == "linux" else None)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, "moto_server exited"
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto_server did not answer within 30 s")
        import boto3
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="bucket")
        d, _ = data
        for name in [*SIZES, "manifest.json"]:
            client.upload_file(str(d / name), "bucket", f"shards/{name}")
        client.upload_file(str(d / "val-000000.tar"), "bucket", "shards/nested/val-000000.tar")
        client.put_object(Bucket="bucket", Key="shards/notes.txt", Body=b"not a shard")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3env(s3, monkeypatch, tmp_path):
    """The standard AWS variables, and nothing from this machine's AWS config."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3


S3 = [f"s3://bucket/shards/{n}" for n in SIZES]


def test_s3_same_samples_as_local(data, s3env, caplog):
    d, content = data
    tr = train(data)
    assert stream.expand("s3://bucket/shards/train-{000000..000002}.tar") == S3
    assert stream.expand("s3://bucket/shards/") == S3                        # *.tar directly under the prefix
    assert stream.split_urls("s3://bucket/shards/", "train") == S3
    with pytest.raises(FileNotFoundError, match="no shards match 's3://bucket/empty/'"):
        stream.expand("s3://bucket/empty/")
    assert stream.check_schema(S3[0])["schema"] == shards.SCHEMA_VERSION
    assert stream.epoch_length(S3, 2, 1, 2) == 15 // 4 * 2
    local = [strip(s) for s in stream.samples(tr, resampled=False)]
    remote = list(stream.samples("s3://bucket/shards/", resampled=False))
    assert [strip(s) for s in remote] == local and remote[0]["__url__"] == S3[0]
    for w in range(2):                                                       # training reads s3 alike
        a = list(stream.samples(tr, worker=w, num_workers=2, epoch_samples=9, shuffle_buffer=3))
        b = list(stream.samples(S3, worker=w, num_workers=2, epoch_samples=9, shuffle_buffer=3))
        assert [strip(s) for s in a] == [strip(s) for s in b]
    assert warnings_of(caplog) == []
    assert not any("testing" in r.getMessage() for r in caplog.records)      # no credentials in logs


def test_s3_missing_object(data, s3env, caplog):
    d, content = data
    got = list(stream.samples([S3[0], "s3://bucket/shards/train-000009.tar", S3[2]], resampled=False))
    assert [strip(s) for s in got] == content[train(data)[0]] + content[train(data)[2]]
    (w,) = warnings_of(caplog)
    assert w.startswith("s3://bucket/shards/train-000009.tar: ") and "no such S3 object" in w


def cutting_proxy(upstream_port, cut_after):
    """A TCP proxy to 127.0.0.1:upstream_port that drops each connection once `cut_after` bytes of
    response body went back to the client (a connection lost mid-object; one response per connection
    assumed, true here as each is cut). Returns the listening socket: stop() it."""
    server = socket.create_server(("127.0.0.1", 0))

    def pump(src, dst, limit=None):
        head, body = b"", None                                               # body: bytes after the headers
        with contextlib.suppress(OSError):                                   # the other side hung up: done
            while data := src.recv(65536):
                if limit is not None:
                    if body is None:
                        head += data
                        if b"\r\n\r\n" in head:
                            body = len(head.split(b"\r\n\r\n", 1)[1])
                    else:
                        body += len(data)
                    if body is not None and body >= limit:
                        dst.sendall(data[:len(data) - (body - limit)])
                        break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def accept():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", upstream_port))
            threading.Thread(target=pump, args=(client, up), daemon=True).start()
            threading.Thread(target=pump, args=(up, client, cut_after), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def stop(server):
    server.shutdown(socket.SHUT_RDWR)                                         # wakes the accept() thread
    server.close()


def test_s3_connection_drops_mid_object(data, s3env, monkeypatch, caplog):
    """Issue #10 point 8: every connection is cut after 20000 bytes; each read resumes at its byte offset
    (a Range request) and every shard arrives whole, without a warning."""
    d, content = data
    tr = train(data)
    assert sum(os.path.getsize(u) > 20000 for u in tr) >= 2                # shards longer than the cut
    proxy = cutting_proxy(int(s3env.rsplit(":", 1)[1]), cut_after=20000)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        got = list(stream.samples(S3, resampled=False))
    finally:
        stop(proxy)
    assert [strip(s) for s in got] == [s for u in tr for s in content[u]]
    assert warnings_of(caplog) == []


class Outage:
    """A TCP proxy to 127.0.0.1:port that can go down (live connections dropped, new ones closed at once,
    like a store that restarts) and come back."""

    def __init__(self, port):
        self.server, self.port, self.live, self.is_down = socket.create_server(("127.0.0.1", 0)), port, [], False
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.is_down:
                client.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.port))
            self.live += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(src, dst):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def down(self):
        self.is_down = True
        for s in self.live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def up(self):
        self.is_down = False

    def close(self):
        self.down()
        stop(self.server)


def test_s3_outage_is_waited_out(data, s3env, monkeypatch, caplog):
    """Point 8: the store down for ~3 s mid-epoch killed the run; now reads wait it out with backoff."""
    d, content = data
    tr = train(data)
    proxy = Outage(int(s3env.rsplit(":", 1)[1]))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        it = stream.samples(S3, resampled=False)
        got = [next(it)]
        proxy.down()
        threading.Timer(3, proxy.up).start()
        got += list(it)
    finally:
        proxy.close()
    assert [strip(s) for s in got] == [s for u in tr for s in content[u]]
    assert warnings_of(caplog) == []


def test_s3_gives_up_after_the_patience_in_one_line(data, s3env, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")            # nothing listens
    monkeypatch.setenv("MME_S3_PATIENCE", "2")
    for attempt in (lambda: stream.expand("s3://bucket/shards/"), lambda: list(stream.samples(S3, epoch_samples=5))):
        start = time.monotonic()
        with pytest.raises(stream.S3Error) as e:
            attempt()
        assert 1 < time.monotonic() - start < 30
        assert "giving up" in str(e.value) and "MME_S3_PATIENCE" in str(e.value) and "\n" not in str(e.value)
    assert warnings_of(caplog) == []


@pytest.fixture(scope="module")
def s3_with_auth():
    """A moto_server that checks credentials (none are known to it)."""
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, "moto_server exited"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_bad_credentials_are_one_line(s3env, s3_with_auth, monkeypatch, caplog):
    """Point 7: a folder URL gave a 42-line ClientError traceback, brace URLs a warning per shard."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_with_auth)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-secret")
    for attempt in (lambda: stream.expand("s3://bucket/shards/"), lambda: list(stream.samples(S3, resampled=False)),
                    lambda: stream.split_urls("s3://bucket/shards", "train")):
        with pytest.raises(stream.S3Error) as e:
            attempt()
        msg = str(e.value)
        assert "bucket 'bucket'" in msg and "InvalidAccessKeyId" in msg and "AWS_ACCESS_KEY_ID" in msg and "\n" not in msg
        assert "hunter2" not in msg and "testing" not in msg                     # never credentials
    assert warnings_of(caplog) == []
