"""Box conversions, IoU and GIoU. Boxes are (..., 4) tensors; cxcywh or xyxy as named."""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clipped to [0, 1] and both terms floored at `eps` (official `inverse_sigmoid`)."""
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_and_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of xyxy boxes broadcast against each other ([..., 4] x [..., 4] -> [...])."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union, union


def _generalized_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of xyxy boxes broadcast against each other."""
    iou, union = _iou_and_union(boxes1, boxes2)
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes [N,4] x [M,4] -> ([N,M], [N,M])."""
    return _iou_and_union(boxes1[:, None], boxes2[None])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU of xyxy boxes [N,4] x [M,4] -> [N,M]."""
    return _generalized_iou(boxes1[:, None], boxes2[None])


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding xyxy boxes [N,4], [N,4] -> [N]: the diagonal of `box_iou` without the N x N matrix."""
    return _iou_and_union(boxes1, boxes2)[0]


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of corresponding xyxy boxes [N,4], [N,4] -> [N]."""
    return _generalized_iou(boxes1, boxes2)
