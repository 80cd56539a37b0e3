"""HOG at sub-pixel points (mme/offline/hog.py) against an independent per-pixel reference and known orientations."""
import numpy as np
import pytest

from mme.offline import hog


def reference_hog(gray, x, y, cell):
    """Direct definition: Sobel gradients (numpy, reflect-101 border), hard 9-bin unsigned orientation,
    each pixel weighted by the area it shares with the cell x cell box centred on (x, y), / cell^2."""
    g = np.pad(gray.astype(np.int64), 1, mode="reflect")      # integers: exact zeros stay exact
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    h, w = gray.shape
    gx = sum(kx[i, j] * g[i:i + h, j:j + w] for i in range(3) for j in range(3)) / (255 * 8)
    gy = sum(kx.T[i, j] * g[i:i + h, j:j + w] for i in range(3) for j in range(3)) / (255 * 8)
    mag = np.hypot(gx, gy)
    bins = np.floor(np.mod(np.arctan2(gy, gx), np.pi) / (np.pi / 9)).astype(int) % 9
    out = np.zeros((len(x), 9))
    for n, (px, py) in enumerate(zip(x, y)):
        cols, rows = np.arange(w), np.arange(h)
        wx = np.clip(np.minimum(px + cell / 2, cols + 0.5) - np.maximum(px - cell / 2, cols - 0.5), 0, None)
        wy = np.clip(np.minimum(py + cell / 2, rows + 0.5) - np.maximum(py - cell / 2, rows - 0.5), 0, None)
        area = wy[:, None] * wx[None, :] * mag
        out[n] = np.bincount(bins.ravel(), area.ravel(), minlength=9)
    return out / cell ** 2


def test_matches_reference_at_subpixel_points():
    rng = np.random.default_rng(0)
    gray = (rng.random((48, 64)) * 255).astype(np.uint8)
    x = rng.uniform(-2, 65, 200).astype(np.float32)         # includes boxes clipped by the border
    y = rng.uniform(-2, 49, 200).astype(np.float32)
    ours = hog.hog_at(hog.gradient_bins(gray), x, y, cell=8)
    ref = reference_hog(gray, x, y, 8)
    # exact up to float rounding (cartToPolar's ~0.3 deg angle could flip a pixel on a bin edge)
    err = np.abs(ours - ref).sum(1) / ref.sum(1)
    assert np.median(err) < 1e-4 and err.max() < 1e-3, (np.median(err), err.max())
    # a plain shift of the box by half a pixel changes descriptors far more than that
    shifted = reference_hog(gray, x + 0.5, y, 8)
    assert np.median(np.abs(shifted - ref).sum(1) / ref.sum(1)) > 0.05


@pytest.mark.parametrize("deg", [10, 30, 50, 70, 90, 110, 130, 150, 170])
def test_stripes_land_in_their_orientation_bin(deg):
    phi = np.deg2rad(deg)                                   # gradient direction of the stripes
    yy, xx = np.mgrid[0:64, 0:64]
    gray = (127 + 100 * np.sin(0.5 * (xx * np.cos(phi) + yy * np.sin(phi)))).astype(np.uint8)
    h = hog.hog_at(hog.gradient_bins(gray), np.float32([32.3]), np.float32([31.7]), cell=16)[0]
    assert h.argmax() == deg // 20
    assert h[deg // 20] / h.sum() > 0.9


def test_horizontal_flip_reverses_bins():
    rng = np.random.default_rng(1)
    gray = (rng.random((40, 56)) * 255).astype(np.uint8)
    x = rng.uniform(4, 51, 50).astype(np.float32)
    y = rng.uniform(4, 35, 50).astype(np.float32)
    h = hog.hog_at(hog.gradient_bins(gray), x, y)
    hf = hog.hog_at(hog.gradient_bins(gray[:, ::-1].copy()), 55 - x, y)
    err = np.abs(hf - h[:, ::-1]).sum(1) / h.sum(1)
    assert np.median(err) < 0.02, np.median(err)
    assert np.median(np.abs(hf - h).sum(1) / h.sum(1)) > 0.3     # not reversing would be wrong


def test_flat_image_has_zero_hog():
    gray = np.full((32, 32), 77, np.uint8)
    assert np.all(hog.hog_at(hog.gradient_bins(gray), np.float32([10.5]), np.float32([20.25])) == 0)
