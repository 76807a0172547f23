"""MobileNetV1 (width 0.25) as in the Pytorch_Retinaface ImageNet checkpoint: `stage{1,2,3}` of
conv-BN-LeakyReLU(0.1) units (a 3x3 stem, then depthwise-separable pairs), avgpool, `fc`."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.LeakyReLU(0.1, inplace=True)
    )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv-BN-act then 1x1 pointwise conv-BN-act: one reconstruction unit."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
            nn.BatchNorm2d(inp),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
            nn.LeakyReLU(0.1, inplace=True),
        )


class MobileNetV1(nn.Module):
    def __init__(self, width: float = 0.25, num_classes: int = 1000) -> None:
        super().__init__()

        def c(ch: int) -> int:
            return max(8, int(ch * width))

        self.stage1 = nn.Sequential(
            conv_bn(3, c(32), 2),
            DepthwiseSeparable(c(32), c(64), 1),
            DepthwiseSeparable(c(64), c(128), 2),
            DepthwiseSeparable(c(128), c(128), 1),
            DepthwiseSeparable(c(128), c(256), 2),
            DepthwiseSeparable(c(256), c(256), 1),
        )
        self.stage2 = nn.Sequential(
            DepthwiseSeparable(c(256), c(512), 2), *[DepthwiseSeparable(c(512), c(512), 1) for _ in range(5)]
        )
        self.stage3 = nn.Sequential(
            DepthwiseSeparable(c(512), c(1024), 2), DepthwiseSeparable(c(1024), c(1024), 1)
        )
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c(1024), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.avg(x).flatten(1))


def mobilenetv1(width: float = 0.25, num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(width, num_classes)
