"""Hungarian matching of predictions to ground truth (DETR, Carion et al. 2020; RT-DETR keeps DETR's
set prediction with a focal classification cost, official v1 `src/zoo/rtdetr/matcher.py`)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

MatchIndices = tuple[Tensor, Tensor]
"""(pred_idx, tgt_idx): int64 [k] each, k = min(Q, n); query pred_idx[j] is matched to target tgt_idx[j]."""


def focal_class_cost(prob: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal-loss classification cost of each probability p of the target class: the focal loss of p
    as a positive minus its focal loss as a negative (official matcher, `use_focal_loss=True`)."""
    positive = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    negative = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
    return positive - negative


def replace_non_finite(cost: Tensor) -> Tensor:
    """Replace NaN and +-inf entries of a [Q, n] cost matrix so `linear_sum_assignment` accepts it.

    Non-finite costs come from diverging predictions (NaN logits or boxes, fp16 overflow). They become
    R = low + (k + 1) * (high - low) + 1, with [low, high] the range of the finite entries and
    k = min(Q, n) the number of matched pairs: any assignment with fewer non-finite pairs is then
    strictly cheaper, so such predictions are matched only when nothing else can be. Hugging Face uses
    float max instead (same intent); a value just above the finite range keeps the solver's float64
    potentials from swamping the differences between the finite costs.
    """
    finite = cost.isfinite()
    if bool(finite.all()):
        return cost
    valid = cost[finite]
    if valid.numel() == 0:
        return torch.zeros_like(cost)
    low, high = valid.min(), valid.max()
    return torch.where(finite, cost, low + (min(cost.shape) + 1) * (high - low) + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_bbox * L1 + cost_class * focal + cost_giou * (-GIoU).

    Defaults are the official RT-DETR values (costs 2 / 5 / 2, focal alpha 0.25, gamma 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set cost_class, cost_bbox or cost_giou > 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """Matching cost [Q, n] of one image: logits [Q, C], boxes [Q, 4] and gt_boxes [n, 4] normalised
        cx,cy,w,h, labels int64 [n]. Pass float32 tensors."""
        class_cost = focal_class_cost(logits.sigmoid()[:, labels], self.alpha, self.gamma)
        bbox_cost = torch.cdist(boxes, gt_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))
        return self.cost_bbox * bbox_cost + self.cost_class * class_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[MatchIndices]:
        """outputs: pred_logits [B, Q, C], pred_boxes [B, Q, 4] (normalised cx,cy,w,h); targets: B dicts
        with labels int64 [n] and boxes [n, 4]. Returns one (pred_idx, tgt_idx) per image, pred_idx sorted.

        One cost matrix [B*Q, sum(n)] for the whole batch (as DETR), whose per-image blocks are solved
        separately: a few large ops instead of a few per image. Costs are computed in float32 with autocast
        off: in float16 the 1e-8 of the focal cost rounds to 0 and log(0) turns the cost infinite.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            labels = torch.cat([t["labels"] for t in targets])
            gt_boxes = torch.cat([t["boxes"] for t in targets]).float()
            cost = self.cost_matrix(logits.flatten(0, 1).float(), boxes.flatten(0, 1).float(), labels, gt_boxes)
        # Sanitised per image in float64 (what the solver uses) so the replacement value cannot overflow.
        blocks = cost.view(len(targets), -1, cost.shape[-1]).double().cpu().split(sizes, dim=-1)
        indices = []
        for i, block in enumerate(blocks):
            if sizes[i] == 0:
                indices.append((empty, empty.clone()))
                continue
            pred_idx, tgt_idx = linear_sum_assignment(replace_non_finite(block[i]).numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices
