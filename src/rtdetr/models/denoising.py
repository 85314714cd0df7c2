"""Contrastive denoising groups (DINO, Zhang et al. 2023; RT-DETR trains with them, paper Sec. 4).

Ground-truth boxes are copied into `num_group` groups of 2 * max_gt queries: the first max_gt of a group
are positives (boxes jittered by less than half their size, labels flipped with probability
label_noise_ratio / 2), the next max_gt negatives (jittered by between 1x and 2x half their size); the
decoder must reconstruct positives and reject negatives. An attention mask keeps the matching queries
from seeing any denoising query and each group from seeing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

# The one query a batch without any box gets, so every process still runs the same graph (official v2).
EMPTY_BATCH_BOX = (0.5, 0.5, 0.1, 0.1)


@dataclass
class DenoisingGroups:
    """Denoising queries for one batch.

    embeddings [B, num_dn, C] (class embeddings of the noised labels), boxes_unact [B, num_dn, 4]
    (inverse-sigmoid of the noised cx,cy,w,h), attn_mask [num_dn + Q, num_dn + Q] (True = blocked),
    positive_idx per image (query indices of its positives, group-major, `num_group` copies of its gts),
    num_group, and num_dn (so split outputs with [num_dn, Q]).
    """

    embeddings: Tensor
    boxes_unact: Tensor
    attn_mask: Tensor
    positive_idx: list[Tensor]
    num_group: int
    num_dn: int


def denoising_attention_mask(num_dn: int, num_queries: int, group_size: int, device: torch.device) -> Tensor:
    """[num_dn + Q]^2 bool mask, True = may not attend: matching queries never see denoising queries,
    and denoising group g (rows [g*group_size, (g+1)*group_size)) sees only itself and the matching queries."""
    total = num_dn + num_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    for start in range(0, num_dn, group_size):
        mask[start : start + group_size, :start] = True
        mask[start : start + group_size, start + group_size : num_dn] = True
    return mask


def padded_targets(
    targets: list[dict[str, Tensor]], num_gts: list[int], max_gt: int, num_classes: int, empty_batch: bool,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """The targets padded to `max_gt` per image: labels int32 [B, max_gt] (padding: `num_classes`), boxes
    [B, max_gt, 4] (padding zeros; a batch without boxes gets the official dummy box) and a mask [B, max_gt],
    True where a real box sits."""
    batch = len(targets)
    labels = torch.full((batch, max_gt), num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros(batch, max_gt, 4, device=device)
    is_real = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
    if empty_batch:
        boxes[:] = torch.tensor(EMPTY_BATCH_BOX, device=device)
    for i, (t, n) in enumerate(zip(targets, num_gts)):
        if n > 0:
            labels[i, :n] = t["labels"].to(device=device, dtype=torch.int32)
            boxes[i, :n] = t["boxes"].to(device)
            is_real[i, :n] = True
    return labels, boxes, is_real


def build_denoising_groups(
    targets: list[dict[str, Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingGroups | None:
    """Noised copies of the targets (labels int64 [n], boxes [n, 4] normalised cx,cy,w,h).

    Random numbers are drawn in the official order (label mask, new labels, box signs, box magnitudes) so
    that a seeded run reproduces the official groups. Returns None when num_denoising is 0.
    """
    if num_denoising <= 0:
        return None
    device = class_embed.weight.device
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts, default=0)
    empty_batch = max_gt == 0
    max_gt = max(max_gt, 1)
    num_group = max(num_denoising // max_gt, 1)
    batch = len(targets)

    labels, boxes, is_real = padded_targets(targets, num_gts, max_gt, num_classes, empty_batch, device)

    labels = labels.tile(1, 2 * num_group)
    boxes = boxes.tile(1, 2 * num_group, 1)
    is_real = is_real.tile(1, 2 * num_group)
    negative = torch.zeros(batch, 2 * max_gt, 1, device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile(1, num_group, 1)
    positive = (1 - negative.squeeze(-1)) * is_real
    positive_idx = list(torch.nonzero(positive)[:, 1].split([n * num_group for n in num_gts]))
    num_dn = 2 * max_gt * num_group

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < (label_noise_ratio * 0.5)
        new_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
        labels = torch.where(flip & is_real, new_labels, labels)

    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        half_wh = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes)
        magnitude = (magnitude + 1.0) * negative + magnitude * (1 - negative)  # negatives: [1, 2), positives: [0, 1)
        xyxy = (xyxy + sign * magnitude * half_wh).clip(min=0.0, max=1.0)
        boxes = box_xyxy_to_cxcywh(xyxy)
    boxes_unact = inverse_sigmoid(boxes)

    return DenoisingGroups(
        embeddings=class_embed(labels),
        boxes_unact=boxes_unact,
        attn_mask=denoising_attention_mask(num_dn, num_queries, 2 * max_gt, device),
        positive_idx=positive_idx,
        num_group=num_group,
        num_dn=num_dn,
    )
