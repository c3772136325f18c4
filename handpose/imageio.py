"""Image decode and warp: the fast paths (simplejpeg, Pillow's C affine) in one place."""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from handpose.geometry import invert

JPEG_MAGIC = b"\xff\xd8"


def decode_jpeg(data: bytes, *, min_side: int = 0) -> np.ndarray:
    """Decode JPEG bytes to RGB uint8 (H, W, 3) with libjpeg-turbo (simplejpeg).

    Strict: a truncated or corrupt stream raises ValueError. `min_side` > 0 lets libjpeg
    downscale in the DCT domain (1/2, 1/4, 1/8) while keeping both sides >= min_side.
    """
    if data[:2] != JPEG_MAGIC:
        raise ValueError("not a JPEG (no SOI marker)")
    return simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=min_side, min_width=min_side, strict=True
    )


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG header without decoding the pixels."""
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    return w, h


def decode_image(data: bytes, *, min_side: int = 0) -> tuple[np.ndarray, float]:
    """Decode any image Pillow knows to RGB uint8, honouring EXIF rotation.

    Returns (image, scale): `scale` = the exact n/8 DCT scale (image pixels per source pixel),
    below 1 when the JPEG fast path downscaled in the DCT domain. Greyscale, palette, RGBA (alpha dropped) and
    16-bit images become 8-bit RGB. Raises ValueError for anything unreadable.
    """
    if data[:2] == JPEG_MAGIC:
        orientation = _exif_orientation(data)
        if orientation in (0, 1):
            img = decode_jpeg(data, min_side=min_side)
            return img, dct_scale(img.shape[1], jpeg_size(data)[0])
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _to_rgb8(ImageOps.exif_transpose(im)), 1.0
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from None


def dct_scale(decoded_width: int, width: int) -> float:
    """The exact DCT scale n/8 of a downscaled JPEG decode.

    libjpeg outputs ceil(width * n / 8) pixels, so decoded/width is only close (1001 px at 1/4
    decodes to 251, not 250.25) and would shift keypoints near the far edge.
    """
    for n in range(1, 17):
        if -(-width * n // 8) == decoded_width:
            return n / 8
    raise AssertionError(f"decoded width {decoded_width} is no n/8 scale of {width}")


def _exif_orientation(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 0


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.dtype != np.uint8:  # 16-bit RGB ("RGB;16") arrives as uint16
        arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def warp_affine(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """Warp RGB uint8 (H, W, 3) by M (source -> destination, 2x3) into size x size, bilinear,
    zero outside. Same sampling convention as geometry.py and DALI's warp_affine.
    """
    inv = invert(M)
    coeffs = tuple(float(v) for v in inv.reshape(-1))
    out = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(out)
