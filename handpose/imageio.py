"""Image decode and warp: the fast paths (simplejpeg, Pillow's C affine) in one place.

`warp_to_input` is THE preprocessing from image bytes and a source -> input matrix to the model's
input (`warp_image_to_input` the same for a decoded image): the WDS loader, predict's inference
path (handpose checkpoints, `inference.preprocess`) and `inspect` all call it, so the model
sees at predict time exactly what it was trained on (augmentation off). Shrinking is antialiased:
a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when the crop shrinks it at least
that much (libjpeg averages each 8x8 block: a box filter, and 2-6x less decoding), any other image
is box-reduced by the whole factor (Pillow's `reduce`), then one bilinear affine warp does the rest
at a scale between 1/2 and 1. A 3x3 matrix (a homography: `geometry.tilt_matrix`) takes the same
path, the factor chosen from its largest local scale over the output (`geometry.matrix_scale`), and
one bilinear perspective warp.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from handpose.geometry import compose, footprint, invert, is_homography, matrix_scale, scaling, translation

JPEG_MAGIC = b"\xff\xd8"
VIEW_MARGIN = 3  # reduced pixels kept around a warp's footprint (bilinear needs 1)
VIEW_FROM = 16  # cut the view out of images over 16x the output's area (below, finding it costs more)


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
            return pil_to_rgb(im), 1.0
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from None


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A Pillow image as RGB uint8 (H, W, 3) as displayed: EXIF rotation applied, greyscale,
    palette, alpha (over black) and 16-bit made 8-bit RGB, as `decode_image` decodes files."""
    return _to_rgb8(ImageOps.exif_transpose(im))


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
    """The EXIF orientation tag (1-8) of a JPEG, 1 when absent, 0 when the header is unreadable.

    Parsed from the APP1 segment directly: Pillow's header parse costs more per sample than the
    rest of the loader's bookkeeping.
    """
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before the pixels
            return 1
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1 if pos + 4 <= n or pos == n else 0


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 0
    ifd = int.from_bytes(tiff[4:8], order)  # type: ignore[arg-type]
    if ifd + 2 > len(tiff):
        return 0
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):  # type: ignore[arg-type]
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            return 0
        if int.from_bytes(entry[:2], order) == 0x0112:  # type: ignore[arg-type]
            value = int.from_bytes(entry[8:10], order)  # type: ignore[arg-type]
            return value if 1 <= value <= 8 else 1
    return 1


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header.

    The frame that labels, boxes and `warp_to_input` refer to. ValueError if unreadable.
    """
    if data[:2] == JPEG_MAGIC:
        try:
            w, h = jpeg_size(data)
        except ValueError:
            raise
        except Exception as e:  # simplejpeg raises its own types for bad headers
            raise ValueError(f"cannot read JPEG header: {e}") from None
        return (h, w) if _exif_orientation(data) in (5, 6, 7, 8) else (w, h)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def dct_factor(scale: float) -> float:
    """The coarsest JPEG DCT decode scale (1, 1/2, 1/4, 1/8) that still has at least one decoded
    pixel per output pixel for a warp of `scale` output pixels per source pixel."""
    for f in (0.125, 0.25, 0.5):
        if f >= scale:
            return f
    return 1.0


class DecodeCache:
    """Decoded images kept for the next crops of the same bytes: predict's detector input, each
    hand's crop and its refinement pass all cut the same photo, and a JPEG decode costs more than
    a crop. Keyed by the bytes (their hash, then compared) and the decode's scale; at most `limit`
    bytes of pixels, the least recently used dropped first; safe across threads. An entry is
    exactly what decoding again would give, so the cache changes no result."""

    def __init__(self, limit: int = 256 << 20):
        self.limit, self.size = limit, 0
        self._items: OrderedDict[tuple[int, int, int], tuple[bytes, tuple[np.ndarray, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def decode(
        self, data: bytes, min_side: int, make: Callable[[], tuple[np.ndarray, float]]
    ) -> tuple[np.ndarray, float]:
        """`make()`'s (image, scale) for these bytes at this `min_side`, from the cache when held."""
        key = (hash(data), len(data), min_side)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] == data:
                self._items.move_to_end(key)
                return hit[1]
        value = make()
        nbytes = value[0].nbytes
        if nbytes <= self.limit:
            value[0].flags.writeable = False  # shared by every crop of the image from now on
            with self._lock:
                if key not in self._items:
                    self._items[key] = (data, value)
                    self.size += nbytes
                while self.size > self.limit:
                    _, (_, (old, _)) = self._items.popitem(last=False)
                    self.size -= old.nbytes
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0


