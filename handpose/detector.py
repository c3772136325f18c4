"""The hand detector (`arch = "centernet"`): every hand of a letterboxed photo as a box and a score.

CenterNet ("Objects as Points", Zhou et al. 2019) with one class: the whole photo in, three maps
out at `stride` 4 or 8 of the input, one tensor (B, 5, S/stride, S/stride):

  channel 0     hand-centre heatmap logit (sigmoid: the score of a hand centred in that cell)
  channels 1-2  log(box width / stride), log(box height / stride): the box size, in log space so
                that a 10 px hand and a 200 px one weigh alike in the L1 loss
  channels 3-4  sub-cell offset of the box centre (x, y), in cells, in [0, 1)

Cell (i, j) covers input pixels [j * stride, (j + 1) * stride) x [i * stride, (i + 1) * stride)
(geometry.py's convention); a centre (cx, cy) belongs to cell (floor(cy / stride), floor(cx /
stride)) and its offset is (cx / stride - j, cy / stride - i).

Training targets (`detection_targets`): a Gaussian of CenterNet's radius (`gaussian_radius`,
min_overlap 0.7) around each centre cell, peak exactly 1 there, the element-wise max where hands
meet; sizes and offsets at the centre cells only. Loss (`CenterNet.loss`): CenterNet's
penalty-reduced focal loss (alpha 2, beta 4) on the heatmap, normalised by the number of hands,
plus L1 on log-size and offset at the centre cells. Every cell away from a hand is a negative.

Decoding (`CenterNet.decode`): sigmoid, keep the cells equal to their 3x3 max-pool (peaks, no other
suppression), the top K peaks -> boxes (x0, y0, x1, y1) in input px and scores, best first.

For `predict`: `load_detector(path, device)` -> (model, DetectorSpec); `detect(model, spec, images)`
runs letterboxed uint8 inputs; `photo_input` letterboxes one photo (bytes or pixels) and
`photo_boxes` maps boxes back to it (the inference path, `inference.Runner`, calls these three);
`detect_photos(model, spec, photos)` does all of it for a list of image bytes.

The encoder reuses model.py's building blocks (stem of `_conv_bn`, stages of `BasicBlock`s):

    stem    conv3x3/2 3->w, conv3x3/2 w->2w (BN, ReLU): stride 4
    stages  `depth` basic blocks at strides 8, 16, 32 with 4w, 8w, 16w channels
    neck    FPN top-down: 1x1 laterals to 4w channels, bilinear 2x upsample + add, down to `stride`
            (stride 4 also takes the stem's stride-4 features)
    head    conv3x3 4w->4w (BN, ReLU), conv1x1 -> 5 maps

The input side must be a multiple of 32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handpose.errors import HandposeError
from handpose.model import PoseModel, _conv_bn, _stage, _up2, normalized_input

if TYPE_CHECKING:
    from handpose.imageio import DecodeCache

STRIDES = (4, 8)
INPUT_MULTIPLE = 32  # the encoder's deepest stride
MIN_OVERLAP = 0.7  # CenterNet's gaussian_radius: a box this much off still overlaps the label
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0  # CenterNet's penalty-reduced focal loss
SIZE_WEIGHT, OFFSET_WEIGHT = 1.0, 1.0  # L1 weights (log-size is unit-free, so no 0.1 as for px)
HEAT_PRIOR = 0.1  # initial hand probability of every cell (bias = logit(0.1), CenterNet's -2.19)
PROB_EPS = 1e-4  # probabilities are clamped to [eps, 1 - eps] in the loss (CenterNet's _sigmoid)
DEFAULT_MIN_SCORE = 0.3  # the decode threshold when a checkpoint does not record one
TOP_K = 100  # peaks decoded per photo for AP (COCO's maxDets for boxes)


class CenterNet(PoseModel):
    """Hand detector: see the module docstring. `forward` -> (B, 5, S/stride, S/stride)."""

    arch = "centernet"
    targets = ("boxes", "hands")  # type: ignore[assignment]  # its own batch keys, not keypoints'

    def __init__(self, width: int = 8, depth: int = 1, *, stride: int = 8):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"stride must be one of {STRIDES}, got {stride}")
        self.stride = stride
        c1, c2, c3, c4 = 2 * width, 4 * width, 8 * width, 16 * width
        neck = 4 * width
        self.stem = nn.Sequential(_conv_bn(3, width, 3, 2), _conv_bn(width, c1, 3, 2))
        self.stage2 = _stage(c1, c2, depth, 2)
        self.stage3 = _stage(c2, c3, depth, 2)
        self.stage4 = _stage(c3, c4, depth, 2)
        self.lateral1 = nn.Conv2d(c1, neck, 1) if stride == 4 else None
        self.lateral2 = nn.Conv2d(c2, neck, 1)
        self.lateral3 = nn.Conv2d(c3, neck, 1)
        self.lateral4 = nn.Conv2d(c4, neck, 1)
        out = nn.Conv2d(neck, 5, 1)
        nn.init.normal_(out.weight, std=1e-3)
        nn.init.zeros_(out.bias)  # type: ignore[arg-type]  # bias=True: never None
        with torch.no_grad():  # every cell starts at the prior: the focal loss starts sane
            out.bias[0] = math.log(HEAT_PRIOR / (1 - HEAT_PRIOR))  # type: ignore[index]
        self.head = nn.Sequential(_conv_bn(neck, neck, 3), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.stem(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        p = self.lateral4(f4)
        p = self.lateral3(f3) + _up2(p)
        p = self.lateral2(f2) + _up2(p)
        if self.lateral1 is not None:
            p = self.lateral1(f1) + _up2(p)
        return self.head(p)

    def decode(  # type: ignore[override]  # boxes, not keypoints
        self, out: torch.Tensor, k: int = TOP_K
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output -> (boxes (B, k, 4) x0, y0, x1, y1 in input px, scores (B, k) in [0, 1]),
        the k highest 3x3 peaks of each photo, best first (fp32). Threshold the scores yourself."""
        with torch.autocast(out.device.type, enabled=False):
            return decode_output(out.float(), self.stride, k)

    def loss(self, out: torch.Tensor, boxes: torch.Tensor, hands: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Focal loss on the heatmap + L1 on log-size and offset (fp32), for boxes (B, K, 4) in
        input px of which `hands` (B, K) are real. A batch without a hand trains the heatmap
        towards 0 everywhere (the size and offset terms are then 0, still attached to the graph)."""
        with torch.autocast(out.device.type, enabled=False):
            out = out.float()
            t = detection_targets(boxes, hands, out.shape[-2:], self.stride)
            heat = focal_loss(out[:, 0], t.heat, t.count)
            b = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(t.index)
            cells = out.flatten(2).transpose(1, 2)[b, t.index]  # (B, K, 5) at each hand's centre cell
            w = t.mask[..., None].float()
            n = w.sum().clamp_min(1.0)
            size = ((cells[..., 1:3] - t.size).abs() * w).sum() / n
            offset = ((cells[..., 3:5] - t.offset).abs() * w).sum() / n
            return heat + SIZE_WEIGHT * size + OFFSET_WEIGHT * offset


# ---------------------------------------------------------------------------------------------
# Targets, loss, decoding


@dataclass(frozen=True)
class Targets:
    """What the loss compares the output with (all on the output's device, fp32 unless said)."""

    heat: torch.Tensor  # (B, h, w) Gaussian peaks in [0, 1], exactly 1 at each hand's centre cell
    index: torch.Tensor  # (B, K) int64 centre cell i * w + j of each box slot (0 where no hand)
    size: torch.Tensor  # (B, K, 2) log(box w / stride), log(box h / stride)
    offset: torch.Tensor  # (B, K, 2) centre / stride - cell, in [0, 1)
    mask: torch.Tensor  # (B, K) bool: a real hand (the `hands` mask, boxes with positive sides)
    count: torch.Tensor  # () number of hands in the batch, as a float


def gaussian_radius(
    height: torch.Tensor, width: torch.Tensor, min_overlap: float = MIN_OVERLAP
) -> torch.Tensor:
    """CenterNet's radius (in the units of height/width) within which a corner shift keeps a box
    of this size at IoU >= min_overlap with the label: the smallest root of its three cases."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def detection_targets(
    boxes: torch.Tensor, hands: torch.Tensor, out_hw: Sequence[int], stride: int
) -> Targets:
    """The training targets of boxes (B, K, 4) x0, y0, x1, y1 in input px, `hands` (B, K) bool,
    for an output of out_hw = (h, w) cells of `stride` px. Centres outside the map are clamped
    to its border cells (the loaders only hand over boxes mostly inside the frame)."""
    h, w = int(out_hw[0]), int(out_hw[1])
    boxes = torch.where(hands[..., None], boxes.float(), 0.0)  # padding may hold anything
    bw, bh = (boxes[..., 2] - boxes[..., 0]), (boxes[..., 3] - boxes[..., 1])
    mask = hands & (bw > 0) & (bh > 0)
    centre = (boxes[..., :2] + boxes[..., 2:]) / (2 * stride)  # cells
    cell = centre.floor()
    cell = torch.stack([cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)], dim=-1)
    index = torch.where(mask, (cell[..., 1] * w + cell[..., 0]).long(), 0)
    one = torch.ones_like(bw)
    size = torch.stack([torch.where(mask, bw, one), torch.where(mask, bh, one)], dim=-1) / stride
    radius = gaussian_radius(size[..., 1], size[..., 0]).clamp_min(0).floor()  # CenterNet: int(r)
    sigma = (2 * radius + 1) / 6
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
    dx = xs - cell[..., 0:1]  # (B, K, w)
    dy = ys - cell[..., 1:2]  # (B, K, h)
    inside = (dy.abs() <= radius[..., None])[..., :, None] & (dx.abs() <= radius[..., None])[..., None, :]
    g = torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * sigma[..., None, None] ** 2))
    g = torch.where(inside & mask[..., None, None], g, 0.0)
    heat = g.amax(dim=1) if g.shape[1] else torch.zeros(boxes.shape[0], h, w, device=boxes.device)
    return Targets(
        heat=heat,
        index=index,
        size=torch.log(size),
        offset=torch.where(mask[..., None], centre - cell, 0.0),
        mask=mask,
        count=mask.sum().float(),
    )


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of heatmap logits (B, h, w) against `heat`, summed
    and divided by the number of hands (at least 1)."""
    p = torch.sigmoid(logits).clamp(PROB_EPS, 1 - PROB_EPS)
    pos = heat == 1
    pos_loss = torch.log(p) * (1 - p) ** FOCAL_ALPHA
    neg_loss = torch.log(1 - p) * p**FOCAL_ALPHA * (1 - heat) ** FOCAL_BETA
    return -(torch.where(pos, pos_loss, neg_loss)).sum() / count.clamp_min(1.0)


def decode_output(out: torch.Tensor, stride: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 5, h, w) fp32 output -> (boxes (B, k, 4) input px, scores (B, k)): the k best 3x3 peaks."""
    b, _, h, w = out.shape
    heat = torch.sigmoid(out[:, 0])
    peaks = heat * (F.max_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0] == heat)
    scores, index = peaks.flatten(1).topk(min(k, h * w), dim=1)
    cells = out.flatten(2).transpose(1, 2).gather(1, index[..., None].expand(-1, -1, 5))  # (B, k, 5)
    j, i = (index % w).float(), (index // w).float()
    cx = (j + cells[..., 3]) * stride
    cy = (i + cells[..., 4]) * stride
    half_w = torch.exp(cells[..., 1]) * stride / 2
    half_h = torch.exp(cells[..., 2]) * stride / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
    return boxes, scores


# ---------------------------------------------------------------------------------------------
# Running a trained detector (what predict calls)


@dataclass(frozen=True)
class DetectorSpec:
    """How to feed a detector checkpoint."""

    size: int  # input side, px (photos are letterboxed into it)
    mean: tuple[float, float, float]  # RGB normalisation of [0, 1] pixels
    std: tuple[float, float, float]
    min_score: float = DEFAULT_MIN_SCORE  # the checkpoint's default score threshold
    digest: str = field(default="", compare=False)  # the checkpoint's sha256 (a resumed predict must match)


def load_detector(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[CenterNet, DetectorSpec]:
    """A detector checkpoint (trained with `arch = "centernet"`), strictly loaded, in eval mode on
    `device`, and how to feed it. Every failure is one HandposeError line naming the file."""
    from handpose import checkpoint
    from handpose.model import fold_batchnorm, model_from_config

    path = Path(path)
    if not path.is_file():
        raise HandposeError(
            f"{path}: detector file not found" if not path.exists() else f"{path}: is not a file"
        )
    try:
        state = checkpoint.load(path)
    except checkpoint.CorruptCheckpoint as e:
        raise HandposeError(str(e)) from None
    cfg = state["config"]
    if cfg.get("arch") != "centernet":
        raise HandposeError(
            f"{path}: not a detector (its arch is {cfg.get('arch', 'unet')!r}, not 'centernet')"
        )
    try:
        net = model_from_config(cfg)
        net.load_state_dict(state["model"])
    except (HandposeError, RuntimeError, ValueError) as e:
        raise HandposeError(f"{path}: its weights do not fit its config: {str(e).splitlines()[0]}") from None
    assert isinstance(net, CenterNet)  # invariant: arch "centernet" builds one
    norm = state["norm"]
    spec = DetectorSpec(
        size=int(cfg["image_size"]),
        mean=tuple(float(v) for v in norm["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in norm["std"]),  # type: ignore[arg-type]
        min_score=float(cfg.get("min_score", DEFAULT_MIN_SCORE)),
        digest=str(state["sha256"]),
    )
    net = fold_batchnorm(net.eval())  # inference only: one conv where a conv and its BN were
    return net.to(device), spec


@torch.no_grad()
def detect(
    net: CenterNet,
    spec: DetectorSpec,
    images: torch.Tensor | np.ndarray,
    *,
    min_score: float | None = None,
    max_hands: int = TOP_K,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Letterboxed uint8 photos (B, size, size, 3) -> per photo (boxes (n, 4) x0, y0, x1, y1 in
    input px, scores (n,)), at most `max_hands`, scores >= `min_score` (default: the spec's),
    best first."""
    threshold = spec.min_score if min_score is None else min_score
    device = next(net.parameters()).device
    x = normalized_input(torch.as_tensor(images), spec.mean, spec.std, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(x)
    boxes, scores = net.decode(out, max_hands)
    boxes_np, scores_np = boxes.cpu().numpy().astype(np.float64), scores.cpu().numpy().astype(np.float64)
    return [(b[s >= threshold], s[s >= threshold]) for b, s in zip(boxes_np, scores_np, strict=True)]


def photo_input(
    image: bytes | np.ndarray, width: int, height: int, spec: DetectorSpec, cache: DecodeCache | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A photo (encoded bytes, or RGB uint8 pixels (H, W, 3) as displayed) letterboxed into the
    detector's input: (uint8 (size, size, 3), M), M = `geometry.fit_matrix` (photo px -> input
    px); `imageio.warp_to_input` for bytes (the loaders' preprocessing, JPEG DCT shrink included),
    `warp_image_to_input` for pixels (`cache`: `imageio.DecodeCache`). Boxes come back with
    `photo_boxes(M, boxes)`."""
    from handpose.geometry import fit_matrix
    from handpose.imageio import warp_image_to_input, warp_to_input

    M = fit_matrix(width, height, spec.size)
    if isinstance(image, np.ndarray):
        return warp_image_to_input(image, M, spec.size), M
    return warp_to_input(image, M, spec.size, cache), M


def photo_boxes(M: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes (n, 4) in the detector's input px -> the photo's px (M from `photo_input`)."""
    from handpose.geometry import invert, move_boxes

    return move_boxes(invert(M), boxes).reshape(-1, 4)


def detect_photos(
    net: CenterNet,
    spec: DetectorSpec,
    photos: Sequence[bytes],
    *,
    min_score: float | None = None,
    max_hands: int = TOP_K,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Image bytes -> per photo (boxes (n, 4) in the photo's own pixels as displayed, scores (n,)):
    each photo letterboxed into the detector's input (`photo_input`) and the boxes mapped back
    through that matrix (`photo_boxes`). A photo that cannot be decoded raises ValueError (a data
    error)."""
    from handpose.imageio import image_size

    if not photos:
        return []
    matrices, inputs = [], []
    for data in photos:
        x, M = photo_input(data, *image_size(data), spec)
        matrices.append(M)
        inputs.append(x)
    found = detect(net, spec, np.stack(inputs), min_score=min_score, max_hands=max_hands)
    return [(photo_boxes(M, b), s) for M, (b, s) in zip(matrices, found, strict=True)]
