"""The pose architectures, selected by name (`ModelConfig`, `build_model`, `model_from_config`),
and a loaded model's input contract (`ModelSpec`; the tutorial's weights: `tutorial_model`).

Every model is a `PoseModel`: an `nn.Module` whose `forward` returns its raw output, with
`decode(out)` -> (uv (B, 21, 2) in model-input pixels, score (B, 21) in [0, 1]) and
`loss(out, uv, visible[, present])` -> a scalar that counts only visible joints and computes in
fp32 even under autocast. Pixel convention as in geometry.py: pixel i has centre i + 0.5.

With `presence` (off by default: the state_dicts of earlier models are unchanged) a model also
scores whether its crop shows a hand at all: `forward` returns (keypoint output, presence logits
(B,)), `presence(out)` the probability (B,), and `loss` adds `presence_weight` x the binary cross
entropy against the batch's `present`, whose False crops (no hand) add nothing to the keypoint
terms. The logit comes from the deepest features, average-pooled (`PresenceHead`).

unet     the tutorial's ShallowUNet: sigmoid heatmaps (B, 21, S, S) at the input resolution,
         heatmap losses ("iou", "mse") against Gaussian targets, heatmap-weighted-mean decoder.
         Width 16, depth 3 is the tutorial's exact state_dict layout (85 keys, 491,206
         parameters): its trained `model_final` loads with strict=True.
strided  a residual encoder to stride 16, an FPN top-down path back to stride 4 (`StridedEncoder`),
         and 21 logit maps at stride 4 (S/4 x S/4), decoded by soft-argmax (integral regression).
         Loss: L1 on the soft-argmax coordinates (units of the input side) plus `reg` x the
         Jensen-Shannon divergence between each softmax map and a Gaussian of `sigma` input px (DSNT).
simcc    the same encoder and neck, then SimCC (Li et al. 2022): each joint's stride-4 map, flattened,
         is classified per axis into S x `simcc_k` sub-pixel bins (two linear layers, x and y).
         Loss: KL divergence from a Gaussian label of `sigma` input px over each axis's bins to
         the softmax. Decoder: the argmax bin, then the expectation over the bins within 3 sigma
         of it (`SimCCPose.decode_keypoints` says why); score = the softmax mass in those windows.
centernet  the hand DETECTOR (handpose/detector.py): the whole photo in, hand-centre heatmap, box
         size and offset at `stride` 4 or 8; its `decode` gives boxes and scores, its `loss`
         takes the batch's boxes and hands mask (its `targets`), not keypoints.

Every hyper-parameter is a plain value (int, float, str), declared once in `ModelConfig`, that
lives in a TOML recipe and in a checkpoint's config dict; `model_from_config` rebuilds a model
from such a dict.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from handpose.config import MODEL, check_bounds, from_dict, setting
from handpose.errors import ConfigError
from handpose.geometry import BOX_PAD
from handpose.heatmaps import (
    INDEX_OFFSET,
    LOSSES,
    TUTORIAL_INDEX_OFFSET,
    heatmaps_to_keypoints,
    keypoints_to_heatmaps,
)
from handpose.skeleton import NUM_JOINTS

ARCHS = ("unet", "strided", "simcc", "centernet")
ARCH_LOSSES = {"unet": tuple(LOSSES), "strided": ("l1",), "simcc": ("kl",), "centernet": ("focal",)}
DETECTORS = ("centernet",)  # archs that find hands (boxes) rather than keypoints
DETECTOR_STRIDE = 8  # centernet: output stride when a config does not give one
# strided: JS regulariser weight; 1 beat 0 (6.7% vs 9.0% of the box) and 0.1 (8.4%) on short runs
STRIDED_REG = 1.0
SIMCC_K = 2.0  # simcc: bins per input px; the SimCC paper found 2-3 best, more costs parameters
PRESENCE_WEIGHT = 1.0  # weight of the presence term in the loss


Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # keypoint output[, presence logits (B,)]


class PresenceHead(nn.Module):
    """Global average pool -> linear: one logit per crop that it shows a hand."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3))).squeeze(-1)


