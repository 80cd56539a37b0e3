"""Shard URLs -> a stream of raw samples, split across torchrun ranks and DataLoader workers.

This module owns the I/O half of the training loader: finding shards (local paths, globs, braces,
directories and their manifest.json, s3:// URLs), reading them as they stream in, and deciding which
(rank, worker) gets which sample. It yields raw samples, never decoded ones:

    {"__key__": "abc_000010_000020_w1", "__url__": "shards/k400/train-000-000003.tar",
     "frames.jpg": b"...", "disp.npy.zst": b"...", "hog.npy.zst": b"...", "valid.npy.zst": b"...", "cls": b"7", "json": b"{...}"}

(schema version 1's disp.npy, hog.npy, valid.npy in place of the .npy.zst members: mme.shards.READABLE.)

Shards are plain (uncompressed) tars as extract.py writes them. Decoding and augmentation live
elsewhere (mme.shards.decode is the reference decoder).

    urls = expand("shards/k400/train-*.tar")                 # or split_urls("shards/k400", "train")
    check_schema(urls[0])                                    # refuse shards of another schema version
    n = epoch_length(urls, world_size, num_workers, batch_size)
    for s in samples(urls, rank=r, world_size=w, worker=i, num_workers=k, epoch=e, epoch_samples=n): ...

Two modes:
- resampled=True (training): each (rank, worker) draws shards with replacement from its own
  deterministic (seed, epoch, rank, worker) sequence and stops after `epoch_samples` samples. Every rank
  gets the same number of samples whatever the shard sizes or damage, so DDP never waits on a rank
  that ran out.
- resampled=False (evaluation): every sample exactly once over all ranks and workers; sample i (in
  sorted shard order) goes to (rank, worker) number i % (world_size * num_workers). Every worker reads
  every shard (skipping the others' samples without copying them), the price of the split by sample.

Bad input never crashes the stream and never yields a partial sample. Each problem is one line on the
`logging` logger "mme.online.stream" at WARNING, naming the shard URL (and the sample key when there is one),
and the stream goes on: a missing shard or S3 object, a non-tar file, a tar cut anywhere (the samples
before the cut that are complete are still yielded), a sample missing a required component, a shard of
another schema version (skipped whole). logging, not warnings.warn: every occurrence is reported (warnings
keeps only the first of each message per process, and `-W error` would turn bad data into a crash), and
the training script decides where the lines go. Only URLs are logged, never credentials.

S3: s3:// URLs are read through mme.online.s3 (retries, resumed reads, one-line errors).
"""
import json
import logging
import os
import posixpath
import re
import tarfile
from contextlib import closing
from glob import escape, glob
from itertools import islice

import numpy as np
from braceexpand import braceexpand  # webdataset's own brace expansion
from webdataset.gopen import gopen  # opens local paths and URLs by scheme
from webdataset.tariterators import base_plus_ext  # "dir/key.frames.jpg" -> ("dir/key", "frames.jpg")

from mme.online.s3 import S3Error, one_line, s3_list  # importing s3 registers s3:// in gopen
from mme.shards import READABLE, refusal

log = logging.getLogger(__name__)
# a sample's components; a tuple: one of them (schema versions 2 and 3's member, or version 1's)
REQUIRED = ("frames.jpg", ("disp.npy.zst", "disp.npy"), ("hog.npy.zst", "hog.npy"), ("valid.npy.zst", "valid.npy"), "cls", "json")

# -----------------------------------------------------------------------------
# finding shards


