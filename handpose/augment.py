"""Per-sample augmentation parameters and the colour jitter, shared by the WDS and DALI loaders.

Geometry is NOT defined here: `params_matrix` hands the sampled angle/scale/shift/flip/aspect/tilt
and the crop region to `geometry.crop_matrix`, the one home of the source -> model-input matrix.

After the warp, on the uint8 model input: an optional Gaussian blur (`blur_sigma` px, 0 = none)
and one optional occluding rectangle (`occluder`) of a flat grey or, with `occluder_patch`, a
copy of another rectangle of the same model input (an object of the same photo); then the colour.

Colour, on RGB values in [0, 255] after the warp (the same definition DALI's per-channel multiply,
`fn.hsv` and `fn.brightness_contrast(contrast_center=128)` compute, see `dali_loader.py`):

    x' = H(hue, saturation) @ diag(gains) @ x    channel gains, then hue rotation + saturation
                                                 scale in YIQ space (saturation 0 = grayscale)
    y  = brightness * (128 + contrast * (x' - 128))
    y  = clip(y, 0, 255)

with H = YIQ2RGB @ R(hue) @ diag(1, s, s) @ RGB2YIQ. Everything is linear until the clip, so a
whole batch is one (B, 3, 3) matrix and a (B, 3) offset: `colour_affine` builds them,
`folded_affine` folds the loaders' normalisation in, and `colour_normalise` (one sample at a
time, when the device is the CPU) or `apply_colour` (a whole batch on a GPU) apply them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from PIL import Image, ImageFilter

from handpose.config import AugmentConfig
from handpose.geometry import Region, boxes_overlap, crop_matrix, footprint

CONTRAST_CENTRE = 128.0  # mid-grey on the [0, 255] scale

# NTSC YIQ as DALI's hsv operator has it (DALI 2.x uses the exact inverse for the way back).
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ2RGB = np.linalg.inv(RGB2YIQ)


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation. The defaults are the identity (a plain crop resize)."""

    angle_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the model input size, per axis
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue_deg: float = 0.0
    blur_sigma: float = 0.0  # model-input px; 0 = no blur
    occluder: tuple[float, float, float, float] | None = None  # x, y, w, h as fractions of the input
    occluder_grey: float = 0.0  # its fill, 0..255
    aspect: float = 1.0  # x stretched by sqrt(aspect), y by 1 / sqrt(aspect)
    tilt: tuple[float, float] | None = None  # (tilt_deg, axis_deg): turned in depth; None = flat
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R, G, B
    occluder_patch: tuple[float, float] | None = None  # the occluder's fill: the input's rectangle at
    # this x, y (fractions, like `occluder`'s); None = the flat grey

    def colour(self) -> tuple[float, ...]:
        """(brightness, contrast, saturation, hue_deg, gain_r, gain_g, gain_b): the row
        `colour_affine` takes."""
        return (self.brightness, self.contrast, self.saturation, self.hue_deg, *self.gains)


IDENTITY = AugmentParams()


def _extra_draws(cfg: AugmentConfig) -> bool:
    """Whether `cfg` uses any augmentation added after the first 17 draws (they draw 10 more)."""
    return bool(cfg.aspect or cfg.perspective_deg or cfg.channel_gain or cfg.grayscale or cfg.occlude_patch)


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    """Draw one sample's parameters; every range is uniform, flip/blur/occlusion/grayscale/patch are
    coin flips. The augmentations added later draw 10 more numbers, only when one of them is on,
    so that recipes without them draw (and give) what they always did."""
    if not cfg.enabled:
        return IDENTITY
    u = rng.uniform(0.0, 1.0, size=17)  # one call: per-sample Python overhead matters in workers
    v = 2.0 * u[:8] - 1.0  # the symmetric ranges
    occluder = None
    if u[11] < cfg.occlude:
        w, h = 0.1 + u[12:14] * (cfg.occlude_size - 0.1)
        occluder = (float(u[14] * (1 - w)), float(u[15] * (1 - h)), float(w), float(h))
    p = AugmentParams(
        angle_deg=float(v[0] * cfg.rotate_deg),
        scale=float(cfg.scale_min + u[1] * (cfg.scale_max - cfg.scale_min)),
        shift=(float(v[2] * cfg.translate), float(v[3] * cfg.translate)),
        flip=bool(cfg.flip and u[8] < 0.5),
        brightness=float(1.0 + v[4] * cfg.brightness),
        contrast=float(1.0 + v[5] * cfg.contrast),
        saturation=float(1.0 + v[6] * cfg.saturation),
        hue_deg=float(v[7] * cfg.hue_deg),
        blur_sigma=float(0.3 + u[10] * (cfg.blur_sigma - 0.3)) if u[9] < cfg.blur else 0.0,
        occluder=occluder,
        occluder_grey=float(255.0 * u[16]) if occluder else 0.0,
    )
    if not _extra_draws(cfg):
        return p
    e = rng.uniform(0.0, 1.0, size=10)
    gains = 1.0 + (2.0 * e[3:6] - 1.0) * cfg.channel_gain
    patch = None
    if occluder is not None and e[7] < cfg.occlude_patch:
        patch = (float(e[8] * (1 - occluder[2])), float(e[9] * (1 - occluder[3])))
    return dataclasses.replace(
        p,
        aspect=float(math.exp(math.log1p(cfg.aspect) * (2.0 * e[0] - 1.0))),
        tilt=(float((2.0 * e[1] - 1.0) * cfg.perspective_deg), float(180.0 * e[2]))
        if cfg.perspective_deg
        else None,
        gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        saturation=0.0 if e[6] < cfg.grayscale else p.saturation,
        occluder_patch=patch,
    )


