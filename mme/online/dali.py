"""The loader's GPU backend: NVIDIA DALI decodes the JPEG tiles (nvJPEG, "mixed") and applies the crop,
resize and flip that mme.online.transforms applies on CPU, to the frames and the trajectory maps alike;
tests hold the two equal. DALI is imported only inside these functions (requirements-gpu.txt).

    pipe = pipeline(recipe, batch, device, schema)     # built once per loader
    video, disp, hog, valid = run(pipe, items, recipe, device)   # prepared samples (mme.online.data.prepare)
    # video uint8 [B, T, S, S, 3]; disp [B, T/2, S/8, S/8, L, 2], hog [..., L, 9], valid bool [B, T/2, S/8, S/8]
"""
import numpy as np
import torch

from mme import shards
from mme.online import transforms

GRID = 8                            # px between trajectories, in the shards and at the output


def pipeline(recipe, batch, device, schema=shards.SCHEMA_VERSION):
    """DALI graph: JPEG tile -> frames -> crop/resize/flip (uint8); trajectory maps -> the same
    crop/resize/flip in grid coordinates (mme.online.transforms.crop_maps's mapping: ROI shifted by half a
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
        tile = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        frames = fn.reshape(tile, shape=shape, layout="FHWC")
        video = fn.resize(frames, roi_start=roi_start, roi_end=roi_end, size=[size, size], antialias=True,
                          interp_type=types.INTERP_LINEAR)               # uint8 [T, S, S, 3], as PIL's for VideoMAE
        if recipe["target"] != "mme":
            pipe.set_outputs(video)
            pipe.build()
            return pipe
        map_start = fn.external_source(name="map_start", dtype=types.FLOAT)
        map_end = fn.external_source(name="map_end", dtype=types.FLOAT)
        disp_table, hog_table = shards.tables(schema)
        disp = fn.external_source(name="disp", dtype=types.FLOAT16 if disp_table is None else types.UINT8, layout="FHWC")
        hog = fn.external_source(name="hog", dtype=types.UINT8, layout="FHWC")
        valid = fn.external_source(name="valid", dtype=types.UINT8, layout="FHWC")
        # undo the codes before resampling, by table: exp() per element costs more than the resize
        codes = list(range(256))
        disp = disp.gpu() if gpu else disp
        disp = fn.cast(disp, dtype=types.FLOAT) if disp_table is None else \
            fn.lookup_table(disp, keys=codes, values=disp_table.tolist(), dtype=types.FLOAT)
        hog = fn.lookup_table(hog.gpu() if gpu else hog, keys=codes, values=hog_table.tolist(), dtype=types.FLOAT)
        valid = fn.cast(valid.gpu() if gpu else valid, dtype=types.FLOAT)
        maps = []
        for m in (disp, hog, valid):
            m = fn.resize(m, roi_start=map_start, roi_end=map_end, size=[out_grid, out_grid], antialias=False,
                          interp_type=types.INTERP_LINEAR)
            maps.append(m)
        pipe.set_outputs(video, *maps)
    pipe.build()
    pipe.mme_schema = schema
    return pipe


def run(pipe, items, recipe, device):
    """One batch of prepared samples through the pipeline -> what Loader.decode returns."""
    tracks = recipe["target"] == "mme"
    feed = {"jpg": [it["jpg"] for it in items], "shape": [it["shape"] for it in items]}
    if tracks and {it["schema"] for it in items} != {pipe.mme_schema}:
        raise ValueError(f"shards of schema versions {sorted({it['schema'] for it in items} | {pipe.mme_schema})} mixed "
                         "in one run of the DALI backend: re-extract the older ones, or use backend torch")
    if tracks:
        feed.update(disp=[_fhwc(it["disp"]) for it in items], hog=[_fhwc(it["hog"]) for it in items],
                    valid=[it["valid"].astype(np.uint8)[..., None] for it in items])
    for name, shift, scale in (("roi", 0.0, 1), ("map", -0.5, GRID))[:2 if tracks else 1]:   # frames in px, maps in grid steps
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
    outs = pipe.run()
    video = _to_torch(outs[0], device, torch.uint8)
    if not tracks:
        return video, None, None, None
    disp, hog, valid = (_to_torch(o, device, torch.float32) for o in outs[1:])
    Tp, n = valid.shape[1], valid.shape[2]
    L = recipe["trajectory_length"]
    finished = [transforms.finish_tracks(disp[i].view(Tp, n, n, L, 2), hog[i].view(Tp, n, n, L, transforms.BINS),
                                         valid[i, ..., 0], tuple(int(x) for x in it["box"]), recipe["input_size"],
                                         bool(it["flip"])) for i, it in enumerate(items)]
    return (video, *(torch.stack(x) for x in zip(*finished)))


def _fhwc(a):
    """[T', gh, gw, L, C] -> [T', gh, gw, L*C]: DALI resizes channels-last maps."""
    return np.ascontiguousarray(a.reshape(*a.shape[:3], -1))


def _to_torch(out, device, dtype):
    """A DALI output (uniform shape) copied into a torch tensor of its own on `device`: DALI reuses its
    buffers at the next run. feed_ndarray is DALI's documented copy for both devices."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    t = out.as_tensor()
    arr = torch.empty(t.shape(), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(t, arr, cuda_stream=stream)