def expand(urls):
    """urls: a str or list of: local paths, globs ('shards/k400/train-*.tar'), brace patterns
    ('shards/train-{000000..000009}.tar'), a directory (all *.tar in it; one split of it: split_urls),
    or s3:// URLs (braces allowed; s3://bucket/prefix/ ending in '/' lists the *.tar objects directly
    under it). Other URLs (http://, pipe:) pass through for webdataset's gopen. Sorted, de-duplicated.

    Raises FileNotFoundError naming the pattern when it matches nothing. Names spelled out by braces are
    kept even if some of them do not exist (reading those warns), and s3 keys are not checked here (that
    would cost a request per shard): a missing one warns when read."""
    out = set()
    for pattern in [urls] if isinstance(urls, str) else urls:
        found, absent = [], []
        for url in braceexpand(str(pattern)):
            if url.startswith("s3://"):
                if re.search(r"[*?[]", url):
                    raise ValueError(f"{url}: globs are not supported on s3; use braces or a prefix ending in '/'")
                found += s3_list(url) if url.endswith("/") else [url]
            elif re.match(r"^\w+:", url):                # http://, pipe:, ...
                found.append(url)
            elif re.search(r"[*?[]", url):
                found += glob(url)
            elif os.path.isdir(url):
                found += glob(os.path.join(escape(url), "*.tar"))
            else:
                (found if os.path.exists(url) else absent).append(url)
        if not found:
            raise FileNotFoundError(f"no shards match {str(pattern)!r}")
        out.update(found + absent)
    return sorted(out)


def read_manifest(folder):
    """The manifest.json of a folder (local or s3://bucket/prefix), or None if it has none."""
    try:
        with closing(gopen(posixpath.join(str(folder), "manifest.json"))) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def split_urls(urls, split):
    """The shards of one split (manifest["splits"][split]["shards"]) of each folder in urls (a str or list
    of local directories or s3://bucket/prefix/), from the manifest.json it holds. Sorted."""
    out = set()
    for folder in [urls] if isinstance(urls, str) else urls:
        folder = str(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder}: no manifest.json")
        if manifest.get("schema") not in READABLE:
            raise SchemaError(f"{folder}/manifest.json: {refusal(manifest.get('schema'))}")
        if split not in manifest.get("splits", {}):
            raise ValueError(f"{folder}/manifest.json: no split {split!r} (has {', '.join(manifest.get('splits', {})) or 'none'})")
        out.update(posixpath.join(folder, name) for name in manifest["splits"][split]["shards"])
    return sorted(out)

# -----------------------------------------------------------------------------
# reading one shard


class _TarInfo(tarfile.TarInfo):
    # tarfile ends its iteration silently when a header is missing, cut or invalid, so a tar cut at a
    # member boundary looks complete. Only a zero block (EOFHeaderError) is a real end: note it.
    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.complete = True
            raise


def read_shard(url, required=REQUIRED, keep=None, warn=True):
    """Yield the samples of one shard in tar order; return how many it holds (complete or not).

    keep(i) -> bool picks samples by their position i in the shard; the others' bytes are not copied
    (local files: not even read). A sample missing a required component is skipped with a warning.
    Damage ends the shard with one warning; the samples before it that are complete are yielded. A
    shard without samples warns too. warn=False: no warnings (a count before the read that reports)."""
    n, key, sample, checked = 0, None, None, False       # samples begun, current key, the one being filled
    try:
        with closing(gopen(url)) as stream:
            seekable = getattr(stream, "seekable", lambda: False)()
            tar = tarfile.open(fileobj=stream, mode="r:" if seekable else "r|", tarinfo=_TarInfo)
            for m in tar:
                tar.members = []                         # tarfile keeps every header otherwise
                k, ext = base_plus_ext(m.name)
                if not m.isreg() or k is None:           # directories, names without an extension
                    continue
                if k != key:                             # members of a sample are contiguous: the last one is done
                    if sample is not None:
                        yield from complete(sample, required)
                    key, n = k, n + 1
                    sample = {"__key__": key, "__url__": url} if keep is None or keep(n - 1) else None
                first_json = ext.lower() == "json" and not checked      # every shard's version, as it is opened
                if sample is None and not first_json:
                    continue
                if sample is not None and ext.lower() in sample:
                    raise ValueError(f"duplicate member {m.name}")
                data = tar.extractfile(m).read()
                if first_json:
                    check_version(data, url)
                    checked = True
                if sample is not None:
                    sample[ext.lower()] = data
            if not getattr(tar, "complete", False):
                raise tarfile.ReadError("no end-of-archive marker (cut at a member boundary?)")
        if sample is not None:
            yield from complete(sample, required)
        if n == 0 and warn:
            log.warning(f"{url}: an empty tar, no samples in it")
    except (SchemaError, S3Error):
        raise                                            # not damage: the caller refuses the shard, or stops
    except Exception as e:                               # any damage: report it, keep what is whole
        where = f" in sample {key}; skipping the rest of the shard" if key else "; shard skipped"
        if warn:
            log.warning(f"{url}: {one_line(e)}{where}")
        if sample is not None and not lacking(sample, required):
            yield sample                                 # everything it needs arrived before the damage
    return n


