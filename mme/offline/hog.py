"""Histograms of oriented gradients at arbitrary sub-pixel points: the shape part of eq. 5.

HOG(p) of a grayscale frame at a point p = (x, y) is the mean gradient magnitude per orientation
bin over the `cell` x `cell` box centred on p, each pixel weighted by the area of its square inside
the box, so the descriptor moves smoothly with a sub-pixel tracked point. 9 unsigned orientation bins over [0, 180)
degrees, bin k holding orientations [20k, 20k + 20), each gradient voting its magnitude into its
bin (MaskFeat's recipe, which the paper follows). Gradients are 3x3 Sobel (as MaskFeat and the
authors' code) scaled to intensity per pixel, on intensities in [0, 1]. With these bin edges a
horizontal flip (theta -> 180 - theta) is exactly the reversal of the 9 bins.

    grads = gradient_bins(gray)                # gray: uint8 [H, W]  ->  (magnitude, bin) [H, W] each
    h = hog_at(grads, x, y, cell=8)            # x, y: float [N]     ->  float32 [N, 9]
"""
import cv2
import numpy as np

BINS = 9


def gradients(gray):
    """Sobel gradients of a uint8 [H, W] frame, in intensity (0..1) per pixel: float32 (gx, gy)."""
    g = gray.astype(np.float32) * (1 / (255 * 8))                  # the 3x3 Sobel kernel weighs a unit slope 8x
    return cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)


def gradient_bins(gray):
    """Per-pixel gradient magnitude float32 [H, W] and unsigned orientation bin int32 [H, W]."""
    gx, gy = gradients(gray)
    mag, ang = cv2.cartToPolar(gx, gy)                               # ang in [0, 2pi)
    bins = (ang * np.float32(BINS / np.pi)).astype(np.int32) % BINS   # unsigned: theta and theta + pi share a bin
    return mag, bins


def _box_weights(p, half, cell, size):
    """Pixels [N, cell+1] a box [p - half, p + half] touches along one axis, and the length of each
    pixel's square [c - 0.5, c + 0.5] inside the box (0 for pixels off the frame)."""
    first = np.floor(p - half + 0.5).astype(np.int32)
    pix = first[:, None] + np.arange(cell + 1, dtype=np.int32)
    centre = pix.astype(np.float32)
    wt = np.minimum(p[:, None] + half, centre + 0.5) - np.maximum(p[:, None] - half, centre - 0.5)
    wt[(pix < 0) | (pix >= size)] = 0
    return np.clip(pix, 0, size - 1), np.clip(wt, 0, 1, out=wt)


def hog_at(grads, x, y, cell=8):
    """HOG at points (x, y): float32 [N, BINS], the area-weighted mean of the binned magnitudes over the
    box [x - cell/2, x + cell/2] x [y - cell/2, y + cell/2] (off-frame parts count as zero).

    grads: gradient_bins(gray) of the frame. Only the (cell+1)^2 pixels each box touches are read,
    so the cost follows the number of points, not the frame size.
    """
    mag, bins = grads
    h, w = mag.shape
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    cols, wx = _box_weights(x, cell / 2, cell, w)
    rows, wy = _box_weights(y, cell / 2, cell, h)
    pix = rows[:, :, None] * w + cols[:, None, :]                     # [N, cell+1, cell+1] flat pixel index
    weight = (wy[:, :, None] * wx[:, None, :]) * mag.ravel()[pix]
    slot = np.arange(0, len(x) * BINS, BINS, dtype=np.int32)[:, None, None] + bins.ravel()[pix]
    out = np.bincount(slot.ravel(), weight.ravel(), minlength=len(x) * BINS)
    return (out / (cell * cell)).astype(np.float32).reshape(len(x), BINS)
