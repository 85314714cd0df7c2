"""RT-DETR decoder (official `RTDETRTransformer`): IoU-aware query selection and the transformer decoder.

memory = the encoder maps flattened; every token gets a class score and a box (relative to its anchor); the
top-K tokens by score become the initial queries and reference boxes (paper Sec. 4.3, "uncertainty-minimal
query selection"). Each decoder layer refines the boxes (iterative refinement, Deformable DETR), and every
layer has its own class and box head. Module names match the official v1 state_dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_input_size
from ..ops.boxes import inverse_sigmoid
from .deform_attn import MSDeformableAttention
from .denoising import DenoisingGroups, build_denoising_groups

QUERY_SELECT_METHODS = ("default", "one2many", "agnostic")


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def generate_anchors(
    spatial_shapes: list[tuple[int, int]], grid_size: float = 0.05, eps: float = 1e-2, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Anchors [1, sum(H*W), 4] in inverse-sigmoid space and the valid mask [1, sum(H*W), 1].

    Token (row i, col j) of level l gets the box (cx, cy, w, h) = ((j + .5) / W, (i + .5) / H, s, s) with
    s = grid_size * 2^l. Anchors with any coordinate outside (eps, 1 - eps) are invalid and set to +inf.
    """
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        xy = (torch.stack([grid_x, grid_y], dim=-1) + 0.5) / torch.tensor([w, h], dtype=torch.float32, device=device)
        wh = torch.full_like(xy, grid_size * 2.0**level)
        anchors.append(torch.cat([xy, wh], dim=-1).reshape(-1, h * w, 4))
    anchors = torch.cat(anchors, dim=1)
    valid_mask = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    anchors = torch.where(valid_mask, anchors, torch.full_like(anchors, math.inf))
    return anchors, valid_mask


class TransformerDecoderLayer(nn.Module):
    """Post-norm: self-attention -> multi-scale deformable cross-attention -> FFN, each with residual + LayerNorm."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        num_points: tuple[int, ...],
        cross_attn_method: str = "default",
        offset_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, nhead, num_points, cross_attn_method, offset_scale)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        reference_boxes: Tensor,
        value_maps: list[Tensor],
        attn_mask: Tensor | None,
        query_pos: Tensor,
    ) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, reference_boxes, value_maps))
        ffn = self.linear2(F.relu(self.linear1(tgt)))
        # The clamp keeps fp16 finite (official v1).
        return self.norm3((tgt + ffn).clamp(min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, **layer_options) -> None:
        """`num_layers` TransformerDecoderLayers built from the same `layer_options`."""
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(**layer_options) for _ in range(num_layers))

    def forward(
        self,
        tgt: Tensor,
        ref_unact: Tensor,
        value_maps: list[Tensor],
        bbox_heads: nn.ModuleList,
        score_heads: nn.ModuleList,
        query_pos_head: nn.Module,
        attn_mask: Tensor | None,
        eval_idx: int,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer (boxes, logits); in eval only layer `eval_idx`'s, after which the loop stops.

        In training, layer i > 0 predicts its box from the previous layer's refined box *not* detached
        (official gradient path); the reference box fed to the next layer is always detached.
        """
        ref_detach = torch.sigmoid(ref_unact)
        ref = ref_detach
        boxes, logits = [], []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, ref_detach, value_maps, attn_mask, query_pos_head(ref_detach))
            delta = bbox_heads[i](tgt)
            refined = torch.sigmoid(delta + inverse_sigmoid(ref_detach))
            if self.training:
                logits.append(score_heads[i](tgt))
                boxes.append(refined if i == 0 else torch.sigmoid(delta + inverse_sigmoid(ref)))
            elif i == eval_idx:
                logits.append(score_heads[i](tgt))
                boxes.append(refined)
                break
            ref = refined
            ref_detach = refined.detach() if self.training else refined
        return boxes, logits