def complete(sample, required):
    """Yield the sample if it has every required component, else warn and drop it (a broken writer, or
    a member lost: webdataset would yield it partial)."""
    missing = lacking(sample, required)
    if missing:
        log.warning(f"{sample['__url__']}: sample {sample['__key__']} lacks {', '.join(missing)}; skipped")
    else:
        yield sample


def lacking(sample, required):
    """The required components (str, or a tuple of alternatives: its first named) that sample lacks."""
    return [c[0] if isinstance(c, tuple) else c for c in required
            if not any(a in sample for a in (c if isinstance(c, tuple) else (c,)))]


class SchemaError(ValueError):
    """Shards of another schema version (docs/shards.md: a reader must refuse them)."""


def check_version(json_bytes, url):
    """Raise SchemaError unless a sample's json says a schema in READABLE."""
    try:
        meta = json.loads(json_bytes)
    except ValueError:
        return                                           # a broken sample, not a version: the loader skips it
    v = meta.get("schema") if isinstance(meta, dict) else None
    if v not in READABLE:
        raise SchemaError(f"{url}: {refusal(v)}")


def check_schema(url):
    """Read the first sample's json of a shard; raise ValueError unless its schema is in READABLE
    (the check before a run starts; read_shard checks every shard it opens). Returns the meta dict."""
    with closing(read_shard(url, required=("json",))) as it:
        sample = next(it, None)
    if sample is None:
        raise ValueError(f"{url}: no readable sample with a json component")
    return json.loads(sample["json"])


def refusing_other_versions(shard):
    """Run read_shard-like generator `shard`, turning a SchemaError into one warning: the shard is
    skipped, the stream goes on. Returns the shard's sample count (0 when refused)."""
    try:
        return (yield from shard)
    except SchemaError as e:
        log.warning(f"{e}; shard skipped")
        return 0

# -----------------------------------------------------------------------------
# the stream of one (rank, worker)


def samples(urls, *, rank=0, world_size=1, worker=0, num_workers=1, seed=0, epoch=0,
            resampled=True, epoch_samples=None, shuffle_buffer=0, required=REQUIRED, start=0):
    """Yield the raw samples of DataLoader worker `worker` (of num_workers) of torchrun rank `rank`.

    urls: a str is expanded (expand); a list is read as given (expand's or split_urls' output).
    resampled=True (training): an endless, deterministic (seed, epoch, rank, worker) sequence of shards
    drawn with replacement, stopped after `epoch_samples` samples (None: never), so every rank yields
    exactly as many samples per epoch whatever the shard sizes. resampled=False (evaluation): every
    sample exactly once over all ranks and workers, sample i going to (rank, worker) number
    i % (world_size * num_workers): ranks differ by at most one sample. shuffle_buffer > 0 shuffles
    within a buffer of that many samples (deterministic too; memory: that many raw samples).

    start=n skips the first n samples of this sequence, to resume mid-epoch: the result equals what
    the uninterrupted stream would yield after its n-th sample. The skipped samples are read again
    (the sequence is replayed, not seeked: shard sizes and damage decide where sample n lies), which
    costs their I/O but no decoding. With DataLoader's round-robin over workers, a worker that handed
    out b of the batches done resumes with start = b * batch_size."""
    urls = expand(urls) if isinstance(urls, str) else [str(u) for u in urls]
    assert 0 <= rank < world_size and 0 <= worker < num_workers, (rank, world_size, worker, num_workers)
    if not urls:
        raise ValueError("samples: no shard URLs")
    # One seed sequence per (seed, epoch, rank, worker); separate generators for shards and the buffer.
    shard_rng, buffer_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, epoch, rank, worker]).spawn(2))
    if resampled:
        stream = resampled_samples(urls, required, shard_rng)
    else:
        stream = every_sample_once(urls, required, rank * num_workers + worker, world_size * num_workers)
    if shuffle_buffer > 0:
        stream = shuffled(stream, shuffle_buffer, buffer_rng)
    if epoch_samples is not None:
        stream = islice(stream, epoch_samples)
    yield from islice(stream, start, None)


