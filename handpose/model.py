"""ShallowUNet: the tutorial's UNet, with configurable width and depth.

The default (width 16, depth 3) has the tutorial's exact state_dict layout (85 keys, 491,206
parameters), so its trained `model_final` loads with strict=True. Outputs are sigmoid heatmaps
(B, 21, H, W) at the input resolution; H and W must be divisible by 2**depth.
"""

from __future__ import annotations

import torch
from torch import nn

from handpose.skeleton import NUM_JOINTS


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


class ShallowUNet(nn.Module):
    """UNet with `depth` down/up levels of width w, 2w, 4w, ... and a 2^depth*w bottleneck."""

    def __init__(self, width: int = 16, depth: int = 3, in_channels: int = 3, joints: int = NUM_JOINTS):
        super().__init__()
        self.depth = depth
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
