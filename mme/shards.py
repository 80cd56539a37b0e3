"""The shard schema (docs/shards.md), version SCHEMA_VERSION: the contract between extract.py and the loader.

A shard is a WebDataset tar; a sample is one clip window of a video, keyed `<video key>_w<k>`:

    frames.jpg      the T sampled frames stacked vertically: one JPEG of [T*H, W, 3] (H, W multiples of 16)
    disp.npy.zst    int8  [T/2, H/g, W/g, L, 2]  per-step (dx, dy) px, camera removed, from each tubelet's
                    first frame, in a fixed-point code (decode_disp: 1/16 px to 3.75 px, 1/4 px to 20.5 px)
    hog.npy.zst     uint8 [T/2, H/g, W/g, L, 9]  trajectory-aligned HOG, 5-bit log code 0..31 (decode_hog)
    valid.npy.zst   bool  [T/2, H/g, W/g]        eq. 7: the track stayed in the frame (and in the video)
    cls             class index as text, "-1" when unknown
    json            metadata: source video, frame indices, fps, sizes, label name, extractor params, schema

The .npy.zst members are .npy files compressed with Zstandard (a frame each). Older versions are still read
(READABLE): version 2 (the same members, a 6-bit HOG code, JPEG quality 90) and version 1 (float16 disp.npy,
8-bit hog.npy, plain .npy members); anything else is refused. Every version's codes are looked up in its own
tables (tables(version)), so a loader handles them alike.

    sample = encode(key, frames, traj, label, meta)   # -> dict for webdataset.TarWriter
    clip = decode(sample)                             # -> dict of numpy arrays (the reference decoder)
    clip = decode_sample(sample)                      # the same, after parse's checks: for plain WebDataset,
                                                      # webdataset.WebDataset(urls).map(mme.shards.decode_sample)

Writing shards to disk (atomically, resumably) and their manifests: mme.offline.writer.
"""
import io
import json

import cv2
import numpy as np
import zstandard

SCHEMA_VERSION = 3
READABLE = (1, 2, 3)  # versions the loader reads: older shards without re-extraction
# Frames: JPEG quality 85 with optimised Huffman tables (lossless, -1.5 %): on real camera clips 39.6 dB PSNR
# against quality 90's 40.9, a fifth fewer bytes (docs/shards.md, issue #27). OpenCV's default chroma is 4:2:0.
JPEG_QUALITY = 85
ZSTD_LEVEL = 9        # compression level of the .npy.zst members (decoding speed is the same at any level;
                      # level 19 saves 5-10 % more at 10-15x the encoding time, docs/shards.md)

# HOG (eq. 5): mean Sobel magnitude per bin, intensity/px, log-companded (mu-law) into HOG_CODES + 1 levels
# from 0 to HOG_MAX (larger values clip), ~linear below the knee, ~logarithmic above it. Version 3's 5-bit
# code moves the float HOG by 0.07 of its std rms on real clips (version 2's 6-bit: 0.036), docs/shards.md.
HOG_MAX = 0.25
HOG_KNEE = {1: 1e-3, 2: 1e-2, 3: 1e-2}
HOG_CODES = {1: 255, 2: 63, 3: 31}


def _hog_table(version):
    top, knee = HOG_CODES[version], HOG_KNEE[version]
    codes = np.minimum(np.arange(256), top)            # bytes past the top code (a damaged file) read as HOG_MAX
    return (knee * np.expm1(codes * (np.log1p(HOG_MAX / knee) / top))).astype(np.float32)


HOG_TABLES = {v: _hog_table(v) for v in READABLE}
HOG_TABLE = HOG_TABLES[SCHEMA_VERSION]                 # the table of what encode_hog writes


def encode_hog(hog, version=SCHEMA_VERSION):
    """float HOG -> uint8 codes 0..HOG_CODES[version]."""
    top, knee = HOG_CODES[version], HOG_KNEE[version]
    q = np.log1p(np.clip(hog, 0, HOG_MAX) / knee) * (top / np.log1p(HOG_MAX / knee))
    return np.round(q).astype(np.uint8)


def decode_hog(q, version=SCHEMA_VERSION):
    """uint8 codes -> float32 HOG, by table (8x faster than expm1 per element)."""
    return HOG_TABLES[version][q]


# Displacements (versions 2 and 3): int8 fixed point, 1/16 px steps up to DISP_KNEE codes (3.75 px), then 1/4 px
# steps up to code 127 (20.5 px), which covers every displacement the tracker makes (mme.flow.MAX_FLOW, 20 px):
# nothing saturates. Error added: at most 1/32 px per coordinate below 3.75 px, 1/8 px above.
DISP_FINE, DISP_COARSE, DISP_KNEE = 16, 4, 60


