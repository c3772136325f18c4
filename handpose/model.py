"""The pose architectures, selected by name: `build_model(arch, ...)` (or `model_from_config`).

Every model is a `PoseModel`: an `nn.Module` whose `forward` returns its raw output, with
`decode(out)` -> (uv (B, 21, 2) in model-input pixels, score (B, 21) in [0, 1]) and
`loss(out, uv, visible)` -> a scalar that counts only visible joints and computes in fp32 even
under autocast. Pixel convention as in geometry.py: pixel i has centre i + 0.5.

unet     the tutorial's ShallowUNet: sigmoid heatmaps (B, 21, S, S) at the input resolution,
         heatmap losses ("iou", "mse") against Gaussian targets, heatmap-weighted-mean decoder.
         Width 16, depth 3 is the tutorial's exact state_dict layout (85 keys, 491,206
         parameters): its trained `model_final` loads with strict=True.
strided  a residual encoder to stride 16, an FPN top-down path back to stride 4, and 21 logit maps
         at stride 4 (S/4 x S/4), decoded by soft-argmax (integral regression). Loss: L1 on the
         soft-argmax coordinates (units of the input side) plus `reg` x the Jensen-Shannon
         divergence between each softmax map and a Gaussian of `sigma` input px (DSNT).
centernet  the hand DETECTOR (handpose/detector.py): the whole photo in, hand-centre heatmap, box
         size and offset at `stride` 4 or 8; its `decode` gives boxes and scores, its `loss`
         takes the batch's boxes and hands mask (`targets`), not keypoints.

Every hyper-parameter is a plain value (int, float, str) that lives in a TOML recipe and in a
checkpoint's config dict; `model_from_config` rebuilds a model from such a dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from handpose.errors import HandposeError
from handpose.heatmaps import INDEX_OFFSET, LOSSES, heatmaps_to_keypoints, keypoints_to_heatmaps
from handpose.skeleton import NUM_JOINTS

ARCHS = ("unet", "strided", "centernet")
ARCH_LOSSES = {"unet": tuple(LOSSES), "strided": ("l1",), "centernet": ("focal",)}
DETECTORS = ("centernet",)  # archs that find hands (boxes) rather than keypoints
# The keys of a config dict that build a model (the rest of a training config is ignored here).
MODEL_KEYS = ("arch", "width", "depth", "image_size", "sigma", "loss", "index_offset", "reg", "stride")
DETECTOR_STRIDE = 8  # centernet: output stride when a config does not give one
STRIDED_REG = (
    1.0  # strided: JS regulariser weight; 1 beat 0 (6.7% vs 9.0% of the box) and 0.1 (8.4%) on short runs
)


class PoseModel(nn.Module):
    """A keypoint model: raw output from `forward`, keypoints from `decode`, training loss from `loss`.

    `targets` names the batch entries that `loss` takes after the output (the trainer passes
    `batch[k]` for each): a keypoint model's are uv and visible, the detector's boxes and hands.
    """

    targets: tuple[str, ...] = ("uv", "visible")

    def decode(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output -> (uv (B, J, 2) model-input pixels, score (B, J) in [0, 1]), in fp32."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Scalar loss over the visible joints only (uv (B, J, 2) model-input px, visible (B, J) bool).

        A batch without a visible joint gives zero, still attached to the graph.
        """
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"conv_down{i + 1}")(x if i == 0 else self.maxpool(x))
            skips.append(x)
        x = self.conv_bottleneck(self.maxpool(x))
        for i in range(self.depth):
            x = getattr(self, f"conv_up{i + 1}")(torch.cat([self.upsample(x), skips[-1 - i]], dim=1))
        return self.conv_out(x)

    def decode(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmap-weighted mean (heatmap px = input px); score = the map's peak (sigmoid, 0..1)."""
        return heatmaps_to_keypoints(out, self.index_offset)

    def loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
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


class StridedPose(PoseModel):
    """Strided encoder with stride-4 logit maps and a soft-argmax (integral regression) decoder.

    stem    conv3x3/2 3->w, conv3x3/2 w->2w (BN, ReLU): stride 4
    stages  `depth` basic blocks at strides 4, 8, 16 with 2w, 4w, 8w channels
    neck    FPN top-down: 1x1 laterals to 2w channels, bilinear 2x upsample + add, to stride 4
    head    conv3x3 2w->2w (BN, ReLU), conv1x1 -> 21 logit maps (S/4 x S/4)

    Cell (i, j) of a logit map sits at input pixel ((j + 0.5) * 4, (i + 0.5) * 4). The input side
    must be divisible by 16.
    """

    stride = 4

    def __init__(self, width: int = 16, depth: int = 1, *, sigma: float = 4.0, reg: float = STRIDED_REG):
        super().__init__()
        self.sigma, self.reg = sigma, reg
        c1, c2, c3 = 2 * width, 4 * width, 8 * width
        self.stem = nn.Sequential(_conv_bn(3, width, 3, 2), _conv_bn(width, c1, 3, 2))
        self.stage1 = _stage(c1, c1, depth, 1)
        self.stage2 = _stage(c1, c2, depth, 2)
        self.stage3 = _stage(c2, c3, depth, 2)
        self.lateral1 = nn.Conv2d(c1, c1, 1)
        self.lateral2 = nn.Conv2d(c2, c1, 1)
        self.lateral3 = nn.Conv2d(c3, c1, 1)
        logits = nn.Conv2d(c1, NUM_JOINTS, 1)
        # Near-zero logits: every map starts as a uniform softmax (prediction = image centre),
        # so the first steps do not chase large random gradients of the L1 term.
        nn.init.normal_(logits.weight, std=1e-3)
        nn.init.zeros_(logits.bias)  # type: ignore[arg-type]  # bias=True: never None
        self.head = nn.Sequential(_conv_bn(c1, c1, 3), logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        p = self.lateral3(f3)
        p = self.lateral2(f2) + _up2(p)
        p = self.lateral1(f1) + _up2(p)
        return self.head(p)

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

    def decode(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def loss(self, out: torch.Tensor, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
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
# Building by name


def input_multiple(arch: str, depth: int) -> int:
    """The input side of `arch` must be a multiple of this (its total downsampling)."""
    return 2**depth if arch == "unet" else 32 if arch in DETECTORS else 16


def build_model(
    arch: str,
    *,
    width: int,
    depth: int,
    image_size: int,
    sigma: float,
    loss: str,
    index_offset: float,
    reg: float = STRIDED_REG,
    stride: int = DETECTOR_STRIDE,
) -> PoseModel:
    """The model `arch` with these hyper-parameters (see the module docstring for each).

    width, depth  unet: first level's channels, down/up levels; strided: stem width w (stages
                  2w, 4w, 8w), basic blocks per stage
    image_size    input side, px (a multiple of `input_multiple(arch, depth)`)
    sigma         Gaussian target, input px (unet: heatmap target; strided: JS regulariser)
    loss          unet: "iou" | "mse"; strided: "l1"
    index_offset  unet decoder: heatmap cell i at i + index_offset (0.5; the tutorial's 0.0);
                  strided: must be 0.5 (its cells are at pixel centres by construction)
    reg           strided: weight of the Jensen-Shannon regulariser (0 = L1 only); unet ignores it
    stride        centernet: output stride of its maps, 4 or 8 (sigma, index_offset, reg unused)
    Raises HandposeError naming the field for a value that cannot build a model.
    """
    if arch not in ARCHS:
        raise HandposeError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
    if loss not in ARCH_LOSSES[arch]:
        raise HandposeError(f"loss {loss!r} is not one of {', '.join(ARCH_LOSSES[arch])} for arch {arch!r}")
    for name, value in (("width", width), ("depth", depth), ("image_size", image_size)):
        if value < 1:
            raise HandposeError(f"{name} must be positive, got {value}")
    if sigma <= 0:
        raise HandposeError(f"sigma must be > 0, got {sigma}")
    multiple = input_multiple(arch, depth)
    if image_size % multiple:
        raise HandposeError(f"image_size {image_size} must be divisible by {multiple} for arch {arch!r}")
    if arch == "unet":
        return ShallowUNet(width, depth, sigma=sigma, loss=loss, index_offset=index_offset)
    if arch in DETECTORS:
        from handpose.detector import STRIDES, CenterNet

        if stride not in STRIDES:
            raise HandposeError(
                f"stride must be one of {', '.join(map(str, STRIDES))} for arch {arch!r}, got {stride}"
            )
        return CenterNet(width, depth, stride=stride)
    if index_offset != INDEX_OFFSET:
        raise HandposeError(f"index_offset must be {INDEX_OFFSET} for arch 'strided', got {index_offset}")
    if reg < 0:
        raise HandposeError(f"reg must be >= 0, got {reg}")
    return StridedPose(width, depth, sigma=sigma, reg=reg)


def model_from_config(config: Mapping[str, Any]) -> PoseModel:
    """`build_model` from a config dict (a checkpoint's or a recipe's); keys other than
    MODEL_KEYS are ignored, and a config without "arch" (written before there was a choice) is a
    unet."""
    try:
        return build_model(
            str(config.get("arch", "unet")),
            width=int(config["width"]),
            depth=int(config["depth"]),
            image_size=int(config["image_size"]),
            sigma=float(config["sigma"]),
            loss=str(config["loss"]),
            index_offset=float(config.get("index_offset", INDEX_OFFSET)),
            reg=float(config.get("reg", STRIDED_REG)),
            stride=int(config.get("stride", DETECTOR_STRIDE)),
        )
    except KeyError as e:
        raise HandposeError(f"model config lacks {e.args[0]!r}") from None


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
