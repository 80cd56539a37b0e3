"""Dense optical flow between adjacent frames, and the camera motion to remove from it (Appendix A).

    flow = dense_flow(gray0, gray1)      # uint8 [H, W] x2 -> float32 [H, W, 2]: frame-0 pixel p moves to p + flow[p]
    H = camera_homography(flow, features(gray0), features(gray1))   # float64 [3, 3]: where the static
                                         # scene at p in frame 0 lands in frame 1

Flow is OpenCV's DIS (the choice and its accuracy/speed are measured in docs/benchmarks.md).
The camera is a homography fitted with RANSAC (OpenCV's USAC_FAST) to feature matches (ORB) together with flow
matches on a grid, as iDT does with SURF; moving objects are RANSAC's outliers. Flow is clamped
to +-MAX_FLOW px, the bound Appendix A stores flow with.
"""
import cv2
import numpy as np

MAX_FLOW = 20.0


def make_dis():
    """DIS ULTRAFAST with the finest scale at 1 (half resolution) and patches every 5 px there (the preset's
    4). On the synthetic ground truth it tracks with ~0.08 px median error per step, where the presets'
    finest scale 2 gives ~0.3 px and FAST/MEDIUM at scale 1 are no better but 2-4x slower; stride 5 is
    0.74x stride 4's time on real clips at the same median error (max over classes 0.196 against 0.188
    px; stride 6: 0.57x, max 0.239, too near the 0.25 bound), docs/benchmarks.md."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    dis.setFinestScale(1)
    dis.setPatchStride(5)
    return dis


def dense_flow(gray0, gray1, dis=None):
    """Flow from gray0 to gray1, float32 [H, W, 2] (dx, dy), clamped to +-MAX_FLOW."""
    flow = (dis or make_dis()).calc(gray0, gray1, None)
    return np.clip(flow, -MAX_FLOW, MAX_FLOW, out=flow)


_orb = None


def features(gray):
    """ORB keypoints and descriptors of a frame, found at half resolution (4x cheaper; the
    homography needs a few hundred well-spread matches, not precise corners): (xy float32 [K, 2], descriptors)."""
    global _orb
    if _orb is None:
        _orb = cv2.ORB_create(nfeatures=100, nlevels=1, edgeThreshold=15, patchSize=15, fastThreshold=10)
    small = cv2.resize(gray, (gray.shape[1] // 2, gray.shape[0] // 2), interpolation=cv2.INTER_AREA)
    kp, des = _orb.detectAndCompute(small, None)
    return np.float32([k.pt for k in kp]).reshape(-1, 2) * 2 + 0.5, des


def camera_homography(flow, feats0=None, feats1=None, step=None, method=cv2.USAC_FAST):
    """Homography of the static scene from frame 0 to frame 1, float64 [3, 3] (identity if it cannot be fit).

    Correspondences: flow on a `step`-px grid (default: ~10 points across the short side, a multiple
    of 8) plus, when given, the cross-checked matches of the two frames' `features`. The RANSAC
    threshold (0.5 px) is below the sub-pixel motions objects commonly have, so a slow object is an
    outlier rather than part of the camera. `method`: OpenCV's robust estimator (bench/extract_bench.py
    times plain cv2.RANSAC, used before, beside it).
    """
    h, w = flow.shape[:2]
    step = step or 8 * max(1, round(min(h, w) / 96))
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    src = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
    dst = src + flow[ys.ravel(), xs.ravel()]
    n_flow = len(src)
    if feats0 is not None and feats1 is not None and feats0[1] is not None and feats1[1] is not None:
        matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(feats0[1], feats1[1])
        if matches:
            src = np.concatenate([src, feats0[0][[m.queryIdx for m in matches]]])
            dst = np.concatenate([dst, feats1[0][[m.trainIdx for m in matches]]])
    if len(src) < 8:
        return np.eye(3)
    # USAC_FAST (OpenCV's LO-RANSAC) rather than plain RANSAC: on real video plain RANSAC ran its 500
    # iterations on most frames (about a third of the flow's time); USAC_FAST stops ~4x sooner with a consensus
    # as large, and the same error on the synthetic pans' ground truth (docs/benchmarks.md)
    H, inliers = cv2.findHomography(src, dst, method, ransacReprojThreshold=0.5, maxIters=500, confidence=0.995)
    # Too few inliers means no dominant static scene (or a failed fit): assume a still camera.
    if H is None or inliers.sum() < max(8, 0.2 * len(src)):
        return np.eye(3)
    # Refit on the flow matches RANSAC kept: keypoints sit on whole pixels (of the half-size frame),
    # too coarse for sub-pixel camera motion; they are there to make the consensus robust.
    keep = inliers[:n_flow, 0].astype(bool)
    if keep.sum() >= 8:
        H = cv2.findHomography(src[:n_flow][keep], dst[:n_flow][keep], 0)[0]
    return H