def encode_disp(disp):
    """float px -> int8 codes (see DISP_FINE); values past 20.5 px (none from mme.trajectory) saturate."""
    a = np.abs(np.asarray(disp, np.float32))
    knee = DISP_KNEE / DISP_FINE
    q = np.where(a <= knee, np.round(a * DISP_FINE), DISP_KNEE + np.round((a - knee) * DISP_COARSE))
    return (np.sign(disp) * np.minimum(q, 127)).astype(np.int8)


def _disp_table():
    q = np.arange(256).astype(np.uint8).view(np.int8).astype(np.float64)    # table index: the code's byte
    a = np.abs(q)
    v = np.where(a <= DISP_KNEE, a / DISP_FINE, DISP_KNEE / DISP_FINE + (a - DISP_KNEE) / DISP_COARSE)
    return (np.sign(q) * v).astype(np.float32)


DISP_TABLE = _disp_table()                             # indexed by the code's byte (uint8 view of the int8)


def decode_disp(q):
    """int8 codes (or their uint8 view) -> float32 px, by table."""
    return DISP_TABLE[np.asarray(q).view(np.uint8)]


def tables(version):
    """(disp table, HOG table) a loader looks the stored codes up in: disp None where it is stored as
    float16 (version 1)."""
    return (DISP_TABLE if version >= 2 else None), HOG_TABLES[version]


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b):
    return np.load(io.BytesIO(b), allow_pickle=False)


def zst(b):
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b)


def unzst(b, limit):
    """Decompress one zstd frame of at most `limit` bytes (a damaged or hostile member cannot blow up memory)."""
    size = zstandard.frame_content_size(b)
    if size > limit:
        raise ValueError(f"says it holds {size} bytes, more than the schema's {limit}")
    return _DECOMPRESSOR.decompress(b, max_output_size=limit)


_DECOMPRESSOR = zstandard.ZstdDecompressor()


TRACKS = {1: ("disp.npy", "hog.npy", "valid.npy"), 2: ("disp.npy.zst", "hog.npy.zst", "valid.npy.zst"),
          3: ("disp.npy.zst", "hog.npy.zst", "valid.npy.zst")}