class PoseModel(nn.Module):
    """A keypoint model: raw output from `forward`, keypoints from `decode`, training loss from
    `loss`; with a presence head also `presence`. Subclasses define `decode_keypoints` and
    `keypoint_loss` on the keypoint output, and call `_init_presence` in their constructor.

    `targets` names the batch entries `loss` takes after the output, in order: the trainer and
    validation call `loss(out, *(batch[k] for k in targets))`. A keypoint model's are uv and
    visible, plus present when it has a presence head; the detector (detector.CenterNet, whose
    decode and loss are about boxes) has its own.

    `decode` is written in torch ops that `torch.export` can trace (no numpy, no data-dependent
    Python branches): `handpose export` puts it inside the ONNX graph as it is.
    """

    arch: str = ""  # its name in ARCHS (a checkpoint's config "arch"; ONNX metadata)
    presence_head: PresenceHead | None  # set by `_init_presence` (a class default would hide the module)
    presence_weight: float = 0.0

    @property
    def targets(self) -> tuple[str, ...]:
        """The batch keys `loss` takes after the output, in its argument order."""
        return ("uv", "visible", "present") if self.presence_head is not None else ("uv", "visible")

    def _init_presence(self, channels: int, presence: bool, weight: float) -> None:
        """Add the presence head (on features of `channels` channels) when `presence`."""
        self.presence_head = PresenceHead(channels) if presence else None
        self.presence_weight = weight if presence else 0.0

    def _output(self, keypoints: torch.Tensor, deepest: torch.Tensor) -> Output:
        """The forward's return: the keypoint output, with the presence logits when there is a head."""
        if self.presence_head is None:
            return keypoints
        return keypoints, self.presence_head(deepest)

    @staticmethod
    def split(out: Output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keypoint output, presence logits (B,) or None) of a forward's output."""
        if isinstance(out, tuple):
            return out[0], out[1]
        return out, None

    def decode(self, out: Output) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output -> (uv (B, J, 2) model-input pixels, score (B, J) in [0, 1]), in fp32."""
        return self.decode_keypoints(self.split(out)[0])

    def presence(self, out: Output) -> torch.Tensor | None:
        """The probability (B,) in fp32 that each crop shows a hand; None without a presence head."""
        logits = self.split(out)[1]
        return None if logits is None else torch.sigmoid(logits.float())

    def loss(
        self, out: Output, uv: torch.Tensor, visible: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss over the visible joints only (uv (B, J, 2) model-input px, visible (B, J)
        bool) of the crops that show their hand (`present` (B,) bool; None = all do), plus, with a
        presence head, `presence_weight` x the binary cross entropy of its logits against `present`.

        A batch without a visible joint gives zero keypoint loss, still attached to the graph.
        """
        keypoints, logits = self.split(out)
        if present is not None:
            visible = visible & present[:, None]
        total = self.keypoint_loss(keypoints, uv, visible)
        if logits is not None:
            with torch.autocast(logits.device.type, enabled=False):
                target = torch.ones_like(logits, dtype=torch.float32) if present is None else present.float()
                bce = F.binary_cross_entropy_with_logits(logits.float(), target)
            total = total + self.presence_weight * bce
        return total

    def decode_keypoints(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keypoint output -> (uv, score), as `decode`."""
        raise NotImplementedError

    def keypoint_loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The keypoint part of `loss`, over the visible joints only."""
        raise NotImplementedError


def _known(uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """uv in fp32 with every invisible joint moved to 0: a joint without a label may carry any
    value, NaN included, and a NaN would reach the gradient through a masked-out term (0 * NaN)."""
    return torch.where(visible[..., None], uv.float(), 0.0)


def _masked_mean(per_joint: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, J) tensor over visible joints; 0, still attached to the graph, when none is."""
    w = visible.to(per_joint.dtype)
    return (per_joint * w).sum() / w.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# unet: the tutorial's ShallowUNet


class ConvBlock(nn.Module):
    """BN -> conv3x3 -> ReLU -> BN -> conv3x3 -> ReLU (BN first, as the tutorial)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class ShallowUNet(PoseModel):
    """UNet with `depth` down/up levels of width w, 2w, 4w, ... and a 2^depth*w bottleneck.

    Outputs sigmoid heatmaps (B, 21, H, W) at the input resolution; H and W must be divisible by
    2**depth. `sigma` (input px) and `loss` define the training target and loss, `index_offset`
    the decoder (0.5 handpose's pixel centres, 0.0 the tutorial's). None of them is a parameter,
    so the state_dict is the tutorial's.
    """

    arch = "unet"

    def __init__(
        self,
        width: int = 16,
        depth: int = 3,
        in_channels: int = 3,
        joints: int = NUM_JOINTS,
        *,
        sigma: float = 3.0,
        loss: str = "iou",
        index_offset: float = INDEX_OFFSET,
        presence: bool = False,
        presence_weight: float = PRESENCE_WEIGHT,
    ):
        super().__init__()
        self.depth = depth
        self.sigma, self.loss_name, self.index_offset = sigma, loss, index_offset
        chans = [width * 2**i for i in range(depth)]
        # Names match the tutorial (conv_down1.., conv_bottleneck, conv_up1.., conv_out).
        for i, ch in enumerate(chans):
            setattr(self, f"conv_down{i + 1}", ConvBlock(in_channels if i == 0 else chans[i - 1], ch))
        self.conv_bottleneck = ConvBlock(chans[-1], chans[-1] * 2)
        self.maxpool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        for i, ch in enumerate(reversed(chans)):
            below = chans[-1] * 2 if i == 0 else ch * 2
            setattr(self, f"conv_up{i + 1}", ConvBlock(below + ch, ch))
        self.conv_out = nn.Sequential(nn.Conv2d(width, joints, 3, padding=1, bias=False), nn.Sigmoid())
        self._init_presence(chans[-1] * 2, presence, presence_weight)  # on the bottleneck

    def forward(self, x: torch.Tensor) -> Output:
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"conv_down{i + 1}")(x if i == 0 else self.maxpool(x))
            skips.append(x)
        x = bottleneck = self.conv_bottleneck(self.maxpool(x))
        for i in range(self.depth):
            x = getattr(self, f"conv_up{i + 1}")(torch.cat([self.upsample(x), skips[-1 - i]], dim=1))
        return self._output(self.conv_out(x), bottleneck)

    def decode_keypoints(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmap-weighted mean (heatmap px = input px); score = the map's peak (sigmoid, 0..1)."""
        return heatmaps_to_keypoints(out, self.index_offset)

    def keypoint_loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """`loss_name` ("iou" | "mse") against Gaussian targets of `sigma` px, visible maps only."""
        with torch.autocast(out.device.type, enabled=False):
            target = keypoints_to_heatmaps(_known(uv, visible), visible, out.shape[-1], self.sigma)
            return LOSSES[self.loss_name](out.float(), target, visible)


# ---------------------------------------------------------------------------------------------
# strided: residual encoder, FPN top-down path, stride-4 logit maps, soft-argmax


def _conv_bn(in_ch: int, out_ch: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        last_bn = nn.BatchNorm2d(out_ch)
        # Zero-init the last BN's scale: each block starts as the identity, which lets a
        # deeper stack train from the first steps as well as a shallow one.
        nn.init.zeros_(last_bn.weight)
        self.body = nn.Sequential(
            _conv_bn(in_ch, out_ch, 3, stride), nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), last_bn
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else _conv_bn(in_ch, out_ch, 1, stride, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x), inplace=True)


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        *(BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(blocks))
    )


def _up2(x: torch.Tensor) -> torch.Tensor:
    """2x bilinear upsampling (pixel-centre aligned). Bilinear rather than FPN's usual nearest:
    on short real-photo runs it gave a slightly lower loss and error in both paired seeds, for
    about 1% of the step time."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class StridedEncoder(nn.Module):
    """The strided encoder and its FPN neck, shared by the heads built on it (strided, simcc).

    stem    conv3x3/2 3->w, conv3x3/2 w->2w (BN, ReLU): stride 4
    stages  `depth` basic blocks at strides 4, 8, 16 with 2w, 4w, 8w channels
    neck    FPN top-down: 1x1 laterals to 2w channels, bilinear 2x upsample + add, to stride 4

    `features(x)` -> (the neck's stride-4 map (B, 2w, S/4, S/4), the deepest stage (B, 8w, S/16,
    S/16)). A head subclasses it (its layers then sit at the top level of the state_dict, where
    checkpoints of `StridedPose` have always had them) or holds one. The input side must be
    divisible by 16.
    """

    def __init__(self, width: int = 16, depth: int = 1):
        super().__init__()
        c1, c2, c3 = 2 * width, 4 * width, 8 * width
        self.stem = nn.Sequential(_conv_bn(3, width, 3, 2), _conv_bn(width, c1, 3, 2))
        self.stage1 = _stage(c1, c1, depth, 1)
        self.stage2 = _stage(c1, c2, depth, 2)
        self.stage3 = _stage(c2, c3, depth, 2)
        self.lateral1 = nn.Conv2d(c1, c1, 1)
        self.lateral2 = nn.Conv2d(c2, c1, 1)
        self.lateral3 = nn.Conv2d(c3, c1, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        p = self.lateral3(f3)
        p = self.lateral2(f2) + _up2(p)
        p = self.lateral1(f1) + _up2(p)
        return p, f3


class StridedPose(StridedEncoder, PoseModel):
    """`StridedEncoder` with stride-4 logit maps and a soft-argmax (integral regression) decoder.

    head    conv3x3 2w->2w (BN, ReLU), conv1x1 -> 21 logit maps (S/4 x S/4)

    Cell (i, j) of a logit map sits at input pixel ((j + 0.5) * 4, (i + 0.5) * 4).
    """

    arch = "strided"
    stride = 4

    def __init__(
        self,
        width: int = 16,
        depth: int = 1,
        *,
        sigma: float = 4.0,
        reg: float = STRIDED_REG,
        presence: bool = False,
        presence_weight: float = PRESENCE_WEIGHT,
    ):
        super().__init__(width, depth)
        self.sigma, self.reg = sigma, reg
        c1 = 2 * width
        logits = nn.Conv2d(c1, NUM_JOINTS, 1)
        # Near-zero logits: every map starts as a uniform softmax (prediction = image centre),
        # so the first steps do not chase large random gradients of the L1 term.
        nn.init.normal_(logits.weight, std=1e-3)
        nn.init.zeros_(logits.bias)  # type: ignore[arg-type]  # bias=True: never None
        self.head = nn.Sequential(_conv_bn(c1, c1, 3), logits)
        self._init_presence(8 * width, presence, presence_weight)

    def forward(self, x: torch.Tensor) -> Output:
        p, deepest = self.features(x)
        return self._output(self.head(p), deepest)

    def _centres(self, n: int, device: torch.device) -> torch.Tensor:
        """Input-pixel coordinate of cells 0..n-1 along one axis."""
        return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * self.stride

    def _softmax(self, out: torch.Tensor) -> torch.Tensor:
        """(B, J, h, w) logits -> fp32 probabilities over each map's h*w cells."""
        b, j, h, w = out.shape
        return torch.softmax(out.float().reshape(b, j, h * w), dim=-1).reshape(b, j, h, w)

    def _expect(self, p: torch.Tensor) -> torch.Tensor:
        """Soft-argmax: the expected cell-centre position (B, J, 2) in input px."""
        xs, ys = self._centres(p.shape[3], p.device), self._centres(p.shape[2], p.device)
        x = (p.sum(dim=2) * xs).sum(-1)
        y = (p.sum(dim=3) * ys).sum(-1)
        return torch.stack([x, y], dim=-1)

    def decode_keypoints(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft-argmax uv (input px); score = softmax mass in the 3x3 cells around the cell that
        holds the expected position (1 for a peaked map, 9 / (h * w) for a flat one)."""
        with torch.autocast(out.device.type, enabled=False):
            p = self._softmax(out)
            uv = self._expect(p)
            h, w = p.shape[2:]
            cell = (uv / self.stride).floor()  # the cell holding the expected position
            ix = torch.arange(w, device=p.device, dtype=torch.float32)
            iy = torch.arange(h, device=p.device, dtype=torch.float32)
            near_x = ((ix - cell[..., 0:1]).abs() <= 1).float()  # (B, J, w)
            near_y = ((iy - cell[..., 1:2]).abs() <= 1).float()  # (B, J, h)
            score = (p * near_y[..., :, None] * near_x[..., None, :]).sum(dim=(2, 3))
            return uv, score.clamp(0.0, 1.0)

    def keypoint_loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Mean over visible joints of |du| + |dv| in units of the input side, plus `reg` x the
        Jensen-Shannon divergence (nats) between the softmax map and a normalised Gaussian of
        `sigma` input px centred on the target."""
        with torch.autocast(out.device.type, enabled=False):
            b, j, h, w = out.shape
            side = float(w * self.stride)
            uv = _known(uv, visible)
            logp = torch.log_softmax(out.float().reshape(b, j, h * w), dim=-1).reshape(b, j, h, w)
            l1 = ((self._expect(logp.exp()) - uv).abs().sum(-1)) / side
            total = l1
            if self.reg > 0:
                total = total + self.reg * self._js(logp, uv)
            return _masked_mean(total, visible)

    def _js(self, logp: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """Jensen-Shannon divergence (B, J) between softmax maps and Gaussian targets at uv."""
        h, w = logp.shape[2:]
        dx = (self._centres(w, logp.device) - uv[..., 0:1]) / self.sigma  # (B, J, w)
        dy = (self._centres(h, logp.device) - uv[..., 1:2]) / self.sigma  # (B, J, h)
        logq = -0.5 * (dy[..., :, None] ** 2 + dx[..., None, :] ** 2)  # (B, J, h, w)
        logq = logq - torch.logsumexp(logq.flatten(2), dim=-1)[..., None, None]
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        kl_pm = (logp.exp() * (logp - logm)).sum(dim=(2, 3))
        kl_qm = (logq.exp() * (logq - logm)).sum(dim=(2, 3))
        return 0.5 * (kl_pm + kl_qm)


# ---------------------------------------------------------------------------------------------
# simcc: the strided encoder, per-axis classification into sub-pixel bins


class SimCCPose(StridedEncoder, PoseModel):
    """`StridedEncoder` with a SimCC head: per joint, per axis, logits over `bins` = S x `split`
    sub-pixel bins (bin i centred at input px (i + 0.5) / split).

    head    conv3x3 2w->2w (BN, ReLU), conv1x1 -> 21 maps (S/4 x S/4), each flattened, then one
            linear layer (S/4)^2 -> bins for x and one for y (shared by the joints, as in SimCC)

    `forward` -> logits (B, 21, 2 x bins): the x bins, then the y bins. The input side is fixed
    (the linear layers take its (S/4)^2 cells) and must be divisible by 16.
    """

    arch = "simcc"

    def __init__(
        self,
        width: int = 16,
        depth: int = 1,
        *,
        image_size: int,
        split: float = SIMCC_K,
        sigma: float = 2.0,
        presence: bool = False,
        presence_weight: float = PRESENCE_WEIGHT,
    ):
        super().__init__(width, depth)
        self.k, self.sigma = split, sigma
        self.bins = round(image_size * split)
        # the decoder's window: bins within 3 label sigmas of the peak (at least one each side)
        self.window = max(1, math.ceil(3.0 * sigma * split))
        c1 = 2 * width
        self.head = nn.Sequential(_conv_bn(c1, c1, 3), nn.Conv2d(c1, NUM_JOINTS, 1))
        cells = (image_size // 4) ** 2
        self.to_x = nn.Linear(cells, self.bins)
        self.to_y = nn.Linear(cells, self.bins)
        self._init_presence(8 * width, presence, presence_weight)

    def forward(self, x: torch.Tensor) -> Output:
        p, deepest = self.features(x)
        maps = self.head(p).flatten(2)  # (B, J, (S/4)^2)
        return self._output(torch.cat([self.to_x(maps), self.to_y(maps)], dim=-1), deepest)

    def _centres(self, device: torch.device) -> torch.Tensor:
        """Input-pixel coordinate of bins 0..bins-1."""
        return (torch.arange(self.bins, device=device, dtype=torch.float32) + 0.5) / self.k

    def _axes(self, out: torch.Tensor) -> torch.Tensor:
        """(B, J, 2 x bins) logits -> fp32 (B, J, 2, bins): axis 0 is x, 1 is y."""
        b, j, _ = out.shape
        return out.float().reshape(b, j, 2, self.bins)

    def decode_keypoints(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per axis: the argmax bin, then the softmax-weighted mean of the bin centres within
        `window` bins (3 label sigmas) of it; score = the product of the two axes' softmax mass in
        those windows (1 for a peaked output, about (2 window + 1)^2 / bins^2 for a flat one).

        Why a local expectation rather than the argmax refined by a parabola through its two
        neighbours' log-probabilities: the parabola is exact for an exactly Gaussian peak but
        rests on three bins whose log-probabilities differ little (second difference 1/16 per
        bin^2 at 2 bins per px with a 2 px label). Simulated on such labels with Gaussian noise
        on the logits, the parabola is off by 0.13 bin on average (0.75 at worst) at noise 0.01
        and 0.46 (2.0) at 0.05; the window, averaging about 6 sigma of bins, by 0.009 (0.036) and
        0.033 (0.16), and its truncation bias without noise (the window is centred on the argmax
        bin, not the peak) stays under 0.01 bin. Unlike the global expectation (soft-argmax) it
        ignores a second mode elsewhere on the axis, e.g. a look-alike finger, which would drag
        the estimate to a point between the two.
        """
        with torch.autocast(out.device.type, enabled=False):
            p = torch.softmax(self._axes(out), dim=-1)  # (B, J, 2, bins)
            peak = p.argmax(dim=-1, keepdim=True)
            index = torch.arange(self.bins, device=p.device)
            w = p * ((index - peak).abs() <= self.window)
            mass = w.sum(-1)  # (B, J, 2)
            uv = (w * self._centres(p.device)).sum(-1) / mass.clamp_min(1e-12)
            return uv, (mass[..., 0] * mass[..., 1]).clamp(0.0, 1.0)

    def keypoint_loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Mean over visible joints of KL(label || softmax), summed over the two axes (nats); the
        label: a Gaussian of `sigma` input px at the joint's coordinate, over the axis's bins."""
        with torch.autocast(out.device.type, enabled=False):
            uv = _known(uv, visible)
            logp = torch.log_softmax(self._axes(out), dim=-1)
            d = (self._centres(out.device) - uv[..., None]) / self.sigma  # (B, J, 2, bins)
            logq = -0.5 * d**2
            logq = logq - torch.logsumexp(logq, dim=-1, keepdim=True)
            kl = (logq.exp() * (logq - logp)).sum(-1).sum(-1)  # (B, J)
            return _masked_mean(kl, visible)


# ---------------------------------------------------------------------------------------------
# Building by name


def input_multiple(arch: str, depth: int) -> int:
    """The input side of `arch` must be a multiple of this (its total downsampling)."""
    return 2**depth if arch == "unet" else 32 if arch in DETECTORS else 16


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters that build a model, each declared once (TrainConfig inherits them,
    so a recipe, a checkpoint's config and `build_model` obey the same rules). A resumed run may
    change none of them: the saved weights would not fit."""

    arch: Literal["unet", "strided", "simcc", "centernet"] = setting(
        "unet",
        "the architecture (ARCHS); unet with width 16, depth 3 is the tutorial's model; centernet "
        "is the hand detector",
        fixed=MODEL,
    )
    width: int = setting(
        16,
        "channels of the first stage (strided, simcc: stages 2w, 4w, 8w; centernet: 4w, 8w, 16w)",
        fixed=MODEL,
        gt=0,
    )
    depth: int = setting(
        3, "unet: down/up levels; strided, simcc, centernet: blocks per stage", fixed=MODEL, gt=0
    )
    image_size: int = setting(128, "model input side, px (a multiple of input_multiple)", fixed=MODEL, gt=0)
    sigma: float = setting(
        3.0, "target Gaussian, px at model size (the tutorial blurred with sigma 3)", fixed=MODEL, gt=0
    )
    loss: Literal["iou", "mse", "l1", "kl", "focal"] = setting(
        "iou",
        "unet trains with iou or mse (heatmap losses), strided with l1, simcc with kl, centernet with focal",
        fixed=MODEL,
    )
    index_offset: float = setting(
        INDEX_OFFSET, "unet decoder: heatmap cell i sits at i + 0.5 (see heatmaps.py)", fixed=MODEL
    )
    reg: float = setting(
        STRIDED_REG, "strided: weight of the Jensen-Shannon regulariser (DSNT)", fixed=MODEL, ge=0
    )
    simcc_k: float = setting(
        SIMCC_K, "simcc: sub-pixel bins per input px (split ratio k; image_size x k whole)", fixed=MODEL, gt=0
    )
    presence: bool = setting(
        False, "add a hand-presence logit: is there a hand in the crop at all", fixed=MODEL
    )
    presence_weight: float = setting(
        PRESENCE_WEIGHT, "presence: weight of its binary cross entropy in the loss", fixed=MODEL, ge=0
    )
    stride: int = setting(
        DETECTOR_STRIDE, "centernet: output stride of its maps, 4 or 8 input px per cell", fixed=MODEL
    )

    def __post_init__(self) -> None:
        check_bounds(self)  # a subclass's fields too: TrainConfig checks every bound here
        if self.loss not in ARCH_LOSSES[self.arch]:
            raise ConfigError(
                ("loss", "arch"),
                f"loss {self.loss!r}: arch {self.arch!r} trains with {' | '.join(ARCH_LOSSES[self.arch])}",
            )
        multiple = input_multiple(self.arch, self.depth)
        if self.image_size % multiple:
            raise ConfigError(
                ("image_size", "depth"),
                f"image_size {self.image_size} must be a multiple of {multiple} for arch {self.arch!r}"
                + (" (2**depth)" if self.arch == "unet" else ""),
            )
        if self.arch != "unet" and self.index_offset != INDEX_OFFSET:
            raise ConfigError(
                "index_offset",
                f"must be {INDEX_OFFSET} for arch {self.arch!r} (its cells and bins sit at pixel centres)",
            )
        if self.arch in DETECTORS:
            from handpose.detector import STRIDES  # detector.py builds on this module

            if self.stride not in STRIDES:
                raise ConfigError(
                    ("stride", "arch"),
                    f"must be one of {', '.join(map(str, STRIDES))} for arch {self.arch!r}, "
                    f"got {self.stride}",
                )
            if self.presence:
                raise ConfigError(
                    ("presence", "arch"), f"arch {self.arch!r} (a detector) has no presence head"
                )
        bins = self.image_size * self.simcc_k
        if self.arch == "simcc" and abs(bins - round(bins)) > 1e-9:
            raise ConfigError(
                ("simcc_k", "image_size"),
                f"image_size x simcc_k must be a whole number of bins, "
                f"got {self.image_size} x {self.simcc_k}",
            )


MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))  # a config dict's keys that build a model


def build_model(arch: str, **hparams: Any) -> PoseModel:
    """The model `arch` with these hyper-parameters (ModelConfig's fields; the rest default).

    width, depth  unet: first level's channels, down/up levels; strided, simcc: stem width w
                  (stages 2w, 4w, 8w), basic blocks per stage; centernet: the same (4w, 8w, 16w)
    image_size    input side, px (a multiple of `input_multiple(arch, depth)`)
    sigma         Gaussian target, input px (unet: heatmap target; strided: JS regulariser;
                  simcc: the 1D label over each axis's bins)
    loss          unet: "iou" | "mse"; strided: "l1"; simcc: "kl"; centernet: "focal"
    index_offset  unet decoder: heatmap cell i at i + index_offset (0.5; the tutorial's 0.0);
                  strided, simcc: must be 0.5 (their cells and bins are centred by construction)
    reg           strided: weight of the Jensen-Shannon regulariser (0 = L1 only); others ignore it
    simcc_k       simcc: bins per input px (the split ratio k; image_size x k must be whole);
                  others ignore it
    presence      add the hand-presence logit (every keypoint arch); presence_weight: its loss weight
    stride        centernet: output stride of its maps, 4 or 8 (sigma, index_offset, reg unused)
    Raises HandposeError naming the field for a value that cannot build a model.
    """
    return model_from_config({"arch": arch, **hparams})


def model_from_config(config: Mapping[str, Any]) -> PoseModel:
    """The model of a config dict (a recipe's, a checkpoint's): its MODEL_KEYS, checked by
    ModelConfig's rules (a missing key takes ModelConfig's default, so a config written before
    simcc_k or presence existed builds the model it did; other keys are ignored).
    Raises HandposeError naming the field at fault."""
    c = from_dict(ModelConfig, {k: v for k, v in config.items() if k in MODEL_KEYS})
    heads: dict[str, Any] = {"presence": c.presence, "presence_weight": c.presence_weight}
    if c.arch == "unet":
        return ShallowUNet(c.width, c.depth, sigma=c.sigma, loss=c.loss, index_offset=c.index_offset, **heads)
    if c.arch == "simcc":
        return SimCCPose(c.width, c.depth, image_size=c.image_size, split=c.simcc_k, sigma=c.sigma, **heads)
    if c.arch in DETECTORS:
        from handpose.detector import CenterNet  # detector.py builds on this module

        return CenterNet(c.width, c.depth, stride=c.stride)
    return StridedPose(c.width, c.depth, sigma=c.sigma, reg=c.reg, **heads)


M = TypeVar("M", bound=nn.Module)


def fold_batchnorm(net: M) -> M:
    """For inference (eval mode): each Conv2d followed directly by a BatchNorm2d in a Sequential
    becomes one conv with the BN's running statistics and affine folded into its weights and bias,
    the BN an Identity. The same function to float rounding, one pass over the feature map fewer
    (BN was an eighth of the strided model's CPU forward time). In place; returns `net`."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if net.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (it folds the running statistics)")
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
    return net


def normalized_input(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """uint8 photos or crops (B, H, W, 3) -> the float input (B, 3, H, W) on `device`, channels_last
    memory (NHWC permuted), each value (x - 255 mean) / (255 std) of its channel: what predict and
    the API feed the keypoint models and the detector.

    Why this shape: the normalisation runs over contiguous NHWC rows against one precomputed
    (H * W * 3) pattern per constant, two in-place vectorised passes. A (3,) broadcast over the last
    axis of size 3 does not vectorise and took 1 ms of a detector batch's 6 ms forward pass."""
    b, h, w, c = images.shape
    shift, scale = _norm_rows(h * w, tuple(mean), tuple(std), device)
    x = images.to(device, non_blocking=True).float().contiguous()
    x.view(b, -1).sub_(shift).mul_(scale)
    return x.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _norm_rows(
    pixels: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 mean, 1 / (255 std)) repeated over `pixels` NHWC pixels, fp32 on `device`."""
    shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
    return shift.repeat(pixels).to(device), scale.repeat(pixels).to(device)


# ---------------------------------------------------------------------------------------------
# A loaded model and how to feed it; the tutorial's weights


BOX_TO_KEYPOINTS = 1.2  # box side / keypoint-extent side, for a model whose data did not record it
TUTORIAL_SIZE = 128
TUTORIAL_MEAN = (0.3950, 0.4323, 0.2954)
TUTORIAL_STD = (0.1966, 0.1734, 0.1836)


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a model and where its crops come from (a checkpoint's, `checkpoint.model_spec`;
    the tutorial's, `tutorial_model`)."""

    size: int  # model input side, px
    mean: tuple[float, float, float]  # RGB normalisation of [0, 1] pixels
    std: tuple[float, float, float]
    kind: str = "handpose checkpoint"  # | "tutorial state_dict"
    preprocess: str = "warp"  # "warp": imageio.warp_to_input; "tutorial": Pillow antialiased resize
    crop: str = "image"  # what the model was trained on: "image" | "box" (the checkpoint's sets[0])
    pad: float = BOX_PAD  # the square box's side x pad fills the input (the checkpoint's box_pad)
    box_to_keypoints: float = BOX_TO_KEYPOINTS  # refinement: labelled box side / keypoint extent
    digest: str = ""  # identifies the weights (a resumed predict run must use the same)


def tutorial_model(weights: Mapping[str, torch.Tensor]) -> tuple[ShallowUNet, ModelSpec]:
    """The tutorial's `model_final` (a bare ShallowUNet state_dict, any width and depth): the
    network, strictly loaded, and how the tutorial fed it (128 px, its normalisation, its own
    Pillow resize, never a DCT-scaled decode). Its decoder reads heatmap cell i as coordinate i
    (handpose's: i + 0.5). ValueError when the weights are another architecture's."""
    width, depth = _unet_shape(weights)
    net = ShallowUNet(width=width, depth=depth, index_offset=TUTORIAL_INDEX_OFFSET)
    load_weights(net, weights, "a ShallowUNet state_dict")
    spec = ModelSpec(TUTORIAL_SIZE, TUTORIAL_MEAN, TUTORIAL_STD, "tutorial state_dict", "tutorial")
    return net, spec


def load_weights(net: nn.Module, weights: Mapping[str, Any], what: str) -> None:
    """Strict load; weights of another architecture are a ValueError of one line (key counts,
    not 43 key names), `what` saying what was expected."""
    expected, given = set(net.state_dict()), set(weights)
    if expected != given:
        raise ValueError(
            f"weights are for another architecture ({len(expected - given)} missing, "
            f"{len(given - expected)} unexpected keys); expected {what}"
        )
    for name, t in net.state_dict().items():
        if tuple(weights[name].shape) != tuple(t.shape):
            raise ValueError(
                f"weights are for another architecture ({name} is "
                f"{tuple(weights[name].shape)}, not {tuple(t.shape)}); expected {what}"
            )
    net.load_state_dict(weights, strict=True)


def _unet_shape(weights: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(width, depth) of a ShallowUNet state_dict: first block's channels, number of down blocks.
    Unknown layouts get the tutorial's (16, 3) and fail the strict load with key counts."""
    first = weights.get("conv_down1.double_conv.1.weight")
    depth = sum(1 for k in weights if re.fullmatch(r"conv_down\d+\.double_conv\.1\.weight", k))
    return (int(first.shape[0]), depth) if first is not None and first.ndim == 4 else (16, 3)


@torch.no_grad()
def flip_test(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Test-time flip: decode a batch (B, 3, H, W) and its left-right mirror, map the mirror's
    keypoints back (x -> W - x in geometry.py's pixel convention; joint identities kept: a hand
    has no left/right joint pairs) and average. -> (uv (B, J, 2) input px, score (B, J),
    presence (B,) or None without a presence head), fp32.

    Symmetric by construction: the mirrored batch gives exactly the mirrored answer (up to
    float rounding), whatever the model.
    """
    width = images.shape[-1]
    both = model(torch.cat([images, images.flip(-1)]))
    uv, score = model.decode(both)  # type: ignore[operator]
    n = len(images)
    back = uv[n:].clone()
    back[..., 0] = width - back[..., 0]
    presence = model.presence(both) if hasattr(model, "presence") else None  # type: ignore[operator]
    return (
        (uv[:n] + back) / 2,
        (score[:n] + score[n:]) / 2,
        None if presence is None else (presence[:n] + presence[n:]) / 2,
    )


def model_summary(model: nn.Module, image_size: int) -> dict[str, int]:
    """{"params", "flops_per_sample"}: parameter count, and the FLOPs of ONE forward pass of a
    batch of 1 (no backward), as torch.utils.flop_counter.FlopCounterMode counts them (2 per
    multiply-add of convs and matmuls; BN, activations and resampling are not counted). Runs in
    eval mode without gradients so BN statistics are untouched; the training mode is restored."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": int(counter.get_total_flops()),
    }
