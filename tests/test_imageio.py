"""imageio's speed paths change no pixel: the cut-out view of a large image and the decode cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from handpose import imageio
from handpose.geometry import compose, crop_matrix, matrix_scale, scaling


def _whole_image_warp(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """The warp as it was before views: box-reduce the WHOLE image, then warp (the reference)."""
    r = int(1.0 / matrix_scale(M, size) + 1e-9)
    if r >= 2:
        image, M = np.asarray(Image.fromarray(image).reduce(r)), compose(M, scaling(float(r)))
    return imageio._warp(image, M, size)


def _random_matrix(rng: np.random.Generator, w: int, h: int, size: int) -> np.ndarray:
    side = float(rng.uniform(4, 1.5 * max(w, h)))
    cx, cy = float(rng.uniform(-0.3 * w, 1.3 * w)), float(rng.uniform(-0.3 * h, 1.3 * h))
    M = crop_matrix((cx, cy, side), size, angle_deg=float(rng.choice([0.0, rng.uniform(-180, 180)])))
    if rng.random() < 0.25:  # a homography, as the tilt augmentation makes
        H, P = np.eye(3), np.eye(3)
        H[:2], P[2, :2] = M, rng.normal(0, 0.002, 2)
        M = P @ H
    return M


def test_a_crop_of_a_large_image_is_the_whole_image_warp_to_the_bit() -> None:
    """Hands small and large, inside, across the edge and off the image, turned or tilted: the
    view-then-reduce path gives exactly the reduce-everything path's pixels."""
    rng = np.random.default_rng(0)
    viewed = 0
    for _ in range(400):
        w, h = (int(v) for v in rng.integers(200, 900, 2))
        size = int(rng.choice([32, 64, 96]))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        M = _random_matrix(rng, w, h, size)
        r = max(1, int(1.0 / matrix_scale(M, size) + 1e-9))
        viewed += imageio._viewed(image, M, size, r)[0].shape != image.shape
        np.testing.assert_array_equal(
            imageio.warp_image_to_input(image, M, size), _whole_image_warp(image, M, size)
        )
    assert viewed > 100  # the view path was taken, not only the whole-image fallback


def test_the_view_starts_on_the_reduce_grid_and_covers_the_footprint() -> None:
    image = np.zeros((720, 1280, 3), np.uint8)
    M = crop_matrix((641.3, 377.9, 201.7), 96)
    r = int(1.0 / matrix_scale(M, 96))
    view, M2 = imageio._viewed(image, M, 96, r)
    left, top = (M2[0, 2] - M[0, 2]) / M[0, 0], (M2[1, 2] - M[1, 2]) / M[1, 1]  # M2 = M after a shift
    assert r == 2 and view.base is image  # a view, no copy
    assert left > 0 and top > 0 and round(left) % r == 0 and round(top) % r == 0
    assert view.shape[1] < 300 and view.shape[0] < 300  # about the crop, not the frame


def _jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_the_decode_cache_gives_what_decoding_gives_and_decodes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jpeg(1)
    calls = []
    real = imageio.decode_jpeg
    monkeypatch.setattr(imageio, "decode_jpeg", lambda d, **kw: calls.append(kw) or real(d, **kw))
    cache = imageio.DecodeCache()
    matrices = [crop_matrix((160, 120, s), 64) for s in (100, 110, 300, 305)]  # two scales, twice each
    for M in matrices:
        np.testing.assert_array_equal(
            imageio.warp_to_input(data, M, 64, cache), imageio.warp_to_input(data, M, 64)
        )
    uncached = len(matrices)
    assert len(calls) == uncached + 2  # the cached calls decoded once per DCT scale
    # Other bytes are another entry, even at the same length and scale.
    other = _jpeg(2)
    np.testing.assert_array_equal(
        imageio.warp_to_input(other, matrices[0], 64, cache), imageio.warp_to_input(other, matrices[0], 64)
    )


def test_the_decode_cache_keeps_its_limit_and_shares_read_only_pixels() -> None:
    one = 320 * 240 * 3
    cache = imageio.DecodeCache(limit=2 * one)
    for seed in range(4):
        data = _jpeg(seed)
        image, _ = cache.decode(data, 0, lambda d=data: imageio.decode_image(d))
        assert not image.flags.writeable
        assert cache.size <= cache.limit
    assert cache.size == 2 * one  # the two most recent
    cache.clear()
    assert cache.size == 0