def decode_for_warp(
    data: bytes, M: np.ndarray, size: int | None = None, cache: DecodeCache | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode image bytes for a warp by M (source -> input, 2x3 or 3x3; a 3x3 needs the output
    `size`): (image, M') with M' mapping the returned, possibly smaller, image's pixels to the same
    destination; `cache` keeps the decoded pixels for later crops of the same bytes. See the
    module docstring."""
    orientation = _exif_orientation(data) if data[:2] == JPEG_MAGIC else 0
    if orientation == 1:
        w, h = jpeg_size(data)
        f = dct_factor(matrix_scale(M, size))
        min_side = math.ceil(min(w, h) * f) if f < 1 else 0

        def make() -> tuple[np.ndarray, float]:
            image = decode_jpeg(data, min_side=min_side)
            return image, dct_scale(image.shape[1], w)
    else:
        min_side = -1  # the full decode of any other image

        def make() -> tuple[np.ndarray, float]:
            return decode_image(data)

    image, f = cache.decode(data, min_side, make) if cache is not None else make()
    return _reduce_for_warp(image, compose(M, scaling(1.0 / f)) if f != 1.0 else M, size)


def _reduce_for_warp(image: np.ndarray, M: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The warp does not antialias: box-reduce the image by the whole factor M shrinks it by
    first (a 3x3 M: its largest local scale over the size x size output), and return (image, M')
    with M' mapping the reduced image to the same destination. Only the part of the image the
    output shows is copied and reduced (`_viewed`): a hand's crop of a large photo or video frame
    costs what the crop costs, and the output is the same to the bit."""
    r = max(1, int(1.0 / matrix_scale(M, size) + 1e-9))
    if size is not None and image.shape[0] * image.shape[1] > VIEW_FROM * size * size:
        image, M = _viewed(image, M, size, r)
    if r < 2:
        return image, M
    return np.asarray(Image.fromarray(image).reduce(r)), compose(M, scaling(float(r)))


def _viewed(image: np.ndarray, M: np.ndarray, size: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(the part of `image` the size x size output of M can sample, M moved to it). The part is
    the output's footprint grown by VIEW_MARGIN reduced pixels (the bilinear warp's support, with
    room to spare) and starts on a multiple of `r`, so that `reduce(r)` averages the same blocks
    as on the whole image; where it meets the image's edge, it is the edge. A view, no copy."""
    h, w = image.shape[:2]
    if is_homography(M):
        corners = np.array([[0.0, 0.0, 1.0], [size, 0.0, 1.0], [0.0, size, 1.0], [size, size, 1.0]])
        depth = corners @ invert(M)[2]
        if not (np.all(depth > 0) or np.all(depth < 0)):
            return image, M  # the horizon crosses the output: its corners do not bound what it shows
    x0, y0, x1, y1 = footprint(M, size)
    if not np.all(np.isfinite([x0, y0, x1, y1])):
        return image, M
    m = VIEW_MARGIN * r
    left = min(w, max(0, math.floor((x0 - m) / r) * r))
    top = min(h, max(0, math.floor((y0 - m) / r) * r))
    right = max(left, min(w, math.ceil((x1 + m) / r) * r))
    bottom = max(top, min(h, math.ceil((y1 + m) / r) * r))
    if (right - left == w and bottom - top == h) or right <= left or bottom <= top:
        return image, M  # all of it, or none of it (an all-black output: nothing to save)
    return image[top:bottom, left:right], compose(M, translation(float(left), float(top)))


def warp_to_input(data: bytes, M: np.ndarray, size: int, cache: DecodeCache | None = None) -> np.ndarray:
    """THE preprocessing: image bytes + source -> input matrix M (2x3 affine or 3x3 homography)
    -> uint8 (size, size, 3); `cache`: see `DecodeCache`."""
    return _warp(*decode_for_warp(data, M, size, cache), size)


def warp_image_to_input(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """The same preprocessing for an image already decoded (RGB uint8 (H, W, 3) as displayed):
    the box-reduce and warp of `warp_to_input`, without its JPEG DCT-domain shortcut."""
    return _warp(*_reduce_for_warp(np.ascontiguousarray(image), M, size), size)


def _warp(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """One bilinear warp by M: perspective for a homography, affine for a 2x3; a shift by whole
    pixels (a photo already at the input size, letterboxed) is a copy, which is exactly what the
    bilinear warp gives there (every sample on a pixel centre) at a fraction of its cost."""
    if is_homography(M):
        return warp_perspective(image, M, size)
    shift = _whole_pixel_shift(M)
    return _shifted(image, *shift, size) if shift is not None else warp_affine(image, M, size)


def _whole_pixel_shift(M: np.ndarray) -> tuple[int, int] | None:
    """(dx, dy) when the 2x3 M moves every pixel by whole pixels, else None."""
    M = np.asarray(M, np.float64)
    if not np.array_equal(M[:, :2], np.eye(2)):
        return None
    dx, dy = float(M[0, 2]), float(M[1, 2])
    return (int(dx), int(dy)) if dx.is_integer() and dy.is_integer() else None


def _shifted(image: np.ndarray, dx: int, dy: int, size: int) -> np.ndarray:
    """`image` moved by (dx, dy) whole pixels into a black size x size canvas."""
    out = np.zeros((size, size, 3), np.uint8)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, dx), max(0, dy), min(size, w + dx), min(size, h + dy)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = image[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return out


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


def warp_perspective(image: np.ndarray, H: np.ndarray, size: int) -> np.ndarray:
    """Warp RGB uint8 (H, W, 3) by the 3x3 homography H (source -> destination) into size x size,
    bilinear, zero outside: the projective twin of `warp_affine` (same pixel convention; Pillow's
    PERSPECTIVE transform, DALI's `fn.experimental.warp_perspective(pixel_origin="corner")`)."""
    inv = invert(H)
    coeffs = tuple(float(v) for v in (inv / inv[2, 2]).reshape(-1)[:8])
    out = Image.fromarray(image).transform(
        (size, size),
        Image.Transform.PERSPECTIVE,
        coeffs,
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(out)


def image_format(data: bytes) -> str:
    """The format of image bytes from their signature: 'JPEG', 'PNG', 'GIF', 'BMP', 'TIFF',
    'WebP', 'HEIF/AVIF', or 'unknown' (no decoding)."""
    if data[:2] == JPEG_MAGIC:
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\0", b"MM\0*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return "unknown"
