"""Efficient hybrid encoder (paper Sec. 4.2): AIFI on S5, then CCFF across S3-S5.

AIFI (attention-based intra-scale feature interaction) is one post-norm transformer encoder layer over the
S5 tokens with a fixed 2-D sin-cos position embedding. CCFF (CNN-based cross-scale feature fusion) is a
top-down FPN then a bottom-up PAN whose fusion blocks are CSP layers of RepVGG blocks.
Module names match the official v1 state_dict (`input_proj.i.0/1`, `encoder.0.layers.0`, `fpn_blocks`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvNormLayer, fold_batch_norm


def build_2d_sincos_position_embedding(
    height: int, width: int, dim: int, temperature: float = 10000.0, device: torch.device | None = None
) -> Tensor:
    """Fixed 2-D sin-cos embedding [1, height*width, dim] for tokens flattened row-major.

    Channel layout (official `build_2d_sincos_position_embedding`): [sin(r w), cos(r w), sin(c w), cos(c w)]
    with r the row, c the column and w = temperature^(-k / (dim/4)), k = 0..dim/4-1. On square maps this is
    bit-identical to the official order; on non-square maps it gives each token its true (row, column), as
    Hugging Face does (the official meshgrid order scrambles non-square maps).
    """
    if dim % 4 != 0:
        raise ValueError(f"position embedding dim must be divisible by 4, got {dim}")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32, device=device) / pos_dim)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    out_r = rows.flatten()[:, None] @ omega[None]
    out_c = cols.flatten()[:, None] @ omega[None]
    return torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)[None]


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer; the position embedding is added to queries and keys, not values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = nn.GELU()

    def forward(self, src: Tensor, pos_embed: Tensor) -> Tensor:
        q = k = src + pos_embed
        src = self.norm1(src + self.self_attn(q, k, value=src, need_weights=False)[0])
        return self.norm2(src + self.linear2(self.activation(self.linear1(src))))


class TransformerEncoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers))

    def forward(self, src: Tensor, pos_embed: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed)
        return src


class RepVggBlock(nn.Module):
    """act(BN(conv3x3(x)) + BN(conv1x1(x))); `fuse()` folds both branches into one 3x3 conv (RepVGG, Ding et al. 2021)."""

    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace both branches by `self.conv`, the single 3x3 conv equal to them (the official `convert_to_deploy`)."""
        if hasattr(self, "conv"):  # already fused
            return
        w3, b3 = fold_batch_norm(self.conv1.conv, self.conv1.norm)
        w1, b1 = fold_batch_norm(self.conv2.conv, self.conv2.norm)
        self.conv = nn.Conv2d(w3.shape[1], w3.shape[0], 3, 1, padding=1, bias=True)
        self.conv.weight.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        self.conv.bias.copy_(b3 + b1)
        self.to(device=w3.device, dtype=w3.dtype)
        del self.conv1, self.conv2