def params_matrix(p: AugmentParams, region: Region, size: int) -> np.ndarray:
    """The source -> model-input matrix of `p` for a crop `region` (geometry.crop_matrix): 2x3,
    or a 3x3 homography when `p` turns the hand in depth."""
    return crop_matrix(
        region,
        size,
        angle_deg=p.angle_deg,
        scale=p.scale,
        shift=p.shift,
        flip=p.flip,
        aspect=p.aspect,
        tilt=p.tilt,
    )


NEGATIVE_TRIES = 8  # places tried for a crop without a hand before the sample stays a hand


def negative_matrix(
    p: AugmentParams,
    side: float,
    width: int,
    height: int,
    boxes: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """The source -> input matrix of a crop that shows NO hand: a square of `side` source px (the
    size a hand crop of this photo has), its centre uniform over the width x height photo, with
    `p`'s augmentation; the first of NEGATIVE_TRIES draws whose footprint (`geometry.footprint`,
    a box around everything the crop shows) overlaps none of the photo's hand `boxes` (N, 4).
    None when no draw finds room (the hands fill the photo)."""
    centres = rng.uniform(0.0, 1.0, size=(NEGATIVE_TRIES, 2)) * (width, height)
    for cx, cy in centres:
        M = params_matrix(p, (float(cx), float(cy), side), size)
        if not boxes_overlap(footprint(M, size), boxes).any():
            return M
    return None


def occluder_pixels(p: AugmentParams, size: int) -> tuple[int, int, int, int] | None:
    """The occluding rectangle (x0, y0, w, h) in whole model-input pixels, inside the frame."""
    if p.occluder is None:
        return None
    x, y, w, h = p.occluder
    x0, y0 = int(x * size), int(y * size)
    return x0, y0, min(max(1, round(w * size)), size - x0), min(max(1, round(h * size)), size - y0)


def patch_origin(p: AugmentParams, size: int) -> tuple[int, int] | None:
    """Where the occluder's fill is cut from (x0, y0 in whole pixels), or None for a flat grey."""
    if p.occluder_patch is None:
        return None
    return int(p.occluder_patch[0] * size), int(p.occluder_patch[1] * size)


def blur_and_occlude(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """The post-warp pixel augmentations on a uint8 (S, S, 3) model input (a new array if any)."""
    if p.blur_sigma > 0:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(p.blur_sigma)))
    rect = occluder_pixels(p, image.shape[0])
    if rect is not None:
        x0, y0, w, h = rect
        source = patch_origin(p, image.shape[0])
        fill: np.ndarray | int = round(p.occluder_grey)
        if source is not None:  # cut before writing: the two rectangles may overlap
            sx, sy = source
            fill = image[sy : sy + h, sx : sx + w].copy()
        image = image.copy() if not image.flags.writeable else image
        image[y0 : y0 + h, x0 : x0 + w] = fill
    return image


def hsv_matrix(saturation: float, hue_deg: float) -> np.ndarray:
    """The 3x3 RGB matrix of a YIQ hue rotation and saturation scale (DALI `fn.hsv`, value=1)."""
    c, s = math.cos(math.radians(hue_deg)), math.sin(math.radians(hue_deg))
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
    return YIQ2RGB @ rot @ np.diag([1.0, saturation, saturation]) @ RGB2YIQ