class RTDETRDecoder(nn.Module):
    """Query selection + decoder. Output dict (normalised cx,cy,w,h boxes):

    eval: {pred_logits [B, Q, C], pred_boxes [B, Q, 4]}.
    train: also aux_outputs (earlier decoder layers), enc_outputs (the top-K encoder proposals; with
    query_select_method 'agnostic' their logits have one class), and, with denoising, dn_outputs (every
    layer's denoising predictions) and dn_groups.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: list[int],
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_layers: int = 6,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        num_points: tuple[int, ...] = (4, 4, 4),
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_idx: int = -1,
        cross_attn_method: str = "default",
        offset_scale: float = 0.5,
        query_select_method: str = "default",
    ) -> None:
        super().__init__()
        if query_select_method not in QUERY_SELECT_METHODS:
            raise ValueError(f"query_select_method must be one of {QUERY_SELECT_METHODS}, got {query_select_method!r}")
        self.num_classes = num_classes
        self.query_select_method = query_select_method
        self.num_queries = num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.eval_idx = eval_idx % num_layers
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict(conv=nn.Conv2d(c, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim))
            )
            for c in in_channels
        )
        self.decoder = TransformerDecoder(
            num_layers, d_model=hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward, num_points=num_points,
            cross_attn_method=cross_attn_method, offset_scale=offset_scale,
        )  # fmt: skip
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_layers))
        self._anchor_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        prior_bias = -math.log((1 - 0.01) / 0.01)  # scores start at p = 0.01 (focal-loss prior)
        nn.init.constant_(self.enc_score_head.bias, prior_bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, prior_bias)
        for mlp in [self.enc_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    def anchors(self, spatial_shapes: list[tuple[int, int]], like: Tensor) -> tuple[Tensor, Tensor]:
        """Anchors and valid mask for these feature sizes, built once per (sizes, device, dtype)."""
        key = (tuple(spatial_shapes), like.device, like.dtype)
        if key not in self._anchor_cache:
            with torch.inference_mode(False), torch.no_grad():
                anchors, valid = generate_anchors(spatial_shapes, device=like.device)
                self._anchor_cache[key] = (anchors.to(like.dtype), valid)
        return self._anchor_cache[key]

    def flatten_memory(self, maps: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Concatenate the tokens of the projected levels: [B, sum(H*W), hidden], (H, W) per level."""
        shapes = [(f.shape[2], f.shape[3]) for f in maps]
        return torch.cat([f.flatten(2).permute(0, 2, 1) for f in maps], dim=1), shapes

    def query_selection(
        self, memory: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """IoU-aware top-K selection -> (queries, reference boxes unactivated, top-K logits, top-K boxes).

        Every token is scored; invalid (border) anchors are zeroed in memory but stay eligible, as in the
        official code. Queries are detached: gradients reach the encoder through the enc_* heads only.
        The ranking (official v2 `_select_topk`): 'default' a token's best class score; 'one2many' the top-K
        (token, class) pairs, so a token may be selected once per class; 'agnostic' a 1-class score head.
        """
        if memory.shape[1] < self.num_queries:  # an input too small for the model (torch.topk would fail)
            height, width = spatial_shapes[0]  # the stride-8 map
            check_input_size((height * 8, width * 8), self.num_queries)
        anchors, valid_mask = self.anchors(spatial_shapes, memory)
        memory = valid_mask.to(memory.dtype) * memory  # multiply, not where(): ONNX-friendly (official)
        output_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(output_memory)
        topk_ind = self.rank_tokens(enc_logits)
        topk_memory = output_memory.gather(1, topk_ind[..., None].expand(-1, -1, output_memory.shape[-1]))
        # The box head is per token, so it runs on the K selected tokens only: the official code runs it on
        # every token and gathers afterwards (same values and gradients, 2.2 GFLOPs more for r18vd at 640 px).
        topk_anchors = anchors.expand(memory.shape[0], -1, -1).gather(1, topk_ind[..., None].expand(-1, -1, 4))
        ref_unact = self.enc_bbox_head(topk_memory) + topk_anchors
        topk_logits = enc_logits.gather(1, topk_ind[..., None].expand(-1, -1, enc_logits.shape[-1]))
        return topk_memory.detach(), ref_unact, topk_logits, torch.sigmoid(ref_unact)

    def rank_tokens(self, enc_logits: Tensor) -> Tensor:
        """Indices [B, K] of the selected tokens, from their logits [B, S, C] (C = 1 when 'agnostic')."""
        if self.query_select_method == "one2many":
            pairs = torch.topk(enc_logits.flatten(1), self.num_queries, dim=1).indices
            return torch.div(pairs, enc_logits.shape[-1], rounding_mode="floor")
        return torch.topk(enc_logits.max(-1).values, self.num_queries, dim=1).indices

    def forward(self, feats: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> dict:
        maps = [p(f) for p, f in zip(self.input_proj, feats)]  # the memory per level: the decoder's values
        memory, spatial_shapes = self.flatten_memory(maps)
        queries, ref_unact, enc_logits, enc_boxes = self.query_selection(memory, spatial_shapes)

        dn: DenoisingGroups | None = None
        if self.training and targets is not None:
            dn = build_denoising_groups(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                self.num_denoising, self.label_noise_ratio, self.box_noise_scale,
            )  # fmt: skip
        if dn is not None:
            queries = torch.cat([dn.embeddings, queries], dim=1)
            ref_unact = torch.cat([dn.boxes_unact, ref_unact], dim=1)

        boxes, logits = self.decoder(
            queries, ref_unact.detach(), maps, self.dec_bbox_head, self.dec_score_head,
            self.query_pos_head, dn.attn_mask if dn is not None else None, self.eval_idx,
        )  # fmt: skip
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}

        out = {"enc_outputs": {"pred_logits": enc_logits, "pred_boxes": enc_boxes}}
        if dn is not None:
            split = [dn.num_dn, self.num_queries]
            dn_boxes, boxes = zip(*(b.split(split, dim=1) for b in boxes))
            dn_logits, logits = zip(*(lg.split(split, dim=1) for lg in logits))
            out["dn_outputs"] = [{"pred_logits": lg, "pred_boxes": b} for lg, b in zip(dn_logits, dn_boxes)]
            out["dn_groups"] = dn
        out["pred_logits"], out["pred_boxes"] = logits[-1], boxes[-1]
        out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": b} for lg, b in zip(logits[:-1], boxes[:-1])]
        return out