class CSPRepLayer(nn.Module):
    """Cross-stage-partial fusion block on cat([first, second]): conv3(RepVGG^n(conv1(x)) + conv2(x)),
    conv3 only when expansion < 1. `first` may be half `second`'s size: it is upsampled 2x (nearest) first."""

    def __init__(self, ch_in: int, ch_out: int, num_blocks: int, expansion: float) -> None:
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNormLayer(ch_in, hidden, 1, 1, act=nn.SiLU(inplace=True))
        self.conv2 = ConvNormLayer(ch_in, hidden, 1, 1, act=nn.SiLU(inplace=True))
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, ch_out, 1, 1, act=nn.SiLU(inplace=True)) if hidden != ch_out else nn.Identity()

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        upsample = first.shape[-2:] != second.shape[-2:]
        if hasattr(self, "conv_first"):  # fused (deploy)
            y = self.conv_first(first)
            y = self.conv_second(second) + (F.interpolate(y, scale_factor=2.0, mode="nearest") if upsample else y)
            x1, x2 = F.silu(y, inplace=True).chunk(2, dim=1)
        else:
            if upsample:
                first = F.interpolate(first, scale_factor=2.0, mode="nearest")
            x = torch.cat([first, second], dim=1)
            x1, x2 = self.conv1(x), self.conv2(x)
        return self.conv3(self.bottlenecks(x1) + x2)

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace conv1 and conv2 (BatchNorm folded) by one 1x1 conv per input part, `conv_first` and
        `conv_second`, each giving both branches' pre-activations: no concatenation, and as a 1x1 conv
        commutes with nearest upsampling, `first`'s part runs at `first`'s own (coarser) resolution."""
        if hasattr(self, "conv_first"):  # already fused
            return
        folded = [fold_batch_norm(c.conv, c.norm) for c in (self.conv1, self.conv2)]
        weight = torch.cat([w for w, _ in folded])
        split = weight.shape[1] // 2  # both parts are encoder maps of hidden_dim channels
        self.conv_first = nn.Conv2d(split, weight.shape[0], 1, bias=False)
        self.conv_second = nn.Conv2d(weight.shape[1] - split, weight.shape[0], 1)
        self.conv_first.weight.copy_(weight[:, :split])
        self.conv_second.weight.copy_(weight[:, split:])
        self.conv_second.bias.copy_(torch.cat([b for _, b in folded]))
        self.to(device=weight.device, dtype=weight.dtype)
        del self.conv1, self.conv2


class HybridEncoder(nn.Module):
    """Input projections -> AIFI on S5 -> CCFF. Returns three `hidden_dim` maps at strides 8, 16, 32."""

    def __init__(
        self,
        in_channels: list[int],
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        num_encoder_layers: int = 1,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        pe_temperature: float = 10000.0,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.pe_temperature = pe_temperature
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)) for c in in_channels
        )
        # AIFI: only on S5 (official `use_encoder_idx=[2]`); one encoder stack, hence `encoder.0`.
        self.encoder = nn.ModuleList([TransformerEncoder(num_encoder_layers, hidden_dim, nhead, dim_feedforward)])
        num_blocks = round(3 * depth_mult)
        levels = len(in_channels)
        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=nn.SiLU(inplace=True)) for _ in range(levels - 1)
        )
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion) for _ in range(levels - 1)
        )
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=nn.SiLU(inplace=True)) for _ in range(levels - 1)
        )
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion) for _ in range(levels - 1)
        )
        self._pos_cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    def position_embedding(self, height: int, width: int, like: Tensor) -> Tensor:
        """The sin-cos embedding for an S5 map of this size, built once per (size, device, dtype)."""
        key = (height, width, like.device, like.dtype)
        if key not in self._pos_cache:
            with torch.inference_mode(False), torch.no_grad():  # a cached tensor usable in training too
                pe = build_2d_sincos_position_embedding(height, width, self.hidden_dim, self.pe_temperature, like.device)
                self._pos_cache[key] = pe.to(like.dtype)
        return self._pos_cache[key]

    def aifi(self, s5: Tensor) -> Tensor:
        b, c, h, w = s5.shape
        tokens = s5.flatten(2).permute(0, 2, 1)
        pos = self.position_embedding(h, w, s5)
        tokens = self.encoder[0](tokens, pos)
        return tokens.permute(0, 2, 1).reshape(b, c, h, w)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        proj[-1] = self.aifi(proj[-1])
        levels = len(proj)

        # Top-down FPN. The lateral conv's output replaces the coarser map that PAN later fuses with.
        inner = [proj[-1]]
        for k in range(levels - 1):
            top = self.lateral_convs[k](inner[0])
            inner[0] = top
            inner.insert(0, self.fpn_blocks[k](top, proj[levels - 2 - k]))  # top upsampled 2x inside

        # Bottom-up PAN.
        outs = [inner[0]]
        for k in range(levels - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](down, inner[k + 1]))
        return outs