def encode(key, frames, disp, hog, valid, label, meta, quality=JPEG_QUALITY):
    """One sample (of meta["schema"], SCHEMA_VERSION unless a test writes an older one). frames uint8
    [T, H, W, 3] RGB; disp/hog/valid as trajectories() returns them for the T/2 tubelet starts (float).
    Raises ValueError for an object array (shards hold numbers, never pickles)."""
    for name, a in (("frames", frames), ("disp", disp), ("hog", hog), ("valid", valid)):
        if np.asarray(a).dtype.hasobject:
            raise ValueError(f"{name}: an object array; a shard stores numeric arrays only (np.save would pickle it)")
    T, H, W, _ = frames.shape
    version = meta.get("schema", SCHEMA_VERSION)
    version = version if version in READABLE else SCHEMA_VERSION    # (tests label samples with unknown versions)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(frames.reshape(T * H, W, 3), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, int(version >= 3)])
    assert ok, "JPEG encoding failed"
    if version == 1:
        arrays = (disp.astype(np.float16), encode_hog(hog, 1), valid.astype(bool))
        tracks = dict(zip(TRACKS[1], map(npy_bytes, arrays)))
    else:
        arrays = (encode_disp(disp), encode_hog(hog, version), valid.astype(bool))
        tracks = {name: zst(npy_bytes(a)) for name, a in zip(TRACKS[version], arrays)}
    return {"__key__": key, "frames.jpg": jpg.tobytes(), **tracks,
            "cls": str(int(label)).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


COMPONENTS = ("frames.jpg", *TRACKS[SCHEMA_VERSION], "cls", "json")


def components(version):
    return ("frames.jpg", *TRACKS[version], "cls", "json")


def refusal(version):
    """The one line for shards of a version this code does not read."""
    known = ", ".join(map(str, READABLE[:-1])) + f" and {READABLE[-1]}"
    return f"shard schema {version!r}, this code reads {known}: re-extract with extract.py"


def decode(sample):
    """Reference decoder of one raw sample (dict of bytes, as a tar yields it) into numpy arrays:
    frames uint8 [T, H, W, 3] RGB, disp float32, hog float32, valid bool, label int, meta dict."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    version = meta.get("schema")
    missing = [c for c in components(version if version in READABLE else SCHEMA_VERSION) if c not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')}: missing {', '.join(missing)}")
    if version not in READABLE:
        raise ValueError(f"sample {sample.get('__key__')}: {refusal(version)}")
    disp, hog, valid = (npy_load(unzst(sample[n], 1 << 30) if n.endswith(".zst") else sample[n]) for n in TRACKS[version])
    return _decoded(sample, meta, int(sample["cls"]), disp, hog, valid)


def decode_sample(sample):
    """One raw sample as plain WebDataset yields it (keys __key__, __url__, frames.jpg, disp.npy.zst or
    schema 1's disp.npy, hog..., valid..., cls, json; values bytes) -> the arrays decode gives, after
    parse's checks: a sample that breaks the schema raises ValueError naming the sample and the component
    (bounded decompression, no pickles). Reading our shards without this package's loader:

        webdataset.WebDataset(urls).map(mme.shards.decode_sample)

    (WebDataset's map adds "__key__", the same as "key", to each dict; handler=webdataset.warn_and_continue
    skips bad samples.)
    """
    try:
        meta, label, disp, hog, valid = parse(sample)
    except ValueError as e:
        raise ValueError(f"sample {sample.get('__key__')}: {e}") from None
    return _decoded(sample, meta, label, disp, hog, valid)


def _decoded(sample, meta, label, disp, hog, valid):
    """decode's dict from a sample's checked parts: the JPEG decoded, the stored codes looked up."""
    disp_table, hog_table = tables(meta["schema"])
    tile = cv2.imdecode(np.frombuffer(sample["frames.jpg"], np.uint8), cv2.IMREAD_COLOR)
    T = meta["num_frames"]
    if tile is None or tile.shape[0] % T:
        raise ValueError(f"sample {sample['__key__']}: frames.jpg does not decode to {T} stacked frames")
    frames = cv2.cvtColor(tile, cv2.COLOR_BGR2RGB).reshape(T, tile.shape[0] // T, tile.shape[1], 3)
    return {
        "key": sample["__key__"], "frames": frames,
        "disp": disp.astype(np.float32) if disp_table is None else decode_disp(disp),
        "hog": hog_table[hog], "valid": valid,
        "label": label, "meta": meta,
    }


def parse(sample, tracks=True):
    """Check one raw sample against the schema (a version in READABLE) and parse what the loader reads:
    (meta, label, disp, hog, valid), the arrays as stored, their codes looked up in tables(meta["schema"])
    (versions 2 and 3: disp uint8, the bytes of the int8 codes; hog uint8 codes; valid bool. Version 1: disp
    float16, hog uint8 codes; None unless `tracks`). The JPEG is left to the decoder. Raises ValueError
    naming the component and what is wrong: one bad sample in a million is skipped by the loader with
    that line, not a crash."""
    for c in ("json", "frames.jpg", "cls"):
        if c not in sample:
            raise ValueError(f"missing {c}")
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError(f"a {type(meta).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"json: not a JSON object ({' '.join(str(e).split())})") from None
    version = meta.get("schema")
    if version not in READABLE:
        raise ValueError(f"json: {refusal(version)}")
    missing = [c for c in TRACKS[version] if c not in sample] if tracks else []
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    p, size, T = meta.get("params"), meta.get("size"), meta.get("num_frames")
    if not (_whole(T) and T > 0 and T % 2 == 0 and isinstance(p, dict) and all(_whole(p.get(k)) and p[k] > 0 for k in
            ("grid", "length", "stride")) and isinstance(size, list) and len(size) == 2
            and all(_whole(x) and x > 0 and x % 16 == 0 and x % p["grid"] == 0 for x in size)):
        raise ValueError("json: num_frames (even), size [W, H] (multiples of 16 and of the grid) and params "
                         "grid, length, stride (positive) are required")
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"cls: {bytes(sample['cls'][:20])!r} is not a class index") from None
    if label < -1:
        raise ValueError(f"cls: {label} is not a class index (-1 = unknown)")
    if not tracks:
        return meta, label, None, None, None
    (w, h), g, L = size, p["grid"], p["length"]
    grid = (T // 2, h // g, w // g)
    dtypes = (np.float16, np.uint8, np.bool_) if version == 1 else (np.int8, np.uint8, np.bool_)
    disp, hog, valid = [_array(sample, name, dtype, grid + tail) for name, dtype, tail in
                        zip(TRACKS[version], dtypes, ((L, 2), (L, 9), ()))]
    return meta, label, (disp.view(np.uint8) if version > 1 else disp), hog, valid


def _whole(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _array(sample, name, dtype, shape):
    try:
        b = sample[name]
        if name.endswith(".zst"):                        # the .npy inside: 128-byte header + the array
            b = unzst(b, 4096 + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        a = npy_load(b)
    except Exception as e:                               # garbage, a pickle (object dtype), a cut file
        raise ValueError(f"{name}: not a NumPy array file ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if a.dtype != dtype or a.shape != shape:
        raise ValueError(f"{name}: {a.dtype} {list(a.shape)}, the schema says {np.dtype(dtype)} {list(shape)}")
    return a