def colour_affine(colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (brightness, contrast, saturation, hue_deg[, gain_r, gain_g, gain_b]) (B, 4 or 7) ->
    matrices (B, 3, 3), offsets (B, 3).

    y = A @ x + t equals brightness * (128 + contrast * (H @ diag(gains) @ x - 128)) before the clip.
    """
    colour = np.asarray(colour, np.float64)
    colour = colour.reshape(-1, colour.shape[-1] if colour.ndim else 4)
    b, c = colour[:, 0], colour[:, 1]
    H = np.stack([hsv_matrix(s, h) for s, h in colour[:, 2:4]]) if len(colour) else np.zeros((0, 3, 3))
    if colour.shape[1] == 7:
        H = H * colour[:, None, 4:7]  # H @ diag(gains): column j scaled by gain j
    A = (b * c)[:, None, None] * H
    t = np.repeat((b * CONTRAST_CENTRE * (1.0 - c))[:, None], 3, axis=1)
    return A, t


def folded_affine(
    colour: np.ndarray | None, n: int, mean: ArrayLike, std: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Colour jitter and normalisation as one affine map per sample plus a per-channel clip.

    For uint8 RGB x, the loaders' output is ((clip(A x + t, 0, 255) / 255) - mean) / std with
    (A, t) = `colour_affine(colour)` (identity when `colour` is None). The normalisation is
    per-channel scale > 0, so it folds into the matrix and the clip bounds. `mean`/`std` are (3,)
    or per sample (n, 3) (a mix of shard sets, each with its own normalisation).
    Returns A' (n, 3, 3), t' (n, 3), lo (n, 3), hi (n, 3) (float64): output = clip(A' x + t', lo, hi).
    """
    if colour is None:
        A, t = np.broadcast_to(np.eye(3), (n, 3, 3)), np.zeros((n, 3))
    else:
        A, t = colour_affine(colour)
    mean_ = np.broadcast_to(np.asarray(mean, np.float64), (n, 3))
    std_ = np.broadcast_to(np.asarray(std, np.float64), (n, 3))
    s = 1.0 / (255.0 * std_)
    b = -mean_ / std_
    return A * s[:, :, None], t * s + b, b, 255.0 * s + b


def colour_normalise(
    image: np.ndarray,
    A: np.ndarray,
    t: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    out: np.ndarray,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """One sample on the CPU: uint8 CHW `image` -> float32 CHW `out` = clip(A x + t, lo, hi).

    (A, t, lo, hi) is one sample's row of `folded_affine` as float32; `scratch` (like `out`) is reusable.
    A few numpy passes over one cache-resident image cost about half of what the batched torch
    ops of `apply_colour` do on a CPU (each of those streams the whole batch through memory).
    The 3x3 product is written as multiply-adds on purpose: numpy's matmul calls BLAS, whose
    thread pool then spins on the cores the loader's workers and the train step need.
    """
    if scratch is None:
        scratch = np.empty_like(out)
    np.copyto(scratch, image)  # uint8 -> float32
    x, y = scratch.reshape(3, -1), out.reshape(3, -1)
    tmp = np.empty_like(x[0])
    for c in range(3):  # one output channel at a time, while it sits in cache
        yc = y[c]
        np.multiply(x[0], A[c, 0], out=yc)
        yc += np.multiply(x[1], A[c, 1], out=tmp)
        yc += np.multiply(x[2], A[c, 2], out=tmp)
        yc += t[c]
        np.clip(yc, lo[c], hi[c], out=yc)
    return out


def apply_colour(
    images: torch.Tensor,
    colour: torch.Tensor | None,
    *,
    mean: ArrayLike = (0.0, 0.0, 0.0),
    std: ArrayLike = (1.0 / 255.0,) * 3,
) -> torch.Tensor:
    """A batch on the loader's device: RGB images (B, 3, H, W) in [0, 255] (uint8 or float),
    colour rows (B, 4) or None -> float ((clip(colour(x), 0, 255) / 255) - mean) / std.

    The same map as `colour_normalise` (`folded_affine`; mean/std (3,) or (B, 3)); the defaults
    leave values in [0, 255].
    """
    B, _, H, W = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    rows = None if colour is None else colour.detach().cpu().numpy()
    A, t, lo, hi = (torch.from_numpy(a).to(images.device, dtype) for a in folded_affine(rows, B, mean, std))
    y = torch.baddbmm(t[:, :, None], A, images.reshape(B, 3, H * W).to(dtype))  # (3, 3) @ (3, H*W) each
    return torch.maximum(torch.minimum(y, hi[:, :, None]), lo[:, :, None]).view(B, 3, H, W)
