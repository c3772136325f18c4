"""Heatmap targets, the shared heatmap -> keypoint decoder, and the heatmap losses.

Everything is batched torch on the training device (the tutorial rendered 21 blurred maps per
sample on the CPU). Cell (i, j) of an H x W heatmap sits at pixel coordinate (i + 0.5, j + 0.5)
of the model input (see geometry.py); `index_offset=0.0` reproduces the tutorial's decoder, which
reads cell i as coordinate i (a constant half-cell shift) and is only used for its weights.
"""

from __future__ import annotations

import torch

TUTORIAL_INDEX_OFFSET = 0.0  # the tutorial's decoder: keypoint = sum(p_i * i)
INDEX_OFFSET = 0.5  # handpose: cell i is centred at i + 0.5


def keypoints_to_heatmaps(
    uv: torch.Tensor, visible: torch.Tensor, size: int, sigma: float = 2.0
) -> torch.Tensor:
    """Gaussian maps (B, J, size, size), peak 1 at each keypoint; invisible joints give zeros.

    uv: (B, J, 2) model-input pixels; visible: (B, J) bool. Separable: two 1D Gaussians per joint
    and one outer product, no per-sample loop.
    """
    centres = torch.arange(size, device=uv.device, dtype=torch.float32) + 0.5
    d = centres.view(1, 1, 1, size) - uv.float().unsqueeze(-1)  # (B, J, 2, size)
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    maps = g[:, :, 1, :, None] * g[:, :, 0, None, :]  # (B, J, y, x)
    return maps * visible.to(maps.dtype)[:, :, None, None]


def heatmaps_to_keypoints(
    heatmaps: torch.Tensor, index_offset: float = INDEX_OFFSET
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmap-weighted mean position (the tutorial's decoder), and a confidence per joint.

    heatmaps: (B, J, H, W), non-negative. Returns uv (B, J, 2) in heatmap pixels and score
    (B, J) = the map's peak value (sigmoid output: 0..1).
    """
    h = heatmaps.float()
    b, j, hh, ww = h.shape
    total = h.sum(dim=(2, 3)).clamp_min(1e-12)
    xs = torch.arange(ww, device=h.device, dtype=torch.float32) + index_offset
    ys = torch.arange(hh, device=h.device, dtype=torch.float32) + index_offset
    x = (h.sum(dim=2) * xs).sum(-1) / total
    y = (h.sum(dim=3) * ys).sum(-1) / total
    score = h.amax(dim=(2, 3))  # not flatten(2): that copies a channels_last tensor
    return torch.stack([x, y], dim=-1), score


def _mean_over_maps(per_map: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Mean of a (B, J) per-map loss over the maps of visible joints (all maps when None).

    Zero, still attached to the graph, when no joint is visible: a batch of unlabelled hands
    must not divide by zero nor detach the loss from the parameters.
    """
    if visible is None:
        return per_map.mean()
    w = visible.to(per_map.dtype)
    return (per_map * w).sum() / w.sum().clamp_min(1.0)


def iou_loss(
    pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """The tutorial's soft-IoU heatmap loss: 1 - mean over maps of (p.t) / (|p|^2 + |t|^2 - p.t).

    visible: (B, J) bool; when given, only the maps of visible joints count (an unlabelled joint
    has no target, so its map is neither pushed to zero nor anywhere else).
    """
    pred, target = pred.float(), target.float()
    inter = (pred * target).sum(dim=(2, 3))
    union = (target**2).sum(dim=(2, 3)) + (pred**2).sum(dim=(2, 3)) - inter
    return _mean_over_maps(1 - (inter + eps) / (union + eps), visible)


def mse_loss(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel MSE on the heatmaps; with `visible`, averaged over the visible joints' maps only."""
    per_map = (pred.float() - target.float()).square().mean(dim=(2, 3))
    return _mean_over_maps(per_map, visible)


LOSSES = {"iou": iou_loss, "mse": mse_loss}
