"""HGNetv2 backbone of RT-DETR-L/X/H and RT-DETRv2-L/X/H (Baidu's PP-HGNetV2, official `src/nn/backbone/hgnetv2.py`).

- Stem (stride 4): a 3x3/2 conv, then two parallel branches at the same resolution, concatenated: a 2x2 conv
  pair (`stem2a`, `stem2b`) and a 2x2 stride-1 max pool, both zero-padded by one pixel on the right and bottom;
  then a 3x3/2 conv and a 1x1 conv.
- Four stages; stages 1-3 open with a depthwise 3x3/2 downsample conv (BN, no activation).
- An HG block runs `layer_num` convs in a chain and concatenates all their outputs with the block input
  (in + layer_num * mid channels); a 1x1 "squeeze" conv brings that to out/2 channels and a 1x1 "excitation"
  conv to out channels. Every block but a stage's first adds its input back (identity shortcut).
- Light blocks (stages 2 and 3 of L/X/H) replace each kxk conv of the chain by a 1x1 conv (BN, no activation)
  followed by a depthwise kxk conv.
- Every conv is conv -> BN -> ReLU, optionally followed by a `LearnableAffineBlock` (scalar scale and bias,
  `use_lab`; the L/X/H detectors leave it off).

Module names equal the official state_dict (`stem.stem2a.conv.1.weight`, `stages.i.downsample.*`,
`stages.i.blocks.j.layers.k.conv1.conv.weight`, `aggregation_squeeze_conv`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import freeze_batch_norms


@dataclass(frozen=True)
class HGStageSpec:
    """One row of the official `stage_config` table (same order of fields)."""

    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    layer_num: int


@dataclass(frozen=True)
class HGNetv2Arch:
    """`stem_channels` is (in, mid, out) as in the official table; `stages` are stages 0..3."""

    stem_channels: tuple[int, int, int]
    stages: tuple[HGStageSpec, HGStageSpec, HGStageSpec, HGStageSpec]


def _stages(*rows: tuple) -> tuple[HGStageSpec, ...]:
    return tuple(HGStageSpec(*row) for row in rows)


# The official `arch_configs` (B0..B6 are not used by the detectors). Stage rows: in_channels, mid_channels,
# out_channels, num_blocks, downsample, light_block, kernel_size, layer_num.
HGNETV2_ARCHS: MappingProxyType[str, HGNetv2Arch] = MappingProxyType(
    {
        "L": HGNetv2Arch(
            (3, 32, 48),
            _stages(
                (48, 48, 128, 1, False, False, 3, 6),
                (128, 96, 512, 1, True, False, 3, 6),
                (512, 192, 1024, 3, True, True, 5, 6),
                (1024, 384, 2048, 1, True, True, 5, 6),
            ),
        ),
        "X": HGNetv2Arch(
            (3, 32, 64),
            _stages(
                (64, 64, 128, 1, False, False, 3, 6),
                (128, 128, 512, 2, True, False, 3, 6),
                (512, 256, 1024, 5, True, True, 5, 6),
                (1024, 512, 2048, 2, True, True, 5, 6),
            ),
        ),
        "H": HGNetv2Arch(
            (3, 48, 96),
            _stages(
                (96, 96, 192, 2, False, False, 3, 6),
                (192, 192, 512, 3, True, False, 3, 6),
                (512, 384, 1024, 6, True, True, 5, 6),
                (1024, 768, 2048, 3, True, True, 5, 6),
            ),
        ),
    }
)


class LearnableAffineBlock(nn.Module):
    """y = scale * x + bias with one learnable scalar each (initialised to 1 and 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU (if `use_act`) -> LearnableAffineBlock (if `use_act` and `use_lab`).

    Padding is (k - 1) // 2 on every side, or, with `pad_bottom_right`, one zero row and column after the input
    and none before: the official `padding='same'` for the stem's 2x2 convs, kept as
    `conv = Sequential(ZeroPad2d([0, 1, 0, 1]), Conv2d)` so that the weight is `conv.1.weight`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_lab: bool = False,
        pad_bottom_right: bool = False,
    ) -> None:
        super().__init__()
        if pad_bottom_right:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)
            self.conv: nn.Module = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv)
        else:
            padding = (kernel_size - 1) // 2
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU() if use_act else nn.Identity()
        # The official block creates the affine block only next to an activation.
        self.lab = LearnableAffineBlock() if use_act and use_lab else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, H, W] -> [B, out, H', W']."""
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """1x1 conv (BN, no activation) -> depthwise kxk conv (BN, ReLU): the light-block layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, use_lab: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel_size, groups=out_channels, use_lab=use_lab)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, H, W] -> [B, out, H, W]."""
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """Stride-4 stem: 3x3/2, then [2x2 conv pair | 2x2/1 max pool] concatenated, then 3x3/2 and 1x1."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, use_lab: bool = False) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(in_channels, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_channels, mid_channels // 2, 2, use_lab=use_lab, pad_bottom_right=True)
        self.stem2b = ConvBNAct(mid_channels // 2, mid_channels, 2, use_lab=use_lab, pad_bottom_right=True)
        self.stem3 = ConvBNAct(mid_channels * 2, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_channels, out_channels, 1, use_lab=use_lab)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, out, ceil(ceil(H / 2) / 2), ceil(ceil(W / 2) / 2)]."""
        x = self.stem1(x)
        # As the official: zero padding (not -inf) before the pool, which matters when `use_lab` makes x negative.
        pooled = F.max_pool2d(F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=1)
        x = torch.cat([pooled, self.stem2b(self.stem2a(x))], dim=1)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    """Official `HG_Block`: a chain of `layer_num` convs, all outputs concatenated with the input, squeeze 1x1 to
    out/2, excitation 1x1 to out, plus the input when `identity` (every block of a stage but the first)."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        kernel_size: int,
        layer_num: int,
        identity: bool,
        light_block: bool,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList()
        for i in range(layer_num):
            ch_in = in_channels if i == 0 else mid_channels
            if light_block:
                self.layers.append(LightConvBNAct(ch_in, mid_channels, kernel_size, use_lab=use_lab))
            else:
                self.layers.append(ConvBNAct(ch_in, mid_channels, kernel_size, use_lab=use_lab))
        total_channels = in_channels + layer_num * mid_channels
        self.aggregation_squeeze_conv = ConvBNAct(total_channels, out_channels // 2, 1, use_lab=use_lab)
        self.aggregation_excitation_conv = ConvBNAct(out_channels // 2, out_channels, 1, use_lab=use_lab)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, H, W] -> [B, out, H, W]."""
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        y = self.aggregation_excitation_conv(self.aggregation_squeeze_conv(torch.cat(outputs, dim=1)))
        return y + x if self.identity else y


class HGStage(nn.Module):
    """Official `HG_Stage`: optional depthwise 3x3/2 downsample (BN, no activation), then `num_blocks` HG blocks."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        num_blocks: int,
        downsample: bool,
        light_block: bool,
        kernel_size: int,
        layer_num: int,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        self.downsample = (
            ConvBNAct(in_channels, in_channels, 3, stride=2, groups=in_channels, use_act=False, use_lab=use_lab)
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *(
                HGBlock(
                    in_channels if i == 0 else out_channels,
                    mid_channels,
                    out_channels,
                    kernel_size,
                    layer_num,
                    identity=i > 0,
                    light_block=light_block,
                    use_lab=use_lab,
                )
                for i in range(num_blocks)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, in, H, W] -> [B, out, H', W'] (H' = ceil(H / 2) when downsampling, else H)."""
        return self.blocks(self.downsample(x))


class HGNetv2(nn.Module):
    """HGNetv2 returning the stride-8/16/32 features of stages 1, 2, 3 (official `return_idx [1, 2, 3]`).

    `freeze_at >= 0` freezes the stem's parameters and those of the first min(freeze_at, 4) stages;
    `freeze_norm` replaces every BatchNorm2d by a FrozenBatchNorm2d (the L/X/H detectors use freeze_at 0 and
    freeze_norm True).
    """

    def __init__(self, arch: str, use_lab: bool = False, freeze_at: int = -1, freeze_norm: bool = False) -> None:
        super().__init__()
        if arch not in HGNETV2_ARCHS:
            raise ValueError(f"unknown HGNetv2 arch {arch!r}; choose one of {', '.join(HGNETV2_ARCHS)}")
        spec = HGNETV2_ARCHS[arch]
        self.stem = StemBlock(*spec.stem_channels, use_lab=use_lab)
        self.stages = nn.ModuleList(HGStage(**dataclasses.asdict(s), use_lab=use_lab) for s in spec.stages)
        self.out_channels = [s.out_channels for s in spec.stages[1:]]
        self._init_weights()

        if freeze_at >= 0:
            for module in [self.stem, *self.stages[: min(freeze_at, 4)]]:
                module.requires_grad_(False)
        if freeze_norm:
            freeze_batch_norms(self)

    def _init_weights(self) -> None:
        """As the official `_init_weights`: kaiming-normal convs (fan in, gain sqrt(2)), BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> [[B, C1, H/8, W/8], [B, C2, H/16, W/16], [B, C3, H/32, W/32]], C = `out_channels`
        (each stride-2 step rounds up: 161 rows give 81, 41, 21, 11, 6)."""
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i > 0:
                outs.append(x)
        return outs