def resampled_samples(urls, required, rng):
    """Endless: shards drawn with replacement. Raises if many draws in a row give nothing (every shard
    broken, or wrong URLs), instead of spinning forever."""
    fruitless = 0
    while True:
        fruitless += 1
        for s in refusing_other_versions(read_shard(urls[rng.integers(len(urls))], required)):
            fruitless = 0
            yield s
        if fruitless >= max(100, 10 * len(urls)):
            raise RuntimeError(f"no sample in the last {fruitless} shards drawn from {len(urls)} (all unreadable?), e.g. {urls[0]}")


def every_sample_once(urls, required, part, parts):
    """Sample i of the whole list (shards in order, positions counted whether or not a sample is
    complete, so every worker agrees) goes to part i % parts. A shard cut for some workers only (a
    dropped connection) shifts their count after it: a few samples seen twice or missed, next to that
    shard's warning."""
    offset = 0
    for url in urls:
        n = yield from refusing_other_versions(read_shard(url, required, keep=lambda i, o=offset: (o + i) % parts == part))
        offset += n


def shuffled(src, size, rng):
    """Yield src's items in random order, drawing each from a buffer of `size`."""
    buf = []
    for s in src:
        buf.append(s)
        if len(buf) >= size:
            i = rng.integers(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:                                           # src ended (evaluation): drain in random order
        i = rng.integers(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()

# -----------------------------------------------------------------------------
# epoch length


def shard_sizes(urls):
    """Samples per shard: from the manifest.json of the shard's folder when it lists the shard, else by
    reading the tar (local files: headers only; s3: the whole object, so keep the manifest next to
    the shards; other URLs such as pipe: are always read)."""
    manifests, sizes = {}, {}
    for url in urls:
        folder, name = posixpath.split(url)
        if folder not in manifests:
            m = read_manifest(folder or ".") if url.startswith("s3://") or not re.match(r"^\w+:", url) else None
            manifests[folder] = {k: v for s in (m or {}).get("splits", {}).values() for k, v in s["shards"].items()}
        if name in manifests[folder]:
            sizes[url] = manifests[folder][name]
        else:
            sizes[url] = count_samples(url)
    return sizes


def count_samples(url):
    """Samples in one shard, read_shard's return value (keeping none: no bytes copied)."""
    it = read_shard(url, keep=lambda i: False, warn=False)       # the read that follows reports damage
    try:
        while True:
            next(it)
    except StopIteration as stop:
        return stop.value


def epoch_length(urls, world_size, num_workers, batch_size):
    """Samples per (rank, worker) per epoch so that all ranks and workers together see about the dataset
    size: the total (shard_sizes) over world_size * num_workers, rounded down to whole batches (at least
    one) so a worker never ends an epoch on a partial batch."""
    urls = expand(urls) if isinstance(urls, str) else [str(u) for u in urls]
    total = sum(shard_sizes(urls).values())
    return max(1, total // (world_size * num_workers * batch_size)) * batch_size
