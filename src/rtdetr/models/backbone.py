"""ResNet-vd backbone ("PResNet" in the official code; He et al. 2019, "Bag of Tricks", variant D).

Variant D differs from the plain ResNet in two places: a 3-conv stem (32, 32, 64 channels at the official
widths) instead of one 7x7 conv, and projection shortcuts that average-pool before a 1x1 conv when the
block downsamples. Module names match the official state_dict (`conv1.conv1_1`, `res_layers.i.blocks.j.branch2a`,
`short.conv.conv`, ...).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvNormLayer, freeze_batch_norms

BLOCKS_PER_DEPTH = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def projection_shortcut(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    """Variant-D projection: AvgPool(2, ceil) + 1x1 conv when downsampling, else a strided 1x1 conv."""
    if stride == 2:
        pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True)
        return nn.Sequential(OrderedDict(pool=pool, conv=ConvNormLayer(ch_in, ch_out, 1, 1)))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = projection_shortcut(ch_in, ch_out, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=nn.ReLU(inplace=True))
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2b(self.branch2a(x))
        return F.relu(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    """1x1 -> 3x3 (strided, variant D) -> 1x1 expanding to 4 * ch_out."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.branch2a = ConvNormLayer(ch_in, ch_out, 1, 1, act=nn.ReLU(inplace=True))
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, stride, act=nn.ReLU(inplace=True))
        self.branch2c = ConvNormLayer(ch_out, ch_out * self.expansion, 1, 1)
        if not shortcut:  # registered after the branches: the official state_dict order
            self.short = projection_shortcut(ch_in, ch_out * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return F.relu(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    """One ResNet stage; block 0 always has a projection shortcut (also in stage 2 of R18/R34)."""

    def __init__(self, block: type[nn.Module], ch_in: int, ch_out: int, count: int, stage_num: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and stage_num != 2 else 1
            self.blocks.append(block(ch_in, ch_out, stride, shortcut=i != 0))
            ch_in = ch_out * block.expansion

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """ResNet-vd returning the stride-8/16/32 features [S3, S4, S5]."""

    def __init__(
        self,
        depth: int,
        stem_channels: int = 64,
        stage_channels: tuple[int, ...] = (64, 128, 256, 512),
        stage_blocks: tuple[int, ...] | None = None,
        freeze_at: int = -1,
        freeze_norm: bool = False,
    ) -> None:
        super().__init__()
        block = BottleNeck if depth >= 50 else BasicBlock
        counts = stage_blocks or BLOCKS_PER_DEPTH[depth]
        half = stem_channels // 2
        self.conv1 = nn.Sequential(
            OrderedDict(
                conv1_1=ConvNormLayer(3, half, 3, 2, act=nn.ReLU(inplace=True)),
                conv1_2=ConvNormLayer(half, half, 3, 1, act=nn.ReLU(inplace=True)),
                conv1_3=ConvNormLayer(half, stem_channels, 3, 1, act=nn.ReLU(inplace=True)),
            )
        )
        self.res_layers = nn.ModuleList()
        ch_in = stem_channels
        for i, (ch_out, count) in enumerate(zip(stage_channels, counts)):
            self.res_layers.append(Blocks(block, ch_in, ch_out, count, stage_num=i + 2))
            ch_in = ch_out * block.expansion
        self.out_channels = [c * block.expansion for c in stage_channels[1:]]

        if freeze_at >= 0:
            for module in [self.conv1, *self.res_layers[:freeze_at]]:
                module.requires_grad_(False)
        if freeze_norm:
            freeze_batch_norms(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i > 0:
                outs.append(x)
        return outs
