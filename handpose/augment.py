"""Per-sample augmentation parameters and the colour jitter, shared by the WDS and DALI loaders.

Geometry is NOT defined here: `params_matrix` hands the sampled angle/scale/shift/flip to
`geometry.augment_matrix`, the one home of the source -> model-input matrix.

Colour jitter, on RGB values in [0, 255] after the warp (the same definition DALI's `fn.hsv`
followed by `fn.brightness_contrast(contrast_center=128)` computes, see `dali_loader.py`):

    x' = H(hue, saturation) @ x                  hue rotation + saturation scale in YIQ space
    y  = brightness * (128 + contrast * (x' - 128))
    y  = clip(y, 0, 255)

with H = YIQ2RGB @ R(hue) @ diag(1, s, s) @ RGB2YIQ. Everything is linear until the clip, so a
whole batch is one (B, 3, 3) matrix and a (B, 3) offset: `colour_affine` builds them and
`apply_colour` applies them as one batched op on the loader's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from handpose.config import AugmentConfig
from handpose.geometry import augment_matrix

CONTRAST_CENTRE = 128.0  # mid-grey on the [0, 255] scale

# NTSC YIQ as DALI's hsv operator has it (DALI 2.x uses the exact inverse for the way back).
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ2RGB = np.linalg.inv(RGB2YIQ)


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation. The defaults are the identity (a plain letterbox resize)."""

    angle_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the model input size, per axis
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue_deg: float = 0.0

    def colour(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue_deg): the row `colour_affine` takes."""
        return (self.brightness, self.contrast, self.saturation, self.hue_deg)


IDENTITY = AugmentParams()


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    """Draw one sample's parameters; every range is uniform, flip is a fair coin when enabled."""
    if not cfg.enabled:
        return IDENTITY
    u = rng.uniform(-1.0, 1.0, size=9)  # one call: per-sample Python overhead matters in workers
    return AugmentParams(
        angle_deg=float(u[0] * cfg.rotate_deg),
        scale=float(cfg.scale_min + (u[1] + 1.0) / 2.0 * (cfg.scale_max - cfg.scale_min)),
        shift=(float(u[2] * cfg.translate), float(u[3] * cfg.translate)),
        flip=bool(cfg.flip and u[8] < 0.0),
        brightness=float(1.0 + u[4] * cfg.brightness),
        contrast=float(1.0 + u[5] * cfg.contrast),
        saturation=float(1.0 + u[6] * cfg.saturation),
        hue_deg=float(u[7] * cfg.hue_deg),
    )


def params_matrix(p: AugmentParams, src_w: int, src_h: int, size: int) -> np.ndarray:
    """The 2x3 source -> model-input matrix of `p` (letterbox fit folded in)."""
    return augment_matrix(
        src_w, src_h, size, angle_deg=p.angle_deg, scale=p.scale, shift=p.shift, flip=p.flip
    )


def hsv_matrix(saturation: float, hue_deg: float) -> np.ndarray:
    """The 3x3 RGB matrix of a YIQ hue rotation and saturation scale (DALI `fn.hsv`, value=1)."""
    c, s = math.cos(math.radians(hue_deg)), math.sin(math.radians(hue_deg))
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
    return YIQ2RGB @ rot @ np.diag([1.0, saturation, saturation]) @ RGB2YIQ


def colour_affine(colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (brightness, contrast, saturation, hue_deg) (B, 4) -> matrices (B, 3, 3), offsets (B, 3).

    y = A @ x + t equals brightness * (128 + contrast * (H @ x - 128)) before the clip.
    """
    colour = np.asarray(colour, np.float64).reshape(-1, 4)
    b, c = colour[:, 0], colour[:, 1]
    H = np.stack([hsv_matrix(s, h) for s, h in colour[:, 2:]]) if len(colour) else np.zeros((0, 3, 3))
    A = (b * c)[:, None, None] * H
    t = np.repeat((b * CONTRAST_CENTRE * (1.0 - c))[:, None], 3, axis=1)
    return A, t


def apply_colour(
    images: torch.Tensor,
    colour: torch.Tensor,
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    bias: Sequence[float] = (0.0, 0.0, 0.0),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Colour-jitter float RGB images (B, 3, H, W) in [0, 255] by rows `colour` (B, 4), clip to
    [0, 255], then map each channel c to x * scale[c] + bias[c] (the loaders' normalisation).

    The per-channel map is folded into the colour matrix (scale > 0 keeps the clip exact), so the
    whole thing is three multiply-adds, one offset and one clip: the loaders are memory-bound here.
    Writes into `out` (same shape, float) when given.
    """
    A, t = colour_affine(colour.detach().cpu().numpy())
    s, b = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    A_t = torch.as_tensor(A * s[None, :, None], dtype=images.dtype).to(images.device, non_blocking=True)
    t_t = torch.as_tensor(t * s + b, dtype=images.dtype).to(images.device, non_blocking=True)
    B, _, H, W = images.shape
    x = images.reshape(B, 3, H * W)
    y = torch.empty_like(x) if out is None else out.view(B, 3, H * W)
    torch.mul(A_t[:, :, 0:1], x[:, 0:1], out=y)
    y.addcmul_(A_t[:, :, 1:2], x[:, 1:2]).addcmul_(A_t[:, :, 2:3], x[:, 2:3]).add_(t_t[:, :, None])
    for c in range(3):
        y[:, c].clamp_(float(b[c]), float(255.0 * s[c] + b[c]))
    return y.view(B, 3, H, W)
