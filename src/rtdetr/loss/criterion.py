"""RT-DETR training loss: varifocal classification + L1 + GIoU box losses on every prediction set
(official v1 `src/zoo/rtdetr/rtdetr_criterion.py`, losses ['vfl', 'boxes']).

Term names, each already multiplied by its weight:
  loss_{vfl,bbox,giou}           last decoder layer, Hungarian-matched
  loss_*_aux_{i}                 decoder layer i = 0..L-2, each matched independently
  loss_*_enc_0                   the encoder's top-K proposals, matched independently
  loss_*_dn_{i}                  denoising queries of decoder layer i = 0..L-1, matched by construction
  loss                           the plain sum of all of the above
The official v1 code (and Hugging Face) name the encoder terms `loss_*_aux_{L-1}` (appended last to the
aux list); official v2 names them `_enc_0` as here. Values are identical either way.
RT-DETRv2's `RTDETRCriterionv2` options (its configs leave them off): `boxes_weight_format` 'iou' | 'giou' makes
each matched pair's (G)IoU the varifocal target and the weight of its GIoU term; `share_matched_indices` reuses
the last layer's matching for the auxiliary layers.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.boxes import box_cxcywh_to_xyxy, paired_box_iou, paired_generalized_box_iou
from .matcher import HungarianMatcher, MatchIndices

OFFICIAL_WEIGHTS = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
BOXES_WEIGHT_FORMATS = ("none", "iou", "giou")  # official v2 `boxes_weight_format` (None, 'iou', 'giou')


class DenoisingMatch(Protocol):
    """What the loss needs from `rtdetr.models.denoising.DenoisingGroups`: positive_idx per image (int64
    query indices of its positives, group-major) and the number of groups."""

    positive_idx: list[Tensor]
    num_group: int


def flat_prediction_index(indices: list[MatchIndices]) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) int64 [K] of all matched predictions, image by image."""
    batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
    return batch_idx, torch.cat([pred for pred, _ in indices])


def matched_targets(targets: list[dict[str, Tensor]], indices: list[MatchIndices]) -> tuple[Tensor, Tensor]:
    """Labels int64 [K] and boxes [K, 4] of the matched targets, in `flat_prediction_index` order."""
    labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
    boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
    return labels, boxes.float()


def varifocal_loss(
    logits: Tensor,
    boxes: Tensor,
    targets: list[dict[str, Tensor]],
    indices: list[MatchIndices],
    num_boxes: float,
    alpha: float = 0.75,
    gamma: float = 2.0,
    quality: Tensor | None = None,
) -> Tensor:
    """IoU-aware varifocal loss (RT-DETR paper Sec. 4.3; VarifocalNet, Zhang et al. 2021).

    logits [B, Q, C], boxes [B, Q, 4] normalised cx,cy,w,h. A matched query's target for its gt class is
    the (detached) IoU of its box with the gt; every other entry has target 0. Positives are weighted by
    that IoU, negatives by alpha * p^gamma. Summed and divided by num_boxes (official
    `.mean(1).sum() * Q / num_boxes`, kept in that form for bitwise parity). `quality` [K] replaces the IoU
    targets (official v2 `values`, from `boxes_weight_format`).
    """
    batch_idx, query_idx = flat_prediction_index(indices)
    gt_labels, gt_boxes = matched_targets(targets, indices)
    if quality is None:
        pred_boxes = boxes[batch_idx, query_idx].detach()
        quality = paired_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))

    target = torch.zeros_like(logits)
    target[batch_idx, query_idx, gt_labels] = 1.0
    target_score = torch.zeros_like(logits)
    target_score[batch_idx, query_idx, gt_labels] = quality
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - target) + target_score

    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def box_losses(
    boxes: Tensor,
    targets: list[dict[str, Tensor]],
    indices: list[MatchIndices],
    num_boxes: float,
    giou_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """L1 on cx,cy,w,h and 1 - GIoU of the matched boxes (boxes [B, Q, 4]), each summed / num_boxes; each
    pair's GIoU term times `giou_weight` [K] if given (official v2 `boxes_weight`)."""
    batch_idx, query_idx = flat_prediction_index(indices)
    _, gt_boxes = matched_targets(targets, indices)
    pred_boxes = boxes[batch_idx, query_idx]
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
    return {
        "loss_bbox": F.l1_loss(pred_boxes, gt_boxes, reduction="none").sum() / num_boxes,
        "loss_giou": ((1 - giou) if giou_weight is None else (1 - giou) * giou_weight).sum() / num_boxes,
    }


def match_quality(
    boxes: Tensor, targets: list[dict[str, Tensor]], indices: list[MatchIndices], kind: str
) -> Tensor:
    """IoU or GIoU ('iou' | 'giou') [K] of each matched (detached) prediction with its target: official v2
    `get_loss_meta_info` for `boxes_weight_format`."""
    batch_idx, query_idx = flat_prediction_index(indices)
    _, gt_boxes = matched_targets(targets, indices)
    pred, gt = box_cxcywh_to_xyxy(boxes[batch_idx, query_idx].detach()), box_cxcywh_to_xyxy(gt_boxes)
    return paired_box_iou(pred, gt) if kind == "iou" else paired_generalized_box_iou(pred, gt)


def denoising_indices(groups: DenoisingMatch, targets: list[dict[str, Tensor]]) -> list[MatchIndices]:
    """Denoising positives are matched by construction: group g's copy of gt j is positive_idx[g * n + j]."""
    indices = []
    for positive_idx, t in zip(groups.positive_idx, targets):
        gt_idx = torch.arange(len(t["labels"]), dtype=torch.int64).tile(groups.num_group)
        if len(positive_idx) != len(gt_idx):
            raise ValueError(
                f"denoising groups hold {len(positive_idx)} positives for {len(t['labels'])} targets x "
                f"{groups.num_group} groups; build them from the same targets"
            )
        indices.append((positive_idx.cpu(), gt_idx))
    return indices


def average_num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Ground-truth boxes per process: the batch total, summed over processes when distributed and
    divided by the world size, at least 1 (official normaliser of every term)."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1).item()


class RTDETRCriterion(nn.Module):
    """The official RT-DETR loss. `forward(outputs, targets)` -> dict of weighted terms plus `loss`.

    outputs: the decoder's training dict: pred_logits [B, Q, C], pred_boxes [B, Q, 4] (normalised
    cx,cy,w,h), aux_outputs (layers 0..L-2), enc_outputs and, with denoising, dn_outputs (layers 0..L-1)
    and dn_groups. targets: B dicts with labels int64 [n] in 0..C-1 and boxes [n, 4] normalised cx,cy,w,h.
    Everything is computed in float32 with autocast off (official: criterion under autocast(enabled=False)).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_dict: dict[str, float] | None = None,
        alpha: float = 0.75,
        gamma: float = 2.0,
        boxes_weight_format: str = "none",
        share_matched_indices: bool = False,
    ) -> None:
        super().__init__()
        if boxes_weight_format not in BOXES_WEIGHT_FORMATS:
            raise ValueError(f"boxes_weight_format must be one of {BOXES_WEIGHT_FORMATS}, got {boxes_weight_format!r}")
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = share_matched_indices
        weight_dict = dict(OFFICIAL_WEIGHTS if weight_dict is None else weight_dict)
        if set(weight_dict) != set(OFFICIAL_WEIGHTS):
            raise ValueError(f"weight_dict keys must be {sorted(OFFICIAL_WEIGHTS)}, got {sorted(weight_dict)}")
        self.num_classes = num_classes
        self.matcher = HungarianMatcher() if matcher is None else matcher
        self.weight_dict = weight_dict
        self.alpha = alpha
        self.gamma = gamma

    @staticmethod
    def prediction_sets(outputs: dict) -> dict[str, dict[str, Tensor]]:
        """Every supervised prediction set by term suffix: '' (last layer), '_aux_{i}', '_enc_0', '_dn_{i}'."""
        sets = {"": outputs}
        sets.update({f"_aux_{i}": aux for i, aux in enumerate(outputs.get("aux_outputs", []))})
        if "enc_outputs" in outputs:
            sets["_enc_0"] = outputs["enc_outputs"]
        sets.update({f"_dn_{i}": dn for i, dn in enumerate(outputs.get("dn_outputs", []))})
        return sets

    def match(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, list[MatchIndices]]:
        """Matched (pred_idx, tgt_idx) per image for every prediction set, keyed like `prediction_sets`."""
        indices = {}
        for suffix, preds in self.prediction_sets(outputs).items():
            if suffix.startswith("_dn_"):
                indices[suffix] = denoising_indices(outputs["dn_groups"], targets)
            elif suffix.startswith("_aux_") and self.share_matched_indices:
                indices[suffix] = indices[""]  # official v2 option: the last layer's matching for every layer
            else:
                indices[suffix] = self.matcher(preds, self.set_targets(preds, targets))
        return indices

    def set_targets(self, preds: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The targets a prediction set is supervised with: class-agnostic proposals (one logit per token,
        v2 query_select_method 'agnostic') learn every object as class 0 (official v2 `enc_meta`). Unlike the
        official code, they are also matched with class 0 (it matches with the real labels, whose class cost
        cannot index a 1-class logit)."""
        if preds["pred_logits"].shape[-1] == 1 and self.num_classes != 1:
            return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        return targets

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, the criterion {self.num_classes}")
        num_boxes = average_num_boxes(targets, logits.device)
        indices = self.match(outputs, targets)
        losses = {}
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for suffix, preds in self.prediction_sets(outputs).items():
                # Denoising normalises by every copy of every gt (official: num_boxes * num_group).
                norm = num_boxes * outputs["dn_groups"].num_group if suffix.startswith("_dn_") else num_boxes
                terms = self.set_losses(preds, self.set_targets(preds, targets), indices[suffix], norm)
                losses.update({name + suffix: value for name, value in terms.items()})
        losses["loss"] = sum(losses.values())
        return losses

    def set_losses(
        self, preds: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: list[MatchIndices], num_boxes: float
    ) -> dict[str, Tensor]:
        """Weighted loss_vfl, loss_bbox, loss_giou of one prediction set (pred_logits, pred_boxes) in float32."""
        logits, boxes = preds["pred_logits"].float(), preds["pred_boxes"].float()
        indices = [(pred.to(logits.device), tgt.to(logits.device)) for pred, tgt in indices]
        quality = None
        if self.boxes_weight_format != "none":
            quality = match_quality(boxes, targets, indices, self.boxes_weight_format)
        terms = {"loss_vfl": varifocal_loss(logits, boxes, targets, indices, num_boxes, self.alpha, self.gamma, quality)}
        terms.update(box_losses(boxes, targets, indices, num_boxes, quality))
        return {name: value * self.weight_dict[name] for name, value in terms.items()}
