"""Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR", Eq. 3), pure PyTorch.

Each query attends to `num_points[l]` sampled locations on every feature level l around its reference box:
    out = W_o sum_h sum_l sum_p A[h,l,p] * V_h,l(ref_xy + off[h,l,p] / P_l * ref_wh * 0.5)
with A softmaxed jointly over levels and points. V is sampled bilinearly (`grid_sample`, align_corners=False,
zero padding; method 'default') or, RT-DETRv2's 'discrete' method, at the nearest cell (a gather: no GridSample
in the exported graph). `offset_scale` is the 0.5 above (v2 makes it a parameter). Module names match the
official `cross_attn.*` keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


CROSS_ATTN_METHODS = ("default", "discrete")


def deformable_attention_core(
    values: list[Tensor],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_points: list[int],
    method: str = "default",
) -> Tensor:
    """Sampling ('default': bilinear, 'discrete': nearest cell) and weighting.

    values: per level, [B, heads * head_dim, H_l, W_l] (any strides: each reshapes to the
    [B * heads, head_dim, H_l, W_l] map `grid_sample` reads, a view at batch 1);
    sampling_locations: [B, Lq, heads, sum(P_l), 2] normalised (x, y) in [0, 1];
    attention_weights: [B, Lq, heads, sum(P_l)] -> output [B, Lq, heads * head_dim].
    """
    b, lq, heads = sampling_locations.shape[:3]
    locations = sampling_locations.permute(0, 2, 1, 3, 4).flatten(0, 1).split(num_points, dim=2)  # [B*heads, Lq, P_l, 2]
    sampled = []
    for value_l, loc_l in zip(values, locations):
        channels, h, w = value_l.shape[1:]
        value_l = value_l.reshape(b * heads, channels // heads, h, w)
        if method == "discrete":
            sampled.append(sample_nearest(value_l, loc_l))
        else:
            grid = 2 * loc_l - 1
            sampled.append(F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.permute(0, 2, 1, 3).reshape(b * heads, 1, lq, -1)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # [B*heads, head_dim, Lq]
    return out.reshape(b, -1, lq).permute(0, 2, 1)


def sample_nearest(value: Tensor, locations: Tensor) -> Tensor:
    """value [N, C, H, W] at the cells of locations [N, Lq, P, 2] ((x, y) in [0, 1]) -> [N, C, Lq, P].

    Official v2 (`deformable_attention_core_func_v2`, method 'discrete'): cell = int64(loc * (W, H) + 0.5), a
    cast that truncates toward zero, then clamped into the map. The official code clamps both x and y to
    [0, H - 1] ("FIX ME? for rectangle input"); here each coordinate is clamped to its own axis (x to W - 1,
    y to H - 1), as Hugging Face does: identical on square maps, and never an index outside the map.
    """
    n, channels, h, w = value.shape
    lq, points = locations.shape[1:3]
    size = torch.tensor([w, h], dtype=locations.dtype, device=locations.device)
    cell = (locations * size + 0.5).to(torch.int64)
    x = cell[..., 0].clamp(0, w - 1)
    y = cell[..., 1].clamp(0, h - 1)
    index = (y * w + x).reshape(n, 1, lq * points).expand(-1, channels, -1)
    return value.flatten(2).gather(2, index).reshape(n, channels, lq, points)


class MSDeformableAttention(nn.Module):
    """`num_points`: points per level (v2 allows unequal counts). method: 'default' (bilinear) or 'discrete'
    (v2 dsp models; as in the official code, the sampling offsets are then frozen: requires_grad False)."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_points: tuple[int, ...] = (4, 4, 4),
        method: str = "default",
        offset_scale: float = 0.5,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if method not in CROSS_ATTN_METHODS:
            raise ValueError(f"cross-attention method must be one of {CROSS_ATTN_METHODS}, got {method!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_points = list(num_points)
        self.method = method
        self.offset_scale = offset_scale
        total_points = sum(num_points)
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        # 1 / P_l for each point: offsets are scaled by the number of points of their level.
        scale = torch.cat([torch.full((n,), 1.0 / n) for n in num_points])
        self.register_buffer("num_points_scale", scale, persistent=False)
        self._reset_parameters()
        if method == "discrete":
            self.sampling_offsets.requires_grad_(False)

    def _reset_parameters(self) -> None:
        # Offsets start on a ring of 8 directions (one per head), point p at distance p+1 (official init).
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        bias = torch.cat(
            [grid[:, None, :] * torch.arange(1, n + 1, dtype=torch.float32)[None, :, None] for n in self.num_points],
            dim=1,
        )  # [heads, sum(P_l), 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_boxes: Tensor, value_maps: list[Tensor]) -> Tensor:
        """query [B, Lq, C]; reference_boxes [B, Lq, 4] normalised cx,cy,w,h; value_maps: the memory per level,
        [B, C, H_l, W_l] -> [B, Lq, C]."""
        b, lq, _ = query.shape
        heads, total = self.num_heads, sum(self.num_points)
        # value_proj on each level's map as a 1x1 conv: no flatten, concat or split of the memory, and a
        # bias-fused conv in ONNX Runtime (r18vd 640 px: -5 ms there against a MatMul on the flat memory).
        weight = self.value_proj.weight[:, :, None, None]
        values = [F.conv2d(v, weight, self.value_proj.bias) for v in value_maps]

        offsets = self.sampling_offsets(query).reshape(b, lq, heads, total, 2)
        weights = self.attention_weights(query).reshape(b, lq, heads, total).softmax(-1)
        # loc = ref_xy + off / P_l * ref_wh * offset_scale (official v1: 0.5; v2: offset_scale, 0.5 by default)
        ref = reference_boxes[:, :, None, None, :]
        scale = self.num_points_scale.to(query.dtype)[:, None] * self.offset_scale
        locations = ref[..., :2] + offsets * scale * ref[..., 2:]
        out = deformable_attention_core(values, locations, weights, self.num_points, self.method)
        return self.output_proj(out)
