"""Histograms of oriented gradients at arbitrary sub-pixel points: the shape part of eq. 5.

HOG(p) of a grayscale frame at a point p = (x, y) is the mean gradient magnitude per orientation
bin over the `cell` x `cell` box centred on p (area-weighted at sub-pixel positions, so the
descriptor moves smoothly with the tracked point). 9 unsigned orientation bins over [0, 180)
degrees, bin k holding orientations [20k, 20k + 20), each gradient voting its magnitude into its
bin (MaskFeat's recipe, which the paper follows). Gradients are 3x3 Sobel (as MaskFeat and the
authors' code) scaled to intensity per pixel, on intensities in [0, 1]. With these bin edges a
horizontal flip (theta -> 180 - theta) is exactly the reversal of the 9 bins.

    maps = orientation_integral(gray)          # gray: uint8 [H, W]  ->  float32 [H+1, W+1, 9]
    h = hog_at(maps, x, y, cell=8)             # x, y: float [N]     ->  float32 [N, 9]
"""
import cv2
import numpy as np

BINS = 9


def gradients(gray):
    """Sobel gradients of a uint8 [H, W] frame, in intensity (0..1) per pixel: float32 (gx, gy)."""
    g = gray.astype(np.float32) * (1 / (255 * 8))                  # the 3x3 Sobel kernel weighs a unit slope 8x
    return cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)


def orientation_maps(gray):
    """Gradient magnitude binned by unsigned orientation: float32 [H, W, BINS] (one non-zero per pixel)."""
    gx, gy = gradients(gray)
    mag, ang = cv2.cartToPolar(gx, gy)                             # ang in [0, 2pi)
    bins = (ang * np.float32(BINS / np.pi)).astype(np.int32) % BINS  # unsigned: theta and theta + pi share a bin
    h, w = gray.shape
    maps = np.zeros(h * w * BINS, np.float32)
    maps[np.arange(0, h * w * BINS, BINS, dtype=np.int32) + bins.ravel()] = mag.ravel()   # flat scatter: fastest
    return maps.reshape(h, w, BINS)


def orientation_integral(gray):
    """Integral image of orientation_maps: float32 [H+1, W+1, BINS], entry [i, j] = sum over pixels
    [:i, :j]. Pixel k covers [k - 0.5, k + 0.5], so the integral up to coordinate x sits at x + 0.5."""
    return cv2.integral(orientation_maps(gray), sdepth=cv2.CV_32F)


def hog_at(integral, x, y, cell=8):
    """HOG at points (x, y): float32 [N, BINS], the mean of the binned magnitudes over the box
    [x - cell/2, x + cell/2] x [y - cell/2, y + cell/2] (clipped to the frame), exact at sub-pixel
    positions because the integral image is bilinear between its samples."""
    hp, wp = integral.shape[:2]
    half = cell / 2
    x0 = np.clip(np.asarray(x, np.float32) - half + 0.5, 0, wp - 1)
    x1 = np.clip(np.asarray(x, np.float32) + half + 0.5, 0, wp - 1)
    y0 = np.clip(np.asarray(y, np.float32) - half + 0.5, 0, hp - 1)
    y1 = np.clip(np.asarray(y, np.float32) + half + 0.5, 0, hp - 1)

    def at(xs, ys):
        # [N, BINS] bilinear samples of the integral image; map shape [1, N]
        return cv2.remap(integral, xs[None], ys[None], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]

    total = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    return total * (1 / (cell * cell))
